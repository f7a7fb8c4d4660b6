"""The agent as a real process against the development AgentCenter over
mutual TLS on 127.0.0.1: heartbeats, commands, tasks, uploads, signals and
bad input."""

import base64
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from elkeid_agent import __version__
from elkeid_agent.host.heartbeat import AGENT_FIELDS
from elkeid_agent.pb import grpc_pb2 as pb
from elkeid_devtools.launchers import FileServer
from elkeid_devtools.sample_plugin import HEARTBEAT, build
from harness import DevCenterProc, unwrap, wait_until
from rawserver import RawServer


def heartbeat_of(devcenter, agent_id, predicate=lambda r: True, timeout=30):
    return devcenter.wait_records(1000, predicate, agent_id=agent_id, timeout=timeout)[-1]


def failures(devcenter, agent_id, token, timeout=30):
    return devcenter.wait_records(5100, lambda r: r["fields"].get("token") == token,
                                  agent_id=agent_id, timeout=timeout)


def test_heartbeat_has_every_field_and_decodes_with_generated_classes(devcenter, start_agent):
    agent = start_agent("hb-agent")
    # The first heartbeat is written at start-up, before the stream is up
    # (net_mode unknown), as the Go agent does; later ones carry the mode.
    first = devcenter.wait_records(1000, agent_id="hb-agent")[0]
    assert first["fields"]["net_mode"] in ("unknown", "private")
    rec = heartbeat_of(devcenter, "hb-agent", lambda r: r["fields"]["net_mode"] != "unknown")
    # Decode the bytes exactly as received with the generated classes.
    enc = pb.EncodedRecord.FromString(base64.b64decode(rec["raw"]))
    fields = dict(pb.Payload.FromString(enc.data).fields)
    assert enc.data_type == 1000 and enc.timestamp == rec["timestamp"]
    assert fields == rec["fields"]
    missing = [f for f in AGENT_FIELDS if f not in fields]
    assert not missing, missing
    assert fields["pid"] == str(agent.pid)
    assert fields["state"] == "running", fields["state_detail"]
    assert json.loads(fields["state_detail"]) == []
    assert fields["net_mode"] == "private"
    assert fields["region"] == "default"
    assert fields["arch"] == os.uname().machine
    assert fields["kernel_version"] == os.uname().release
    for f in ("cpu", "rx_speed", "tx_speed", "read_speed", "write_speed", "tx_tps", "rx_tps",
              "cpu_usage", "mem_usage"):
        float(fields[f])
        assert len(fields[f].split(".")[1]) == 8, (f, fields[f])
    assert 0 <= float(fields["cpu_usage"]) <= 1 and 0 < float(fields["mem_usage"]) < 1
    assert int(fields["rss"]) > 1_000_000
    assert int(fields["nfd"]) > 3
    # CPUs this process may run on (the agent inherits the affinity), as Go's NumCPU.
    assert int(fields["nproc"]) == len(os.sched_getaffinity(0))
    assert int(fields["total_mem"]) > 0 and int(fields["boot_time"]) > 1_000_000_000
    assert abs(int(fields["start_time"]) - rec["timestamp"]) < 120
    # The PackagedData header.
    assert rec["agent_id"] == "hb-agent"
    assert rec["hostname"] == socket.gethostname()
    assert rec["version"] == __version__
    assert rec["product"] == "elkeid-agent"
    # Heartbeats keep coming at the configured interval.
    devcenter.wait_records(1000, agent_id="hb-agent", count=3)
    assert agent.stop() == 0


