"""The real OS-effects seam of elkeidctl (elkeid_agent/osfx/service.py),
against this machine: files under a re-based root, /proc, signals, the
pid-file lock shared with the agent, and spawning into cgroup.procs files.
"""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from elkeid_agent.osfx import ProcessIdentity, proc_start_ticks
from elkeid_agent.osfx.service import ServiceEffects, parse_stat, proc_stat_fields, stat_state
from elkeid_agent.runtime.pidlock import PidLock
from harness import wait_until


@pytest.fixture
def fx(tmp_path):
    return ServiceEffects(root=str(tmp_path))


def wait_for(predicate, timeout=60):
    wait_until(predicate, timeout, 0.02)


def test_paths_are_rebased_under_root(fx, tmp_path):
    assert fx.host("/etc/elkeid/specified_env") == str(tmp_path / "etc/elkeid/specified_env")
    assert ServiceEffects().host("/etc/elkeid") == "/etc/elkeid"


def test_write_file_is_atomic_with_mode_and_leaves_no_temp(fx, tmp_path):
    fx.makedirs("/etc/cron.d", 0o755)
    fx.write_file("/etc/cron.d/elkeid-agent", b"one\n", 0o600)
    fx.write_file("/etc/cron.d/elkeid-agent", b"two\n", 0o600)
    path = tmp_path / "etc/cron.d/elkeid-agent"
    assert path.read_bytes() == b"two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(str(tmp_path / "etc/cron.d")) == ["elkeid-agent"]
    assert fx.read_text("/etc/cron.d/elkeid-agent") == "two\n"
    assert fx.read_text("/etc/cron.d/missing") is None


def test_write_file_does_not_follow_a_planted_temp_symlink(fx, tmp_path):
    fx.makedirs("/etc/cron.d", 0o755)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(str(victim), str(tmp_path / ("etc/cron.d/elkeid-agent.tmp.%d" % os.getpid())))
    with pytest.raises(OSError):
        fx.write_file("/etc/cron.d/elkeid-agent", b"x", 0o600)
    assert victim.read_text() == "keep"


def test_remove_rmdir_rmtree_and_copy(fx, tmp_path):
    fx.makedirs("/a/b", 0o700)
    fx.write_file("/a/b/f", b"data", 0o640)
    fx.copy("/a/b/f", "/a/g", 0o755)
    assert (tmp_path / "a/g").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "a/g").stat().st_mode) == 0o755
    assert fx.remove("/a/g") is True and fx.remove("/a/g") is False
    with pytest.raises(OSError):
        fx.rmdir("/a/b")  # not empty
    assert fx.rmtree("/a") is True and not fx.exists("/a")
    assert fx.rmdir("/nothing") is False


def test_parse_stat_with_hostile_command_names():
    raw = (b"1234 (evil) 5 6 (x) S 77 1234 1234 0 -1 4194304"
           b" 0 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10")
    assert parse_stat(raw) == (1234, 77, 1234, 987654)
    assert parse_stat(raw[:40]) == (1234, 77, 1234, None)  # cut short: no start time
    assert stat_state(raw) == "S"
    assert proc_stat_fields(raw)[:3] == ["S", "77", "1234"]
    assert parse_stat(b"garbage") is None
    assert stat_state(b"") is None


def test_processes_and_links_of_this_machine(fx):
    real = ServiceEffects()
    procs = real.processes()
    me = procs[os.getpid()]
    assert me.ppid == os.getppid() and me.pgid == os.getpgrp()
    assert real.proc_link(os.getpid(), "cwd") == os.getcwd()
    assert real.alive(os.getpid()) and not real.alive(0)


def test_a_zombie_is_not_alive():
    real = ServiceEffects()
    child = subprocess.Popen(["true"])
    wait_for(lambda: stat_state(real.read_bytes_quietly("/proc/%d/stat" % child.pid)) == "Z")
    assert real.alive(child.pid) is False
    child.wait()
    assert real.alive(child.pid) is False


def test_kill_reports_a_missing_process():
    real = ServiceEffects()
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert real.kill(-child.pid, signal.SIGTERM) is True  # its own process group
    child.wait(10)
    assert real.kill(child.pid, signal.SIGTERM) is False


