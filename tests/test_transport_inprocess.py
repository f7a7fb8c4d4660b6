"""Transport against an in-process development AgentCenter: records keep
flowing across server-side stream aborts with nothing lost."""

import asyncio
import os

from elkeid_agent import wire
from elkeid_devtools.devcenter.server import DevCenter
from elkeid_agent.metrics import Registry
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.settings import Endpoints, Settings
from elkeid_agent.transport.stream import Transport


def settings_for(dc, workdir, **kw):
    s = Settings(workdir=str(workdir), regions={"default": Endpoints(
        server="127.0.0.1:%d" % dc.grpc_port)}, reconnect_delay=0.2, **kw)
    s.ca, s.cert, s.key = (os.path.join(dc.certs_dir, n)
                           for n in ("ca.crt", "client.crt", "client.key"))
    return s


def header(agent_id):
    return wire.encode_header(agent_id, [], [], [], [], "h", "v", "elkeid-agent")


def test_stream_aborts_mid_flow_lose_nothing(tmp_path):
    async def main():
        dc = DevCenter(certs_dir=str(tmp_path / "certs"), db_path=str(tmp_path / "dc.db"),
                       http_addr=None)
        await dc.start()
        metrics = Registry()
        queue = RecordQueue(64 << 20, metrics)
        s = settings_for(dc, tmp_path, batch_max_records=500)
        t = Transport(s, queue, lambda: header("abort-agent"), lambda raw: None, metrics)
        t.start()
        produced = 0
        stop = asyncio.Event()

        async def producer():
            nonlocal produced
            while not stop.is_set():
                for _ in range(50):
                    queue.put(wire.encode_record(2001, 1, {"seq": str(produced)}))
                    produced += 1
                await asyncio.sleep(0.002)

        prod = asyncio.ensure_future(producer())
        try:
            for _ in range(3):
                await dc.wait_for_records(produced // 2 + 100, timeout=30)
                await dc.wait_for_agent("abort-agent", timeout=30)
                await dc.disconnect("abort-agent")
            stop.set()
            await prod
            # stop() drains the queue, reconnecting if the last abort is
            # still being noticed.
            await t.stop(30)
        finally:
            stop.set()
            await t.stop(5)
            await dc.stop()
        return produced, dc, metrics

    produced, dc, metrics = asyncio.run(main())
    assert metrics.total("records_undelivered_at_exit") == 0
    seqs = [int(r["fields"]["seq"]) for r in dc.store.records(data_type=2001)]
    assert set(seqs) == set(range(produced)), "lost %d records" % (produced - len(set(seqs)))
    assert metrics.total("transport_stream_errors") >= 3
    # Order within the stream is preserved apart from requeued batches.
    assert len(seqs) >= produced


def test_commands_reach_dispatcher_and_malformed_bytes_do_not_break_stream(tmp_path):
    from elkeid_agent.pb import grpc_pb2 as pb

    async def main():
        dc = DevCenter(certs_dir=str(tmp_path / "certs"), db_path=str(tmp_path / "dc.db"),
                       http_addr=None)
        await dc.start()
        got = []
        metrics = Registry()
        queue = RecordQueue(1 << 20, metrics)
        t = Transport(settings_for(dc, tmp_path), queue, lambda: header("cmd-agent"),
                      got.append, metrics)
        t.start()
        try:
            await t.wait_connected(30)
            queue.put(wire.encode_record(1000, 1, {}))
            await dc.wait_for_agent("cmd-agent", timeout=30)
            await dc.send_command("cmd-agent", b"\xff\xff\xff")
            cmd = pb.Command(task=pb.Task(data_type=1060, object_name="elkeid-agent"))
            await dc.send_command("cmd-agent", cmd)
            for _ in range(500):
                if len(got) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert t.connected
        finally:
            await t.stop(5)
            await dc.stop()
        return got, t

    got, t = asyncio.run(main())
    assert got[0] == b"\xff\xff\xff"
    assert pb.Command.FromString(got[1]).task.data_type == 1060
    assert t.stats.rx_commands == 2
