"""What survives a fault: a real agent, a real devcenter on loopback and a
plugin writing numbered records like Elkeid's Go SDK writes (buffered,
flushed every 200 ms or at 512 KiB), counted on the server by sequence
number (tests/fault_harness.py). Each case prints, and the run's closing
summary lists, how many records were produced, arrived once, arrived again
(duplicates) and never arrived (missing).

Where the design promises no loss, the case asserts zero missing; where the
promise rests on the disk spool (issue 11) and the agent has none yet, the
case still runs and reports, then xfails at that assertion (``SPOOL``).
Every case checks that what went missing was counted by the agent.

The ten-minute outage runs in the background from the start of this module
(while the other cases run) and its test, last here, waits for it: the
module takes about as long as that case alone.
"""

import os
import signal
import threading
import time

import pytest

import fault_harness as fh
from elkeid_agent.transport.channel import KEEPALIVE_TIMEOUT_SECONDS
from harness import AgentProc, wait_until
from plugins_fixtures.harness import FileServer

pytestmark = pytest.mark.slow

SDK_RATE = 5000  # records/s, the load


class Case:
    """One fault case's server, file server, load and agent."""

    def __init__(self, base, name, rate, pad=40, read_rate=0, env=None, command=None,
                 server_address=None):
        self.base = str(base)
        self.name = name
        self.server = fh.SeqServer(os.path.join(self.base, "server"), read_rate=read_rate)
        self.files = FileServer()
        self.load = fh.Load(self.base, rate, pad)
        self.agent_id = "fault-" + name
        self.workdir = os.path.join(self.base, "agent")
        spool = {"ELKEID_SPOOL_DIR": os.path.join(self.base, "spool"),
                 "ELKEID_SPOOL_MAX_MB": 1024}
        spool.update(env or {})
        os.makedirs(spool["ELKEID_SPOOL_DIR"], exist_ok=True)
        self.env = fh.agent_env(**spool)
        self.command = command
        self.server_address = server_address or self.server.grpc
        self.agent = None

    def start_agent(self):
        self.agent = AgentProc(self.workdir, ["--agent-id", self.agent_id,
                                              "--heartbeat-interval", "1",
                                              "--server", self.server_address]
                               + self.server.cert_args, env=self.env, command=self.command)
        return self.agent

    def deploy(self, url_base=None):
        self.server.wait_agent(self.agent_id)
        status, body = self.server.dc.command(self.agent_id,
                                              {"config": [self.load.config(self.files, url_base)]})
        assert status == 200, body

    def begin(self, seconds=5, url_base=None):
        """Agent up, plugin deployed, ``seconds`` of load produced and most
        of it counted by the server."""
        self.start_agent()
        self.deploy(url_base)
        self.produce(seconds)
        self.wait_counted(int(self.load.rate * (seconds - 2)))
        return self.agent

    def wait_counted(self, records, timeout=60):
        """Until the server counted ``records`` of the load."""
        wait_until(lambda: fh.tally(self.server, self.agent_id, self.load).unique >= records,
                   timeout, 0.2, "the server to count %d records" % records)

    def produce(self, seconds, timeout=None):
        """Until the load produced ``seconds`` more of its rate."""
        target = self.load.produced() + int(self.load.rate * seconds)
        self.load.wait_running(target, timeout or seconds * 3 + 30)

    def settle(self, **kw):
        return fh.settle(self.server, self.agent_id, self.load, **kw)

    def heartbeat_after(self, seconds=3):
        """The agent's heartbeat once ``seconds`` more went by (the queue's
        own records go first, so this one is current)."""
        time.sleep(seconds)
        return self.server.heartbeat(self.agent_id)

    def close(self):
        try:
            if self.agent is not None and self.agent.alive:
                self.agent.stop()
        finally:
            self.files.close()
            self.server.stop()


def spool_assertion(what):
    if not fh.SPOOL:
        pytest.xfail("%s: %s" % (fh.NEEDS_SPOOL, what))


# ------------------------------------------------------------------ the ten-minute outage

OUTAGE_SECONDS = 600


def ten_minute_outage(abort, base):
    """The server is down for ten minutes at 5,000 records/s, then back."""
    case = Case(base, "outage10", SDK_RATE)
    try:
        case.begin(10)
        case.server.stop()
        if abort.wait(OUTAGE_SECONDS):
            raise RuntimeError("cancelled")
        case.server.start()
        case.server.wait_agent(case.agent_id, timeout=180)
        case.produce(10)
        t = case.settle(quiet=30, timeout=900)
        return t, case.heartbeat_after(), case.agent.alive, case.load.record_size
    finally:
        case.close()


