"""Transport against an in-process development AgentCenter: records keep
flowing across server-side stream aborts with nothing lost, the shutdown
drain delivers exactly once, the replay window ages, and a crash of the
connect loop neither ends it for good nor breaks shutdown."""

import asyncio
import collections
import logging
import os
import time

from elkeid_agent import wire
from elkeid_devtools.devcenter.server import DevCenter
from elkeid_agent.metrics import Registry
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.settings import Endpoints, Settings
from elkeid_agent.transport.stream import Transport
from elkeid_agent.runtime.tasks import TaskOwner
from elkeid_agent.state import AgentState


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
            await until(lambda: len(got) >= 2, 30, "both commands")
            assert t.connected
        finally:
            await t.stop(5)
            await dc.stop()
        return got, t

    got, t = asyncio.run(main())
    assert got[0] == b"\xff\xff\xff"
    assert pb.Command.FromString(got[1]).task.data_type == 1060
    assert t.stats.rx_commands == 2


async def until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        await asyncio.sleep(0.01)


def seq_record(seq, data_type=2001):
    return wire.encode_record(data_type, 1, {"seq": str(seq)})


def seqs_stored(dc, data_type=2001):
    return collections.Counter(int(r["fields"]["seq"])
                               for r in dc.store.records(data_type=data_type))


async def rig(tmp_path, agent_id, queue_bytes=1 << 20, **settings):
    """A started in-process devcenter and a Transport (not started) for it."""
    dc = DevCenter(certs_dir=str(tmp_path / "certs"), db_path=str(tmp_path / "dc.db"),
                   http_addr=None)
    await dc.start()
    metrics = Registry()
    queue = RecordQueue(queue_bytes, metrics)
    t = Transport(settings_for(dc, tmp_path, **settings), queue, lambda: header(agent_id),
                  lambda raw: None, metrics)
    return dc, metrics, queue, t


def test_records_queued_during_the_drain_arrive_exactly_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        dc, metrics, queue, t = await rig(tmp_path, "drain-agent", 64 << 20,
                                          batch_max_records=50)
        t.start()
        try:
            await t.wait_connected(30)
            for i in range(2000):
                queue.put(seq_record(i))
            before = 2000
            stopping = asyncio.ensure_future(t.stop(120))
            produced = before
            # Records keep coming while the drain runs (log lines, a 5100,
            # a plugin's last words): some while a batch is being written,
            # some after the half-close.
            while not stopping.done():
                queue.put(seq_record(produced))
                produced += 1
                await asyncio.sleep(0.001 if produced % 7 else 0)
            ok = stopping.result()
        finally:
            await dc.stop()
        return dc, metrics, queue, before, produced, ok

    dc, metrics, queue, before, produced, ok = asyncio.run(main())
    stored = seqs_stored(dc)
    dupes = {seq: n for seq, n in stored.items() if n > 1}
    assert not dupes, "delivered more than once: %d records" % len(dupes)
    assert set(range(before)) <= set(stored), "records queued before the drain lost"
    assert len(stored) > before, "nothing queued during the drain was delivered"
    # Whatever was not delivered is still queued and counted, never lost silently.
    assert len(stored) + queue.pending() == produced
    assert metrics.total("records_undelivered_at_exit") == queue.pending()
    assert metrics.total("transport_replayed_records") == 0
    assert "InvalidStateError" not in caplog.text
    assert "flush budget" not in caplog.text


def test_drain_with_a_responsive_server_finishes_without_spending_the_budget(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        # With that batching delay only the drain can send what is queued.
        dc, metrics, queue, t = await rig(tmp_path, "budget-agent", batch_max_records=100,
                                          flush_delay=3600.0)
        t.start()
        try:
            await t.wait_connected(30)
            for i in range(30):
                queue.put(seq_record(i))
            ok = await t.stop(60)
        finally:
            await dc.stop()
        return dc, metrics, ok

    dc, metrics, ok = asyncio.run(main())
    assert ok
    assert seqs_stored(dc) == collections.Counter(range(30))
    assert metrics.total("transport_drain_incomplete") == 0
    assert "flush budget" not in caplog.text


def _replays_after_break(tmp_path, replay_seconds, age):
    async def main():
        dc, metrics, queue, t = await rig(tmp_path, "replay-agent",
                                          replay_seconds=replay_seconds)
        if age:
            # Time alone ages the batch out here: the byte rule (a batch
            # needs IN_FLIGHT_BYTES written after it) has tests of its own
            # in test_delivery.py and the fault suite's blackhole case.
            t.delivery.in_flight_bytes = 0
        t.start()
        try:
            await t.wait_connected(30)
            queue.put(seq_record(1))
            await dc.wait_for_records(1, timeout=30, agent_id="replay-agent")
            written = time.monotonic()
            if age:  # idle: no write after this one
                await until(lambda: time.monotonic() - written > 2 * replay_seconds, 60,
                            "the replay window to age out")
            await dc.disconnect("replay-agent")
            await until(lambda: metrics.total("transport_stream_errors"), 30,
                        "the agent to notice the break")
            # A marker behind any replay on the new stream.
            queue.put(seq_record(2))
            await dc.wait_for_records(lambda recs: any(r["fields"]["seq"] == "2" for r in recs),
                                      timeout=30, agent_id="replay-agent")
        finally:
            await t.stop(10)
            await dc.stop()
        return seqs_stored(dc)[1], metrics.total("transport_replayed_records")

    return asyncio.run(main())


def test_a_break_after_the_window_aged_out_replays_nothing(tmp_path):
    copies, replayed = _replays_after_break(tmp_path, replay_seconds=0.3, age=True)
    assert (copies, replayed) == (1, 0)


def test_a_break_within_the_window_replays(tmp_path):
    copies, replayed = _replays_after_break(tmp_path, replay_seconds=600, age=False)
    assert (copies, replayed) == (2, 1)


def _crash_once(t):
    """Make the connect loop itself raise once, right after a dial succeeded
    (the channel is open): the place no except clause of the loop covers."""
    original = t._backoff.connected
    crashes = []

    def crashing():
        if not crashes:
            crashes.append(1)
            raise RuntimeError("injected crash in the connect loop")
        return original()

    t._backoff.connected = crashing
    return crashes


def test_stop_survives_a_crashed_connect_loop_and_closes_the_channel(tmp_path):
    async def main():
        dc, metrics, queue, t = await rig(tmp_path, "crash-agent")
        crashes = _crash_once(t)
        task = t.start()
        try:
            await until(task.done, 30, "the injected crash")
            assert crashes and t.channel is not None
            await t.stop(5)  # must not raise
            closed = t.channel is None
        finally:
            await dc.stop()
        return closed

    assert asyncio.run(main())


def test_a_crash_in_the_connect_loop_is_restarted_by_its_owner_and_reconnects(tmp_path):
    async def main():
        dc, metrics, queue, t = await rig(tmp_path, "owned-agent")
        owner = TaskOwner(metrics, AgentState(), restart_delays=(0.05,))
        crashes = _crash_once(t)
        owner.spawn("transport", t.run)
        try:
            queue.put(seq_record(7))
            await dc.wait_for_records(1, timeout=30, agent_id="owned-agent")
            assert crashes
            await t.stop(5)
            await owner.close()
        finally:
            await dc.stop()
        return metrics

    metrics = asyncio.run(main())
    assert metrics.get("tasks_crashed", task="transport") == 1
    assert metrics.get("tasks_restarted", task="transport") == 1
