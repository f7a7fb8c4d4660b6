"""Resource facts for the heartbeats (docs/protocol.md section 4), read from /proc and /sys.

This module owns the numbers the Go agent takes from gopsutil and from its
``agent/resource`` package: per-process cpu/rss/io/fd/start time
(``GetProcResouce``), the host's memory, boot time, CPU name and usage, load,
DMI ids, DNS servers, gateway and the ``du`` of a directory. Every reader takes
``root`` so tests can point it at a fake tree, and none of them raises on a
missing, unreadable or malformed file: they log at debug and return an empty
or zero value.

psutil, when importable, serves the values it computes from the very same
kernel files (process times, rss, fds, io counters, memory, boot time, system
cpu times); ``use_psutil=False`` (or the module flag ``USE_PSUTIL``) forces
the stdlib readers, and tests hold the two paths to the same results. psutil
reads the live /proc only, so any other ``root`` always takes the stdlib path.
"""

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .identity import go_trim_space

try:
    import psutil
except ImportError:  # an accelerator only: the stdlib path gives the same numbers
    psutil = None

log = logging.getLogger(__name__)

USE_PSUTIL = psutil is not None

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# /proc files of interest are a few KiB; cpuinfo on a large host a few
# hundred. The cap keeps a hostile or broken file from costing memory.
MAX_READ = 4 << 20


def _psutil_for(root: str, use_psutil: Optional[bool]) -> bool:
    if use_psutil is None:
        use_psutil = USE_PSUTIL
    return bool(use_psutil) and psutil is not None and os.path.realpath(root) == "/"


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def _read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ)
    except OSError as e:
        log.debug("%s unreadable: %s", path, e)
        return None


def _read_text(path: str) -> Optional[str]:
    data = _read_bytes(path)
    return None if data is None else data.decode("utf-8", "replace")


def _int(text) -> Optional[int]:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# --- per process -------------------------------------------------------------------------


@dataclass
class ProcStats:
    """One sample of a process, in the units of the heartbeat fields."""

    pid: int = 0
    cpu: float = 0.0          # fraction of one core over the sample interval
    rss: int = 0              # bytes
    read_speed: float = 0.0   # bytes/s read from storage (/proc/<pid>/io read_bytes)
    write_speed: float = 0.0  # bytes/s written to storage
    nfd: int = 0              # open file descriptors
    start_time: int = 0       # unix seconds
    exists: bool = True       # False: the process is gone; every number is zero


@dataclass
class _Snapshot:
    cpu_seconds: float
    start: float              # unix seconds, with the tick fraction
    start_time: int           # unix seconds, as gopsutil's CreateTime()/1000
    rss: int
    nfd: int
    io: Optional[Tuple[int, int]]


def _parse_pid_stat(text: str) -> Optional[Tuple[int, int, int]]:
    """(utime, stime, starttime) in ticks from /proc/<pid>/stat."""
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rpar = text.rfind(")")
    if rpar < 0:
        return None
    rest = text[rpar + 1:].split()
    if len(rest) < 20:
        return None
    utime, stime, start = _int(rest[11]), _int(rest[12]), _int(rest[19])
    if utime is None or stime is None or start is None or min(utime, stime, start) < 0:
        return None
    return utime, stime, start


def _parse_pid_io(text: str) -> Optional[Tuple[int, int]]:
    values = {}
    for line in text.splitlines():
        key, _sep, value = line.partition(":")
        n = _int(value.strip())
        if n is not None and n >= 0:
            values[key.strip()] = n
    if "read_bytes" not in values or "write_bytes" not in values:
        return None
    return values["read_bytes"], values["write_bytes"]


