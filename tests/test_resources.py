"""Resource facts: fake /proc trees, malformed input, and stdlib vs psutil on this host."""

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from elkeid_agent.host import resources
from elkeid_agent.host.resources import CLK_TCK, PAGE_SIZE

try:
    import psutil
except ImportError:  # the core suite also runs without third-party packages
    psutil = None

needs_psutil = pytest.mark.skipif(psutil is None, reason="psutil not installed")

BTIME = 1700000000
PID = 4321


def write(root, rel, data):
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def pid_stat(utime, stime, start_ticks, comm="my (weird) proc"):
    # Fields 1..22+ of /proc/<pid>/stat; utime/stime are 14/15, starttime 22.
    rest = ["S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0",
            str(utime), str(stime), "0", "0", "20", "0", "1", "0", str(start_ticks),
            "12345678", "250"] + ["0"] * 30
    return "%d (%s) %s\n" % (PID, comm, " ".join(rest))


def fake_process(root, utime=200, stime=100, start_ticks=50 * CLK_TCK + CLK_TCK // 4,
                 rss_pages=250, io=(1000, 3000), nfd=4):
    write(root, "proc/stat", "cpu  1 2 3 4 5 6 7 8 0 0\nbtime %d\n" % BTIME)
    write(root, "proc/%d/stat" % PID, pid_stat(utime, stime, start_ticks))
    write(root, "proc/%d/statm" % PID, "1000 %d 100 10 0 300 0\n" % rss_pages)
    if io is not None:
        write(root, "proc/%d/io" % PID,
              "rchar: 99999\nwchar: 88888\nsyscr: 10\nsyscw: 20\nread_bytes: %d\n"
              "write_bytes: %d\ncancelled_write_bytes: 0\n" % io)
    elif os.path.exists(os.path.join(str(root), "proc/%d/io" % PID)):
        os.unlink(os.path.join(str(root), "proc/%d/io" % PID))
    fd_dir = os.path.join(str(root), "proc/%d/fd" % PID)
    os.makedirs(fd_dir, exist_ok=True)
    for name in os.listdir(fd_dir):
        os.unlink(os.path.join(fd_dir, name))
    for i in range(nfd):
        write(root, "proc/%d/fd/%d" % (PID, i), "")


START = BTIME + 50  # whole seconds of the default start_ticks


# --- ProcessSampler on a fake tree ------------------------------------------------------

def test_first_sample_covers_time_since_start(tmp_path):
    fake_process(tmp_path)
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    started = BTIME + 50.25
    got = s.sample(now=started + 10)
    assert got.exists and got.pid == PID
    assert got.cpu == pytest.approx(3.0 / 10)          # 300 ticks of cpu over 10 s
    assert got.rss == 250 * PAGE_SIZE
    assert got.nfd == 4
    assert got.start_time == START
    # Go: bytes / (now.Unix() - startAt) = 1000 / (int(started + 10) - START) = 1000 / 10
    assert got.read_speed == pytest.approx(100.0)
    assert got.write_speed == pytest.approx(300.0)


