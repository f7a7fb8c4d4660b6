"""Process effects: spawning plugins with Elkeid's fd layout, watching them
exit, killing process groups, reading /proc.

Everything here touches the host; the plugin supervisor reaches it only
through a ``ProcessEffects`` instance so tests can substitute a recorder and a
reviewer can audit, in one file, what the agent does to processes.

How a plugin is started (PROTOCOL.md section 1):
- ``subprocess.Popen`` (fork + exec in C) with stdin/stdout on /dev/null,
  stderr on the ``<name>.stderr`` file, cwd = plugin dir, an explicit env.
- A ``preexec_fn`` runs in the child between fork and exec and does only
  what cannot be done otherwise: ``setpgid(0, 0)``, ``PR_SET_PDEATHSIG =
  SIGKILL`` (the kernel kills the plugin when the agent dies, however it
  dies; the setting survives ``execve`` of non-setuid programs, so plugins
  that re-exec themselves stay covered), then ``dup2`` of the pipe ends onto
  fds 3, 4 and 5 and closing of every other inheritable fd.
- Why ``close_fds=False``: Popen closes non-``pass_fds`` descriptors *after*
  preexec_fn, which would close fds 3-5 again; and ``pass_fds=(3, 4, 5)``
  fails when those numbers are not open in the parent. The preexec closes
  leaked inheritable fds itself (by /proc/self/fd), leaving close-on-exec
  ones - among them Popen's error pipe - to exec.
- ``reserve_low_fds`` keeps fds 0-5 of the agent occupied (by /dev/null,
  close-on-exec) so Popen's own error pipe can never be one of 3-5, where
  the preexec ``dup2`` would silently replace it.

Exit is observed without reaping (pidfd readable, or ``waitid(WNOWAIT)`` in
a thread on kernels before 5.3): while the leader is a zombie its pid, and so
its process-group id, cannot be reused, which makes the group kill that
follows race-free. Only then is the zombie reaped.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: spawn
from the event-loop thread, which lives as long as the agent.
"""

import ctypes
import fcntl
import os
import signal
import subprocess
import threading
from collections import namedtuple

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_prctl():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


# Resolved in the parent at import: the child must not dlopen after fork.
_PRCTL = _load_prctl()


def reserve_low_fds(upto=5):
    """Occupy every free fd number <= ``upto`` with /dev/null (close-on-exec).

    Held for the life of the process; costs at most ``upto + 1`` fds."""
    while True:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if fd > upto:
            os.close(fd)
            return


class ChildSetup:
    """The preexec_fn: runs in the forked child just before exec."""

    def __init__(self, fd_map, parent_pid, pdeathsig=signal.SIGKILL, new_group=True):
        self.targets = sorted(fd_map)
        self.sources = [fd_map[t] for t in self.targets]
        self.parent_pid = parent_pid
        self.pdeathsig = pdeathsig
        self.new_group = new_group

    def __call__(self):
        if self.new_group:
            os.setpgid(0, 0)
        if self.pdeathsig and _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(self.pdeathsig), 0, 0, 0)
            # The agent may have died between fork and prctl: then nobody
            # would ever deliver the signal.
            if os.getppid() != self.parent_pid:
                os._exit(111)
        top = max(self.targets) if self.targets else 2
        # Move sources above every target first so no dup2 clobbers a source.
        moved = [fcntl.fcntl(src, fcntl.F_DUPFD, top + 64) for src in self.sources]
        for target, fd in zip(self.targets, moved):
            os.dup2(fd, target)  # the copy is inheritable
        for fd in moved:
            os.close(fd)
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd <= top:
                continue
            try:
                if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                    os.close(fd)
            except OSError:
                pass


ProcSample = namedtuple("ProcSample", "pid pgrp cpu_seconds rss start_ticks")


class ExitWatch:
    """Calls ``callback()`` on the loop once ``pid`` has exited (not reaped)."""

    def __init__(self, loop, pid, callback, use_pidfd=True):
        self._loop = loop
        self._callback = callback
        self._pidfd = None
        self._done = False
        if use_pidfd and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:
                self._pidfd = None
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._fire)
        else:
            t = threading.Thread(target=self._wait_thread, args=(pid,),
                                 name="plugin-exit-%d" % pid, daemon=True)
            t.start()

    def _wait_thread(self, pid):
        while True:
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        try:
            self._loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # loop closed: the agent is gone anyway
            pass

    def _fire(self):
        if self._done:
            return
        self.cancel()
        self._callback()

    def cancel(self):
        self._done = True
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


