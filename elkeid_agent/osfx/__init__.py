"""The one seam between the agent and the operating system's side effects.

Everything that changes the host beyond the agent's own files goes through
here: spawning and killing processes (plugins, services), cgroup writes,
service managers (systemctl, update-rc.d, chkconfig), package managers
(dpkg, rpm). Tests substitute a recording fake for the real thing; the real
implementation is collected in one place so a reviewer can audit what the
agent may do to a host.

Each area keeps its effects in its own module, behind one class a test can
replace:
- ``process.py`` (``ProcessEffects``): spawning plugins, signals, process
  groups, /proc samples, pidfds.
- ``service.py`` (``ServiceEffects``): service managers, cgroups, cron, pid files
  (elkeidctl).
What both need lives here: ``signal_process`` (every signal either sends)
and ``ProcessIdentity`` (a process remembered so that a recycled pid is
never signalled in its place).
"""

import os
import signal

_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def proc_start_ticks(pid):
    """Start time of ``pid`` in clock ticks since boot (field 22 of
    /proc/PID/stat), or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ')': split after the last.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class ProcessIdentity:
    """One process as it was when first seen: pid, start time and, where
    the kernel has them (Linux >= 5.3), a pidfd. A pid alone names whatever
    process holds that number now; this names the process that was seen.

    ``pidfd`` pins the process itself (signals through it fail once it is
    reaped, whatever reuses the number); without one, the start time is
    compared before each signal."""

    __slots__ = ("pid", "start", "pidfd")

    def __init__(self, pid, start, pidfd=None):
        self.pid = pid
        self.start = start
        self.pidfd = pidfd

    @classmethod
    def capture(cls, pid, start=None, use_pidfd=True):
        """The live process ``pid``, or None when it is gone or (``start``
        given) is no longer the process that started at ``start``."""
        if pid <= 0:
            return None
        pidfd = None
        if use_pidfd and _HAVE_PIDFD:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # gone, a thread id, or a kernel without pidfds
                pidfd = None
        # Read after the pidfd is open: if the pid was reused in between, the
        # start time differs and the pidfd (of the new process) is dropped.
        now = proc_start_ticks(pid)
        if now is None or (start is not None and now != start):
            if pidfd is not None:
                os.close(pidfd)
            return None
        return cls(pid, now, pidfd)

    def is_current(self):
        """True while ``pid`` still names this process (a zombie counts:
        its pid, and so its process group, cannot be reused yet)."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return proc_start_ticks(self.pid) == self.start

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def __repr__(self):
        return "ProcessIdentity(%d, start=%s%s)" % (
            self.pid, self.start, ", pidfd" if self.pidfd is not None else "")


def signal_process(target, sig, group=False):
    """Send ``sig`` to a process. False when it is gone or not ours.

    ``target`` is a pid (> 0; < 0 names a process group) or a
    ``ProcessIdentity``, which is signalled only while it is still the same
    process (through its pidfd when it has one); with ``group=True`` the
    process group it leads is signalled, once the leader is verified.
    Refuses 0 and -1: the caller's own group and every process on the host
    are never what a bad pid file or a plugin that reported pgid 1 should
    be allowed to hit."""
    if isinstance(target, ProcessIdentity):
        return _signal_identity(target, sig, group)
    if group:
        raise ValueError("group=True needs a ProcessIdentity (the group leader)")
    if target in (0, -1):
        raise ValueError("refusing to signal pid %d" % target)
    try:
        os.kill(target, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_identity(ident, sig, group):
    if ident.pid <= 1:
        raise ValueError("refusing to signal pid %d" % ident.pid)
    try:
        if ident.pidfd is not None and not group:
            signal.pidfd_send_signal(ident.pidfd, sig)  # atomic: no window for reuse
            return True
        # No pidfd names a process group: verify the leader, then killpg.
        # While the leader (even a zombie) exists its pid, and so the group
        # id, cannot be reused; only the one syscall in between is open.
        if not ident.is_current():
            return False
        os.kill(-ident.pid if group else ident.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
