"""Plugins through the real agent and the development AgentCenter.

The agent runs as a process (``python -m elkeid_agent run``) connected over
mutual TLS to the devcenter, which stores every record in SQLite. Plugins are
deployed the way a real server deploys them: a configs list through the
HTTP command API, downloaded from a loopback HTTP server, verified, started.
What the tests check is what the server stored.
"""

import base64
import io
import json
import os
import signal
import socket
import sys
import tarfile
import threading

import pytest

from elkeid_agent import wire
from elkeid_devtools.launchers import wait_until
from elkeid_devtools.sample_plugin import HEARTBEAT, TASK_ECHO, TASK_RESULT, build
from plugins_fixtures.harness import FileServer, alive, script_bytes, sha256


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


def tgz(name, exe):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(exe)
        info.mode = 0o755
        tf.addfile(info, io.BytesIO(exe))
    return raw.getvalue()


def plugin_config(server, name, fixture=None, exe=None, version="1", detail=""):
    exe = exe if exe is not None else script_bytes(fixture)
    archive = tgz(name, exe)
    url = server.add("/%s-%s.tgz" % (name, version), archive)
    return {"name": name, "type": "tar.gz", "version": version, "sha256": sha256(archive),
            "signature": sha256(exe), "download_url": [url], "detail": detail}


def send(devcenter, agent_id, configs):
    status, body = devcenter.command(agent_id, {"config": configs})
    assert status == 200, body


def raw(rec):
    return base64.b64decode(rec["raw"])


def pid_of(devcenter, agent_id, name):
    rec = devcenter.wait_records(
        1001, lambda r: r["fields"].get("name") == name and r["fields"].get("pid"),
        agent_id=agent_id)[-1]
    return int(rec["fields"]["pid"])


def test_sdk_records_reach_the_server_byte_for_byte(devcenter, start_agent, server):
    agent = start_agent("e2e-bytes")
    devcenter.wait_agent("e2e-bytes")
    normal = [[6101, 1700000001, {"a": "1", "unicode": "\u4e2d\u6587", "empty": ""}],
              [6102, 0, {}],
              [6103, 1700000003, {"k%d" % i: "v" * i for i in range(40)}]]
    high = [[6104, 1700000004, {"alert": "yes"}]]
    detail = json.dumps({"records": normal, "high": high})
    send(devcenter, "e2e-bytes", [plugin_config(server, "probe", "sdk_probe.py",
                                                detail=detail)])
    for dt, ts, fields in normal + high:
        rec = devcenter.wait_records(dt, agent_id="e2e-bytes")[0]
        assert raw(rec) == wire.encode_record(dt, ts, fields)   # the SDK's exact bytes
        assert rec["fields"] == fields and rec["timestamp"] == ts
    # A task through the command API reaches the plugin and comes back.
    devcenter.command("e2e-bytes", {"task": {"data_type": 9010, "name": "probe",
                                             "data": "ping", "token": "e2e-t1"}})
    echo = devcenter.wait_records(7003, lambda r: r["fields"]["token"] == "e2e-t1",
                                  agent_id="e2e-bytes")[0]
    assert echo["fields"]["data"] == "ping"
    # The plugin heartbeat (1001) carries the process figures.
    hb = devcenter.wait_records(1001, lambda r: r["fields"].get("name") == "probe"
                                and r["fields"].get("pid"), agent_id="e2e-bytes")[-1]
    assert hb["fields"]["state"] == "running" and int(hb["fields"]["rss"]) > 0
    pid = int(hb["fields"]["pid"])
    assert alive(pid)
    assert agent.stop() == 0
    # Graceful agent stop: the plugin got fd 3 closed and said goodbye.
    devcenter.wait_records(7004, agent_id="e2e-bytes")
    assert not alive(pid)