class ProcessEffects:
    """The real thing. One instance per agent."""

    sane_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def __init__(self, use_pidfd=True):
        self.use_pidfd = use_pidfd

    # ------------------------------------------------------------ spawning

    def spawn(self, exe, cwd, env, stderr_fd, fd_map, pdeathsig=signal.SIGKILL):
        """Start ``exe`` (no arguments) with ``fd_map`` {child fd: parent fd}.

        Returns the Popen object; the caller owns exit watching and reaping
        (see ``watch_exit`` and ``reap``)."""
        reserve_low_fds()
        setup = ChildSetup(fd_map, os.getpid(), pdeathsig=pdeathsig)
        return subprocess.Popen(
            [exe], executable=exe, cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_fd,
            close_fds=False, preexec_fn=setup, restore_signals=True)

    def watch_exit(self, loop, pid, callback):
        return ExitWatch(loop, pid, callback, use_pidfd=self.use_pidfd)

    def reap(self, popen):
        """Collect an exited child; returns its exit code (negative = signal).
        Sets ``popen.returncode`` so subprocess never polls the pid again."""
        try:
            _, status = os.waitpid(popen.pid, 0)
            code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
                else _exit_code(status)
        except ChildProcessError:
            code = popen.returncode if popen.returncode is not None else -1
        popen.returncode = code
        return code

    # ------------------------------------------------------------ signals

    def kill_group(self, pgid, sig):
        """Signal a process group; False if it no longer exists."""
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def kill(self, pid, sig):
        try:
            os.kill(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    # ------------------------------------------------------------ /proc

    def sample(self, pid):
        """CPU seconds and RSS of one process (for limits), or None if gone."""
        return read_proc(pid)

    def boot_id(self):
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                return f.read().strip()
        except OSError:
            return ""

    def start_ticks(self, pid):
        stat = _read_stat(pid)
        return int(stat[19]) if stat else None

    def sweep_group(self, pgid, min_start_ticks, roots):
        """SIGKILL leftovers of a process group recorded by an earlier agent.

        A process is killed only if it is in group ``pgid``, started no
        earlier than the recorded leader, and its cwd or executable lies under
        one of ``roots`` (the plugin directories): pid reuse cannot make this
        kill a stranger. Returns the pids killed."""
        killed = []
        me = os.getpid()
        for pid in _all_pids():
            if pid == me:
                continue
            stat = _read_stat(pid)
            if stat is None or int(stat[2]) != pgid or int(stat[19]) < min_start_ticks:
                continue
            if not any(_under(_readlink("/proc/%d/%s" % (pid, what)), root)
                       for what in ("cwd", "exe") for root in roots):
                continue
            if self.kill(pid, signal.SIGKILL):
                killed.append(pid)
        return killed

    def group_members(self, pgid):
        """Pids currently in process group ``pgid``."""
        out = []
        for pid in _all_pids():
            stat = _read_stat(pid)
            if stat is not None and int(stat[2]) == pgid:
                out.append(pid)
        return out


def _exit_code(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _all_pids():
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit()]


def _read_stat(pid):
    """Fields of /proc/<pid>/stat after the command name: index 0 is field 3
    (state), so field k of proc(5) is at index k - 3."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    close = raw.rfind(b")")
    if close < 0:
        return None
    return raw[close + 2:].split()


def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _under(path, root):
    if not path:
        return False
    if path.endswith(" (deleted)"):
        path = path[:-10]
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def read_proc(pid):
    """CPU seconds (user + system) and RSS of one process, or None if gone.
    (The heartbeat's fuller figures come from resources.ProcessSampler.)"""
    stat = _read_stat(pid)
    if stat is None or len(stat) < 22:
        return None
    try:
        cpu = (int(stat[11]) + int(stat[12])) / _CLK_TCK
        return ProcSample(pid, int(stat[2]), cpu, int(stat[21]) * _PAGE, int(stat[19]))
    except ValueError:
        return None


def get_pdeathsig():
    """The calling process's parent-death signal (used by tests and plugins)."""
    if _PRCTL is None:
        return 0
    out = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(out), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return out.value


__all__ = ["ProcessEffects", "ChildSetup", "ExitWatch", "ProcSample", "read_proc",
           "reserve_low_fds", "get_pdeathsig"]
