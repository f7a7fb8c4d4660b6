"""RecordQueue: byte budget, priorities, drops counted, requeue order."""

import asyncio

import pytest

from elkeid_agent.metrics import Registry
from elkeid_agent.buffer.queue import AGENT, HIGH, NORMAL, SPOOLED, Batch, RecordQueue


def rec(i, size=10):
    return (b"%06d" % i).ljust(size, b".")


def test_fifo_and_high_first():
    q = RecordQueue(10_000, Registry())
    for i in range(5):
        q.put(rec(i))
    q.put(rec(99), HIGH)
    assert q.take_batch(100, 10_000) == [rec(99)] + [rec(i) for i in range(5)]
    assert q.count == 0 and q.bytes == 0


def test_batch_limits_by_count_and_bytes():
    q = RecordQueue(10_000, Registry())
    for i in range(10):
        q.put(rec(i, 100))
    assert len(q.take_batch(3, 10_000)) == 3
    assert len(q.take_batch(100, 250)) == 2
    # A single record larger than max_bytes still goes alone.
    assert len(q.take_batch(100, 1)) == 1
    assert q.count == 4 and q.bytes == 400


def test_overflow_evicts_oldest_normal_and_counts():
    m = Registry()
    q = RecordQueue(100, m, agent_reserve=0)
    for i in range(10):
        assert q.put(rec(i))
    assert q.put(rec(10))  # evicts rec(0)
    assert m.get("queue_dropped_records", reason="overflow", priority="normal") == 1
    assert m.get("queue_dropped_bytes", reason="overflow", priority="normal") == 10
    assert q.take_batch(100, 1000)[0] == rec(1)
    assert q.bytes <= 100


def test_high_survives_normal_pressure():
    m = Registry()
    q = RecordQueue(50, m, agent_reserve=0)
    for i in range(5):
        q.put(rec(i), HIGH)
    # Full of HIGH: a NORMAL record cannot evict them and is refused.
    assert not q.put(rec(100))
    assert m.get("queue_dropped_records", reason="overflow", priority="normal") == 1
    # A HIGH record evicts the oldest HIGH one.
    assert q.put(rec(200), HIGH)
    assert m.get("queue_dropped_records", reason="overflow", priority="high") == 1
    assert q.take_batch(100, 1000) == [rec(i) for i in range(1, 5)] + [rec(200)]


def test_too_large_refused():
    m = Registry()
    q = RecordQueue(10_000, m, max_record_bytes=100)
    assert not q.put(b"x" * 101)
    assert m.get("queue_dropped_records", reason="too_large", priority="normal") == 1
    assert q.count == 0


def test_requeue_goes_first_in_its_own_priority():
    q = RecordQueue(10_000, Registry())
    for i in range(6):
        q.put(rec(i))
    batch = q.take_batch(3, 10_000)
    q.put(rec(50), HIGH)
    q.requeue(batch)
    # The requeued NORMAL records go ahead of NORMAL ones, not of HIGH ones.
    assert q.take_batch(100, 10_000) == [rec(50), rec(0), rec(1), rec(2), rec(3), rec(4), rec(5)]


class ListSpool:
    """The spool seam at its simplest: a list and a read position."""

    available = True

    def __init__(self):
        self.items = []
        self.read = 0

    def spill(self, bodies, nbytes):
        self.items.extend(bodies)
        return True

    def pending(self):
        return len(self.items) - self.read

    def take(self, max_records, max_bytes, must_fit=False):
        out = self.items[self.read:self.read + max_records]
        mark = (self.read, self.read + len(out))
        self.read += len(out)
        return out, mark

    def unread(self, mark):
        self.read = min(self.read, mark[0])

    def settled(self, mark):
        pass


def test_spool_receives_overflow_and_drains_first():
    m = Registry()
    spool = ListSpool()
    q = RecordQueue(30, m, spool=spool, agent_reserve=0)
    for i in range(5):
        q.put(rec(i))
    assert spool.items == [rec(0), rec(1)]
    assert m.total("queue_dropped_records") == 0
    assert q.pending() == 5
    # Spooled (older) first; memory records join once the spool is empty.
    b = q.take_batch(10, 1000)
    assert b == [rec(i) for i in range(5)] and b.segments == ((SPOOLED, 2), (NORMAL, 3))
    q.requeue(b)
    assert spool.read == 0 and q.count == 3
    assert q.take_batch(10, 1000) == [rec(i) for i in range(5)]


