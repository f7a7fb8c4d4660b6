"""Host metrics collectors: fake /proc trees, hostile input, rates, stdlib vs psutil, runner."""

import asyncio
import logging
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from elkeid_agent.host import metrics as hm
from elkeid_agent.metrics import Registry
from elkeid_agent.runtime.executors import Executors
from elkeid_agent.runtime.tasks import TaskOwner
from elkeid_agent.services.config import Collector
from elkeid_agent.state import AgentState
from test_resources import needs_psutil, psutil, write


def values(samples, name):
    """{labels as a sorted tuple: value} of one metric."""
    return {tuple(sorted(s.labels.items())): s.value for s in samples if s.name == name}


def value(samples, name, **labels):
    return values(samples, name)[tuple(sorted(labels.items()))]


def names(samples):
    return {s.name for s in samples}


# --- cpu ----------------------------------------------------------------------------------

def stat(*lines):
    return "".join(lines) + "intr 1 2 3\nctxt 99\nbtime 1700000000\n"


def cpu_line(user, nice, system, idle, iowait=0, irq=0, softirq=0, steal=0, name="cpu"):
    # guest and guest_nice are already inside user and nice: they must not count.
    return "%s %d %d %d %d %d %d %d %d 7 7\n" % (name, user, nice, system, idle, iowait, irq,
                                               softirq, steal)


def test_cpu_first_sample_is_a_baseline_then_fractions(tmp_path):
    write(tmp_path, "proc/stat", stat(cpu_line(100, 0, 100, 800), cpu_line(50, 0, 50, 400, name="cpu0"),
                                      cpu_line(50, 0, 50, 400, name="cpu1")))
    write(tmp_path, "proc/loadavg", "0.50 1.25 2.00 3/400 1234\n")
    c = hm.CpuCollector(root=str(tmp_path))
    first = c.sample(now=100.0)
    assert names(first) == {"cpu_count", "load1", "load5", "load15"}  # no bogus ratios yet
    assert value(first, "cpu_count") == 2
    assert (value(first, "load1"), value(first, "load5"), value(first, "load15")) == (0.5, 1.25, 2.0)

    # +100 ticks: user 30 nice 10 system 20 idle 20 iowait 10 steal 10; cpu1 fully busy.
    write(tmp_path, "proc/stat", stat(cpu_line(130, 10, 120, 820, 10, 0, 0, 10),
                                      cpu_line(50, 0, 50, 450, name="cpu0"),
                                      cpu_line(100, 0, 50, 400, name="cpu1")))
    second = c.sample(now=101.0)
    assert value(second, "cpu_usage_ratio") == pytest.approx(0.7)  # all but idle+iowait
    assert value(second, "cpu_user_ratio") == pytest.approx(0.3)
    assert value(second, "cpu_system_ratio") == pytest.approx(0.2)
    assert value(second, "cpu_iowait_ratio") == pytest.approx(0.1)
    assert value(second, "cpu_steal_ratio") == pytest.approx(0.1)
    assert value(second, "cpu_core_usage_ratio", cpu="0") == 0.0
    assert value(second, "cpu_core_usage_ratio", cpu="1") == 1.0
    assert c.skipped == 0


def test_cpu_counter_reset_gives_zero_not_negative(tmp_path):
    write(tmp_path, "proc/stat", stat(cpu_line(1000, 0, 1000, 8000)))
    c = hm.CpuCollector(root=str(tmp_path))
    c.sample(now=1.0)
    write(tmp_path, "proc/stat", stat(cpu_line(10, 0, 10, 80)))  # e.g. a restored VM snapshot
    got = c.sample(now=2.0)
    assert value(got, "cpu_usage_ratio") == 0.0 and value(got, "cpu_user_ratio") == 0.0
    write(tmp_path, "proc/stat", stat(cpu_line(20, 0, 10, 90)))  # the new baseline counts
    assert value(c.sample(now=3.0), "cpu_usage_ratio") == pytest.approx(0.5)


