"""Process effects: spawning plugins with Elkeid's fd layout, watching them
exit, killing process groups, reading /proc.

Everything here touches the host; the plugin supervisor reaches it only
through a ``ProcessEffects`` instance so tests can substitute a recorder and a
reviewer can audit, in one file, what the agent does to processes.

How a plugin is started (docs/protocol.md section 1), without ``fork()``:
- ``os.posix_spawn`` (glibc: ``clone(CLONE_VM | CLONE_VFORK)``) with file
  actions putting /dev/null on stdin/stdout, the ``<name>.stderr`` file on
  stderr and the pipe ends on fds 3, 4 and 5; its own process group
  (``setpgroup=0``); SIGPIPE/SIGXFSZ back to default (Python ignores them
  and ignored signals survive exec); an empty signal mask.
- What posix_spawn cannot do is done by a tiny exec shim, ``python -I -S
  -c SHIM`` (~10 ms, then replaced by the plugin): ``chdir`` to the plugin
  dir, ``PR_SET_PDEATHSIG = SIGKILL`` (the kernel kills the plugin when the
  agent dies, however it dies; the setting survives ``execve`` of
  non-setuid programs, so plugins that re-exec stay covered), a check that
  the agent did not die before that, closing any inherited fd above 5, then
  ``execve`` of the plugin. If that exec fails, the shim says why on the
  plugin's stderr and exits 127 (126 for a permission error).
- Why not ``subprocess.Popen(preexec_fn=...)``: a ``preexec_fn`` forces
  ``fork()``, and ``fork()`` in a process running gRPC runs gRPC's
  pthread_atfork handlers, whose child side aborts (``Check failed:
  next_worker->state == KICKED``) in about one spawn in seven while the
  stream is busy. posix_spawn runs no atfork handlers.
- ``reserve_low_fds`` keeps fds 0-5 of the agent occupied (by /dev/null,
  close-on-exec) so every pipe end is above 5 and no dup2 target can be a
  source.

Exit is observed without reaping (pidfd readable, or ``waitid(WNOWAIT)`` in
a thread on kernels before 5.3): while the leader is a zombie its pid, and so
its process-group id, cannot be reused, which makes the group kill that
follows race-free. Only then is the zombie reaped.

PR_SET_PDEATHSIG fires when the *thread* that created the child exits: spawn
from the event-loop thread, which lives as long as the agent.
"""

import os
import signal
import sys
import threading
from collections import namedtuple

from . import proc_start_ticks, signal_process

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# argv: working dir, executable, agent pid, death signal (0: none), highest
# fd to keep, then the program's own arguments (plugins have none).
SHIM = r"""
import os, sys
d, exe, ppid, sig, keep = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def die(code, what, e):
    os.write(2, ("elkeid-agent: cannot %s %s: %s\n" % (what, exe, e.strerror or e)).encode())
    os._exit(code)
try:
    os.chdir(d)
except OSError as e:
    die(127, "enter the directory of", e)
if sig:
    import ctypes
    ctypes.CDLL(None).prctl(1, sig, 0, 0, 0)
    if os.getppid() != ppid:
        os._exit(111)
for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
    if fd > keep:
        try:
            os.close(fd)
        except OSError:
            pass
try:
    os.execve(exe, [exe] + sys.argv[6:], os.environ)
except OSError as e:
    die(126 if isinstance(e, PermissionError) else 127, "execute", e)
"""


def reserve_low_fds(upto=5):
    """Occupy every free fd number <= ``upto`` with /dev/null (close-on-exec).

    Held for the life of the process; costs at most ``upto + 1`` fds."""
    while True:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if fd > upto:
            os.close(fd)
            return


class Child:
    """A spawned process: ``pid`` and, once reaped, ``returncode``."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None


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

    def __init__(self, use_pidfd=True, python=None):
        self.use_pidfd = use_pidfd
        # The shim's interpreter: this one (the zipapp runs on the system's).
        self.python = python or sys.executable or "/usr/bin/python3"

    # ------------------------------------------------------------ spawning

    def spawn(self, exe, cwd, env, stderr_fd, fd_map, pdeathsig=signal.SIGKILL):
        """Start ``exe`` (no arguments) in ``cwd`` with ``fd_map`` {child fd:
        parent fd} and stderr on ``stderr_fd``. Returns a ``Child``; the
        caller owns exit watching and reaping (``watch_exit``, ``reap``).
        Raises OSError if the shim cannot be started; a plugin that cannot
        be executed exits 126/127 with the reason on its stderr."""
        reserve_low_fds()
        top = max(fd_map)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_DUP2, stderr_fd, 2)]
        for target in sorted(fd_map):
            if fd_map[target] <= top or stderr_fd <= top:
                raise ValueError("fd %d would be overwritten by a dup2" % fd_map[target])
            actions.append((os.POSIX_SPAWN_DUP2, fd_map[target], target))
        argv = [self.python, "-I", "-S", "-c", SHIM, cwd, exe, str(os.getpid()),
                str(int(pdeathsig or 0)), str(top)]
        pid = os.posix_spawn(self.python, argv, env, file_actions=actions, setpgroup=0,
                             setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        return Child(pid)

    def watch_exit(self, loop, pid, callback):
        return ExitWatch(loop, pid, callback, use_pidfd=self.use_pidfd)

    def reap(self, child):
        """Collect an exited child; returns its exit code (negative = signal)."""
        try:
            _, status = os.waitpid(child.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = child.returncode if child.returncode is not None else -1
        child.returncode = code
        return code

    # ------------------------------------------------------------ signals

    def kill_group(self, pgid, sig):
        """Signal a process group; False if it no longer exists."""
        if pgid <= 1:
            raise ValueError("refusing to signal process group %d" % pgid)
        return signal_process(-pgid, sig)

    kill = staticmethod(signal_process)

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
        return proc_start_ticks(pid)

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
    import ctypes  # only here: the agent itself never loads it
    out = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(out), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return out.value


__all__ = ["ProcessEffects", "Child", "ExitWatch", "ProcSample", "read_proc", "SHIM",
           "reserve_low_fds", "get_pdeathsig"]