def test_wait_ready_wakes_on_first_record_and_on_full_batch():
    async def main():
        q = RecordQueue(10_000, Registry())
        waiter = asyncio.ensure_future(q.wait_ready(60, 3, 10_000))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        q.put(rec(1))
        await asyncio.sleep(0.01)
        # One record, batch not full, 60 s delay: still waiting for more.
        assert not waiter.done()
        q.put(rec(2))
        q.put(rec(3))
        await asyncio.wait_for(waiter, 5)
        # Small delay: returns with a partial batch.
        q.take_batch(10, 10_000)
        q.put(rec(4))
        await asyncio.wait_for(q.wait_ready(0.01, 100, 10_000), 5)
        assert q.take_batch(10, 10_000) == [rec(4)]
    asyncio.run(main())


@pytest.mark.parametrize("priority", [NORMAL, HIGH, AGENT])
def test_byte_accounting_is_exact(priority):
    q = RecordQueue(1_000_000, Registry())
    sizes = [1, 7, 300, 4096, 12]
    for i, s in enumerate(sizes):
        q.put(b"x" * s, priority)
    assert q.bytes == sum(sizes)
    b = q.take_batch(2, 10**6)
    q.requeue(b)
    assert q.bytes == sum(sizes) and q.count == len(sizes)


def test_full_queue_put_cost_does_not_grow_with_queue_length():
    # Count work, not time: a put into a full queue must look only at what
    # it evicts. Wrap deques so any full scan (len() over every item) shows.
    m = Registry()
    q = RecordQueue(200_000, m, agent_reserve=0)
    for i in range(20_000):
        q.put(rec(i))
    calls = [0]
    import builtins
    real_len = builtins.len

    def counting_len(x):
        calls[0] += 1
        return real_len(x)

    import elkeid_agent.buffer.queue as qmod
    qmod.len = counting_len
    try:
        for i in range(100):
            q.put(rec(100_000 + i))
    finally:
        del qmod.len
    assert calls[0] < 100 * 10, calls[0]
    assert q.bytes == 200_000 and q._pbytes == [200_000, 0, 0]
    assert m.get("queue_dropped_records", reason="overflow", priority="normal") == 100


def test_per_priority_bytes_stay_exact_through_all_operations():
    q = RecordQueue(1000, Registry())
    for i in range(50):
        q.put(rec(i, 30), (HIGH, NORMAL, AGENT)[i % 3])
    b = q.take_batch(7, 10_000)
    q.requeue(b)
    q.take_batch(3, 10_000)
    expect = [sum(map(len, q._queues[p])) for p in (NORMAL, HIGH, AGENT)]
    assert q._pbytes == expect and q.bytes == sum(expect)


def test_agent_records_go_first_and_keep_their_reserve_against_plugin_floods():
    m = Registry()
    q = RecordQueue(1000, m, agent_reserve=200)
    for i in range(3):
        assert q.put_own(rec(900 + i, 50))
    # A plugin flooding fd 5 and fd 4 fills what it may, never the reserve.
    for i in range(200):
        q.put(rec(i, 50), HIGH)
        q.put(rec(1000 + i, 50), NORMAL)
    assert q.plugin_bytes <= 800
    assert m.get("queue_dropped_records", reason="overflow", priority="agent") == 0
    # The agent keeps producing during the flood: its records still fit.
    assert q.put_own(rec(903, 50))
    q.put(rec(500, 50), HIGH)
    out = q.take_batch(1000, 10**6)
    assert out[:4] == [rec(900 + i, 50) for i in range(4)]
    assert m.get("queue_dropped_records", reason="overflow", priority="agent") == 0
    assert m.get("queue_dropped_records", reason="overflow", priority="high") > 0


def test_agent_record_evicts_plugin_records_then_its_own_oldest():
    m = Registry()
    q = RecordQueue(100, m, agent_reserve=20)
    for i in range(8):
        q.put(rec(i), HIGH)
    for i in range(10):
        assert q.put_own(rec(100 + i))
    assert q.bytes == 100 and q._pbytes[HIGH] == 0
    assert m.get("queue_dropped_records", reason="overflow", priority="high") == 8
    assert q.put_own(rec(110))
    assert m.get("queue_dropped_records", reason="overflow", priority="agent") == 1
    assert q.take_batch(100, 1000) == [rec(101 + i) for i in range(10)]