def test_sigterm_flushes_and_exits_cleanly(devcenter, start_agent):
    agent = start_agent("term-agent")
    devcenter.wait_agent("term-agent")
    # A plugin under load: records are in flight at SIGTERM, and its last
    # heartbeat ("stopping") is written during shutdown, so only the drain
    # can deliver it.
    files = FileServer()
    try:
        archive, signature = build.tar_gz_bytes("sample", sys.executable, {
            "agent_id": "term-plugin", "http_port": 0, "heartbeat_interval": 3600,
            "load": {"records_per_sec": 500, "record_size": 200}})
        cfg = build.plugin_config("sample", "1.0.0", archive, signature,
                                  [files.add("/sample.tgz", archive)])
        status, body = devcenter.command("term-agent", {"config": [cfg]})
        assert status == 200, body
        devcenter.wait_records(9002, count=100, agent_id="term-agent")
        assert agent.stop() == 0
    finally:
        files.close()
    text = agent.log_text()
    assert "shutting down (SIGTERM)" in text
    stopping = devcenter.wait_records(
        HEARTBEAT, lambda r: r["fields"].get("status") == "stopping", agent_id="term-agent")
    assert len(stopping) == 1, "the last heartbeat arrived %d times" % len(stopping)
    for problem in ("InvalidStateError", "could not be delivered", "flush budget"):
        assert problem not in text


def test_a_stall_is_followed_by_one_heartbeat_not_a_burst(devcenter, start_agent):
    agent = start_agent("stall-agent")  # heartbeat every 0.5 s
    devcenter.wait_records(1000, count=3, agent_id="stall-agent")
    agent.signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        # The stall is the input: twelve heartbeat intervals.
        wait_until(lambda: time.time() > stopped + 6, 30, what="the stall")
    finally:
        resumed = int(time.time())
        agent.signal(signal.SIGCONT)
    devcenter.wait_records(1000, lambda r: r["timestamp"] >= resumed + 3,
                           agent_id="stall-agent", timeout=60)
    around = [r for r in devcenter.records(1000, "stall-agent")
              if resumed <= r["timestamp"] <= resumed + 1]
    # Back-to-back catch-up would put twelve or more in these two seconds; the
    # regular schedule from the resume fits at most four.
    assert len(around) <= 6, [r["timestamp"] for r in around]
    assert agent.stop() == 0


def test_task_1060_shuts_down(devcenter, start_agent):
    agent = start_agent("stop-agent")
    devcenter.wait_agent("stop-agent")
    status, body = devcenter.command("stop-agent", {"task": {
        "data_type": 1060, "name": "elkeid-agent", "data": "", "token": "t-stop"}})
    assert status == 200, body
    wait_until(lambda: not agent.alive, 20, what="agent exit")
    assert agent.proc.returncode == 0


def test_unknown_plugin_and_agent_task_get_5100(devcenter, start_agent):
    start_agent("route-agent")
    devcenter.wait_agent("route-agent")
    devcenter.command("route-agent", {"task": {"data_type": 6000, "name": "no-such-plugin",
                                               "data": "{}", "token": "t-noplugin"}})
    rec = failures(devcenter, "route-agent", "t-noplugin")[0]
    assert rec["fields"]["status"] == "failed"
    assert "no-such-plugin" in rec["fields"]["msg"]
    devcenter.command("route-agent", {"task": {"data_type": 4242, "name": "elkeid-agent",
                                               "token": "t-unknown"}})
    assert "4242" in failures(devcenter, "route-agent", "t-unknown")[0]["fields"]["msg"]


def test_bad_task_json_gets_5100_and_agent_stays_up(devcenter, start_agent):
    agent = start_agent("json-agent")
    devcenter.wait_agent("json-agent")
    for token, data in (("t-j1", "{not json"), ("t-j2", "[1,2]"),
                        ("t-j3", '{"path": 5, "buf_size": 10}'),
                        ("t-j4", '{"path": "/etc/hostname", "buf_size": -1}')):
        devcenter.command("json-agent", {"task": {"data_type": 1050, "name": "elkeid-agent",
                                                  "data": data, "token": token}})
        assert failures(devcenter, "json-agent", token)
    assert agent.alive
    heartbeat_of(devcenter, "json-agent", lambda r: r["fields"]["commands_rejected"] == "0")


