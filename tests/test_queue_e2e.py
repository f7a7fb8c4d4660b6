"""The record queue under a real agent, memory alone (spool off): a plugin
flooding fd 5 while the AgentCenter is down cannot evict the agent's own
heartbeats or its 5100s, and the queue never holds more than its budget."""

import json
import os
import socket
import time

from harness import AgentProc, DevCenterProc, wait_until
from plugins_fixtures.harness import FileServer
from test_plugins_e2e import plugin_config, send

BUDGET = 128 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiving_upload(dc):
    try:
        return any(n.endswith(".part") for n in os.listdir(dc.uploads))
    except OSError:
        return False


def test_plugin_flood_during_an_outage_keeps_heartbeats_and_task_failures(tmp_path):
    grpc_addr = "127.0.0.1:%d" % free_port()
    certs = str(tmp_path / "certs")
    dc = DevCenterProc(tmp_path / "dc1", certs=certs, extra_args=["--grpc", grpc_addr])
    files = FileServer()
    agent = None
    try:
        agent = AgentProc(tmp_path / "agent", ["--agent-id", "flood-agent",
                                               "--heartbeat-interval", "0.5",
                                               "--server", grpc_addr] + dc.cert_args,
                          # Memory alone: with the disk spool nothing would
                          # be dropped (test_spool_agent.py covers that).
                          env={"ELKEID_QUEUE_MAX_BYTES": str(BUDGET),
                               "ELKEID_RECONNECT_DELAY": "0.2", "ELKEID_SPOOL_MAX_MB": "0"})
        dc.wait_agent("flood-agent")
        go, progress = tmp_path / "go", tmp_path / "progress"
        send(dc, "flood-agent", [plugin_config(files, "flooder", "flood_high.py", detail=json.dumps(
            {"go": str(go), "progress": str(progress)}))])
        dc.wait_records(7000, agent_id="flood-agent")
        # An upload paced at one chunk a second is still running when the
        # server goes away: its failure is a 5100 queued during the outage.
        big = tmp_path / "big.bin"
        big.write_bytes(b"u" * 200_000)
        dc.command("flood-agent", {"task": {
            "data_type": 1050, "name": "elkeid-agent", "token": "t-outage",
            "data": json.dumps({"path": str(big), "buf_size": 1000})}})
        wait_until(lambda: receiving_upload(dc), 30, 0.1, "the upload to begin")
        dc.stop()
        outage = time.time()
        agent.wait_log("upload of %s failed" % big, timeout=60)
        go.write_text("")

        def flooded():
            try:
                p = json.loads(progress.read_text())
            except (OSError, ValueError):
                return None
            # Many budgets' worth over several heartbeat intervals.
            return p["bytes"] > 20 * BUDGET and p["seconds"] > 4
        wait_until(flooded, 120, 0.1, "the plugin to flood fd 5")
        go.unlink()
        flood_end = time.time()
        dc = DevCenterProc(tmp_path / "dc2", certs=certs, extra_args=["--grpc", grpc_addr])
        # Heartbeats produced while the flood ran survived it...
        during = dc.wait_records(
            1000, lambda r: outage + 1 < r["timestamp"] < flood_end - 1,
            agent_id="flood-agent", timeout=60)
        assert during
        # ... and so did the 5100 queued before it.
        fail = dc.wait_records(5100, lambda r: r["fields"].get("token") == "t-outage",
                               agent_id="flood-agent", timeout=60)
        assert "failed" in fail[0]["fields"]["msg"]
        # The flood did lose records, counted; the queue stayed in budget.
        later = dc.wait_records(1000, lambda r: r["timestamp"] > flood_end + 1,
                                agent_id="flood-agent", timeout=60)
        assert int(later[-1]["fields"]["queue_dropped"]) > 0
        for rec in dc.records(1000, agent_id="flood-agent"):
            assert int(rec["fields"]["queue_bytes"]) <= BUDGET
        assert agent.alive
    finally:
        if agent is not None and agent.alive:
            agent.stop()
        files.close()
        dc.stop()
