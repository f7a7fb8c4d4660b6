"""PluginSupervisor with real child processes and a real RecordQueue.

Each test runs its own event loop; plugins are the fixture scripts in
tests/plugins_fixtures/ (and the sample plugin in test_plugins_sample.py).
Every test ends by checking that no process it started is left behind.
"""

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from elkeid_agent import wire
from elkeid_agent.errors import ServerFault
from elkeid_agent.osfx.process import ProcessEffects
from elkeid_agent.pb import grpc_pb2
from elkeid_agent.plugins.runner import BACKOFF, FATAL, RUNNING
from elkeid_agent.plugins.syncplan import MAX_NAME_LEN
from plugins_fixtures.harness import (FIXTURES, FileServer, Rig, alive, config, group_alive,
                                      install, script_bytes, sha256, wait_until)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def task(name, data="", token="tok", data_type=9010):
    return grpc_pb2.Task(data_type=data_type, object_name=name, data=data, token=token)


async def started(rig, name, **kw):
    """Wait for the 7000 'started' record of plugin ``name`` (by pid)."""
    await wait_until(lambda: (rig.status(name) or {}).get("pid"), what=name + " pid")
    pid = str(rig.status(name)["pid"])
    return await rig.wait_record(lambda f: f.get("pid") == pid, data_type=7000, **kw)


async def assert_gone(*pids):
    await wait_until(lambda: not any(alive(p) for p in pids), timeout=10,
                     what="processes %r to end" % (pids,))


# ------------------------------------------------------------------ start-up

@pytest.mark.parametrize("use_pidfd", [True, False])
def test_plugin_process_layout(tmp_path, monkeypatch, use_pidfd):
    """fds 3/4/5, /dev/null stdio, stderr file 0600, own group, cwd, env,
    PDEATHSIG - and a graceful stop that still collects the last records."""
    monkeypatch.setenv("ELKEID_TEST_SECRET", "must-not-leak")

    async def main():
        rig = Rig(tmp_path, use_pidfd=use_pidfd)
        assert await rig.deploy("probe", "sdk_probe.py", detail='{"k": "v"}') == []
        info = await started(rig, "probe")
        pid = int(info["pid"])
        pdir = rig.plugin_dir("probe")
        assert int(info["pgid"]) == pid                 # own process group
        assert int(info["ppid"]) == os.getpid()
        assert info["cwd"] == pdir
        fds = json.loads(info["fds"])
        assert fds[:6] == [0, 1, 2, 3, 4, 5] and len(fds) <= 7  # +1: listdir's own fd
        assert info["stdin"] == info["stdout"] == "/dev/null"
        assert info["stderr"] == os.path.join(pdir, "probe.stderr")
        assert stat.S_IMODE(os.stat(info["stderr"]).st_mode) == 0o600
        assert int(info["pdeathsig"]) == signal.SIGKILL
        assert info["high"] == "True"
        env = json.loads(info["env"])
        assert env["DETAIL"] == '{"k": "v"}'
        assert env["ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"] == "1"
        assert env["PATH"] == ProcessEffects.sane_path
        assert "ELKEID_TEST_SECRET" not in env
        assert rig.sup.names() == ["probe"] and rig.status("probe")["state"] == RUNNING
        await rig.sup.shutdown()
        # fd 3 closed first, fd 4 still read: the goodbye record made it.
        await rig.wait_record(lambda f: f.get("pid") == str(pid), data_type=7004)
        assert not alive(pid) and group_alive(pid) == []
        assert rig.state.reasons() == []

    run(main())


