"""The agent's cgroup in sysvinit mode: cgroup v1 and v2.

Under systemd the unit's CPUQuota=10% and MemoryMax=250M do this job. Under
sysvinit elkeidctl does it, as the Go elkeidctl does (cmd/cgroup.go): a
cgroup named ``elkeid-agent`` below each hierarchy root, CPU quota
max(period/10, 10 ms) and a 262144000-byte memory limit; v1 hierarchies
that are enabled but not mounted are mounted under /etc/elkeid/cgroup/.
On cgroup v2 the same limits go to ``cpu.max`` and ``memory.max`` of
``<cgroup2 mount>/elkeid-agent`` after enabling the controllers.

Failing to set up a cgroup is a warning, never fatal: an agent without
limits beats no agent (Go behaves the same).
"""

from .layout import CGROUP_MOUNTS, CPU_PERCENT, CPU_QUOTA_MIN_US, MEMORY_MAX, SERVICE

V1_KINDS = ("cpu", "memory", "named")
# The v1 subsystem option each kind is found and mounted by.
_V1_OPTION = {"cpu": "cpu", "memory": "memory", "named": "name=all"}
_V1_MOUNT_OPTIONS = {"cpu": "cpu", "memory": "memory", "named": "none,name=all"}


def _unescape(field):
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text):
    """[(mount point, fstype, [super options])] for cgroup and cgroup2 mounts."""
    mounts = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        pre_fields, post_fields = pre.split(), post.split()
        if len(pre_fields) < 5 or len(post_fields) < 3:
            continue
        fstype = post_fields[0]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((_unescape(pre_fields[4]), fstype, post_fields[2].split(",")))
    return mounts


