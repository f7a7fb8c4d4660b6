"""``elkeidctl status``: one view of the agent in both modes, as a table for
people and as JSON (``--json``) for scripts. Exit codes are LSB's: 0 running,
1 dead but its pid file remains, 3 not running.

Go printed ``systemctl status`` output or a pid list; this collects the same
facts (state, pids) and the ones an operator asks next (enabled? limits?
which plugins? how long up? how much memory?).
"""

import json
import os
import time

from .. import __version__
from .cgroups import AgentCgroup
from .layout import AGENT_PIDFILE, CRON_FILE, EXIT_NOT_RUNNING, EXIT_OK, INIT_SCRIPT, SERVICE
from .procs import agent_pids, descendants
from ..osfx.service import proc_stat_fields
from ..settings import Settings
from ..transport import credentials
from ..transport.tlswatch import IN_USE_FILE

EXIT_DEAD_WITH_PIDFILE = 1
_SYSTEMD_PROPS = ("LoadState", "ActiveState", "SubState", "MainPID", "UnitFileState",
                  "NRestarts", "Result")
_RC_DIRS = ("/etc/rc2.d", "/etc/rc3.d", "/etc/rc.d/rc3.d")
WANTS_LINK = "/etc/systemd/system/multi-user.target.wants/elkeid-agent.service"


def collect(ctl):
    """(facts dict, exit code)."""
    fx = ctl.fx
    values = ctl.values()
    mode = ctl.mode()
    info = {
        "service": SERVICE,
        "service_type": mode,
        "elkeidctl_version": __version__,
        "agent_id": _first_line(fx, ctl.paths.machine_id) or values.get("SPECIFIED_AGENT_ID"),
        "idc": values.get("specified_idc") or None,
        "region": values.get("specified_region") or None,
        "specified_env": ctl.paths.specified_env,
    }
    if mode == "systemd":
        code = _systemd(ctl, info)
    else:
        code = _sysvinit(ctl, info)
    _process_facts(fx, info, ctl.paths.plugin_dir)
    info["tls"] = _tls(ctl, info)
    return info, code


# The specified_env key of each TLS file; the defaults are the agent's.
_TLS_KEYS = (("ca", "ELKEID_CA"), ("cert", "ELKEID_CERT"), ("key", "ELKEID_KEY"))


def _tls(ctl, info):
    """Subject, issuer and expiry of the TLS set: the one the running agent
    uses (it writes tmp/tls-in-use.json when it loads one; a newer set it
    refused is not that), else what the files hold. Paths from
    specified_env, else the agent's defaults; a path given to the agent
    on its command line only is not known here."""
    fx = ctl.fx
    values = ctl.values()
    paths = {what: os.path.join(ctl.paths.workdir, values.get(key) or getattr(Settings, what))
             for what, key in _TLS_KEYS}
    if info.get("running") and info.get("pid"):
        try:
            in_use = json.loads(fx.read_text(ctl.paths.workdir + "/tmp/" + IN_USE_FILE) or "")
        except (OSError, ValueError):
            in_use = None
        if isinstance(in_use, dict) and in_use.get("pid") in (info.get("processes") or ()):
            out = dict(in_use.get("set") or {})
            out["source"] = "the running agent (in use)"
            return out
    data = {}
    for what in credentials.FILES:
        data[what] = fx.read_bytes_quietly(paths[what])
        if data[what] is None:
            return {"source": "files", "paths": paths,
                    "problem": "cannot read TLS %s %s" % (what, paths[what])}
    try:
        out = credentials.validate(data["ca"], data["cert"], data["key"], paths=paths,
                                   strict=False).as_dict()
    except credentials.CredentialError as e:
        return {"source": "files", "paths": paths, "problem": str(e)}
    out["source"] = "files"
    return out