def test_cpu_no_time_passed_keeps_the_older_baseline(tmp_path):
    write(tmp_path, "proc/stat", stat(cpu_line(0, 0, 0, 0)))
    c = hm.CpuCollector(root=str(tmp_path))
    c.sample(now=5.0)
    write(tmp_path, "proc/stat", stat(cpu_line(10, 0, 0, 10)))
    assert "cpu_usage_ratio" not in names(c.sample(now=5.0))
    write(tmp_path, "proc/stat", stat(cpu_line(20, 0, 0, 20)))
    assert value(c.sample(now=6.0), "cpu_usage_ratio") == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [
    "cpu2 1 2\n",                          # truncated
    "cpu2 1 2 x 4 5 6 7 8\n",              # non-numeric
    "cpu2 1 2 %d 4\n" % (1 << 64),         # beyond u64
    "cpu2 1 -2 3 4\n",                     # negative
    "cpu2 %s 1 1 1\n" % ("9" * 6000),      # beyond Python's int digit limit
    "cpu1 1 1 1 1\n",                      # a duplicate CPU
])
def test_cpu_bad_lines_are_skipped_and_counted(tmp_path, bad):
    write(tmp_path, "proc/stat", stat(cpu_line(1, 1, 1, 1), "cpu0 1 1 1 1\n", "cpu1 1 1 1 1\n",
                                      bad, "cpufreq 1 2 3 4\n"))
    write(tmp_path, "proc/loadavg", "0.00 0.00 0.00 1/1 1\n")
    c = hm.CpuCollector(root=str(tmp_path))
    got = c.sample(now=1.0)
    assert value(got, "cpu_count") == 2 and c.skipped == 1


def test_cpu_missing_files(tmp_path):
    c = hm.CpuCollector(root=str(tmp_path))
    assert c.sample(now=1.0) == [] and c.skipped == 2  # /proc/stat, /proc/loadavg
    write(tmp_path, "proc/loadavg", "nan inf -1 1/2 3\n")
    before = c.skipped
    assert c.sample(now=2.0) == [] and c.skipped == before + 2


# --- memory -------------------------------------------------------------------------------

MEMINFO = """MemTotal:       16000000 kB
MemFree:         2000000 kB
MemAvailable:    9000000 kB
Buffers:          500000 kB
Cached:          6000000 kB
SwapCached:            0 kB
SReclaimable:     500000 kB
SwapTotal:       4000000 kB
SwapFree:        3000000 kB
HugePages_Total:       0
"""


