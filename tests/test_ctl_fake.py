"""A recording fake of the elkeidctl OS-effects seam (a helper module: no tests here).

Files are real, inside a temporary root (``ServiceEffects(root=tmp)``), so
the control logic's own file handling is what runs. Processes, signals,
service-manager tools, mounts, locks and the clock are simulated: every call
is recorded in ``fx.calls`` and time only moves when the code sleeps, so a
30-second stop timeout costs nothing.
"""

import itertools
import os
import signal

from elkeid_agent.osfx import ProcessIdentity
from elkeid_agent.osfx.service import Completed, Proc, ServiceEffects

CTL_PID = 5000
SHELL_PID = 4000
# Start times (clock ticks since boot): a later process with a reused pid
# has a later one, which is how the real seam tells them apart.
_TICKS = itertools.count(100)


class FakeProc:
    def __init__(self, pid, ppid, pgid=None, exe=None, cwd="/", on_term="exit"):
        self.pid, self.ppid = pid, ppid
        self.pgid = pgid if pgid is not None else pid
        self.exe, self.cwd = exe, cwd
        self.on_term = on_term  # "exit" | "exit_tree" | "ignore"
        self.start = next(_TICKS)
        self.alive = True
        self.exit_status = None


class FakeChild:
    def __init__(self, fx, proc):
        self.fx, self.proc, self.pid = fx, proc, proc.pid

    def poll(self):
        return None if self.proc.alive else self.proc.exit_status


