"""Where the agent's CPU goes on the record path (a profile, not a test).

    python -m elkeid_devtools.hot_profile [--rate 5000] [--seconds 20]
        [--strace 10] [--py-spy 20] [--out DIR]

Runs what ``plugin_bench --e2e`` runs (a real ``elkeid-agent run``, one
sample plugin writing like the Go SDK, the devcenter with ``--store
counts``) and, in windows one after the other so none disturbs the
others' numbers:

1. clean: CPU of every thread of the agent from /proc/<pid>/task/*/stat,
   grouped by thread name (the Python main thread is the event loop; grpc's
   C-core threads are named ``event_engine``, ``grpc_global_tim`` ...),
   records/s and gRPC messages/s from the devcenter, and the CPU of the
   plugin and of the devcenter (which of the three saturates first);
2. ``strace -c -f`` for ``--strace`` seconds: syscall counts per second
   (epoll_wait = loop wake-ups, read = pipe reads, sendmsg/write = socket
   writes, futex = thread hand-offs);
3. optionally ``perf record`` for ``--perf`` seconds (native symbols:
   TLS, grpc's C core, the interpreter);
4. ``py-spy record --native`` for ``--py-spy`` seconds (raw collapsed
   stacks in ``--out``) and the share of the main thread's samples per
   function of the record path (``STAGES``).

``profile(...)`` returns the numbers as a dict; ``stage_shares(path)``
reads a py-spy raw file.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from elkeid_agent.osfx.process import read_proc
from .plugin_bench import measure_agent

_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Stages of the record path, matched against py-spy frames ("function
# (file:line)"): a stack counts for the first stage, in this order, that
# any of its frames matches.
STAGES = (
    ("frame checks", r"check_record|FrameDecoder\.feed"),
    ("queue", r"RecordQueue\.|_resolve \("),
    ("splice", r"packaged_data"),
    ("delivery", r"Delivery\."),
    ("grpc.aio writes", r"_StreamRequestMixin|grpc/aio"),
    ("timers and heartbeats", r"ticker\.py|heartbeat|Spool\.run|_supervise|_report_collector_rounds|"
                              r"_poll_latest|sdnotify|ProcessSampler|_sample_loop"),
    ("pipe reads", r"_read_ready|data_received"),
    ("sender loop", r"_send_loop"),
    ("event loop", r"_run_once|run_forever"),
)


def _cpu(pid):
    return (read_proc(pid) or (0, 0, 0.0))[2]


def children(pid):
    """Child pids of ``pid`` (the plugins of an agent)."""
    out = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def thread_cpu(pid):
    """{tid: (name, cpu seconds)} of every thread of ``pid``."""
    out = {}
    base = "/proc/%d/task" % pid
    for tid in os.listdir(base):
        try:
            with open("%s/%s/stat" % (base, tid)) as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def thread_shares(before, after, elapsed, pid):
    """CPU share per thread name between two ``thread_cpu`` samples; the
    main thread (tid == pid) is reported as ``main (event loop)``."""
    shares = collections.Counter()
    for tid, (name, cpu) in after.items():
        start = before.get(tid, (name, 0.0))[1]
        label = "main (event loop)" if tid == pid else name
        shares[label] += (cpu - start) / elapsed
    return dict(shares)


_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def strace_counts(pid, seconds):
    """Syscalls per second of all threads of ``pid`` (``strace -c -f``)."""
    if shutil.which("strace") is None:
        return {"error": "strace not installed"}
    proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(seconds)
    proc.send_signal(2)
    _out, err = proc.communicate(timeout=30)
    counts = {}
    for line in err.decode("utf-8", "replace").splitlines():
        m = _STRACE_LINE.match(line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1)) / seconds
    return counts


def py_spy(pid, seconds, out_path, rate=500):
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return "py-spy not installed"
    subprocess.run([exe, "record", "--native", "-r", str(rate), "-d", str(int(seconds)),
                    "-p", str(pid), "-f", "raw", "-o", out_path, "--threads"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60)
    return out_path


def perf_top(pid, seconds, out_path, limit=40, sort="comm,dso"):
    """``perf record`` of all threads of ``pid`` for ``seconds``; returns the
    top rows of ``perf report`` sorted by ``sort``: [share, thread, dso,
    ...] (native time: TLS, grpc's C core, the interpreter, the kernel)."""
    if shutil.which("perf") is None:
        return "perf not installed"
    subprocess.run(["perf", "record", "-F", "4999", "-p", str(pid), "-o", out_path, "--",
                    "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=seconds + 60)
    report = subprocess.run(["perf", "report", "-i", out_path, "--stdio", "--no-children",
                             "--sort", sort], capture_output=True, timeout=120)
    rows = []
    for line in report.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and not line.startswith("#"):
            rows.append([float(parts[0][:-1]) / 100] + parts[1:])
        if len(rows) >= limit:
            break
    return rows


def stage_shares(path):
    """{stage: share of the main thread's busy py-spy samples} (``STAGES``;
    "other" for none); also "busy samples" and "idle samples" (the
    innermost frame is epoll_wait: the loop sleeping)."""
    compiled = [(name, re.compile(rx)) for name, rx in STAGES]
    totals = collections.Counter()
    idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if "MainThread" not in frames[0]:
                continue
            n = int(count)
            if "epoll_wait" in frames[-1]:
                idle += n
                continue
            label = "other"
            for name, rx in compiled:
                if any(rx.search(frame) for frame in frames[1:]):
                    label = name
                    break
            totals[label] += n
    busy = sum(totals.values())
    out = {k: v / busy for k, v in totals.items()} if busy else {}
    out.update({"busy samples": busy, "idle samples": idle})
    return out


def us_per_record(result):
    """{row: microseconds of agent CPU per record}: the main thread's CPU
    split by its py-spy stage shares, plus the other threads (grpc's C
    core, executors) from /proc."""
    rps = result["records_per_sec"]
    main = result["threads"].get("main (event loop)", 0.0)
    rows = {"all threads (from /proc)": result["cpu_share"] / rps * 1e6,
            "other threads (grpc C core, executors)": (result["cpu_share"] - main) / rps * 1e6}
    for name, share in result.get("main_thread_stages", {}).items():
        if not name.endswith("samples"):
            rows[name] = share * main / rps * 1e6
    return rows


def profile(rate=5000, seconds=20.0, strace_seconds=10.0, spy_seconds=20.0, out_dir=None,
            record_size=200, env=None, perf_seconds=0.0):
    out_dir = out_dir or tempfile.mkdtemp(prefix="elkeid-hot-profile-")
    os.makedirs(out_dir, exist_ok=True)
    result = {}

    def probe(pid, dc, agent_id, _seconds):
        plugins = children(pid)

        def sample():
            stat = dc.stat()
            per = stat.get("agents", {}).get(agent_id, {})
            return (time.monotonic(), thread_cpu(pid), _cpu(pid), stat["records_total"],
                    per.get("messages", 0), sum(map(_cpu, plugins)), _cpu(dc.proc.pid))
        t0, th0, cpu0, n0, m0, pl0, dc0 = sample()
        time.sleep(seconds)
        t1, th1, cpu1, n1, m1, pl1, dc1 = sample()
        dt = t1 - t0
        records = n1 - n0
        result.update(records_per_sec=records / dt, messages_per_sec=(m1 - m0) / dt,
                      cpu_share=(cpu1 - cpu0) / dt, plugin_cpu_share=(pl1 - pl0) / dt,
                      server_cpu_share=(dc1 - dc0) / dt,
                      us_per_record=(cpu1 - cpu0) / records * 1e6 if records else None,
                      threads=thread_shares(th0, th1, dt, pid))
        if strace_seconds:
            result["syscalls_per_sec"] = strace_counts(pid, strace_seconds)
        if perf_seconds:
            result["perf_top"] = perf_top(pid, perf_seconds, os.path.join(out_dir, "perf.data"))
        if spy_seconds:
            path = os.path.join(out_dir, "pyspy-%s.raw" % ("max" if rate < 0 else int(rate)))
            got = py_spy(pid, spy_seconds, path)
            if os.path.exists(got):
                result["pyspy_raw"] = got
                result["main_thread_stages"] = stage_shares(got)
                result["us_per_record_by_stage"] = us_per_record(result)
            else:
                result["pyspy_raw"] = got
        return {}

    measure_agent(1, seconds, record_size, rate, env=env, probe=probe)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m elkeid_devtools.hot_profile")
    p.add_argument("--rate", type=float, default=5000, help="records/s; -1 = as fast as it can")
    p.add_argument("--seconds", type=float, default=20.0, help="the clean window")
    p.add_argument("--strace", type=float, default=10.0, help="0 = skip")
    p.add_argument("--py-spy", type=float, default=20.0, dest="spy", help="0 = skip")
    p.add_argument("--perf", type=float, default=0.0, help="seconds of perf record; 0 = skip")
    p.add_argument("--record-size", type=int, default=200)
    p.add_argument("--out", default=None, help="where py-spy's raw stacks go")
    args = p.parse_args(argv)
    r = profile(args.rate, args.seconds, args.strace, args.spy, args.out, args.record_size,
                perf_seconds=args.perf)
    json.dump(r, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