def test_later_samples_are_rates_since_previous(tmp_path):
    fake_process(tmp_path)
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    t0 = BTIME + 100
    s.sample(now=t0)
    fake_process(tmp_path, utime=200 + CLK_TCK // 2, io=(1500, 3000), nfd=6, rss_pages=300)
    got = s.sample(now=t0 + 5)
    assert got.cpu == pytest.approx(0.5 / 5)
    assert got.read_speed == pytest.approx(100.0)
    assert got.write_speed == 0.0
    assert (got.nfd, got.rss) == (6, 300 * PAGE_SIZE)


@pytest.mark.parametrize("before,after,dt", [
    ((200, (1000, 3000)), (500, (9000, 9000)), 0),     # no time passed
    ((900, (5000, 5000)), (100, (10, 10)), 10),        # counters went backwards
])
def test_degenerate_intervals_give_zero_rates(tmp_path, before, after, dt):
    fake_process(tmp_path, utime=before[0], io=before[1])
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    s.sample(now=BTIME + 100)
    fake_process(tmp_path, utime=after[0], io=after[1])
    got = s.sample(now=BTIME + 100 + dt)
    assert (got.cpu, got.read_speed, got.write_speed) == (0.0, 0.0, 0.0)


def test_sample_at_start_instant_is_zero_not_a_division_error(tmp_path):
    fake_process(tmp_path)
    got = resources.ProcessSampler(PID, root=str(tmp_path)).sample(now=BTIME + 50.25)
    assert (got.cpu, got.read_speed, got.write_speed) == (0.0, 0.0, 0.0)


def test_unreadable_io_gives_zero_speeds_and_keeps_the_rest(tmp_path):
    fake_process(tmp_path, io=None)
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    got = s.sample(now=BTIME + 60)
    assert (got.read_speed, got.write_speed) == (0.0, 0.0)
    assert got.exists and got.nfd == 4 and got.rss == 250 * PAGE_SIZE
    # io readable again: no io baseline yet, so Go's since-start formula applies.
    fake_process(tmp_path, io=(2000, 0))
    got = s.sample(now=BTIME + 70)
    assert got.read_speed == pytest.approx(2000 / 20)


def test_process_gone_then_pid_reused(tmp_path):
    fake_process(tmp_path)
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    s.sample(now=BTIME + 100)
    os.unlink(os.path.join(str(tmp_path), "proc/%d/stat" % PID))
    gone = s.sample(now=BTIME + 110)
    assert gone == resources.ProcStats(pid=PID, exists=False)
    # A new process with the same pid, started at BTIME + 200.
    fake_process(tmp_path, utime=100, stime=0, start_ticks=200 * CLK_TCK, io=(400, 0))
    got = s.sample(now=BTIME + 204)
    assert got.exists and got.start_time == BTIME + 200
    assert got.cpu == pytest.approx(1.0 / 4)
    assert got.read_speed == pytest.approx(100.0)


def test_pid_reuse_without_a_gap_is_detected_by_start_time(tmp_path):
    fake_process(tmp_path, utime=10000)
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    s.sample(now=BTIME + 1000)
    fake_process(tmp_path, utime=50, stime=50, start_ticks=990 * CLK_TCK)
    got = s.sample(now=BTIME + 1010)
    assert got.cpu == pytest.approx(1.0 / 20)


@pytest.mark.parametrize("stat", [
    "", "garbage", "4321 (x) S 1 2 3", "4321 (x S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
    pid_stat("x", 1, 1), pid_stat(1, -5, 1), pid_stat(1, 1, "1e5"), "\x00\xff" * 40])
def test_malformed_pid_stat_means_no_process(tmp_path, stat):
    fake_process(tmp_path)
    write(tmp_path, "proc/%d/stat" % PID, stat)
    got = resources.ProcessSampler(PID, root=str(tmp_path)).sample(now=BTIME + 100)
    assert got == resources.ProcStats(pid=PID, exists=False)


def test_comm_with_parentheses_and_spaces(tmp_path):
    fake_process(tmp_path)
    write(tmp_path, "proc/%d/stat" % PID, pid_stat(300, 0, 50 * CLK_TCK, comm=") ) (a b"))
    got = resources.ProcessSampler(PID, root=str(tmp_path)).sample(now=BTIME + 60)
    assert got.cpu == pytest.approx(3.0 / 10) and got.start_time == START


def test_malformed_statm_io_and_missing_fd_dir(tmp_path):
    fake_process(tmp_path)
    write(tmp_path, "proc/%d/statm" % PID, "12 x\n")
    write(tmp_path, "proc/%d/io" % PID, "read_bytes: lots\nwrite_bytes: 5\n")
    fd_dir = os.path.join(str(tmp_path), "proc/%d/fd" % PID)
    for name in os.listdir(fd_dir):
        os.unlink(os.path.join(fd_dir, name))
    os.rmdir(fd_dir)
    got = resources.ProcessSampler(PID, root=str(tmp_path)).sample(now=BTIME + 60)
    assert got.exists
    assert (got.rss, got.nfd, got.read_speed, got.write_speed) == (0, 0, 0.0, 0.0)


def test_missing_btime_counts_from_epoch_without_raising(tmp_path):
    fake_process(tmp_path)
    write(tmp_path, "proc/stat", "cpu 1 2 3 4\n")
    got = resources.ProcessSampler(PID, root=str(tmp_path)).sample(now=BTIME)
    assert got.exists and got.start_time == 50


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stat=st.binary(max_size=300), statm=st.binary(max_size=40), io=st.binary(max_size=120))
def test_process_files_fuzz(tmp_path, stat, statm, io):
    fake_process(tmp_path)
    write(tmp_path, "proc/%d/stat" % PID, stat)
    write(tmp_path, "proc/%d/statm" % PID, statm)
    write(tmp_path, "proc/%d/io" % PID, io)
    s = resources.ProcessSampler(PID, root=str(tmp_path))
    for now in (BTIME + 100, BTIME + 160):
        got = s.sample(now=now)
        assert got.cpu >= 0 and got.read_speed >= 0 and got.write_speed >= 0


