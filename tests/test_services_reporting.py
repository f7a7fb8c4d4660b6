"""1020 service status and 1021 host metrics records: their encoding, and a
real agent reporting them to the development AgentCenter, which lists them
(GET /services, GET /metrics/host)."""

import json
import os

import pytest

from harness import AgentProc, wait_until
from elkeid_agent.host.metrics import Sample
from elkeid_agent.pb import grpc_pb2
from elkeid_agent.runtime import ctlsock
from elkeid_agent.services import records
from elkeid_devtools.launchers import PY, ROOT, unwrap

FAKE_AGENT = [PY, os.path.join(ROOT, "tests", "services_fixtures", "fake_agent.py")]
STATUS = {"id": "web", "type": "custom", "state": "backoff", "pid": 0, "restarts": 3,
          "health": "dead", "checks": {"alive": "failed", "heartbeat": "ok"},
          "last_exit": "exited with code 3", "last_error": "D3001 start failed: \udcff boom",
          "uptime": 0, "cpu": 12.5, "rss": 4096}


def decode(body):
    rec = grpc_pb2.Record()
    rec.ParseFromString(body)
    return rec.data_type, rec.timestamp, dict(rec.data.fields)


def test_service_record_fields():
    data_type, ts, fields = decode(records.service_record(STATUS, now=1700000000.7))
    assert (data_type, ts) == (1020, 1700000000)
    assert set(fields) == set(records.SERVICE_FIELDS)
    assert fields["state"] == "backoff" and fields["pid"] == "0" and fields["restarts"] == "3"
    assert fields["cpu"] == "12.50000000" and fields["rss"] == "4096"
    assert fields["uptime"] == "0.00000000"
    assert json.loads(fields["checks"]) == {"alive": "failed", "heartbeat": "ok"}
    assert fields["last_error"].startswith("D3001 start failed: ")  # the surrogate is replaced


def test_service_record_survives_garbage_values():
    bad = {"id": "x", "pid": "not a pid", "cpu": float("nan"), "rss": None, "checks": [1],
           "last_error": "e" * 5000}
    _t, _ts, fields = decode(records.service_record(bad, now=1))
    assert fields["pid"] == "0" and fields["cpu"] == "0.00000000" and fields["rss"] == "0"
    assert fields["checks"] == "{}" and len(fields["last_error"]) == records.MAX_TEXT
    assert fields["state"] == ""


def test_host_metrics_record_one_field_per_sample():
    samples = [Sample("cpu_usage_ratio", {}, 0.25), Sample("cpu_count", {}, 2),
               Sample("filesystem_used_bytes", {"mountpoint": "/", "device": "sda1"}, 123),
               Sample("filesystem_used_bytes", {"mountpoint": '/odd "dir",x=\\y\n'}, 7)]
    data_type, ts, fields = decode(records.host_metrics_record("disk", samples, 1700000000.2))
    assert (data_type, ts) == (1021, 1700000000)
    assert fields["collector"] == "disk"
    assert fields["cpu_usage_ratio"] == "0.25000000" and fields["cpu_count"] == "2"
    assert fields['filesystem_used_bytes{device="sda1",mountpoint="/"}'] == "123"
    back = {}
    for key, value in fields.items():
        if key != "collector":
            name, labels = records.parse_series_key(key)
            back[(name, tuple(sorted(labels.items())))] = value
    assert back[("filesystem_used_bytes", (("mountpoint", '/odd "dir",x=\\y\n'),))] == "7"
    assert len(back) == len(samples)


@pytest.mark.parametrize("key", ["x{", "x{a}", 'x{a="b"', 'x{a="b"c="d"}', 'x{a="b'])
def test_parse_series_key_refuses_malformed_keys(key):
    with pytest.raises(ValueError):
        records.parse_series_key(key)


def test_reports_send_each_collector_round_once():
    sent = []
    reports = records.Reports(sent.append, clock=lambda: 5.0)
    latest = {"cpu": (1.0, [Sample("load1", {}, 0.5)])}
    assert reports.collector_rounds(latest) == 1
    assert reports.collector_rounds(latest) == 0
    latest["cpu"] = (2.0, [Sample("load1", {}, 0.7)])
    latest["memory"] = (2.0, [Sample("memory_total_bytes", {}, 10)])
    assert reports.collector_rounds(latest) == 2
    assert [decode(b)[2]["collector"] for b in sent] == ["cpu", "cpu", "memory"]
    reports.services([STATUS, dict(STATUS, id="db")])
    assert [decode(b)[2]["id"] for b in sent[3:]] == ["web", "db"]


# ----------------------------------------------------------------- end to end


