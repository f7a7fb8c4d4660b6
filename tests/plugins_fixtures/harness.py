"""Shared helpers for tests/test_plugins_*.py: plugin executables made from
the fixture scripts, a supervisor on a real RecordQueue, polling, process
checks and a loopback HTTP server for downloads."""

import asyncio
import hashlib
import os
import sys
import time

from elkeid_agent import wire
from elkeid_devtools.launchers import FileServer  # noqa: F401 (re-exported for the tests)
from elkeid_devtools.launchers import wait_for
from elkeid_agent.metrics import Registry
from elkeid_agent.pb import grpc_pb2
from elkeid_agent.plugins import PluginSupervisor
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.state import AgentState

FIXTURES = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(FIXTURES))

# Short timings so misbehaviour shows within a test's patience.
FAST = dict(backoff=(0.0, 0.2, 0.4), healthy_reset=30.0, max_failures=3, stop_timeout=2.0,
            sample_interval=0.2, limit_window=1.0, drain_timeout=1.0)


def script_bytes(fixture):
    """A fixture script as a plugin executable for this interpreter. The
    plugin gets a minimal environment, so the repo goes on sys.path here."""
    with open(os.path.join(FIXTURES, fixture), "rb") as f:
        body = f.read()
    head = ("#!%s\nimport sys; sys.path.insert(0, %r)\n" % (sys.executable, REPO)).encode()
    return head + body


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def install(workdir, name, fixture):
    """Write ``fixture`` as <workdir>/plugin/<name>/<name>; returns sha256."""
    data = script_bytes(fixture)
    directory = os.path.join(workdir, "plugin", name)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o700)
    return sha256(data)


def config(name, version="1", sha="", signature="", urls=(), type_="", detail=""):
    return grpc_pb2.Config(name=name, version=version, sha256=sha, signature=signature,
                           download_urls=list(urls), type=type_, detail=detail)


class Rig:
    """A supervisor with a real queue, metrics and state; ``records`` drains
    the queue into ``self.seen`` (the test plays the gRPC sender)."""

    def __init__(self, workdir, queue_bytes=64 * 1024 * 1024, **policy):
        settings = dict(FAST)
        settings.update(policy)
        self.workdir = str(workdir)
        self.metrics = Registry()
        self.queue = RecordQueue(queue_bytes, self.metrics)
        self.state = AgentState()
        self.sup = PluginSupervisor(self.workdir, self.queue, self.metrics, self.state,
                                    **settings)
        self.seen = []  # bodies in the order they left the queue
        self.ignore = set()  # data types not kept (floods)

    def drain(self):
        batch = self.queue.take_batch(1 << 30, 1 << 40)
        if self.ignore:
            batch = [b for b in batch if wire.decode_record(b, deep=False)[0] not in self.ignore]
        self.seen.extend(batch)
        return batch

    async def keep_draining(self, interval=0.01):
        """Play a sender that never stalls (run as a task; cancel to stop)."""
        while True:
            self.drain()
            await asyncio.sleep(interval)

    def decoded(self, data_type=None):
        self.drain()
        out = []
        for body in self.seen:
            dt = wire.decode_record(body, deep=False)[0]
            if data_type is None or dt == data_type:
                out.append(wire.decode_record(body)[2])
        return out

    async def wait_record(self, predicate, timeout=15.0, data_type=None):
        """First decoded record (fields) matching predicate, polling."""
        deadline = time.monotonic() + timeout
        while True:
            for fields in self.decoded(data_type):
                if predicate(fields):
                    return fields
            if time.monotonic() > deadline:
                raise AssertionError("no matching record within %.0f s; state %r, plugins %r"
                                     % (timeout, self.state.reasons(), self.sup.status()))
            await asyncio.sleep(0.05)

    async def deploy(self, name, fixture, version="1", **config_fields):
        """Install ``fixture`` as plugin ``name`` and sync a config list of
        just it; returns what sync() returned (the refusals)."""
        sha = install(self.workdir, name, fixture)
        return await self.sup.sync([config(name, version, sha=sha, **config_fields)])

    def plugin_dir(self, name):
        return os.path.join(self.workdir, "plugin", name)

    def status(self, name):
        for item in self.sup.status():
            if item["name"] == name:
                return item
        return None


async def wait_until(predicate, timeout=15.0, what="condition"):
    """The plugin tests' name for the launchers' async wait."""
    await wait_for(predicate, timeout, what)


def alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


def group_alive(pgid):
    """Live (non-zombie) members of a process group."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != b"Z":
            out.append(int(entry))
    return out


# Download URLs that answer what no HTTP client should accept (FileServer.add).

def bad_status_line(handler):
    handler.wfile.write(b"garbage that is no status line\r\n\r\n")
    handler.close_connection = True


def truncated_chunks(handler):
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"zz-not-a-chunk-size\r\n")
    handler.close_connection = True
