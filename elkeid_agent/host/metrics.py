"""Host metrics: cpu, memory, disk and network samples, and the runner that takes them.

This module owns the host-metrics collectors of the services file's
``collectors:`` section. Each collector is an object whose ``sample()``
reads /proc (under ``root``, so tests can use a fake tree) and
returns a flat list of ``Sample`` (name, labels, value). The same list
renders as Prometheus text (``render_prometheus``) and as the string fields
of Elkeid records (``record_fields``: integers as decimal text, floats as
"%.8f" like every float of the Go agent).

Rates (bytes/s, packets/s, IO/s, CPU fractions) are differences between two
samples, so each collector keeps the previous raw counters: the first sample
is only a baseline and carries no rate, a counter that went backwards (wrap
or reset) gives rate 0 for that interval, and entries that disappear are
forgotten so a reappearing one starts from a new baseline.

No reader raises on a missing, unreadable or malformed file or line: the bad
entry is skipped, logged at debug and counted in the collector's ``skipped``.
psutil, when importable, serves the values it reads from the same kernel
files, as ``resources`` does (``use_psutil``, live root only); a psutil
error falls back to the stdlib reader for that round.

``Collectors`` runs one task per enabled collector on its interval under a
``TaskOwner``; a collector that raises is logged once per distinct error,
counted (``collector_errors{collector}``) and keeps its schedule while the
others go on. Disk usage (statvfs, which blocks on a hung network mount) runs
in the ``collect`` executor pool with a timeout; such a mount is reported
failed (``filesystem_device_error``) instead of stalling the collector.
"""

import asyncio
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from .. import metrics as _registry
from .resources import (CLK_TCK, _fmt, _path, _psutil_for, _read_text, loadavg,
                        parse_meminfo, psutil)

log = logging.getLogger(__name__)

Number = Union[int, float]

# Kernel counters are u64; anything else in a counter field is garbage.
U64_LIMIT = 1 << 64
SECTOR_SIZE = 512  # /proc/diskstats counts 512-byte sectors whatever the device's own size
DISK_TIMEOUT = 5.0  # node_exporter's --collector.filesystem.mount-timeout default


@dataclass
class Sample:
    name: str
    labels: Dict[str, str] = field(default_factory=dict)
    value: Number = 0


# name -> (Prometheus type, help). Rates and ratios are gauges; *_total are
# the raw kernel counters.
SPECS = {
    "cpu_count": ("gauge", "online CPUs (cpuN lines of /proc/stat)"),
    "cpu_usage_ratio": ("gauge", "busy fraction of all CPUs over the last interval"),
    "cpu_user_ratio": ("gauge", "user-mode fraction (without nice) over the last interval"),
    "cpu_system_ratio": ("gauge", "kernel-mode fraction over the last interval"),
    "cpu_iowait_ratio": ("gauge", "iowait fraction over the last interval"),
    "cpu_steal_ratio": ("gauge", "fraction stolen by the hypervisor over the last interval"),
    "cpu_core_usage_ratio": ("gauge", "busy fraction of one CPU over the last interval"),
    "load1": ("gauge", "1-minute load average"),
    "load5": ("gauge", "5-minute load average"),
    "load15": ("gauge", "15-minute load average"),
    "memory_total_bytes": ("gauge", "MemTotal"),
    "memory_available_bytes": ("gauge", "MemAvailable"),
    "memory_used_bytes": ("gauge", "MemTotal - MemFree - Buffers - Cached - SReclaimable"),
    "memory_free_bytes": ("gauge", "MemFree"),
    "memory_buffers_bytes": ("gauge", "Buffers"),
    "memory_cached_bytes": ("gauge", "Cached + SReclaimable"),
    "swap_total_bytes": ("gauge", "SwapTotal"),
    "swap_used_bytes": ("gauge", "SwapTotal - SwapFree"),
    "filesystem_size_bytes": ("gauge", "filesystem size"),
    "filesystem_free_bytes": ("gauge", "free bytes, including those reserved for root"),
    "filesystem_avail_bytes": ("gauge", "bytes available to unprivileged users"),
    "filesystem_used_bytes": ("gauge", "size - free"),
    "filesystem_inodes": ("gauge", "inodes"),
    "filesystem_inodes_free": ("gauge", "free inodes"),
    "filesystem_inodes_used": ("gauge", "used inodes"),
    "filesystem_device_error": ("gauge", "1 when statvfs failed or timed out for this mount"),
    "disk_reads_completed_total": ("counter", "reads completed"),
    "disk_writes_completed_total": ("counter", "writes completed"),
    "disk_read_bytes_total": ("counter", "bytes read (512-byte sectors)"),
    "disk_written_bytes_total": ("counter", "bytes written (512-byte sectors)"),
    "disk_io_time_seconds_total": ("counter", "seconds spent doing I/O"),
    "disk_reads_per_second": ("gauge", "reads completed per second"),
    "disk_writes_per_second": ("gauge", "writes completed per second"),
    "disk_read_bytes_per_second": ("gauge", "bytes read per second"),
    "disk_written_bytes_per_second": ("gauge", "bytes written per second"),
    "disk_io_utilization_ratio": ("gauge", "fraction of the interval spent doing I/O"),
}

