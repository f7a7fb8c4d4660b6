"""The status endpoint (--status-addr): real agent processes, real HTTP.

Services come from tests/services_fixtures/fake_agent.py (the real Agent
with a stand-in supervisor whose services are real processes) until the
services supervisor lands; the agent-only checks use ``elkeid-agent run``.
"""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import AgentProc, wait_until
from elkeid_devtools.launchers import PY, ROOT, _env

FAKE_AGENT = [PY, os.path.join(ROOT, "tests", "services_fixtures", "fake_agent.py")]
HB = {"agent_id": "alpha", "status": "running", "timestamp": "2025-12-05T10:00:00Z",
      "cpu": 1.5, "memory": 1024}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, path, body=None, method=None, raw=False):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=data,
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if raw:
        return status, text
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def reachable(port):
    try:
        return http(port, "/services")[0] == 200
    except OSError:
        return False


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams, family, **labels):
    for s in fams[family].samples:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError("no %s%r in %s" % (family, labels, fams[family].samples))


@pytest.fixture
def fake_agent(tmp_path, devcenter):
    agents = []

    def start(*extra, server=True, env=None):
        port = free_port()
        args = ["--agent-id", "fake-%d" % port, "--heartbeat-interval", "0.5",
                "--status-addr", "127.0.0.1:%d" % port]
        # Without a server: a loopback port nothing listens on (an agent with no
        # endpoint or no TLS files refuses to start).
        args += ["--server", devcenter.grpc if server else "127.0.0.1:%d" % free_port()]
        args += devcenter.cert_args
        a = AgentProc(tmp_path / ("fake-%d" % port), args + list(extra), env=env,
                      command=FAKE_AGENT)
        agents.append(a)
        a.port = port
        wait_until(lambda: reachable(port) or not a.alive, 60, what="status endpoint")
        assert a.alive, a.log_text()
        return a

    yield start
    for a in agents:
        if a.alive:
            assert a.stop() == 0, a.log_text()


def test_non_loopback_status_addr_is_refused_at_start_with_one_line(tmp_path):
    for args, env in ((["--status-addr", "0.0.0.0:1"], {}),
                      ([], {"ELKEID_STATUS_ADDR": "10.1.2.3:9000"}),
                      (["--status-addr", "localhost:9000"], {}),
                      (["--status-addr", "127.0.0.1:99999"], {})):
        p = subprocess.run([PY, "-m", "elkeid_agent", "run", "--workdir", str(tmp_path / "wd")]
                           + args, env=_env(env), capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (args, env, p)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert "status address" in lines[0] and "Traceback" not in p.stderr


def test_health_is_503_with_the_reason_until_connected_then_200(start_agent, devcenter, tmp_path):
    port = free_port()
    # A loopback port nothing listens on: the agent cannot connect.
    a = start_agent("lonely", "--status-addr", "127.0.0.1:%d" % port, *devcenter.cert_args,
                    server=False, env={"ELKEID_SERVER": "127.0.0.1:%d" % free_port()})
    wait_until(lambda: reachable(port), 60, what="status endpoint")
    status, body = http(port, "/health")
    assert status == 503
    assert body["status"] == "unhealthy" and "not connected to the server" in body["reasons"]
    assert body["connected"] is False
    a.stop()

    port = free_port()
    b = start_agent("connected", "--status-addr", "127.0.0.1:%d" % port)
    wait_until(lambda: reachable(port), 60, what="status endpoint")
    status, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(
        http(port, "/health")), 60, what="/health 200")
    assert body["status"] == "healthy" and body["reasons"] == [] and body["connected"] is True
    assert body["agent_id"] == "connected"
    # Without a services supervisor the lists are empty, not errors.
    assert http(port, "/services") == (200, [])
    status, text = http(port, "/metrics", raw=True)
    fams = families(text)
    assert sample(fams, "elkeid_agent_transport_connected") == 1
    assert sample(fams, "elkeid_agent_healthy") == 1
    assert sample(fams, "elkeid_agent_info", agent_id="connected") == 1
    assert "elkeid_agent_queue_records" in fams
    b.stop()


def test_metrics_parse_and_carry_services_and_collectors(fake_agent):
    a = fake_agent()
    port = a.port

    def ready():
        fams = families(http(port, "/metrics", raw=True)[1])
        # cpu ratios need two rounds; memory comes with the first.
        return fams if "elkeid_host_cpu_usage_ratio" in fams and \
            "elkeid_host_memory_total_bytes" in fams else None
    fams = wait_until(ready, 60, what="collector samples in /metrics")
    services = http(port, "/services")[1]
    assert [s["id"] for s in services] == ["alpha", "beta"]
    for s in services:
        sid = s["id"]
        assert sample(fams, "elkeid_service_state", service=sid, state="running") == 1
        assert sample(fams, "elkeid_service_state", service=sid, state="failed") == 0
        assert sample(fams, "elkeid_service_up", service=sid) == 1
        assert sample(fams, "elkeid_service_pid", service=sid) == s["pid"] > 0
        assert fams["elkeid_service_restarts"].type == "counter"
        assert sample(fams, "elkeid_service_restarts", service=sid) == 0
        assert "elkeid_service_rss_bytes" in fams and "elkeid_service_cpu_percent" in fams
        assert sample(fams, "elkeid_service_health", service=sid, health="healthy") == 1
    assert sample(fams, "elkeid_service_info", service="beta", type="telegraf") == 1
    assert sample(fams, "elkeid_host_memory_total_bytes") > 0
    assert 0 <= sample(fams, "elkeid_host_cpu_usage_ratio") <= 1
    assert sample(fams, "elkeid_agent_collector_up", collector="memory") == 1


