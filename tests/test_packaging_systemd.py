"""The .deb under a live systemd: a Debian bookworm root booted with systemd
as PID 1 in a systemd-nspawn container.

The container shares this machine's network namespace, so the agent it
runs reaches a development AgentCenter on 127.0.0.1. In it: ``dpkg -i``
(post-install picks systemd mode, enables and starts the unit, which goes
active once the agent sends READY=1), the unit's MemoryMax/CPUQuota read
back from the agent's cgroup, the watchdog killing a SIGSTOPped agent and
systemd starting a new one, elkeidctl status/restart/stop/check/start in
systemd mode, and ``dpkg --purge`` leaving nothing behind.

How the container runs on a host without systemd (no system bus):
``systemd-nspawn --register=no --keep-unit --console=pipe`` with an init
script that first makes the cgroup v1 controllers writable (nspawn mounts
them read-only, and systemd then silently applies no limits) and then
execs systemd. Commands enter it with ``nsenter -t <its PID 1> -a``. The
container gets a cgroup of its own in every hierarchy of this machine,
under which its systemd makes its own; the fixture removes them all.

The root (minbase + systemd, dbus, python3) is built once by debootstrap
and cached (tests/debroot.py). Without root, systemd-nspawn or a container
that boots, this skips; in CI (CI=true) it fails instead.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from debroot import debian_arch, extract, rootfs_tar, tree, unavailable
from harness import DevCenterProc, wait_until
from test_packaging import packages  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3")
AGENT_ID = "systemd-agent-1"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 30
CTL = "/etc/elkeid/elkeidctl"
UNIT = "elkeid-agent"
INIT = "/var/tmp/elkeid-test-init"
# cgroup v1 controllers the agent's limits live in; nspawn mounts them
# read-only and systemd would apply nothing.
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
INIT_SCRIPT = """#!/bin/sh
for c in %s; do
    if [ -d /sys/fs/cgroup/$c ]; then
        mount -o remount,bind,rw /sys/fs/cgroup/$c || exit 1
    fi
