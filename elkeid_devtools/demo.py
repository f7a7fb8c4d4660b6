"""``./build.sh demo``: the whole Elkeid loop on one machine.

Starts the development AgentCenter (throwaway CA, mutual TLS, SQLite store)
and a real agent on 127.0.0.1, then deploys the sample plugin the way a real
server does: the plugin archive is served over loopback HTTP and its config
is sent through the AgentCenter's HTTP command API (``POST /command/``).
The agent downloads it, verifies its sha256, starts it, and the demo prints
every record the server stores: agent heartbeats (1000), plugin heartbeats
(1001), the sample plugin's own heartbeats (9001) and its answer (9003) to a
task sent through the same API. Everything lives under ``.demo/``
(certificates, database, the agent's workdir and log, the command sent), so
it can be inspected and replayed afterwards; each run shows only the
records stored after it started. Its children die with it.
"""

import argparse
import json
import os
import signal
import sys
import time
import urllib.request

from .launchers import AgentProc, DevCenterProc, FileServer
from .sample_plugin import HEARTBEAT as SAMPLE_HEARTBEAT
from .sample_plugin import TASK_ECHO, TASK_RESULT, build

AGENT_HEARTBEAT, PLUGIN_HEARTBEAT = 1000, 1001
SHOWN = (AGENT_HEARTBEAT, PLUGIN_HEARTBEAT, SAMPLE_HEARTBEAT, TASK_RESULT)
SAMPLE_VERSION = "1.0.0"


def _describe(rec):
    """One table row for a stored record: (source, details)."""
    f, dt = rec["fields"], rec["data_type"]
    if dt == AGENT_HEARTBEAT:
        return "agent", "state=%s net_mode=%s cpu=%.4f rss=%.1fMB tx_rec/s=%.1f" % (
            f.get("state"), f.get("net_mode"), float(f.get("cpu") or 0),
            int(f.get("rss") or 0) / 1e6, float(f.get("tx_tps") or 0))
    if dt == PLUGIN_HEARTBEAT:
        return "agent", "plugin %s %s state=%s pid=%s rss=%.1fMB tx_rec/s=%.1f" % (
            f.get("name"), f.get("pversion"), f.get("state"), f.get("pid", "-"),
            int(f.get("rss") or 0) / 1e6, float(f.get("tx_tps") or 0))
    if dt == SAMPLE_HEARTBEAT:
        return "sample", "heartbeat #%s status=%s pid=%s http=127.0.0.1:%s" % (
            f.get("heartbeat_count"), f.get("status"), f.get("pid"), f.get("http_port"))
    return "sample", "task %s token=%s: %s (%s)" % (
        f.get("task_data_type"), f.get("token"), f.get("status"), f.get("data"))