def test_sdk_frames_arrive_as_the_same_record_bytes(tmp_path):
    """Byte level: the Record bytes the SDK writes are the bytes in the
    queue, and the protobuf library reads them as the same Record; high
    priority leaves first."""
    from elkeid_agent import sdk
    pb = pytest.importorskip("elkeid_agent.pb.grpc_pb2")
    normal = [[6001, 1700000001, {"a": "1", "unicode": "\u4e2d\u6587 \u2713", "empty": ""}],
              [6002, 0, {}],
              [-5, 1700000003, {"k%d" % i: "v" * i for i in range(30)}]]
    high = [[6003, 1700000004, {"alert": "yes"}]]
    expected_normal = [sdk.Client.encode(dt, f, ts) for dt, ts, f in normal]
    expected_high = [sdk.Client.encode(dt, f, ts) for dt, ts, f in high]
    for (dt, ts, fields), body in zip(normal + high, expected_normal + expected_high):
        assert body == wire.encode_record(dt, ts, fields)
        r = pb.Record()
        r.ParseFromString(body)
        assert (r.data_type, r.timestamp, dict(r.data.fields)) == (dt, ts, fields)

    async def main():
        rig = Rig(tmp_path)
        sha = install(rig.workdir, "probe", "sdk_probe.py")
        detail = json.dumps({"records": normal, "high": high})
        assert await rig.sup.sync([config("probe", sha=sha, detail=detail)]) == []
        await wait_until(lambda: len(rig.queue) >= 5, what="5 records")
        batch = rig.queue.take_batch(100, 1 << 20)
        assert batch[0] == expected_high[0]                     # HIGH first
        assert [b for b in batch if b in expected_normal] == expected_normal
        await rig.sup.shutdown()

    run(main())


# ------------------------------------------------------------------ tasks