def test_run_captures_and_reports_missing_tools(fx):
    r = fx.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert r.rc == 3 and "out" in r.output and "err" in r.output
    r = fx.run(["/nonexistent/tool"])
    assert r.rc == 127 and "command not found" in r.output
    assert fx.which("sh") is None  # tools are looked up under the root too
    assert ServiceEffects().which("sh") in ("/usr/local/bin/sh", "/usr/bin/sh", "/bin/sh")


def test_spawn_detaches_and_joins_cgroups_before_exec(fx, tmp_path):
    procs_file = tmp_path / "cgroup.procs"
    procs_file.write_text("")
    out = tmp_path / "out"
    child = fx.spawn([sys.executable, "-c",
                      "import os; open(%r, 'w').write('%%d %%d' %% (os.getsid(0), os.getpid()))"
                      % str(out)],
                     cwd="/", env={"PATH": "/usr/bin:/bin"}, cgroup_procs=["/cgroup.procs"])
    wait_for(lambda: child.poll() is not None)
    assert child.poll() == 0
    sid, pid = map(int, out.read_text().split())
    assert sid == pid == child.pid  # a session of its own
    assert procs_file.read_text() == str(child.pid)  # written by the child itself


def test_pid_file_lock_is_the_agents(fx, tmp_path):
    fx.makedirs("/var/run", 0o755)
    path = str(tmp_path / "var/run/elkeid-agent.pid")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\n"
                               "from elkeid_agent.runtime.pidlock import PidLock\n"
                               "PidLock(sys.argv[1]).acquire(); print('held', flush=True)\n"
                               "time.sleep(60)", path], stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == b"held"
        assert fx.pidfile_holder("/var/run/elkeid-agent.pid") == holder.pid
        assert fx.try_lock("/var/run/elkeid-agent.pid") is None
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the file stays, the lock does not.
    assert os.path.exists(path)
    assert fx.pidfile_holder("/var/run/elkeid-agent.pid") is None
    lock = fx.try_lock("/var/run/elkeid-agent.pid")
    assert lock is not None
    assert fx.pidfile_holder("/var/run/elkeid-agent.pid") == os.getpid()
    lock.release()
    assert not os.path.exists(path)


