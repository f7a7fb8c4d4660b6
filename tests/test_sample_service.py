"""The test agent's standalone service mode (elkeid_devtools/sample_plugin/
service.py), run as a real process against the agent's end of the line run
here: a unix socket (plain lines or JSON-RPC 2.0) or a loopback POST
/heartbeat endpoint, every message checked by the agent's own heartbeat
parser. Each misbehaviour switch is observed from outside the process."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from elkeid_agent.services.heartbeat import HeartbeatError, LineSplitter, parse, rpc_reply
from elkeid_devtools.sample_plugin import build, service
from harness import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERVAL = 0.2
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------------------ the agent's end

class SocketAgent:
    """The agent's unix socket: bytes -> LineSplitter -> parse; JSON-RPC
    calls with an id answered as the agent answers them."""

    def __init__(self, path):
        self.path = path
        self.beats, self.refused, self.dropped, self.connections = [], [], 0, 0
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        splitter = LineSplitter()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            lines, dropped = splitter.feed(data)
            self.dropped += dropped
            for line in lines:
                try:
                    hb = parse(line)
                except HeartbeatError as exc:
                    self.refused.append(exc.reason)
                    continue
                self.beats.append(hb)
                reply = rpc_reply(hb)
                if reply:
                    try:
                        conn.sendall(reply)
                    except OSError:
                        return

    def close(self):
        self.srv.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        os.unlink(self.path)


class HttpAgent:
    """The agent's status endpoint: POST /heartbeat -> parse; 400 for an
    agent_id it does not know."""

    def __init__(self, known_ids):
        agent = self
        self.beats, self.refused = [], []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    hb = parse(body)
                    if self.path != "/heartbeat" or hb.agent_id not in known_ids:
                        raise HeartbeatError("unknown", "invalid agent_id")
                    agent.beats.append(hb)
                    code, answer = 200, {"message": "heartbeat received"}
                except HeartbeatError as exc:
                    agent.refused.append(exc.detail)
                    code, answer = 400, {"error": exc.detail}
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/heartbeat" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------ the service

def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields


def cpu_seconds(pid):
    fields = _proc_stat(pid)
    # utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid):
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Svc:
    def __init__(self, directory, cfg, cmd=None, name="svc", config_text=None):
        self.dir = directory
        self.config_path = os.path.join(directory, name + ".yaml")
        self.port_file = os.path.join(directory, name + ".port")
        self.cfg = dict({"heartbeat_interval": INTERVAL, "http_port": 0,
                         "port_file": self.port_file}, **cfg)
        if config_text is None:
            self.write(self.cfg)
        else:
            self.config_path = os.path.join(directory, name + ".cfg")
            with open(self.config_path, "w") as f:
                f.write(config_text)
        self.stderr_path = os.path.join(directory, name + ".stderr")
        cmd = cmd or [sys.executable, "-m", "elkeid_devtools.sample_plugin", "service"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd + ["--config", self.config_path], cwd=directory,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, env=env)
        self.pid = self.proc.pid
        self._port = None

    def write(self, cfg):
        with open(self.config_path + ".tmp", "w") as f:
            yaml.safe_dump(cfg, f)
        os.replace(self.config_path + ".tmp", self.config_path)

    @property
    def port(self):
        if self._port is None:
            def read():
                try:
                    with open(self.port_file) as f:
                        return int(f.read().strip() or 0)
                except (OSError, ValueError):
                    return 0
            self._port = wait_until(read, 60, what="the port file")
        return self._port

    def http(self, method, path, timeout=30):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path),
                                     method=method, data=b"" if method == "POST" else None)
        try:
            with NO_PROXY.open(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def metrics(self):
        code, body = self.http("GET", "/metrics")
        assert code == 200, body
        return body

    def reload(self, cfg):
        self.write(cfg)
        return self.http("POST", "/reload")

    def logs(self):
        with open(self.stderr_path, "rb") as f:
            return [json.loads(line) for line in f.read().splitlines()]

    def wait(self, timeout=60):
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sockdir():
    # sun_path holds 107 bytes: pytest's tmp_path can be longer than that.
    d = tempfile.mkdtemp(prefix="svc", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run(sockdir):
    started, extra_pids = [], []

    def start(cfg, **kw):
        svc = Svc(sockdir, cfg, **kw)
        started.append(svc)
        return svc
    start.extra_pids = extra_pids
    yield start
    for svc in started:
        svc.kill()
    for pid in extra_pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def agent(sockdir):
    a = SocketAgent(os.path.join(sockdir, "agent.sock"))
    yield a
    try:
        a.close()
    except OSError:
        pass


def beats_from(agent, pid, n=1):
    return wait_until(lambda: len([b for b in agent.beats if b.pid == pid]) >= n
                      and [b for b in agent.beats if b.pid == pid], 60,
                      what="%d heartbeats from pid %d" % (n, pid))


# ------------------------------------------------------------------ heartbeats and API

def test_line_heartbeats_api_and_sigterm(run, agent):
    svc = run({"agent_id": "svc-line", "socket_path": agent.path})
    beats = beats_from(agent, svc.pid, 3)
    assert {(b.agent_id, b.status, b.rpc) for b in beats} == {("svc-line", "running", False)}
    assert all(b.memory > 0 and b.cpu is not None for b in beats)
    assert agent.refused == [] and agent.dropped == 0

    code, health = svc.http("GET", "/health")
    assert code == 200 and health["status"] == "healthy" and health["agent_id"] == "svc-line"
    assert set(health) == {"status", "uptime", "last_heartbeat", "agent_id"}
    parse(json.dumps(dict(agent_id="x", pid=1, status="running",
                          timestamp=health["last_heartbeat"])))   # ISO 8601 UTC
    m = svc.metrics()
    for key in ("agent_id", "uptime", "heartbeat_count", "heartbeat_failures",
                "last_heartbeat", "cpu_percent", "memory_bytes", "status"):
        assert key in m
    assert m["heartbeat_count"] >= 3 and m["status"] == "running" and m["misbehave"] == {}
    assert svc.http("GET", "/nothing")[0] == 404

    svc.proc.send_signal(signal.SIGTERM)
    assert svc.wait() == 0
    last = [b for b in agent.beats if b.pid == svc.pid][-1]
    assert last.status == "stopping"
    logs = svc.logs()
    assert any(line["msg"] == "signal received, stopping" for line in logs)


def test_jsonrpc_heartbeats_answered_and_sigint(run, agent):
    svc = run({"agent_id": "svc-rpc", "socket_path": agent.path, "socket_protocol": "jsonrpc"})
    beats = beats_from(agent, svc.pid, 3)
    assert all(b.rpc and isinstance(b.rpc_id, int) for b in beats)
    assert len({b.rpc_id for b in beats}) == len(beats)
    wait_until(lambda: svc.metrics()["rpc_replies"] >= 1, 60, what="JSON-RPC answers read")
    assert svc.metrics()["rpc_errors"] == 0
    svc.proc.send_signal(signal.SIGINT)
    assert svc.wait() == 0
    assert [b for b in agent.beats if b.pid == svc.pid][-1].status == "stopping"


def test_reconnects_to_an_agent_that_comes_late_and_restarts(run, sockdir):
    path = os.path.join(sockdir, "late.sock")
    svc = run({"agent_id": "svc-late", "socket_path": path})
    wait_until(lambda: svc.metrics()["heartbeat_failures"] >= 2, 60, what="failed heartbeats")
    code, health = svc.http("GET", "/health")
    assert code == 503 and health["status"] == "unhealthy"
    first = SocketAgent(path)
    beats_from(first, svc.pid, 2)
    first.close()
    wait_until(lambda: svc.metrics()["heartbeat_failures"] >= 3, 60,
               what="a failure after the agent went away")
    second = SocketAgent(path)
    try:
        beats_from(second, svc.pid, 2)
        assert svc.metrics()["socket_connects"] >= 2
        assert svc.http("GET", "/health")[0] == 200
    finally:
        second.close()


def test_http_heartbeats_and_refusals(run):
    agent = HttpAgent({"svc-http"})
    try:
        svc = run({"agent_id": "svc-http", "heartbeat_url": agent.url})
        wait_until(lambda: len(agent.beats) >= 3, 60, what="POSTed heartbeats")
        assert {(b.agent_id, b.pid, b.status) for b in agent.beats} == \
            {("svc-http", svc.pid, "running")}
        assert svc.http("GET", "/health")[0] == 200
        # The agent refuses an id it does not know: the service counts it.
        code, body = svc.reload(dict(svc.cfg, agent_id="intruder"))
        assert code == 200 and body["success"] is True
        wait_until(lambda: svc.metrics()["heartbeat_failures"] >= 2, 60, what="refusals")
        assert "invalid agent_id" in agent.refused
        assert svc.http("GET", "/health")[0] == 503
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.wait() == 0
    finally:
        agent.close()


def test_reload_applies_refuses_and_reports_restart(run, agent):
    svc = run({"agent_id": "before", "socket_path": agent.path})
    beats_from(agent, svc.pid)
    changed = dict(svc.cfg, agent_id="after", http_port=svc.port + 1,
                   misbehave={"health_status": 500, "metrics_status": 503})
    code, body = svc.reload(changed)
    assert code == 200 and body["success"] is True and body["restart_required"] == ["http_port"]
    assert "reloaded_at" in body
    n = len(agent.beats)
    wait_until(lambda: any(b.agent_id == "after" for b in agent.beats[n:]), 60,
               what="a heartbeat with the new agent_id")
    code, health = svc.http("GET", "/health")       # still on the old port
    assert code == 500 and health["agent_id"] == "after"
    assert svc.http("GET", "/metrics")[0] == 503

    svc.write(dict(changed, misbehave={"burn_cpu": "lots"}))
    code, body = svc.http("POST", "/reload")
    assert code == 400 and body["success"] is False and "misbehave.burn_cpu" in body["message"]
    assert svc.http("GET", "/health")[0] == 500      # the old config stays
    n = len(agent.beats)
    wait_until(lambda: len(agent.beats) > n + 1, 60, what="heartbeats after a refused reload")
    assert {b.agent_id for b in agent.beats[n:]} == {"after"}

    os.unlink(svc.config_path)
    code, body = svc.http("POST", "/reload")
    assert code == 500 and "cannot read" in body["message"]

    code, body = svc.reload(dict(svc.cfg, agent_id="after", misbehave={"hang_http": True}))
    assert code == 200
    with pytest.raises(OSError):     # socket.timeout and URLError both are
        svc.http("GET", "/health", timeout=3)
    assert svc.http("POST", "/reload")[0] == 200     # /reload still answers
    code, body = svc.reload(dict(svc.cfg, agent_id="after"))
    assert code == 200
    assert svc.http("GET", "/health")[0] == 200
    assert svc.metrics()["http_hung"] >= 1


def test_sighup_reloads(run, agent):
    svc = run({"agent_id": "hup-1", "socket_path": agent.path})
    beats_from(agent, svc.pid)
    svc.write(dict(svc.cfg, agent_id="hup-2"))
    svc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(b.agent_id == "hup-2" for b in agent.beats), 60,
               what="a heartbeat after SIGHUP")


# ------------------------------------------------------------------ bad configs

@pytest.mark.parametrize("cfg, why", [
    ({"socket_path": "/x.sock"}, "agent_id"),
    ({"agent_id": "a"}, "exactly one of socket_path"),
    ({"agent_id": "a", "socket_path": "/x.sock", "heartbeat_url": "http://127.0.0.1:1/h"},
     "exactly one of socket_path"),
    ({"agent_id": "a", "heartbeat_url": "http://192.0.2.1/heartbeat"}, "not a loopback"),
    ({"agent_id": "a", "socket_path": "/x.sock", "http_host": "0.0.0.0"}, "http_host"),
    ({"agent_id": "a", "socket_path": "/x.sock", "heartbeat_interval": "soon"},
     "heartbeat_interval"),
    ({"agent_id": "a", "socket_path": "/x.sock", "heartbeat_interval": 0}, "> 0"),
    ({"agent_id": "a", "socket_path": "/" + "s" * 120}, "socket_path"),
    ({"agent_id": "a", "socket_path": "/x.sock", "colour": "red"}, "unknown key(s): colour"),
    ({"agent_id": "a", "socket_path": "/x.sock", "misbehave": {"crash_exit_code": 300}},
     "misbehave.crash_exit_code"),
    ({"agent_id": "a", "heartbeat_url": "http://127.0.0.1:1/h",
      "misbehave": {"flood_socket": 100}}, "flood_socket: needs socket_path"),
])
def test_bad_config_exits_2_with_one_line(run, cfg, why):
    svc = run(cfg)
    assert svc.wait() == 2
    logs = svc.logs()
    assert len(logs) == 1 and logs[0]["level"] == "error", logs
    assert why in logs[0]["msg"], logs[0]["msg"]
    assert not os.path.exists(svc.port_file)


def test_unparsable_yaml_and_durations(run):
    svc = run({}, config_text="agent_id: [unclosed\n")
    assert svc.wait() == 2
    assert len(svc.logs()) == 1 and "not valid YAML" in svc.logs()[0]["msg"]
    assert [service.duration(v) for v in (5, "5s", "500ms", "1m30s", "2", 0.25)] == \
        [5.0, 5.0, 0.5, 90.0, 2.0, 0.25]
    for bad in ("5 min", "-1s", "", True, [1], "nan"):
        with pytest.raises(ValueError):
            service.duration(bad)
    example = service.load_config(os.path.join(ROOT, "examples/sample_plugin/service.yaml"))
    assert example["heartbeat_interval"] == 30.0 and example["misbehave"]["burn_cpu"] == 0


# ------------------------------------------------------------------ misbehaviour

def test_stop_heartbeat_after(run, agent):
    svc = run({"agent_id": "mute", "socket_path": agent.path,
               "misbehave": {"stop_heartbeat_after": "1s"}})
    wait_until(lambda: svc.metrics()["heartbeats_stopped"], 60, what="heartbeats to stop")
    sent = svc.metrics()["heartbeat_count"]
    wait_until(lambda: len(agent.beats) == sent, 60, what="the last heartbeat to arrive")
    # Stale after three intervals: the service reports itself unhealthy.
    wait_until(lambda: svc.http("GET", "/health")[0] == 503, 60, what="/health 503")
    assert len(agent.beats) == sent and svc.metrics()["heartbeat_count"] == sent
    assert svc.proc.poll() is None


def test_burn_cpu(run, agent):
    svc = run({"agent_id": "hot", "socket_path": agent.path, "misbehave": {"burn_cpu": True}})
    beats_from(agent, svc.pid)
    start = cpu_seconds(svc.pid)
    wait_until(lambda: cpu_seconds(svc.pid) - start >= 2.0, 120, what="CPU time to grow")
    assert svc.metrics()["misbehave"] == {"burn_cpu": 1.0}


def test_grow_memory_and_release_on_reload(run, agent):
    svc = run({"agent_id": "fat", "socket_path": agent.path,
               "misbehave": {"grow_memory_mb_per_sec": 40, "grow_memory_max_mb": 120}})
    beats_from(agent, svc.pid)
    wait_until(lambda: svc.metrics()["memory_grown_bytes"] >= 100 * service.MB, 120,
               what="memory to grow")
    assert rss(svc.pid) >= 100 * service.MB
    wait_until(lambda: svc.metrics()["memory_grown_bytes"] == 120 * service.MB, 120,
               what="the cap")
    assert svc.reload(dict(svc.cfg, misbehave={}))[0] == 200
    wait_until(lambda: svc.metrics()["memory_grown_bytes"] == 0, 60, what="the release")


def test_crash_after_with_exit_code(run, agent):
    svc = run({"agent_id": "crashy", "socket_path": agent.path,
               "misbehave": {"crash_after": "1s", "crash_exit_code": 7}})
    assert svc.wait() == 7
    assert agent.beats and all(b.status == "running" for b in agent.beats)
    assert "crashing on purpose" in svc.logs()[-1]["msg"]


def test_crash_switched_on_at_runtime(run, agent):
    svc = run({"agent_id": "later", "socket_path": agent.path})
    beats_from(agent, svc.pid)
    # SIGHUP, not POST /reload: a crash at once may beat the HTTP answer.
    svc.write(dict(svc.cfg, misbehave={"crash_after": 0, "crash_exit_code": 9}))
    svc.proc.send_signal(signal.SIGHUP)
    assert svc.wait() == 9


def test_exit_at_start(run, agent):
    svc = run({"agent_id": "quick", "socket_path": agent.path,
               "misbehave": {"exit_at_start": 5}})
    assert svc.wait() == 5
    assert agent.connections == 0 and not os.path.exists(svc.port_file)


def test_ignore_sigterm_then_sigkill(run, agent):
    svc = run({"agent_id": "stubborn", "socket_path": agent.path,
               "misbehave": {"ignore_sigterm": True}})
    beats_from(agent, svc.pid)
    svc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: svc.metrics()["sigterm_ignored"] == 1, 60, what="SIGTERM ignored")
    n = len(agent.beats)
    wait_until(lambda: len(agent.beats) >= n + 2, 60, what="heartbeats after SIGTERM")
    assert svc.proc.poll() is None
    assert all(b.status == "running" for b in agent.beats)
    svc.proc.send_signal(signal.SIGKILL)
    assert svc.wait() == -signal.SIGKILL


def test_daemonize_double_fork(run, agent):
    svc = run({"agent_id": "ghost", "socket_path": agent.path,
               "misbehave": {"daemonize": True}})
    assert svc.wait() == 0
    beats = wait_until(lambda: [b for b in agent.beats if b.agent_id == "ghost"], 60,
                       what="a heartbeat from the daemon")
    pid = beats[0].pid
    run.extra_pids.append(pid)
    assert pid != svc.pid and _alive(pid)
    assert os.getsid(pid) != os.getsid(0)       # its own session
    assert svc.metrics()["pid"] == pid
    wait_until(lambda: len([b for b in agent.beats if b.pid == pid]) >= 3, 60,
               what="more heartbeats from the daemon")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: agent.beats[-1].status == "stopping", 60, what="its stopping beat")
    wait_until(lambda: not _alive(pid), 60, what="the daemon to exit")


def test_flood_socket_garbage_and_huge_lines(run, agent):
    svc = run({"agent_id": "noisy", "socket_path": agent.path,
               "misbehave": {"flood_socket": {"garbage_bytes_per_sec": 20000,
                                              "huge_line_bytes": 200000}}})
    wait_until(lambda: len(agent.refused) >= 10 and agent.dropped >= 2, 60,
               what="garbage and over-long lines at the agent")
    assert set(agent.refused) <= {"not_utf8", "not_json", "bad_shape"}
    assert svc.metrics()["flood_bytes_sent"] >= 400000
    # Switched off by a reload: clean heartbeats again.
    assert svc.reload(dict(svc.cfg, misbehave={}))[0] == 200
    n = len(agent.beats)
    wait_until(lambda: len(agent.beats) >= n + 3, 60, what="heartbeats after the flood")


def test_report_pid_and_status(run, agent):
    svc = run({"agent_id": "liar", "socket_path": agent.path,
               "misbehave": {"report_pid": 4242, "report_status": "error"}})
    beats = wait_until(lambda: len(agent.beats) >= 2 and agent.beats, 60, what="heartbeats")
    assert {(b.pid, b.status) for b in beats} == {(4242, "error")}
    assert svc.metrics()["pid"] == svc.pid
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.wait() == 0
    assert agent.beats[-1].pid == 4242 and agent.beats[-1].status == "stopping"


# ------------------------------------------------------------------ the executable

PY39 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3")))


@pytest.mark.parametrize("python", [sys.executable] + PY39[-1:], ids=lambda p: "py" + (
    p.split("/versions/")[1].split("/")[0] if "/versions/" in p else "this"))
def test_service_exe_runs_standalone(run, agent, sockdir, python):
    exe = os.path.join(sockdir, "sample-service")
    # -I -S: no PYTHONPATH, no site-packages (so no PyYAML, no repository).
    build.main(["service-exe", exe, "--python", python + " -IS"])
    names = sorted(zipfile.ZipFile(exe).namelist())
    assert names == ["__main__.py", "elkeid_agent/__init__.py", "elkeid_agent/errors.py",
                     "elkeid_agent/native.py",
                     "elkeid_agent/sdk/__init__.py", "elkeid_agent/wire.py",
                     "elkeid_devtools/__init__.py", "elkeid_devtools/sample_plugin/__init__.py",
                     "elkeid_devtools/sample_plugin/service.py"]
    assert build.zipapp_bytes("/x", service=True) == build.zipapp_bytes("/x", service=True)
    cfg = {"agent_id": "exe", "socket_path": agent.path, "heartbeat_interval": "200ms",
           "http_port": 0, "port_file": os.path.join(sockdir, "exe.port")}
    svc = run({}, cmd=[exe], name="exe", config_text=json.dumps(cfg))
    beats_from(agent, svc.pid, 2)
    assert svc.http("GET", "/health")[0] == 200
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.wait() == 0

    yaml_svc = run({}, cmd=[exe], name="exe-yaml", config_text="agent_id: exe\n")
    assert yaml_svc.wait() == 2
    assert "PyYAML is not installed" in yaml_svc.logs()[0]["msg"]