def test_misbehaving_plugin_under_the_real_agent(devcenter, start_agent, server):
    start_agent("e2e-bad")
    devcenter.wait_agent("e2e-bad")
    send(devcenter, "e2e-bad", [plugin_config(server, "bad", "huge_length.py"),
                                plugin_config(server, "probe", "sdk_probe.py")])
    devcenter.wait_records(7100, count=2, agent_id="e2e-bad")   # restarted at least once
    devcenter.wait_records(7000, agent_id="e2e-bad")            # the other one runs
    abnormal = devcenter.wait_records(
        1000, lambda r: "exceeds the maximum" in r["fields"].get("state_detail", ""),
        agent_id="e2e-bad")[-1]
    assert abnormal["fields"]["state"] == "abnormal"
    hb = devcenter.wait_records(1001, lambda r: r["fields"].get("name") == "bad"
                                and "exceeds" in r["fields"].get("last_error", ""),
                                agent_id="e2e-bad")[-1]
    assert int(hb["fields"]["restarts"]) >= 1
    assert devcenter.records(7101, agent_id="e2e-bad") == []    # nothing after the bad point


def test_sample_plugin_deployed_updated_and_removed(devcenter, start_agent, server):
    agent = start_agent("e2e-sample")
    devcenter.wait_agent("e2e-sample")
    archive, signature = build.tar_gz_bytes("sample", sys.executable,
                                            {"agent_id": "demo", "http_port": 0,
                                             "heartbeat_interval": 0.5})
    url = server.add("/sample.tgz", archive)
    cfg = build.plugin_config("sample", "1.0.0", archive, signature, [url])
    send(devcenter, "e2e-sample", [cfg])
    hb = devcenter.wait_records(HEARTBEAT, lambda r: r["fields"]["agent_id"] == "demo",
                                agent_id="e2e-sample")[0]
    assert hb["fields"]["version"] == "1.0.0"
    devcenter.command("e2e-sample", {"task": {"data_type": TASK_ECHO, "name": "sample",
                                              "data": "hi", "token": "e2e-echo"}})
    devcenter.wait_records(TASK_RESULT, lambda r: r["fields"]["token"] == "e2e-echo",
                           agent_id="e2e-sample")
    first = pid_of(devcenter, "e2e-sample", "sample")
    # A new version with a load mode set through DETAIL replaces the old one.
    cfg2 = dict(cfg, version="1.0.1",
                detail=json.dumps({"load": {"records_per_sec": 200, "record_size": 256}}))
    send(devcenter, "e2e-sample", [cfg2])
    loads = devcenter.wait_records(9002, count=50, agent_id="e2e-sample")
    assert {len(raw(r)) for r in loads} == {256}
    wait_until(lambda: not alive(first), what="old version to stop")
    hb = devcenter.wait_records(1001, lambda r: r["fields"].get("pversion") == "1.0.1"
                                and r["fields"].get("pid"), agent_id="e2e-sample")[-1]
    second = int(hb["fields"]["pid"])
    assert second != first
    # Not listed any more: stopped and deleted.
    send(devcenter, "e2e-sample", [])
    wait_until(lambda: not alive(second), what="plugin to stop")
    wait_until(lambda: not os.path.exists(os.path.join(agent.workdir, "plugin", "sample")),
               what="plugin dir to go")
    assert server.hits.count("/sample.tgz") == 1  # 1.0.1 had the same executable


def test_a_killed_agent_leaves_no_plugin_behind(devcenter, start_agent, server):
    agent = start_agent("e2e-kill")
    devcenter.wait_agent("e2e-kill")
    send(devcenter, "e2e-kill", [plugin_config(server, "gc", "grandchild.py")])
    info = devcenter.wait_records(7000, agent_id="e2e-kill")[0]["fields"]
    pid, child = int(info["pid"]), int(info["grandchild"])
    try:
        agent.signal(signal.SIGKILL)
        agent.proc.wait(10)
        wait_until(lambda: not alive(pid), what="plugin to die with the agent")
        # The grandchild is swept by the next agent on the same workdir.
        again = start_agent("e2e-kill", workdir=agent.workdir)
        wait_until(lambda: not alive(child), what="leftover grandchild to be killed")
        again.stop()
    finally:
        for p in (pid, child):
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_supervision_settings_from_the_environment_reach_the_plugins(devcenter, start_agent,
                                                                      server):
    # Two failures in a row are fatal here (default 10), with no delay between.
    start_agent("e2e-policy", env={"ELKEID_PLUGIN_MAX_FAILURES": "2",
                                   "ELKEID_PLUGIN_BACKOFF": "0"})
    devcenter.wait_agent("e2e-policy")
    send(devcenter, "e2e-policy", [plugin_config(server, "crash", "exit_at_once.py")])
    hb = devcenter.wait_records(1001, lambda r: r["fields"].get("name") == "crash"
                                and r["fields"].get("state") == "fatal",
                                agent_id="e2e-policy")[-1]
    assert int(hb["fields"]["restarts"]) == 1


