"""Host metrics cross-checked against Prometheus node_exporter on this host.

Debian's prometheus-node-exporter is installed when missing (as root with
apt-get) and started here on a free loopback port; our collectors run
through the real ``Collectors`` runner between two scrapes, so every counter
of ours must lie between node_exporter's two readings. Without the package
or prometheus_client the test skips, except under CI=true where it fails.
"""

import asyncio
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from elkeid_agent.host import metrics as hm
from elkeid_agent.metrics import Registry
from elkeid_agent.runtime.executors import Executors
from elkeid_agent.runtime.tasks import TaskOwner
from elkeid_agent.services.config import ServicesConfig
from elkeid_agent.state import AgentState

pytestmark = pytest.mark.slow

BINARY = "/usr/bin/prometheus-node-exporter"
PACKAGE = "prometheus-node-exporter"
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
# Only the collectors we compare; netdev's Debian default leaves lo out.
FLAGS = ["--collector.disable-defaults", "--collector.cpu", "--collector.meminfo",
         "--collector.filesystem", "--collector.diskstats", "--collector.netdev",
         "--collector.loadavg", "--collector.netdev.device-exclude=^$"]


def missing(reason):
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true and a prerequisite is missing: " + reason)
    pytest.skip(reason)


def install_node_exporter():
    if os.path.exists(BINARY):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        missing("%s is not installed and cannot be (needs root and apt-get)" % PACKAGE)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = APT + ["install", "-y", "--no-install-recommends", PACKAGE]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(APT + ["update"], env=env, stdout=subprocess.DEVNULL)
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            missing("apt-get install %s failed" % PACKAGE)
    if not os.path.exists(BINARY):
        missing("%s installed no %s" % (PACKAGE, BINARY))


def node_exporter_pids():
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv0 = f.read().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) == os.path.basename(BINARY).encode():
            pids.append(int(entry))
    return pids


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# No proxy, whatever the environment says: the scrape stays on loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def node_exporter(tmp_path):
    try:
        from prometheus_client import parser
    except ImportError:
        missing("prometheus_client is not installed (the dev extras have it)")
    install_node_exporter()
    already = set(node_exporter_pids())  # e.g. one the package started under systemd
    port = free_port()
    log = open(str(tmp_path / "node_exporter.log"), "wb")
    proc = subprocess.Popen([BINARY, "--web.listen-address=127.0.0.1:%d" % port] + FLAGS,
                            stdout=log, stderr=subprocess.STDOUT)
    url = "http://127.0.0.1:%d/metrics" % port

    def scrape():
        with OPENER.open(url, timeout=20) as resp:
            text = resp.read().decode()
        out = {}
        for family in parser.text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "node_exporter exited: %s" % (
                (tmp_path / "node_exporter.log").read_text()[-2000:])
            try:
                scrape()
                break
            except OSError:
                assert time.monotonic() < deadline, "node_exporter did not answer in 30 s"
                time.sleep(0.05)
        yield scrape
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    left = set(node_exporter_pids())
    assert not left, "node_exporter processes still running: %s (before the test: %s)" % (
        sorted(left), sorted(already))


def ours_between(scrape):
    """(theirs before, our samples, our cpu times, theirs after), ours taken
    by the real runner."""
    async def main():
        metrics, executors = Registry(), Executors()
        owner = TaskOwner(metrics, AgentState())
        runner = hm.Collectors(ServicesConfig().collectors, owner, metrics, executors)
        try:
            for name in runner.instances:  # a baseline, so the rates exist too
                assert await runner.collect_once(name)
            before = scrape()
            for name in runner.instances:
                assert await runner.collect_once(name), name
            cpu_times = runner.instances["cpu"].read()
            after = scrape()
            assert metrics.total("collector_errors") == 0
            return before, runner.samples(), cpu_times, after
        finally:
            await owner.close()
            executors.close()
    return asyncio.run(main())


