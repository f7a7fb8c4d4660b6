"""The devcenter's live terminal summary.

Owns the compact status lines printed every few seconds (unless --quiet): one
line with totals and rates, then at most one line per connected agent with
its last heartbeat (cpu, rss, state, net_mode, age). ``format_summary`` is
pure (snapshot in, lines out) so it is tested without a terminal.
"""

import asyncio
import sys
import time

# More agents than this are summarized as "... and N more": the summary is a
# glance, /conn/list has the full view.
MAX_AGENT_LINES = 20
# Seconds between repeats of an unchanged summary while no agent is connected.
IDLE_REPEAT = 60.0


def human_count(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return "%.1f%s" % (n / size, unit)
    return "%d" % n


def human_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return "%.1f%s" % (n / size, unit)
    return "%dB" % n


def _float(fields, key):
    try:
        return float(fields.get(key, ""))
    except ValueError:
        return None


def agent_line(info, now):
    """One line for one connection info dict (see Connection.info)."""
    parts = ["  %s" % info.get("agent_id")]
    if info.get("hostname"):
        parts.append("host=%s" % info["hostname"])
    if info.get("version"):
        parts.append("v%s" % info["version"])
    parts.append("rec=%s" % human_count(info.get("records", 0)))
    hb = info.get("last_heartbeat")
    if hb:
        cpu = _float(hb, "cpu")
        rss = _float(hb, "rss")
        if cpu is not None:
            parts.append("cpu=%.1f%%" % (cpu * 100))
        if rss is not None:
            parts.append("rss=%s" % human_bytes(rss))
        for key in ("state", "net_mode"):
            if hb.get(key):
                parts.append("%s=%s" % (key, hb[key]))
        at = info.get("last_heartbeat_at")
        if at:
            parts.append("hb=%ds ago" % max(0, now - at))
    else:
        parts.append("no heartbeat yet")
    plugins = info.get("plugins") or {}
    if plugins:
        parts.append("plugins=%s" % ",".join(sorted(n for n in plugins if n)))
    return " ".join(parts)


def format_summary(stats, connections, previous, interval, now=None):
    """Lines for one tick. ``stats`` is DevCenter.stats(); ``previous`` the
    stats of the last tick (or None) for the rates; ``interval`` seconds."""
    now = time.time() if now is None else now
    records = stats.get("records_total", 0)
    msgs = stats.get("messages_total", 0)
    nbytes = stats.get("bytes_total", 0)
    if previous and interval > 0:
        rate = (records - previous.get("records_total", 0)) / interval
        mrate = (msgs - previous.get("messages_total", 0)) / interval
        brate = (nbytes - previous.get("bytes_total", 0)) / interval
    else:
        rate = mrate = brate = 0.0
    head = ("devcenter: %d agent%s | %s rec/s %s msg/s %s/s | total %s records, %s stored"
            % (stats.get("connections", 0), "" if stats.get("connections", 0) == 1 else "s",
               human_count(rate), human_count(mrate), human_bytes(brate), human_count(records),
               human_count(stats.get("stored_records", 0))))
    errors = stats.get("decode_errors_total", 0)
    if errors:
        head += " | %d decode errors" % errors
    if stats.get("uploads_total"):
        head += " | %d uploads" % stats["uploads_total"]
    lines = [head]
    for info in connections[:MAX_AGENT_LINES]:
        lines.append(agent_line(info, now))
    if len(connections) > MAX_AGENT_LINES:
        lines.append("  ... and %d more agents" % (len(connections) - MAX_AGENT_LINES))
    return lines


async def run_summary(devcenter, interval=5.0, out=None):
    """Print a summary every ``interval`` seconds until cancelled."""
    out = out or sys.stdout
    previous = None
    last = time.monotonic()
    last_printed = None
    idle_since_print = 0.0
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        stats = devcenter.stats()
        connections = devcenter.connections()
        lines = format_summary(stats, connections, previous, now - last)
        idle_since_print += now - last
        previous, last = stats, now
        # An idle server repeats the same line; say it once a minute only.
        if not connections and lines == last_printed and idle_since_print < IDLE_REPEAT:
            continue
        last_printed = lines
        idle_since_print = 0.0
        out.write("\n".join(lines) + "\n")
        out.flush()
