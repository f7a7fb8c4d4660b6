"""Tests of the development AgentCenter (elkeid_devtools.devcenter).

Each test starts a DevCenter in-process on ephemeral loopback ports and
talks to it like an agent would: a grpc.aio client with mutual TLS (target
name elkeid.com) sending raw PackagedData bytes, plus the HTTP API through
urllib on an executor thread (the API calls back into the loop, so the loop
must not be blocked by the test's own request).
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509

from elkeid_agent import wire
from elkeid_devtools.devcenter import AgentNotConnected, DevCenter
from elkeid_devtools.devcenter import certs
from elkeid_devtools.devcenter.server import command_from_json, parse_address
from elkeid_devtools.devcenter.store import StoreError, record_spans, safe_name
from elkeid_devtools.devcenter.summary import format_summary
from elkeid_agent.pb import grpc_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def devcenter(tmp_path, **kw):
    kw.setdefault("http_addr", "127.0.0.1:0")
    dc = DevCenter(grpc_addr="127.0.0.1:0", certs_dir=str(tmp_path / "certs"),
                   db_path=str(tmp_path / "dc.db"), uploads_dir=str(tmp_path / "uploads"), **kw)
    await dc.start()
    try:
        yield dc
    finally:
        await dc.stop()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def channel(dc, client_cert=True, ca=None, bundle=None, compression=None):
    bundle = bundle or dc.bundle
    kw = {"root_certificates": ca or _read(bundle.ca)}
    if client_cert:
        kw["private_key"] = _read(bundle.client_key)
        kw["certificate_chain"] = _read(bundle.client_crt)
    creds = grpc.ssl_channel_credentials(**kw)
    return grpc.aio.secure_channel("127.0.0.1:%d" % dc.grpc_port, creds,
                                   options=[("grpc.ssl_target_name_override", "elkeid.com")],
                                   compression=compression)


class FakeAgent:
    """A Transfer stream with raw bytes both ways."""

    def __init__(self, dc, agent_id="agent-1", **kw):
        self.agent_id = agent_id
        self.channel = channel(dc, **kw)
        self.call = self.channel.stream_stream(
            "/grpc.Transfer/Transfer", request_serializer=None, response_deserializer=None)()

    def header(self, **kw):
        args = dict(agent_id=self.agent_id, intranet_ipv4=["10.0.0.5"], extranet_ipv4=[],
                    intranet_ipv6=["fd00::5"], extranet_ipv6=["2001:db8::5"],
                    hostname="host-1", version="1.9.0", product="elkeid-agent")
        args.update(kw)
        return wire.encode_header(**args)

    async def send(self, records, **header):
        await self.call.write(wire.packaged_data(records, self.header(**header)))

    async def read_command(self, timeout=10):
        data = await asyncio.wait_for(self.call.read(), timeout)
        assert data is not grpc.aio.EOF, "stream ended without a command"
        return data

    async def close(self):
        await self.channel.close()


def http(dc, method, path, body=None, raw=None):
    """(status, parsed JSON or text) for a request to the devcenter's API."""
    url = "http://127.0.0.1:%d%s" % (dc.http_port, path)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, ctype, text = resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers["Content-Type"], e.read()
    if ctype.startswith("application/json"):
        return status, json.loads(text)
    return status, text.decode()


async def ahttp(dc, method, path, body=None, raw=None):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, http, dc, method, path, body, raw)


HEARTBEAT = {"cpu": "0.01250000", "rss": "40000000", "state": "running", "net_mode": "private",
             "kernel_version": "6.1.0"}


# ---------------------------------------------------------------- certificates

def test_bundle_is_written_once_with_private_keys(tmp_path):
    paths = certs.ensure_bundle(str(tmp_path / "c"))
    for p in paths[1:]:
        assert os.path.isfile(p)
    for key in (paths.server_key, paths.client_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(_read(paths.ca))
    server = x509.load_pem_x509_certificate(_read(paths.server_crt))
    client = x509.load_pem_x509_certificate(_read(paths.client_crt))
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["elkeid.com"]
    assert server.not_valid_before_utc < ca.not_valid_after_utc
    before = _read(paths.ca)
    # A complete bundle is reused, not regenerated.
    assert certs.ensure_bundle(str(tmp_path / "c")) == paths
    assert _read(paths.ca) == before
    # A partial one is replaced as a whole.
    os.unlink(paths.client_key)
    certs.ensure_bundle(str(tmp_path / "c"))
    assert _read(paths.ca) != before and os.path.isfile(paths.client_key)


def test_other_ca_and_other_name_helpers():
    ca1, ca2 = certs.make_ca("one"), certs.make_ca("two")
    leaf = certs.issue_cert(ca2, "other.example", kind="server")
    leaf.cert.verify_directly_issued_by(ca2.cert)
    with pytest.raises(Exception):
        leaf.cert.verify_directly_issued_by(ca1.cert)
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["other.example"]
    ip_leaf = certs.issue_cert(ca1, "127.0.0.1", kind="client")
    san = ip_leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in leaf.key_pem and leaf.name == "other.example"
    with pytest.raises(ValueError):
        certs.issue_cert(ca1, "x", kind="peer")


def test_client_without_certificate_or_from_other_ca_is_rejected(tmp_path):
    other = certs.write_bundle(str(tmp_path / "other"))

    async def main():
        async with devcenter(tmp_path) as dc:
            for kw in ({"client_cert": False}, {"bundle": other, "ca": _read(dc.bundle.ca)}):
                agent = FakeAgent(dc, **kw)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await agent.send([wire.encode_record(1, 1, {"a": "b"})])
                    await agent.read_command(timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                await agent.close()
            assert dc.connected() == []
            # The right client certificate works on the same server.
            good = FakeAgent(dc)
            await good.send([wire.encode_record(1, 1, {"a": "b"})])
            info = await dc.wait_for_agent("agent-1")
            assert info["client_cn"] == "elkeid-agent"
            await good.close()
    run(main())


def test_client_pinging_too_often_is_disconnected(tmp_path):
    # AgentCenter's keepalive policy: pings closer than 5 s apart earn
    # strikes, then GOAWAY too_many_pings. The agent's keepalive must not
    # trip this; here a client pinging every second does.
    async def main():
        async with devcenter(tmp_path, http_addr=None) as dc:
            b = dc.bundle
            creds = grpc.ssl_channel_credentials(_read(b.ca), _read(b.client_key),
                                                 _read(b.client_crt))
            ch = grpc.aio.secure_channel("127.0.0.1:%d" % dc.grpc_port, creds, options=[
                ("grpc.ssl_target_name_override", "elkeid.com"),
                ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)])
            call = ch.stream_stream("/grpc.Transfer/Transfer", request_serializer=None,
                                    response_deserializer=None)()
            await call.write(wire.packaged_data([], wire.encode_header(
                "pinger", [], [], [], [], "h", "v", "elkeid-agent")))
            await dc.wait_for_agent("pinger")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 60)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ping" in info.value.details().lower()
            await dc.wait_for_disconnect("pinger")
            await ch.close()
    run(main(), timeout=90)


