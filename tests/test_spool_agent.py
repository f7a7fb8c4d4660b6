"""The disk spool under a real agent: a plugin writing numbered records
(seq_writer.py) while the development AgentCenter goes away and comes back,
and while the agent itself is killed with SIGKILL. What counts is what the
server stored, read from its SQLite database by sequence number."""

import json
import signal
import socket
import sqlite3
import time
import urllib.request

from elkeid_agent.buffer import spool as sp
from harness import AgentProc, DevCenterProc, wait_until
from plugins_fixtures.harness import FileServer
from test_plugins_e2e import plugin_config, send

RATE = 3000            # records/s from the plugin
RECORD_BYTES = 190     # a seq_writer record, about
PIPE_BYTES = 65536     # what a plugin's pipe holds that the agent has not read


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seqs(dc, agent_id):
    """Sequence numbers the devcenter stored, in arrival order."""
    db = sqlite3.connect("file:%s?mode=ro" % dc.db, uri=True, timeout=10)
    try:
        rows = db.execute("SELECT json_extract(fields, '$.seq') FROM records"
                          " WHERE agent_id = ? AND data_type = 7400 ORDER BY id", (agent_id,))
        return [int(r[0]) for r in rows]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def sent(progress):
    try:
        return json.loads(progress.read_text())["sent"]
    except (OSError, ValueError, KeyError):
        return 0


