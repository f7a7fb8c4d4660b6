"""``elkeidctl [--workdir DIR] services ...`` against a real agent process
over its control socket, and what the socket does with hostile input."""

import json
import os
import signal
import socket
import stat
import subprocess

import pytest

from harness import AgentProc, wait_until
from elkeid_agent.runtime import ctlsock
from elkeid_devtools.launchers import PY, ROOT, _env
from test_status_endpoint import families, free_port, http, reachable, sample

FAKE_AGENT = [PY, os.path.join(ROOT, "tests", "services_fixtures", "fake_agent.py")]


def offline(devcenter):
    """An endpoint nothing listens on, and TLS files: without them an agent
    refuses to start; with them it runs and keeps retrying."""
    return ["--server", "127.0.0.1:%d" % free_port()] + devcenter.cert_args


def ctl(*args, env=None):
    p = subprocess.run([PY, "-m", "elkeid_agent", "ctl"] + list(args), env=_env(env),
                       capture_output=True, text=True, timeout=180)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def agent(tmp_path, devcenter):
    port = free_port()
    a = AgentProc(tmp_path / "wd", ["--agent-id", "ctl-test", "--status-addr",
                                    "127.0.0.1:%d" % port] + offline(devcenter),
                  command=FAKE_AGENT)
    a.port = port
    wait_until(lambda: reachable(port) or not a.alive, 60, what="status endpoint")
    assert a.alive, a.log_text()
    yield a
    if a.alive:
        assert a.stop() == 0, a.log_text()


def listed(a):
    return {s["id"]: s for s in http(a.port, "/services")[1]}


def without_uptime(services):
    return [{k: v for k, v in s.items() if k != "uptime"} for s in services]


def test_services_json_equals_get_services(agent):
    rc, out, err = ctl("--workdir", agent.workdir, "services", "--json")
    assert rc == 0, err
    assert without_uptime(json.loads(out)) == without_uptime(http(agent.port, "/services")[1])
    # ELKEID_WORKDIR says the same as --workdir.
    rc, out, err = ctl("services", "--json", env={"ELKEID_WORKDIR": agent.workdir})
    assert rc == 0, err
    assert [s["id"] for s in json.loads(out)] == ["alpha", "beta"]


def test_services_table(agent):
    rc, out, err = ctl("--workdir", agent.workdir, "services")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATE", "PID", "UPTIME", "RESTARTS", "HEALTH",
                                "LAST", "ERROR"]
    pids = {k: v["pid"] for k, v in listed(agent).items()}
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["alpha"][1:4] == ["custom", "running", str(pids["alpha"])]
    assert rows["beta"][1] == "telegraf"


def test_restart_stop_start_change_the_service(agent):
    old = listed(agent)["alpha"]["pid"]
    rc, out, err = ctl("--workdir", agent.workdir, "services", "restart", "alpha")
    assert rc == 0, err
    assert out.startswith("restart alpha:")
    now = listed(agent)["alpha"]
    assert now["pid"] not in (0, old) and now["restarts"] == 1 and now["state"] == "running"
    assert listed(agent)["beta"]["restarts"] == 0

    rc, out, err = ctl("--workdir", agent.workdir, "services", "stop", "beta")
    assert rc == 0, err
    assert listed(agent)["beta"]["state"] == "stopped" and listed(agent)["beta"]["pid"] == 0
    rc, out, err = ctl("--workdir", agent.workdir, "services", "start", "beta")
    assert rc == 0, err
    assert listed(agent)["beta"]["state"] == "running"
    rc, out, err = ctl("--workdir", agent.workdir, "services", "reload")
    assert rc == 0, err

    rc, out, err = ctl("--workdir", agent.workdir, "services", "restart", "nosuch")
    assert rc == 1 and err.strip() == "elkeidctl: restart nosuch: unknown service nosuch"
    rc, out, err = ctl("--workdir", agent.workdir, "services", "restart", "../etc")
    assert rc == 1 and "needs a service id" in err
    rc, out, err = ctl("--workdir", agent.workdir, "services", "restart")
    assert rc == 2 and "Traceback" not in err


def test_against_a_stopped_agent_one_line(agent, tmp_path):
    sock = ctlsock.socket_path(agent.workdir)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert agent.stop() == 0
    assert not os.path.exists(sock)  # removed at a clean exit
    rc, out, err = ctl("--workdir", agent.workdir, "services")
    assert rc == 3 and out == ""
    assert err.splitlines() == ["elkeidctl: elkeid-agent is not running (nothing answers on %s)"
                                % sock]
    rc, out, err = ctl("--workdir", str(tmp_path / "never-installed"), "services", "restart",
                       "alpha")
    assert rc == 3 and len(err.splitlines()) == 1