# /proc/net/dev columns we keep, by index after the interface name.
NET_FIELDS = (
    (0, "receive_bytes"), (1, "receive_packets"), (2, "receive_errors"), (3, "receive_drop"),
    (8, "transmit_bytes"), (9, "transmit_packets"), (10, "transmit_errors"),
    (11, "transmit_drop"),
)
for _i, _n in NET_FIELDS:
    SPECS["network_%s_total" % _n] = ("counter", _n.replace("_", " "))
    SPECS["network_%s_per_second" % _n] = ("gauge", _n.replace("_", " ") + " per second")

# node_exporter's (1.5.0 upstream) default exclusions. Debian's build widens
# the mount points to /run, /mnt and /media and leaves lo out of netdev; we
# follow upstream.
MOUNT_POINTS_EXCLUDE = re.compile(
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)")
FS_TYPES_EXCLUDE = re.compile(
    r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs"
    r"|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs"
    r"|squashfs|sysfs|tracefs)$")
DISK_DEVICES_EXCLUDE = re.compile(r"^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$")


def _counter(text) -> Optional[int]:
    """A u64 kernel counter, or None for anything else (sign, junk, > 2**64)."""
    try:
        n = int(text)
    except (TypeError, ValueError):  # also Python's digit limit on huge strings
        return None
    return n if 0 <= n < U64_LIMIT else None


def _gauge(text) -> Optional[float]:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x >= 0 else None


class _Deltas:
    """The previous raw counters of one collector, by key.

    ``step`` returns None while there is no baseline (or no time passed),
    else (dt, per-field differences) with None for a field that went
    backwards. Keys not stepped in a round are dropped at ``commit``.
    """

    def __init__(self):
        self._prev = {}
        self._next = {}

    def step(self, key, values: Tuple[Number, ...], now: float):
        prev = self._prev.get(key)
        self._next[key] = (values, now)
        if prev is None or len(prev[0]) != len(values):
            return None
        before, then = prev
        dt = now - then
        if dt <= 0:
            self._next[key] = prev  # measure the next interval from the older reading
            return None
        return dt, tuple(b - a if b >= a else None for a, b in zip(before, values))

    def commit(self):
        self._prev, self._next = self._next, {}


class _Collector:
    name = ""

    def __init__(self, only: Iterable[str] = (), root: str = "/",
                 use_psutil: Optional[bool] = None):
        self.only = tuple(only)
        self.root = root
        self._use_psutil = _psutil_for(root, use_psutil)
        self._deltas = _Deltas()
        self.skipped = 0  # bad or unreadable entries, since creation

    def _bad(self, what, detail=""):
        self.skipped += 1
        log.debug("%s collector: skipped %s %s", self.name, what, detail)

    def _text(self, rel: str) -> Optional[str]:
        text = _read_text(_path(self.root, rel))
        if text is None:
            self._bad("unreadable file", rel)
        return text

    def _psutil(self, fn, *args, **kwargs):
        """psutil's answer, or None (then the stdlib reader runs and counts)."""
        if not self._use_psutil:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # psutil raises ValueError/AssertionError on odd lines too
            log.debug("%s collector: psutil failed, reading /proc: %s", self.name, e)
            return None

    def sample(self, now: Optional[float] = None) -> List[Sample]:
        """One round; ``now`` (monotonic seconds) replaces the clock for tests."""
        now = time.monotonic() if now is None else now
        try:
            return self._sample(now)
        finally:
            self._deltas.commit()

    async def collect(self, run_blocking) -> List[Sample]:
        """The runner's entry; collectors with blocking calls override it."""
        return self.sample()

    def _sample(self, now: float) -> List[Sample]:
        raise NotImplementedError