def metrics(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _sp, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def total_of(series, name):
    """A metric summed over its labels."""
    return sum(v for k, v in series.items() if k == name or k.startswith(name + "{"))


def first_arrivals(stored):
    seen = set()
    out = []
    for s in stored:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


class Rig:
    """One agent, a devcenter on a fixed port that can go and come back, and
    the numbered plugin."""

    def __init__(self, tmp_path, agent_id, env=None):
        self.tmp = tmp_path
        self.agent_id = agent_id
        self.grpc = "127.0.0.1:%d" % free_port()
        self.certs = str(tmp_path / "certs")
        self.centers = []
        self.files = FileServer()
        self.status_port = free_port()
        self.env = dict({"ELKEID_QUEUE_MAX_BYTES": str(256 * 1024),
                         "ELKEID_RECONNECT_DELAY": "0.2", "ELKEID_RECONNECT_MAX_DELAY": "1"},
                        **(env or {}))
        self.go = tmp_path / "go"
        self.progress = tmp_path / "progress"
        self.agent = None
        self.center_up()

    def center_up(self):
        dc = DevCenterProc(self.tmp / ("dc%d" % len(self.centers)), certs=self.certs,
                           extra_args=["--grpc", self.grpc])
        self.centers.append(dc)
        return dc

    @property
    def center(self):
        return self.centers[-1]

    def start_agent(self):
        self.agent = AgentProc(self.tmp / "agent", [
            "--agent-id", self.agent_id, "--heartbeat-interval", "0.5", "--server", self.grpc,
            "--status-addr", "127.0.0.1:%d" % self.status_port] + self.center.cert_args,
            env=self.env)
        return self.agent

    def deploy_writer(self):
        self.go.write_text("")
        send(self.center, self.agent_id, [plugin_config(
            self.files, "numbered", "seq_writer.py", detail=json.dumps(
                {"go": str(self.go), "progress": str(self.progress), "rate": RATE}))])

    def stored(self):
        return [s for dc in self.centers for s in seqs(dc, self.agent_id)]

    def close(self):
        if self.agent is not None and self.agent.alive:
            self.agent.stop()
        self.files.close()
        for dc in self.centers:
            dc.stop()


def test_an_outage_fills_the_spool_and_everything_arrives_in_order_after(tmp_path):
    rig = Rig(tmp_path, "spool-outage")
    try:
        rig.start_agent()
        rig.center.wait_agent("spool-outage")
        rig.deploy_writer()
        wait_until(lambda: len(rig.stored()) > 2 * RATE, 60, 0.2, "records to flow")
        rig.center.stop()
        # Far more than the 256 KiB memory budget is written meanwhile.
        outage_start = sent(rig.progress)
        wait_until(lambda: sent(rig.progress) - outage_start > 6 * RATE, 60, 0.2, "6 s of records")
        during = metrics(rig.status_port)
        assert during["elkeid_agent_spool_records"] > 4 * RATE
        assert during["elkeid_agent_spool_bytes"] > 0
        assert during["elkeid_agent_spool_oldest_age_seconds"] > 1
        rig.center_up()
        # New records keep flowing while the spool drains.
        wait_until(lambda: len(seqs(rig.center, "spool-outage")) > RATE, 60, 0.2, "the replay")
        time.sleep(1.0)
        rig.go.unlink()
        time.sleep(0.2)  # the plugin's last write
        total = sent(rig.progress)
        wait_until(lambda: metrics(rig.status_port)["elkeid_agent_spool_records"] == 0, 60, 0.5,
                   "the spool to drain")
        wait_until(lambda: set(range(total)) <= set(rig.stored()), 60, 0.5, "every record")
        stored = rig.stored()
        assert set(stored) == set(range(total))          # none missing, none invented
        assert first_arrivals(stored) == list(range(total))  # in order
        duplicates = len(stored) - total
        # Only the replay window's worth can come twice.
        assert duplicates <= RATE * 6, duplicates
        after = metrics(rig.status_port)
        assert total_of(after, "elkeid_agent_spool_dropped_records") == 0
        assert total_of(after, "elkeid_agent_queue_dropped_records") == 0
        assert total_of(after, "elkeid_agent_spool_replayed_records") >= 6 * RATE
        hb = rig.center.wait_records(1000, lambda r: r["fields"]["spool_records"] == "0",
                                     agent_id="spool-outage")[-1]["fields"]
        assert hb["spool_dropped"] == "0" and "spool_replay_rate" in hb
        print("outage: %d records, %d duplicates, 0 missing" % (total, duplicates))
    finally:
        rig.close()


def test_sigkill_during_an_outage_loses_at_most_the_documented_window(tmp_path):
    rig = Rig(tmp_path, "spool-kill")
    try:
        agent = rig.start_agent()
        rig.center.wait_agent("spool-kill")
        rig.deploy_writer()
        wait_until(lambda: len(rig.stored()) > RATE, 60, 0.2, "records to flow")
        rig.center.stop()
        outage_start = sent(rig.progress)
        wait_until(lambda: sent(rig.progress) - outage_start > 3 * RATE, 60, 0.2, "3 s of records")
        agent.signal(signal.SIGKILL)
        agent.proc.wait(10)
        rig.go.unlink()
        # The plugin dies on its broken pipe; what it wrote is final.
        time.sleep(0.5)
        total = sent(rig.progress)
        rig.center_up()
        rig.start_agent()
        rig.center.wait_agent("spool-kill")
        wait_until(lambda: metrics(rig.status_port)["elkeid_agent_spool_records"] == 0, 60, 0.5,
                   "the spool from before the kill to be sent")
        time.sleep(1.0)
        stored = set(rig.stored())
        missing = sorted(set(range(total)) - stored)
        # docs/operations.md: the last SEAL_SECONDS of spilled records (at
        # most a frame) and what the plugin's pipe held.
        window = min(int(RATE * sp.SEAL_SECONDS), sp.FRAME_RAW_BYTES // RECORD_BYTES) + \
            PIPE_BYTES // RECORD_BYTES + RATE // 50
        assert len(missing) <= window, (len(missing), window)
        # Whatever is missing is the newest: the tail at the kill, no gap before.
        assert not missing or missing[0] >= total - window
        assert len(stored & set(range(outage_start, total))) > 2 * RATE
        print("sigkill: %d records written, %d missing (window %d)" % (total, len(missing), window))
    finally:
        rig.close()
