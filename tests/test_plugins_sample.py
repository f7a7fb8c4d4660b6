"""The sample plugin (docs/protocol.md section 9.4): build, config, heartbeat, HTTP API, tasks,
load mode, signals, logs - run as a real plugin under the supervisor."""

import asyncio
import glob
import hashlib
import io
import json
import os
import signal
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile

import pytest

from elkeid_agent import wire
from elkeid_agent.pb import grpc_pb2
from elkeid_devtools.sample_plugin import (DEFAULTS, HEARTBEAT, TASK_ECHO, TASK_HEARTBEAT,
    TASK_RELOAD, TASK_RESULT, TASK_SET_LOAD, ConfigError, LoadTemplate, load_config, validate)
from elkeid_devtools.sample_plugin import build
from plugins_fixtures.harness import FileServer, Rig, alive, config, wait_until

PY39 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3")))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def task(data_type, data="", token="tok"):
    return grpc_pb2.Task(data_type=data_type, object_name="sample", data=data, token=token)


async def http(method, port, path):
    def call():
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
    return await asyncio.get_running_loop().run_in_executor(None, call)


async def deploy(rig, cfg=None, detail="", interpreter=sys.executable):
    sha = build.install(rig.workdir, "sample", interpreter, cfg)
    assert await rig.sup.sync([config("sample", sha=sha, detail=detail)]) == []
    return await rig.wait_record(lambda f: f["status"] == "starting", data_type=HEARTBEAT)


# ------------------------------------------------------------------ pure parts

def test_config_layers_and_validation(tmp_path):
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        json.dump({"agent_id": "from-file", "load": {"record_size": 300}}, f)
    cfg = load_config(path, '{"heartbeat_interval": 2, "load": {"records_per_sec": 10}}')
    assert cfg["agent_id"] == "from-file" and cfg["heartbeat_interval"] == 2.0
    assert cfg["load"] == {"records_per_sec": 10.0, "record_size": 300,
                           "data_type": DEFAULTS["load"]["data_type"], "high_priority": False,
                           "flush_log": ""}
    assert load_config(str(tmp_path / "absent.json"), "")["http_port"] == 8081
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.json"), "", required=True)
    for bad, why in (({"http_host": "0.0.0.0"}, "not a loopback"),
                     ({"http_host": "example.com"}, "not an IP"),
                     ({"http_port": 70000}, "0..65535"),
                     ({"heartbeat_interval": 0}, "> 0"),
                     ({"load": {"records_per_sec": -2}}, "-1"),
                     ({"load": {"record_size": 10}}, "64..1048576"),
                     ({"load": {"bogus": 1}}, "unknown load"),
                     ({"colour": "red"}, "unknown config"),
                     ({"log_level": "loud"}, "log_level")):
        cfg = dict(DEFAULTS)
        cfg.update(bad)
        if "load" in bad:
            cfg["load"] = dict(DEFAULTS["load"], **bad["load"])
        with pytest.raises(ConfigError, match=why):
            validate(cfg)
    with pytest.raises(ConfigError, match="DETAIL is not JSON"):
        load_config(None, "{nope")
    assert validate(dict(DEFAULTS, http_host="::1"))["http_host"] == "::1"
    assert validate(dict(DEFAULTS, http_host="localhost"))


@pytest.mark.parametrize("size", [64, 100, 200, 1000, 70000])
def test_load_records_have_the_requested_size(size):
    t = LoadTemplate(9002, size, 1700000000)
    body = t.body(123)
    assert len(body) == size == t.size
    dt, ts, fields = wire.decode_record(body)
    assert (dt, ts, fields["seq"]) == (9002, 1700000000, "000000000123")