# --- ProcessSampler live, both paths -------------------------------------------------------

def test_live_sample_of_this_process_stdlib():
    s = resources.ProcessSampler(os.getpid(), use_psutil=False)
    first = s.sample()
    assert first.exists and first.rss > 0 and first.nfd > 0
    assert abs(first.start_time - time.time()) < 7 * 24 * 3600
    assert first.cpu >= 0
    second = s.sample()
    assert second.start_time == first.start_time and second.cpu >= 0


@pytest.mark.parametrize("use_psutil", [False, True])
def test_live_missing_pid(use_psutil):
    if use_psutil and psutil is None:
        pytest.skip("psutil not installed")
    got = resources.ProcessSampler(2 ** 31 - 2, use_psutil=use_psutil).sample()
    assert got == resources.ProcStats(pid=2 ** 31 - 2, exists=False)


@pytest.fixture
def idle_child():
    # It says when its interpreter has started, so the samples see an idle process.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        yield child.pid
    finally:
        child.kill()
        child.wait()


@needs_psutil
def test_live_idle_process_both_paths_agree(idle_child):
    mine = resources._stdlib_snapshot(idle_child, "/", resources.boot_time(use_psutil=False))
    theirs = resources._psutil_snapshot(psutil.Process(idle_child))
    assert mine.start_time == theirs.start_time
    assert mine.start == pytest.approx(theirs.start, abs=1e-6)
    assert (mine.nfd, mine.io) == (theirs.nfd, theirs.io)
    assert mine.rss == pytest.approx(theirs.rss, rel=0.02)
    assert mine.cpu_seconds == pytest.approx(theirs.cpu_seconds, abs=0.05)

    a = resources.ProcessSampler(idle_child, use_psutil=False)
    b = resources.ProcessSampler(idle_child, use_psutil=True)
    sa, sb = a.sample(), b.sample()
    assert (sa.start_time, sa.nfd) == (sb.start_time, sb.nfd)
    assert sa.cpu == pytest.approx(sb.cpu, abs=0.1)
    time.sleep(0.2)
    sa, sb = a.sample(), b.sample()
    assert sa.cpu == pytest.approx(sb.cpu, abs=0.05)
    assert sa.rss == pytest.approx(sb.rss, rel=0.02)


@needs_psutil
def test_snapshots_of_this_process_agree():
    # Same instant as far as the static fields go.
    btime = resources.boot_time(use_psutil=False)
    mine = resources._stdlib_snapshot(os.getpid(), "/", btime)
    theirs = resources._psutil_snapshot(psutil.Process(os.getpid()))
    assert mine.start_time == theirs.start_time
    assert mine.start == pytest.approx(theirs.start, abs=1e-6)
    assert mine.cpu_seconds == pytest.approx(theirs.cpu_seconds, abs=0.1)


# --- CpuUsageSampler -----------------------------------------------------------------------

def cpu_line(user, nice, system, idle, iowait=0, irq=0, softirq=0, steal=0, guest=0, gnice=0):
    return "cpu  %d %d %d %d %d %d %d %d %d %d\ncpu0 1 1 1 1\nbtime %d\n" % (
        user, nice, system, idle, iowait, irq, softirq, steal, guest, gnice, BTIME)


def test_cpu_usage_busy_fraction(tmp_path):
    write(tmp_path, "proc/stat", cpu_line(100, 0, 100, 1000, 50))
    s = resources.CpuUsageSampler(root=str(tmp_path))
    write(tmp_path, "proc/stat", cpu_line(130, 0, 110, 1050, 60, guest=500))
    assert s.sample() == pytest.approx(40 / 100)  # iowait is idle, guest ignored
    write(tmp_path, "proc/stat", cpu_line(130, 0, 110, 1150, 60))
    assert s.sample() == 0.0