def _systemd(ctl, info):
    r = ctl.systemctl("show", SERVICE, "--no-pager",
                      "--property=" + ",".join(_SYSTEMD_PROPS), capture=True, check=False)
    props = {}
    for line in r.output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    if r.rc != 0 or "ActiveState" not in props:
        info.update(state="unknown", pid=None, enabled=None, processes=[],
                    problem="systemctl show failed (status %d): %s" % (r.rc, r.output.strip()))
        return EXIT_NOT_RUNNING
    pid = _int(props.get("MainPID")) or None
    active = props.get("ActiveState")
    state = active if props.get("LoadState") != "not-found" else "not-installed"
    if props.get("SubState") and state not in ("not-installed",):
        state = "%s (%s)" % (active, props["SubState"])
    unit_state = props.get("UnitFileState", "")
    procs = set()
    if pid:
        table = ctl.fx.processes()
        procs = {pid} | descendants(table, pid)
    # Enabled: started at boot. "linked" alone is a unit systemd knows but
    # does not start (elkeidctl disable); older systemd also says "linked"
    # for one enabled by path, so look for the wants link then.
    enabled = unit_state in ("enabled", "enabled-runtime", "alias") or (
        unit_state in ("linked", "linked-runtime") and ctl.fx.exists(WANTS_LINK))
    info.update(state=state, running=active == "active", pid=pid, enabled=enabled,
                unit_file_state=unit_state or None,
                restarts=_int(props.get("NRestarts")),
                processes=sorted(procs))
    return EXIT_OK if active == "active" else EXIT_NOT_RUNNING


def _sysvinit(ctl, info):
    fx = ctl.fx
    holder = ctl.agent_holder()
    cg = AgentCgroup(fx)
    stale = ctl.stale_pid(AGENT_PIDFILE)
    enabled = fx.exists(INIT_SCRIPT) and any(
        name.startswith("S") and name.endswith(SERVICE)
        for d in _RC_DIRS for name in fx.listdir(d))
    pids = set()
    if holder is not None or cg.members():
        pids = agent_pids(fx, cg, holder or 0)
    info.update(running=holder is not None, pid=holder, enabled=enabled,
                cron_check=fx.exists(CRON_FILE), processes=sorted(pids),
                cgroup={"mode": cg.system.mode, "hierarchies": cg.limits(),
                        "agent_in_cgroup": cg.contains(holder) if holder and cg.paths()
                        else None})
    if holder is not None:
        info["state"] = "running"
        return EXIT_OK
    if stale is not None:
        info["state"] = "dead"
        info["problem"] = "%s names pid %s, which is not running" % (AGENT_PIDFILE, stale)
        return EXIT_DEAD_WITH_PIDFILE
    info["state"] = "stopped"
    return EXIT_NOT_RUNNING


def _process_facts(fx, info, plugin_dir):
    pid = info.get("pid")
    info["started_at"] = info["uptime_seconds"] = None
    if pid:
        started = _start_time(fx, pid)
        if started is not None:
            info["started_at"] = round(started, 3)
            info["uptime_seconds"] = max(0, int(time.time() - started))
    rss = [_rss(fx, p) for p in info.get("processes", ())]
    known = [r for r in rss if r is not None]
    info["memory_rss_bytes"] = sum(known) if known else None
    plugins = {name: None for name in fx.listdir(plugin_dir) if fx.isdir(plugin_dir + "/" + name)}
    for p in info.get("processes", ()):
        exe = fx.proc_link(p, "exe") or ""
        if exe.startswith(plugin_dir + "/"):
            name = exe[len(plugin_dir) + 1:].split("/", 1)[0]
            plugins[name] = p
    info["plugins"] = [{"name": n, "pid": plugins[n]} for n in sorted(plugins)]


def _start_time(fx, pid):
    fields = proc_stat_fields(fx.read_bytes_quietly("/proc/%d/stat" % pid) or b"")
    btime = None
    for line in (fx.read_text("/proc/stat") or "").splitlines():
        if line.startswith("btime "):
            btime = _int(line.split()[1])
    if len(fields) < 20 or btime is None:
        return None
    ticks = _int(fields[19])
    if ticks is None:
        return None
    return btime + ticks / float(os.sysconf("SC_CLK_TCK"))