# --- cpu ----------------------------------------------------------------------------------

CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


class CpuCollector(_Collector):
    """/proc/stat cpu times and /proc/loadavg.

    Busy time is everything but idle and iowait (as psutil and the heartbeat's
    cpu_usage count it); guest time is already inside user and nice. Load
    averages always come from /proc/loadavg. psutil
    numbers its per-CPU times by position, the stdlib path by the kernel's
    cpuN: the two differ only while a CPU in the middle is offline.
    """

    name = "cpu"

    def read(self) -> Dict[str, Tuple[float, ...]]:
        """{"cpu": aggregate, "0": cpu0, ...} in seconds, CPU_FIELDS order."""
        agg = self._psutil(psutil.cpu_times) if psutil else None
        per = self._psutil(psutil.cpu_times, percpu=True) if agg is not None else None
        if agg is not None and per is not None:
            out = {"cpu": _cpu_tuple(agg)}
            out.update((str(i), _cpu_tuple(t)) for i, t in enumerate(per))
            return out
        out = {}
        text = self._text("proc/stat")
        for line in (text or "").splitlines():
            fields = line.split()
            if not fields or not fields[0].startswith("cpu"):
                continue
            key = fields[0][3:] or "cpu"
            if key != "cpu" and not key.isdigit():
                continue
            values = [_counter(v) for v in fields[1:9]]
            if len(values) < 4 or None in values or key in out:
                self._bad("/proc/stat line", fields[0])
                continue
            out[key] = tuple(v / CLK_TCK for v in values) + (0.0,) * (8 - len(values))
        return out

    def loads(self) -> Optional[Tuple[float, float, float]]:
        # Always the kernel's text: psutil.getloadavg (glibc's getloadavg,
        # from sysinfo) has more digits than /proc/loadavg and node_exporter.
        fields = loadavg(self.root)
        values = [_gauge(fields.get(k)) for k in ("load_1", "load_5", "load_15")]
        if None in values:
            self._bad("/proc/loadavg")
            return None
        return values[0], values[1], values[2]

    def _sample(self, now):
        times = self.read()
        cpus = sorted((k for k in times if k != "cpu"), key=int)
        out = [Sample("cpu_count", {}, len(cpus))] if cpus else []
        for key in ["cpu"] + cpus:
            if key not in times:
                continue
            ratios = _cpu_ratios(self._deltas.step(key, times[key], now))
            if ratios is None:
                continue
            if key == "cpu":
                out.append(Sample("cpu_usage_ratio", {}, ratios["busy"]))
                for mode in ("user", "system", "iowait", "steal"):
                    out.append(Sample("cpu_%s_ratio" % mode, {}, ratios[mode]))
            else:
                out.append(Sample("cpu_core_usage_ratio", {"cpu": key}, ratios["busy"]))
        loads = self.loads()
        if loads is not None:
            out += [Sample(n, {}, v) for n, v in zip(("load1", "load5", "load15"), loads)]
        return out


def _cpu_tuple(t) -> Tuple[float, ...]:
    return tuple(float(getattr(t, f, 0.0)) for f in CPU_FIELDS)


def _cpu_ratios(step) -> Optional[Dict[str, float]]:
    if step is None:
        return None
    _dt, diffs = step
    if None in diffs:  # a counter went backwards: nothing sensible to say
        return {k: 0.0 for k in ("busy",) + CPU_FIELDS}
    d = dict(zip(CPU_FIELDS, diffs))
    total = sum(diffs)
    if total <= 0:
        return {k: 0.0 for k in ("busy",) + CPU_FIELDS}
    out = {k: min(1.0, v / total) for k, v in d.items()}
    out["busy"] = min(1.0, max(0.0, total - d["idle"] - d["iowait"]) / total)
    return out


# --- memory -------------------------------------------------------------------------------


