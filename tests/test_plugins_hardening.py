"""PluginSupervisor under failure: bad HTTP answers, superseded syncs,
processes that outlive SIGKILL, spawn errors, a failed start-up sweep.

Real child processes, real pipes, real loopback HTTP servers; the only seams
are the ones the supervisor has (``system=`` process effects, the event loop).
"""

import asyncio
import logging
import os
import threading

import pytest

from elkeid_agent.osfx.process import ProcessEffects
from elkeid_agent.plugins.policy import RestartPolicy
from elkeid_agent.plugins.runner import FATAL
from elkeid_agent.runtime import lifecycle
from plugins_fixtures.harness import (FileServer, Rig, alive, bad_status_line, config,
                                      install, script_bytes, sha256, truncated_chunks,
                                      wait_until)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()



def pid_gone(pid):
    """Reaped: no /proc entry at all (a zombie still has one)."""
    return not os.path.exists("/proc/%d" % pid)


# ------------------------------------------------------------------ defect 2

def test_bad_http_answers_fail_one_plugin_and_never_its_siblings(tmp_path, server):
    """BadStatusLine and IncompleteRead from every URL of one plugin: that
    plugin is reported, the sync returns, the other plugin is loaded."""
    exe = script_bytes("sdk_probe.py")
    bad = [server.add("/status", bad_status_line), server.add("/chunks", truncated_chunks)]
    good = server.add("/probe", exe)

    async def main():
        rig = Rig(tmp_path)
        failures = await rig.sup.sync([config("broken", sha=sha256(exe), urls=bad),
                                       config("probe", sha=sha256(exe), urls=[good])])
        assert [name for name, _ in failures] == ["broken"]
        why = failures[0][1]
        assert "BadStatusLine" in why and "IncompleteRead" in why
        await wait_until(lambda: (rig.status("probe") or {}).get("pid"), what="probe running")
        assert rig.sup.names() == ["probe"]
        assert any("load plugin broken failed" in r for r in rig.state.reasons())
        await rig.sup.shutdown()

    run(main())


def test_a_load_failure_is_forgotten_when_a_list_no_longer_asks_for_it(tmp_path, server):
    exe = script_bytes("sdk_probe.py")

    async def main():
        rig = Rig(tmp_path)
        url = server.add("/missing-on-purpose", b"", status=404)
        assert await rig.sup.sync([config("gone", sha=sha256(exe), urls=[url])]) != []
        assert rig.sup.state_reasons().keys() == {"gone"}
        assert await rig.sup.sync([]) == []
        assert rig.sup.state_reasons() == {} and rig.state.reasons() == []
        await rig.sup.shutdown()

    run(main())


# ------------------------------------------------------------------ defect 4

class Stall:
    """A download route that answers only when released."""

    def __init__(self, server, path):
        self.release = threading.Event()
        self.url = server.add(path, self._serve)

    def _serve(self, handler):
        self.release.wait(120)
        handler.send_response(404)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def test_a_newer_list_supersedes_a_download_in_progress(tmp_path, server):
    exe = script_bytes("sdk_probe.py")
    stall = Stall(server, "/stalled")

    async def main():
        rig = Rig(tmp_path, download_timeout=150.0)
        sha = install(rig.workdir, "probe", "sdk_probe.py")
        first = asyncio.ensure_future(
            rig.sup.sync([config("slow", sha=sha256(exe), urls=[stall.url])]))
        await wait_until(lambda: "/stalled" in server.hits, what="download to start")
        # The newer list is served while the old download still hangs.
        # Well inside the 60 s socket timeout the old code waited out.
        assert await asyncio.wait_for(rig.sup.sync([config("probe", sha=sha)]), 30) == []
        assert await asyncio.wait_for(first, 60) == []
        assert rig.sup.names() == ["probe"]
        assert rig.metrics.get("plugin_loads_superseded", plugin="slow") == 1
        stall.release.set()
        await rig.sup.shutdown()
        assert rig.sup.names() == []

    try:
        run(main())
    finally:
        stall.release.set()