# ---------------------------------------------------------------- records

def test_records_stored_byte_exact_with_header_and_fields(tmp_path):
    canonical = wire.encode_record(2001, 1700000000, {"exe": "/bin/ls", "pid": "42"})
    # Valid but not canonical: payload first, then an unknown field 9, then
    # the data_type. Re-serializing would reorder it; the store must not.
    payload = wire.encode_payload({"k": "v"})
    odd = (b"\x1a" + wire.varint(len(payload)) + payload + b"\x48\x07" + b"\x08\xe9\x07")
    bare = b""  # every field at its default
    not_payload = b"\x08\x05\x1a\x02\xff\xff"  # data is not a Payload

    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc)
            await agent.send([canonical, odd, bare, not_payload])
            recs = await dc.wait_for_records(lambda rs: len(rs) >= 4)
            await agent.close()
            return recs, dc.metrics.get("decode_errors_total", kind="payload"), dc

    recs, payload_errors, dc = run(main())
    assert [r["raw"] for r in recs] == [canonical, odd, bare, not_payload]
    # The store still answers after stop (it reads the file).
    assert [r["raw"] for r in dc.store.records()] == [r["raw"] for r in recs]
    assert dc.store.count() == 4
    first = recs[0]
    assert first["agent_id"] == "agent-1" and first["hostname"] == "host-1"
    assert first["version"] == "1.9.0" and first["product"] == "elkeid-agent"
    assert first["intranet_ipv4"] == ["10.0.0.5"] and first["extranet_ipv4"] == []
    assert first["intranet_ipv6"] == ["fd00::5"] and first["extranet_ipv6"] == ["2001:db8::5"]
    assert (first["data_type"], first["timestamp"]) == (2001, 1700000000)
    assert first["fields"] == {"exe": "/bin/ls", "pid": "42"}
    assert (recs[1]["data_type"], recs[1]["fields"]) == (1001, {"k": "v"})
    assert (recs[2]["data_type"], recs[2]["timestamp"], recs[2]["fields"]) == (0, 0, {})
    assert recs[3]["fields"] is None and "Payload" in recs[3]["decode_error"]
    assert recs[0]["decode_error"] is None
    assert payload_errors == 1


def test_gzip_compressed_messages_are_accepted(tmp_path):
    bodies = [wire.encode_record(2001, i, {"line": "x" * 200}) for i in range(100)]

    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc, compression=grpc.Compression.Gzip)
            await agent.send(bodies)
            recs = await dc.wait_for_records(lambda rs: len(rs) == 100)
            # grpc hands over the decompressed message; that is what counts.
            assert dc.metrics.get("bytes_total") == len(wire.packaged_data(bodies, agent.header()))
            await agent.close()
            return recs

    assert [r["raw"] for r in run(main())] == bodies


def test_record_spans_match_protobuf_split():
    bodies = [wire.encode_record(i, i * 7, {"n": str(i)}) for i in range(5)]
    raw = wire.packaged_data(bodies, wire.encode_header("a", [], [], [], [], "h", "v", "p"))
    assert record_spans(raw) == bodies
    pd = grpc_pb2.PackagedData.FromString(raw)
    assert [r.SerializeToString() for r in pd.records] == bodies


def test_store_survives_a_failed_transaction(tmp_path, monkeypatch):
    from elkeid_devtools.devcenter.store import Store
    committed = threading.Event()
    store = Store(str(tmp_path / "s.db"), str(tmp_path / "up"), on_commit=committed.set)
    store.open()
    raw = wire.packaged_data([wire.encode_record(1, 2, {"a": "b"})],
                             wire.encode_header("a", [], [], [], [], "h", "v", "p"))
    pd = grpc_pb2.PackagedData.FromString(raw)
    real = Store._message_rows

    def broken(self, *args):
        raise RuntimeError("simulated failure")

    try:
        monkeypatch.setattr(Store, "_message_rows", broken)
        store.add_message(pd, raw)
        assert committed.wait(10)  # the hook runs after failures too
        assert store.pending == 0 and store.write_errors == 1 and store.count() == 0
        # A bad op fails its future instead of leaving its caller waiting.
        with pytest.raises(ValueError, match="unknown store op"):
            store.call("bogus").result(10)
        assert store.write_errors == 2
        monkeypatch.setattr(Store, "_message_rows", real)
        store.add_message(pd, raw)
        store.set_configs("a", b"\x1a\x00").result(10)
        assert store.pending == 0 and store.count() == 1
        assert store.records()[0]["raw"] == wire.encode_record(1, 2, {"a": "b"})
    finally:
        store.close()


