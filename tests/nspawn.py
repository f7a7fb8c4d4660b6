"""A Debian bookworm root booted with systemd as PID 1 in a systemd-nspawn
container, for the tests that need a live systemd (the .deb's unit in
test_packaging_systemd.py, local services as transient units in
test_services_live_systemd.py).

How the container runs on a host without systemd (no system bus):
``systemd-nspawn --register=no --keep-unit --console=pipe`` with an init
script that first makes the cgroup v1 controllers writable (nspawn mounts
them read-only, and systemd then silently applies no limits) and then
execs systemd. Commands enter it with ``nsenter -t <its PID 1> -a``. The
container gets a cgroup of its own in every hierarchy of this machine,
under which its systemd makes its own; the fixture removes them all.

The root (minbase + systemd, dbus, python3) is built once by debootstrap
and cached (tests/debroot.py). Without root, systemd-nspawn or a container
that boots, the ``container`` fixture skips; in CI (CI=true) it fails.
"""

import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from debroot import extract, rootfs_tar, tree, unavailable
from harness import wait_until

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


DEB = "/var/tmp/elkeid-agent.deb"


def install(c, dc, deb):
    """Preseed the settings and ``dpkg -i`` the package ``deb`` in the
    container: the development AgentCenter ``dc``'s CA and a client
    certificate under /root/elkeid-certs, an /etc/elkeid/specified_env
    naming them; the installer's environment adds the server, the agent id
    (AGENT_ID) and the IDC ("nspawn"). Returns dpkg's (rc, stdout, stderr)."""
    shutil.copytree(dc.certs, c.path("/root/elkeid-certs"))
    os.makedirs(c.path("/etc/elkeid"), mode=0o700)
    with open(c.path("/etc/elkeid/specified_env"), "w") as f:
        f.write("ELKEID_CA=/root/elkeid-certs/ca.crt\n"
                "ELKEID_CERT=/root/elkeid-certs/client.crt\n"
                "ELKEID_KEY=/root/elkeid-certs/client.key\n")
    shutil.copy(deb, c.path(DEB))
    return c.run("dpkg", "-i", DEB, env={
        "ELKEID_SERVER": dc.grpc, "SPECIFIED_AGENT_ID": AGENT_ID,
        "SPECIFIED_IDC": "nspawn", "DEBIAN_FRONTEND": "noninteractive"})
