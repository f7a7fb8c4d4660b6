"""The sysvinit-mode pid file lock (docs/protocol.md section 7).

Owns ``/var/run/elkeid-agent.pid``: the running agent holds an exclusive
``flock`` on it and keeps its pid in it; ``elkeidctl`` (status, check, stop)
asks ``read_holder`` who holds it. The lock, not the file, is the truth: the
kernel drops a flock when its holder dies however it dies, so a file left by
a crashed agent is stale and simply taken over, and a pid that happens to
have been reused by some other process is never mistaken for the agent.
"""

import errno
import fcntl
import os
import time

from ..errors import LocalFault

_LOCKED = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _read_pid(fd):
    """The pid on the first line of the file, or None."""
    try:
        data = os.pread(fd, 64, 0)
    except OSError:
        return None
    first = data.split(b"\n", 1)[0].strip()
    if not first.isdigit():
        return None
    pid = int(first)
    return pid if pid > 1 else None  # 1 is init: never ours to signal


# elkeidctl's read_holder() probes with a momentary shared lock; a start
# that lands on that instant must wait it out, not report a rival agent.
LOCK_ATTEMPTS = 10
LOCK_RETRY_SECONDS = 0.02


def _flock_exclusive(fd):
    """Take LOCK_EX, retrying briefly while it is busy; None on success,
    else the last OSError."""
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as exc:
            if exc.errno not in _LOCKED or attempt == LOCK_ATTEMPTS - 1:
                return exc
            time.sleep(LOCK_RETRY_SECONDS)
    return None


class PidLock:
    def __init__(self, path):
        self.path = path
        self._fd = None

    @property
    def held(self):
        return self._fd is not None

    def acquire(self):
        """Take the lock and write our pid; raise LocalFault if another live
        agent holds it or the file cannot be used. Idempotent."""
        if self._fd is not None:
            return
        # A holder that releases (unlinks the file) between our open and our
        # flock leaves us locking an orphaned inode; the stat check below
        # notices and we try again on the new file.
        for _ in range(5):
            fd = self._open_and_lock()
            if self._still_the_file(fd):
                break
            os.close(fd)
        else:
            raise LocalFault("the pid file %s keeps being replaced while locking it" % self.path)
        try:
            data = b"%d\n" % os.getpid()
            # Write, then cut: a reader never sees an empty file between the
            # two steps, at worst the new pid followed by a stale tail line.
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:
            os.close(fd)
            raise LocalFault("cannot write the pid file %s: %s" % (self.path, exc.strerror)) from exc
        self._fd = fd

    def _open_and_lock(self):
        try:
            # O_NOFOLLOW: never write our pid through a planted symlink.
            # The fd is not inherited by children (PEP 446), so a plugin
            # outliving the agent cannot keep the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LocalFault("cannot open the pid file %s: %s"
                             % (self.path, exc.strerror or exc)) from exc
        exc = _flock_exclusive(fd)
        if exc is not None:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in _LOCKED:
                raise LocalFault("another elkeid-agent (pid %s) holds %s"
                                 % (holder if holder is not None else "unknown", self.path)) from None
            raise LocalFault("cannot lock the pid file %s: %s" % (self.path, exc.strerror)) from exc
        try:
            # O_CREAT's mode is masked by umask; the file is meant to be
            # world-readable so unprivileged status tools can read the pid.
            os.fchmod(fd, 0o644)
        except OSError:
            pass
        return fd

    def _still_the_file(self, fd):
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self):
        """Remove the file and drop the lock (in that order, so nobody can
        lock the old file in between and believe it current)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._still_the_file(fd):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def read_holder(path, retries=3):
    """The pid of the live process holding the lock on ``path``, else None.

    Tested with a shared non-blocking flock on our own open file description:
    it fails only while someone holds the exclusive lock. A holder caught in
    the instant between creating the file and writing its pid is retried a
    few times (a few milliseconds); if it still has no pid, None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for attempt in range(retries + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in _LOCKED:
                    return None
            else:
                # Nobody holds it: whatever pid the file names is stale.
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            pid = _read_pid(fd)
            if pid is not None:
                return pid
            if attempt < retries:
                time.sleep(0.005)
        return None
    finally:
        os.close(fd)