def ours(samples, name, **labels):
    key = tuple(sorted(labels.items()))
    found = [s.value for s in samples if s.name == name and
             tuple(sorted(s.labels.items())) == key]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_against_node_exporter(node_exporter):
    rows = []

    def row(metric, mine, theirs, ok):
        rows.append((metric, mine, theirs))
        assert ok, "%s: ours %r, node_exporter %r" % (metric, mine, theirs)

    def bracket(metric, mine, t1, t2, slack=0.0):
        row(metric, mine, "%r .. %r" % (t1, t2),
            min(t1, t2) - slack <= mine <= max(t1, t2) + slack)

    t1, samples, cpu_times, t2 = ours_between(node_exporter)

    total = ours(samples, "memory_total_bytes")
    row("memory total", total, t1[("node_memory_MemTotal_bytes", ())],
        total == t1[("node_memory_MemTotal_bytes", ())])
    row("swap total", ours(samples, "swap_total_bytes"), t1[("node_memory_SwapTotal_bytes", ())],
        ours(samples, "swap_total_bytes") == t1[("node_memory_SwapTotal_bytes", ())])
    avail = ours(samples, "memory_available_bytes")
    theirs = t2[("node_memory_MemAvailable_bytes", ())]
    row("memory available (3%)", avail, theirs, abs(avail - theirs) <= 0.03 * total)

    cpus = {dict(k[1])["cpu"] for k in t1 if k[0] == "node_cpu_seconds_total"}
    row("cpu count", ours(samples, "cpu_count"), len(cpus), ours(samples, "cpu_count") == len(cpus))
    for cpu in sorted(cpus):
        for i, mode in enumerate(hm.CPU_FIELDS):
            key = ("node_cpu_seconds_total", (("cpu", cpu), ("mode", mode)))
            if key in t1:
                bracket("cpu%s %s seconds" % (cpu, mode), cpu_times[cpu][i], t1[key], t2[key],
                        slack=1e-6)  # both are ticks / USER_HZ
    for n in ("load1", "load5", "load15"):
        bracket(n, ours(samples, n), t1[("node_" + n, ())], t2[("node_" + n, ())])

    for direction in ("receive", "transmit"):
        name = "node_network_%s_bytes_total" % direction
        bracket("lo %s bytes" % direction,
                ours(samples, "network_%s_bytes_total" % direction, interface="lo"),
                t1[(name, (("device", "lo"),))], t2[(name, (("device", "lo"),))])

    theirs_devices = {dict(k[1])["device"] for k in t1 if k[0] == "node_disk_read_bytes_total"}
    mine_devices = {s.labels["device"] for s in samples if s.name == "disk_read_bytes_total"}
    row("disk devices", sorted(mine_devices), sorted(theirs_devices),
        mine_devices == theirs_devices)
    for dev in sorted(theirs_devices):
        for mine_name, their_name in (("disk_read_bytes_total", "node_disk_read_bytes_total"),
                                      ("disk_written_bytes_total",
                                       "node_disk_written_bytes_total")):
            key = (their_name, (("device", dev),))
            bracket("%s %s" % (dev, mine_name), ours(samples, mine_name, device=dev),
                    t1[key], t2[key])

    root = [k for k in t1 if k[0] == "node_filesystem_size_bytes" and
            dict(k[1])["mountpoint"] == "/"]
    assert len(root) == 1, "node_exporter reports no single / filesystem: %s" % root
    labels = dict(root[0][1])
    block = os.statvfs("/").f_bsize
    size = ours(samples, "filesystem_size_bytes", **labels)
    row("/ size", size, t1[root[0]], abs(size - t1[root[0]]) <= block)
    # Other processes write to / meanwhile: avail must lie between the two
    # scrapes give or take a block, and is retried when the disk moved.
    key = ("node_filesystem_avail_bytes", root[0][1])
    a1, avail, a2 = t1, ours(samples, "filesystem_avail_bytes", **labels), t2
    for _ in range(5):
        if min(a1[key], a2[key]) - block <= avail <= max(a1[key], a2[key]) + block:
            break
        a1, again, _cpu, a2 = ours_between(node_exporter)
        avail = ours(again, "filesystem_avail_bytes", **labels)
    bracket("/ avail", avail, a1[key], a2[key], slack=block)

    width = max(len(r[0]) for r in rows)
    print("\n%-*s  %-24s  %s" % (width, "metric", "ours", "node_exporter"))
    for metric, mine, theirs in rows:
        print("%-*s  %-24s  %s" % (width, metric, mine, theirs))