done
exec /lib/systemd/systemd
""" % " ".join(CONTROLLERS)
# Where the tree comparison does not look: the kernel's, dpkg's and
# systemd's own state, logs, and the test's own files.
UNCOMPARED = ("proc/", "dev/", "sys/", "tmp/", "run/", "var/tmp/", "var/log/",
              "var/lib/dpkg/", "var/cache/debconf/", "var/lib/systemd/",
              "var/cache/ldconfig/", "root/elkeid-certs/")


def cgroup_hierarchies():
    """Our own cgroup directory in each mounted cgroup hierarchy (v1
    controllers, name=systemd, the v2 one)."""
    with open("/proc/cgroups") as f:
        subsys = {line.split()[0] for line in f if not line.startswith("#")}
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if not tail or tail[0] not in ("cgroup", "cgroup2"):
                continue
            key = frozenset() if tail[0] == "cgroup2" else frozenset(
                o for o in tail[2].split(",") if o in subsys or o.startswith("name="))
            mounts.setdefault(key, (fields[4], fields[3]))
    out = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            key = frozenset(n for n in names.split(",") if n)
            if key not in mounts:
                continue
            mount, root = mounts[key]
            if root != "/" and (path == root or path.startswith(root + "/")):
                path = path[len(root):] or "/"
            out.append(os.path.normpath(mount + "/" + path.lstrip("/")))
    return out


class Container:
    """A Debian root booted with systemd as PID 1 under systemd-nspawn."""

    def __init__(self, base):
        self.base = str(base)
        self.root = os.path.join(self.base, "root")
        self.name = "elkeid-test-%d-%d" % (os.getpid(), int(time.time() * 1000) % 100000)
        self.proc = None
        self.leader = None
        # A cgroup of its own in every hierarchy, so that what the
        # container's systemd creates (system.slice, the agent's unit...)
        # lives under it, apart from any other container on this machine,
        # and is removed with it.
        self.cgroups = [os.path.join(d, self.name) for d in cgroup_hierarchies()]
        extract(rootfs_tar(INCLUDE), self.root)
        with open(self.path(INIT), "w") as f:
            f.write(INIT_SCRIPT)
        os.chmod(self.path(INIT), 0o755)
        self.log_path = os.path.join(self.base, "nspawn.log")

    # ------------------------------------------------------------ lifecycle

    def boot(self):
        """Start the container; True once systemd says running (or
        degraded: the failed units are printed), False if it never does."""
        for d in self.cgroups:
            os.makedirs(d, exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # empty ones admit no process
                if os.path.exists(os.path.join(d, name)):
                    with open(os.path.join(os.path.dirname(d), name)) as f:
                        value = f.read()
                    with open(os.path.join(d, name), "w") as f:
                        f.write(value)
        log = open(self.log_path, "wb")
        enter = "for f in %s; do echo $$ > \"$f\"; done; exec \"$@\"" % " ".join(
            shlex.quote(os.path.join(d, "cgroup.procs")) for d in self.cgroups)
        self.proc = subprocess.Popen(
            ["sh", "-ec", enter, "sh", "systemd-nspawn", "-D", self.root, "-M", self.name,
             "--register=no", "--keep-unit", "--console=pipe", "--kill-signal=SIGRTMIN+3", INIT],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.leader is None:
                self.leader = self._find_leader()
            if self.leader is not None:
                rc, out, _err = self.run("systemctl", "is-system-running", timeout=10)
                state = out.strip()
                if state in ("running", "degraded"):
                    if state == "degraded":
                        print("container booted degraded; failed units:\n"
                              + self.run("systemctl", "--failed", "--no-legend")[1])
                    return True
            time.sleep(0.1)
        print("container did not boot (state %r); nspawn said:\n%s" % (state, self.nspawn_log()))
        return False

    def reboot(self):
        """Power off, then boot the same root again: True once it runs."""
        rc, out, err = self.run("systemctl", "poweroff", "--no-block", timeout=10)
        assert rc == 0, out + err
        self.proc.wait(30)
        self.leader = None
        return self.boot()

    def _find_leader(self):
        """The container's PID 1 (nspawn's child) once it runs systemd."""
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            return None
        for pid in children:
            try:
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == "systemd":
                        return pid
            except OSError:
                pass
        return None

    def nspawn_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-3000:]
        except OSError:
            return ""

    def close(self):
        """Power off (SIGTERM, then SIGKILL, if it will not), remove the
        cgroup directories the container left on this machine, and the root."""
        if self.proc is not None:
            if self.proc.poll() is None and self.leader is not None:
                self.run("systemctl", "poweroff", "--no-block", timeout=10)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    for pid in self.processes():
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    self.proc.kill()
                    self.proc.wait()
        self._remove_cgroups()
        propagate = "/run/systemd/nspawn/propagate/" + self.name
        try:
            os.rmdir(propagate)
        except OSError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _remove_cgroups(self):
        """The container's cgroups, deepest first (a cgroup goes once its
        last process has been reaped: retry for a few seconds)."""
        deadline = time.monotonic() + 10
        for top in self.cgroups:
            while os.path.isdir(top):
                for base, _dirs, _files in os.walk(top, topdown=False):
                    try:
                        os.rmdir(base)
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    print("cannot remove cgroup %s (still in use?)" % top)
                    break
                if os.path.isdir(top):
                    time.sleep(0.1)

    # ------------------------------------------------------------ inside

    def run(self, *argv, env=None, timeout=180):
        """Run ``argv`` in the container with a clean environment."""
        e = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
        e.update(env or {})
        cmd = (["nsenter", "-t", str(self.leader), "-a", "/usr/bin/env", "-i"]
               + ["%s=%s" % kv for kv in sorted(e.items())] + list(argv))
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        return (p.returncode, p.stdout.decode("utf-8", "replace"),
                p.stderr.decode("utf-8", "replace"))

    def sh(self, script):
        rc, out, err = self.run("sh", "-ec", script)
        assert rc == 0, "%r failed (%d): %s%s" % (script, rc, out, err)
        return out

    def show(self, *props):
        rc, out, err = self.run("systemctl", "show", UNIT, "--property=" + ",".join(props))
        assert rc == 0, out + err
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self):
        return self.run("journalctl", "--no-pager", "-o", "short-monotonic", "-u", UNIT)[1]

    def path(self, p):
        return os.path.join(self.root, p.lstrip("/"))

    def read(self, p):
        """A file as the container sees it (its /sys/fs/cgroup is its own view)."""
        rc, out, err = self.run("cat", p)
        assert rc == 0, err
        return out.strip()

    def processes(self):
        """Host pids of every process in the container's pid namespace."""
        if self.leader is None:
            return []
        try:
            ns = os.readlink("/proc/%d/ns/pid" % self.leader)
        except OSError:
            return []
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink("/proc/%s/ns/pid" % name) == ns:
                        out.append(int(name))
                except OSError:
                    pass
        return out

    def agent_processes(self):
        """Container processes running the agent's zipapp."""
        out = []
        for pid in self.processes():
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if b"/etc/elkeid/" in f.read():
                        out.append(pid)
            except OSError:
                pass
        return out

    def tree(self):
        return tree(self.root, UNCOMPARED)


