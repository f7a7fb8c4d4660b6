"""The services supervisor with real processes (tests/services_fixtures/svc.py),
real unix sockets and a real services file; the OS seam is the real one."""

import asyncio
import json
import os
import signal
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from services_fixtures.rig import SVC, Rig, service, wait_for, write_services  # noqa: E402

from elkeid_agent.services import adoption  # noqa: E402
from elkeid_devtools.launchers import processes_mentioning  # noqa: E402
from elkeid_agent.services.runner import DAEMONIZED  # noqa: E402


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def beating(tmp_path, sid, *extra, **fields):
    sock = os.path.join(str(tmp_path), sid + ".sock")
    hc = dict({"heartbeat_timeout": "1.5s"}, **fields.pop("health_check", {}))
    return service(sid, "--socket", sock, "--id", sid, *extra, socket_path=sock,
                   health_check=hc, **fields)


# ------------------------------------------------------------------ exits and policies

@pytest.mark.parametrize("policy,code,restarted", [
    ("always", 0, True), ("always", 3, True),
    ("on-failure", 3, True), ("on-failure", 0, False),
    ("never", 3, False)])
def test_exit_restarts_by_policy(tmp_path, policy, code, restarted):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("s", "--exit-after", "0.3", "--exit-code", str(code),
                                restart={"policy": policy})])
        try:
            if restarted:
                await rig.wait("s", lambda s: s["restarts"] >= 2, what="two restarts")
                assert rig.get("s")["last_exit"] == ("exited with code %d" % code)
            else:
                st = await rig.wait("s", lambda s: s["state"] == "exited", what="exited")
                assert st["restarts"] == 0 and st["pid"] == 0
                assert st["last_exit"] == "exited with code %d" % code
                # Parked: started again only on request.
                ok, _ = await rig.sup.start("s")
                await rig.wait("s", lambda s: s["state"] in ("running", "exited")
                               and len([c for c in rig.changes if c["state"] == "starting"])
                               >= 2, what="started again")
        finally:
            await rig.close()
    run(main())


def test_sigkill_restarts_at_once_and_max_retries_fail(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("s"), service("crash", "--exit-after", "0", "--exit-code", "4",
                                             restart={"max_retries": 3})])
        try:
            first = (await rig.running("s"))["pid"]
            os.kill(first, signal.SIGKILL)
            st = await rig.wait("s", lambda s: s["state"] == "running" and s["pid"] != first)
            assert st["restarts"] == 1 and "SIGKILL" in st["last_exit"]
            st = await rig.wait("crash", lambda s: s["state"] == "failed", what="failed")
            assert st["restarts"] == 2  # 3 failed runs in a row
            assert any("crash" in r and "given up" in r for r in rig.state.reasons())
            assert rig.metrics.get("services_failed", service="crash") == 1
            # A failed service is revived by start.
            ok, msg = await rig.sup.restart("crash")
            await rig.wait("crash", lambda s: s["restarts"] >= 3)
        finally:
            await rig.close()
    run(main())


def test_healthy_reset_forgives_failures(tmp_path):
    async def main():
        rig = Rig(tmp_path, healthy_reset=0.5)
        await rig.boot([service("slow", "--exit-after", "1", "--exit-code", "1",
                                restart={"max_retries": 2})])
        try:
            # Every run lasts longer than healthy_reset: never two failures in a row.
            st = await rig.wait("slow", lambda s: s["restarts"] >= 3, timeout=60)
            assert st["state"] != "failed"
        finally:
            await rig.close()
    run(main())


# ------------------------------------------------------------------ health checks

@pytest.mark.parametrize("policy", ["always", "on-failure"])
def test_missing_heartbeat_restarts(tmp_path, policy):
    async def main():
        rig = Rig(tmp_path)
        sock = os.path.join(str(tmp_path), "quiet.sock")
        await rig.boot([service("quiet", socket_path=sock, restart={"policy": policy},
                                health_check={"heartbeat_timeout": "0.5s"})])
        try:
            st = await rig.wait("quiet", lambda s: s["restarts"] >= 1)
            assert "no_heartbeat" in st["last_error"]
            assert rig.metrics.get("service_health_restarts", service="quiet",
                                   check="no_heartbeat") >= 1
        finally:
            await rig.close()
    run(main())