def test_cpu_usage_with_only_four_fields(tmp_path):
    write(tmp_path, "proc/stat", "cpu 10 0 10 80\n")
    s = resources.CpuUsageSampler(root=str(tmp_path))
    write(tmp_path, "proc/stat", "cpu 20 0 20 140\n")
    assert s.sample() == pytest.approx(20 / 80)


def test_cpu_usage_unreadable_baseline_then_recovers(tmp_path):
    s = resources.CpuUsageSampler(root=str(tmp_path))
    assert s.sample() == 0.0
    write(tmp_path, "proc/stat", cpu_line(0, 0, 0, 100))
    assert s.sample() == 0.0  # first good reading only sets the baseline
    write(tmp_path, "proc/stat", cpu_line(50, 0, 0, 150))
    assert s.sample() == pytest.approx(0.5)


@pytest.mark.parametrize("text", ["", "cpu a b c d\n", "cpu 1 2\n", "cpu -1 2 3 4\n",
                                  "cpu0 1 2 3 4\n", "\xff\xfe"])
def test_cpu_usage_garbage_stat(tmp_path, text):
    write(tmp_path, "proc/stat", text)
    s = resources.CpuUsageSampler(root=str(tmp_path))
    assert s.sample() == 0.0


def test_busy_fraction_edges():
    assert resources.busy_fraction((100.0, 10.0), (100.0, 20.0)) == 1.0  # busy up, all not
    assert resources.busy_fraction((100.0, 10.0), (200.0, 10.0)) == 0.0
    assert resources.busy_fraction((100.0, 10.0), (200.0, 300.0)) == 1.0  # clamped
    assert resources.busy_fraction((100.0, 10.0), (100.0, 10.0)) == 0.0  # nothing moved


@pytest.mark.parametrize("use_psutil", [False, True])
def test_cpu_usage_live(use_psutil):
    if use_psutil and psutil is None:
        pytest.skip("psutil not installed")
    s = resources.CpuUsageSampler(use_psutil=use_psutil)
    sum(range(200000))
    time.sleep(0.05)
    assert 0.0 <= s.sample() <= 1.0


@needs_psutil
def test_cpu_times_both_paths_agree():
    mine = resources._stat_cpu_times("/")
    theirs = resources._psutil_cpu_times()
    assert mine[0] == pytest.approx(theirs[0], rel=1e-3)
    assert mine[1] == pytest.approx(theirs[1], rel=1e-3, abs=1.0)


# --- memory and boot time --------------------------------------------------------------------

MEMINFO = ("MemTotal:       1000000 kB\nMemFree:         200000 kB\nMemAvailable:    600000 kB\n"
           "Buffers:          50000 kB\nCached:          250000 kB\nSwapCached:          0 kB\n"
           "SReclaimable:     30000 kB\nHugePages_Total:       0\n")


