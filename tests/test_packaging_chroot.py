"""Install the built .deb into a debootstrap'd Debian root and run it.

In a chroot (inside a private mount namespace, so nothing it mounts outlives
the test) the package's post-install picks sysvinit mode (no systemd runs
there), starts the agent with elkeidctl, and the agent connects to a
development AgentCenter on 127.0.0.1. Then: status, a crash with its pid
file left behind, the cron job's command restarting it, two checks at once,
stop, removal, and a comparison of the whole file tree with the one before
installation: nothing may be left behind.

The Debian root is built once by debootstrap (bookworm, minbase, python3 and
cron) and cached as a tar (tests/debroot.py: under /var/tmp/elkeid-agent-tests/
unless $ELKEID_TEST_CACHE says otherwise).
"""

import json
import os
import shutil
import signal
import subprocess

import pytest

from debroot import debian_arch, extract, rootfs_tar, tree, unavailable
from harness import DevCenterProc, wait_until
from test_packaging import VERSION, packages  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

INCLUDE = ("python3", "cron")
AGENT_ID = "chroot-agent-1"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the tree comparison does not look: dpkg's and the kernel's own state.
UNCOMPARED = ("proc/", "dev/", "tmp/", "var/lib/dpkg/", "var/log/", "var/cache/debconf/",
              "root/elkeid-certs/", "run/", "var/lib/rpm/", "usr/lib/sysimage/rpm/",
              "var/tmp/")