def test_tasks_reach_the_plugin_and_bad_routes_are_refused(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.deploy("probe", "sdk_probe.py")
        await started(rig, "probe")
        rig.sup.send_task(task("probe", data='{"x": 1}', token="t-1", data_type=9011))
        echo = await rig.wait_record(lambda f: f["token"] == "t-1", data_type=7003)
        assert echo == {"data_type": "9011", "object_name": "probe", "data": '{"x": 1}',
                        "token": "t-1"}
        with pytest.raises(ServerFault) as info:
            rig.sup.send_task(task("nosuch", token="t-2"))
        assert info.value.token == "t-2" and "no plugin named 'nosuch'" in str(info.value)
        with pytest.raises(ServerFault) as info:
            rig.sup.send_task(task("probe", data="x" * (rig.sup.policy.max_frame + 1),
                                   token="t-3"))
        assert info.value.token == "t-3"
        hb = {wire.decode_record(r)[2]["name"]: wire.decode_record(r)[2]
              for r in rig.sup.heartbeat_records(time.time())}
        assert float(hb["probe"]["rx_tps"]) > 0 and float(hb["probe"]["tx_tps"]) > 0
        assert float(hb["probe"]["rx_speed"]) > 0 and float(hb["probe"]["tx_speed"]) > 0
        assert rig.metrics.get("plugin_tasks_refused", plugin="", reason="no_plugin") == 1
        await rig.sup.shutdown()

    run(main())


def test_plugin_that_never_reads_tasks(tmp_path):
    """The bounded task queue fills and refuses with the task's token; the
    loop is not blocked and another plugin keeps working."""
    async def main():
        rig = Rig(tmp_path, task_queue_max=8)
        deaf = install(rig.workdir, "deaf", "never_reads.py")
        probe = install(rig.workdir, "probe", "sdk_probe.py")
        await rig.sup.sync([config("deaf", sha=deaf), config("probe", sha=probe)])
        await started(rig, "deaf")
        await started(rig, "probe")
        accepted = 0
        with pytest.raises(ServerFault) as info:
            for i in range(1000):
                rig.sup.send_task(task("deaf", data="d" * 16384, token="deaf-%d" % i))
                accepted += 1
        assert info.value.token == "deaf-%d" % accepted
        assert "task queue of plugin deaf is full" in str(info.value)
        # 64 KiB of pipe + one partial frame + 8 queued.
        assert 8 < accepted < 8 + 8
        rig.sup.send_task(task("probe", token="still-ok"))
        await rig.wait_record(lambda f: f["token"] == "still-ok", data_type=7003)
        assert rig.metrics.get("plugin_tasks_refused", plugin="deaf", reason="queue_full") == 1
        await rig.sup.shutdown()
        assert rig.metrics.get("plugin_tasks_dropped", plugin="deaf") == 8

    run(main())


def test_plugin_that_closed_its_task_pipe(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.deploy("closer", "closes_tasks.py")
        await rig.wait_record(lambda f: True, data_type=7000)
        # The transport notices the closed read end by itself.
        await wait_until(lambda: rig.sup._runners["closer"]._task_proto.lost,
                         what="the closed task pipe to be noticed")
        with pytest.raises(ServerFault) as info:
            rig.sup.send_task(task("closer", token="c-0"))
        assert "closed its task pipe" in str(info.value) and info.value.token == "c-0"
        assert rig.metrics.get("plugin_tasks_refused", plugin="closer", reason="pipe_closed") == 1
        assert rig.status("closer")["state"] == RUNNING  # not a reason to restart it
        await rig.sup.shutdown()

    run(main())


# ------------------------------------------------------------------ sync

def test_declarative_sync_keep_replace_remove(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        sha = install(rig.workdir, "probe", "sdk_probe.py")
        await rig.sup.sync([config("probe", "1", sha=sha)])
        first = int((await started(rig, "probe"))["pid"])
        # Same version: nothing happens.
        assert await rig.sup.sync([config("probe", "1", sha=sha)]) == []
        assert rig.status("probe")["pid"] == first
        # Other version: the old one stops (and says goodbye), a new one starts.
        assert await rig.sup.sync([config("probe", "2", sha=sha)]) == []
        await rig.wait_record(lambda f: f["pid"] == str(first), data_type=7004)
        second = int((await started(rig, "probe"))["pid"])
        assert second != first and not alive(first)
        assert rig.metrics.get("plugin_loads", plugin="probe", source="local") == 2
        # Not listed: stopped, forgotten, directory deleted.
        assert await rig.sup.sync([]) == []
        assert rig.sup.names() == [] and not alive(second)
        assert not os.path.exists(rig.plugin_dir("probe"))
        assert not os.path.exists(os.path.join(rig.workdir, "plugin", ".probe.pgid"))
        assert rig.sup.heartbeat_records(time.time()) == []
        await rig.sup.shutdown()

    run(main())


def test_bad_configs_are_refused_visibly_and_good_ones_still_load(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "elkeid_agent.plugins")

    async def main():
        rig = Rig(tmp_path)
        sha = install(rig.workdir, "probe", "sdk_probe.py")
        bad = ["a/b", "..", "", "x" * (MAX_NAME_LEN + 1), "elkeid-agent", "../../etc"]
        failures = await rig.sup.sync([config(n, sha=sha) for n in bad]
                                      + [config("probe", sha=sha)])
        assert [name for name, _ in failures] == bad
        assert all(msg for _, msg in failures)
        reasons = rig.state.reasons()
        assert len(reasons) == len(bad) and all("load plugin" in r for r in reasons)
        assert rig.sup.names() == ["probe"]
        await started(rig, "probe")
        assert not os.path.exists(os.path.join(rig.workdir, "etc"))
        assert sorted(os.listdir(os.path.join(rig.workdir, "plugin"))) == [".probe.pgid",
                                                                           "probe"]
        await rig.sup.shutdown()

    run(main())
    assert sum("refused" in r.getMessage() for r in caplog.records) == 6


def test_download_verify_and_run(tmp_path):
    server = FileServer()
    try:
        async def main():
            rig = Rig(tmp_path)
            exe = script_bytes("sdk_probe.py")
            good = server.add("/probe", exe)
            failures = await rig.sup.sync([config("probe", sha=sha256(exe),
                                                  urls=[server.url("/404"), good])])
            assert failures == []
            await started(rig, "probe")
            assert rig.metrics.get("plugin_loads", plugin="probe", source="download") == 1
            # A plugin whose download is corrupt never gets a file to run.
            bad = server.add("/evil", exe + b"\n# tampered\n")
            failures = await rig.sup.sync([config("probe", sha=sha256(exe), urls=[good]),
                                           config("evil", sha=sha256(exe), urls=[bad])])
            assert failures == [("evil", "every download URL failed: %s: sha256 mismatch: "
                                         "got %s, want %s" % (bad, sha256(exe + b"\n# tampered\n"),
                                                              sha256(exe)))]
            assert not os.path.exists(rig.plugin_dir("evil"))
            assert any(r.startswith("load plugin evil failed: every download URL failed")
                       for r in rig.state.reasons())
            await rig.sup.shutdown()

        run(main())
    finally:
        server.close()


def test_failed_download_of_a_new_version_keeps_the_old_one_running(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.deploy("probe", "sdk_probe.py")
        pid = int((await started(rig, "probe"))["pid"])
        failures = await rig.sup.sync([config("probe", "2", sha="ab" * 32,
                                              urls=["http://127.0.0.1:9/nothing"])])
        assert len(failures) == 1 and "cannot connect" in failures[0][1]
        assert rig.status("probe")["version"] == "1" and rig.status("probe")["pid"] == pid
        assert alive(pid)
        await rig.sup.shutdown()

    run(main())


def test_tar_gz_plugin_from_the_server(tmp_path):
    import io
    import tarfile
    exe = script_bytes("sdk_probe.py")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        info = tarfile.TarInfo("probe")
        info.size = len(exe)
        info.mode = 0o755
        tf.addfile(info, io.BytesIO(exe))
    archive = raw.getvalue()
    server = FileServer()
    try:
        async def main():
            rig = Rig(tmp_path)
            url = server.add("/probe.tgz", archive)
            failures = await rig.sup.sync([config("probe", sha=sha256(archive),
                                                  signature=sha256(exe), urls=[url],
                                                  type_="tar.gz")])
            assert failures == []
            await started(rig, "probe")
            await rig.sup.shutdown()
            # A new agent finds the executable matching the signature: no download.
            rig2 = Rig(tmp_path)
            await rig2.sup.sync([config("probe", sha=sha256(archive), signature=sha256(exe),
                                        urls=[url], type_="tar.gz")])
            assert server.hits == ["/probe.tgz"]
            await started(rig2, "probe")
            await rig2.sup.shutdown()

        run(main())
    finally:
        server.close()


# ------------------------------------------------------------------ misbehaviour

@pytest.mark.parametrize("use_pidfd", [True, False])
def test_crash_loop_backs_off_then_goes_fatal_and_can_be_revived(tmp_path, use_pidfd):
    async def main():
        rig = Rig(tmp_path, use_pidfd=use_pidfd)
        sha = install(rig.workdir, "crash", "exit_at_once.py")
        await rig.sup.sync([config("crash", sha=sha)])
        await wait_until(lambda: rig.status("crash")["state"] == FATAL, what="fatal")
        st = rig.status("crash")
        assert st["restarts"] == 2 and st["failures"] == 3 and st["pid"] == 0
        # The reason carries the last line the plugin wrote to stderr.
        assert st["last_error"] == "exited with code 3: boom: cannot start"
        assert rig.state.reasons() == ["plugin crash is fatal after 3 failed runs: "
                                       "exited with code 3: boom: cannot start"]
        with open(os.path.join(rig.plugin_dir("crash"), "crash.stderr")) as f:
            assert "boom" in f.read()
        hb = wire.decode_record(rig.sup.heartbeat_records(time.time())[0])[2]
        assert hb["state"] == "fatal" and hb["last_error"].startswith("exited with code 3")
        assert "pid" not in hb and hb["restarts"] == "2"
        with pytest.raises(ServerFault, match="is fatal"):
            rig.sup.send_task(task("crash"))
        # The server listing it again (same version) gives it a new chance.
        assert await rig.sup.sync([config("crash", sha=sha)]) == []
        await wait_until(lambda: rig.status("crash")["state"] != FATAL, what="revive")
        await wait_until(lambda: rig.status("crash")["state"] == FATAL, what="fatal again")
        assert rig.status("crash")["restarts"] == 4
        await rig.sup.shutdown()

    run(main())


def test_unstartable_executable(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        directory = rig.plugin_dir("junk")
        os.makedirs(directory)
        data = b"\x00\x01not an executable format"
        with open(os.path.join(directory, "junk"), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(directory, "junk"), 0o700)
        await rig.sup.sync([config("junk", sha=sha256(data))])
        await wait_until(lambda: rig.status("junk")["state"] == FATAL, what="fatal")
        assert rig.status("junk")["last_error"] == (
            "exited with code 127: elkeid-agent: cannot execute %s: Exec format error"
            % os.path.join(directory, "junk"))
        await rig.sup.shutdown()

    run(main())


def test_executable_without_exec_permission(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        sha = install(rig.workdir, "noexec", "sdk_probe.py")
        os.chmod(os.path.join(rig.plugin_dir("noexec"), "noexec"), 0o600)
        await rig.sup.sync([config("noexec", sha=sha)])
        await wait_until(lambda: rig.status("noexec")["state"] == FATAL, what="fatal")
        assert rig.status("noexec")["last_error"].startswith(
            "exited with code 126: elkeid-agent: cannot execute")
        assert "Permission denied" in rig.status("noexec")["last_error"]
        await rig.sup.shutdown()

    run(main())


@pytest.mark.parametrize("fixture,bad,why", [
    ("huge_length.py", 7101, "frame length 4294967295 (0xffffffff) exceeds the maximum"),
    ("bad_body.py", 7111, "is not a Record"),
])
def test_bad_frames_restart_the_plugin_and_nothing_after_them_is_kept(tmp_path, fixture, bad,
                                                                      why):
    async def main():
        rig = Rig(tmp_path)
        await rig.deploy("bad", fixture)
        good = bad - 1
        first = await rig.wait_record(lambda f: True, data_type=good)
        # Restarted: a second run says "before" again with a new pid.
        await rig.wait_record(lambda f: f["pid"] != first["pid"], data_type=good)
        assert rig.decoded(bad) == []
        assert why in rig.status("bad")["last_error"]
        assert rig.metrics.get("plugin_frame_errors", plugin="bad") >= 2
        assert any(why in r for r in rig.state.reasons())
        assert not alive(int(first["pid"]))
        await rig.sup.shutdown()

    run(main())


def test_truncated_frame_then_exit(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.deploy("trunc", "truncated.py")
        first = await rig.wait_record(lambda f: True, data_type=7200)
        await rig.wait_record(lambda f: f["pid"] != first["pid"], data_type=7200)
        # The second run may be between its truncated frame (already noted)
        # and its exit: the reason is whole once the exit is in.
        expected = "exited with code 0; stream ended inside a frame (10 of 100 bytes)"
        await wait_until(lambda: rig.status("trunc")["last_error"] == expected, 30,
                         "the exit and the frame error in last_error")
        assert {wire.decode_record(b)[0] for b in rig.seen} == {7200}
        await rig.sup.shutdown()

    run(main())


def test_flooding_plugin_does_not_starve_the_others(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        rig.ignore.add(7300)
        flood = install(rig.workdir, "flood", "flood.py")
        probe = install(rig.workdir, "probe", "sdk_probe.py")
        drainer = asyncio.ensure_future(rig.keep_draining())
        await rig.sup.sync([config("flood", sha=flood), config("probe", sha=probe)])
        await started(rig, "probe")
        await wait_until(lambda: rig.status("flood")["tx_records"] > 50000, what="flood")
        for i in range(5):
            rig.sup.send_task(task("probe", token="during-flood-%d" % i))
            await rig.wait_record(lambda f: f["token"] == "during-flood-%d" % i,
                                  data_type=7003)
        assert rig.status("flood")["state"] == RUNNING
        await rig.sup.shutdown()
        drainer.cancel()
        assert rig.metrics.get("plugin_records", plugin="flood", priority="normal") > 50000

    run(main())


def test_a_full_queue_makes_ingest_yield_the_loop(tmp_path):
    """Over high water a heavy producer is held (not read, not closed)
    while a light one keeps flowing and nothing of it is evicted."""
    async def main():
        rig = Rig(tmp_path, queue_bytes=4 * 1024 * 1024)
        flood = install(rig.workdir, "flood", "flood.py")
        probe = install(rig.workdir, "probe", "sdk_probe.py")
        await rig.sup.sync([config("flood", sha=flood), config("probe", sha=probe)])
        await started(rig, "probe")
        await wait_until(lambda: rig.metrics.get("plugin_ingest_held", plugin="flood") > 10,
                         what="holds")
        assert len(rig.queue) > 0 and rig.queue.bytes > rig.sup.policy.queue_high_water * (
            4 * 1024 * 1024) - 256 * 1024
        # A slow sender: other plugins still get through.
        rig.ignore.add(7300)
        drainer = asyncio.ensure_future(rig.keep_draining(0.05))
        rig.sup.send_task(task("probe", token="while-full"))
        await rig.wait_record(lambda f: f["token"] == "while-full", data_type=7003)
        assert rig.status("flood")["state"] == RUNNING
        assert rig.metrics.get("plugin_ingest_held", plugin="probe") == 0
        drainer.cancel()
        await rig.sup.shutdown()

    run(main())


def test_ingest_rate_cap_pauses_instead_of_dropping(tmp_path):
    async def main():
        rate = 2 * 1024 * 1024
        rig = Rig(tmp_path, ingest_max_bytes_per_sec=rate)
        sha = install(rig.workdir, "flood", "flood.py")
        t0 = time.monotonic()  # before the bucket exists
        await rig.sup.sync([config("flood", sha=sha)])
        await wait_until(lambda: rig.metrics.get("plugin_ingest_paused", plugin="flood") >= 5,
                         what="pauses")
        elapsed = time.monotonic() - t0
        # The limiter's own bound: a full bucket (one second's worth), the
        # rate over the elapsed time, and one pipe read past the limit.
        one_read = rig.sup.policy.pipe_buffer
        assert rig.status("flood")["tx_bytes"] <= rate + rate * elapsed + one_read
        assert rig.status("flood")["state"] == RUNNING
        assert rig.metrics.total("queue_dropped_records") == 0
        await rig.sup.shutdown()

    run(main())


def test_cpu_limit_restarts_the_plugin(tmp_path):
    async def main():
        rig = Rig(tmp_path, cpu_limit=0.3, limit_window=1.0, sample_interval=0.2)
        await rig.deploy("spin", "spin_cpu.py")
        first = await rig.wait_record(lambda f: True, data_type=7000)
        await rig.wait_record(lambda f: f["pid"] != first["pid"], data_type=7000)
        assert rig.status("spin")["last_error"].startswith("resource limit: cpu ")
        assert rig.metrics.get("plugin_limit_restarts", plugin="spin") >= 1
        assert not alive(int(first["pid"]))
        await rig.sup.shutdown()

    run(main())


def test_rss_limit_restarts_the_plugin(tmp_path):
    async def main():
        rig = Rig(tmp_path, rss_limit=40 * 1024 * 1024, cpu_limit=0, limit_window=0.5,
                  sample_interval=0.1)
        await rig.deploy("hog", "hog_memory.py", detail="80")
        first = await rig.wait_record(lambda f: True, data_type=7000)
        await rig.wait_record(lambda f: f["pid"] != first["pid"], data_type=7000)
        assert rig.status("hog")["last_error"].startswith("resource limit: rss ")
        await rig.sup.shutdown()

    run(main())


def test_plugin_ignoring_sigterm_and_closed_pipes_is_killed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "elkeid_agent.plugins")

    async def main():
        rig = Rig(tmp_path, stop_timeout=1.0)
        await rig.deploy("stubborn", "ignore_term.py")
        pid = int((await rig.wait_record(lambda f: True, data_type=7000))["pid"])
        assert await rig.sup.sync([]) == []
        assert not alive(pid) and group_alive(pid) == []
        await rig.sup.shutdown()

    run(main())
    assert any("did not exit within" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("use_pidfd", [True, False])
def test_grandchildren_die_with_their_plugin(tmp_path, use_pidfd):
    async def main():
        rig = Rig(tmp_path, use_pidfd=use_pidfd)
        await rig.deploy("gc", "grandchild.py")
        info = await rig.wait_record(lambda f: True, data_type=7000)
        pid, child = int(info["pid"]), int(info["grandchild"])
        assert alive(child)
        await rig.sup.sync([])  # the leader exits on fd 3 EOF; its child ignores SIGTERM
        await assert_gone(pid, child)
        assert group_alive(pid) == []
        await rig.sup.shutdown()

    run(main())


def test_plugin_exiting_while_its_grandchild_holds_the_pipe(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.deploy("gc", "grandchild.py", detail="exit")
        first = await rig.wait_record(lambda f: True, data_type=7000)
        second = await rig.wait_record(lambda f: f["pid"] != first["pid"], data_type=7000)
        await assert_gone(int(first["pid"]), int(first["grandchild"]))
        await rig.sup.shutdown()
        await assert_gone(int(second["pid"]), int(second["grandchild"]))

    run(main())


def test_no_orphans_when_the_agent_is_killed(tmp_path):
    """SIGKILL the agent: PR_SET_PDEATHSIG takes the plugin down at once; its
    grandchild lives on in the plugin's process group until the next agent
    starts and sweeps the recorded group."""
    workdir = str(tmp_path)
    driver = subprocess.Popen([sys.executable, os.path.join(FIXTURES, "agent_driver.py"),
                               workdir], stdout=subprocess.PIPE)
    try:
        line = driver.stdout.readline()
        info = json.loads(line)
        pid, child = int(info["pid"]), int(info["grandchild"])
        assert alive(pid) and alive(child)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)

        async def main():
            await assert_gone(pid)
            assert alive(child)
            rig = Rig(workdir)
            await rig.sup.start()
            await assert_gone(child)
            assert rig.metrics.total("plugin_leftovers_killed") == 1
            assert not os.path.exists(os.path.join(workdir, "plugin", ".gc.pgid"))
            await rig.sup.shutdown()

        run(main())
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()
        for p in ("pid", "child"):
            if p in locals() and alive(locals()[p]):
                os.kill(locals()[p], signal.SIGKILL)


def test_sweep_spares_processes_outside_the_plugin_dirs(tmp_path):
    """A recorded group whose id was reused by a stranger: not killed."""
    stranger = subprocess.Popen(["sleep", "60"], cwd="/", start_new_session=True)
    try:
        effects = ProcessEffects()
        rootdir = os.path.join(str(tmp_path), "plugin")
        os.makedirs(rootdir)
        ticks = effects.start_ticks(stranger.pid)
        with open(os.path.join(rootdir, ".ghost.pgid"), "w") as f:
            f.write("%s %d %d\n" % (effects.boot_id(), stranger.pid, ticks))

        async def main():
            rig = Rig(tmp_path)
            await rig.sup.start()
            assert rig.metrics.total("plugin_leftovers_killed") == 0
            await rig.sup.shutdown()

        run(main())
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_stderr_is_kept_bounded(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "elkeid_agent.plugins")

    async def main():
        rig = Rig(tmp_path, stderr_max_bytes=200 * 1024, du_interval=0.2, sample_interval=0.1)
        await rig.deploy("chatty", "chatty_stderr.py")
        await rig.wait_record(lambda f: True, data_type=7000)
        path = os.path.join(rig.plugin_dir("chatty"), "chatty.stderr")
        await wait_until(lambda: sum("was truncated" in r.getMessage()
                                     for r in caplog.records) >= 3, what="truncations")
        await wait_until(lambda: os.path.getsize(path) > 0, what="writes after a truncation")
        st = os.stat(path)
        # O_APPEND: the plugin goes on writing at the new end, not at its old
        # offset (which would leave a growing sparse file).
        assert st.st_size <= st.st_blocks * 512 + 64 * 1024
        assert st.st_size < 2 * 1024 * 1024
        assert rig.status("chatty")["state"] == RUNNING
        hb = wire.decode_record(rig.sup.heartbeat_records(time.time())[0])[2]
        assert int(hb["du"]) > 0
        await rig.sup.shutdown()

    run(main())


# ------------------------------------------------------------------ heartbeat, shutdown

def test_heartbeat_records(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        probe = install(rig.workdir, "probe", "sdk_probe.py")
        crash = install(rig.workdir, "crash", "exit_at_once.py")
        await rig.sup.sync([config("probe", "3.1", sha=probe), config("crash", sha=crash)])
        info = await started(rig, "probe")
        await wait_until(lambda: rig.status("crash")["state"] in (BACKOFF, FATAL),
                         what="crash to fail")
        now = time.time()
        recs = [wire.decode_record(r) for r in rig.sup.heartbeat_records(now)]
        assert [r[0] for r in recs] == [1001, 1001] and all(r[1] == int(now) for r in recs)
        crash_hb, probe_hb = recs[0][2], recs[1][2]
        protocol = {"name", "pversion", "cpu", "rss", "read_speed", "write_speed", "pid", "nfd",
                    "start_time", "du", "rx_tps", "tx_tps", "rx_speed", "tx_speed"}
        assert protocol <= set(probe_hb)
        assert probe_hb["name"] == "probe" and probe_hb["pversion"] == "3.1"
        assert probe_hb["pid"] == info["pid"] and probe_hb["state"] == "running"
        assert int(probe_hb["rss"]) > 0 and int(probe_hb["nfd"]) > 0
        assert abs(int(probe_hb["start_time"]) - now) < 120
        for key in ("cpu", "rx_tps", "tx_tps", "rx_speed", "tx_speed"):
            assert len(probe_hb[key].split(".")[1]) == 8  # "%.8f"
        assert crash_hb["state"] in ("backoff", "fatal") and "pid" not in crash_hb
        assert crash_hb["last_error"] == "exited with code 3: boom: cannot start"
        await rig.sup.shutdown()

    run(main())


def test_shutdown_stops_everything_and_refuses_later_syncs(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        shas = {n: install(rig.workdir, n, f) for n, f in
                (("a", "sdk_probe.py"), ("b", "never_reads.py"), ("c", "grandchild.py"),
                 ("d", "exit_at_once.py"))}
        await rig.sup.sync([config(n, sha=s) for n, s in sorted(shas.items())])
        a = int((await started(rig, "a"))["pid"])
        b = int((await started(rig, "b"))["pid"])
        c = await started(rig, "c")
        await rig.sup.shutdown()
        await assert_gone(a, b, int(c["pid"]), int(c["grandchild"]))
        assert rig.sup.names() == []
        assert await rig.sup.sync([config("a", sha=shas["a"])]) == [
            ("a", "the agent is shutting down")]
        with pytest.raises(ServerFault):
            rig.sup.send_task(task("a"))

    run(main())


def test_removing_a_plugin_in_backoff_or_fatal(tmp_path):
    async def main():
        rig = Rig(tmp_path, backoff=(30.0,), max_failures=5)
        await rig.deploy("crash", "exit_at_once.py")
        await wait_until(lambda: rig.status("crash")["state"] == BACKOFF, what="backoff")
        assert rig.state.reasons()
        await rig.sup.sync([])
        assert rig.sup.names() == [] and rig.state.reasons() == []
        await rig.sup.shutdown()

    run(main())


def test_spawning_next_to_a_busy_grpc_stream(tmp_path):
    """gRPC's fork handlers abort a fork()ed child now and then while a
    stream is busy; plugins are spawned without fork() so none is lost."""
    grpc = pytest.importorskip("grpc")

    async def main():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")

        async def echo(requests, context):
            async for r in requests:
                yield r

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.T", {"E": grpc.stream_stream_rpc_method_handler(echo)}),))
        await server.start()

        rounds = [0]

        async def traffic():
            async with grpc.aio.insecure_channel("127.0.0.1:%d" % port) as ch:
                call = ch.stream_stream("/t.T/E")()
                while True:
                    await call.write(b"x" * 1000)
                    await call.read()
                    rounds[0] += 1

        busy = asyncio.ensure_future(traffic())
        await wait_until(lambda: rounds[0] > 10, what="a busy stream")
        effects = ProcessEffects()
        codes = []
        try:
            for _ in range(100):
                r, w = os.pipe()
                err = os.open(os.devnull, os.O_WRONLY)
                child = effects.spawn("/bin/true", cwd="/", env={}, stderr_fd=err,
                                      fd_map={3: r, 4: w})
                for fd in (r, w, err):
                    os.close(fd)
                seen = rounds[0]  # let the stream run between spawns
                await wait_until(lambda: rounds[0] > seen, what="stream traffic")
                await asyncio.get_running_loop().run_in_executor(None, effects.reap, child)
                codes.append(child.returncode)
        finally:
            busy.cancel()
            await server.stop(0)
        assert codes == [0] * 100

    run(main())