def test_services_lists_the_documented_fields(fake_agent):
    a = fake_agent(server=False)
    status, services = http(a.port, "/services")
    assert status == 200
    for s in services:
        for key in ("id", "type", "state", "pid", "restarts", "health", "last_error"):
            assert key in s, (key, s)
        assert s["state"] in ("stopped", "starting", "running", "backoff", "stopping", "exited",
                              "failed")
        assert isinstance(s["pid"], int) and isinstance(s["restarts"], int)


def test_post_heartbeat_good_bad_oversized_and_garbage(fake_agent):
    a = fake_agent(server=False)
    port = a.port
    pid = {s["id"]: s["pid"] for s in http(port, "/services")[1]}["alpha"]

    assert http(port, "/heartbeat", dict(HB, pid=pid)) == (200, {"message": "heartbeat received"})
    assert {s["id"]: s for s in http(port, "/services")[1]}["alpha"]["heartbeats"] == 1

    status, body = http(port, "/heartbeat", dict(HB, agent_id="nobody", pid=pid))
    assert status == 400 and "unknown service nobody" in body["error"]
    status, body = http(port, "/heartbeat", dict(HB, pid=pid + 100000))
    assert status == 400 and "pid" in body["error"]
    assert http(port, "/heartbeat", dict(HB, agent_id="", pid=pid)) == \
        (400, {"error": "invalid agent_id"})
    assert http(port, "/heartbeat", dict(HB, pid=pid, status="dancing"))[0] == 400
    status, body = http(port, "/heartbeat", b"\xff\xfe not json at all")
    assert status == 400 and "not JSON" in body["error"]
    status, body = http(port, "/heartbeat", b"[1, 2, 3]")
    assert status == 400 and "not a heartbeat" in body["error"]
    status, body = http(port, "/heartbeat", b"[" * 60000)
    assert status == 400
    status, text = http(port, "/heartbeat", json.dumps(dict(HB, pid=pid, pad="x" * 70000)).encode(),
                        raw=True)
    assert status == 413, text
    assert http(port, "/heartbeat", method="GET")[0] == 405

    fams = families(http(port, "/metrics", raw=True)[1])
    assert sample(fams, "elkeid_agent_status_heartbeats", result="accepted") == 1
    assert sample(fams, "elkeid_agent_status_heartbeats", result="refused") == 2
    assert sample(fams, "elkeid_agent_status_heartbeats", result="bad_field") == 2
    assert sample(fams, "elkeid_agent_status_heartbeats", result="not_utf8") == 1
    assert sample(fams, "elkeid_agent_status_heartbeats", result="not_json") == 1
    assert sample(fams, "elkeid_agent_http_requests", server="status", code="413") == 1
    assert a.alive
    assert http(port, "/health")[0] == 503  # no server configured, still answering


def test_status_endpoint_port_in_use_is_reported_not_fatal(start_agent, devcenter):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        a = start_agent("busy-port", "--status-addr", "127.0.0.1:%d" % port)
        devcenter.wait_agent("busy-port", timeout=60)
        a.wait_log("status endpoint: cannot listen", timeout=60)
        assert a.alive
        hb = devcenter.wait_records(1000, lambda r: "status endpoint" in
                                    r["fields"].get("state_detail", ""),
                                    agent_id="busy-port", timeout=60)
        assert json.loads(hb[-1]["fields"]["state_detail"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("setting", ["", "0"])
def test_the_hot_path_in_use_is_logged_and_on_metrics_and_status(start_agent, tmp_path, setting):
    from elkeid_agent import native
    on = native.ACTIVE and setting != "0"
    port = free_port()
    a = start_agent("hotpath%s" % setting, "--status-addr", "127.0.0.1:%d" % port,
                    env={"ELKEID_ACCEL": setting})
    wait_until(lambda: reachable(port), 60, what="status endpoint")
    fams = families(http(port, "/metrics", raw=True)[1])
    assert sample(fams, "elkeid_agent_accel_enabled") == (1 if on else 0)
    assert http(port, "/health")[1]["hot_path"] == ("C" if on else "pure")
    lines = [l for l in a.log_text().splitlines() if "hot path:" in l]
    assert len(lines) == 1 and ("hot path: C (" if on else "hot path: pure Python (") in lines[0], lines
    a.stop()
