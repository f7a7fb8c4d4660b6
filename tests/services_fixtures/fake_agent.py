"""A real agent process with a stand-in for the services supervisor.

``python tests/services_fixtures/fake_agent.py [elkeid-agent run flags]``
runs ``elkeid_agent.app.Agent`` exactly as ``elkeid-agent run`` does, with
``agent.services`` set to ``FakeSupervisor`` (the public API of
``elkeid_agent.services.supervisor.ServiceSupervisor``) and
``agent.collectors`` to the real host-metrics ``Collectors`` (cpu and
memory every 0.5 s). The services are real child processes (a sleeping
Python), so a restart really changes the pid. ``FAKE_SERVICES`` (env) names
them: ``id:type,id:type``. For the status endpoint, the server records, the
control socket and ``elkeidctl services`` until the supervisor lands.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")  # as elkeid-agent run does

from elkeid_agent import cli, settings  # noqa: E402
from elkeid_agent.app import Agent  # noqa: E402
from elkeid_agent.host.metrics import Collectors  # noqa: E402
from elkeid_agent.services.config import Collector  # noqa: E402

# The services die with the fake agent however it ends (PR_SET_PDEATHSIG =
# prctl option 1, SIGKILL = 9), so a test that SIGKILLs it leaves nothing.
SLEEPER = [sys.executable, "-c", "import ctypes, os, sys, time\n"
           "ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\n"
           "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
           "while True: time.sleep(60)", str(os.getpid())]


class FakeSupervisor:
    def __init__(self, specs):
        self._observers = []
        self._svc = {}
        for sid, kind in specs:
            self._svc[sid] = {"id": sid, "type": kind, "state": "stopped", "pid": 0,
                              "restarts": 0, "health": "", "checks": {}, "last_error": "",
                              "last_exit": "", "uptime": 0.0, "cpu": 0.0, "rss": 0,
                              "_proc": None, "_since": 0.0, "heartbeats": 0}

    def boot(self):
        for sid in self._svc:
            self._spawn(sid, first=True)

    def _notify(self, s):
        for cb in self._observers:
            cb(self._public(s))

    @staticmethod
    def _public(s):
        out = {k: v for k, v in s.items() if not k.startswith("_")}
        out["uptime"] = round(time.monotonic() - s["_since"], 3) if s["state"] == "running" else 0.0
        return out

    def _spawn(self, sid, first=False):
        s = self._svc[sid]
        s["_proc"] = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL, start_new_session=True)
        s.update(state="running", pid=s["_proc"].pid, health="healthy",
                 checks={"alive": "ok", "heartbeat": "ok"}, _since=time.monotonic())
        if not first:
            s["restarts"] += 1
        self._notify(s)

    def _kill(self, sid):
        s = self._svc[sid]
        proc, s["_proc"] = s["_proc"], None
        if proc is not None:
            s["state"] = "stopping"
            self._notify(s)
            proc.terminate()
            proc.wait()
            s.update(last_exit="killed by signal 15 (SIGTERM)")
        s.update(state="stopped", pid=0, health="", checks={})
        self._notify(s)

    def status(self):
        return [self._public(self._svc[k]) for k in sorted(self._svc)]

    def heartbeat(self, service_id, hb, now=None):
        s = self._svc.get(service_id)
        if s is None:
            return False, "unknown service %s" % service_id
        if s["state"] != "running":
            return False, "service %s is not running" % service_id
        if hb.pid != s["pid"]:
            return False, "pid %d is not service %s's process" % (hb.pid, service_id)
        s["heartbeats"] += 1
        return True, ""

    async def restart(self, sid):
        self._kill(sid)
        self._spawn(sid)
        return True, "restarted %s" % sid

    async def stop(self, sid):
        self._kill(sid)
        return True, "stopped %s" % sid

    async def start(self, sid):
        if self._svc[sid]["state"] == "running":
            return True, "%s is already running" % sid
        self._spawn(sid)
        return True, "started %s" % sid

    async def reload(self):
        return True, []

    def on_change(self, callback):
        self._observers.append(callback)

    async def shutdown(self):
        pass

    def kill_all(self):
        for s in self._svc.values():
            if s["_proc"] is not None:
                s["_proc"].kill()
                s["_proc"].wait()


class FakeServicesAgent(Agent):
    """The real agent, but its services come from the stand-in set before
    ``start()`` instead of a services file."""

    async def _start_services(self):
        pass


async def _main(s, specs):
    agent = FakeServicesAgent(s)
    fake = FakeSupervisor(specs)
    agent.services = fake
    cfg = {"cpu": Collector(interval=0.5), "memory": Collector(interval=0.5)}
    agent.collectors = Collectors(cfg, agent.owner, agent.metrics, agent.executors)
    try:
        await agent.start()
        fake.boot()
        agent.collectors.start()
        await agent.wait()
        await agent.collectors.stop()
        await agent.shutdown()
    finally:
        fake.kill_all()
    return 0


def main(argv):
    args = cli._run_parser().parse_args(["run"] + argv)
    s = settings.load({k: v for k, v in vars(args).items() if k != "command"})
    specs = [tuple(item.split(":", 1)) for item in
             os.environ.get("FAKE_SERVICES", "alpha:custom,beta:telegraf").split(",") if item]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return asyncio.run(_main(s, specs))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