def test_memory_from_meminfo(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    c = hm.MemoryCollector(root=str(tmp_path))
    got = c.sample()
    k = 1024
    assert {s.name: s.value for s in got} == {
        "memory_total_bytes": 16000000 * k, "memory_available_bytes": 9000000 * k,
        "memory_free_bytes": 2000000 * k, "memory_buffers_bytes": 500000 * k,
        "memory_cached_bytes": 6500000 * k, "memory_used_bytes": 7000000 * k,
        "swap_total_bytes": 4000000 * k, "swap_used_bytes": 1000000 * k}
    assert c.skipped == 0


def test_memory_hostile_lines(tmp_path):
    write(tmp_path, "proc/meminfo", "MemTotal: 1000 kB\nMemFree: lots kB\nBuffers\n"
          "Cached: -5 kB\nMemAvailable: %d kB\n\x00\xff: 1\n" % (1 << 70))
    c = hm.MemoryCollector(root=str(tmp_path))
    got = c.sample()
    assert {s.name: s.value for s in got} == {"memory_total_bytes": 1024000,
                                              "memory_used_bytes": 1024000}
    assert c.skipped == 4  # MemFree, Buffers, Cached, the huge MemAvailable


def test_memory_missing_file(tmp_path):
    c = hm.MemoryCollector(root=str(tmp_path))
    assert c.sample() == [] and c.skipped == 1


# --- disk ---------------------------------------------------------------------------------

def mounts_text(tmp_path):
    for d in ("data", "with space", "srv", "run/user/1000"):
        os.makedirs(os.path.join(str(tmp_path), d), exist_ok=True)
    return ("/dev/vda / ext4 rw 0 0\n"
            "proc /proc proc rw 0 0\n"
            "sysfs /sys sysfs rw 0 0\n"
            "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"
            "tmpfs /dev/shm tmpfs rw 0 0\n"
            "overlay /srv overlay rw 0 0\n"
            "/dev/vdb1 /data xfs rw 0 0\n"
            "/dev/vdc /with\\040space ext4 rw 0 0\n"
            "tmpfs /run/user/1000 tmpfs rw 0 0\n"
            "shm /var/lib/docker/containers/x/shm tmpfs rw 0 0\n"
            "/dev/vdd /data ext4 rw 0 0\n"        # mounted over /data: the visible one wins
            "truncated\n"
            "rootfs relative ext4 rw 0 0\n")


DISKSTATS = (
    " 254 0 vda 100 0 2000 10 50 0 4000 20 0 300 30 0 0 0 0\n"
    " 254 1 vda1 90 0 1800 10 50 0 4000 20 0 300 30\n"       # a partition: excluded
    "   7 0 loop0 5 0 10 0 0 0 0 0 0 0 0\n"                    # excluded
    " 253 0 dm-0 10 0 20 0 30 0 40 0 0 1000 0\n"
    " 254 16 vdb 1 2 3\n"                                      # truncated
    " 254 32 vdc 1 0 x 0 1 0 1 0 0 1 1\n"                      # non-numeric
    " 8 0\n")


def test_disk_mounts_follow_node_exporter_exclusions(tmp_path):
    write(tmp_path, "proc/self/mounts", mounts_text(tmp_path))
    c = hm.DiskCollector(root=str(tmp_path))
    assert [m.mountpoint for m in c.mounts()] == [
        "/", "/with space", "/run/user/1000", "/data"]
    assert [m.device for m in c.mounts() if m.mountpoint == "/data"] == ["/dev/vdd"]
    assert c.skipped == 2 * 2  # the truncated line and the relative mount point, twice


def test_disk_usage_and_io(tmp_path):
    write(tmp_path, "proc/self/mounts", mounts_text(tmp_path))
    write(tmp_path, "proc/diskstats", DISKSTATS)
    c = hm.DiskCollector(root=str(tmp_path))
    first = c.sample(now=10.0)
    st_root = os.statvfs(str(tmp_path))
    unit = st_root.f_frsize
    labels = {"mountpoint": "/", "device": "/dev/vda", "fstype": "ext4"}
    assert value(first, "filesystem_size_bytes", **labels) == st_root.f_blocks * unit
    assert value(first, "filesystem_device_error", **labels) == 0
    assert value(first, "filesystem_inodes", **labels) == st_root.f_files
    assert value(first, "filesystem_size_bytes", mountpoint="/with space", device="/dev/vdc",
                 fstype="ext4") > 0
    assert set(values(first, "disk_read_bytes_total")) == {(("device", "dm-0"),),
                                                          (("device", "vda"),)}
    assert value(first, "disk_read_bytes_total", device="vda") == 2000 * 512
    assert value(first, "disk_written_bytes_total", device="vda") == 4000 * 512
    assert value(first, "disk_io_time_seconds_total", device="dm-0") == 1.0
    assert "disk_read_bytes_per_second" not in names(first)
    assert c.skipped == 2 + 3  # the two bad mount lines; vdb, vdc and the short line

    write(tmp_path, "proc/diskstats", DISKSTATS.replace(
        "vda 100 0 2000 10 50 0 4000 20 0 300", "vda 110 0 2400 10 70 0 4000 20 0 800")
        .replace("dm-0 10 0 20", "dm-0 1 0 2"))                 # dm-0 was re-created
    second = c.sample(now=12.0)
    assert value(second, "disk_reads_per_second", device="vda") == 5.0
    assert value(second, "disk_writes_per_second", device="vda") == 10.0
    assert value(second, "disk_read_bytes_per_second", device="vda") == 400 * 512 / 2
    assert value(second, "disk_written_bytes_per_second", device="vda") == 0.0
    assert value(second, "disk_io_utilization_ratio", device="vda") == 0.25
    assert value(second, "disk_reads_per_second", device="dm-0") == 0.0       # reset
    assert value(second, "disk_read_bytes_per_second", device="dm-0") == 0.0  # reset
    assert value(second, "disk_writes_per_second", device="dm-0") == 0.0      # unchanged


def test_disk_statvfs_failure_is_that_mount_only(tmp_path):
    write(tmp_path, "proc/self/mounts", "/dev/vda / ext4 rw 0 0\nnfs:/x /data nfs4 rw 0 0\n")
    os.makedirs(os.path.join(str(tmp_path), "data"))

    def statvfs(path):
        if path.endswith("data"):
            raise OSError(116, "Stale file handle")
        return os.statvfs(path)

    c = hm.DiskCollector(root=str(tmp_path), statvfs=statvfs)
    got = c.sample(now=1.0)
    nfs = {"mountpoint": "/data", "device": "nfs:/x", "fstype": "nfs4"}
    assert value(got, "filesystem_device_error", **nfs) == 1
    assert ("filesystem_size_bytes" in {s.name for s in got if s.labels == nfs}) is False
    assert value(got, "filesystem_device_error", mountpoint="/", device="/dev/vda",
                 fstype="ext4") == 0
    assert c.skipped == 2  # the failed mount; the missing diskstats


def test_disk_only_lists_mounts_and_their_devices(tmp_path):
    write(tmp_path, "proc/self/mounts", "/dev/vda / ext4 rw 0 0\n/dev/mapper/vg-data /data xfs rw 0 0\n"
          "proc /proc proc rw 0 0\n")
    write(tmp_path, "proc/diskstats", DISKSTATS)
    os.makedirs(os.path.join(str(tmp_path), "data"))
    write(tmp_path, "dev/dm-0", "")
    os.makedirs(os.path.join(str(tmp_path), "dev/mapper"))
    os.symlink("../dm-0", os.path.join(str(tmp_path), "dev/mapper/vg-data"))
    c = hm.DiskCollector(only=("/data", "/proc"), root=str(tmp_path))
    got = c.sample(now=1.0)
    assert {s.labels["mountpoint"] for s in got if "mountpoint" in s.labels} == {"/data", "/proc"}
    assert set(values(got, "disk_reads_completed_total")) == {(("device", "dm-0"),)}


# --- network ------------------------------------------------------------------------------

NET_HEAD = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets "
            "errs drop fifo colls carrier compressed\n")