def test_memory_from_meminfo(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert resources.total_mem(str(tmp_path)) == 1000000 * 1024
    # gopsutil v3: Used = Total - Free - Buffers - (Cached + SReclaimable)
    assert resources.mem_usage(str(tmp_path)) == pytest.approx(
        (1000000 - 200000 - 50000 - 280000) / 1000000)


def test_memory_negative_used_is_zero(tmp_path):
    write(tmp_path, "proc/meminfo", "MemTotal: 100 kB\nMemFree: 90 kB\nCached: 50 kB\n")
    assert resources.mem_usage(str(tmp_path)) == 0.0


@pytest.mark.parametrize("text", ["", "MemFree: 10 kB\n", "MemTotal: 0 kB\n", "MemTotal: x kB\n",
                                  "garbage\n\x00\xff"])
def test_memory_unusable(tmp_path, text):
    write(tmp_path, "proc/meminfo", text)
    assert resources.total_mem(str(tmp_path)) == 0
    assert resources.mem_usage(str(tmp_path)) is None


def test_memory_skips_malformed_lines(tmp_path):
    write(tmp_path, "proc/meminfo", "junk line\nMemTotal: 400 kB\nMemFree: lots\nBuffers: 100 kB\n")
    assert resources.total_mem(str(tmp_path)) == 400 * 1024
    assert resources.mem_usage(str(tmp_path)) == pytest.approx(0.75)


def test_boot_time(tmp_path):
    write(tmp_path, "proc/stat", "cpu 1 2 3 4\nbtime 1712345678\nprocesses 5\n")
    assert resources.boot_time(str(tmp_path)) == 1712345678
    for bad in ("btime\n", "btime x\n", "btime 1 2\n", "btime -4\n", ""):
        write(tmp_path, "proc/stat", bad)
        assert resources.boot_time(str(tmp_path)) == 0
    assert resources.boot_time(str(tmp_path / "nowhere")) == 0


@needs_psutil
def test_live_memory_and_boot_time_paths_agree():
    assert resources.total_mem(use_psutil=True) == resources.total_mem(use_psutil=False) > 0
    assert resources.boot_time(use_psutil=True) == resources.boot_time(use_psutil=False) > 0
    assert resources.mem_usage(use_psutil=True) == pytest.approx(
        resources.mem_usage(use_psutil=False), abs=0.01)


def test_psutil_is_never_used_for_a_fake_root(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert resources.total_mem(str(tmp_path), use_psutil=True) == 1000000 * 1024


def test_forced_stdlib_when_psutil_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "psutil", None)
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert not resources._psutil_for("/", True)
    assert resources.total_mem("/", use_psutil=True) > 0
    s = resources.ProcessSampler(os.getpid(), use_psutil=True)
    assert s.sample().exists


def test_module_imports_and_works_without_psutil():
    code = ("import sys; sys.modules['psutil'] = None\n"
            "from elkeid_agent.host import resources as r\n"
            "assert r.psutil is None and r.USE_PSUTIL is False\n"
            "f = r.system_fields(); assert int(f['total_mem']) > 0, f\n"
            "assert r.ProcessSampler(__import__('os').getpid()).sample().rss > 0\n"
            "r.CpuUsageSampler().sample()\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(resources.__file__)))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --- cpu name, DMI, DNS, gateway, load -----------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8269CY CPU @ 2.50GHz
cpu MHz\t\t: 2500.000

processor\t: 1
model name\t: Some Other CPU
"""

OLD_ARM_CPUINFO = """Processor\t: ARMv7 Processor rev 10 (v7l)
processor\t: 0
BogoMIPS\t: 6.00

processor\t: 1
"""


@pytest.mark.parametrize("text,expected", [
    (X86_CPUINFO, "Intel(R) Xeon(R) Platinum 8269CY CPU @ 2.50GHz"),
    (OLD_ARM_CPUINFO, "ARMv7 Processor rev 10 (v7l)"),
    ("processor : 0\ncpu : POWER9 (architected), altivec supported\n",
     "POWER9 (architected), altivec supported"),
    ("processor : 0\nBogoMIPS : 50.00\nCPU part : 0xd0c\n", ""),       # arm64: no name
    ("model name : Early\nprocessor : 0\n", ""),                         # before the block
    ("processor : 0\nmodel name : Vendor: Model X\n", "Vendor"),       # cut at a colon
    ("processor : zero\nmodel name : X\n", ""),
    ("model name : X\n", ""),
    ("", ""),
])
def test_cpu_name(tmp_path, text, expected):
    write(tmp_path, "proc/cpuinfo", text)
    assert resources.cpu_name(str(tmp_path)) == expected


def test_cpu_name_missing_file(tmp_path):
    assert resources.cpu_name(str(tmp_path)) == ""


def test_dmi_info(tmp_path):
    write(tmp_path, "sys/class/dmi/id/product_serial", "SN123  \n")
    write(tmp_path, "sys/class/dmi/id/product_uuid", "4C4C4544-0042\n")
    write(tmp_path, "sys/class/dmi/id/sys_vendor", b"\xffVendor\n")
    assert resources.dmi_info(str(tmp_path)) == ("SN123", "4C4C4544-0042", "", "\ufffdVendor")


RESOLV = ("# generated\nnameserver 10.0.0.2\r\n  nameserver 9.9.9.9\nnameserver\t1.1.1.1 \n"
          "search example.com\nnameserverX\n")


def test_dns(tmp_path):
    write(tmp_path, "etc/resolv.conf", RESOLV)
    # Go: HasPrefix "nameserver" on the raw line, so indented lines are skipped
    # and "nameserverX" yields "X".
    assert resources.dns(str(tmp_path)) == "10.0.0.2,1.1.1.1,X"
    assert resources.dns(str(tmp_path / "none")) == ""


def test_dns_stops_at_an_overlong_line(tmp_path):
    write(tmp_path, "etc/resolv.conf", "nameserver 1.1.1.1\n" + "#" * 70000 + "\nnameserver 8.8.8.8\n")
    assert resources.dns(str(tmp_path)) == "1.1.1.1"


ROUTE = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
         "eth0\t000010AC\t00000000\t0001\t0\t0\t0\t00F0FFFF\t0\t0\t0\n"
         "eth1\t00000000\tZZ0110AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
         "eth1\t00000000\t0x0110AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
         "eth1\t00000000\t0110AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
         "eth0\t00000000\t0101A8C0\t0x3\t0\t0\t0\t00000000\t0\t0\t0\n"
         "eth0\t00000000\t0101A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"
         "eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
         "eth2\t00000000\t0200000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")


def test_gateway_first_up_gateway_route(tmp_path):
    write(tmp_path, "proc/net/route", ROUTE)
    assert resources.gateway(str(tmp_path)) == "10.0.0.1"


@pytest.mark.parametrize("text", ["", "garbage", ROUTE.split("\n", 1)[0] + "\n",
                                  "eth0 0 0101A8C0 FFFFFFFFFFFFFFFFFF 0\n"])
def test_gateway_none(tmp_path, text):
    write(tmp_path, "proc/net/route", text)
    assert resources.gateway(str(tmp_path)) == ""


def test_loadavg(tmp_path):
    write(tmp_path, "proc/loadavg", "0.52 0.58 0.59 3/467 12345\n")
    assert resources.loadavg(str(tmp_path)) == {
        "load_1": "0.52", "load_5": "0.58", "load_15": "0.59",
        "running_procs": "3", "total_procs": "467"}
    write(tmp_path, "proc/loadavg", "0.52 0.58 0.59 3\n")
    assert resources.loadavg(str(tmp_path)) == {"load_1": "0.52", "load_5": "0.58",
                                                "load_15": "0.59"}
    write(tmp_path, "proc/loadavg", "0.52 0.58 0.59\n")
    assert resources.loadavg(str(tmp_path)) == {}
    assert resources.loadavg(str(tmp_path / "none")) == {}


def test_nproc_is_affinity():
    assert resources.nproc() == len(os.sched_getaffinity(0))


# --- dir_size -----------------------------------------------------------------------------------

def test_dir_size(tmp_path):
    write(tmp_path, "a.bin", b"x" * 100)
    write(tmp_path, "sub/b.bin", b"x" * 20)
    write(tmp_path, "sub/plugin/nested.bin", b"x" * 7)   # only the top level is excluded
    write(tmp_path, "plugin/p/big.bin", b"x" * 5000)
    write(tmp_path, "plugin.txt", b"x" * 3)
    outside = tmp_path.parent / ("outside-" + tmp_path.name)
    outside.mkdir()
    (outside / "huge").write_bytes(b"x" * 9000)
    os.symlink(str(outside / "huge"), str(tmp_path / "link"))      # counts its own length
    os.symlink(str(outside), str(tmp_path / "dirlink"))           # never followed
    os.mkfifo(str(tmp_path / "fifo"))
    links = len(str(outside / "huge")) + len(str(outside))
    assert resources.dir_size(str(tmp_path), exclude="plugin") == 100 + 20 + 7 + 3 + links
    assert resources.dir_size(str(tmp_path)) == 100 + 20 + 7 + 3 + 5000 + links


def test_dir_size_edges(tmp_path):
    assert resources.dir_size(str(tmp_path / "missing")) == 0
    write(tmp_path, "f", b"abc")
    assert resources.dir_size(str(tmp_path / "f")) == 3
    assert resources.dir_size(str(tmp_path / "f"), exclude="f") == 3
    os.symlink(str(tmp_path), str(tmp_path / "self"))
    assert resources.dir_size(str(tmp_path / "self")) == len(str(tmp_path))


def test_dir_size_skips_entries_that_vanish_or_fail(tmp_path, monkeypatch):
    write(tmp_path, "ok", b"x" * 10)
    write(tmp_path, "bad/inner", b"x" * 99)
    real_scandir = os.scandir

    def flaky(path):
        if str(path).endswith("bad"):
            raise PermissionError(13, "denied")
        return real_scandir(path)
    monkeypatch.setattr(resources.os, "scandir", flaky)
    assert resources.dir_size(str(tmp_path)) == 10


# --- system_fields --------------------------------------------------------------------------------

def full_root(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "proc/stat", cpu_line(1, 2, 3, 4))
    write(tmp_path, "proc/loadavg", "0.52 0.58 0.59 3/467 12345\n")
    write(tmp_path, "proc/cpuinfo", X86_CPUINFO)
    write(tmp_path, "proc/net/route", ROUTE)
    write(tmp_path, "etc/resolv.conf", RESOLV)
    write(tmp_path, "sys/class/dmi/id/product_uuid", "UUID-1\n")
    return str(tmp_path)


def test_system_fields_fake_root(tmp_path):
    got = resources.system_fields(full_root(tmp_path))
    assert got == {
        "nproc": str(resources.nproc()), "total_mem": str(1000000 * 1024),
        "load_1": "0.52", "load_5": "0.58", "load_15": "0.59",
        "running_procs": "3", "total_procs": "467",
        "host_serial": "", "host_id": "UUID-1", "host_model": "", "host_vendor": "",
        "dns": "10.0.0.2,1.1.1.1,X", "gateway": "10.0.0.1",
        "cpu_name": "Intel(R) Xeon(R) Platinum 8269CY CPU @ 2.50GHz",
        "boot_time": str(BTIME), "mem_usage": "0.47000000"}


def test_system_fields_empty_root_omits_what_go_omits(tmp_path):
    got = resources.system_fields(str(tmp_path))
    assert got == {"nproc": str(resources.nproc()), "total_mem": "0", "host_serial": "",
                   "host_id": "", "host_model": "", "host_vendor": "", "dns": "",
                   "gateway": "", "cpu_name": "", "boot_time": "0"}


def test_system_fields_live_paths_agree():
    plain = resources.system_fields(use_psutil=False)
    assert int(plain["total_mem"]) > 0 and int(plain["boot_time"]) > 0
    assert 0.0 <= float(plain["mem_usage"]) <= 1.0
    if psutil is None:
        return
    fast = resources.system_fields(use_psutil=True)
    for key in ("load_1", "load_5", "load_15", "running_procs", "total_procs"):
        plain.pop(key, None), fast.pop(key, None)  # may tick between the two reads
    assert float(fast.pop("mem_usage")) == pytest.approx(float(plain.pop("mem_usage")), abs=0.01)
    assert fast == plain


def test_a_sample_moments_after_the_baseline_is_not_tick_noise(tmp_path):
    # What the heartbeat did: a baseline at start-up, then the first beat
    # 5 ms later, with one 10 ms tick of cpu in between.
    fake_process(tmp_path, utime=100, stime=0)
    s = resources.ProcessSampler(PID, root=str(tmp_path), ncpu=2)
    t0 = BTIME + 60.25          # 10 s after start
    fake_process(tmp_path, utime=101, stime=0)
    got = s.sample(now=t0)
    # The first sample is the usage since start: 1.01 s of cpu over 10 s.
    assert got.cpu == pytest.approx(1.01 / 10)
    fake_process(tmp_path, utime=103, stime=0)
    assert s.sample(now=t0 + 0.005).cpu <= 2


def test_cpu_is_bounded_by_ncpu_when_the_start_is_only_known_to_the_second(tmp_path):
    # btime is whole seconds: a process 0.3 s old that used 0.5 s of cpu on
    # two cores can look 0.05 s old. It still reads at most ncpu.
    fake_process(tmp_path, utime=CLK_TCK // 2, stime=0, start_ticks=50 * CLK_TCK)
    got = resources.ProcessSampler(PID, root=str(tmp_path), ncpu=2).sample(now=BTIME + 50.05)
    assert got.cpu == 2.0
