"""Plugin benchmarks (not tests): records/s from N sample plugins in load mode.

    python -m elkeid_devtools.plugin_bench [--plugins 1 4] [--seconds 5]
        [--record-size 200] [--rate -1] [--python PATH] [--e2e [--latency]] [--dir DIR]

Default: the supervisor in this process feeding a RecordQueue drained like
the sender drains it. One row per plugin count: records/s and MB/s that
left the queue, this process's CPU seconds per million records (pipe reads,
frame splitting, validation, queue, the stand-in consumer), its CPU share,
its RSS, and the plugins' own CPU. Then the per-record cost of the
validation choices (see ingest.py).

``--e2e``: the whole path - a real ``elkeid-agent run`` process with the
plugins, sending over mutual TLS to the development AgentCenter
(``--store counts``); records/s counted by the devcenter, CPU and RSS of the
agent process read from /proc.

``--e2e --latency``: agent-added latency, from the plugin's SDK flush to
the devcenter's receipt (``measure_latency``, ``agent_latency``).

``measure(...)``, ``measure_agent(...)`` and ``measure_latency(...)`` return
the numbers as dicts.
"""

import argparse
import asyncio
import bisect
import json
import os
import shutil
import sys
import tempfile
import time
import timeit

from elkeid_agent import wire
from elkeid_agent.metrics import Registry
from elkeid_agent.pb import grpc_pb2
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.state import AgentState
from elkeid_agent.osfx.process import read_proc
from elkeid_agent.plugins.ingest import check_record
from elkeid_agent.plugins.supervisor import PluginSupervisor

LOAD_TYPE = 9002


