"""An in-process services supervisor on a real event loop, with real
processes, real sockets and a real services file, for the tests."""

import json
import os
import signal
import sys

from elkeid_agent.metrics import Registry
from elkeid_agent.runtime.executors import Executors
from elkeid_agent.runtime.tasks import TaskOwner
from elkeid_agent.services.supervisor import ServiceSupervisor
from elkeid_agent.state import AgentState
from elkeid_devtools.launchers import wait_for

SVC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "svc.py")
PY = sys.executable


def service(sid, *args, **fields):
    """One agents: entry running svc.py with ``args``; ``fields`` override."""
    entry = {"id": sid, "type": "custom", "binary_path": PY, "args": [SVC] + list(args),
             "health_check": {"interval": "0.2s", "heartbeat_timeout": "0s",
                              "cpu_threshold": 0, "memory_threshold": 0},
             "restart": {"backoff_base": "0.2s", "backoff_max": "0.5s", "max_retries": 0}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = dict(entry[key], **value)
        else:
            entry[key] = value
    return entry


def write_services(path, entries):
    with open(path + ".tmp", "w") as f:
        json.dump({"agents": entries}, f)
    os.replace(path + ".tmp", path)


class Rig:
    def __init__(self, tmp_path, **knobs):
        self.dir = str(tmp_path)
        self.file = os.path.join(self.dir, "services.json")
        self.metrics = Registry()
        self.state = AgentState()
        self.knobs = dict(dict(launcher="direct", stop_timeout=2.0, kill_timeout=5.0), **knobs)
        self.sup = None
        self.changes = []

    async def boot(self, entries=None):
        if entries is not None:
            write_services(self.file, entries)
        self.owner = TaskOwner(self.metrics, self.state, restart_delays=(0.1,))
        self.executors = Executors(self.metrics)
        self.sup = ServiceSupervisor(self.dir, self.metrics, self.state, self.owner,
                                     self.executors, services_file=self.file, explicit=True,
                                     **self.knobs)
        self.sup.on_change(self.changes.append)
        return await self.sup.boot()

    async def close(self, kill=True):
        pids = [s["pid"] for s in self.sup.status() if s["pid"]]
        await self.sup.shutdown()
        await self.owner.close()
        self.executors.close()
        if kill:
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        return pids

    def get(self, sid):
        for s in self.sup.status():
            if s["id"] == sid:
                return s
        return None

    async def wait(self, sid, predicate, timeout=30.0, what=""):
        return await wait_for(lambda: (lambda s: s if s and predicate(s) else None)(
            self.get(sid)), timeout, what or "service %s condition" % sid)

    async def running(self, sid, timeout=30.0):
        return await self.wait(sid, lambda s: s["state"] == "running" and s["pid"], timeout,
                               "service %s running" % sid)