def test_a_killed_agent_leaves_a_socket_the_next_one_replaces(tmp_path, devcenter):
    wd = tmp_path / "wd"
    a = AgentProc(wd, ["--agent-id", "killed"] + offline(devcenter), command=FAKE_AGENT)
    sock = ctlsock.socket_path(str(wd))
    wait_until(lambda: os.path.exists(sock) or not a.alive, 60, what="control socket")
    a.signal(signal.SIGKILL)
    a.proc.wait()
    assert os.path.exists(sock)
    rc, out, err = ctl("--workdir", str(wd), "services")
    assert rc == 3 and "not running" in err and len(err.splitlines()) == 1
    b = AgentProc(wd, ["--agent-id", "killed"] + offline(devcenter), command=FAKE_AGENT)
    try:
        wait_until(lambda: ctl("--workdir", str(wd), "services")[0] == 0 or not b.alive, 60,
                   what="the new agent to answer")
        assert b.alive, b.log_text()
    finally:
        b.stop()


def raw(path, data, shutdown=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    try:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return reply
            reply += chunk
    finally:
        s.close()


def test_hostile_control_requests_are_answered_counted_and_survived(agent):
    sock = ctlsock.socket_path(agent.workdir)
    cases = [
        (b"garbage\n", "not a JSON object"),
        (b"\xff\xfe\n", "not a JSON object"),
        (b"[1,2]\n", "must be a JSON object"),
        (b'{"op": "format-disk"}\n', "op must be one of"),
        (b'{"op": "restart"}\n', "needs a service id"),
        (b'{"op": "restart", "id": 5}\n', "needs a service id"),
        (b'{"op": "list", "id": "alpha"}\n', "takes no id"),
        (b'{"op": "list", "extra": 1}\n', "unknown request keys"),
        (b"[" * 3000 + b"\n", "not a JSON object"),
        (b"x" * 10000, "larger than"),
        (b"", "empty request"),
    ]
    for data, expected in cases:
        answer = json.loads(raw(sock, data))
        assert answer["ok"] is False and expected in answer["error"], (data[:40], answer)
    # A newline-less request ended by the client's half-close is still read.
    assert json.loads(raw(sock, b'{"op": "list"}'))["ok"] is True
    assert agent.alive
    assert [s["id"] for s in ctlsock.call(sock, {"op": "list"})["services"]] == ["alpha", "beta"]
    fams = families(http(agent.port, "/metrics", raw=True)[1])
    assert sample(fams, "elkeid_agent_control_requests", op="none", result="not_json") == 3
    assert sample(fams, "elkeid_agent_control_requests", op="restart", result="invalid") == 2
    assert sample(fams, "elkeid_agent_control_requests", op="none", result="too_large") == 1
    assert sample(fams, "elkeid_agent_control_requests", op="list", result="ok") >= 2


def test_workdir_applies_to_every_command(tmp_path):
    wd = tmp_path / "elsewhere"
    wd.mkdir()
    rc, out, err = ctl("--workdir", str(wd), "set", "--service_type=sysvinit", "--idc=x1")
    assert rc == 0, err
    assert "service_type=sysvinit" in (wd / "specified_env").read_text()
    rc, out, err = ctl("--workdir", str(wd), "status", "--json")
    assert json.loads(out)["specified_env"] == str(wd / "specified_env"), err
    assert json.loads(out)["idc"] == "x1"
    rc, out, err = ctl("status", env={"ELKEID_WORKDIR": str(tmp_path / "empty")})
    assert rc == 6 and str(tmp_path / "empty" / "specified_env") in err
    rc, out, err = ctl("--workdir", "", "status")
    assert rc == 2 and "--workdir" in err


def test_a_workdir_deeper_than_sun_path_still_works(tmp_path, devcenter):
    wd = tmp_path / ("d" * 60) / ("e" * 60)
    sock = ctlsock.socket_path(str(wd))
    assert len(sock) > ctlsock.MAX_SUN_PATH
    a = AgentProc(wd, ["--agent-id", "deep"] + offline(devcenter), command=FAKE_AGENT)
    try:
        wait_until(lambda: os.path.exists(sock) or not a.alive, 60, what="control socket")
        rc, out, err = ctl("--workdir", str(wd), "services", "--json")
        assert rc == 0, err
        assert [s["id"] for s in json.loads(out)] == ["alpha", "beta"]
    finally:
        assert a.stop() == 0, a.log_text()