class MemoryCollector(_Collector):
    """/proc/meminfo: ``available`` is MemAvailable; ``used`` and ``cached``
    are defined as in the heartbeat's mem_usage (cached includes
    SReclaimable, used never below 0)."""

    name = "memory"

    def read(self) -> Dict[str, int]:
        vm = self._psutil(psutil.virtual_memory) if psutil else None
        sw = self._psutil(psutil.swap_memory) if vm is not None else None
        if vm is not None and sw is not None:
            return {"total": vm.total, "available": vm.available, "free": vm.free,
                    "buffers": vm.buffers, "cached": vm.cached, "swap_total": sw.total,
                    "swap_free": sw.free}
        text = self._text("proc/meminfo")
        if text is None:
            return {}
        good = parse_meminfo(text)  # skips malformed lines; they are counted here
        self.skipped += sum(1 for line in text.splitlines()
                            if line.strip() and line.partition(":")[0].strip() not in good)
        names = {"total": "MemTotal", "available": "MemAvailable", "free": "MemFree",
                 "buffers": "Buffers", "swap_total": "SwapTotal", "swap_free": "SwapFree"}
        for key in [k for k, v in good.items() if v >= U64_LIMIT]:
            self._bad("/proc/meminfo value", key)
            del good[key]
        out = {k: good[v] for k, v in names.items() if v in good}
        if "Cached" in good:
            out["cached"] = good["Cached"] + good.get("SReclaimable", 0)
        return out

    def _sample(self, now):
        m = self.read()
        out = [Sample("memory_%s_bytes" % k, {}, m[k])
               for k in ("total", "available", "free", "buffers", "cached") if k in m]
        if "total" in m:
            used = m["total"] - m.get("free", 0) - m.get("buffers", 0) - m.get("cached", 0)
            out.append(Sample("memory_used_bytes", {}, max(0, used)))
        if "swap_total" in m:
            out.append(Sample("swap_total_bytes", {}, m["swap_total"]))
            out.append(Sample("swap_used_bytes", {},
                              max(0, m["swap_total"] - m.get("swap_free", m["swap_total"]))))
        return out


# --- disk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    device: str
    mountpoint: str
    fstype: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mounts as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