class Chroot:
    def __init__(self, base):
        self.root = str(base / "root")
        extract(rootfs_tar(INCLUDE), self.root)
        # A private mount namespace, kept alive by a sleeping process; every
        # command enters it. Its mounts vanish with it.
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private",
                                        "sleep", "3600"])
        wait_until(lambda: os.readlink("/proc/%d/ns/mnt" % self.holder.pid)
                   != os.readlink("/proc/self/ns/mnt"), 10, what="the mount namespace")
        empty = os.path.join(str(base), "empty")
        open(empty, "w").close()
        self.host_sh("mount -t proc proc {r}/proc && mount --bind /dev {r}/dev && "
                     # No cgroups in here: elkeidctl must not touch this machine's.
                     "mount --bind %s {r}/proc/cgroups" % empty)
        # cron must not run on its own here: the test runs its job itself.
        os.chmod(os.path.join(self.root, "usr/sbin/cron"), 0o644)

    def host_sh(self, script):
        p = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "sh", "-ec",
                            script.format(r=self.root)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=120)
        assert p.returncode == 0, p.stderr.decode()

    def host_run(self, *argv, env=None):
        """A command of this machine (not the chroot's) in the namespace."""
        p = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m"] + list(argv),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300,
                           env=env)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8",
                                                                                 "replace")

    def run(self, *argv, env=None, timeout=180):
        e = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}
        e.update(env or {})
        cmd = ["nsenter", "-t", str(self.holder.pid), "-m", "chroot", self.root,
               "/usr/bin/env", "-i"] + ["%s=%s" % kv for kv in sorted(e.items())] + list(argv)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8",
                                                                                 "replace")

    def path(self, p):
        return os.path.join(self.root, p.lstrip("/"))

    def processes(self):
        """pids of processes whose root is this chroot (agent, plugins, cron)."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink("/proc/%s/root" % name) == self.root:
                        out.append(int(name))
                except OSError:
                    pass
        return out

    def tree(self):
        return tree(self.root, UNCOMPARED)

    def close(self):
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.holder.kill()
        self.holder.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def chroot(tmp_path):
    if os.geteuid() != 0:
        unavailable("needs root (chroot, mount namespaces)")
    for tool in ("debootstrap", "unshare", "nsenter", "chroot"):
        if not shutil.which(tool):
            unavailable("%s is not installed (./build.sh test installs it)" % tool)
    c = Chroot(tmp_path)
    yield c
    c.close()


def test_deb_in_a_debian_chroot_sysvinit_end_to_end(chroot, packages, tmp_path):  # noqa: F811
    c = chroot
    dc = DevCenterProc(tmp_path / "devcenter")
    try:
        before = c.tree()
        # The server's CA and a client certificate, and the settings the
        # admin preseeds; the installer's environment adds the rest.
        shutil.copytree(dc.certs, c.path("/root/elkeid-certs"))
        os.makedirs(c.path("/etc/elkeid"), mode=0o700)
        with open(c.path("/etc/elkeid/specified_env"), "w") as f:
            f.write("ELKEID_CA=/root/elkeid-certs/ca.crt\n"
                    "ELKEID_CERT=/root/elkeid-certs/client.crt\n"
                    "ELKEID_KEY=/root/elkeid-certs/client.key\n")
        shutil.copy(packages[debian_arch(), "deb"], c.path("/tmp/elkeid-agent.deb"))

        # ---- install: post-install in sysvinit mode starts the agent
        rc, out, err = c.run("dpkg", "-i", "/tmp/elkeid-agent.deb", env={
            "ELKEID_SERVER": dc.grpc, "SPECIFIED_AGENT_ID": AGENT_ID, "SPECIFIED_IDC": "chroot"})
        assert rc == 0, out + err
        print("dpkg -i said:\n" + out + err)
        assert "elkeid-agent: post-install failed" not in err
        assert "no cgroup support found" in err  # the one warning, shown
        with open(c.path("/etc/elkeid/specified_env")) as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line)
        assert env["service_type"] == "sysvinit" and env["SPECIFIED_AGENT_ID"] == AGENT_ID
        assert env["ELKEID_SERVER"] == dc.grpc and env["specified_idc"] == "chroot"
        assert env["ELKEID_CA"] == "/root/elkeid-certs/ca.crt"  # preseeded values kept
        assert os.path.exists(c.path("/etc/init.d/elkeid-agent"))
        assert [n for n in os.listdir(c.path("/etc/rc2.d")) if n.endswith("elkeid-agent")]
        with open(c.path("/etc/cron.d/elkeid-agent")) as f:
            cron_line = f.read()
        assert cron_line == "* * * * * root /etc/elkeid/elkeidctl check\n"

        conn = dc.wait_agent(AGENT_ID, timeout=90)
        assert conn["agent_id"] == AGENT_ID
        rc, out, err = c.run("/etc/elkeid/elkeidctl", "status", "--json")
        info = json.loads(out)
        assert rc == 0 and info["state"] == "running", out + err
        first_pid = info["pid"]
        assert c.run("/etc/init.d/elkeid-agent", "status")[0] == 0
        assert c.run("/etc/elkeid/elkeidctl", "check") == (0, "", "")
        assert os.path.isdir(c.path("/var/cache/elkeid-agent"))  # no HOME: root's cache

        # ---- crash: the pid file names a dead process; status says so
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: c.run("/etc/elkeid/elkeidctl", "status")[0] == 1, 20,
                   what="status to report a dead agent")
        rc, out, err = c.run("/etc/elkeid/elkeidctl", "status")
        assert "names pid %d, which is not running" % first_pid in out

        # ---- two checks at once: the second says so and does nothing
        locker = subprocess.Popen(
            ["nsenter", "-t", str(c.holder.pid), "-m", "chroot", c.root, "python3", "-c",
             "import fcntl, os, sys, time\n"
             "fd = os.open('/var/run/elkeidctl.pid', os.O_RDWR | os.O_CREAT, 0o644)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid())\n"
             "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
        try:
            assert locker.stdout.readline().strip() == b"locked"
            rc, out, err = c.run("/etc/elkeid/elkeidctl", "check")
            assert rc == 75, out + err
            assert "another elkeidctl (pid" in err and "not running this check" in err
            assert c.run("/etc/elkeid/elkeidctl", "status")[0] == 1  # still dead
        finally:
            locker.kill()
            locker.wait()

        # ---- the cron job's command brings it back
        beats = len(dc.records(1000, AGENT_ID))
        command = cron_line.split(None, 6)[6].split()
        rc, out, err = c.run(*command)
        assert rc == 0, out + err
        assert "was not running; started" in out
        rc, out, err = c.run("/etc/elkeid/elkeidctl", "status", "--json")
        assert json.loads(out)["pid"] != first_pid
        # A new agent process sends its first heartbeat as soon as it connects.
        wait_until(lambda: len(dc.records(1000, AGENT_ID)) > beats, 90,
                   what="the restarted agent's first heartbeat")

        # ---- stop
        rc, out, err = c.run("/etc/elkeid/elkeidctl", "stop")
        assert rc == 0 and "elkeid-agent stopped" in out, out + err
        assert not os.path.exists(c.path("/etc/cron.d/elkeid-agent"))
        assert c.run("/etc/elkeid/elkeidctl", "status")[0] == 3
        assert c.processes() == []

        # ---- start again, then remove the package with the agent running
        assert c.run("/etc/init.d/elkeid-agent", "start")[0] == 0
        assert c.run("/etc/elkeid/elkeidctl", "status")[0] == 0
        rc, out, err = c.run("dpkg", "-r", "elkeid-agent")
        assert rc == 0, out + err
        assert "failed" not in err
        assert c.processes() == []
        shutil.rmtree(c.path("/root/elkeid-certs"))
        after = c.tree()
        assert after - before == set(), "left behind: %s" % sorted(after - before)
        assert before - after == set(), "removed: %s" % sorted(before - after)
    finally:
        dc.stop()


def test_rpm_scriptlets_install_and_erase_in_a_chroot(chroot, packages, tmp_path):  # noqa: F811
    """rpm runs the scriptlets with its own arguments (1 on install, 0 on
    erase) inside the root: the same end result as the .deb."""
    if not shutil.which("rpm"):
        unavailable("rpm is not installed (./build.sh test installs it)")
    c = chroot
    before = c.tree()
    # TLS files (without them the agent refuses to start) and an endpoint
    # nothing listens on: it keeps retrying.
    dc = DevCenterProc(tmp_path / "certs-only")
    dc.stop()
    shutil.copytree(dc.certs, c.path("/root/elkeid-certs"))
    os.makedirs(c.path("/etc/elkeid"), mode=0o700)
    with open(c.path("/etc/elkeid/specified_env"), "w") as f:
        f.write("ELKEID_SERVER=127.0.0.1:9\n"
                "ELKEID_CA=/root/elkeid-certs/ca.crt\n"
                "ELKEID_CERT=/root/elkeid-certs/client.crt\n"
                "ELKEID_KEY=/root/elkeid-certs/client.key\n")
    rpm = ["rpm", "--root=" + c.root, "--dbpath=/var/lib/rpm", "--nodeps"]
    env = {"PATH": BASE_PATH, "SPECIFIED_AGENT_ID": "rpm-agent"}
    rc, out, err = c.host_run(*(rpm + ["-i", packages[debian_arch(), "rpm"]]), env=env)
    assert rc == 0, out + err
    assert "post-install failed" not in err
    rc, out, err = c.run("/etc/elkeid/elkeidctl", "status", "--json")
    info = json.loads(out)
    assert rc == 0 and info["state"] == "running" and info["service_type"] == "sysvinit"
    assert c.processes() == [info["pid"]]
    rc, out, err = c.host_run(*(rpm + ["-e", "elkeid-agent"]), env=env)
    assert rc == 0, out + err
    assert c.processes() == []
    shutil.rmtree(c.path("/root/elkeid-certs"))
    after = c.tree()
    assert after - before == set(), "left behind: %s" % sorted(after - before)
    assert before - after == set(), "removed: %s" % sorted(before - after)