def _count_fds(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError as e:
        log.debug("%s unreadable: %s", path, e)
        return 0


def _stdlib_snapshot(pid: int, root: str, btime: int) -> Optional[_Snapshot]:
    base = _path(root, "proc/%d" % pid)
    text = _read_text(os.path.join(base, "stat"))
    parsed = _parse_pid_stat(text) if text is not None else None
    if parsed is None:
        return None
    utime, stime, start_ticks = parsed
    statm = _read_text(os.path.join(base, "statm"))
    fields = statm.split() if statm else []
    pages = _int(fields[1]) if len(fields) > 1 else None
    io_text = _read_text(os.path.join(base, "io"))
    return _Snapshot(
        cpu_seconds=utime / CLK_TCK + stime / CLK_TCK,
        start=btime + start_ticks / CLK_TCK,
        start_time=btime + start_ticks // CLK_TCK,
        rss=pages * PAGE_SIZE if pages is not None and pages >= 0 else 0,
        nfd=_count_fds(os.path.join(base, "fd")),
        io=_parse_pid_io(io_text) if io_text is not None else None,
    )


def _psutil_snapshot(proc) -> Optional[_Snapshot]:
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            created = proc.create_time()
            rss = proc.memory_info().rss
    except psutil.Error as e:
        log.debug("process %d: %s", proc.pid, e)
        return None
    try:
        nfd = proc.num_fds()
    except psutil.Error:
        nfd = 0
    try:
        counters = proc.io_counters()
        io = (counters.read_bytes, counters.write_bytes)
    except (psutil.Error, AttributeError):
        io = None
    return _Snapshot(cpu_seconds=times.user + times.system, start=created,
                     start_time=int(created), rss=rss, nfd=nfd, io=io)


class ProcessSampler:
    """Rates of one process between successive ``sample()`` calls.

    Matches gopsutil as the Go agent uses it (Percent(0)/100, MemoryInfo().RSS,
    NumFDs, IOCounters read_bytes/write_bytes, CreateTime()/1000), with two
    deliberate differences: the first cpu sample covers the time since the
    process started (gopsutil reports 0), and cpu is user+system time only
    (gopsutil also adds delayacct_blkio_ticks, which is time spent waiting on
    block I/O, not on a CPU). The first io sample is bytes since start over
    whole seconds since start, as Go computes it.

    The baseline of the first cpu sample is the process start itself, so
    do not prime a sampler just before its first real use: two samples a
    few milliseconds apart measure clock-tick noise (10 ms of cpu in 5 ms
    reads as 200 %). Every cpu value is bounded by ``ncpu`` (default: the
    CPUs this process may run on): the start time is known to a whole
    second only (btime), and no process runs on more CPUs than exist.
    """

    def __init__(self, pid: int, root: str = "/", use_psutil: Optional[bool] = None,
                 ncpu: Optional[int] = None):
        self.pid = pid
        self.ncpu = ncpu or nproc()
        self.root = root
        self._use_psutil = _psutil_for(root, use_psutil)
        self._btime = None
        self._cpu_state = None   # (start, cpu_seconds, mono)
        self._io_state = None    # (start, read_bytes, write_bytes, mono)

    def _snapshot(self) -> Optional[_Snapshot]:
        if self._use_psutil:
            # A fresh Process each time: psutil caches create_time in the
            # object, which would hide a reused pid from the start check.
            try:
                proc = psutil.Process(self.pid)
            except psutil.Error as e:
                log.debug("process %d: %s", self.pid, e)
                return None
            return _psutil_snapshot(proc)
        if not self._btime:
            self._btime = boot_time(self.root, use_psutil=False)
        return _stdlib_snapshot(self.pid, self.root, self._btime)

    def sample(self, now: Optional[float] = None) -> ProcStats:
        """A ProcStats; ``exists`` is False (and all zero) once the process is gone.

        ``now`` (unix seconds) replaces both clocks, for tests; by default the
        intervals use the monotonic clock so a wall-clock step cannot distort
        them.
        """
        wall = time.time() if now is None else now
        mono = time.monotonic() if now is None else now
        snap = self._snapshot()
        if snap is None:
            self._cpu_state = self._io_state = None
            return ProcStats(pid=self.pid, exists=False)

        state = self._cpu_state
        if state is not None and state[0] == snap.start:
            dt = mono - state[2]
            cpu = max(0.0, snap.cpu_seconds - state[1]) / dt if dt > 0 else 0.0
        else:  # first sample, or the pid now belongs to another process
            alive = wall - snap.start
            cpu = snap.cpu_seconds / alive if alive > 0 else 0.0
        cpu = min(cpu, float(self.ncpu))
        self._cpu_state = (snap.start, snap.cpu_seconds, mono)

        read_speed = write_speed = 0.0
        if snap.io is not None:
            rd, wr = snap.io
            io_state = self._io_state
            if io_state is not None and io_state[0] == snap.start:
                dt = mono - io_state[3]
                if dt > 0:
                    read_speed = max(0, rd - io_state[1]) / dt
                    write_speed = max(0, wr - io_state[2]) / dt
            else:
                alive = int(wall) - snap.start_time
                if alive > 0:
                    read_speed, write_speed = rd / alive, wr / alive
            self._io_state = (snap.start, rd, wr, mono)

        return ProcStats(pid=self.pid, cpu=cpu, rss=snap.rss, read_speed=read_speed,
                         write_speed=write_speed, nfd=snap.nfd, start_time=snap.start_time)


# --- system cpu ---------------------------------------------------------------------------


def _stat_cpu_times(root: str) -> Optional[Tuple[float, float]]:
    """(all, busy) seconds from the aggregate ``cpu`` line of /proc/stat."""
    text = _read_text(_path(root, "proc/stat"))
    if text is None:
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [_int(v) for v in fields[1:9]]
            if len(values) < 4 or any(v is None or v < 0 for v in values):
                break
            secs = [v / CLK_TCK for v in values] + [0.0] * (8 - len(values))
            return _all_busy(*secs)
    log.debug("no usable cpu line in %s", _path(root, "proc/stat"))
    return None


def _all_busy(user, nice, system, idle, iowait, irq, softirq, steal) -> Tuple[float, float]:
    # gopsutil (like psutil) counts iowait as idle time and leaves guest time
    # out, since the kernel already includes it in user/nice.
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total, total - idle - iowait


def _psutil_cpu_times() -> Optional[Tuple[float, float]]:
    try:
        t = psutil.cpu_times()
    except (psutil.Error, OSError) as e:
        log.debug("psutil.cpu_times: %s", e)
        return None
    return _all_busy(t.user, t.nice, t.system, t.idle, getattr(t, "iowait", 0.0),
                     getattr(t, "irq", 0.0), getattr(t, "softirq", 0.0),
                     getattr(t, "steal", 0.0))


class CpuUsageSampler:
    """System-wide busy fraction (0..1) between successive ``sample()`` calls.

    gopsutil's cpu.Percent(0) as the Go heartbeat calls it: the first call
    covers the time since the sampler was created (gopsutil: since start-up).
    """

    def __init__(self, root: str = "/", use_psutil: Optional[bool] = None):
        self.root = root
        self._use_psutil = _psutil_for(root, use_psutil)
        self._last = self._read()

    def _read(self) -> Optional[Tuple[float, float]]:
        return _psutil_cpu_times() if self._use_psutil else _stat_cpu_times(self.root)

    def sample(self) -> float:
        last, now = self._last, self._read()
        if now is not None:
            self._last = now
        if last is None or now is None:
            return 0.0
        return busy_fraction(last, now)


def busy_fraction(t1: Tuple[float, float], t2: Tuple[float, float]) -> float:
    """gopsutil calculateBusy for two (all, busy) readings, as a fraction."""
    (all1, busy1), (all2, busy2) = t1, t2
    if busy2 <= busy1:
        return 0.0
    if all2 <= all1:
        return 1.0
    return min(1.0, max(0.0, (busy2 - busy1) / (all2 - all1)))


# --- memory and boot time -----------------------------------------------------------------


def _meminfo(root: str) -> Dict[str, int]:
    """/proc/meminfo in bytes; malformed lines are skipped."""
    text = _read_text(_path(root, "proc/meminfo"))
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        parts = value.split()
        n = _int(parts[0]) if parts else None
        if n is None or n < 0:
            continue
        out[key.strip()] = n * 1024 if parts[1:2] == ["kB"] else n
    return out


def _memory(root: str, use_psutil: Optional[bool]) -> Optional[Tuple[int, int, int, int]]:
    """(total, free, buffers, cached incl. SReclaimable) in bytes."""
    if _psutil_for(root, use_psutil):
        try:
            vm = psutil.virtual_memory()
            return vm.total, vm.free, vm.buffers, vm.cached
        except (psutil.Error, OSError, AttributeError) as e:
            log.debug("psutil.virtual_memory: %s", e)
            return None
    info = _meminfo(root)
    if "MemTotal" not in info:
        return None
    return (info["MemTotal"], info.get("MemFree", 0), info.get("Buffers", 0),
            info.get("Cached", 0) + info.get("SReclaimable", 0))


def total_mem(root: str = "/", use_psutil: Optional[bool] = None) -> int:
    """MemTotal in bytes; 0 when unknown (as Go's GetMemTotal)."""
    mem = _memory(root, use_psutil)
    return mem[0] if mem else 0


def mem_usage(root: str = "/", use_psutil: Optional[bool] = None) -> Optional[float]:
    """gopsutil VirtualMemory().UsedPercent/100; None when /proc/meminfo is unusable.

    gopsutil v3 defines Used on Linux as Total - Free - Buffers - Cached, with
    Cached including SReclaimable (not Total - Available). A negative result
    (possible in containers whose meminfo is synthesised) is reported as 0
    where Go's uint64 would wrap around.
    """
    mem = _memory(root, use_psutil)
    if not mem or mem[0] <= 0:
        return None
    total, free, buffers, cached = mem
    return max(0, total - free - buffers - cached) / total


def boot_time(root: str = "/", use_psutil: Optional[bool] = None) -> int:
    """btime from /proc/stat (unix seconds); 0 when unknown."""
    if _psutil_for(root, use_psutil):
        try:
            return int(psutil.boot_time())
        except (psutil.Error, OSError, ValueError) as e:
            log.debug("psutil.boot_time: %s", e)
            return 0
    text = _read_text(_path(root, "proc/stat"))
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "btime":
            value = _int(fields[1])
            return value if value is not None and value >= 0 else 0
    log.debug("no btime in %s", _path(root, "proc/stat"))
    return 0


# --- other host facts ----------------------------------------------------------------------


def nproc() -> int:
    """Go's runtime.NumCPU(): the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_GO_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def cpu_name(root: str = "/") -> str:
    """gopsutil cpu.Info()[0].ModelName: the first processor's model name.

    A ``model name`` (x86) or ``cpu`` (POWER) line inside the first
    ``processor`` block wins; otherwise the last ``Processor`` line seen before
    it (older ARM kernels). Like gopsutil, a value is cut at a second colon.
    """
    text = _read_text(_path(root, "proc/cpuinfo"))
    if text is None:
        return ""
    processor_name = ""
    model = None
    for line in text.split("\n"):
        fields = line.split(":")
        if len(fields) < 2:
            continue
        key, value = fields[0].strip(), fields[1].strip()
        if key == "Processor":
            processor_name = value
        elif key == "processor":
            if model is not None:
                break
            if not _GO_INT.fullmatch(value):
                return ""  # gopsutil fails the whole Info() call here
            model = processor_name
        elif key in ("model name", "cpu") and model is not None:
            model = value
    return model or ""


DMI_FILES = ("product_serial", "product_uuid", "product_name", "sys_vendor")


def dmi_info(root: str = "/") -> Tuple[str, str, str, str]:
    """(host_serial, host_id, host_model, host_vendor) from /sys/class/dmi/id.

    product_serial is readable by root only; unreadable files give "".
    """
    out = []
    for name in DMI_FILES:
        data = _read_bytes(_path(root, "sys/class/dmi/id/" + name))
        out.append(go_trim_space(data).decode("utf-8", "replace") if data else "")
    return out[0], out[1], out[2], out[3]


# bufio.Scanner's default token limit: Go stops reading at a longer line.
_SCANNER_MAX = 64 * 1024


def _scanner_lines(text: str):
    for line in text.split("\n"):
        if len(line.encode("utf-8", "replace")) > _SCANNER_MAX:
            return
        yield line[:-1] if line.endswith("\r") else line


def dns(root: str = "/") -> str:
    """The ``nameserver`` values of /etc/resolv.conf joined by "," (Go's GetDNS)."""
    text = _read_text(_path(root, "etc/resolv.conf"))
    servers = [line[len("nameserver"):].strip() for line in _scanner_lines(text or "")
               if line.startswith("nameserver")]
    return ",".join(servers)


RTF_UP = 0x1
RTF_GATEWAY = 0x2
_GO_HEX = re.compile(r"[+-]?[0-9a-fA-F]+", re.ASCII)


def gateway(root: str = "/") -> str:
    """Go's GetGateway: the gateway of the first up route that has one, dotted."""
    text = _read_text(_path(root, "proc/net/route"))
    for line in _scanner_lines(text or ""):
        fields = line.split()
        if len(fields) <= 3 or not _GO_HEX.fullmatch(fields[3]):
            continue
        flags = int(fields[3], 16)
        if not -(1 << 63) <= flags < (1 << 63):
            continue  # out of ParseInt's int64 range
        if flags & RTF_UP and flags & RTF_GATEWAY:
            try:
                raw = bytes.fromhex(fields[2])
            except ValueError:
                continue
            if len(raw) == 4:
                return "%d.%d.%d.%d" % (raw[3], raw[2], raw[1], raw[0])
    return ""


def loadavg(root: str = "/") -> Dict[str, str]:
    """load_1 load_5 load_15 running_procs total_procs from /proc/loadavg.

    The kernel's own text, as the Go heartbeat copies it; keys Go would not
    set (unreadable or short file) are absent.
    """
    text = _read_text(_path(root, "proc/loadavg"))
    fields = (text or "").split()
    out = {}
    if len(fields) > 3:
        out["load_1"], out["load_5"], out["load_15"] = fields[0], fields[1], fields[2]
        procs = fields[3].split("/")
        if len(procs) > 1:
            out["running_procs"], out["total_procs"] = procs[0], procs[1]
    return out


def dir_size(path: str, exclude: Optional[str] = None) -> int:
    """Bytes in the files under ``path`` (Go's GetDirSize), never following links.

    Sizes are apparent sizes (st_size) of everything that is not a directory,
    symlinks counting their own length, as filepath.Walk with Lstat does.
    ``exclude`` names a top-level subdirectory to leave out (``plugin`` for
    the agent's du, docs/protocol.md section 4); Go would skip such a name at any depth.
    Unreadable entries are skipped.
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        log.debug("du %s: %s", path, e)
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total = 0
    stack = [(path, True)]
    while stack:
        current, top = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as e:
            log.debug("du %s: %s", current, e)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not (top and exclude is not None and entry.name == exclude):
                        stack.append((entry.path, False))
                else:
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError as e:
                log.debug("du %s: %s", entry.path, e)
    return total


def _fmt(value: float) -> str:
    # strconv.FormatFloat(v, 'f', 8, 64), as every float in the heartbeat.
    return "%.8f" % value


def system_fields(root: str = "/", use_psutil: Optional[bool] = None) -> Dict[str, str]:
    """The host part of the 1000 heartbeat, formatted as the Go agent formats it.

    nproc total_mem load_1 load_5 load_15 running_procs total_procs host_serial
    host_id host_model host_vendor dns gateway cpu_name boot_time mem_usage
    (cpu_usage needs a CpuUsageSampler). As in Go, the load keys and mem_usage
    are left out when their files cannot be read.
    """
    fields = {"nproc": str(nproc()), "total_mem": str(total_mem(root, use_psutil))}
    fields.update(loadavg(root))
    (fields["host_serial"], fields["host_id"], fields["host_model"],
     fields["host_vendor"]) = dmi_info(root)
    fields["dns"] = dns(root)
    fields["gateway"] = gateway(root)
    fields["cpu_name"] = cpu_name(root)
    fields["boot_time"] = str(boot_time(root, use_psutil))
    usage = mem_usage(root, use_psutil)
    if usage is not None:
        fields["mem_usage"] = _fmt(usage)
    return fields