class DiskCollector(_Collector):
    """Usage per mount (/proc/self/mounts, os.statvfs) and IO per block device
    (/proc/diskstats), with rates.

    Mounts follow node_exporter's default exclusions (MOUNT_POINTS_EXCLUDE and
    FS_TYPES_EXCLUDE: /dev, /proc, /sys, container storage, and pseudo
    filesystems such as proc, sysfs, cgroup, devpts, overlay and squashfs;
    tmpfs is kept); a mount point seen twice counts once, as the later
    (visible) mount. An ``only`` list of mount points replaces those
    exclusions, and then only the devices under those mounts report IO;
    otherwise every device but node_exporter's DISK_DEVICES_EXCLUDE
    (partitions, loop, ram, fd) does. Sizes use f_frsize, the unit of
    statvfs's block counts (node_exporter multiplies by f_bsize; the two are
    equal on common filesystems). statvfs is the call psutil.disk_usage makes,
    so there is no psutil path for usage.
    """

    name = "disk"

    def __init__(self, only=(), root="/", use_psutil=None,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs):
        super().__init__(only, root, use_psutil)
        self._statvfs = statvfs

    def mounts(self) -> List[Mount]:
        text = self._text("proc/self/mounts")
        seen = {}
        for line in (text or "").splitlines():
            fields = line.split()
            if len(fields) < 3:
                if line.strip():
                    self._bad("/proc/self/mounts line", line[:80])
                continue
            m = Mount(_unescape(fields[0]), _unescape(fields[1]), fields[2])
            if not m.mountpoint.startswith("/") or "\0" in m.mountpoint:
                self._bad("mount point", m.mountpoint[:80])
                continue
            if self.only:
                if m.mountpoint not in self.only:
                    continue
            elif MOUNT_POINTS_EXCLUDE.search(m.mountpoint) or FS_TYPES_EXCLUDE.search(m.fstype):
                continue
            seen.pop(m.mountpoint, None)
            seen[m.mountpoint] = m
        return list(seen.values())

    def statvfs_path(self, m: Mount) -> str:
        return _path(self.root, m.mountpoint.lstrip("/"))

    def _device_name(self, m: Mount) -> str:
        # /dev/mapper/vg-root is a link to /dev/dm-0, the name diskstats uses.
        if not m.device.startswith("/dev/"):
            return ""
        return os.path.basename(os.path.realpath(_path(self.root, m.device.lstrip("/"))))

    def read_io(self, devices: Optional[set] = None) -> Dict[str, Tuple[int, ...]]:
        """{device: (reads, writes, read_bytes, written_bytes, io_ms)}."""
        def wanted(name):
            return name in devices if devices is not None \
                else not DISK_DEVICES_EXCLUDE.search(name)

        raw = self._psutil(psutil.disk_io_counters, perdisk=True, nowrap=False) \
            if psutil else None
        if raw is not None:
            return {name: (c.read_count, c.write_count, c.read_bytes, c.write_bytes,
                           c.busy_time) for name, c in raw.items() if wanted(name)}
        out = {}
        text = self._text("proc/diskstats")
        for line in (text or "").splitlines():
            fields = line.split()
            if len(fields) < 3 or not wanted(fields[2]):
                if 0 < len(fields) < 3:
                    self._bad("/proc/diskstats line", line[:80])
                continue
            values = [_counter(fields[i]) if len(fields) >= 14 else None
                      for i in (3, 5, 7, 9, 12)]
            if None in values or fields[2] in out:
                self._bad("/proc/diskstats line", fields[2][:80])
                continue
            reads, sectors_read, writes, sectors_written, io_ms = values
            out[fields[2]] = (reads, writes, sectors_read * SECTOR_SIZE,
                              sectors_written * SECTOR_SIZE, io_ms)
        return out

    def _sample(self, now, usage=None):
        mounts = self.mounts() if usage is None else [m for m, _ in usage]
        if usage is None:
            usage = [(m, _statvfs_or_error(self._statvfs, self.statvfs_path(m)))
                     for m in mounts]
        out = []
        for m, result in usage:
            out += self._usage_samples(m, result)
        devices = None
        if self.only:
            devices = {d for d in (self._device_name(m) for m in mounts) if d}
        for dev, values in sorted(self.read_io(devices).items()):
            out += self._io_samples(dev, values, now)
        return out

    async def collect(self, run_blocking) -> List[Sample]:
        mounts = self.mounts()
        results = await asyncio.gather(
            *(run_blocking(self._statvfs, self.statvfs_path(m)) for m in mounts),
            return_exceptions=True)
        now = time.monotonic()
        try:
            return self._sample(now, usage=list(zip(mounts, results)))
        finally:
            self._deltas.commit()

    def _usage_samples(self, m: Mount, st) -> List[Sample]:
        labels = {"mountpoint": m.mountpoint, "device": m.device, "fstype": m.fstype}
        if isinstance(st, BaseException):
            self._bad("statvfs", "%s: %s" % (m.mountpoint, st))
            return [Sample("filesystem_device_error", labels, 1)]
        unit = st.f_frsize or st.f_bsize
        size, free, avail = st.f_blocks * unit, st.f_bfree * unit, st.f_bavail * unit
        return [Sample("filesystem_device_error", labels, 0),
                Sample("filesystem_size_bytes", labels, size),
                Sample("filesystem_free_bytes", labels, free),
                Sample("filesystem_avail_bytes", labels, avail),
                Sample("filesystem_used_bytes", labels, max(0, size - free)),
                Sample("filesystem_inodes", labels, st.f_files),
                Sample("filesystem_inodes_free", labels, st.f_ffree),
                Sample("filesystem_inodes_used", labels, max(0, st.f_files - st.f_ffree))]

    def _io_samples(self, dev, values, now) -> List[Sample]:
        labels = {"device": dev}
        reads, writes, rbytes, wbytes, io_ms = values
        out = [Sample("disk_reads_completed_total", labels, reads),
               Sample("disk_writes_completed_total", labels, writes),
               Sample("disk_read_bytes_total", labels, rbytes),
               Sample("disk_written_bytes_total", labels, wbytes),
               Sample("disk_io_time_seconds_total", labels, io_ms / 1000.0)]
        step = self._deltas.step(dev, values, now)
        if step is not None:
            dt, d = step
            names = ("disk_reads_per_second", "disk_writes_per_second",
                     "disk_read_bytes_per_second", "disk_written_bytes_per_second")
            out += [Sample(n, labels, _rate(x, dt)) for n, x in zip(names, d)]
            out.append(Sample("disk_io_utilization_ratio", labels,
                              min(1.0, _rate(d[4], dt) / 1000.0)))
        return out


