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
What both need lives here.
"""

import os


def signal_process(pid, sig):
    """Send ``sig`` to a process (pid > 0) or a process group (pid < 0).
    False when it is gone or not ours. Refuses 0 and -1: the caller's own
    group and every process on the host are never what a bad pid file or a
    plugin that reported pgid 1 should be allowed to hit."""
    if pid in (0, -1):
        raise ValueError("refusing to signal pid %d" % pid)
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