def netline(name, rx, rxp, tx, txp, errs=0, drop=0):
    return "%6s:%d %d %d %d 0 0 0 0 %d %d %d %d 0 0 0 0\n" % (name, rx, rxp, errs, drop,
                                                             tx, txp, errs, drop)


def test_network_counters_then_rates(tmp_path):
    write(tmp_path, "proc/net/dev", NET_HEAD + netline("lo", 1000, 10, 1000, 10)
          + netline("eth0", 123456789012, 100, 5000, 50, errs=1, drop=2))
    c = hm.NetworkCollector(root=str(tmp_path))
    first = c.sample(now=0.0)
    assert value(first, "network_receive_bytes_total", interface="eth0") == 123456789012
    assert value(first, "network_transmit_packets_total", interface="eth0") == 50
    assert value(first, "network_receive_errors_total", interface="eth0") == 1
    assert value(first, "network_transmit_drop_total", interface="eth0") == 2
    assert not any(s.name.endswith("_per_second") for s in first)

    # lo wraps its rx byte counter (32-bit driver counter); eth0 disappears.
    write(tmp_path, "proc/net/dev", NET_HEAD + netline("lo", 500, 30, 3000, 30))
    second = c.sample(now=4.0)
    assert value(second, "network_receive_bytes_per_second", interface="lo") == 0.0
    assert value(second, "network_receive_packets_per_second", interface="lo") == 5.0
    assert value(second, "network_transmit_bytes_per_second", interface="lo") == 500.0
    assert {s.labels["interface"] for s in second} == {"lo"}
    # eth0 comes back: a new baseline, not a rate over its absence.
    write(tmp_path, "proc/net/dev", NET_HEAD + netline("lo", 500, 30, 3000, 30)
          + netline("eth0", 10, 1, 10, 1))
    third = c.sample(now=5.0)
    assert "network_receive_bytes_per_second" not in {
        s.name for s in third if s.labels["interface"] == "eth0"}
    assert c.skipped == 0