def _statvfs_or_error(statvfs, path):
    try:
        return statvfs(path)
    except OSError as e:
        return e


def _rate(diff: Optional[Number], dt: float) -> float:
    return 0.0 if diff is None else diff / dt


# --- network ------------------------------------------------------------------------------


class NetworkCollector(_Collector):
    """Per interface from /proc/net/dev: rx/tx bytes, packets, errors, drops,
    with rates; ``only`` keeps the listed interfaces (node_exporter also
    reports every interface by default)."""

    name = "network"

    def read(self) -> Dict[str, Tuple[int, ...]]:
        """{interface: NET_FIELDS values}."""
        raw = self._psutil(psutil.net_io_counters, pernic=True, nowrap=False) \
            if psutil else None
        if raw is not None:
            return {name: (c.bytes_recv, c.packets_recv, c.errin, c.dropin, c.bytes_sent,
                           c.packets_sent, c.errout, c.dropout)
                    for name, c in raw.items() if not self.only or name in self.only}
        out = {}
        text = self._text("proc/net/dev")
        for line in (text or "").splitlines()[2:]:  # two header lines
            # Large counters can touch the colon ("eth0:123"); names never hold one.
            name, sep, rest = line.rpartition(":")
            name = name.strip()
            if not sep or not name:
                if line.strip():
                    self._bad("/proc/net/dev line", line[:80])
                continue
            if self.only and name not in self.only:
                continue
            fields = rest.split()
            values = tuple(_counter(fields[i]) if len(fields) >= 16 else None
                           for i, _ in NET_FIELDS)
            if None in values or name in out:
                self._bad("/proc/net/dev line", name[:80])
                continue
            out[name] = values
        return out

    def _sample(self, now):
        out = []
        for name, values in sorted(self.read().items()):
            labels = {"interface": name}
            out += [Sample("network_%s_total" % n, labels, v)
                    for (_i, n), v in zip(NET_FIELDS, values)]
            step = self._deltas.step(name, values, now)
            if step is not None:
                dt, d = step
                out += [Sample("network_%s_per_second" % n, labels, _rate(x, dt))
                        for (_i, n), x in zip(NET_FIELDS, d)]
        return out


COLLECTORS = {c.name: c for c in (CpuCollector, MemoryCollector, DiskCollector,
                                  NetworkCollector)}


# --- output -------------------------------------------------------------------------------


def render_prometheus(samples: Iterable[Sample], prefix: str = "elkeid_host") -> str:
    """Prometheus text exposition, one TYPE/HELP header per metric name."""
    groups = {}
    for s in samples:
        groups.setdefault(s.name, []).append(s)
    lines = []
    for name, items in groups.items():
        kind, text = SPECS.get(name, ("untyped", ""))
        full = "%s_%s" % (prefix, name)
        if text:
            lines.append("# HELP %s %s" % (full, text))
        lines.append("# TYPE %s %s" % (full, kind))
        for s in items:
            labels = ",".join('%s="%s"' % (k, _registry._escape(str(v)))
                              for k, v in sorted(s.labels.items()))
            lines.append("%s%s %s" % (full, "{%s}" % labels if labels else "",
                                       _registry._number(s.value)))
    return "\n".join(lines) + "\n" if lines else ""


def record_fields(samples: Iterable[Sample]) -> List[Dict[str, str]]:
    """String fields for Elkeid records: one dict per label set (the
    unlabelled samples together), labels as fields, each sample as
    ``name: value`` with floats in "%.8f"."""
    rows = {}
    for s in samples:
        key = tuple(sorted(s.labels.items()))
        row = rows.setdefault(key, dict(key))
        row[s.name] = _fmt(s.value) if isinstance(s.value, float) else str(int(s.value))
    return list(rows.values())


# --- runner -------------------------------------------------------------------------------