def test_requeue_restores_each_records_priority():
    q = RecordQueue(10_000, Registry())
    q.put_own(rec(1))
    q.put(rec(2), HIGH)
    q.put(rec(3), NORMAL)
    batch = q.take_batch(100, 10_000)
    assert isinstance(batch, Batch) and batch == [rec(1), rec(2), rec(3)]
    # Queued while the batch was out: a NORMAL record must not overtake a
    # new HIGH one just because its write failed.
    q.put(rec(10), HIGH)
    q.put(rec(11), NORMAL)
    q.put_own(rec(12))
    q.requeue(batch)
    assert q.take_batch(100, 10_000) == [rec(1), rec(12), rec(2), rec(10), rec(3), rec(11)]
    assert q._pbytes == [0, 0, 0] and q.bytes == 0


def test_requeue_newest_first_puts_the_oldest_in_front():
    q = RecordQueue(10_000, Registry())
    for i in range(6):
        q.put(rec(i))
    first = q.take_batch(2, 10_000)
    second = q.take_batch(2, 10_000)
    q.requeue(second)
    q.requeue(first)
    assert q.take_batch(100, 10_000) == [rec(i) for i in range(6)]


def test_requeue_of_a_plain_list_is_high():
    q = RecordQueue(10_000, Registry())
    q.put(rec(5), NORMAL)
    q.put(rec(6), HIGH)
    q.requeue([rec(1), rec(2)])
    assert q.take_batch(100, 10_000) == [rec(1), rec(2), rec(6), rec(5)]


def test_requeue_never_exceeds_max_bytes_and_counts_what_it_drops():
    m = Registry()
    q = RecordQueue(100, m, agent_reserve=20)
    for i in range(8):
        q.put(rec(i))
    batch = q.take_batch(5, 10_000)
    for i in range(8, 13):
        q.put(rec(i))         # refills while the batch is out
    q.put_own(rec(50))
    q.put_own(rec(51))
    q.requeue(batch)
    assert q.bytes <= 100 and q.plugin_bytes <= 80
    assert q.bytes == sum(len(b) for d in q._queues for b in d)
    # The newest plugin records made room; the agent's own stayed.
    dropped = m.get("queue_dropped_records", reason="requeue_overflow", priority="normal")
    assert dropped == 5
    assert q.take_batch(100, 10_000) == [rec(50), rec(51)] + [rec(i) for i in range(8)]


# ------------------------------------------------------------ put_many


def _put_one_by_one(q, bodies, priority):
    return sum(q.put(b, priority) for b in bodies)


def _same_outcome(build, steps):
    """Run ``steps`` ((bodies, priority), ...) on two fresh queues, one with
    put per record, one with put_many; everything observable must agree."""
    results = []
    for adder in (_put_one_by_one, lambda q, b, p: q.put_many(b, p)):
        m = Registry()
        q, spool = build(m)
        accepted = [adder(q, bodies, p) for bodies, p in steps]
        state = (accepted, q.count, q.bytes, q.plugin_bytes, q.own_pending(),
                 sorted(m.snapshot().items()),
                 list(spool.items) if spool is not None else None)
        results.append((state, list(q.take_batch(10_000, 10_000_000))))
    assert results[0] == results[1]
    return results[0]


def test_put_many_matches_put_with_too_large_records_in_the_run():
    (accepted, *_), batch = _same_outcome(
        lambda m: (RecordQueue(10_000, m, max_record_bytes=50), None),
        [([rec(0), rec(1, 51), rec(2), rec(3, 500)], NORMAL), ([rec(4)], HIGH)])
    assert accepted == [2, 1] and batch == [rec(4), rec(0), rec(2)]


def test_put_many_matches_put_when_the_run_overflows():
    # 100-byte budget, a reserve of 20: plugin records get 80; the run
    # evicts older NORMAL records, then its own first records.
    steps = [([rec(i) for i in range(5)], NORMAL), ([rec(10 + i) for i in range(6)], HIGH),
             ([rec(20 + i) for i in range(3)], AGENT), ([rec(30 + i) for i in range(4)], NORMAL)]
    (accepted, count, nbytes, *_), batch = _same_outcome(
        lambda m: (RecordQueue(100, m, agent_reserve=20), None), steps)
    assert nbytes <= 100 and count == len(batch)
    assert accepted[2] == 3 and batch[:3] == [rec(20), rec(21), rec(22)]