def test_network_only_and_hostile_lines(tmp_path):
    write(tmp_path, "proc/net/dev", NET_HEAD + netline("lo", 1, 1, 1, 1)
          + netline("eth0", 1, 1, 1, 1) + "  eth1: 1 2 3\n" + "  eth2: %s\n" % " ".join(["x"] * 16)
          + "  eth3: %s\n" % " ".join([str(1 << 64)] * 16) + "no colon here\n"
          + netline("lo", 2, 2, 2, 2) + ":\n")
    c = hm.NetworkCollector(root=str(tmp_path))
    got = c.sample(now=0.0)
    assert {s.labels["interface"] for s in got} == {"lo", "eth0"}
    assert value(got, "network_receive_bytes_total", interface="lo") == 1  # the first lo wins
    assert c.skipped == 6
    only = hm.NetworkCollector(only=("eth0", "eth9"), root=str(tmp_path))
    assert {s.labels["interface"] for s in only.sample(now=0.0)} == {"eth0"}


def test_network_missing_file(tmp_path):
    c = hm.NetworkCollector(root=str(tmp_path))
    assert c.sample() == [] and c.skipped == 1


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.fixed_dictionaries({rel: st.binary(max_size=400) for rel in (
    "proc/stat", "proc/loadavg", "proc/meminfo", "proc/self/mounts", "proc/diskstats",
    "proc/net/dev")}))
def test_fuzz_every_file(tmp_path, files):
    for rel, data in files.items():
        write(tmp_path, rel, data)
    for cls in hm.COLLECTORS.values():
        c = cls(root=str(tmp_path), **({"statvfs": lambda p: os.statvfs(str(tmp_path))}
                                      if cls is hm.DiskCollector else {}))
        for now in (1.0, 2.0):
            for s in c.sample(now=now):
                assert s.value >= 0 and isinstance(s.value, (int, float))
        hm.render_prometheus(c.sample(now=3.0))


# --- output -------------------------------------------------------------------------------

def test_prometheus_text_and_record_fields():
    parser = pytest.importorskip("prometheus_client.parser")
    samples = [hm.Sample("cpu_count", {}, 2), hm.Sample("cpu_usage_ratio", {}, 0.25),
               hm.Sample("network_receive_bytes_total", {"interface": 'we"ird\\'}, 1 << 63),
               hm.Sample("network_receive_bytes_per_second", {"interface": 'we"ird\\'}, 12.5),
               hm.Sample("network_receive_bytes_total", {"interface": "lo"}, 7)]
    text = hm.render_prometheus(samples)
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["elkeid_host_cpu_count"].samples[0].value == 2
    assert families["elkeid_host_network_receive_bytes"].type == "counter"
    got = {s.labels["interface"]: s.value
           for s in families["elkeid_host_network_receive_bytes"].samples}
    assert got == {'we"ird\\': float(1 << 63), "lo": 7}

    assert hm.record_fields(samples) == [
        {"cpu_count": "2", "cpu_usage_ratio": "0.25000000"},
        {"interface": 'we"ird\\', "network_receive_bytes_total": str(1 << 63),
         "network_receive_bytes_per_second": "12.50000000"},
        {"interface": "lo", "network_receive_bytes_total": "7"}]
    assert hm.render_prometheus([]) == ""