def test_never_policy_leaves_unhealthy_service_running(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        sock = os.path.join(str(tmp_path), "quiet.sock")
        await rig.boot([service("quiet", socket_path=sock, restart={"policy": "never"},
                                health_check={"heartbeat_timeout": "0.3s"})])
        try:
            pid = (await rig.running("quiet"))["pid"]
            st = await rig.wait("quiet", lambda s: s["health"] == "no_heartbeat")
            assert st["pid"] == pid and st["state"] == "running" and st["restarts"] == 0
        finally:
            await rig.close()
    run(main())


def test_heartbeats_plain_rpc_and_from_a_descendant(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([beating(tmp_path, "plain"), beating(tmp_path, "rpc", "--rpc"),
                        beating(tmp_path, "child", "--pid", "child")])
        try:
            for sid in ("plain", "rpc", "child"):
                st = await rig.wait(sid, lambda s: s["heartbeats"] >= 3 and
                                    s["health"] == "healthy")
                assert st["heartbeats_refused"] == 0, st
            # The JSON-RPC answer, as the service sees it.
            r, w = await asyncio.open_unix_connection(os.path.join(str(tmp_path), "rpc.sock"))
            w.write(b'{"jsonrpc":"2.0","method":"heartbeat","id":7,"params":'
                    b'{"agent_id":"rpc","pid":1,"status":"running",'
                    b'"timestamp":"2025-12-05T10:00:00Z"}}\n')
            reply = json.loads(await r.readline())
            w.close()
            assert reply["id"] == 7 and "not service rpc" in reply["error"]["message"]
        finally:
            await rig.close()
    run(main())


def test_heartbeat_with_another_pid_is_refused_and_restarts(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([beating(tmp_path, "liar", "--pid", "init",
                                health_check={"heartbeat_timeout": "0.8s"})])
        try:
            st = await rig.wait("liar", lambda s: s["restarts"] >= 1)
            assert st["heartbeats"] == 0 and st["heartbeats_refused"] >= 1
            assert rig.metrics.get("service_heartbeats_refused", service="liar",
                                   reason="wrong_pid") >= 1
        finally:
            await rig.close()
    run(main())


def test_flooding_socket_is_bounded_and_others_keep_beating(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([beating(tmp_path, "flood", "--flood",
                                health_check={"heartbeat_timeout": "1s"}),
                        beating(tmp_path, "good")])
        try:
            await rig.wait("flood", lambda s: s["restarts"] >= 1, timeout=60)
            assert rig.metrics.get("service_heartbeat_lines_dropped", service="flood") >= 1
            assert rig.metrics.get("service_heartbeats_refused", service="flood",
                                   reason="not_json") >= 1
            good = rig.get("good")
            assert good["health"] == "healthy" and good["restarts"] == 0
            before = good["heartbeats"]
            await rig.wait("good", lambda s: s["heartbeats"] > before + 2)
        finally:
            await rig.close()
    run(main())


def test_http_probe_to_a_silent_endpoint_restarts(tmp_path):
    async def main():
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # accepts (the kernel does) and never answers
        url = "http://127.0.0.1:%d/metrics" % silent.getsockname()[1]
        rig = Rig(tmp_path)
        await rig.boot([service("web", health_check={"http_endpoint": url,
                                                     "http_timeout": "0.3s"})])
        try:
            st = await rig.wait("web", lambda s: s["restarts"] >= 1, timeout=60)
            assert "http_failed" in st["last_error"]
        finally:
            await rig.close()
            silent.close()
    run(main())


def test_memory_over_threshold_restarts(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("hog", "--hog-mb", "64", health_check={
            "memory_threshold": "32MiB", "threshold_duration": "0.5s"})])
        try:
            st = await rig.wait("hog", lambda s: s["restarts"] >= 1, timeout=60)
            assert "over_limit" in st["last_error"] and "rss" in st["last_error"]
        finally:
            await rig.close()
    run(main())


# ------------------------------------------------------------------ misbehaving processes

def test_ignoring_sigterm_is_killed_after_stop_timeout(tmp_path):
    async def main():
        rig = Rig(tmp_path, stop_timeout=1.0)
        pidfile = os.path.join(str(tmp_path), "stubborn.pid")
        await rig.boot([service("stubborn", "--ignore-term", "--pidfile", pidfile)])
        try:
            pid = (await rig.running("stubborn"))["pid"]
            await wait_for(lambda: os.path.exists(pidfile), what="handler installed")
            ok, msg = await rig.sup.stop("stubborn")
            assert ok, msg
            assert gone(pid)
            assert rig.metrics.get("service_kills", service="stubborn") >= 1
            assert "SIGKILL" in rig.get("stubborn")["last_exit"]
        finally:
            await rig.close()
    run(main())


def test_daemonizing_service_is_reported_and_its_leftovers_stopped(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        pidfile = os.path.join(str(tmp_path), "d.pid")
        await rig.boot([service("d", "--daemonize", "--pidfile", pidfile,
                                restart={"max_retries": 1})])
        try:
            st = await rig.wait("d", lambda s: s["state"] == "failed", timeout=60)
            assert st["last_error"] == DAEMONIZED
            assert rig.metrics.get("service_daemonized", service="d") >= 1
            # The supervisor may stop the daemon before it wrote its pid
            # file: look for it by its command line, which names the file.
            await wait_for(lambda: not processes_mentioning(pidfile),
                           what="the daemonized process stopped")
        finally:
            await rig.close()
            if os.path.exists(pidfile):  # never leave a daemon behind a failed test
                with open(pidfile) as f:
                    try:
                        os.kill(int(f.read()), signal.SIGKILL)
                    except OSError:
                        pass
    run(main())


def test_a_crash_in_one_runner_is_contained(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("a"), service("b")])
        try:
            a = (await rig.running("a"))["pid"]
            b = (await rig.running("b"))["pid"]
            runner = rig.sup._runners["a"]
            real = runner._check
            calls = []

            async def broken():
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("bug")
                return await real()
            runner._check = broken
            await wait_for(lambda: rig.metrics.get("tasks_crashed", task="service:a"))
            await wait_for(lambda: len(calls) >= 3, what="checks resumed")
            assert rig.get("a")["pid"] == a and rig.get("a")["state"] == "running"
            assert rig.get("b")["pid"] == b
        finally:
            await rig.close()
    run(main())


# ------------------------------------------------------------------ reload

def test_reload_restarts_only_changed_entries(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        entries = [service("keep"), service("change"), service("drop")]
        await rig.boot(entries)
        try:
            pids = {sid: (await rig.running(sid))["pid"] for sid in ("keep", "change", "drop")}
            write_services(rig.file, [service("keep"), service("change", "--ignore-term"),
                                      service("new")])
            ok, problems = await rig.sup.reload()
            assert ok and problems == []
            assert rig.get("keep")["pid"] == pids["keep"]
            new_change = (await rig.running("change"))["pid"]
            assert new_change != pids["change"]
            await rig.running("new")
            assert rig.get("drop") is None and gone(pids["drop"]) and gone(pids["change"])
            # An invalid file changes nothing.
            with open(rig.file, "w") as f:
                f.write('{"agents": [{"id": "keep"}]}')
            ok, problems = await rig.sup.reload()
            assert not ok and problems and problems[0].startswith("D1002")
            assert "services" in rig.state.keys()
            assert rig.get("keep")["pid"] == pids["keep"]
            assert rig.get("change")["pid"] == new_change
            write_services(rig.file, [service("keep"), service("change", "--ignore-term"),
                                      service("new")])
            ok, _ = await rig.sup.reload()
            assert ok and "services" not in rig.state.keys()
            assert rig.get("keep")["pid"] == pids["keep"]
        finally:
            await rig.close()
    run(main())


def test_missing_files(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        ok, problems = await rig.boot()  # explicit, never written
        assert not ok and problems[0].startswith("D1001")
        assert "services" in rig.state.keys()
        await rig.close()
        rig = Rig(tmp_path)
        rig.owner = None
        from elkeid_agent.runtime.executors import Executors
        from elkeid_agent.runtime.tasks import TaskOwner
        from elkeid_agent.services.supervisor import ServiceSupervisor
        owner, ex = TaskOwner(rig.metrics, rig.state), Executors()
        sup = ServiceSupervisor(str(tmp_path), rig.metrics, rig.state, owner, ex)
        ok, problems = await sup.boot()  # the default file, absent: no services
        assert ok and problems == [] and sup.status() == [] and rig.state.keys() == []
        await sup.shutdown()
        await owner.close()
        ex.close()
    run(main())


# ------------------------------------------------------------------ adoption

def test_adoption_across_supervisors(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("same"), service("changed"), service("removed"),
                        service("reused")])
        pids = {sid: (await rig.running(sid))["pid"]
                for sid in ("same", "changed", "removed", "reused")}
        await rig.close(kill=False)
        # A record whose pid now names another process: never signalled.
        path = adoption.path_in(str(tmp_path))
        records = adoption.load(path)
        r = records["reused"]
        records["reused"] = adoption.Record(r.pid, r.start_time + 1, r.config_hash, r.unit,
                                            r.token, r.started_at)
        adoption.save(path, records)
        write_services(rig.file, [service("same"), service("changed", "--ignore-term"),
                                  service("reused")])
        rig2 = Rig(tmp_path)
        await rig2.boot()
        try:
            st = await rig2.running("same")
            assert st["pid"] == pids["same"] and st["adopted"]
            assert (await rig2.running("changed"))["pid"] != pids["changed"]
            assert gone(pids["changed"]) and gone(pids["removed"])
            assert not gone(pids["reused"])  # forgotten, not signalled
            assert (await rig2.running("reused"))["pid"] != pids["reused"]
            assert rig2.metrics.get("services_adopted", service="same") == 1
            # The adopted process is watched although it is not our child.
            os.kill(pids["same"], signal.SIGKILL)
            await rig2.wait("same", lambda s: s["pid"] not in (0, pids["same"]) and
                            s["state"] == "running")
        finally:
            await rig2.close()
            os.killpg(pids["reused"], signal.SIGKILL)
    run(main())


def test_bad_state_file_is_reported_not_fatal(tmp_path):
    async def main():
        path = adoption.path_in(str(tmp_path))
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write('{"services": {"x": {"pid": "1"}}}')
        rig = Rig(tmp_path)
        await rig.boot([service("s")])
        try:
            await rig.running("s")
            assert rig.metrics.get("services_state_errors", reason="unreadable") == 1
            # Rewritten with what runs now.
            assert list(adoption.load(path)) == ["s"]
        finally:
            await rig.close()
    run(main())


def test_output_files_and_rotation(tmp_path):
    from elkeid_agent.services.supervisor import rotate

    async def main():
        rig = Rig(tmp_path)
        wd = os.path.join(str(tmp_path), "wd")
        await rig.boot([service("out", "--exit-after", "0", "--exit-code", "2", work_dir=wd,
                                restart={"policy": "never"})])
        try:
            await rig.wait("out", lambda s: s["state"] == "exited")
            with open(os.path.join(wd, "stdout.log")) as f:
                assert "started" in f.read()
            with open(os.path.join(wd, "stderr.log")) as f:
                assert "exiting with 2" in f.read()
            assert rig.get("out")["last_error"].endswith("svc exiting with 2")
        finally:
            await rig.close()
    run(main())
    path = os.path.join(str(tmp_path), "wd", "stdout.log")
    with open(path, "ab") as f:
        f.write(b"x" * 2000)
    assert rotate(path, 1000, 2) and os.path.getsize(path) == 0
    assert os.path.getsize(path + ".1") > 2000
    with open(path, "ab") as f:
        f.write(b"y" * 2000)
    assert rotate(path, 1000, 2) and os.path.exists(path + ".2")
    assert not rotate(path, 1000, 2)


def test_the_sample_service_is_healthy_under_supervision(tmp_path):
    """The test agent (``python -m elkeid_devtools.sample_plugin service``) with
    JSON-RPC heartbeats on its socket and its /health as the HTTP probe."""
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    http_port = port.getsockname()[1]
    port.close()
    sock = os.path.join(str(tmp_path), "sample.sock")
    cfg = os.path.join(str(tmp_path), "sample.json")
    with open(cfg, "w") as f:
        json.dump({"agent_id": "sample", "heartbeat_interval": "0.3s", "http_port": http_port,
                   "socket_path": sock, "socket_protocol": "jsonrpc"}, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    async def main():
        rig = Rig(tmp_path)
        await rig.boot([{
            "id": "sample", "type": "custom", "binary_path": sys.executable,
            "args": ["-m", "elkeid_devtools.sample_plugin", "service", "--config", cfg],
            "socket_path": sock, "env": {"PYTHONPATH": root},
            "health_check": {"interval": "0.3s", "heartbeat_timeout": "3s",
                             "http_endpoint": "http://127.0.0.1:%d/health" % http_port,
                             "http_timeout": "2s"}}])
        try:
            st = await rig.wait("sample", lambda s: s["health"] == "healthy" and
                                s["heartbeats"] >= 3, timeout=60)
            assert st["checks"]["http"] == "ok" and st["heartbeats_refused"] == 0
            ok, _ = await rig.sup.stop("sample")
            assert ok and "exited with code 0" in rig.get("sample")["last_exit"]
        finally:
            await rig.close()
    run(main())


def test_control_requests(tmp_path):
    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("s")])
        try:
            first = (await rig.running("s"))["pid"]
            ok, msg = await rig.sup.stop("s")
            assert ok and rig.get("s")["state"] == "stopped" and gone(first)
            # restart of a stopped service starts it (and says so promptly).
            ok, msg = await rig.sup.restart("s")
            assert ok, msg
            second = rig.get("s")["pid"]
            ok, msg = await rig.sup.restart("s")
            assert ok and rig.get("s")["pid"] not in (0, second)
            ok, msg = await rig.sup.start("s")
            assert ok
            assert await rig.sup.stop("nope") == (False, "unknown service 'nope'")
            states = [c["state"] for c in rig.changes if c["id"] == "s"]
            assert states[:4] == ["starting", "running", "stopping", "exited"]
            assert states.count("running") == 3
        finally:
            await rig.close()
    run(main())


def test_restart_of_a_service_in_backoff_answers_with_the_new_run(tmp_path):
    """A service waiting out a backoff is already in an end state: the
    answer must come from the run the restart starts, not the old state."""
    flag = tmp_path / "fail"
    flag.write_text("")
    binary = tmp_path / "flaky"
    binary.write_text("#!%s\nimport os, sys\nif os.path.exists(%r):\n    sys.exit(1)\n"
                      "os.execv(%r, [%r, %r])\n" % (sys.executable, str(flag), sys.executable,
                                                   sys.executable, SVC))
    binary.chmod(0o755)

    async def main():
        rig = Rig(tmp_path)
        await rig.boot([service("s", binary_path=str(binary), args=[],
                                restart={"backoff_base": "30s", "backoff_max": "30s"})])
        try:
            await rig.wait("s", lambda s: s["state"] == "backoff" and s["restarts"] >= 1,
                           what="a 30 s backoff")
            flag.unlink()
            ok, msg = await rig.sup.restart("s")
            assert ok, msg
            st = rig.get("s")
            assert st["state"] == "running" and st["pid"]
        finally:
            await rig.close()
    run(main())