def test_upload_file_arrives_intact(devcenter, start_agent, tmp_path):
    start_agent("up-agent")
    devcenter.wait_agent("up-agent")
    data = os.urandom(300_000)
    path = tmp_path / "evidence.bin"
    path.write_bytes(data)
    devcenter.command("up-agent", {"task": {
        "data_type": 1050, "name": "elkeid-agent", "token": "t-up",
        "data": json.dumps({"path": str(path), "buf_size": 100_000})}})

    def done():
        status, body = devcenter.request("GET", "/uploads")
        rows = unwrap(body, "uploads")
        return [u for u in rows if u.get("token") == "t-up" and u.get("status") in
                ("success", "SUCCESS", "ok", 0)]
    row = wait_until(done, 30, 0.2, "upload to complete")[0]
    assert row["size"] == len(data)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("case", ["missing", "too_big", "directory", "fifo"])
def test_upload_refusals(devcenter, start_agent, tmp_path, case):
    aid = "upbad-" + case
    start_agent(aid)
    devcenter.wait_agent(aid)
    if case == "missing":
        path, buf, needle = tmp_path / "nope", 1000, "cannot open"
    elif case == "too_big":
        path, buf, needle = tmp_path / "big", 10, "size limit exceeded: (6001/6000)"
        path.write_bytes(b"x" * 6001)
    elif case == "fifo":
        path, buf, needle = tmp_path / "pipe", 1000, "not a regular file"
        os.mkfifo(path)
    else:
        path, buf, needle = tmp_path, 1000, "not a regular file"
    devcenter.command(aid, {"task": {"data_type": 1050, "name": "elkeid-agent", "token": "t-" + case,
                                     "data": json.dumps({"path": str(path), "buf_size": buf})}})
    assert needle in failures(devcenter, aid, "t-" + case)[0]["fields"]["msg"]


def test_set_metadata_persists_and_applies(devcenter, start_agent):
    agent = start_agent("meta-agent")
    devcenter.wait_agent("meta-agent")
    devcenter.command("meta-agent", {"task": {"data_type": 1051, "name": "elkeid-agent",
                                              "token": "t-meta",
                                              "data": json.dumps({"idc": "dc-7"})}})
    heartbeat_of(devcenter, "meta-agent", lambda r: r["fields"]["idc"] == "dc-7")
    with open(os.path.join(agent.workdir, "specified_env")) as f:
        assert "specified_idc=dc-7\n" in f.read()
    devcenter.command("meta-agent", {"task": {"data_type": 1051, "name": "elkeid-agent",
                                              "token": "t-region",
                                              "data": json.dumps({"region": "mars"})}})
    assert "can't find region: mars" in failures(devcenter, "meta-agent", "t-region")[0]["fields"]["msg"]


def test_configs_reset_state_and_report_missing_plugins(devcenter, start_agent):
    start_agent("cfg-agent")
    devcenter.wait_agent("cfg-agent")
    devcenter.command("cfg-agent", {"config": [
        {"name": "elkeid-agent", "version": "9.9.9", "sha256": "", "download_url": []}]})
    rec = heartbeat_of(devcenter, "cfg-agent", lambda r: r["fields"]["state"] == "abnormal")
    assert "9.9.9" in rec["fields"]["state_detail"]


def test_error_logs_become_1010_records(devcenter, start_agent):
    start_agent("log-agent")
    devcenter.wait_agent("log-agent")
    devcenter.command("log-agent", {"task": {"data_type": 4243, "name": "elkeid-agent",
                                             "token": "t-log"}})
    rec = devcenter.wait_records(1010, lambda r: "4243" in r["fields"].get("msg", ""),
                                 agent_id="log-agent")[0]
    assert rec["fields"]["level"] == "error"
    assert rec["fields"]["source"]


def test_agent_id_flag_wins_over_env(devcenter, start_agent):
    agent = start_agent("flag-id", env={"SPECIFIED_AGENT_ID": "env-id"})
    devcenter.wait_agent("flag-id")
    assert agent.agent_id() == "flag-id"


