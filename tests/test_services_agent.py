"""Local services under a real ``elkeid-agent run --services FILE``: they
survive the agent (SIGTERM or SIGKILL of it), are re-adopted with the same
pids, and stop when removed from the file (SIGHUP)."""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import AgentProc, wait_until  # noqa: E402
from services_fixtures.rig import service, write_services  # noqa: E402

from elkeid_agent.services import adoption  # noqa: E402


def offline(devcenter):
    """An endpoint nothing listens on, and TLS files (without both an agent
    refuses to start; the services do not need the server)."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return ["--server", "127.0.0.1:%d" % port] + devcenter.cert_args


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def recorded(workdir):
    try:
        return {sid: r.pid for sid, r in adoption.load(adoption.path_in(workdir)).items()}
    except adoption.StateError:
        return {}


def test_agent_restart_readopts_and_removal_stops(tmp_path, devcenter):
    wd = str(tmp_path / "agent")
    os.makedirs(wd)
    sock = os.path.join(str(tmp_path), "a.sock")
    path = os.path.join(str(tmp_path), "services.json")
    write_services(path, [
        service("a", "--socket", sock, "--id", "a", socket_path=sock,
                health_check={"heartbeat_timeout": "5s"}),
        service("b")])
    agents, pids = [], {}
    try:
        agent = AgentProc(wd, ["--services", path] + offline(devcenter))
        agents.append(agent)
        pids = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(recorded(wd)), 60,
                          what="both services recorded")
        agent.wait_log("service a running", 30)

        for rounds, how in enumerate((signal.SIGTERM, signal.SIGKILL), 1):
            agent.signal(how)
            agent.proc.wait(60)
            assert all(alive(p) for p in pids.values()), "services died with the agent"
            agent = AgentProc(wd, ["--services", path] + offline(devcenter))
            agents.append(agent)
            for sid, pid in pids.items():
                # The log file is shared by the agents of this workdir.
                needle = "service %s running: adopted pid %d" % (sid, pid)
                # File log only: stderr repeats the operator lines.
                wait_until(lambda: agent.log_text(stderr=False).count(needle) >= rounds, 60,
                           what="this agent's " + needle)
            # The state file is rewritten a moment after the adoptions are logged.
            wait_until(lambda: recorded(wd) == pids, 30, what="both adoptions recorded")
            assert all(alive(p) for p in pids.values())

        # Removing an entry and SIGHUP stops that service, and only it.
        write_services(path, [service("a", "--socket", sock, "--id", "a", socket_path=sock,
                                      health_check={"heartbeat_timeout": "5s"})])
        agent.signal(signal.SIGHUP)
        wait_until(lambda: not alive(pids["b"]), 60, what="b stopped")
        wait_until(lambda: recorded(wd) == {"a": pids["a"]}, 60, what="b forgotten")
        assert alive(pids["a"])
        assert agent.alive
    except AssertionError:
        print(agents[-1].log_text()[-6000:])
        raise
    finally:
        for a in agents:
            if a.alive:
                a.stop()
        for pid in pids.values():
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_invalid_file_at_start_leaves_the_agent_running(tmp_path, devcenter):
    wd = str(tmp_path / "agent")
    path = os.path.join(str(tmp_path), "services.yaml")
    with open(path, "w") as f:
        f.write("agents:\n  - id: x\n    type: nonsense\n")
    agent = AgentProc(wd, ["--services", path] + offline(devcenter))
    try:
        agent.wait_log("D1002 %s:3" % path, 60)
        agent.wait_log("services not started", 30)
        assert agent.alive
    finally:
        assert agent.stop() == 0


def test_missing_explicit_file_is_reported(tmp_path, devcenter):
    wd = str(tmp_path / "agent")
    agent = AgentProc(wd, offline(devcenter),
                      env={"ELKEID_SERVICES": str(tmp_path / "nope.yaml")})
    try:
        agent.wait_log("D1001 %s" % (tmp_path / "nope.yaml"), 60)
        assert agent.alive
    finally:
        assert agent.stop() == 0


if __name__ == "__main__":
    print(json.dumps(recorded(sys.argv[1])))


def test_the_documented_interface_with_the_real_supervisor(tmp_path, devcenter):
    """`elkeid-agent run --services FILE --status-addr 127.0.0.1:PORT`: GET
    /services, `elkeidctl --workdir DIR services --json`, POST /heartbeat,
    `services restart ID` and the 1020 records all speak of the same service."""
    from test_ctl_services import ctl
    from test_status_endpoint import free_port, http, reachable
    wd = str(tmp_path / "agent")
    path = os.path.join(str(tmp_path), "services.json")
    write_services(path, [service("web", health_check={"heartbeat_timeout": "30s"})])
    port = free_port()
    agent = AgentProc(wd, ["--services", path, "--status-addr", "127.0.0.1:%d" % port,
                           "--agent-id", "iface", "--heartbeat-interval", "0.5",
                           "--server", devcenter.grpc] + devcenter.cert_args)
    try:
        wait_until(lambda: reachable(port), 60, what="the status endpoint")
        [web] = wait_until(lambda: [s for s in http(port, "/services")[1]
                                    if s["state"] == "running" and s["pid"]], 60,
                           what="the service running")
        for key in ("id", "type", "state", "pid", "restarts", "health", "last_error"):
            assert key in web
        assert (web["id"], web["type"], web["restarts"]) == ("web", "custom", 0)
        rc, out, err = ctl("--workdir", wd, "services", "--json")
        assert rc == 0, err
        [listed] = json.loads(out)
        assert {k: listed[k] for k in ("id", "state", "pid")} == \
            {"id": "web", "state": "running", "pid": web["pid"]}
        hb = {"agent_id": "web", "pid": web["pid"], "status": "running",
              "timestamp": "2026-12-01T10:00:00Z"}
        assert http(port, "/heartbeat", hb) == (200, {"message": "heartbeat received"})
        status, body = http(port, "/heartbeat", dict(hb, pid=1))
        assert status == 400, body
        rc, out, err = ctl("--workdir", wd, "services", "restart", "web")
        assert rc == 0, err
        restarted = wait_until(lambda: [s for s in http(port, "/services")[1]
                                        if s["state"] == "running" and s["pid"]
                                        and s["pid"] != web["pid"]], 60,
                               what="a new pid after restart")
        assert not alive(web["pid"])
        new_pid = restarted[0]["pid"]
        [rec] = devcenter.wait_records(
            1020, lambda r: r["fields"].get("pid") == str(new_pid), agent_id="iface",
            timeout=60)[-1:]
        assert rec["fields"]["id"] == "web" and rec["fields"]["state"] == "running"
    finally:
        pids = [s["pid"] for s in http(port, "/services")[1] if s["pid"]] \
            if reachable(port) else []
        agent.stop()
        for pid in pids:  # services outlive the agent by design
            os.kill(pid, signal.SIGKILL)