class FakeFx(ServiceEffects):
    def __init__(self, root):
        super().__init__(str(root))
        self.calls = []
        self.euid = 0
        self.clock = 1000.0
        self.later = []  # (fake time, action) run by sleep()
        self.tools = {"systemctl", "service", "update-rc.d", "mount", "umount"}
        self.results = {}  # tuple(argv[1:]) prefix -> Completed
        self.procs = {1: FakeProc(1, 0, exe="/sbin/init"),
                      SHELL_PID: FakeProc(SHELL_PID, 1, exe="/bin/sh"),
                      CTL_PID: FakeProc(CTL_PID, SHELL_PID, exe="/usr/bin/python3")}
        self.next_pid = 7000
        # What a spawned agent does: "lock" (takes the pid file), "exit"
        # (dies at once with status 1), "hang" (runs, never locks).
        self.spawn_behavior = "lock"
        self.spawn_plugins = ()  # names of plugin children the agent starts
        self.locks = {}  # host path -> holder pid
        for d in ("etc/elkeid", "var/run", "proc", "etc/init.d"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.write_proc_cgroup(CTL_PID, "0::/user.slice\n")

    # ------------------------------------------------------------ helpers

    def write(self, path, text, mode=0o644):
        real = self.host(path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        with open(real, "w") as f:
            f.write(text)
        os.chmod(real, mode)

    def read(self, path):
        with open(self.host(path)) as f:
            return f.read()

    def write_proc_cgroup(self, pid, text):
        self.write("/proc/%d/cgroup" % pid, text)

    def add_proc(self, pid, ppid, **kw):
        self.procs[pid] = FakeProc(pid, ppid, **kw)
        return self.procs[pid]

    def commands(self):
        return [c[1] for c in self.calls if c[0] == "run"]

    def signals(self):
        return [(c[1], c[2]) for c in self.calls if c[0] == "kill"]

    def configure(self, text):
        self.write("/etc/elkeid/specified_env", text, 0o600)

    def install_agent(self):
        self.write("/etc/elkeid/elkeid-agent", "#!/bin/sh\n", 0o700)

    def hold(self, path, pid):
        """A live process ``pid`` holds the pid-file lock ``path``."""
        self.locks[path] = pid
        self.write(path, "%d\n" % pid)

    # ------------------------------------------------------------ seam

    def geteuid(self):
        return self.euid

    def getpid(self):
        return CTL_PID

    def which(self, name):
        return "/usr/bin/" + name if name in self.tools else None

    def run(self, argv, capture=True, timeout=120):
        self.calls.append(("run", [os.path.basename(argv[0])] + list(argv[1:])))
        args = tuple(argv[1:])
        for prefix, result in self.results.items():
            if prefix[0] == os.path.basename(argv[0]) and args[:len(prefix) - 1] == prefix[1:]:
                return result
        return Completed(0, "")

    def processes(self):
        return {p.pid: Proc(p.pid, p.ppid, p.pgid, p.start)
                for p in self.procs.values() if p.alive}

    def identify(self, proc):
        p = self.procs.get(proc.pid)
        if p is None or not p.alive or p.start != proc.start:
            return None
        return ProcessIdentity(p.pid, p.start)

    def alive(self, pid):
        p = self.procs.get(pid)
        return p is not None and p.alive

    def proc_link(self, pid, what):
        p = self.procs.get(pid)
        if p is None or not p.alive:
            return None
        return p.exe if what == "exe" else p.cwd

    def kill(self, pid, sig, group=False):
        if isinstance(pid, ProcessIdentity):
            # As osfx.signal_process: only the process that was identified.
            p = self.procs.get(pid.pid)
            if p is None or p.start != pid.start:
                self.calls.append(("kill-refused", pid.pid, sig))
                return False
            pid = -pid.pid if group else pid.pid
        if pid in (0, -1):  # as osfx.signal_process: never our group, never everything
            raise ValueError("refusing to signal pid %d" % pid)
        self.calls.append(("kill", pid, sig))
        targets = ([p for p in self.procs.values() if p.pgid == -pid and p.alive] if pid < 0
                   else [self.procs[pid]] if pid in self.procs and self.procs[pid].alive else [])
        for p in targets:
            if sig == signal.SIGKILL or p.on_term in ("exit", "exit_tree"):
                if p.on_term == "exit_tree" and sig == signal.SIGTERM:
                    # A graceful agent stops its plugins before it exits.
                    for child in list(self.procs.values()):
                        if child.ppid == p.pid and child.alive:
                            self._exit(child, 0)
                self._exit(p, -sig)
        return bool(targets)

    def _exit(self, p, status):
        p.alive = False
        p.exit_status = status
        for path, holder in list(self.locks.items()):
            if holder == p.pid:
                del self.locks[path]  # the kernel drops a dead holder's flock
        for child in self.procs.values():
            if child.ppid == p.pid and child.alive:
                child.ppid = 1
        for cg in self._cgroup_procs_files():
            text = self.read(cg)
            kept = [w for w in text.split() if w != str(p.pid)]
            self.write(cg, "".join(w + "\n" for w in kept))

    def _cgroup_procs_files(self):
        out = []
        for base, _dirs, files in os.walk(self.host("/sys/fs/cgroup")):
            if "cgroup.procs" in files:
                out.append("/" + os.path.relpath(os.path.join(base, "cgroup.procs"), self.root))
        return out

    def write_control(self, path, text):
        self.calls.append(("control", path, text))
        if path.endswith("/cgroup.procs"):
            current = self.read(path).split() if self.exists(path) else []
            if text not in current:
                current.append(text)
            self.write(path, "".join(w + "\n" for w in current))
            self._note_membership(int(text), path[:-len("/cgroup.procs")])
            return
        self.write(path, text)

    def _note_membership(self, pid, cgdir):
        """Keep /proc/<pid>/cgroup in step, as the kernel does."""
        parts = cgdir.split("/")
        if "elkeid-agent" in parts:
            i = parts.index("elkeid-agent")
            hier, cgpath = parts[i - 1], "/" + "/".join(parts[i:])
        else:
            hier, cgpath = parts[-1], "/"
        controllers = "" if hier == "cgroup" else hier
        entry = "%d:%s:%s\n" % (0 if not controllers else 9, controllers, cgpath)
        path = "/proc/%d/cgroup" % pid
        lines = [line for line in (self.read(path).splitlines() if self.exists(path) else [])
                 if line.split(":")[1] != controllers]
        self.write(path, "".join(line + "\n" for line in lines) + entry)

    def rmdir(self, path):
        """A cgroup directory goes away with its control files once empty."""
        procs = path + "/cgroup.procs"
        if self.exists(procs):
            if self.read(procs).split():
                raise OSError(16, "Device or resource busy", path)
            import shutil
            shutil.rmtree(self.host(path))
            return True
        return super().rmdir(path)

    def spawn(self, argv, cwd, env, cgroup_procs=()):
        pid = self.next_pid
        self.next_pid += 100
        self.calls.append(("spawn", list(argv), cwd, dict(env), list(cgroup_procs)))
        p = self.add_proc(pid, 1, exe="/usr/bin/python3.11", cwd=cwd)
        for path in cgroup_procs:
            self.write_control(path, str(pid))
        if self.spawn_behavior == "lock":
            self.hold("/var/run/elkeid-agent.pid", pid)
            for i, name in enumerate(self.spawn_plugins):
                self.add_proc(pid + 1 + i, pid, exe="/etc/elkeid/plugin/%s/%s" % (name, name),
                              cwd="/etc/elkeid/plugin/" + name)
                for path in cgroup_procs:
                    self.write_control(path, str(pid + 1 + i))
        elif self.spawn_behavior == "exit":
            p.alive = False
            p.exit_status = 1
        return FakeChild(self, p)

    def pidfile_holder(self, path):
        pid = self.locks.get(path)
        return pid if pid is not None and self.alive(pid) else None

    def try_lock(self, path):
        holder = self.pidfile_holder(path)
        if holder is not None and holder != CTL_PID:
            return None
        self.hold(path, CTL_PID)
        self.calls.append(("lock", path))
        fx = self

        class Handle:
            def release(self):
                fx.locks.pop(path, None)
                fx.remove(path)
                fx.calls.append(("unlock", path))
        return Handle()

    def mount_cgroup_v1(self, options, target):
        self.calls.append(("mount", options, target))
        return self.results.get(("mount",), Completed(0, ""))

    def umount(self, target):
        self.calls.append(("umount", target))
        return Completed(0, "")

    def monotonic(self):
        return self.clock

    def sleep(self, seconds):
        self.clock += seconds
        due = [a for a in self.later if a[0] <= self.clock]
        self.later = [a for a in self.later if a[0] > self.clock]
        for _when, action in due:
            action()

    def after(self, seconds, action):
        """Run ``action()`` once the fake clock has moved ``seconds`` on."""
        self.later.append((self.clock + seconds, action))

    def reuse_pid(self, pid, ppid=1, **kw):
        """``pid`` exits (if it still runs) and an unrelated process gets its
        number: what the kernel does once pids wrap around."""
        old = self.procs.get(pid)
        if old is not None and old.alive:
            self._exit(old, 0)
        return self.add_proc(pid, ppid, **kw)


# ---------------------------------------------------------------- cgroup hosts

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t2\t10\t1
cpuacct\t2\t10\t1
memory\t4\t80\t1
"""
V2_MOUNTINFO = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
V2_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t0\t90\t1
memory\t0\t90\t1
"""


def cgroup_v1_host(fx):
    fx.write("/proc/self/mountinfo", V1_MOUNTINFO)
    fx.write("/proc/cgroups", V1_CGROUPS)
    for root in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory"):
        fx.write(root + "/cgroup.procs", "1\n%d\n" % CTL_PID)
    fx.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")


def make_v1_agent_cgroup_files(fx):
    """What the kernel creates inside a new v1 cgroup directory."""
    fx.write("/sys/fs/cgroup/cpu,cpuacct/elkeid-agent/cpu.cfs_period_us", "100000\n")
    fx.write("/sys/fs/cgroup/cpu,cpuacct/elkeid-agent/cpu.cfs_quota_us", "-1\n")
    fx.write("/sys/fs/cgroup/cpu,cpuacct/elkeid-agent/cgroup.procs", "")
    fx.write("/sys/fs/cgroup/memory/elkeid-agent/memory.limit_in_bytes", "9223372036854771712\n")
    fx.write("/sys/fs/cgroup/memory/elkeid-agent/cgroup.procs", "")


def cgroup_v2_host(fx):
    fx.write("/proc/self/mountinfo", V2_MOUNTINFO)
    fx.write("/proc/cgroups", V2_CGROUPS)
    fx.write("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    fx.write("/sys/fs/cgroup/cgroup.subtree_control", "memory\n")
    fx.write("/sys/fs/cgroup/cgroup.procs", "1\n")
    fx.write("/sys/fs/cgroup/elkeid-agent/cpu.max", "max 100000\n")
    fx.write("/sys/fs/cgroup/elkeid-agent/memory.max", "max\n")
    fx.write("/sys/fs/cgroup/elkeid-agent/cgroup.procs", "")
