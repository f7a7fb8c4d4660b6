"""The one seam between the agent and the operating system's side effects.

Everything that changes the host beyond the agent's own files goes through
here: spawning and killing processes (plugins, services), cgroup writes,
service managers (systemctl, update-rc.d, chkconfig), package managers
(dpkg, rpm). Tests substitute a recording fake for the real thing; the real
implementation is collected in one place so a reviewer can audit what the
agent may do to a host.

Each area keeps its effects in its own module and the ``System`` class here
combines them:
- ``process.py``: spawning plugin/service processes, signals, process groups.
- ``service.py``: service managers, cgroups, cron, pid files (elkeidctl).
"""