# ------------------------------------------------------------------ local faults, stalls

def test_a_configs_list_does_not_erase_a_local_fault(devcenter, start_agent, server, tmp_path):
    """An unwritable log directory is the host's problem: the heartbeats
    after a configs list still report it (Elkeid's reset would erase it)."""
    workdir = tmp_path / "agent-e2e-localfault"
    workdir.mkdir()
    (workdir / "log").write_text("a file where the log directory should be\n")
    start_agent("e2e-localfault", workdir=workdir)
    devcenter.wait_agent("e2e-localfault")
    before = devcenter.wait_records(
        1000, lambda r: r["fields"].get("state") == "abnormal", agent_id="e2e-localfault")[-1]
    faults = json.loads(before["fields"]["state_detail"])
    assert any(str(workdir / "log") in f for f in faults)
    send(devcenter, "e2e-localfault", [plugin_config(server, "probe", "sdk_probe.py")])
    listed = devcenter.wait_records(1001, lambda r: r["fields"].get("name") == "probe",
                                    agent_id="e2e-localfault")[0]
    after = devcenter.wait_records(1000, lambda r: r["id"] > listed["id"],
                                   agent_id="e2e-localfault")[0]
    assert after["fields"]["state"] == "abnormal"
    assert set(faults) <= set(json.loads(after["fields"]["state_detail"]))


class Blackhole:
    """A loopback listener that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def test_hanging_downloads_stall_neither_restarts_nor_reconnects(devcenter, start_agent, server):
    """40 plugins whose URL accepts and never answers (more than any default
    executor has threads): meanwhile a crashing plugin keeps being restarted
    and a stream the server closes is redialled through service discovery."""
    hole = Blackhole()
    host, port = devcenter.grpc.rsplit(":", 1)
    sd = json.dumps({"code": 0, "msg": "ok", "data": [
        {"ip": host, "port": int(port), "weight": 1}]}).encode()
    sd_path = "/registry/detail?name=hids_svr_grpc&count=10"
    server.add(sd_path, sd)
    try:
        start_agent("e2e-stall", "--service-discovery", "127.0.0.1:%d" % server.port,
                    *devcenter.cert_args, server=False,
                    env={"ELKEID_PLUGIN_BACKOFF": "0.3", "ELKEID_PLUGIN_MAX_FAILURES": "100000"})
        devcenter.wait_agent("e2e-stall")
        crash = plugin_config(server, "crash", "exit_at_once.py")
        send(devcenter, "e2e-stall", [crash])

        def restarts():
            recs = devcenter.records(1001, agent_id="e2e-stall")
            counts = [int(r["fields"]["restarts"]) for r in recs
                      if r["fields"].get("name") == "crash"]
            return max(counts) if counts else -1

        wait_until(lambda: restarts() >= 1, timeout=60, what="crash plugin restarting")
        stalled = [dict(plugin_config(server, "hang%02d" % i, "sdk_probe.py"),
                        download_url=["http://127.0.0.1:%d/p%d.tgz" % (hole.port, i)])
                   for i in range(40)]
        send(devcenter, "e2e-stall", [crash] + stalled)
        wait_until(lambda: len(hole.held) >= 4, timeout=60, what="downloads to hang")
        seen = restarts()
        wait_until(lambda: restarts() >= seen + 5, timeout=45,
                   what="restarts while the downloads hang")
        # Cut the stream: the agent asks service discovery again and redials.
        lookups = server.hits.count(sd_path)
        status, body = devcenter.request("POST", "/conn/reset", {"agent_id": "e2e-stall"})
        assert status == 200, body
        marker = devcenter.records(1000, agent_id="e2e-stall")[-1]["id"]
        wait_until(lambda: server.hits.count(sd_path) > lookups, timeout=45,
                   what="a new service-discovery lookup")
        devcenter.wait_records(1000, lambda r: r["id"] > marker, agent_id="e2e-stall",
                               timeout=45)
    finally:
        hole.close()