# --- stdlib vs psutil on this host ---------------------------------------------------------

@needs_psutil
def test_live_cpu_both_paths_agree():
    a, b = hm.CpuCollector(use_psutil=False), hm.CpuCollector(use_psutil=True)
    assert a._use_psutil is False and b._use_psutil is True
    before, theirs, after = a.read(), b.read(), a.read()
    assert set(before) == set(theirs) == set(after)
    for key in theirs:  # counters only grow: psutil's reading lies between ours
        for lo, mid, hi in zip(before[key], theirs[key], after[key]):
            assert lo - 1e-9 <= mid <= hi + 1e-9


@needs_psutil
def test_live_memory_both_paths_agree():
    a, b = hm.MemoryCollector(use_psutil=False).read(), hm.MemoryCollector(use_psutil=True).read()
    assert a["total"] == b["total"] and a["swap_total"] == b["swap_total"]
    for k in ("available", "free", "buffers", "cached", "swap_free"):
        assert a[k] == pytest.approx(b[k], rel=0.05, abs=64 << 20), k


@needs_psutil
def test_live_disk_and_network_both_paths_agree():
    for cls in (hm.DiskCollector, hm.NetworkCollector):
        reader = "read_io" if cls is hm.DiskCollector else "read"
        a, b = cls(use_psutil=False), cls(use_psutil=True)
        before, theirs, after = getattr(a, reader)(), getattr(b, reader)(), getattr(a, reader)()
        assert set(before) == set(theirs) == set(after), cls.name
        for key in theirs:
            for lo, mid, hi in zip(before[key], theirs[key], after[key]):
                assert lo <= mid <= hi, (cls.name, key)
        assert a.skipped == 0


