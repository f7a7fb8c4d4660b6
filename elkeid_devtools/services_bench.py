"""``python -m elkeid_devtools.services_bench``: what supervising local
services costs, as numbers (never assertions).

1. Idle cost per 10 services: a real ``elkeid-agent run`` with no services,
   then one with 10 sleeping services heartbeating every 10 s on their
   sockets; agent CPU seconds over ``--seconds`` (default 60) and RSS at the
   end, for both.
2. Restart latency: time from SIGKILL of a service to the agent's state file
   naming its new pid (the first restart has delay 0), ``--kills`` times.
"""

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

from .launchers import AgentProc, wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# A service that sleeps and heartbeats every 10 s on its socket.
HEARTBEATER = r"""
import json, os, socket, sys, time, datetime
path, sid = sys.argv[1], sys.argv[2]
while True:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path)
        while True:
            ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            s.sendall((json.dumps({"agent_id": sid, "pid": os.getpid(), "status": "running",
                                   "timestamp": ts}) + "\n").encode())
            time.sleep(10)
    except OSError:
        time.sleep(0.5)
"""


def cpu_rss(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE


def recorded(workdir):
    try:
        with open(os.path.join(workdir, "services", "state.json")) as f:
            return {k: v["pid"] for k, v in json.load(f)["services"].items()}
    except (OSError, ValueError, KeyError):
        return {}


def write_file(base, n):
    prog = os.path.join(base, "heartbeater.py")
    with open(prog, "w") as f:
        f.write(HEARTBEATER)
    agents = []
    for i in range(n):
        sid = "svc%d" % i
        sock = os.path.join(base, sid + ".sock")
        agents.append({"id": sid, "type": "custom", "binary_path": sys.executable,
                       "args": [prog, sock, sid], "socket_path": sock,
                       "health_check": {"interval": "10s", "heartbeat_timeout": "30s"}})
    path = os.path.join(base, "services.json")
    with open(path, "w") as f:
        json.dump({"agents": agents}, f)
    return path


def measure(base, n, seconds):
    wd = os.path.join(base, "agent-%d" % n)
    path = write_file(base, n)
    agent = AgentProc(wd, ["--services", path], die_with_parent=True)
    try:
        if n:
            wait_until(lambda: len(recorded(wd)) == n, 120, what="%d services running" % n)
        else:
            agent.wait_log("starting", 60)
        time.sleep(5)  # let start-up settle before the window
        cpu0, _ = cpu_rss(agent.pid)
        time.sleep(seconds)
        cpu1, rss = cpu_rss(agent.pid)
        pids = recorded(wd)
        return cpu1 - cpu0, rss, agent, wd, pids
    except BaseException:
        agent.stop()
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--kills", type=int, default=5)
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="elkeid-services-bench-")
    cpu0, rss0, a0, _, _ = measure(base, 0, args.seconds)
    a0.stop()
    cpu10, rss10, agent, wd, pids = measure(base, 10, args.seconds)
    try:
        print("idle over %.0f s: no services: agent CPU %.3f s, RSS %.1f MB" % (
            args.seconds, cpu0, rss0 / 1e6))
        print("idle over %.0f s: 10 services: agent CPU %.3f s, RSS %.1f MB" % (
            args.seconds, cpu10, rss10 / 1e6))
        print("per 10 services: +%.3f CPU s per minute (%.2f%% of one CPU), +%.1f MB RSS" % (
            (cpu10 - cpu0) * 60 / args.seconds, (cpu10 - cpu0) / args.seconds * 100,
            (rss10 - rss0) / 1e6))
        latencies = []
        for i in range(args.kills):
            sid = "svc%d" % (i % 10)
            old = recorded(wd)[sid]
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: recorded(wd).get(sid) not in (None, old), 60, 0.002,
                       "restart of " + sid)
            latencies.append(time.monotonic() - t0)
            # The next kill of the same service would wait its backoff.
        print("SIGKILL -> restarted (new pid recorded), %d kills: median %.0f ms, max %.0f ms"
              % (len(latencies), statistics.median(latencies) * 1000,
                 max(latencies) * 1000))
    finally:
        pids = recorded(wd)
        agent.stop()
        for pid in pids.values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    main()