@pytest.fixture
def container(tmp_path):
    if os.geteuid() != 0:
        unavailable("needs root (systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            unavailable("%s is not installed (./build.sh test installs it)" % tool)
    c = Container(tmp_path)
    try:
        if not c.boot():
            unavailable("a Debian root with systemd as PID 1 does not boot under "
                        "systemd-nspawn here within %d s:\n%s" % (BOOT_TIMEOUT, c.nspawn_log()))
        yield c
    finally:
        c.close()


def wait_active(c, not_pid=0, timeout=60):
    """MainPID once the unit is active with a main process other than ``not_pid``."""
    def ok():
        p = c.show("ActiveState", "SubState", "MainPID")
        pid = int(p["MainPID"])
        return pid if p["ActiveState"] == "active" and pid not in (0, not_pid) else None
    return wait_until(ok, timeout, 0.2, "%s active with a new main pid" % UNIT)


def last_beat(dc):
    """The id of the newest heartbeat stored (0: none yet)."""
    beats = dc.records(1000, AGENT_ID)
    return beats[-1]["id"] if beats else 0


def heartbeat_from(dc, pid, since, timeout=60):
    """A heartbeat stored after record ``since`` and sent by agent process
    ``pid`` (its own view of its pid)."""
    def found():
        return [r for r in dc.records(1000, AGENT_ID, after=since)
                if r["fields"].get("pid") == str(pid)]
    return wait_until(found, timeout, 0.2, "a heartbeat from agent pid %d" % pid)


def test_deb_under_a_live_systemd(container, packages, tmp_path):  # noqa: F811
    c = container
    dc = DevCenterProc(tmp_path / "devcenter")
    try:
        before = c.tree()
        # The server's CA and a client certificate, preseeded settings
        # naming them; the installer's environment adds the rest.
        shutil.copytree(dc.certs, c.path("/root/elkeid-certs"))
        os.makedirs(c.path("/etc/elkeid"), mode=0o700)
        with open(c.path("/etc/elkeid/specified_env"), "w") as f:
            f.write("ELKEID_CA=/root/elkeid-certs/ca.crt\n"
                    "ELKEID_CERT=/root/elkeid-certs/client.crt\n"
                    "ELKEID_KEY=/root/elkeid-certs/client.key\n")
        shutil.copy(packages[debian_arch(), "deb"], c.path("/var/tmp/elkeid-agent.deb"))

        # ---- install: post-install picks systemd, enables and starts the unit
        rc, out, err = c.run("dpkg", "-i", "/var/tmp/elkeid-agent.deb", env={
            "ELKEID_SERVER": dc.grpc, "SPECIFIED_AGENT_ID": AGENT_ID,
            "SPECIFIED_IDC": "nspawn", "DEBIAN_FRONTEND": "noninteractive"})
        print("dpkg -i said:\n" + out + err)
        assert rc == 0, out + err
        assert "elkeid-agent:" not in err and "warning" not in err.lower(), err
        with open(c.path("/etc/elkeid/specified_env")) as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line)
        assert env["service_type"] == "systemd" and env["SPECIFIED_AGENT_ID"] == AGENT_ID
        assert env["ELKEID_SERVER"] == dc.grpc and env["specified_idc"] == "nspawn"
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "enabled"
        assert c.run("systemctl", "is-active", UNIT)[1].strip() == "active"
        p = c.show("Type", "NotifyAccess", "StatusText", "MainPID", "WatchdogUSec",
                   "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        assert (p["Type"], p["NotifyAccess"], p["WatchdogUSec"]) == ("notify", "main", "3min")
        first_pid = int(p["MainPID"])
        # READY=1 arrived: a notify unit goes active only then, which is
        # after its main process started; the STATUS= line came with it.
        assert int(p["ActiveEnterTimestampMonotonic"]) > int(p["ExecMainStartTimestampMonotonic"])
        assert p["StatusText"], p

        # ---- the agent connected and its heartbeat is stored
        assert dc.wait_agent(AGENT_ID, timeout=60)["agent_id"] == AGENT_ID
        beat = heartbeat_from(dc, first_pid, since=0)[0]
        assert beat["fields"]["idc"] == "nspawn"
        wait_until(lambda: c.show("StatusText")["StatusText"].startswith("connected to "),
                   30, 0.2, "StatusText to say the agent is connected")
        assert dc.grpc in c.show("StatusText")["StatusText"]
        # One process, started with the zipapp's default Python; no
        # notification was refused (NotifyAccess=main: a forking wrapper
        # would have its READY=1 dropped).
        assert c.agent_processes() and len(c.agent_processes()) == 1
        assert "reception only permitted for main PID" not in c.journal()

        # ---- limits: MemoryMax=250M and CPUQuota=10% in the agent's cgroup
        cg = c.show("ControlGroup")["ControlGroup"]
        assert cg == "/system.slice/elkeid-agent.service"
        v1 = c.run("test", "-d", "/sys/fs/cgroup/memory")[0] == 0
        if v1:
            assert int(c.read("/sys/fs/cgroup/memory%s/memory.limit_in_bytes" % cg)) == 250 << 20
            quota = int(c.read("/sys/fs/cgroup/cpu%s/cpu.cfs_quota_us" % cg))
            period = int(c.read("/sys/fs/cgroup/cpu%s/cpu.cfs_period_us" % cg))
            assert quota * 10 == period, (quota, period)
            for ctrl in ("memory", "cpu"):
                procs = c.read("/sys/fs/cgroup/%s%s/cgroup.procs" % (ctrl, cg)).split()
                assert str(first_pid) in procs, (ctrl, procs)
        else:  # cgroup v2
            assert int(c.read("/sys/fs/cgroup%s/memory.max" % cg)) == 250 << 20
            quota, period = c.read("/sys/fs/cgroup%s/cpu.max" % cg).split()
            assert int(quota) * 10 == int(period)
            assert str(first_pid) in c.read("/sys/fs/cgroup%s/cgroup.procs" % cg).split()
        rc, out, err = c.run(CTL, "cgroup", "--json")
        facts = json.loads(out)
        assert rc == 0 and facts["ControlGroup"] == cg and facts["MemoryMax"] == "262144000"
        assert facts["CPUQuotaPerSecUSec"] == "100ms"

        # ---- upgrade (the same package again) with the agent running: the
        # post-install enables, reloads and cleans up, and leaves the agent
        # alone, files in its tmp/ included (here: the debug endpoint's address)
        c.sh("kill -USR1 %d" % first_pid)
        addr = "/etc/elkeid/tmp/debug.addr"
        wait_until(lambda: os.path.exists(c.path(addr)), 20, 0.1, "the debug endpoint")
        rc, out, err = c.run("dpkg", "-i", "/var/tmp/elkeid-agent.deb",
                             env={"DEBIAN_FRONTEND": "noninteractive"})
        assert rc == 0 and "elkeid-agent:" not in err, out + err
        assert "over (3:" in out  # dpkg took it as an upgrade
        assert c.show("MainPID", "ActiveState") == {"MainPID": str(first_pid),
                                                     "ActiveState": "active"}
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "enabled"
        assert os.path.exists(c.path(addr)), "cleanup removed a running agent's tmp/"
        c.sh("kill -USR1 %d" % first_pid)
        wait_until(lambda: not os.path.exists(c.path(addr)), 20, 0.1, "the debug endpoint to close")

        # ---- elkeidctl in systemd mode
        rc, out, err = c.run(CTL, "status")
        assert rc == 0 and "active (running) (pid %d" % first_pid in out, out + err
        assert "service type  systemd" in out
        rc, out, err = c.run(CTL, "status", "--json")
        info = json.loads(out)
        assert rc == 0, out + err
        assert (info["state"], info["pid"], info["running"], info["enabled"]) == \
            ("active (running)", first_pid, True, True)
        assert info["service_type"] == "systemd" and info["agent_id"] == AGENT_ID
        assert info["processes"] == [first_pid] and info["idc"] == "nspawn"
        assert c.run(CTL, "check") == (0, "", "")  # systemd supervises: nothing to do

        since = last_beat(dc)
        rc, out, err = c.run(CTL, "restart")
        assert rc == 0, out + err
        second_pid = wait_active(c, not_pid=first_pid)
        heartbeat_from(dc, second_pid, since)
        assert json.loads(c.run(CTL, "status", "--json")[1])["pid"] == second_pid

        # disable: not started at boot, still a unit systemd knows (its
        # watchdog and notifications work, restart works); enable again
        rc, out, err = c.run(CTL, "disable")
        assert rc == 0, out + err
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "linked"
        info = json.loads(c.run(CTL, "status", "--json")[1])
        assert (info["state"], info["pid"], info["enabled"]) == \
            ("active (running)", second_pid, False), info
        assert c.show("LoadState", "NotifyAccess") == {"LoadState": "loaded",
                                                        "NotifyAccess": "main"}
        rc, out, err = c.run(CTL, "restart")
        assert rc == 0, out + err
        second_pid = wait_active(c, not_pid=second_pid)
        rc, out, err = c.run(CTL, "enable")
        assert rc == 0, out + err
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "enabled"
        assert json.loads(c.run(CTL, "status", "--json")[1])["enabled"] is True

        rc, out, err = c.run(CTL, "stop")
        assert rc == 0, out + err
        assert c.run("systemctl", "is-active", UNIT)[1].strip() == "inactive"
        rc, out, err = c.run(CTL, "status", "--json")
        assert rc == 3 and json.loads(out)["state"] == "inactive (dead)", out + err
        assert c.agent_processes() == []
        # check leaves a stopped unit alone in systemd mode: systemd restarts
        # what fails, and a stop is the operator's decision.
        assert c.run(CTL, "check") == (0, "", "")
        assert c.run("systemctl", "is-active", UNIT)[1].strip() == "inactive"
        since = last_beat(dc)
        rc, out, err = c.run(CTL, "start")
        assert rc == 0, out + err
        third_pid = wait_active(c, not_pid=second_pid)
        heartbeat_from(dc, third_pid, since)

        # ---- watchdog: a stopped (wedged) agent is killed and restarted.
        # 180 s is too long for a test: a drop-in makes it 6 s.
        dropin = "/etc/systemd/system/elkeid-agent.service.d"
        since = last_beat(dc)
        c.sh("mkdir -p %s && printf '[Service]\\nWatchdogSec=6s\\nRestartSec=1s\\n' > %s/test.conf"
             " && systemctl daemon-reload && systemctl restart %s" % (dropin, dropin, UNIT))
        p = c.show("WatchdogUSec", "NRestarts", "MainPID", "ActiveState")
        assert p["WatchdogUSec"] == "6s" and p["ActiveState"] == "active", p
        wd_pid, restarts = int(p["MainPID"]), int(p["NRestarts"])
        heartbeat_from(dc, wd_pid, since)
        # A healthy agent feeds the watchdog: no restart for more than a period.
        time.sleep(7)
        p = c.show("NRestarts", "MainPID")
        assert (int(p["NRestarts"]), int(p["MainPID"])) == (restarts, wd_pid), c.journal()
        since = last_beat(dc)
        c.sh("kill -STOP %d" % wd_pid)

        def restarted():
            p = c.show("NRestarts", "ActiveState", "MainPID")
            pid = int(p["MainPID"])
            return pid if (int(p["NRestarts"]) == restarts + 1 and p["ActiveState"] == "active"
                           and pid not in (0, wd_pid)) else None
        new_pid = wait_until(restarted, 40, 0.2,
                             "the watchdog to kill the stopped agent and systemd to restart it")
        journal = c.journal()
        assert "Watchdog timeout (limit 6s)" in journal, journal
        assert "Failed with result 'watchdog'" in journal, journal
        assert c.run("test", "-e", "/proc/%d" % wd_pid)[0] != 0  # killed, not just replaced
        heartbeat_from(dc, new_pid, since)  # the new agent reconnected
        assert json.loads(c.run(CTL, "status", "--json")[1])["restarts"] == restarts + 1
        c.sh("rm -r %s && systemctl daemon-reload" % dropin)
        journal = c.journal()
        print("the unit's journal:\n" + journal)
        assert "Traceback" not in journal
        assert "Got notification message" not in journal  # none refused

        # ---- enabled: the agent starts at boot
        since = last_beat(dc)
        assert c.reboot(), "the container did not boot again"
        boot_pid = wait_active(c)
        heartbeat_from(dc, boot_pid, since)
        assert c.show("NRestarts")["NRestarts"] == "0"

        # ---- purge with the agent running: nothing of it remains
        rc, out, err = c.run("dpkg", "--purge", UNIT, env={"DEBIAN_FRONTEND": "noninteractive"})
        print("dpkg --purge said:\n" + out + err)
        assert rc == 0, out + err
        assert "failed" not in err and "warning" not in err, err
        assert c.show("LoadState", "ActiveState") == {"LoadState": "not-found",
                                                       "ActiveState": "inactive"}
        # The unit stayed loaded while it was stopped (its notifications
        # were heard), and was unlinked only then.
        assert "Got notification message" not in c.journal(), c.journal()
        assert not os.path.exists(c.path("/etc/elkeid"))
        assert c.agent_processes() == []
        unit_cgroups = ["/sys/fs/cgroup/%s%s" % (ctrl, cg) for ctrl in ("memory", "cpu", "pids")] \
            if v1 else ["/sys/fs/cgroup" + cg]
        wait_until(lambda: all(c.run("test", "-e", d)[0] != 0 for d in unit_cgroups), 10, 0.2,
                   "systemd to remove the unit's cgroups %s" % unit_cgroups)
        shutil.rmtree(c.path("/root/elkeid-certs"))
        os.unlink(c.path("/var/tmp/elkeid-agent.deb"))
        after = c.tree()
        assert after - before == set(), "left behind: %s" % sorted(after - before)
        assert before - after == set(), "removed: %s" % sorted(before - after)
    finally:
        dc.stop()