@needs_psutil
def test_psutil_error_falls_back_to_proc(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("not sure how to interpret line")
    monkeypatch.setattr(psutil, "net_io_counters", broken)
    got = hm.NetworkCollector(use_psutil=True).read()
    assert "lo" in got


def test_fake_root_never_uses_psutil(tmp_path):
    for cls in hm.COLLECTORS.values():
        assert cls(root=str(tmp_path), use_psutil=True)._use_psutil is False


# --- the runner on a real loop -------------------------------------------------------------

async def until(predicate, timeout=20.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Exploding:
    name = "cpu"
    skipped = 0

    def __init__(self):
        self.calls = 0

    async def collect(self, run_blocking):
        self.calls += 1
        raise RuntimeError("boom %d" % (self.calls % 2))  # two distinct errors, alternating


def fake_tree(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "proc/net/dev", NET_HEAD + netline("lo", 1, 1, 1, 1) + "  bad: 1\n")
    write(tmp_path, "proc/self/mounts", "/dev/vda / ext4 rw 0 0\nnfs:/x /data nfs4 rw 0 0\n")
    os.makedirs(os.path.join(str(tmp_path), "data"), exist_ok=True)
    write(tmp_path, "proc/diskstats", DISKSTATS)


def test_runner_isolates_a_failing_collector(tmp_path, caplog):
    fake_tree(tmp_path)
    fast = Collector(enabled=True, interval=0.02)
    config = {"cpu": fast, "memory": fast, "network": fast,
              "disk": Collector(enabled=False, interval=0.02)}
    caplog.set_level(logging.WARNING, logger="elkeid_agent.host.metrics")

    async def main():
        metrics, executors = Registry(), Executors()
        owner = TaskOwner(metrics, AgentState())
        boom = Exploding()
        runner = hm.Collectors(config, owner, metrics, executors, root=str(tmp_path),
                               instances={"cpu": boom})
        assert set(runner.instances) == {"cpu", "memory", "network"}
        reported = []  # the agent reports each round from this hook
        runner.on_round = lambda r: reported.append(sorted(r.latest))
        runner.start()
        await until(lambda: boom.calls >= 6 and metrics.get("collector_skipped",
                                                             collector="network") >= 3)
        # The others keep their schedules: each produced more than one round.
        mem = runner.instances["memory"]
        rounds = {"n": 0}
        orig = mem.collect

        async def counting(run_blocking):
            rounds["n"] += 1
            return await orig(run_blocking)
        mem.collect = counting
        await until(lambda: rounds["n"] >= 3)
        assert metrics.get("collector_errors", collector="cpu") >= 6
        assert metrics.get("collector_up", collector="cpu") == 0
        assert metrics.get("collector_up", collector="memory") == 1
        assert metrics.get("collector_errors", collector="memory") == 0
        assert metrics.total("tasks_crashed") == 0  # isolated inside the runner, not a crash
        assert "cpu" not in runner.latest
        assert reported and all("cpu" not in names for names in reported)  # failed rounds: none
        assert {"memory", "network"} <= set(reported[-1])
        text = runner.render_prometheus()
        assert "elkeid_host_memory_total_bytes 16384000000" in text
        assert 'elkeid_host_network_receive_bytes_per_second{interface="lo"} 0.0' in text
        await runner.stop()
        assert not owner.running("collector:memory")
        await owner.close()
        executors.close()

    asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if "collector cpu failed" in r.getMessage()]
    assert len(logged) == 2  # once per distinct error
    assert {m.rsplit(" ", 1)[1] for m in logged} == {"0", "1"}


def test_runner_hung_statvfs_reports_the_mount_failed(tmp_path):
    fake_tree(tmp_path)
    release = threading.Event()
    entered = []

    def statvfs(path):
        if path.endswith("data"):
            entered.append(path)
            release.wait(30)  # a hung NFS server
        return os.statvfs(path)

    async def main():
        metrics = Registry()
        executors = Executors(kinds={"collect": (2, 4)})
        owner = TaskOwner(metrics, AgentState())
        disk = hm.DiskCollector(root=str(tmp_path), statvfs=statvfs)
        runner = hm.Collectors({"disk": Collector(interval=0.02)}, owner, metrics, executors,
                               root=str(tmp_path), instances={"disk": disk}, disk_timeout=0.2)
        assert await runner.collect_once("disk") is True
        samples = runner.latest["disk"][1]
        assert value(samples, "filesystem_device_error", mountpoint="/data", device="nfs:/x",
                     fstype="nfs4") == 1
        assert value(samples, "filesystem_device_error", mountpoint="/", device="/dev/vda",
                     fstype="ext4") == 0
        assert value(samples, "disk_reads_completed_total", device="vda") == 100
        # The next rounds do not queue another statvfs behind the hung one.
        assert await runner.collect_once("disk") is True
        assert await runner.collect_once("disk") is True
        assert len(entered) == 1
        assert value(runner.latest["disk"][1], "filesystem_device_error", mountpoint="/data",
                     device="nfs:/x", fstype="nfs4") == 1
        release.set()
        await until(lambda: not runner._pending)
        assert await runner.collect_once("disk") is True
        assert value(runner.latest["disk"][1], "filesystem_device_error", mountpoint="/data",
                     device="nfs:/x", fstype="nfs4") == 0
        assert metrics.get("collector_skipped", collector="disk") >= 3 + 3  # + diskstats lines
        await owner.close()
        executors.close()

    try:
        asyncio.run(main())
    finally:
        release.set()