class Background:
    """A case run on a thread of its own; ``join`` returns what it returned
    or raises what it raised."""

    def __init__(self, fn, *args):
        self.abort = threading.Event()
        self.out = {}
        self.thread = threading.Thread(target=self._run, args=(fn,) + args, daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.out["value"] = fn(self.abort, *args)
        except BaseException as e:  # handed to the test's thread
            self.out["error"] = e

    def join(self, timeout):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the background case is still running after %d s" % timeout)
        if "error" in self.out:
            raise self.out["error"]
        return self.out["value"]

    def cancel(self):
        self.abort.set()
        self.thread.join(120)


LONG_CASE = "test_ten_minute_outage_at_5000_records_per_second"


@pytest.fixture(scope="module", autouse=True)
def long_outage(request, tmp_path_factory):
    """Starts the ten-minute case when the module starts, if it was selected."""
    if not any(item.name == LONG_CASE for item in request.session.items):
        yield None
        return
    case = Background(ten_minute_outage, str(tmp_path_factory.mktemp("outage10")))
    yield case
    case.cancel()


# ------------------------------------------------------------------ server faults

def test_server_sigkill_mid_stream_then_restarted_5_s_later(tmp_path):
    """The replay window covers what a killed server had not counted."""
    case = Case(tmp_path, "srvkill", SDK_RATE)
    try:
        case.begin()
        case.server.kill()
        time.sleep(5)
        case.server.start()
        case.server.wait_agent(case.agent_id)
        case.produce(5)
        t = case.settle()
        fh.report("server SIGKILL, back after 5 s", t)
        assert case.agent.alive
        assert t.unique > 0 and t.missing == 0
        assert t.duplicates <= fh.replay_bound(SDK_RATE, case.load.record_size)
    finally:
        case.close()


@pytest.mark.timeout(600)
def test_slow_reading_server_backs_up_into_the_spool(tmp_path):
    """A server reading 500 records/s under a load of 2,000/s (450-byte
    records): the backlog outgrows a 2 MiB memory queue (and gRPC's and the
    kernel's buffers); with the spool nothing within its quota is dropped."""
    case = Case(tmp_path, "slow", 2000, pad=400, read_rate=500,
                env={"ELKEID_QUEUE_MAX_BYTES": 2 * 1024 * 1024, "ELKEID_SPOOL_MAX_MB": 256})
    try:
        case.start_agent()
        case.deploy()
        case.produce(30)
        # One message of the agent's (at most 2 MiB) is read for seconds.
        t = case.settle(quiet=30, timeout=420)
        hb = case.heartbeat_after()
        fh.report("slow reader (500 of 2000 rec/s)", t, "agent dropped %d"
                  % fh.dropped_by_agent(hb))
        assert case.agent.alive
        assert t.duplicates == 0  # no stream broke
        assert t.missing <= fh.dropped_by_agent(hb)  # whatever is missing was counted
        spool_assertion("%d records dropped behind a slow server" % t.missing)
        assert t.missing == 0
    finally:
        case.close()


# ------------------------------------------------------------------ agent faults

# What a SIGKILLed agent may lose with the spool: records it had not yet
# made durable. The spool states that window (seconds); the loss bound is
# the load's rate times it.
def spool_loss_window():
    from elkeid_agent.buffer import spool  # only called once SPOOL is true
    window = getattr(spool, "FSYNC_INTERVAL", None)
    assert window is not None, "elkeid_agent.buffer.spool must state FSYNC_INTERVAL (seconds)"
    return float(window)


def test_agent_sigkill_during_an_outage_then_restarted(tmp_path):
    rate = 2000
    case = Case(tmp_path, "agentkill", rate)
    try:
        case.begin()
        case.server.stop()
        case.produce(20)
        case.agent.signal(signal.SIGKILL)
        case.agent.proc.wait(10)
        case.start_agent()  # the same workdir (and spool)
        time.sleep(2)
        case.server.start()
        case.server.wait_agent(case.agent_id)
        # The new agent starts the plugin when the server pushes its configs.
        wait_until(lambda: len(case.load.runs()) >= 2, 60, 0.2, "the plugin's second run")
        case.produce(5)
        t = case.settle()
        fh.report("agent SIGKILL during an outage", t)
        assert case.agent.alive and t.runs == 2
        spool_assertion("%d records lost with the agent's memory" % t.missing)
        assert t.missing <= rate * spool_loss_window()
    finally:
        case.close()


# ------------------------------------------------------------------ network faults

# The agent pings every keepalive_seconds and drops the connection when a
# ping is not answered within KEEPALIVE_TIMEOUT_SECONDS; a few seconds more
# for the log line and the polling.
BLACKHOLE_BOUND = fh.DEFAULTS.keepalive_seconds + KEEPALIVE_TIMEOUT_SECONDS + 5


@pytest.mark.timeout(600)
def test_blackholed_server_is_detected_by_keepalive_then_an_outage(tmp_path):
    hole = fh.Blackhole(str(os.getpid()))
    rate = 1000
    case = None
    try:
        case = Case(tmp_path, "blackhole", rate, command=hole.agent_command())
        host, port = case.server.grpc.rsplit(":", 1)
        case.server_address = "%s:%d" % (hole.RELAY_IP, hole.relay((host, int(port))))
        files_port = hole.relay(("127.0.0.1", case.files.port))
        case.begin(url_base="http://%s:%d" % (hole.RELAY_IP, files_port))
        lost = "transfer stream lost"
        before = case.agent.log_text(stderr=False).count(lost)
        started = time.monotonic()
        hole.drop()
        wait_until(lambda: case.agent.log_text(stderr=False).count(lost) > before,
                   BLACKHOLE_BOUND + 60, 0.1, "the agent to notice the blackhole")
        detected = time.monotonic() - started
        # Then it is an outage: dials time out until the path is back.
        case.produce(30)
        hole.restore()
        t = case.settle(timeout=300)
        fh.report("blackholed server", t, "detected after %.0f s" % detected)
        assert detected <= BLACKHOLE_BOUND
        assert case.agent.alive
        assert t.duplicates <= fh.replay_bound(rate, case.load.record_size)
        if t.missing:
            # Known: the batches gRPC took before its flow-control window
            # filled were written more than replay_seconds before keepalive
            # ended the stream, and delivery.py ages the replay window by
            # wall time even while every write stalls.
            pytest.xfail("%d records written into the stalled stream were not replayed "
                         "(replay window of %.0f s < detection after %.0f s)"
                         % (t.missing, fh.DEFAULTS.replay_seconds, detected))
    finally:
        if case is not None:
            case.close()
        hole.close()


# ------------------------------------------------------------------ disk faults

def test_full_and_then_read_only_spool_disk_keeps_the_agent_up(tmp_path):
    """The spool on an 8 MiB tmpfs in the agent's own mount namespace:
    filled during an outage, then remounted read-only. The agent stays up
    and counts what it drops."""
    mount = tmp_path / "spoolfs"
    mount.mkdir()
    rate = 2000
    case = Case(tmp_path, "diskfull", rate, command=fh.spool_tmpfs_command(mount, "8m"),
                env={"ELKEID_SPOOL_DIR": str(mount / "spool"), "ELKEID_SPOOL_MAX_MB": 64,
                     "ELKEID_QUEUE_MAX_BYTES": 1024 * 1024})
    try:
        agent = case.begin()
        case.server.stop()
        case.produce(10)
        fh.fill(agent.pid, mount / "filler")
        assert fh.free_bytes(agent.pid, mount) == 0
        case.produce(10)
        assert not os.path.ismount(mount)  # the agent's mount namespace only
        fh.remount_readonly(agent.pid, mount)
        case.produce(10)
        assert agent.alive
        case.server.start()
        t = case.settle()
        hb = case.heartbeat_after()
        dropped = fh.dropped_by_agent(hb)
        fh.report("spool disk full, then read-only", t, "agent dropped %d" % dropped)
        assert agent.alive and hb
        assert 0 < t.missing <= dropped
        spool_assertion("no spool to fill")
        assert any(k.startswith("spool_") for k in hb), sorted(hb)
    finally:
        case.close()


# ------------------------------------------------------------------ last: the long case

@pytest.mark.timeout(OUTAGE_SECONDS + 1500)
def test_ten_minute_outage_at_5000_records_per_second(long_outage):
    t, hb, alive, size = long_outage.join(OUTAGE_SECONDS + 1400)
    dropped = fh.dropped_by_agent(hb)
    fh.report("server down 10 min at 5000 rec/s", t, "agent dropped %d" % dropped)
    assert alive
    assert t.duplicates <= fh.replay_bound(SDK_RATE, size)
    assert t.missing <= dropped
    spool_assertion("%d of %d records dropped during the outage" % (t.missing, t.produced))
    assert t.missing == 0