def test_store_survives_a_waiter_that_gave_up(tmp_path):
    """A caller whose stream went away cancels its future before the commit:
    the writer thread must go on (settling a cancelled future raises)."""
    from elkeid_devtools.devcenter.store import Store
    store = Store(str(tmp_path / "s.db"), str(tmp_path / "up"))
    store.open()
    try:
        gate = threading.Event()
        real_write = store._write

        def slow_write(items):
            gate.wait(10)
            real_write(items)

        store._write = slow_write
        abandoned = store.set_configs("a", b"\x1a\x00")
        assert abandoned.cancel()
        gate.set()
        store.set_configs("b", b"\x1a\x00").result(10)  # the writer is still alive
    finally:
        store.close()


def test_malformed_packaged_data_is_counted_and_stream_survives(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc)
            await agent.call.write(b"\xff\xff\xff\xff")          # not protobuf
            await agent.call.write(b"\x0a\x05\x08")              # record runs past the end
            await agent.send([wire.encode_record(7, 1, {"x": "y"})])
            await dc.wait_for_records(1, agent_id="agent-1")
            assert dc.metrics.get("decode_errors_total", kind="packaged_data") == 2
            info = dc.connection("agent-1")
            assert info["bad_messages"] == 2 and info["messages"] == 3
            # Still open: a command gets through afterwards.
            await dc.send_command("agent-1", grpc_pb2.Command(task=grpc_pb2.Task(data_type=1)))
            assert grpc_pb2.Command.FromString(await agent.read_command()).task.data_type == 1
            await agent.close()
    run(main())


def test_stream_without_agent_id_is_stored_but_not_addressable(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc, agent_id="")
            await agent.send([wire.encode_record(5, 1, {})])
            await dc.wait_for_records(1)
            assert dc.connected() == []
            assert dc.metrics.get("messages_without_agent_id_total") == 1
            # The first message with an id identifies the stream.
            agent.agent_id = "late"
            await agent.send([wire.encode_record(5, 2, {})])
            await dc.wait_for_agent("late")
            await agent.close()
    run(main())


def test_wait_for_records_times_out_with_a_message(tmp_path):
    async def main():
        async with devcenter(tmp_path, http_addr=None) as dc:
            with pytest.raises(asyncio.TimeoutError, match="3 records"):
                await dc.wait_for_records(3, timeout=0.2)
            with pytest.raises(asyncio.TimeoutError):
                await dc.wait_for_agent("nobody", timeout=0.2)
    run(main())


def seq_record(run, seq, data_type=7400):
    return wire.encode_record(data_type, 1, {"run": run, "seq": str(seq), "pad": "p"})


def test_seq_mode_counts_unique_duplicate_and_missing_numbers(tmp_path):
    async def main():
        async with devcenter(tmp_path, store_mode="seq") as dc:
            agent = FakeAgent(dc)
            # 0..99 of run r1, then 50..149 again (50 duplicates), with a
            # hole at 120..129; run r2 numbered on its own.
            await agent.send([seq_record("r1", n) for n in range(100)]
                             + [wire.encode_record(1000, 1, HEARTBEAT)])
            await agent.send([seq_record("r1", n) for n in range(50, 150) if not 120 <= n < 130]
                             + [seq_record("r2", n) for n in (0, 2)])
            # What a peer may send wrongly is counted, not fatal.
            await agent.send([wire.encode_record(7400, 1, {"seq": "-1"}),
                              wire.encode_record(7400, 1, {"seq": "12x"}),
                              wire.encode_record(7400, 1, {"seq": str(1 << 40)}),
                              wire.encode_record(7400, 1, {"nothing": "numbered"})])
            assert await dc.wait_for_records(197) == 197
            status, body = await ahttp(dc, "GET", "/seq")
            assert status == 200, body
            assert body["data"]["agents"] == {"agent-1": {
                "r1": {"unique": 140, "duplicates": 50, "highest": 149, "missing": 10},
                "r2": {"unique": 2, "duplicates": 0, "highest": 2, "missing": 1}}}
            assert body["data"]["errors"] == {"seq": 3}
            status, body = await ahttp(dc, "GET", "/seq?agent_id=nobody")
            assert status == 200 and body["data"]["agents"] == {}
            # Still a counts store: no rows.
            assert dc.store.counts()["agent-1"][7400] == 196
            status, body = await ahttp(dc, "GET", "/records")
            assert status == 409
            await agent.close()
    run(main())
    # A devcenter opened on the same data replays the log: the counts
    # survive a restart (a torn last line, as a SIGKILL mid-write leaves
    # it, is skipped and counted).
    with open(str(tmp_path / "dc.db.seq"), "ab") as f:
        f.write(b'{"a":"agent-1","r":{"r1":[[150,')

    async def again():
        async with devcenter(tmp_path, store_mode="seq") as dc:
            agent = FakeAgent(dc)
            await agent.send([seq_record("r1", n) for n in range(120, 130)])
            await dc.wait_for_records(197 + 10)  # the counts came back too
            snap = dc.store.seq.snapshot("agent-1")
            assert snap["agent-1"]["r1"] == {"unique": 150, "duplicates": 50, "highest": 149,
                                  "missing": 0}
            assert dc.store.seq.error_counts() == {"log_line": 1}
            await agent.close()
    run(again())


def test_seq_endpoint_needs_the_seq_store(tmp_path):
    async def main():
        async with devcenter(tmp_path, store_mode="counts") as dc:
            status, body = await ahttp(dc, "GET", "/seq")
            assert status == 409 and "--store seq" in body["msg"]
    run(main())