def _install_load_plugins(workdir, plugins, rate, record_size, interpreter, load_extra=None):
    """Put ``plugins`` sample plugins in load mode into ``workdir``; returns
    their configs (dicts with Config's fields, as the command API takes them)."""
    from .sample_plugin import build
    load = {"records_per_sec": rate, "record_size": record_size}
    load.update(load_extra or {})
    detail = json.dumps({"heartbeat_interval": 3600, "http_port": 0, "load": load})
    configs = []
    for i in range(plugins):
        name = "load%d" % i
        sha = build.install(workdir, name, interpreter or sys.executable)
        configs.append({"name": name, "type": "exe", "version": "1", "sha256": sha,
                        "signature": sha, "download_url": [], "detail": detail})
    return configs


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def measure(plugins=1, seconds=5.0, record_size=200, rate=-1, warmup=1.0,
                  interpreter=None, workdir=None):
    """Run ``plugins`` sample plugins at ``rate`` records/s each (-1: as fast
    as they can) and measure for ``seconds`` after ``warmup``."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="elkeid-plugin-bench-")
    metrics = Registry()
    queue = RecordQueue(64 * 1024 * 1024, metrics)
    sup = PluginSupervisor(workdir, queue, metrics, AgentState())
    # The command API's JSON says download_url; the proto field is download_urls.
    configs = [grpc_pb2.Config(download_urls=c.pop("download_url"), **c) for c in
               _install_load_plugins(workdir, plugins, rate, record_size, interpreter)]
    taken = [0, 0]  # records, bytes

    async def consume():
        while True:
            await queue.wait_ready(0.005, 4096, 2 * 1024 * 1024)
            batch = queue.take_batch(4096, 2 * 1024 * 1024)
            taken[0] += len(batch)
            taken[1] += sum(map(len, batch))

    consumer = asyncio.ensure_future(consume())
    try:
        failures = await sup.sync(configs)
        if failures:
            raise RuntimeError("plugins failed to load: %r" % failures)
        await asyncio.sleep(warmup)
        pids = [s["pid"] for s in sup.status()]
        plugin_cpu0 = sum((read_proc(p) or (0, 0, 0.0))[2] for p in pids)
        n0, b0 = taken
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        n1, b1 = taken
        cpu1, t1 = time.process_time(), time.monotonic()
        plugin_cpu1 = sum((read_proc(p) or (0, 0, 0.0))[2] for p in pids)
        rss = _rss()
    finally:
        await sup.shutdown()
        consumer.cancel()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    records = n1 - n0
    elapsed = t1 - t0
    return {
        "plugins": plugins, "record_size": record_size, "seconds": elapsed,
        "records": records, "records_per_sec": records / elapsed,
        "mb_per_sec": (b1 - b0) / elapsed / 1e6,
        "agent_cpu_seconds_per_million": (cpu1 - cpu0) / records * 1e6 if records else None,
        "agent_cpu_share": (cpu1 - cpu0) / elapsed,
        "agent_rss_mb": rss / 1e6,
        "plugin_cpu_share": (plugin_cpu1 - plugin_cpu0) / elapsed,
        "dropped": metrics.total("queue_dropped_records"),
    }


def _proc_cpu(pid):
    sample = read_proc(pid)
    return sample.cpu_seconds if sample else 0.0


def _proc_rss(pid):
    sample = read_proc(pid)
    return sample.rss if sample else 0


def measure_agent(plugins=1, seconds=10.0, record_size=200, rate=-1, warmup=3.0,
                  interpreter=None, base=None, compression=None, probe=None, store="counts",
                  load_extra=None, env=None):
    """plugins -> elkeid-agent (a real process) -> mTLS -> devcenter.

    ``probe(agent_pid, dc, agent_id, seconds)``, if given, runs in place of
    the measuring sleep (it must take ``seconds``) and its dict is merged
    into the result (hot_profile.py samples threads, syscalls and stacks so).
    ``load_extra``: more keys for the plugins' ``load`` section; ``env``:
    extra environment of the agent."""
    from .launchers import AgentProc, DevCenterProc, wait_until

    own = base is None
    base = os.path.abspath(base or tempfile.mkdtemp(prefix="elkeid-plugin-e2e-"))
    dc = DevCenterProc(os.path.join(base, "devcenter-%d" % plugins), store=store)
    agent = None
    try:
        workdir = os.path.join(base, "agent-%d" % plugins)
        shutil.rmtree(workdir, ignore_errors=True)
        agent_id = "plugin-bench-%d" % plugins
        args = ["--server", dc.grpc, "--agent-id", agent_id] + dc.cert_args
        if compression:
            args += ["--compression", compression]
        agent = AgentProc(workdir, args, env=env)
        wait_until(lambda: any(a.get("agent_id") == agent_id for a in dc.agents()), 60, 0.2,
                   "agent to connect")
        configs = _install_load_plugins(workdir, plugins, rate, record_size, interpreter,
                                        load_extra)
        status, body = dc.command(agent_id, {"config": configs})
        if status != 200:
            raise RuntimeError("command refused: %r" % (body,))
        time.sleep(warmup)
        n0, cpu0, t0 = dc.stat()["records_total"], _proc_cpu(agent.pid), time.monotonic()
        probed = probe(agent.pid, dc, agent_id, seconds) if probe is not None else {}
        if probe is None:
            time.sleep(seconds)
        n1, cpu1, t1 = dc.stat()["records_total"], _proc_cpu(agent.pid), time.monotonic()
        rss = _proc_rss(agent.pid)
    finally:
        clean_exit = True
        if agent is not None:
            try:
                agent.stop()
            except AssertionError:  # killed after 20 s: report it, do not hide it
                clean_exit = False
        dc.stop()
        if own:
            shutil.rmtree(base, ignore_errors=True)
    records = n1 - n0
    elapsed = t1 - t0
    return {"plugins": plugins, "record_size": record_size, "seconds": elapsed,
            "records": records, "records_per_sec": records / elapsed,
            "agent_cpu_seconds_per_million": (cpu1 - cpu0) / records * 1e6 if records else None,
            "agent_cpu_share": (cpu1 - cpu0) / elapsed, "agent_rss_mb": rss / 1e6,
            "clean_exit": clean_exit, **probed}


def agent_latency(flush_log, seq_log):
    """Agent-added latency of every record: the server's receipt ("t" of
    the devcenter's ``--store seq`` log) minus the time the plugin flushed
    the SDK buffer holding it (the sample plugin's ``load.flush_log``).
    Returns {"records", "p50", "p90", "p99", "max"} in seconds (records
    whose flush is not in the log are left out)."""
    flushes = []  # (last seq, time), in seq order
    with open(flush_log) as f:
        for line in f:
            t, last = line.split()
            flushes.append((int(last), float(t)))
    flushes.sort()
    lasts = [last for last, _t in flushes]
    weighted = []  # (latency, records)
    with open(seq_log) as f:
        for line in f:
            entry = json.loads(line)
            arrived = entry.get("t")
            if arrived is None:
                continue
            for spans in entry["r"].values():
                for start, end in spans:  # [start, end)
                    while start < end:
                        i = bisect.bisect_left(lasts, start)
                        if i == len(lasts):
                            break
                        upto = min(end, lasts[i] + 1)
                        weighted.append((arrived - flushes[i][1], upto - start))
                        start = upto
    weighted.sort()
    total = sum(n for _lat, n in weighted)
    out = {"records": total}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        rank, seen = q * total, 0
        out[name] = None
        for lat, n in weighted:
            seen += n
            if seen >= rank:
                out[name] = lat
                break
    return out


def measure_latency(rate=5000, seconds=30.0, record_size=200, warmup=3.0, base=None,
                    env=None):
    """One sample plugin at ``rate`` through a real agent to the devcenter
    (``--store seq``); ``measure_agent``'s numbers plus ``latency``
    (``agent_latency``) over the whole run."""
    own = base is None
    base = os.path.abspath(base or tempfile.mkdtemp(prefix="elkeid-latency-"))
    flush_log = os.path.join(base, "flushes.log")
    try:
        result = measure_agent(1, seconds, record_size, rate, warmup, base=base, store="seq",
                               load_extra={"flush_log": flush_log}, env=env)
        result["latency"] = agent_latency(flush_log,
                                          os.path.join(base, "devcenter-1", "dc.db.seq"))
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)
    return result


def validation_costs(record_size=200, number=100000):
    """Microseconds per record for each way of validating a frame body."""
    body = wire.encode_record(LOAD_TYPE, int(time.time()),
                              {"pad": "x" * max(0, record_size - 40), "seq": "0" * 12,
                               "exe": "/usr/bin/bash"})
    out = {}
    for name, fn in (("check_record (used)", lambda: check_record(body)),
                     ("decode_record deep=False", lambda: wire.decode_record(body, False)),
                     ("decode_record deep=True", lambda: wire.decode_record(body, True))):
        out[name] = timeit.timeit(fn, number=number) / number * 1e6
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m elkeid_devtools.plugin_bench")
    p.add_argument("--plugins", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--record-size", type=int, default=200)
    p.add_argument("--rate", type=float, default=-1, help="records/s per plugin; -1 = max")
    p.add_argument("--python", default=None, help="interpreter for the plugins")
    p.add_argument("--e2e", action="store_true",
                   help="through a real agent process to the devcenter over mTLS")
    p.add_argument("--compression", choices=("none", "gzip"), default=None)
    p.add_argument("--dir", default=None, help="scratch dir for --e2e (default: a temp dir)")
    p.add_argument("--latency", action="store_true",
                   help="with --e2e: agent-added latency (plugin flush -> server receipt)")
    args = p.parse_args(argv)
    if args.e2e and args.latency:
        r = measure_latency(args.rate, args.seconds, args.record_size, base=args.dir)
        lat = r["latency"]
        print("1 plugin at %.0f records/s: %.0f records/s arrived, agent %.2f us/record; "
              "agent-added latency over %d records: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, "
              "max %.1f ms" % (args.rate, r["records_per_sec"],
                               r["agent_cpu_seconds_per_million"] or 0, lat["records"],
                               *(1000 * (lat[k] or 0) for k in ("p50", "p90", "p99", "max"))))
        return 0
    if args.e2e:
        print("plugins -> elkeid-agent -> mTLS -> devcenter (--store counts), %d-byte records"
              % args.record_size)
        print("%-8s %12s %16s %10s %10s %s" % ("plugins", "records/s", "cpu s/1M rec",
                                               "agent cpu", "agent rss", "note"))
        for n in args.plugins:
            r = measure_agent(n, args.seconds, args.record_size, args.rate,
                              interpreter=args.python, base=args.dir,
                              compression=args.compression)
            print("%-8d %12.0f %16.2f %9.0f%% %8.1fMB %s" % (
                n, r["records_per_sec"], r["agent_cpu_seconds_per_million"] or 0,
                r["agent_cpu_share"] * 100, r["agent_rss_mb"],
                "" if r["clean_exit"] else "agent needed SIGKILL to stop"))
        return 0
    print("%-8s %12s %8s %16s %10s %10s %11s %8s" % (
        "plugins", "records/s", "MB/s", "cpu s/1M rec", "agent cpu", "agent rss",
        "plugin cpu", "dropped"))
    for n in args.plugins:
        r = asyncio.run(measure(n, args.seconds, args.record_size, args.rate,
                                interpreter=args.python))
        print("%-8d %12.0f %8.1f %16.2f %9.0f%% %8.1fMB %10.0f%% %8d" % (
            n, r["records_per_sec"], r["mb_per_sec"], r["agent_cpu_seconds_per_million"] or 0,
            r["agent_cpu_share"] * 100, r["agent_rss_mb"], r["plugin_cpu_share"] * 100,
            r["dropped"]))
    print()
    print("validation cost per %d-byte record:" % args.record_size)
    for name, us in validation_costs(args.record_size).items():
        print("  %-26s %6.2f us" % (name, us))
    return 0


if __name__ == "__main__":
    sys.exit(main())