def test_put_many_matches_put_through_the_spool_in_an_outage():
    def build(m):
        spool = ListSpool()
        q = RecordQueue(60, m, spool=spool, agent_reserve=0)
        return q, spool

    # Records before the outage stay in order behind; during it they go to
    # the spool (put's own path: the run is not one slice).
    for adder in (_put_one_by_one, lambda q, b, p: q.put_many(b, p)):
        m = Registry()
        q, spool = build(m)
        adder(q, [rec(i) for i in range(3)], NORMAL)
        q.outage(True)   # no running loop: memory's records move at once
        adder(q, [rec(3 + i) for i in range(4)], NORMAL)
        assert spool.items == [rec(i) for i in range(7)], adder
        assert q.count == 0 and m.total("queue_dropped_records") == 0
    _same_outcome(build, [([rec(i) for i in range(9)], NORMAL)])


def test_put_many_wakes_the_sender_once_with_the_whole_run_queued():
    async def main():
        q = RecordQueue(10_000, Registry())
        waiter = asyncio.ensure_future(q.first_record())
        await asyncio.sleep(0)
        assert q.put_many([rec(0), rec(1), rec(2)]) == 3
        await asyncio.wait_for(waiter, 5)
        assert q.take_batch(100, 10_000) == [rec(0), rec(1), rec(2)]
        assert q.put_many([]) == 0 and q.count == 0
    asyncio.run(main())


def test_interrupt_wakes_first_record_with_nothing_queued():
    async def main():
        q = RecordQueue(10_000, Registry())
        waiter = asyncio.ensure_future(q.first_record())
        await asyncio.sleep(0)
        assert not waiter.done()
        q.interrupt()
        await asyncio.wait_for(waiter, 5)
        assert q.pending() == 0
    asyncio.run(main())


def test_take_batch_slices_runs_exactly_like_record_by_record():
    # Runs across priorities, limits by count and bytes landing inside,
    # at and after a run's end.
    for max_records, max_bytes in ((1, 10**6), (3, 10**6), (5, 10**6), (7, 10**6),
                                  (100, 10), (100, 35), (100, 50), (100, 55), (4, 45)):
        q = RecordQueue(10_000, Registry())
        q.put_many([rec(i) for i in range(5)], NORMAL)
        q.put_many([rec(10 + i) for i in range(2)], HIGH)
        q.put_own(rec(20))
        expected = [rec(20), rec(10), rec(11)] + [rec(i) for i in range(5)]
        got = []
        while q.count:
            b = q.take_batch(max_records, max_bytes)
            assert 1 <= len(b) <= max_records
            assert len(b) == 1 or sum(map(len, b)) <= max_bytes
            # Greedy: the next record would not have fitted.
            rest = expected[len(got) + len(b):]
            if rest and len(b) < max_records:
                assert sum(map(len, b)) + len(rest[0]) > max_bytes
            got.extend(b)
        assert got == expected and q.bytes == 0 and q.plugin_bytes == 0


def test_put_many_keeps_plugin_records_out_of_the_agent_reserve():
    # 90 bytes fit the 100-byte budget but not the plugins' 80.
    steps = [([rec(i) for i in range(5)], NORMAL), ([rec(10 + i) for i in range(4)], HIGH)]
    (_accepted, _count, nbytes, plugin_bytes, *_), batch = _same_outcome(
        lambda m: (RecordQueue(100, m, agent_reserve=20), None), steps)
    assert plugin_bytes == 80 and batch[:4] == [rec(10 + i) for i in range(4)]


def test_a_burst_read_whole_ends_the_batching_delay_until_the_batch_is_taken():
    async def main():
        q = RecordQueue(10_000, Registry())
        # The sender already waiting out its delay: the hint ends the wait.
        q.put(rec(1))
        waiter = asyncio.ensure_future(q.wait_ready(60, 100, 10_000))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        q.burst_read()
        await asyncio.wait_for(waiter, 5)
        assert q.take_batch(100, 10_000) == [rec(1)]
        # Taking the batch consumed the hint: the next record waits again.
        q.put(rec(2))
        waiter = asyncio.ensure_future(q.wait_ready(60, 100, 10_000))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        # The hint given before the sender reached its wait (the burst's
        # records woke it, it has not run yet): no delay either.
        q.burst_read()
        await asyncio.wait_for(waiter, 5)
        q.take_batch(100, 10_000)
        q.put(rec(3))
        q.burst_read()
        await asyncio.wait_for(q.wait_ready(60, 100, 10_000), 5)
    asyncio.run(main())
