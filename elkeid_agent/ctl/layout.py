"""Where Elkeid keeps things on a host (docs/protocol.md section 7), the limits the
service runs under, and elkeidctl's exit codes. The same names and values as
the Go elkeidctl (agent/deploy/control/cmd/root.go), so a host moves between
the two without a trace.
"""

import os

SERVICE = "elkeid-agent"
SERVICE_TYPES_HELP = "systemd|sysvinit"
WORKDIR = "/etc/elkeid"
AGENT = WORKDIR + "/elkeid-agent"
CTL = WORKDIR + "/elkeidctl"
SPECIFIED_ENV = WORKDIR + "/specified_env"
MACHINE_ID = WORKDIR + "/machine-id"
UNIT_FILE = WORKDIR + "/elkeid-agent.service"
SYSVINIT_SOURCE = WORKDIR + "/elkeid-agent.sysvinit"
CRON_SOURCE = WORKDIR + "/elkeid-agent.cron"
CGROUP_MOUNTS = WORKDIR + "/cgroup"
PLUGIN_DIR = WORKDIR + "/plugin"
TMP_DIR = WORKDIR + "/tmp"
LOG_FILE = WORKDIR + "/log/elkeid-agent.log"

INIT_SCRIPT = "/etc/init.d/elkeid-agent"
CRON_FILE = "/etc/cron.d/elkeid-agent"
AGENT_PIDFILE = "/var/run/elkeid-agent.pid"
CTL_PIDFILE = "/var/run/elkeidctl.pid"
# Older Elkeid releases mounted their cgroup hierarchies here.
LEGACY_CGROUP = "/elkeid-agent"

# The one cron line (Go: crontabContent). packaging/elkeid-agent.cron holds
# the same text; a test keeps the two equal.
CRON_LINE = "* * * * * root /etc/elkeid/elkeidctl check\n"

# The Go agent's environment under sysvinit: specified_env plus this PATH.
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Limits, as the systemd unit sets them (CPUQuota=10%, MemoryMax=250M).
CPU_PERCENT = 10
CPU_QUOTA_MIN_US = 10000
MEMORY_MAX = 262144000  # 250 MiB, the Go elkeidctl's number

# How long stop waits after SIGTERM before SIGKILL (Go: 30 s).
STOP_TIMEOUT = 30.0
# After the agent itself has exited, how long its plugins get before they
# are sent SIGTERM themselves (the agent normally stops them first).
ORPHAN_GRACE = 3.0
# How long start waits to see the agent take its pid file. The first start
# of a new zipapp extracts it, which takes a few seconds on a slow disk.
START_TIMEOUT = 30.0
# How long start/stop/restart wait for another elkeidctl to finish.
LOCK_TIMEOUT = 90.0

# Exit codes. 0-4 and 6 follow the LSB init-script conventions
# (status: 1 dead but pid file exists, 3 not running; 4 insufficient
# privilege; 5 not installed; 6 not configured).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PRIVILEGE = 4
EXIT_NOT_INSTALLED = 5
EXIT_NOT_CONFIGURED = 6
EXIT_BUSY = 75  # EX_TEMPFAIL: another elkeidctl holds the lock; try later


class Paths:
    """The workdir-relative paths above for one workdir (``elkeidctl
    --workdir DIR`` or ``ELKEID_WORKDIR``; default /etc/elkeid). Paths outside
    the workdir (init script, cron file, pid files) do not move."""

    def __init__(self, workdir=WORKDIR):
        w = os.path.normpath(os.path.abspath(workdir))
        self.workdir = w
        self.agent = w + "/elkeid-agent"
        self.ctl = w + "/elkeidctl"
        self.specified_env = w + "/specified_env"
        self.machine_id = w + "/machine-id"
        self.unit_file = w + "/elkeid-agent.service"
        self.sysvinit_source = w + "/elkeid-agent.sysvinit"
        self.cron_source = w + "/elkeid-agent.cron"
        self.cgroup_mounts = w + "/cgroup"
        self.plugin_dir = w + "/plugin"
        self.tmp_dir = w + "/tmp"
        self.log_file = w + "/log/elkeid-agent.log"
        # The agent's local control socket (elkeid_agent/runtime/ctlsock.py).
        self.control_socket = w + "/tmp/control.sock"

    @property
    def default(self):
        return self.workdir == WORKDIR


class CtlError(Exception):
    """A failure with a message for the user and an exit code."""

    def __init__(self, message, code=EXIT_FAILURE):
        super().__init__(message)
        self.code = code