def _rss(fx, pid):
    for line in (fx.read_text("/proc/%d/status" % pid) or "").splitlines():
        if line.startswith("VmRSS:"):
            kb = _int(line.split()[1]) if len(line.split()) > 1 else None
            return kb * 1024 if kb is not None else None
    return None


def _first_line(fx, path):
    try:
        text = fx.read_text(path, 4096)
    except OSError:
        return None
    return text.strip().splitlines()[0] if text and text.strip() else None


def _int(text):
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- rendering

def render_json(info):
    return json.dumps(info, indent=2, sort_keys=True)


def render_table(info):
    rows = []
    state = info.get("state", "unknown")
    if info.get("pid") and info.get("running"):
        up = info.get("uptime_seconds")
        state += " (pid %d%s)" % (info["pid"], ", up " + _duration(up) if up is not None else "")
    rows.append(("elkeid-agent", state))
    if info.get("problem"):
        rows.append(("problem", info["problem"]))
    rows.append(("service type", info["service_type"]))
    enabled = info.get("enabled")
    enabled_text = {True: "yes", False: "no", None: "unknown"}[enabled]
    if info["service_type"] == "sysvinit":
        enabled_text += ", cron check %s" % ("on" if info.get("cron_check") else "off")
    elif info.get("restarts"):
        enabled_text += ", restarted %d time(s)" % info["restarts"]
    rows.append(("enabled", enabled_text))
    procs = info.get("processes") or []
    rows.append(("processes", "%d%s" % (len(procs), (": " + " ".join(map(str, procs)))
                                       if procs else "")))
    if info.get("memory_rss_bytes") is not None:
        rows.append(("memory (RSS)", "%.1f MiB" % (info["memory_rss_bytes"] / 1048576.0)))
    cg = info.get("cgroup")
    if cg:
        parts = []
        for kind, h in sorted(cg["hierarchies"].items()):
            limits = ", ".join("%s=%s" % (k, v) for k, v in sorted(h.items())
                               if k not in ("path", "exists"))
            parts.append("%s %s%s" % (kind, h["path"],
                                      (" (" + limits + ")") if limits else
                                      ("" if h["exists"] else " (absent)")))
        text = "%s: %s" % (cg["mode"], "; ".join(parts)) if parts else \
            "none (no cgroup support found: no CPU or memory limits)"
        if cg.get("agent_in_cgroup") is False:
            text += "; the agent is NOT in it"
        rows.append(("cgroup", text))
    plugins = info.get("plugins") or []
    if plugins:
        rows.append(("plugins", ", ".join(
            "%s (%s)" % (p["name"], "pid %d" % p["pid"] if p["pid"] else "not running")
            for p in plugins)))
    rows.extend(_tls_rows(info.get("tls") or {}))
    rows.append(("agent id", info.get("agent_id") or "-"))
    rows.append(("idc / region", "%s / %s" % (info.get("idc") or "-", info.get("region") or "-")))
    rows.append(("elkeidctl", info["elkeidctl_version"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join("%-*s  %s" % (width, k, v) for k, v in rows)


def _tls_rows(tls):
    if not tls:
        return []
    rows = [("tls", tls.get("source", "-"))]
    if tls.get("problem"):
        rows.append(("tls problem", tls["problem"]))
    for which, label in (("cert", "client cert"), ("ca", "CA")):
        c = tls.get(which)
        if not c:
            continue
        days = c.get("days_left")
        rows.append((label, "%s, issuer %s, expires %s (%s)" % (
            c.get("subject") or "-", c.get("issuer") or "-", c.get("not_after") or "-",
            "unknown" if days is None else
            ("%.1f days" % days if days >= 0 else "EXPIRED %.1f days ago" % -days))))
    return rows


def _duration(seconds):
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "%dd%dh" % (days, hours)
    if hours:
        return "%dh%dm" % (hours, minutes)
    if minutes:
        return "%dm%ds" % (minutes, secs)
    return "%ds" % secs