def test_gzip_compression_end_to_end(devcenter, start_agent):
    start_agent("gzip-agent", "--compression", "gzip")
    heartbeat_of(devcenter, "gzip-agent")


def test_bad_specified_env_lines_logged_agent_starts(devcenter, start_agent, tmp_path):
    wd = tmp_path / "envagent"
    wd.mkdir()
    (wd / "specified_env").write_text("garbage line\nspecified_idc=from-file\n")
    agent = start_agent("env-agent", workdir=wd)
    heartbeat_of(devcenter, "env-agent", lambda r: r["fields"]["idc"] == "from-file")
    agent.wait_log("specified_env line 1 ignored")


def test_unwritable_log_dir_reports_abnormal(devcenter, start_agent, tmp_path):
    # An unusable workdir stops start-up (test_first_contact.py); a log
    # directory that cannot be made only degrades the agent.
    wd = tmp_path / "ro-workdir"
    wd.mkdir()
    (wd / "log").write_text("not a directory")
    agent = start_agent("ro-agent", workdir=wd)
    rec = heartbeat_of(devcenter, "ro-agent")
    assert rec["fields"]["state"] == "abnormal"
    assert "not writable" in rec["fields"]["state_detail"]
    assert agent.alive


def test_sigusr1_toggles_debug_endpoint(devcenter, start_agent):
    import urllib.request
    agent = start_agent("dbg-agent")
    devcenter.wait_agent("dbg-agent")
    addr_file = os.path.join(agent.workdir, "tmp", "debug.addr")
    agent.signal(signal.SIGUSR1)
    wait_until(lambda: os.path.exists(addr_file) and open(addr_file).read().strip(), 10,
               what="debug.addr")
    addr = open(addr_file).read().strip()
    assert addr.startswith("127.0.0.1:")
    with urllib.request.urlopen("http://%s/debug/stacks" % addr, timeout=10) as r:
        text = r.read().decode()
    assert "MainThread" in text
    agent.signal(signal.SIGUSR1)
    wait_until(lambda: not os.path.exists(addr_file), 10, what="debug.addr removal")
    agent.signal(signal.SIGUSR2)
    agent.wait_log("released memory")
    assert agent.alive


def test_server_from_another_ca_is_refused(tmp_path, start_agent, devcenter):
    other = DevCenterProc(tmp_path / "other")  # generates its own, unrelated CA
    try:
        a = start_agent("wrongca-agent", "--server", other.grpc, *devcenter.cert_args,
                        server=False)
        a.wait_log("dial %s (private) failed" % other.grpc, 30)
        assert other.agents() == []
        assert a.alive
    finally:
        other.stop()


def test_server_with_another_name_is_refused(start_agent, devcenter):
    # The devcenter's certificate says elkeid.com; demand another name.
    a = start_agent("wrongname-agent", "--server-name", "not-elkeid.example")
    a.wait_log("dial %s (private) failed" % devcenter.grpc, 30)
    assert all(x.get("agent_id") != "wrongname-agent" for x in devcenter.agents())
    assert a.alive