@pytest.fixture
def reporting_agent(tmp_path, devcenter):
    a = AgentProc(tmp_path / "agent", ["--agent-id", "reporter", "--heartbeat-interval", "0.5",
                                       "--server", devcenter.grpc] + devcenter.cert_args,
                  command=FAKE_AGENT)
    devcenter.wait_agent("reporter", timeout=60)
    yield a
    if a.alive:
        assert a.stop() == 0, a.log_text()


def dc_list(devcenter, path):
    status, body = devcenter.request("GET", path + "?agent_id=reporter")
    assert status == 200, body
    return unwrap(body, "services")


def test_devcenter_lists_what_the_agent_reports(reporting_agent, devcenter):
    def listed():
        rows = dc_list(devcenter, "/services")
        return rows if [r["id"] for r in rows] == ["alpha", "beta"] and \
            all(r["state"] == "running" for r in rows) else None
    rows = wait_until(listed, 60, what="both services in GET /services")
    sock = ctlsock.socket_path(reporting_agent.workdir)
    agent_view = {s["id"]: s for s in ctlsock.call(sock, {"op": "list"})["services"]}
    for r in rows:
        assert r["agent_id"] == "reporter"
        assert r["pid"] == agent_view[r["id"]]["pid"] > 0
        assert r["type"] == agent_view[r["id"]]["type"]
        assert r["restarts"] == 0 and r["health"] == "healthy"
        assert r["checks"] == {"alive": "ok", "heartbeat": "ok"}

    def host():
        rows = {r["collector"]: r for r in dc_list(devcenter, "/metrics/host")}
        return rows if {"cpu", "memory"} <= set(rows) else None
    metrics = wait_until(host, 60, what="cpu and memory in GET /metrics/host")
    mem = {s["name"]: s["value"] for s in metrics["memory"]["samples"]}
    assert mem["memory_total_bytes"] > 0 and metrics["memory"]["bad_fields"] == []
    assert any(s["name"] == "cpu_count" for s in metrics["cpu"]["samples"])


def test_a_change_is_reported_at_once_and_the_state_repeats_each_heartbeat(reporting_agent,
                                                                          devcenter):
    def running(sid):
        return devcenter.wait_records(1020, lambda r: r["fields"]["id"] == sid and
                                      r["fields"]["state"] == "running", agent_id="reporter",
                                      timeout=60)
    first = running("alpha")
    old_pid = first[-1]["fields"]["pid"]
    # Unchanged services are reported again on every heartbeat interval.
    devcenter.wait_records(1020, lambda r: r["fields"]["id"] == "beta", count=4,
                           agent_id="reporter", timeout=60)

    sock = ctlsock.socket_path(reporting_agent.workdir)
    assert ctlsock.call(sock, {"op": "restart", "id": "alpha"})["ok"]
    new = devcenter.wait_records(1020, lambda r: r["fields"]["id"] == "alpha" and
                                 r["fields"]["restarts"] == "1", agent_id="reporter",
                                 timeout=60)
    assert new[0]["fields"]["state"] == "running" and new[0]["fields"]["pid"] != old_pid
    # Each step of the change got its own record (stopping, stopped, running).
    states = [r["fields"]["state"] for r in devcenter.records(1020, "reporter")
              if r["fields"]["id"] == "alpha"]
    assert "stopping" in states and "stopped" in states

    def relisted():
        rows = {r["id"]: r for r in dc_list(devcenter, "/services")}
        return rows if rows["alpha"]["restarts"] == 1 else None
    rows = wait_until(relisted, 60, what="GET /services to show the restart")
    assert str(rows["alpha"]["pid"]) == new[-1]["fields"]["pid"]


def test_devcenter_store_keeps_the_newest_state_even_when_an_old_one_arrives_late(tmp_path):
    from elkeid_devtools.devcenter.store import Store

    def message(status, ts):
        rec = grpc_pb2.Record()
        rec.ParseFromString(records.service_record(status, now=ts))
        pd = grpc_pb2.PackagedData(agent_id="a1")
        pd.records.add(data_type=rec.data_type, timestamp=rec.timestamp,
                       data=rec.data.SerializeToString())
        return pd, pd.SerializeToString()

    store = Store(str(tmp_path / "dc.db"), str(tmp_path / "uploads"))
    store.open()
    try:
        store.add_message(*message(dict(STATUS, state="running", pid=7), 200))
        store.add_message(*message(dict(STATUS, state="backoff", pid=0), 100))  # a replay
        wait_until(lambda: store.count(data_type=1020) == 2, 30, what="both records stored")
        [row] = store.services()
        assert (row["state"], row["pid"], row["timestamp"]) == ("running", 7, 200)
        assert row["checks"] == STATUS["checks"] and row["cpu"] == 12.5
    finally:
        store.close()