def test_read_rate_makes_a_slow_server(tmp_path):
    """--read-rate N: a stream is read at N records/s at most, so gRPC flow
    control holds the sender back (the agent's backpressure test)."""
    async def main():
        async with devcenter(tmp_path, store_mode="counts", read_rate=200) as dc:
            agent = FakeAgent(dc)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(3):
                await agent.send([wire.encode_record(2001, 1, {"a": "b"})] * 100)
            await dc.wait_for_records(300, timeout=30)
            # The third message is read only after the first two were paid
            # for: 200 records at 200/s.
            assert loop.time() - started >= 1.0
            await agent.close()
    run(main())
    with pytest.raises(ValueError, match="read rate"):
        DevCenter(grpc_addr="127.0.0.1:0", db_path=str(tmp_path / "x.db"), read_rate=-1)


def test_counts_mode_counts_without_rows(tmp_path):
    async def main():
        async with devcenter(tmp_path, store_mode="counts") as dc:
            agent = FakeAgent(dc)
            await agent.send([wire.encode_record(2001, 1, {"a": "b"})] * 300
                             + [wire.encode_record(1000, 1, HEARTBEAT)])
            await agent.send([wire.encode_record(2003, 1, {})] * 5)
            assert await dc.wait_for_records(306) == 306
            assert dc.store.count(agent_id="agent-1", data_type=2001) == 300
            assert dc.store.counts() == {"agent-1": {1000: 1, 2001: 300, 2003: 5}}
            with pytest.raises(StoreError):
                dc.store.records()
            status, body = await ahttp(dc, "GET", "/records")
            assert status == 409 and "counts" in body["msg"]
            # Heartbeats are still tracked for /conn/list.
            assert dc.connection("agent-1")["last_heartbeat"]["state"] == "running"
            await agent.close()
    run(main())
    db = sqlite3.connect(str(tmp_path / "dc.db"))
    rows = sorted(db.execute("SELECT agent_id, data_type, count FROM record_counts"))
    assert rows == [("agent-1", 1000, 1), ("agent-1", 2001, 300), ("agent-1", 2003, 5)]
    assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0


# ---------------------------------------------------------------- commands, configs

def _cfg(name, version):
    return grpc_pb2.Config(name=name, type="exec", version=version, sha256="ab" * 32,
                           download_urls=["http://127.0.0.1:1/%s" % name], detail="{}")


def test_configs_pushed_on_connect_and_after_restart(tmp_path):
    async def first():
        async with devcenter(tmp_path) as dc:
            dc.set_configs("agent-1", [_cfg("collector", "1.0"),
                                       {"name": "driver", "version": "2", "download_url": ["u"]}])
            agent = FakeAgent(dc)
            await agent.send([wire.encode_record(1000, 1, HEARTBEAT)])
            cmd = grpc_pb2.Command.FromString(await agent.read_command())
            assert not cmd.HasField("task")
            assert [c.name for c in cmd.configs] == ["collector", "driver"]
            assert cmd.configs[0] == _cfg("collector", "1.0")
            assert list(cmd.configs[1].download_urls) == ["u"]
            # Another agent gets nothing pushed.
            other = FakeAgent(dc, agent_id="agent-2")
            await other.send([wire.encode_record(1000, 1, HEARTBEAT)])
            await dc.wait_for_agent("agent-2")
            with pytest.raises(asyncio.TimeoutError):
                await other.read_command(timeout=0.3)
            await agent.close()
            await other.close()

    async def second():
        # A new devcenter on the same database remembers the configs.
        async with devcenter(tmp_path) as dc:
            assert [c.name for c in dc.configs("agent-1")] == ["collector", "driver"]
            agent = FakeAgent(dc)
            await agent.send([])
            cmd = grpc_pb2.Command.FromString(await agent.read_command())
            assert [c.version for c in cmd.configs] == ["1.0", "2"]
            dc.set_configs("agent-1", None)
            assert dc.configs("agent-1") is None
            await agent.close()

    run(first())
    run(second())


def test_send_command_objects_and_raw_bytes(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc)
            await agent.send([])
            await dc.wait_for_agent("agent-1")
            cmd = grpc_pb2.Command(task=grpc_pb2.Task(data_type=1051, object_name="elkeid-agent",
                                                      data='{"idc":"x"}', token="t1"))
            await dc.send_command("agent-1", cmd)
            assert await agent.read_command() == cmd.SerializeToString()
            # Malformed bytes go out exactly as given.
            await dc.send_command("agent-1", b"\x12\xff\x01")
            assert await agent.read_command() == b"\x12\xff\x01"
            assert dc.connection("agent-1")["commands_sent"] == 2
            with pytest.raises(AgentNotConnected):
                await dc.send_command("nobody", cmd)
            await agent.close()
    run(main())