def test_shutdown_does_not_wait_for_a_hanging_download(tmp_path, server):
    exe = script_bytes("sdk_probe.py")
    stall = Stall(server, "/stalled")

    async def main():
        rig = Rig(tmp_path, download_timeout=150.0)
        sync = asyncio.ensure_future(
            rig.sup.sync([config("slow", sha=sha256(exe), urls=[stall.url])]))
        await wait_until(lambda: "/stalled" in server.hits, what="download to start")
        # Well inside the 60 s socket timeout the old code waited out.
        await asyncio.wait_for(rig.sup.shutdown(), 30)
        await asyncio.wait_for(sync, 60)
        assert rig.sup.names() == []

    try:
        run(main())
    finally:
        stall.release.set()


class NeverSeesExits(ProcessEffects):
    """Process effects whose exit watch never fires: what a plugin stuck in
    uninterruptible sleep looks like to the agent after SIGKILL."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spawned = []

    def spawn(self, *args, **kw):
        child = super().spawn(*args, **kw)
        self.spawned.append(child.pid)
        return child

    def watch_exit(self, loop, pid, callback):
        return _DeafWatch()


class _DeafWatch:
    def cancel(self):
        pass


def test_a_process_that_outlives_sigkill_is_reported_and_not_waited_for(tmp_path, caplog):
    effects = NeverSeesExits()
    caplog.set_level(logging.INFO, logger="elkeid_agent.plugins")

    async def main():
        rig = Rig(tmp_path, system=effects)
        assert await rig.deploy("stuck", "sdk_probe.py") == []
        await wait_until(lambda: (rig.status("stuck") or {}).get("pid"), what="stuck running")
        pid = rig.status("stuck")["pid"]
        assert await asyncio.wait_for(rig.sup.sync([]), 90) == []
        assert rig.sup.names() == []
        assert rig.metrics.get("plugin_unkillable", plugin="stuck") == 1
        assert any("did not exit after SIGKILL" in r for r in rig.state.reasons())
        assert "plugin stuck did not exit after SIGKILL (D state?): pid %d" % pid in caplog.text
        await rig.sup.shutdown()
        return pid

    pid = run(main())
    os.waitpid(pid, 0)  # the exit the seam hid


# ------------------------------------------------------------------ defect 8

def test_a_failed_pipe_connection_reaps_the_child_and_the_plugin_restarts(tmp_path,
                                                                         monkeypatch):
    """connect_read_pipe fails for fd 5 of the first run: that child is
    killed and reaped (no zombie), its pgid record is gone, the pipe already
    connected is closed through its transport, and the next run works."""
    failed = {}

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.connect_read_pipe
        calls = []
        transports = []

        async def flaky(factory, pipe):
            calls.append(pipe)
            if len(calls) == 2:
                failed["pid"] = factory().runner.pid
                failed["files"] = list(calls)
                raise OSError(24, "Too many open files (injected)")
            transport, proto = await real(factory, pipe)
            transports.append(transport)
            return transport, proto

        monkeypatch.setattr(loop, "connect_read_pipe", flaky)
        rig = Rig(tmp_path)
        assert await rig.deploy("probe", "sdk_probe.py") == []
        second = await rig.wait_record(lambda f: int(f["pid"]) != failed.get("pid"),
                                       data_type=7000)
        pid = failed["pid"]
        await wait_until(lambda: pid_gone(pid), timeout=30, what="failed child to be reaped")
        pgid_file = os.path.join(rig.workdir, "plugin", ".probe.pgid")
        with open(pgid_file) as f:
            assert f.read().split()[1] == second["pid"]   # the new run's, not the old one's
        assert all(f.closed for f in failed["files"])
        assert transports[0].is_closing()
        assert "Too many open files (injected)" in rig.status("probe")["last_error"]
        await rig.sup.shutdown()
        assert not os.path.exists(pgid_file)

    run(main())


def test_an_internal_error_in_supervision_reaps_the_child(tmp_path, monkeypatch):
    real = RestartPolicy.on_start
    seen = []

    def broken_once(self, now):
        if not seen:
            seen.append(now)
            raise RuntimeError("injected bug")
        return real(self, now)

    monkeypatch.setattr(RestartPolicy, "on_start", broken_once)

    async def main():
        rig = Rig(tmp_path)
        effects = rig.sup.system
        spawned = []
        spawn = effects.spawn

        def recording_spawn(*a, **kw):
            child = spawn(*a, **kw)
            spawned.append(child.pid)
            return child

        effects.spawn = recording_spawn
        assert await rig.deploy("probe", "sdk_probe.py") == []
        await wait_until(lambda: rig.status("probe")["state"] == FATAL, what="fatal")
        assert "injected bug" in rig.status("probe")["last_error"]
        await wait_until(lambda: pid_gone(spawned[0]), timeout=30, what="child reaped")
        assert not os.path.exists(os.path.join(rig.workdir, "plugin", ".probe.pgid"))
        await rig.sup.shutdown()

    run(main())


# ------------------------------------------------------------------ defect 9

class SweepFailsOnce(ProcessEffects):
    """The first read of the boot id (the start-up sweep's) fails."""

    calls = 0

    def boot_id(self):
        self.calls += 1
        if self.calls == 1:
            raise PermissionError(13, "injected: /proc unreadable")
        return super().boot_id()


def test_a_failed_sweep_still_starts_the_monitor(tmp_path):
    async def main():
        rig = Rig(tmp_path, system=SweepFailsOnce(), cpu_limit=0.3, limit_window=1.0)
        try:
            await rig.sup.start()   # as the app does at start-up
        except OSError:
            pass                    # the app logs it and carries on
        assert any("cannot sweep leftover plugin processes" in r for r in rig.state.reasons())
        assert await rig.deploy("spin", "spin_cpu.py") == []
        first = await rig.wait_record(lambda f: True, data_type=7000)
        # Only the monitor enforces the CPU limit.
        await rig.wait_record(lambda f: f["pid"] != first["pid"], data_type=7000, timeout=60)
        assert rig.status("spin")["last_error"].startswith("resource limit: cpu ")
        assert rig.metrics.get("plugin_sweep_failures") == 1
        # The sync tried the sweep again, and it worked this time.
        assert not any("sweep" in r for r in rig.state.reasons())
        await rig.sup.shutdown()
        assert not alive(int(first["pid"]))

    run(main())


# ------------------------------------------------------------------ lifecycle

def test_the_runner_moves_through_the_lifecycle_table(tmp_path):
    """A crash loop into failed, a revive, a stop: every step recorded, in
    the order the table describes."""
    L = lifecycle

    async def main():
        rig = Rig(tmp_path)
        sha = install(rig.workdir, "crash", "exit_at_once.py")
        await rig.sup.sync([config("crash", sha=sha)])
        await wait_until(lambda: rig.status("crash")["state"] == FATAL, what="fatal")
        runner = rig.sup._runners["crash"]
        run_ = [L.STARTING, L.RUNNING, L.STOPPING, L.EXITED]
        expected = run_ + [L.BACKOFF] + run_ + [L.BACKOFF] + run_ + [L.FAILED]
        assert [to for _old, to, _why in runner.life.history] == expected
        assert rig.metrics.get("plugin_transitions", plugin="crash", to=L.FAILED) == 1
        assert rig.metrics.get("plugin_transitions", plugin="crash", to=L.STARTING) == 3
        reasons = [why for _old, to, why in runner.life.history if to == L.EXITED]
        assert reasons[0] == "exited with code 3: boom: cannot start"
        await rig.sup.sync([])
        assert [to for _o, to, _w in runner.life.history][-1] == L.STOPPED
        await rig.sup.shutdown()

    run(main())


def test_a_burst_of_downloads_uses_every_download_thread(tmp_path):
    """Jobs submitted faster than an idle worker wakes still get their own
    threads (else one blocked download would hold up all the others)."""
    from elkeid_agent.runtime.executors import Executors

    async def main():
        ex = Executors(kinds={"download": (4, 64)})
        await ex.run("download", lambda: None)   # one idle worker now exists
        release = threading.Event()
        started = []

        def blocked(i):
            started.append(i)
            release.wait(60)

        jobs = [asyncio.ensure_future(ex.run("download", blocked, i)) for i in range(8)]
        try:
            await wait_until(lambda: len(started) >= 4, timeout=30, what="4 jobs running")
        finally:
            release.set()
        await asyncio.gather(*jobs)
        ex.close()

    run(main())