def test_build_is_reproducible_and_minimal(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert build.build_exe(a, "/usr/bin/python3") == build.build_exe(b, "/usr/bin/python3")
    with open(a, "rb") as f:
        data = f.read()
    assert data.startswith(b"#!/usr/bin/python3\n")
    assert os.stat(a).st_mode & 0o777 == 0o700
    names = zipfile.ZipFile(a).namelist()
    assert sorted(names) == ["__main__.py", "elkeid_agent/__init__.py",
                             "elkeid_agent/errors.py", "elkeid_agent/native.py",
                             "elkeid_agent/sdk/__init__.py", "elkeid_agent/wire.py",
                             "elkeid_devtools/__init__.py",
                             "elkeid_devtools/sample_plugin/__init__.py"]
    archive, signature = build.tar_gz_bytes("sample", "/usr/bin/python3", {"agent_id": "x"})
    assert (archive, signature) == build.tar_gz_bytes("sample", "/usr/bin/python3",
                                                      {"agent_id": "x"})
    assert signature == hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        assert [(m.name, m.mode) for m in tf] == [("sample", 0o700), ("config.json", 0o600)]


def test_build_cli_prints_a_server_config(tmp_path, capsys):
    out = str(tmp_path / "sample.tgz")
    assert build.main(["tar-gz", out, "--name", "sample", "--version", "2.0",
                       "--url", "http://127.0.0.1:1/sample.tgz"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    with open(out, "rb") as f:
        assert cfg["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert cfg["type"] == "tar.gz" and cfg["version"] == "2.0" and cfg["name"] == "sample"
    assert cfg["download_url"] == ["http://127.0.0.1:1/sample.tgz"]


# ------------------------------------------------------------------ as a plugin

def test_heartbeat_http_api_and_reload(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        first = await deploy(rig, {"agent_id": "seed-004", "heartbeat_interval": 0.3},
                             detail='{"http_port": 0}')
        assert first["agent_id"] == "seed-004" and first["version"] == "1.0.0"
        port = int(first["http_port"])
        assert port > 0
        running = await rig.wait_record(lambda f: f["status"] == "running", data_type=HEARTBEAT)
        for key in ("agent_id", "pid", "status", "cpu", "memory", "timestamp"):
            assert running[key]
        assert running["timestamp"].endswith("Z") and int(running["memory"]) > 0

        code, health = await http("GET", port, "/health")
        assert code == 200 and health["status"] == "healthy" and health["agent_id"] == "seed-004"
        code, metrics = await http("GET", port, "/metrics")
        assert code == 200 and metrics["heartbeat_count"] >= 2
        assert metrics["status"] == "running" and metrics["memory_bytes"] > 0
        code, body = await http("GET", port, "/nope")
        assert code == 404

        path = os.path.join(rig.plugin_dir("sample"), "config.json")
        with open(path, "w") as f:
            json.dump({"agent_id": "renamed", "heartbeat_interval": 0.3}, f)
        code, body = await http("POST", port, "/reload")
        assert code == 200 and body["success"] is True and "reloaded_at" in body
        await rig.wait_record(lambda f: f["agent_id"] == "renamed", data_type=HEARTBEAT)
        with open(path, "w") as f:
            f.write("{broken")
        code, body = await http("POST", port, "/reload")
        assert code == 400 and body["success"] is False and "cannot read config" in body["message"]
        code, health = await http("GET", port, "/health")
        assert health["agent_id"] == "renamed"  # the old config stays
        await rig.sup.shutdown()

    run(main())


def test_tasks_load_mode_and_remote_logs(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await deploy(rig, {"heartbeat_interval": 60, "http_port": 0})
        rig.sup.send_task(task(TASK_ECHO, "ping", "t-echo"))
        echo = await rig.wait_record(lambda f: f["token"] == "t-echo", data_type=TASK_RESULT)
        assert echo["status"] == "succeed" and echo["data"] == "ping"
        rig.sup.send_task(task(TASK_HEARTBEAT, token="t-hb"))
        await rig.wait_record(lambda f: f["token"] == "t-hb", data_type=TASK_RESULT)
        assert len(rig.decoded(HEARTBEAT)) == 2
        rig.sup.send_task(task(TASK_SET_LOAD, '{"records_per_sec": 2000, "record_size": 300}',
                               "t-load"))
        await rig.wait_record(lambda f: f["token"] == "t-load" and f["status"] == "succeed",
                              data_type=TASK_RESULT)
        await wait_until(lambda: len([b for b in rig.drain() or rig.seen
                                      if len(b) == 300]) >= 500, what="load records")
        loads = [b for b in rig.seen if wire.decode_record(b, deep=False)[0] == 9002]
        assert {len(b) for b in loads} == {300}
        seqs = [int(wire.decode_record(b)[2]["seq"]) for b in loads]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, none lost
        rig.sup.send_task(task(TASK_SET_LOAD, '{"records_per_sec": 0}', "t-stop"))
        await rig.wait_record(lambda f: f["token"] == "t-stop", data_type=TASK_RESULT)
        rig.sup.send_task(task(TASK_SET_LOAD, '{"record_size": 1}', "t-bad"))
        bad = await rig.wait_record(lambda f: f["token"] == "t-bad", data_type=TASK_RESULT)
        assert bad["status"] == "failed" and "record_size" in bad["msg"]
        rig.sup.send_task(task(4242, token="t-unknown"))
        await rig.wait_record(lambda f: f["token"] == "t-unknown" and f["status"] == "failed",
                              data_type=TASK_RESULT)
        # The failures were logged at warning: they arrive as 1011 records.
        log = await rig.wait_record(lambda f: "unknown task type 4242" in f["msg"],
                                    data_type=1011)
        assert log["level"] == "warn" and log["token"] == "t-unknown"
        rig.sup.send_task(task(TASK_RELOAD, token="t-reload"))
        await rig.wait_record(lambda f: f["token"] == "t-reload" and f["status"] == "succeed",
                              data_type=TASK_RESULT)
        await rig.sup.shutdown()
        # JSON log lines on stderr.
        with open(os.path.join(rig.plugin_dir("sample"), "sample.stderr")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        assert lines[0]["msg"] == "started" and lines[0]["level"] == "info"
        assert any(line["msg"] == "stopping" for line in lines)
        assert all({"ts", "level", "msg", "source"} <= set(line) for line in lines)

    run(main())


def test_sigterm_is_a_graceful_exit(tmp_path):
    async def main():
        rig = Rig(tmp_path, backoff=(30.0,))
        first = await deploy(rig, {"heartbeat_interval": 60, "http_port": 0})
        pid = int(first["pid"])
        os.kill(pid, signal.SIGTERM)
        stopping = await rig.wait_record(lambda f: f["status"] == "stopping",
                                         data_type=HEARTBEAT)
        assert stopping["pid"] == str(pid)
        await wait_until(lambda: rig.status("sample")["last_error"]
                         == "exited with code 0: stopping", what="clean exit")
        assert not alive(pid)
        await rig.sup.shutdown()

    run(main())


def test_bad_config_file_crash_loops_into_fatal(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.sup.start()
        sha = build.install(rig.workdir, "sample", sys.executable, {"http_host": "0.0.0.0"})
        await rig.sup.sync([config("sample", sha=sha)])
        await wait_until(lambda: rig.status("sample")["state"] == "fatal", what="fatal")
        assert rig.status("sample")["last_error"].startswith(
            "exited with code 2: bad configuration: http_host '0.0.0.0' is not a loopback")
        with open(os.path.join(rig.plugin_dir("sample"), "sample.stderr")) as f:
            err = json.loads(f.readline())
        assert err["level"] == "error" and "not a loopback address" in err["msg"]
        await rig.sup.shutdown()

    run(main())


def test_deployed_as_tar_gz_from_a_server(tmp_path):
    archive, signature = build.tar_gz_bytes("sample", sys.executable,
                                            {"agent_id": "from-archive", "http_port": 0})
    server = FileServer()
    try:
        async def main():
            rig = Rig(tmp_path)
            url = server.add("/sample.tgz", archive)
            cfg = build.plugin_config("sample", "1.0.0", archive, signature, [url])
            pb = grpc_pb2.Config(name=cfg["name"], type=cfg["type"], version=cfg["version"],
                                 sha256=cfg["sha256"], signature=cfg["signature"],
                                 download_urls=cfg["download_url"])
            assert await rig.sup.sync([pb]) == []
            hb = await rig.wait_record(lambda f: True, data_type=HEARTBEAT)
            assert hb["agent_id"] == "from-archive"
            await rig.sup.shutdown()

        run(main())
    finally:
        server.close()


@pytest.mark.skipif(not PY39, reason="no CPython 3.9 under ~/.pyenv")
def test_sample_plugin_runs_on_python_3_9(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        first = await deploy(rig, {"heartbeat_interval": 60, "http_port": 0},
                             interpreter=PY39[-1])
        rig.sup.send_task(task(TASK_ECHO, "39", "t-39"))
        await rig.wait_record(lambda f: f["token"] == "t-39", data_type=TASK_RESULT)
        code, health = await http("GET", int(first["http_port"]), "/health")
        assert code == 200
        await rig.sup.shutdown()

    run(main())


def test_the_example_config_is_valid():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "sample_plugin", "config.json")
    cfg = load_config(path, "", required=True)
    assert cfg["agent_id"] == "sample-plugin" and cfg["load"]["records_per_sec"] == 0
