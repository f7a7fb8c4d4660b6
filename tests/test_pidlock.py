import os
import signal
import stat
import subprocess
import sys

import pytest

from elkeid_agent.errors import LocalFault
from elkeid_agent.runtime.pidlock import PidLock, read_holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = r"""
import sys
from elkeid_agent.runtime.pidlock import PidLock
lock = PidLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes our stdin (or kills us)
lock.release()
"""


@pytest.fixture
def holder(tmp_path):
    path = str(tmp_path / "elkeid-agent.pid")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"locked\n"
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_acquire_writes_pid_and_release_removes(tmp_path):
    path = str(tmp_path / "elkeid-agent.pid")
    old = os.umask(0o077)
    try:
        lock = PidLock(path)
        lock.acquire()
        lock.acquire()  # idempotent
    finally:
        os.umask(old)
    assert lock.held
    with open(path) as f:
        assert f.read() == "%d\n" % os.getpid()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert read_holder(path) == os.getpid()
    lock.release()
    lock.release()
    assert not lock.held
    assert not os.path.exists(path)
    assert read_holder(path) is None


def test_a_live_holder_in_another_process_wins(holder):
    proc, path = holder
    assert read_holder(path) == proc.pid
    with pytest.raises(LocalFault, match=r"another elkeid-agent \(pid %d\) holds" % proc.pid):
        PidLock(path).acquire()
    # The failed attempt must not have disturbed the holder's file.
    with open(path) as f:
        assert f.read() == "%d\n" % proc.pid


def test_a_killed_holder_leaves_a_stale_file_that_is_taken_over(holder):
    proc, path = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(path)  # no chance to clean up
    assert read_holder(path) is None
    with PidLock(path) as lock:
        assert lock.held
        with open(path) as f:
            assert f.read() == "%d\n" % os.getpid()
        assert read_holder(path) == os.getpid()


def test_a_clean_exit_removes_the_file(holder):
    proc, path = holder
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert not os.path.exists(path)


def test_stale_file_with_a_dead_pid(tmp_path):
    path = tmp_path / "elkeid-agent.pid"
    # A pid that cannot be live, followed by junk a longer old pid left.
    path.write_text("4194305\nsomething older\n")
    assert read_holder(str(path)) is None
    lock = PidLock(str(path))
    lock.acquire()
    assert path.read_text() == "%d\n" % os.getpid()
    lock.release()


def test_two_locks_in_one_process_conflict(tmp_path):
    path = str(tmp_path / "elkeid-agent.pid")
    with PidLock(path):
        with pytest.raises(LocalFault, match="pid %d" % os.getpid()):
            PidLock(path).acquire()


def test_unusable_paths_are_local_faults(tmp_path):
    with pytest.raises(LocalFault, match="cannot open the pid file"):
        PidLock(str(tmp_path / "missing-dir" / "x.pid")).acquire()
    target = tmp_path / "target"
    target.write_text("")
    link = tmp_path / "link.pid"
    link.symlink_to(target)
    with pytest.raises(LocalFault, match="cannot open the pid file"):
        PidLock(str(link)).acquire()
    assert target.read_text() == ""
    assert read_holder(str(tmp_path / "missing-dir" / "x.pid")) is None
    assert read_holder(str(tmp_path)) is None  # a directory is not a pid file


@pytest.mark.parametrize("content", ["not a pid\n", "0\n", "1\n", "-5\n"])
def test_held_lock_with_garbage_content_reads_as_no_pid(tmp_path, content):
    # 0 and 1 would make elkeidctl signal its own group or init.
    import fcntl
    path = tmp_path / "elkeid-agent.pid"
    path.write_text(content)
    fd = os.open(str(path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert read_holder(str(path), retries=1) is None
        with pytest.raises(LocalFault, match=r"\(pid unknown\)"):
            PidLock(str(path)).acquire()
    finally:
        os.close(fd)


def test_acquire_waits_out_a_momentary_probe(tmp_path):
    # elkeidctl's read_holder() takes a shared lock for an instant; an agent
    # starting at that moment must not mistake it for a rival agent.
    import fcntl
    import threading
    from elkeid_agent.runtime.pidlock import PidLock
    path = str(tmp_path / "agent.pid")
    open(path, "w").close()
    probe = os.open(path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    release = threading.Timer(0.05, lambda: os.close(probe))
    release.start()
    lock = PidLock(path)
    try:
        lock.acquire()
        assert open(path).read().strip() == str(os.getpid())
    finally:
        release.join()
        lock.release()
