"""Process effects of local services: starting them so that they outlive
the agent, signalling them, finding what they left behind, transient
systemd units.

The services supervisor reaches the host only through a
``ServiceProcessEffects``; this file is what a reviewer reads to know what
the agent does to a service's processes.

Two launchers:
- ``direct`` (sysvinit, or no systemd as PID 1): ``posix_spawn`` with the
  plugins' exec shim (``process.SHIM``: chdir to ``work_dir``, close
  inherited fds, exec with the service's arguments) in a new session
  (``setsid``), with no parent-death signal (a service survives the agent),
  stdin on /dev/null and stdout/stderr appended to files of its work_dir.
  No ``fork()`` for the reasons ``process.py`` gives. The session id is the
  service's pid, so its group and session can be signalled and searched.
- ``systemd``: each service is its own transient unit
  (``systemd-run --unit=elkeid-service-<id>``), outside the agent's cgroup,
  which ``KillMode=control-group`` empties at every agent restart. The
  agent keeps the health checks; stopping is ``systemctl stop`` (SIGTERM,
  ``TimeoutStopSec``, SIGKILL of the unit's cgroup).

Every service process gets ``ELKEID_SERVICE_TOKEN=<id>.<random>`` in its
environment, one token per run: a process that daemonized out of the
session still carries it, which is how leftovers are found without ever
touching a process that does not carry this run's token or session.
"""

import os
import select
import signal
import time

from . import ProcessIdentity, proc_start_ticks, signal_process
from .process import SHIM, ExitWatch, reserve_low_fds, read_proc, _all_pids, _read_stat

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT_PREFIX = "elkeid-service-"
TOKEN_ENV = "ELKEID_SERVICE_TOKEN"
MAX_OUTPUT = 64 * 1024


def unit_name(service_id):
    return "%s%s.service" % (UNIT_PREFIX, service_id)


def systemd_run_argv(unit, exe, args, cwd, env, stdout_path, stderr_path, stop_timeout):
    """The systemd-run command line of one service (systemd >= 240:
    ``append:`` outputs, ``Type=exec``; ``--collect`` since 236)."""
    argv = ["systemd-run", "--unit=" + unit, "--collect", "--quiet",
            "--property=Type=exec",
            "--property=WorkingDirectory=" + cwd,
            "--property=StandardInput=null",
            "--property=StandardOutput=append:" + stdout_path,
            "--property=StandardError=append:" + stderr_path,
            "--property=KillMode=control-group",
            "--property=TimeoutStopSec=%ds" % max(1, int(round(stop_timeout)))]
    for key in sorted(env):
        argv.append("--setenv=%s=%s" % (key, env[key]))
    return argv + ["--", exe] + list(args)


class Spawned:
    """One started service process. ``child`` is True when the agent is
    its parent (direct launcher, this agent): then it must be reaped."""

    def __init__(self, pid, start_ticks, child, unit=""):
        self.pid = pid
        self.start_ticks = start_ticks
        self.child = child
        self.unit = unit
        self.returncode = None


class PollWatch:
    """Exit watch of a process that is not our child on a kernel without
    pidfds: polls its start time (a recycled pid has another)."""

    def __init__(self, loop, pid, start_ticks, callback, period=1.0):
        self._loop, self._pid, self._start = loop, pid, start_ticks
        self._callback, self._period = callback, period
        self._handle = loop.call_later(period, self._poll)

    def _poll(self):
        if proc_start_ticks(self._pid) != self._start or process_state(self._pid) in ("Z", "X"):
            self._handle = None
            self._callback()
            return
        self._handle = self._loop.call_later(self._period, self._poll)

    def cancel(self):
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def process_state(pid):
    """The state letter of /proc/PID/stat (R, S, D, Z, T ...), "" if gone."""
    stat = _read_stat(pid)
    return stat[0].decode("ascii", "replace") if stat else ""