def _health(port):
    """The sample plugin's GET /health, or the error; shown once."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%s/health" % port, timeout=5) as resp:
            return resp.read().decode("utf-8", "replace").strip()
    except (OSError, ValueError) as e:
        return "unreachable: %s" % e


class Output:
    """stdout for a reader that may leave early (``./build.sh demo | head -3``).

    Each line is flushed as it is written; once the pipe is closed ``closed``
    is set, later lines go nowhere (fd 1 becomes /dev/null, so the
    interpreter's last flush cannot fail either) and the demo stops and
    cleans up as it does on Ctrl-C."""

    def __init__(self, stream):
        self.stream = stream
        self.closed = False

    def __call__(self, text=""):
        if self.closed:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except BrokenPipeError:
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)


# A shell reports a writer killed by SIGPIPE as 128 + 13.
EXIT_READER_GONE = 141


def deploy_sample(dc, agent_id, files, base, heartbeat_interval, say=print):
    """Serve the sample plugin and send its config through POST /command/.
    Returns the request body (also written to ``<base>/sample-command.json``)."""
    archive, signature = build.tar_gz_bytes(
        "sample", sys.executable,
        {"agent_id": "demo-sample", "http_port": 0, "heartbeat_interval": heartbeat_interval})
    url = files.add("/sample-%s.tar.gz" % SAMPLE_VERSION, archive)
    cfg = build.plugin_config("sample", SAMPLE_VERSION, archive, signature, [url])
    body = {"agent_id": agent_id, "command": {"config": [cfg]}}
    path = os.path.join(base, "sample-command.json")
    with open(path, "w") as f:
        json.dump(body, f, indent=2)
    status, answer = dc.command(agent_id, body["command"])
    if status != 200:
        raise RuntimeError("POST /command/ answered %s: %s" % (status, answer))
    say("deployed the sample plugin: POST http://%s/command/ with %s\n"
        "  (replay: curl -d @%s http://%s/command/)" % (dc.http_addr, path, path, dc.http_addr))
    return body


def main(argv=None):
    p = argparse.ArgumentParser(prog="elkeid-agent demo", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=".demo", help="where to keep everything (default .demo)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long to run (default 60; 0 = until Ctrl-C)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0,
                   help="agent and sample plugin heartbeat interval in seconds "
                        "(Elkeid uses 60; 5 shows more)")
    p.add_argument("--no-plugin", action="store_true", help="do not deploy the sample plugin")
    args = p.parse_args(argv)
    if not args.heartbeat_interval > 0:
        p.error("--heartbeat-interval must be > 0")
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    say = Output(sys.stdout)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    say("starting the development AgentCenter (certificates in %s/devcenter/certs)" % base)
    # Both children get SIGTERM from the kernel if the demo dies any other way.
    dc = DevCenterProc(os.path.join(base, "devcenter"), die_with_parent=True)
    agent = files = None
    try:
        # .demo/ is kept between runs: show only what this run stores.
        newest = dc.records(limit=1, newest=True)
        last_id = newest[-1]["id"] if newest else 0
        say("AgentCenter: gRPC %s (mutual TLS, server name elkeid.com), HTTP API http://%s"
            % (dc.grpc, dc.http_addr))
        agent = AgentProc(os.path.join(base, "agent"),
                          ["--server", dc.grpc, "--heartbeat-interval",
                           "%g" % args.heartbeat_interval] + dc.cert_args, die_with_parent=True)
        say("agent pid %d, workdir %s/agent, log %s/agent/log/elkeid-agent.log"
            % (agent.pid, base, base))
        agent_id = agent.agent_id()
        dc.wait_agent(agent_id, timeout=60)
        say("agent %s connected" % agent_id)
        if not args.no_plugin and not say.closed:
            files = FileServer()
            deploy_sample(dc, agent_id, files, base, args.heartbeat_interval, say)
        say("records as AgentCenter stores them; Ctrl-C to stop\n")
        say("%-8s %-5s %-7s %s" % ("time", "type", "from", "details"))
        counts, echoed = {}, False
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        while not stop and not say.closed and agent.alive and (
                deadline is None or time.monotonic() < deadline):
            for r in dc.records(after=last_id, limit=1000):
                last_id = r["id"]
                if r["data_type"] not in SHOWN:
                    continue
                counts[r["data_type"]] = counts.get(r["data_type"], 0) + 1
                source, details = _describe(r)
                say("%-8s %-5d %-7s %s" % (time.strftime("%H:%M:%S", time.localtime(
                    r["timestamp"])), r["data_type"], source, details))
                if r["data_type"] == SAMPLE_HEARTBEAT and not echoed:
                    # The plugin is up: show its HTTP endpoint, then task it.
                    echoed = True
                    say("%8s the sample plugin's GET /health: %s" % (
                        "", _health(r["fields"].get("http_port"))))
                    dc.command(agent_id, {"task": {"name": "sample", "data_type": TASK_ECHO,
                                                   "data": "hello from the demo",
                                                   "token": "demo-echo"}})
            time.sleep(0.5)
        if say.closed:
            return EXIT_READER_GONE
        if not agent.alive:
            say("\nthe agent exited unexpectedly; its output:\n" + agent.log_text()[-3000:])
            return 1
        say("\nstored in %s by this run: %s" % (dc.db, ", ".join(
            "%d x %d" % (counts[t], t) for t in sorted(counts)) or "nothing"))
        wanted = (AGENT_HEARTBEAT,) if args.no_plugin else SHOWN
        missing = [t for t in wanted if not counts.get(t)]
        if missing:
            say("never arrived: %s (see %s/agent/log/)" % (", ".join(map(str, missing)), base))
            return 1
        return 0
    finally:
        if agent is not None:
            code = agent.stop()
            say("agent stopped (exit %s)" % code)
        if files is not None:
            files.close()
        dc.stop()


if __name__ == "__main__":
    sys.exit(main())