def parse_proc_cgroups(text):
    """{subsystem: (hierarchy id, enabled)} from /proc/cgroups."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) >= 4 and fields[1].isdigit() and fields[3].isdigit():
            out[fields[0]] = (int(fields[1]), fields[3] == "1")
    return out


def parse_self_cgroup(text):
    """[(hierarchy id, [controllers], path)] from /proc/<pid>/cgroup."""
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0].isdigit():
            out.append((int(parts[0]), [c for c in parts[1].split(",") if c], parts[2]))
    return out


class System:
    """What this host offers: ``mode`` is "v1", "v2" or "none"."""

    def __init__(self, mode, v2_root=None, v1_roots=None, v1_missing=()):
        self.mode = mode
        self.v2_root = v2_root
        self.v1_roots = dict(v1_roots or {})  # kind -> mounted hierarchy root
        self.v1_missing = tuple(v1_missing)  # kinds enabled but not mounted

    def to_dict(self):
        return {"mode": self.mode, "v2_root": self.v2_root, "v1_roots": self.v1_roots}


def detect(fx):
    mountinfo = fx.read_text("/proc/self/mountinfo") or ""
    subsystems = parse_proc_cgroups(fx.read_text("/proc/cgroups") or "")
    v2_root, v1_roots = None, {}
    for point, fstype, options in parse_mountinfo(mountinfo):
        if fstype == "cgroup2":
            if v2_root is None or point == "/sys/fs/cgroup":
                v2_root = point
            continue
        for kind in V1_KINDS:
            if _V1_OPTION[kind] in options and kind not in v1_roots:
                v1_roots[kind] = point
    # A controller is usable through v1 when the kernel has it enabled and
    # bound to a v1 hierarchy (id != 0); id 0 means it belongs to cgroup2.
    v1_enabled = [k for k in ("cpu", "memory")
                  if subsystems.get(k, (0, False))[1] and subsystems[k][0] != 0]
    if "cpu" in v1_roots or "memory" in v1_roots or v1_enabled:
        missing = [k for k in v1_enabled if k not in v1_roots]
        return System("v1", v2_root, v1_roots, missing)
    if v2_root is not None:
        return System("v2", v2_root)
    return System("none", None, v1_roots)


class AgentCgroup:
    """The ``elkeid-agent`` cgroup(s) for this host's cgroup system."""

    def __init__(self, fx, system=None, mounts=CGROUP_MOUNTS):
        self.fx = fx
        self.system = system or detect(fx)
        self.mounts = mounts  # where missing v1 hierarchies get mounted

    def paths(self):
        """{kind: agent cgroup dir} for the hierarchies that are mounted."""
        s = self.system
        if s.mode == "v2":
            return {"v2": s.v2_root.rstrip("/") + "/" + SERVICE}
        if s.mode == "v1":
            return {k: root.rstrip("/") + "/" + SERVICE for k, root in s.v1_roots.items()
                    if k in ("cpu", "memory") or not ({"cpu", "memory"} & set(s.v1_roots))}
        return {}

    # ------------------------------------------------------------ set-up

    def prepare(self, warn):
        """Create the cgroup(s) with their limits. Returns the cgroup.procs
        files a new agent process should join; ``warn(msg)`` gets problems."""
        s = self.system
        if s.mode == "none":
            warn("no cgroup support found (/proc/cgroups, /proc/self/mountinfo); "
                 "the agent runs without CPU and memory limits")
            return []
        if s.mode == "v1":
            self._mount_missing(warn)
        procs = []
        for kind, path in sorted(self.paths().items()):
            try:
                self.fx.makedirs(path, 0o700)
            except OSError as e:
                warn("cannot create %s cgroup %s: %s" % (kind, path, e.strerror or e))
                continue
            try:
                self._set_limits(kind, path)
            except OSError as e:
                warn("cannot set limits of %s cgroup %s: %s" % (kind, path, e.strerror or e))
            procs.append(path + "/cgroup.procs")
        return procs

    def _mount_missing(self, warn):
        s = self.system
        wanted = list(s.v1_missing)
        if not ({"cpu", "memory"} & (set(s.v1_roots) | set(wanted))) and "named" not in s.v1_roots:
            wanted.append("named")  # nothing else tracks the agent's processes
        for kind in wanted:
            target = self.mounts + "/" + kind
            try:
                self.fx.makedirs(target, 0o700)
            except OSError as e:
                warn("cannot create %s: %s" % (target, e.strerror or e))
                continue
            r = self.fx.mount_cgroup_v1(_V1_MOUNT_OPTIONS[kind], target)
            if r.rc == 0:
                s.v1_roots[kind] = target
            else:
                warn("mount %s cgroup on %s failed: %s" % (kind, target, r.output.strip()))

    def _set_limits(self, kind, path):
        fx = self.fx
        if kind == "cpu":
            period = _int(fx.read_text(path + "/cpu.cfs_period_us")) or 100000
            quota = max(period * CPU_PERCENT // 100, CPU_QUOTA_MIN_US)
            fx.write_control(path + "/cpu.cfs_quota_us", str(quota))
        elif kind == "memory":
            fx.write_control(path + "/memory.limit_in_bytes", str(MEMORY_MAX))
        elif kind == "v2":
            root = self.system.v2_root.rstrip("/")
            available = (fx.read_text(root + "/cgroup.controllers") or "").split()
            enabled = (fx.read_text(root + "/cgroup.subtree_control") or "").split()
            for controller in ("cpu", "memory"):
                if controller in available and controller not in enabled:
                    fx.write_control(root + "/cgroup.subtree_control", "+" + controller)
            period = 100000
            quota = max(period * CPU_PERCENT // 100, CPU_QUOTA_MIN_US)
            if fx.exists(path + "/cpu.max"):
                fx.write_control(path + "/cpu.max", "%d %d" % (quota, period))
            if fx.exists(path + "/memory.max"):
                fx.write_control(path + "/memory.max", str(MEMORY_MAX))

    # ------------------------------------------------------------ inspection

    def members(self):
        """Every pid in the agent's cgroup(s)."""
        pids = set()
        for path in self.paths().values():
            text = self.fx.read_bytes_quietly(path + "/cgroup.procs", 1 << 20)
            for word in (text or b"").split():
                if word.isdigit():
                    pids.add(int(word))
        return pids

    def limits(self):
        """{kind: {"path", "exists", limits read back}} for status output."""
        fx, out = self.fx, {}
        for kind, path in sorted(self.paths().items()):
            info = {"path": path, "exists": fx.isdir(path)}
            if info["exists"]:
                if kind == "cpu":
                    info["cpu.cfs_quota_us"] = _int(fx.read_text(path + "/cpu.cfs_quota_us"))
                    info["cpu.cfs_period_us"] = _int(fx.read_text(path + "/cpu.cfs_period_us"))
                elif kind == "memory":
                    info["memory.limit_in_bytes"] = _int(
                        fx.read_text(path + "/memory.limit_in_bytes"))
                elif kind == "v2":
                    info["cpu.max"] = (fx.read_text(path + "/cpu.max") or "").strip() or None
                    info["memory.max"] = (fx.read_text(path + "/memory.max") or "").strip() or None
            out[kind] = info
        return out

    def contains(self, pid):
        """True if ``pid`` is in the agent's cgroup in any hierarchy."""
        text = self.fx.read_text("/proc/%d/cgroup" % pid) or ""
        return any(_is_ours(path) for _h, _c, path in parse_self_cgroup(text))

    # ------------------------------------------------------------ changes

    def move(self, pids, warn):
        """Put running processes into the agent's cgroup(s)."""
        for path in self.prepare(warn):
            for pid in sorted(pids):
                try:
                    self.fx.write_control(path, str(pid))
                except OSError as e:
                    if self.fx.alive(pid):
                        warn("cannot move pid %d into %s: %s" % (pid, path, e.strerror or e))

    def release(self, pid, warn):
        """Move ``pid`` out of the agent's cgroup(s) to the hierarchy roots.

        elkeidctl runs inside the agent's cgroup when the agent updates
        itself (agent -> dpkg -> post-install -> elkeidctl); it must leave
        before it stops the agent or starts a new one. Returns True if it
        moved anything."""
        s, fx, moved = self.system, self.fx, False
        text = fx.read_text("/proc/%d/cgroup" % pid) or ""
        for hier, controllers, path in parse_self_cgroup(text):
            if not _is_ours(path):
                continue
            if hier == 0 and not controllers:
                root = s.v2_root
            else:
                root = next((s.v1_roots[k] for k in V1_KINDS
                             if k in s.v1_roots and _V1_OPTION[k] in controllers), None)
            if root is None:
                continue
            try:
                fx.write_control(root.rstrip("/") + "/cgroup.procs", str(pid))
                moved = True
            except OSError as e:
                warn("cannot move pid %d out of %s: %s" % (pid, path, e.strerror or e))
        return moved

    def remove(self):
        """Remove the (empty) cgroup dirs; leave ones that still hold processes."""
        for path in self.paths().values():
            try:
                self.fx.rmdir(path)
            except OSError:
                pass


def _is_ours(path):
    return path == "/" + SERVICE or path.startswith("/" + SERVICE + "/")


def _int(text):
    try:
        return int((text or "").strip())
    except ValueError:
        return None