class ServiceProcessEffects:
    """The real thing. One instance per supervisor."""

    sane_path = SAFE_PATH

    def __init__(self, python=None, use_pidfd=True, systemd_dir="/run/systemd/system"):
        import sys
        self.python = python or sys.executable or "/usr/bin/python3"
        self.use_pidfd = use_pidfd
        self.systemd_dir = systemd_dir

    # ------------------------------------------------------------ which launcher

    def systemd_is_init(self):
        return os.path.isdir(self.systemd_dir)

    # ------------------------------------------------------------ direct

    def spawn_direct(self, exe, args, cwd, env, stdout_path, stderr_path):
        """Start ``exe args`` in its own session; returns a ``Spawned``.
        Raises OSError when the output files or the shim cannot be set up;
        an ``exe`` that cannot be executed exits 126/127 with the reason
        in its stderr file."""
        reserve_low_fds(2)
        fds = []
        try:
            for path in (stdout_path, stderr_path):
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                   0o640))
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, fds[0], 1),
                       (os.POSIX_SPAWN_DUP2, fds[1], 2)]
            argv = [self.python, "-I", "-S", "-c", SHIM, cwd, exe, str(os.getpid()), "0",
                    "2"] + list(args)
            pid = os.posix_spawn(self.python, argv, env, file_actions=actions, setsid=True,
                                 setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        finally:
            for fd in fds:
                os.close(fd)
        return Spawned(pid, proc_start_ticks(pid), child=True)

    def reap(self, spawned):
        """Collect an exited child of ours; its exit code (negative = signal),
        None when it is not our child (the code is unknown)."""
        if not spawned.child:
            return None
        try:
            _, status = os.waitpid(spawned.pid, 0)
            spawned.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
        return spawned.returncode

    def watch_exit(self, loop, spawned, callback):
        """``callback()`` on the loop once the process has exited (not reaped)."""
        if spawned.child or (self.use_pidfd and hasattr(os, "pidfd_open")):
            watch = ExitWatch(loop, spawned.pid, callback, use_pidfd=self.use_pidfd)
            if spawned.child or watch._pidfd is not None:
                return watch
            watch.cancel()
        return PollWatch(loop, spawned.pid, spawned.start_ticks, callback)

    # ------------------------------------------------------------ systemd

    def spawn_unit(self, unit, exe, args, cwd, env, stdout_path, stderr_path, stop_timeout,
                   timeout=30.0):
        """Start the service as a transient unit; returns a ``Spawned`` of
        its MainPID. Blocking (run it in an executor). OSError on failure."""
        self.run(["systemctl", "reset-failed", unit], timeout)  # a leftover failed unit
        for path in (stdout_path, stderr_path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
        rc, out = self.run(systemd_run_argv(unit, exe, args, cwd, env, stdout_path,
                                            stderr_path, stop_timeout), timeout)
        if rc != 0:
            raise OSError("systemd-run failed (%d): %s" % (rc, out.strip()[-300:]))
        pid = self.unit_main_pid(unit, timeout)
        if not pid:
            raise OSError("unit %s has no main process after start" % unit)
        return Spawned(pid, proc_start_ticks(pid), child=False, unit=unit)

    def unit_properties(self, unit, names, timeout=30.0):
        rc, out = self.run(["systemctl", "show", "-p", ",".join(names), "--", unit], timeout)
        props = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value
        return props

    def unit_main_pid(self, unit, timeout=30.0):
        try:
            return int(self.unit_properties(unit, ["MainPID"], timeout).get("MainPID") or 0)
        except ValueError:
            return 0

    def unit_exit_code(self, unit, timeout=30.0):
        """The main process's exit code as ``reap`` gives it, None if unknown
        (the unit was already collected)."""
        props = self.unit_properties(unit, ["ExecMainCode", "ExecMainStatus"], timeout)
        try:
            code, status = int(props.get("ExecMainCode") or 0), int(props.get("ExecMainStatus")
                                                                     or 0)
        except ValueError:
            return None
        # ExecMainCode is a CLD_* value: 1 exited, 2 killed, 3 dumped.
        if code == 1:
            return status
        if code in (2, 3):
            return -status
        return None

    def stop_unit(self, unit, timeout):
        """``systemctl stop``: SIGTERM, TimeoutStopSec, SIGKILL of the cgroup."""
        return self.run(["systemctl", "stop", "--", unit], timeout)

    def kill_unit(self, unit, sig, timeout=30.0):
        return self.run(["systemctl", "kill", "--signal=%d" % int(sig), "--", unit], timeout)

    def unit_cgroup_pids(self, unit, timeout=30.0):
        cgroup = self.unit_properties(unit, ["ControlGroup"], timeout).get("ControlGroup", "")
        if not cgroup:
            return []
        try:
            with open("/sys/fs/cgroup%s/cgroup.procs" % cgroup) as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return []

    def run(self, argv, timeout):
        """Run a command (posix_spawn, no fork: see process.py); (rc, output).
        Blocking; a command that outlives ``timeout`` is killed (rc -9)."""
        r, w = os.pipe()
        try:
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2),
                       (os.POSIX_SPAWN_CLOSE, r)]
            env = {"PATH": SAFE_PATH, "LANG": "C", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
            try:
                pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
            except OSError as e:
                return 127, "cannot run %s: %s" % (argv[0], e.strerror or e)
        finally:
            os.close(w)
        out = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    break
                ready, _, _ = select.select([r], [], [], left)
                if not ready:
                    continue
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                if len(out) < MAX_OUTPUT:
                    out += chunk[:MAX_OUTPUT - len(out)]
        finally:
            os.close(r)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")

    # ------------------------------------------------------------ processes

    def capture(self, pid, start_ticks=None):
        """A ``ProcessIdentity`` of ``pid`` if it is (still) the process that
        started at ``start_ticks``; None otherwise."""
        return ProcessIdentity.capture(pid, start_ticks, use_pidfd=self.use_pidfd)

    def alive(self, ident):
        return ident is not None and ident.is_current() and \
            process_state(ident.pid) not in ("Z", "X", "")

    def signal_session(self, ident, sig):
        """Signal the process group the service leads (its session: setsid
        made it the leader of both), once the leader is verified."""
        return signal_process(ident, sig, group=True)

    def kill(self, pid, sig):
        return signal_process(pid, sig)

    def leftovers(self, leader_pid, token, min_start, by_session=True):
        """Processes of one service run other than its leader: in its session
        (the leader's pid; only while the leader is unreaped, so that the id
        cannot have been reused: ``by_session``), or carrying its run's
        token in their environment, and started no earlier than the leader."""
        found = []
        needle = ("%s=%s" % (TOKEN_ENV, token)).encode() if token else None
        me = os.getpid()
        for pid in _all_pids():
            if pid in (me, leader_pid) or pid <= 1:
                continue
            stat = _read_stat(pid)
            try:
                if stat is None or int(stat[19]) < min_start or stat[0] in (b"Z", b"X"):
                    continue
                if by_session and int(stat[3]) == leader_pid:
                    found.append(pid)
                    continue
            except (IndexError, ValueError):
                continue
            if needle is not None and needle in _environ(pid):
                found.append(pid)
        return found

    def is_descendant(self, pid, ancestor, depth=64):
        """``pid`` is ``ancestor`` or below it in the process tree."""
        for _ in range(depth):
            if pid == ancestor:
                return True
            if pid <= 1:
                return False
            stat = _read_stat(pid)
            if stat is None:
                return False
            try:
                pid = int(stat[1])
            except (IndexError, ValueError):
                return False
        return False

    def sample(self, pid):
        """CPU seconds and RSS (``process.ProcSample``), None when gone."""
        return read_proc(pid)

    start_ticks = staticmethod(proc_start_ticks)


def _environ(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return f.read(256 * 1024).split(b"\0")
    except OSError:
        return []


__all__ = ["ServiceProcessEffects", "Spawned", "PollWatch", "systemd_run_argv", "unit_name",
           "process_state", "TOKEN_ENV", "UNIT_PREFIX"]