class _SDHandler(BaseHTTPRequestHandler):
    reply = b""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.server.reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def sd_server():
    srv = HTTPServer(("127.0.0.1", 0), _SDHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def test_service_discovery_used_then_garbage_falls_back(devcenter, start_agent, sd_server):
    host, port = devcenter.grpc.rsplit(":", 1)
    sd_server.reply = json.dumps({"code": 0, "msg": "", "data": [
        {"ip": host, "port": int(port), "weight": 1}]}).encode()
    sd = "127.0.0.1:%d" % sd_server.server_address[1]
    start_agent("sd-agent", "--service-discovery", sd, *devcenter.cert_args, server=False)
    connected = lambda r: r["fields"]["net_mode"] != "unknown"  # noqa: E731
    assert heartbeat_of(devcenter, "sd-agent", connected)["fields"]["net_mode"] == "sd"
    sd_server.reply = b"<html>garbage</html>"
    agent = start_agent("sd-garbage", "--service-discovery", sd)
    assert heartbeat_of(devcenter, "sd-garbage", connected)["fields"]["net_mode"] == "private"
    agent.wait_log("service discovery failed, falling back")


@pytest.mark.parametrize("reply", ["garbage", "deep", "midbody"])
def test_broken_service_discovery_never_ends_the_transport(devcenter, start_agent, reply):
    bad = RawServer(reply)
    aid = "sdbroken-" + reply
    try:
        agent = start_agent(aid, "--service-discovery", bad.address)
        heartbeat_of(devcenter, aid, lambda r: r["fields"]["net_mode"] == "private")
        agent.wait_log("service discovery failed, falling back")
        line = "connected to %s (private)" % devcenter.grpc
        for n in (2, 3):  # the agent keeps reconnecting, asking the bad peer each time
            # The agent logs "connected" at channel-ready, a moment before the
            # devcenter registers its stream: reset once the stream is there.
            wait_until(lambda: devcenter.request("POST", "/conn/reset",
                                                 {"agent_id": aid})[0] == 200, 60, 0.1,
                       "the stream to reset")
            wait_until(lambda: agent.log_text(stderr=False).count(line) >= n, 60, 0.1,
                       "reconnection #%d" % (n - 1))
        assert bad.hits >= 3
        rec = heartbeat_of(devcenter, aid, lambda r: r["fields"]["net_mode"] == "private")
        assert "task:transport" not in rec["fields"]["state_detail"]
        assert "task transport" not in agent.log_text()
        assert agent.stop() == 0
    finally:
        bad.close()


def test_no_server_keeps_retrying(tmp_path, start_agent, devcenter):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    a = start_agent("lonely", "--server", "127.0.0.1:%d" % port, *devcenter.cert_args,
                    server=False)
    a.wait_log("no AgentCenter endpoint reachable")
    a.wait_log("dial 127.0.0.1:%d (private) failed" % port)
    assert a.alive
    assert a.stop() == 0


def test_sysvinit_mode_holds_the_pid_lock(devcenter, start_agent, tmp_path):
    pidfile = str(tmp_path / "elkeid-agent.pid")
    env = {"service_type": "sysvinit", "ELKEID_PIDFILE": pidfile}
    first = start_agent("sysv-1", env=env)
    devcenter.wait_agent("sysv-1")
    assert open(pidfile).read().strip() == str(first.pid)
    second = start_agent("sysv-2", env=env)
    wait_until(lambda: not second.alive, 20, what="second agent to give up")
    assert second.proc.returncode == 1
    assert "another elkeid-agent (pid %d) holds" % first.pid in second.log_text()
    assert first.stop() == 0
    assert not os.path.exists(pidfile)


def test_systemd_status_line_follows_the_connection(tmp_path, start_agent):
    """``systemctl status`` shows the last STATUS= the agent sent: it must say
    connected (and to what) once it is, and say so when the stream is gone,
    not keep the "connecting" sent with READY=1."""
    dc = DevCenterProc(tmp_path / "dc")
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    statuses = []

    def next_status(prefix, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "no STATUS=%s... in 30 s: %s" % (prefix, statuses)
            for line in sock.recv(4096).decode().splitlines():
                if line.startswith("STATUS="):
                    statuses.append(line[len("STATUS="):])
                    if statuses[-1].startswith(prefix):
                        return statuses[-1]

    try:
        a = start_agent("status-line", "--server", dc.grpc, *dc.cert_args, server=False,
                        env={"NOTIFY_SOCKET": sock_path, "ELKEID_RECONNECT_DELAY": "0.2"})
        assert next_status("connecting") == "connecting"  # with READY=1
        assert next_status("connected") == "connected to %s (private)" % dc.grpc
        dc.stop()
        assert next_status("disconnected").startswith("disconnected from %s" % dc.grpc)
        assert next_status("no AgentCenter endpoint reachable")
        assert a.stop() == 0
    finally:
        dc.stop()
        sock.close()