class Collectors:
    """One owned task per enabled collector, each on its own interval.

    ``config`` is ``ServicesConfig.collectors`` ({name: Collector(enabled,
    interval, only)}); ``instances`` replaces the collector objects by name
    (tests). ``latest`` maps a collector to (unix time, samples) of its last
    good round; a failing collector keeps its previous samples and gets
    ``collector_up{collector} 0``.
    """

    EXECUTOR_KIND = "collect"
    MAX_DISTINCT_ERRORS = 32  # remembered per collector, to log each only once

    def __init__(self, config, owner, metrics, executors, root="/", use_psutil=None,
                 instances=None, disk_timeout=DISK_TIMEOUT):
        self.config = config
        self.owner = owner
        self.metrics = metrics
        self.executors = executors
        self.disk_timeout = disk_timeout
        self.latest: Dict[str, Tuple[float, List[Sample]]] = {}
        self.on_round = None  # called with self after each round that succeeded
        self.instances = {}
        for name, cfg in config.items():
            if not cfg.enabled or name not in COLLECTORS:
                continue
            made = (instances or {}).get(name)
            self.instances[name] = made if made is not None else \
                COLLECTORS[name](only=cfg.only, root=root, use_psutil=use_psutil)
        self._skipped = {name: 0 for name in self.instances}
        self._errors_seen = {name: set() for name in self.instances}
        # statvfs jobs whose thread has not returned (a hung mount): never
        # queue a second one behind it.
        self._pending = set()
        self._pending_lock = threading.Lock()
        metrics.describe("collector_errors", "host-metrics collector rounds that raised")
        metrics.describe("collector_skipped",
                         "malformed or unreadable entries host-metrics collectors skipped")
        metrics.describe("collector_up", "1 when the collector's last round succeeded")

    def start(self):
        for name in self.instances:
            self.owner.spawn("collector:" + name, lambda name=name: self._run(name))

    async def stop(self):
        for name in self.instances:
            await self.owner.cancel("collector:" + name)

    async def _run(self, name):
        interval = self.config[name].interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.collect_once(name)
            # A fixed schedule: a slow round delays neither later rounds'
            # start times nor the other collectors; missed ticks are skipped.
            next_at += interval
            now = loop.time()
            if next_at < now:
                next_at = now + interval - (now - next_at) % interval
            await asyncio.sleep(next_at - now)

    async def collect_once(self, name) -> bool:
        collector = self.instances[name]
        try:
            samples = await collector.collect(self._blocking)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # isolated: this collector only, counted and logged once
            self.metrics.inc("collector_errors", collector=name)
            self.metrics.set("collector_up", 0, collector=name)
            self._log_error(name, e)
            return False
        finally:
            skipped = getattr(collector, "skipped", 0)
            if skipped > self._skipped[name]:
                self.metrics.inc("collector_skipped", skipped - self._skipped[name],
                                 collector=name)
            self._skipped[name] = skipped
        self.latest[name] = (time.time(), samples)
        self.metrics.set("collector_up", 1, collector=name)
        if self.on_round is not None:
            self.on_round(self)
        return True

    def _log_error(self, name, e):
        text = "%s: %s" % (type(e).__name__, e)
        seen = self._errors_seen[name]
        if text in seen:
            return
        if len(seen) < self.MAX_DISTINCT_ERRORS:
            seen.add(text)
        log.warning("host-metrics collector %s failed (logged once per distinct error): %s",
                    name, text, exc_info=e)

    async def _blocking(self, fn, path):
        """``fn(path)`` in the collect pool within disk_timeout; raises on
        timeout, saturation, or while an earlier call on ``path`` still hangs."""
        with self._pending_lock:
            if path in self._pending:
                raise TimeoutError("an earlier statvfs of %s has not returned" % path)
            self._pending.add(path)

        def job():
            try:
                return fn(path)
            finally:
                with self._pending_lock:
                    self._pending.discard(path)

        try:
            return await asyncio.wait_for(
                self.executors.run(self.EXECUTOR_KIND, job), self.disk_timeout)
        except asyncio.TimeoutError:
            # The thread may still be inside statvfs: the path stays pending.
            raise TimeoutError("statvfs of %s took over %.0f s" % (path, self.disk_timeout))
        except Exception:
            # Refused before it ran (pool saturated or shut down), or fn
            # raised (then job already discarded it: discarding is idempotent).
            with self._pending_lock:
                self._pending.discard(path)
            raise

    def samples(self) -> List[Sample]:
        """Every collector's latest samples, in collector order."""
        out = []
        for name in self.instances:
            out += self.latest.get(name, (0, []))[1]
        return out

    def render_prometheus(self, prefix="elkeid_host") -> str:
        return render_prometheus(self.samples(), prefix)
