"""``./build.sh demo``: the whole Elkeid loop on one machine.

Starts the development AgentCenter (throwaway CA, mutual TLS, SQLite store)
and a real agent on 127.0.0.1, then prints each heartbeat as the server
stores it. Everything lives under ``.demo/`` (certificates, database, the
agent's workdir and log), so it can be inspected afterwards.
"""

import argparse
import os
import signal
import sys
import time

from .devtools import AgentProc, DevCenterProc


def main(argv=None):
    p = argparse.ArgumentParser(prog="elkeid-agent demo", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=".demo", help="where to keep everything (default .demo)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long to run (default 60; 0 = until Ctrl-C)")
    p.add_argument("--heartbeat-interval", default="5",
                   help="agent heartbeat interval in seconds (Elkeid uses 60; 5 shows more)")
    args = p.parse_args(argv)
    base = os.path.abspath(args.dir)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    print("starting the development AgentCenter (certificates in %s/devcenter/certs)" % base)
    dc = DevCenterProc(os.path.join(base, "devcenter"))
    agent = None
    try:
        print("AgentCenter: gRPC %s (mutual TLS, server name elkeid.com), HTTP API http://%s"
              % (dc.grpc, dc.http_addr))
        agent = AgentProc(os.path.join(base, "agent"),
                          ["--server", dc.grpc, "--heartbeat-interval", args.heartbeat_interval]
                          + dc.cert_args)
        print("agent pid %d, workdir %s/agent, log %s/agent/log/elkeid-agent.log"
              % (agent.pid, base, base))
        print("waiting for heartbeats (DataType 1000); Ctrl-C to stop\n")
        print("%-8s %-36s %-8s %-8s %-10s %-8s %-10s" % (
            "time", "agent_id", "state", "net_mode", "cpu", "rss_MB", "tx_rec/s"))
        seen = 0
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        while not stop and agent.alive and (deadline is None or time.monotonic() < deadline):
            recs = dc.records(1000)
            for r in recs[seen:]:
                f = r["fields"]
                print("%-8s %-36s %-8s %-8s %-10s %-8.1f %-10.1f" % (
                    time.strftime("%H:%M:%S", time.localtime(r["timestamp"])), r["agent_id"],
                    f.get("state"), f.get("net_mode"), f.get("cpu", "")[:10],
                    int(f.get("rss", 0)) / 1e6, float(f.get("tx_tps", 0))))
                sys.stdout.flush()
            seen = len(recs)
            time.sleep(0.5)
        if not agent.alive:
            print("\nthe agent exited unexpectedly; its output:\n" + agent.log_text()[-3000:])
            return 1
        print("\n%d heartbeat(s) stored in %s" % (seen, dc.db))
        return 0 if seen else 1
    finally:
        if agent is not None:
            code = agent.stop()
            print("agent stopped (exit %s)" % code)
        dc.stop()


if __name__ == "__main__":
    sys.exit(main())