def test_two_real_checks_at_once(tmp_path):
    """The real ctl with the real lock: a second check while the first holds
    /var/run/elkeidctl.pid says so and exits 75."""
    if os.geteuid() != 0:
        pytest.skip("elkeidctl check needs root")
    root = tmp_path / "root"
    (root / "etc/elkeid").mkdir(parents=True)
    (root / "var/run").mkdir(parents=True)
    (root / "etc/elkeid/specified_env").write_text("service_type=sysvinit\n")
    first = PidLock(str(root / "var/run/elkeidctl.pid"))
    first.acquire()
    try:
        p = subprocess.run(
            [sys.executable, "-c",
             "import sys\nfrom elkeid_agent import ctl\n"
             "from elkeid_agent.osfx.service import ServiceEffects\n"
             "sys.exit(ctl.main(['check'], fx=ServiceEffects(root=sys.argv[1])))", str(root)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    finally:
        first.release()
    assert p.returncode == 75, p.stderr
    assert ("another elkeidctl (pid %d) holds /var/run/elkeidctl.pid" % os.getpid()).encode() \
        in p.stderr
    assert b"Traceback" not in p.stderr


def test_signals_never_reach_our_group_or_every_process(fx):
    from elkeid_agent.osfx.process import ProcessEffects
    for bad in (0, -1):
        with pytest.raises(ValueError):
            fx.kill(bad, 0)
        with pytest.raises(ValueError):
            ProcessEffects().kill(bad, 0)
    for pgid in (0, 1):
        with pytest.raises(ValueError):
            ProcessEffects().kill_group(pgid, 0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    try:
        assert ProcessEffects().kill_group(child.pid, 0) is True
        assert fx.kill(child.pid, signal.SIGKILL) is True
        child.wait(10)
        assert fx.kill(child.pid, 0) is False and ProcessEffects().kill_group(child.pid, 0) is False
    finally:
        if child.poll() is None:
            child.kill()


# ---------------------------------------------------------------- identity

def _sleeper(**kw):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw)


def _identity_of(real, pid):
    return real.identify(real.processes()[pid])


def _exited_identity(**kw):
    """The identity of a real child that has exited and been reaped, and a
    new live process started in a later clock tick (so its start time
    differs, as a process reusing the pid would)."""
    real = ServiceEffects()
    first = _sleeper(**kw)
    old = _identity_of(real, first.pid)
    first.kill()
    first.wait(10)
    deadline = time.monotonic() + 30
    while True:
        new = _sleeper(**kw)
        wait_for(lambda: proc_start_ticks(new.pid) is not None)
        if proc_start_ticks(new.pid) != old.start:
            return real, old, new
        new.kill()
        new.wait(10)
        assert time.monotonic() < deadline, "no later clock tick"


def _assert_alive(real, proc):
    ident = ProcessIdentity.capture(proc.pid, use_pidfd=False)
    assert proc.poll() is None and ident is not None and real.kill(ident, 0) is True


@pytest.mark.parametrize("with_pidfd", [True, False])
def test_a_remembered_process_is_not_signalled_once_its_pid_names_another(with_pidfd):
    """elkeidctl remembers (pid, start time[, pidfd]); the process exits, is
    reaped, and the pid now names a new process (pid reuse cannot be forced,
    so the stale identity is pointed at the new process's pid)."""
    real, old, new = _exited_identity()
    try:
        if with_pidfd and old.pidfd is None:
            pytest.skip("no pidfds on this kernel")
        stale = ProcessIdentity(new.pid, old.start, old.pidfd if with_pidfd else None)
        assert real.kill(stale, signal.SIGKILL) is False
        assert stale.is_current() is False
        _assert_alive(real, new)
        # The process that is remembered correctly is signalled.
        ident = ProcessIdentity.capture(new.pid, use_pidfd=with_pidfd)
        assert (ident.pidfd is not None) == with_pidfd
        assert real.kill(ident, signal.SIGTERM) is True
        assert new.wait(10) == -signal.SIGTERM
        assert real.kill(ident, signal.SIGTERM) is False  # reaped: gone for good
        ident.close()
    finally:
        old.close()
        if new.poll() is None:
            new.kill()
            new.wait()


GROUP_LEADER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("with_pidfd", [True, False])
def test_a_group_is_killed_only_while_its_leader_is_the_one_remembered(with_pidfd):
    real, old, decoy = _exited_identity(start_new_session=True)
    decoy.kill()
    decoy.wait(10)
    leader = subprocess.Popen([sys.executable, "-c", GROUP_LEADER], stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        member = int(leader.stdout.readline())
        assert real.processes()[member].pgid == leader.pid
        if with_pidfd and old.pidfd is None:
            pytest.skip("no pidfds on this kernel")
        stale = ProcessIdentity(leader.pid, old.start, old.pidfd if with_pidfd else None)
        assert real.kill(stale, signal.SIGKILL, group=True) is False
        _assert_alive(real, leader)
        assert real.alive(member)
        ident = ProcessIdentity.capture(leader.pid, use_pidfd=with_pidfd)
        assert real.kill(ident, signal.SIGKILL, group=True) is True
        assert leader.wait(10) == -signal.SIGKILL
        wait_for(lambda: not real.alive(member))  # the whole group, not just the leader
        ident.close()
    finally:
        old.close()
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_a_group_kill_needs_an_identity():
    with pytest.raises(ValueError):
        ServiceEffects().kill(os.getpid(), 0, group=True)
    with pytest.raises(ValueError):
        ServiceEffects().kill(ProcessIdentity(1, 0), 0)


LEAVING_AGENT = """
import signal, subprocess, sys, time
plugin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                          start_new_session=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits, leaves its plugin
print(plugin.pid, flush=True)
time.sleep(60)
"""


def test_stop_of_real_processes_terms_the_agent_then_its_leftover_plugin():
    """procs.stop against this machine: identities with pidfds, the agent's
    SIGTERM, then the group of the plugin it left behind."""
    from elkeid_agent.ctl import procs
    real = ServiceEffects()
    agent = subprocess.Popen([sys.executable, "-c", LEAVING_AGENT], stdout=subprocess.PIPE)
    plugin = int(agent.stdout.readline())
    said = []
    try:
        assert procs.stop(real, None, agent.pid, said.append) == []
        assert agent.wait(10) == 0
        assert not real.alive(plugin)
    finally:
        for pid in (agent.pid, plugin):
            if real.alive(pid):
                os.kill(pid, signal.SIGKILL)
        agent.wait()
