"""Launchers for the development loop: the development AgentCenter and the
agent as real processes, started as a user starts them (``python -m``), talking
mutual TLS over 127.0.0.1. The demo, the benchmarks and the integration tests
all use these, so they exercise the same start-up path.

Waiting is by polling with a deadline; nothing here asserts on speed.
"""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

PY = sys.executable
# Exec shim for children that must die with their parent (the demo): sets
# PR_SET_PDEATHSIG, gives up if the parent is already gone, then execs the
# real command in place (same pid). prctl(2) option 1 = PR_SET_PDEATHSIG.
# No preexec_fn: that forces fork(), unsafe in a process running gRPC.
_DEATH_SHIM = ("import ctypes, os, sys\n"
               "ctypes.CDLL(None).prctl(1, int(sys.argv[1]), 0, 0, 0)\n"
               "if os.getppid() != int(sys.argv[2]):\n"
               "    os._exit(111)\n"
               "os.execv(sys.argv[3], sys.argv[3:])\n")
# The directory holding the elkeid_agent package, put on the children's path
# so a source checkout works without installation.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LISTENING = re.compile(r"devcenter listening grpc=(\S+) http=(\S+)")


def wait_until(predicate, timeout=20.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


async def wait_for(predicate, timeout=30.0, what="condition", interval=0.05):
    """``wait_until`` for code running on an event loop: polls without
    blocking the loop."""
    import asyncio
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        await asyncio.sleep(interval)


def processes_mentioning(needle):
    """pids (other than this process) whose command line contains ``needle``:
    how tests prove a process they did not start directly is gone."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmdline = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if needle in cmdline:
            out.append(int(name))
    return out


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


def _command(argv, die_with_parent):
    """``argv``, or ``argv`` behind the shim that has the kernel send SIGTERM
    when the parent dies. PR_SET_PDEATHSIG fires when the *thread* that
    started the child exits: start such children from a thread that lives as
    long as they should."""
    if not die_with_parent:
        return list(argv)
    return [PY, "-I", "-S", "-c", _DEATH_SHIM, str(int(signal.SIGTERM)), str(os.getpid())] + \
        list(argv)


def unwrap(body, key):
    """AgentCenter-style answers are {"code": 0, "msg": ..., "data": ...};
    ``data`` may itself be a list or an object holding ``key``."""
    if isinstance(body, dict) and "code" in body:
        body = body.get("data")
    if isinstance(body, dict):
        body = body.get(key, [])
    return body or []


class DevCenterProc:
    def __init__(self, base, certs=None, store="full", extra_args=(), die_with_parent=False,
                 db=None):
        """``db``: the database (and, in seq mode, the sequence log next to
        it) of an earlier devcenter to go on with; default a new one in
        ``base``, which holds this process's stderr and uploads either way."""
        self.base = str(base)
        os.makedirs(self.base, exist_ok=True)
        self.certs = certs or os.path.join(self.base, "certs")
        self.db = str(db) if db else os.path.join(self.base, "dc.db")
        self.uploads = os.path.join(self.base, "uploads")
        args = [PY, "-m", "elkeid_devtools.devcenter", "--grpc", "127.0.0.1:0",
                "--http", "127.0.0.1:0", "--certs", self.certs, "--db", self.db,
                "--uploads", self.uploads, "--quiet", "--store", store] + list(extra_args)
        self.stderr = open(os.path.join(self.base, "devcenter.stderr"), "wb")
        self.proc = subprocess.Popen(_command(args, die_with_parent), stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=_env(), cwd=ROOT)
        self.grpc = self.http_addr = None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                break
            lines.append(line)
            m = _LISTENING.search(line)
            if m:
                self.grpc, self.http_addr = m.group(1), m.group(2)
                break
        if not self.grpc:
            self.stop()
            raise RuntimeError("devcenter did not start: %r %s" % (lines, self._stderr_text()))
        # Keep draining stdout so the devcenter never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for _line in self.proc.stdout:
            pass

    def _stderr_text(self):
        try:
            with open(self.stderr.name, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    @property
    def cert_args(self):
        return ["--ca", os.path.join(self.certs, "ca.crt"),
                "--cert", os.path.join(self.certs, "client.crt"),
                "--key", os.path.join(self.certs, "client.key")]

    def request(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request("http://%s%s" % (self.http_addr, path), data=data,
                                     method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            return status, json.loads(raw.decode() or "null")
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def records(self, data_type=None, agent_id=None, limit=100000, after=0, newest=False):
        """Stored records, oldest first; ``after`` skips ids up to it;
        ``newest`` keeps the last ``limit`` instead of the first."""
        q = ["limit=%d" % limit, "after=%d" % after]
        if newest:
            q.append("newest=1")
        if data_type is not None:
            q.append("data_type=%d" % data_type)
        if agent_id is not None:
            q.append("agent_id=%s" % agent_id)
        status, body = self.request("GET", "/records?" + "&".join(q))
        assert status == 200, body
        return unwrap(body, "records")

    def wait_records(self, data_type, predicate=lambda r: True, count=1, timeout=30,
                     agent_id=None):
        def found():
            recs = [r for r in self.records(data_type, agent_id) if predicate(r)]
            return recs if len(recs) >= count else None
        return wait_until(found, timeout, 0.1, "%d record(s) of type %s" % (count, data_type))

    def agents(self):
        status, body = self.request("GET", "/conn/list")
        assert status == 200, body
        return unwrap(body, "agents")

    def wait_agent(self, agent_id=None, timeout=30):
        def found():
            for a in self.agents():
                if agent_id is None or a.get("agent_id") == agent_id:
                    return a
            return None
        return wait_until(found, timeout, 0.1, "agent %s to connect" % agent_id)

    def stat(self):
        status, body = self.request("GET", "/conn/stat")
        assert status == 200, body
        return body.get("data", body) if isinstance(body, dict) else body

    def command(self, agent_id, command):
        return self.request("POST", "/command/", {"agent_id": agent_id, "command": command})

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class AgentProc:
    def __init__(self, workdir, args=(), env=None, die_with_parent=False, command=None):
        """``command`` replaces ``python -m elkeid_agent run`` (a test's
        wrapper around the same Agent); ``--workdir`` and ``args`` follow."""
        self.workdir = str(workdir)
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError:
            pass  # tests of an unusable workdir: the agent must cope
        fd, self.stderr_path = tempfile.mkstemp(prefix="elkeid-agent-", suffix=".stderr")
        self.stderr = os.fdopen(fd, "wb")
        cmd = list(command or [PY, "-m", "elkeid_agent", "run"]) + ["--workdir", self.workdir] + \
            list(args)
        cwd = self.workdir if os.path.isdir(self.workdir) else None
        self.proc = subprocess.Popen(_command(cmd, die_with_parent), stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr, env=_env(env),
                                     cwd=cwd)
        self.pid = self.proc.pid

    @property
    def alive(self):
        return self.proc.poll() is None

    def agent_id(self, timeout=20):
        path = os.path.join(self.workdir, "machine-id")
        wait_until(lambda: os.path.exists(path) and open(path).read().strip(), timeout,
                   what="machine-id")
        with open(path) as f:
            return f.read().strip()

    def log_text(self, stderr=True):
        """The file log, then (unless ``stderr=False``) stderr, which repeats
        the operator lines of the file log: count lines with stderr=False."""
        paths = [os.path.join(self.workdir, "log/elkeid-agent.log")]
        if stderr:
            paths.append(self.stderr_path)
        parts = []
        for path in paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
            except OSError:
                pass
        return "\n".join(parts)

    def wait_log(self, needle, timeout=20):
        return wait_until(lambda: needle in self.log_text(), timeout, 0.1,
                          "log line containing %r" % needle)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("agent did not exit within %s s of SIGTERM" % timeout)
        self.stderr.close()
        return self.proc.returncode


class FileServer:
    """http.server on 127.0.0.1 serving ``routes`` {path: (status, bytes,
    headers)}; anything else is 404."""

    def __init__(self):
        self.routes = {}
        self.hits = []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                status, body, headers = routes.get(self.path, (404, b"missing", {}))
                if callable(body):
                    body(self)
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def add(self, path, body, status=200, headers=None):
        self.routes[path] = (status, body, headers or {})
        return self.url(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