def test_disconnect_aborts_stream_and_reconnect_supersedes(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            a1 = FakeAgent(dc)
            await a1.send([])
            await dc.wait_for_agent("agent-1")
            await dc.disconnect("agent-1", reason="test says bye")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await a1.read_command()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "test says bye" in info.value.details()
            assert dc.connected() == []
            with pytest.raises(AgentNotConnected):
                await dc.disconnect("agent-1")
            # Two streams, same id: the newer one wins, the older is closed.
            b1, b2 = FakeAgent(dc), FakeAgent(dc)
            await b1.send([])
            first = await dc.wait_for_agent("agent-1")
            await b2.send([])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await b1.read_command()
            assert "superseded" in info.value.details()
            now = dc.connection("agent-1")
            assert now["peer"] != first["peer"]  # separate channels, separate ports
            await dc.send_command("agent-1", b"\x12\x00")
            assert await b2.read_command() == b"\x12\x00"
            for a in (a1, b1, b2):
                await a.close()
    run(main())


def test_command_json_mapping():
    cmd, has_config = command_from_json({
        "task": {"data_type": 1050, "name": "elkeid-agent", "data": "{}", "token": "tok"},
        "config": [{"name": "p", "type": "tar.gz", "version": "1", "sha256": "s",
                    "signature": "g", "download_url": ["a", "b"], "detail": "d"}]})
    assert has_config
    assert cmd.task == grpc_pb2.Task(data_type=1050, object_name="elkeid-agent", data="{}",
                                     token="tok")
    assert cmd.configs[0] == grpc_pb2.Config(name="p", type="tar.gz", version="1", sha256="s",
                                             signature="g", download_urls=["a", "b"], detail="d")
    empty, has_config = command_from_json({"config": []})
    assert has_config and empty.SerializeToString() == b""
    for bad in ({}, {"task": {"data_type": "1"}}, {"task": {"data_type": True}},
                {"task": {"data_type": 2 ** 31}}, {"task": {"name": 5}},
                {"config": {"name": "x"}}, {"config": [{"download_url": "x"}]},
                {"config": ["x"]}, {"task": {"bogus": 1}}, {"extra": 1, "task": {}}, []):
        with pytest.raises(ValueError):
            command_from_json(bad)


# ---------------------------------------------------------------- HTTP API

def test_http_api_endpoints(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            assert await ahttp(dc, "GET", "/ping") == (200, {"code": 0, "msg": "success",
                                                            "data": "pong"})
            assert (await ahttp(dc, "GET", "/conn/count"))[1]["data"] == 0
            agent = FakeAgent(dc)
            await agent.send([wire.encode_record(1000, 1700000000, HEARTBEAT),
                              wire.encode_record(1001, 1700000000,
                                                 {"name": "collector", "cpu": "0.1"}),
                              wire.encode_record(2001, 1700000001, {"exe": "/bin/sh"})])
            await dc.wait_for_records(3)
            assert (await ahttp(dc, "GET", "/conn/count"))[1]["data"] == 1

            status, body = await ahttp(dc, "GET", "/conn/list")
            assert status == 200 and len(body["data"]) == 1
            entry = body["data"][0]
            assert entry["agent_id"] == "agent-1" and entry["hostname"] == "host-1"
            assert entry["intranet_ipv4"] == ["10.0.0.5"] and entry["version"] == "1.9.0"
            assert entry["last_heartbeat"] == HEARTBEAT and entry["last_heartbeat_at"]
            assert entry["plugins"]["collector"]["fields"]["cpu"] == "0.1"

            status, body = await ahttp(dc, "GET", "/conn/stat")
            stats = body["data"]
            assert stats["connections"] == 1 and stats["records_total"] == 3
            assert stats["agents"]["agent-1"]["records"] == 3
            assert stats["stored"]["agent-1"] == {"1000": 1, "1001": 1, "2001": 1}

            status, body = await ahttp(dc, "GET", "/records?agent_id=agent-1&data_type=2001")
            assert status == 200 and len(body["data"]) == 1
            rec = body["data"][0]
            assert rec["fields"] == {"exe": "/bin/sh"}
            assert base64.b64decode(rec["raw"]) == wire.encode_record(
                2001, 1700000001, {"exe": "/bin/sh"})
            status, body = await ahttp(dc, "GET", "/records?limit=1&newest=1")
            assert [r["data_type"] for r in body["data"]] == [2001]
            status, body = await ahttp(dc, "GET", "/records?after=%d" % rec["id"])
            assert body["data"] == []

            # POST /command/ with a task: name -> object_name.
            task = {"data_type": 1050, "name": "elkeid-agent",
                    "data": '{"path":"/etc/hosts","buf_size":1024}', "token": "up-1"}
            status, body = await ahttp(dc, "POST", "/command/",
                                       {"agent_id": "agent-1", "command": {"task": task}})
            assert (status, body["code"]) == (200, 0)
            cmd = grpc_pb2.Command.FromString(await agent.read_command())
            assert cmd.task.object_name == "elkeid-agent" and cmd.task.token == "up-1"
            assert dc.configs("agent-1") is None  # a task is not a config

            # With config: delivered and remembered (pushed on reconnect).
            config = [{"name": "collector", "type": "exec", "version": "1.0.0",
                       "sha256": "00" * 32, "signature": "", "download_url": ["http://a/b"],
                       "detail": ""}]
            status, body = await ahttp(dc, "POST", "/command",
                                       {"agent_id": "agent-1", "command": {"config": config}})
            assert status == 200
            cmd = grpc_pb2.Command.FromString(await agent.read_command())
            assert cmd.configs[0].download_urls == ["http://a/b"]
            assert [c.name for c in dc.configs("agent-1")] == ["collector"]
            status, body = await ahttp(dc, "GET", "/configs?agent_id=agent-1")
            assert body["data"] == config

            status, text = await ahttp(dc, "GET", "/metrics")
            assert status == 200
            assert re.search(r"^elkeid_devcenter_records_total 3$", text, re.M)
            assert re.search(r"^elkeid_devcenter_connections 1$", text, re.M)
            assert re.search(r"^elkeid_devcenter_commands_sent_total 2$", text, re.M)
            assert "elkeid_devcenter_bytes_total" in text

            status, body = await ahttp(dc, "GET", "/uploads")
            assert (status, body["data"]) == (200, [])

            status, body = await ahttp(dc, "POST", "/conn/reset", {"agent_id": ["agent-1", "x"]})
            assert status == 200 and body["data"] == {"reset": ["agent-1"], "not_found": ["x"]}
            with pytest.raises(grpc.aio.AioRpcError):
                await agent.read_command()
            assert (await ahttp(dc, "GET", "/conn/count"))[1]["data"] == 0

            # Reconnecting gets the configs set over HTTP.
            again = FakeAgent(dc)
            await again.send([])
            cmd = grpc_pb2.Command.FromString(await again.read_command())
            assert [c.name for c in cmd.configs] == ["collector"]
            await again.close()
            await agent.close()
    run(main())


def test_http_api_errors(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            cases = [
                ("POST", "/command/", None, b"{not json", 400, "JSON"),
                ("POST", "/command/", None, b"", 400, "JSON"),
                ("POST", "/command/", None, b"\xff\xfe", 400, "JSON"),
                ("POST", "/command/", [1, 2], None, 400, "object"),
                ("POST", "/command/", {"command": {"task": {}}}, None, 400, "agent_id"),
                ("POST", "/command/", {"agent_id": 5, "command": {}}, None, 400, "agent_id"),
                ("POST", "/command/", {"agent_id": "a"}, None, 400, "command"),
                ("POST", "/command/", {"agent_id": "a", "command": {}}, None, 400, "task or"),
                ("POST", "/command/", {"agent_id": "a", "command": {"task": {"data_type": "x"}}},
                 None, 400, "data_type"),
                ("POST", "/command/", {"agent_id": "a", "command": {"config": [{"name": 1}]}},
                 None, 400, "config.name"),
                ("POST", "/command/", {"agent_id": "ghost", "command": {"task": {}}}, None, 404,
                 "not connected"),
                ("GET", "/command/", None, None, 405, "POST"),
                ("POST", "/ping", None, b"{}", 405, "GET"),
                ("GET", "/nope", None, None, 404, "no such endpoint"),
                ("POST", "/conn/reset", {"agent_id": "ghost"}, None, 404, "not connected"),
                ("POST", "/conn/reset", {"agent_id": 7}, None, 400, "agent_id"),
                ("POST", "/conn/reset", {"agent_id": []}, None, 400, "agent_id"),
                ("GET", "/records?limit=x", None, None, 400, "limit"),
                ("GET", "/records?limit=-1", None, None, 400, "limit"),
                ("GET", "/configs", None, None, 400, "agent_id"),
                ("GET", "/configs?agent_id=ghost", None, None, 404, "ghost"),
            ]
            for method, path, body, raw, want, text in cases:
                status, answer = await ahttp(dc, method, path, body, raw)
                assert status == want, (method, path, body, raw, answer)
                assert answer["code"] == 1 and text in answer["msg"], (path, answer)
            # Unknown agent with config: nothing remembered.
            assert dc.configs("ghost") is None
            status, text = await ahttp(dc, "GET", "/metrics")
            n400 = sum(1 for case in cases if case[4] == 400)
            assert re.search(r'^elkeid_devcenter_http_requests_total\{code="400"\} %d$' % n400,
                             text, re.M), text
            # Still serving after all of that.
            assert (await ahttp(dc, "GET", "/ping"))[0] == 200
    run(main())


def test_http_command_timeout_and_stream_end_map_to_5xx(tmp_path, monkeypatch):
    from elkeid_devtools.devcenter import httpapi
    monkeypatch.setattr(httpapi, "LOOP_TIMEOUT", 1.5)

    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc)
            await agent.send([])
            await dc.wait_for_agent("agent-1")
            body = {"agent_id": "agent-1", "command": {"task": {"data_type": 1}}}

            async def never(agent_id, command, timeout):
                await asyncio.Event().wait()  # the loop-side wait times out first

            async def stream_gone(agent_id, command, timeout):
                raise ConnectionError("stream of agent-1 closed before the command was written")

            dc.send_command = never
            status, answer = await ahttp(dc, "POST", "/command/", body)
            assert status == 504 and "agent-1" in answer["msg"]
            dc.send_command = stream_gone
            status, answer = await ahttp(dc, "POST", "/command/", body)
            assert status == 503 and "closed" in answer["msg"]
            await agent.close()
    run(main())


def test_http_body_too_large_is_refused(tmp_path):
    async def main():
        async with devcenter(tmp_path) as dc:
            status, answer = await ahttp(dc, "POST", "/command/", raw=b"x" * (1024 * 1024 + 1))
            assert status == 413 and answer["code"] == 1
    run(main())


# ---------------------------------------------------------------- uploads

async def _upload(dc, chunks, peer_channel=None):
    ch = peer_channel or channel(dc)
    call = ch.stream_unary("/grpc.FileExt/Upload", request_serializer=None,
                           response_deserializer=None)
    resp = await call(iter(chunks))
    if peer_channel is None:
        await ch.close()
    return grpc_pb2.FileUploadResponse.FromString(resp).status


def _chunk(token, data):
    return grpc_pb2.FileUploadRequest(token=token, data=data).SerializeToString()


def test_upload_stored_with_sha256_and_agent(tmp_path):
    content = os.urandom(300000)

    async def main():
        async with devcenter(tmp_path) as dc:
            agent = FakeAgent(dc)
            await agent.send([])
            await dc.wait_for_agent("agent-1")
            status = await _upload(dc, [_chunk("tok-1", content[:100000]),
                                        _chunk("tok-1", content[100000:])],
                                   peer_channel=agent.channel)
            assert status == grpc_pb2.FileUploadResponse.SUCCESS
            # An upload on its own channel is attributed through the token of
            # the 1050 task sent to the agent.
            await dc.send_command("agent-1", grpc_pb2.Command(task=grpc_pb2.Task(
                data_type=1050, object_name="elkeid-agent", token="tok-2")))
            assert await _upload(dc, [_chunk("tok-2", b"abc")]) == 0
            status, body = await ahttp(dc, "GET", "/uploads?token=tok-1")
            assert [u["token"] for u in body["data"]] == ["tok-1"]
            await agent.close()
            return dc.store.uploads(), dc.metrics.get("uploads_total", status="success")

    rows, ok = run(main())
    assert ok == 2
    first, second = rows
    assert first["token"] == "tok-1" and first["status"] == "success"
    assert first["agent_id"] == "agent-1" and second["agent_id"] == "agent-1"
    assert first["size"] == len(content)
    assert first["sha256"] == hashlib.sha256(content).hexdigest()
    assert first["path"] == str(tmp_path / "uploads" / "tok-1")
    assert _read(first["path"]) == content
    assert _read(second["path"]) == b"abc"
    assert sorted(os.listdir(tmp_path / "uploads")) == ["tok-1", "tok-2"]


def test_upload_tokens_cannot_escape_the_uploads_dir(tmp_path):
    tokens = ["../../evil", "/etc/passwd", "..", "", "a/../../b", "..\\..\\c", "x\x00y",
              ".hidden", "tok-1"]

    async def main():
        async with devcenter(tmp_path) as dc:
            for token in tokens:
                assert await _upload(dc, [_chunk(token, token.encode() + b"!")]) == 0
            return dc.store.uploads()

    rows = run(main())
    updir = os.path.realpath(str(tmp_path / "uploads"))
    names = []
    for row, token in zip(rows, tokens):
        assert row["token"] == token and row["status"] == "success"
        assert os.path.dirname(os.path.realpath(row["path"])) == updir
        assert _read(row["path"]) == token.encode() + b"!"
        names.append(os.path.basename(row["path"]))
    assert names == ["evil", "etc_passwd", "upload", "upload.1", "a_.._.._b", "c", "x_y",
                     "hidden", "tok-1"]
    # "../../evil" relative to tmp_path/uploads would be tmp_path.parent/evil.
    assert not os.path.exists(str(tmp_path / "evil"))
    assert not os.path.exists(str(tmp_path.parent / "evil"))


def test_safe_name():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("...") == "upload"
    assert safe_name("a" * 500) == "a" * 120
    assert safe_name("ok-Name_1.tar.gz") == "ok-Name_1.tar.gz"
    for token in ("../x", "..", "/", "\\..\\", "a/../b"):
        name = safe_name(token)
        assert "/" not in name and "\\" not in name and not name.startswith(".")


def test_failed_uploads_leave_no_file(tmp_path):
    async def main():
        async with devcenter(tmp_path, max_upload_bytes=10) as dc:
            too_big = await _upload(dc, [_chunk("big", b"123456"), _chunk("big", b"789012")])
            malformed = await _upload(dc, [_chunk("bad", b"1"), b"\xff\xff"])
            empty = await _upload(dc, [])
            return (too_big, malformed, empty), dc.store.uploads(), dc.metrics

    statuses, rows, metrics = run(main())
    assert statuses == (grpc_pb2.FileUploadResponse.FAILED,) * 3
    assert [r["status"] for r in rows] == ["failed"] * 3
    assert "exceeds" in rows[0]["error"] and "malformed" in rows[1]["error"]
    assert "empty" in rows[2]["error"]
    assert all(r["path"] is None for r in rows)
    assert os.listdir(str(tmp_path / "uploads")) == []
    assert metrics.get("decode_errors_total", kind="upload") == 1
    assert metrics.get("uploads_total", status="failed") == 3


# ---------------------------------------------------------------- misc

def test_parse_address_is_loopback_only():
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:6751") == ("::1", 6751)
    assert parse_address("localhost:5") == ("127.0.0.1", 5)
    for bad in ("0.0.0.0:1", "10.0.0.1:1", "[::]:1", "example.com:1", "127.0.0.1", "1:x",
                "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_ipv6_loopback(tmp_path):
    if not _has_ipv6():
        pytest.skip("no IPv6 loopback here")

    async def main():
        dc = DevCenter(grpc_addr="[::1]:0", http_addr="[::1]:0", certs_dir=str(tmp_path / "c"),
                       db_path=str(tmp_path / "db"))
        await dc.start()
        try:
            assert dc.listening_line() == "devcenter listening grpc=[::1]:%d http=[::1]:%d" % (
                dc.grpc_port, dc.http_port)
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(None, lambda: urllib.request.urlopen(
                "http://[::1]:%d/ping" % dc.http_port, timeout=10).status)
            assert status == 200
        finally:
            await dc.stop()
    run(main())


def _has_ipv6():
    import socket
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def test_summary_lines():
    stats = {"connections": 1, "records_total": 25000, "messages_total": 10,
             "bytes_total": 5 << 20, "stored_records": 20000, "decode_errors_total": 2}
    prev = {"records_total": 5000, "messages_total": 0, "bytes_total": 0}
    info = {"agent_id": "a1", "hostname": "h", "version": "1.0", "records": 25000,
            "last_heartbeat": HEARTBEAT, "last_heartbeat_at": 990.0,
            "plugins": {"collector": {}}}
    lines = format_summary(stats, [info], prev, 10.0, now=1000.0)
    assert lines[0].startswith("devcenter: 1 agent | 2.0k rec/s 1 msg/s 512.0KiB/s")
    assert "total 25.0k records, 20.0k stored" in lines[0] and "2 decode errors" in lines[0]
    assert lines[1] == ("  a1 host=h v1.0 rec=25.0k cpu=1.2% rss=38.1MiB state=running "
                        "net_mode=private hb=10s ago plugins=collector")
    many = format_summary(stats, [dict(info, agent_id=str(i)) for i in range(25)], None, 5)
    assert len(many) == 22 and many[-1] == "  ... and 5 more agents"


def test_cli_subprocess_port_zero_and_sigterm(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "elkeid_devtools.devcenter", "--grpc", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--certs", str(tmp_path / "certs"),
         "--db", str(tmp_path / "dc.db"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    lines = []
    found = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.decode())
            if line.startswith(b"devcenter listening"):
                found.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert found.wait(60), (lines, proc.poll())
        m = re.match(r"devcenter listening grpc=127\.0\.0\.1:(\d+) http=127\.0\.0\.1:(\d+)",
                     lines[-1])
        assert m, lines
        http_port = int(m.group(2))
        assert int(m.group(1)) > 0 and http_port > 0
        with urllib.request.urlopen("http://127.0.0.1:%d/ping" % http_port, timeout=10) as r:
            assert json.loads(r.read())["data"] == "pong"
        for name in certs.FILES:
            assert os.path.isfile(str(tmp_path / "certs" / name))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_fails_cleanly_when_http_port_is_taken(tmp_path):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)

    async def main():
        dc = DevCenter(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:%d" % taken.getsockname()[1],
                       certs_dir=str(tmp_path / "certs"), db_path=str(tmp_path / "dc.db"))
        with pytest.raises(OSError):
            await dc.start()
        await dc.stop()  # harmless after a failed start
        # The same database opens again: the failed start closed it.
        async with devcenter(tmp_path) as dc2:
            assert dc2.grpc_port
    try:
        run(main())
    finally:
        taken.close()


def test_bench_tool_counts_every_record():
    from elkeid_devtools.devcenter import bench
    result = bench.run(records=3000, batch=1000, size=200, store="counts", gzip=False)
    assert result["records"] == 3000 and result["message_bytes"] > 200 * 1000


def test_cli_refuses_non_loopback(tmp_path):
    from elkeid_devtools.devcenter.__main__ import main
    assert main(["--grpc", "0.0.0.0:0", "--http", "127.0.0.1:0", "--certs",
                 str(tmp_path / "c"), "--db", str(tmp_path / "db"), "--quiet"]) == 2


def _cli(tmp_path, *args):
    """Run the real ``python -m elkeid_devtools.devcenter`` until it exits or
    says it listens; returns (exit status or None, stdout lines, stderr)."""
    from harness import wait_until
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "elkeid_devtools.devcenter", "--quiet",
                             "--http", "127.0.0.1:0"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(tmp_path))
    lines = []

    def reader():
        for line in proc.stdout:
            lines.append(line.decode())
    threading.Thread(target=reader, daemon=True).start()
    try:
        wait_until(lambda: proc.poll() is not None or any("listening" in x for x in lines), 60,
                   what="the devcenter to exit or listen")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
            return None, lines, proc.stderr.read().decode()
    return proc.returncode, lines, proc.stderr.read().decode()


def _refused_in_one_line(result, needle):
    code, lines, err = result
    assert code not in (None, 0), (code, lines, err)
    assert err.strip().splitlines() == [err.strip()] and needle in err, err
    assert "Traceback" not in err


def test_cli_refuses_a_grpc_port_another_devcenter_listens_on(tmp_path):
    from harness import DevCenterProc
    first = DevCenterProc(tmp_path / "first")
    try:
        (tmp_path / "second").mkdir()
        result = _cli(tmp_path, "--grpc", first.grpc, "--certs", str(tmp_path / "first/certs"),
                      "--db", str(tmp_path / "second/dc.db"))
        _refused_in_one_line(result, "cannot listen on %s: the port is in use" % first.grpc)
        # The first one still has the port to itself and still answers.
        assert first.request("GET", "/ping")[0] == 200 and first.proc.poll() is None
    finally:
        first.stop()


def test_cli_refuses_a_db_that_is_a_directory(tmp_path):
    (tmp_path / "adir").mkdir()
    result = _cli(tmp_path, "--grpc", "127.0.0.1:0", "--certs", str(tmp_path / "certs"),
                  "--db", str(tmp_path / "adir"))
    _refused_in_one_line(result, "database %s is a directory" % (tmp_path / "adir"))
    assert os.listdir(str(tmp_path / "adir")) == []


def test_cli_refuses_a_db_in_a_missing_directory_and_creates_nothing(tmp_path):
    result = _cli(tmp_path, "--grpc", "127.0.0.1:0", "--certs", str(tmp_path / "certs"),
                  "--db", str(tmp_path / "missing/dir/x.db"))
    _refused_in_one_line(result, "the directory of the database %s does not exist"
                         % (tmp_path / "missing/dir/x.db"))
    assert sorted(os.listdir(str(tmp_path))) == []  # no missing/, no certs/


def test_command_with_deeply_nested_json_is_a_400(tmp_path):
    from harness import DevCenterProc
    dc = DevCenterProc(tmp_path / "dc")
    try:
        depth = 100000
        for body in (b"[" * depth + b"]" * depth,
                     b'{"agent_id": "a", "command": ' + b"[" * depth + b"]" * depth + b"}"):
            req = urllib.request.Request("http://%s/command/" % dc.http_addr, data=body,
                                         method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 400
            answer = json.loads(e.value.read())
            assert answer["code"] == 1 and "nests too deeply" in answer["msg"], answer
        assert dc.request("GET", "/ping")[0] == 200
        with open(dc.stderr.name, "rb") as f:
            assert b"Traceback" not in f.read()
    finally:
        dc.stop()


def test_grpc_options_do_not_share_a_port():
    """grpc turns SO_REUSEPORT on by default; with the devcenter's options a
    second server cannot bind the port (the probe before it can be raced)."""
    from elkeid_devtools.devcenter.server import SERVER_OPTIONS

    async def main():
        first = grpc.aio.server(options=SERVER_OPTIONS)
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        try:
            second = grpc.aio.server(options=SERVER_OPTIONS)
            try:
                bound = second.add_insecure_port("127.0.0.1:%d" % port)
            except RuntimeError:
                bound = 0
            assert bound == 0
        finally:
            await first.stop(None)
    run(main())
