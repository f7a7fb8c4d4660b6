"""The sans-I/O delivery core: requeue, replay window, drain and half-close,
fed events with a fake clock and no sockets."""

import pytest

from elkeid_agent.transport.delivery import (FINISHED, HALF_CLOSE, IDLE, REDIAL, REDIAL_NOW,
                                             Delivery, Requeue, Take)


class Batch(list):
    """Like the queue's batch objects: a list carrying more than records."""

    def __init__(self, records, high=0):
        super().__init__(records)
        self.high = high


def write(d, batch, now, nbytes=10):
    d.batch_taken(batch)
    d.written(nbytes, now)


def test_normal_sending_uses_the_batching_delay_then_draining_does_not():
    d = Delivery(5.0, 1 << 20)
    d.stream_started()
    assert d.next_send(0) == Take(None)
    d.drain_requested()
    assert d.next_send(3) == Take(0.0)
    assert d.next_send(0) is HALF_CLOSE
    d.half_close_sent()
    # Exactly one half-close: afterwards nothing is written on this stream.
    assert d.next_send(0) is IDLE and d.next_send(7) is IDLE
    with pytest.raises(RuntimeError):
        d.batch_taken(["r"])


def test_failed_write_requeues_that_batch_object_first():
    d = Delivery(5.0, 1 << 20)
    d.stream_started()
    b1, b2 = Batch(["a"], high=1), Batch(["b", "c"])
    write(d, b1, now=1.0)
    d.batch_taken(b2)
    assert d.writing
    assert d.write_failed() == [Requeue(b2)]
    assert d.write_failed() == []
    ended = d.stream_ended(False, now=1.5, pending=0)
    assert [a.batch for a in ended.requeue] == [b1]
    assert ended.requeue[0].batch is b1 and ended.requeue[0].batch.high == 1
    assert ended.replayed == 1 and not ended.confirmed and ended.next == REDIAL


def test_broken_stream_replays_each_batch_unflattened_newest_first():
    d = Delivery(5.0, 1 << 20)
    d.stream_started()
    b1, b2, b3 = Batch(["1"], high=1), Batch(["2", "3"]), Batch(["4"])
    write(d, b1, 1.0)
    write(d, b2, 2.0)
    d.batch_taken(b3)  # in flight when the stream broke
    ended = d.stream_ended(False, now=3.0, pending=5)
    # requeue() pushes to the front: in-flight first, then the window
    # newest to oldest leaves b1, b2, b3 in their original order.
    assert [a.batch for a in ended.requeue] == [b3, b2, b1]
    assert all(isinstance(a.batch, Batch) for a in ended.requeue)
    assert ended.replayed == 3
    assert d.unconfirmed == 0


def test_window_is_trimmed_by_age_at_replay_time():
    d = Delivery(5.0, 1 << 20, in_flight_bytes=10)
    d.stream_started()
    write(d, ["a"], now=200.0, nbytes=10)
    write(d, ["b"], now=203.0, nbytes=10)
    ended = d.stream_ended(False, now=206.0, pending=0)
    # "a" is 6 s old with 10 bytes written after it: out; "b" is recent.
    assert [a.batch for a in ended.requeue] == [["b"]]


def test_a_stalled_stream_replays_what_it_accepted_however_old():
    # A blackholed server: grpc accepted a few writes, then nothing moved
    # until keepalive gave up 20 s later. Old as they are, nothing proves
    # those batches left the socket buffer: fewer than in_flight_bytes
    # followed them.
    d = Delivery(5.0, 1 << 20, in_flight_bytes=100)
    d.stream_started()
    for i, t in enumerate((1.0, 2.0, 3.0)):
        write(d, [str(i)], now=t, nbytes=10)
    ended = d.stream_ended(False, now=30.0, pending=0)
    assert [a.batch for a in ended.requeue] == [["2"], ["1"], ["0"]] and ended.replayed == 3
    assert ended.settled == []
    # An idle stream likewise keeps its last batch until more follows.
    d.stream_started()
    write(d, ["old"], now=100.0, nbytes=10)
    ended = d.stream_ended(False, now=161.0, pending=0)
    assert [a.batch for a in ended.requeue] == [["old"]]


def test_window_is_bounded_by_bytes():
    d = Delivery(60.0, 25)
    d.stream_started()
    for i in range(5):
        write(d, [str(i)], now=1.0 + i, nbytes=10)
    ended = d.stream_ended(False, now=6.0, pending=0)
    assert [a.batch for a in ended.requeue] == [["4"], ["3"]]


def test_server_ok_confirms_only_after_our_half_close():
    d = Delivery(5.0, 1 << 20)
    d.stream_started()
    write(d, ["x"], 1.0)
    ended = d.stream_ended(True, now=1.1, pending=0)  # the server ended it on its own
    assert not ended.confirmed and ended.replayed == 1
    d.stream_started()
    write(d, ["y"], 2.0)
    d.drain_requested()
    assert d.next_send(0) is HALF_CLOSE
    d.half_close_sent()
    ended = d.stream_ended(True, now=2.1, pending=0)
    assert ended.confirmed and ended.requeue == [] and ended.next == FINISHED
    assert d.finished


def test_records_queued_after_the_half_close_redial_at_once():
    d = Delivery(5.0, 1 << 20)
    d.drain_requested()
    d.stream_started()
    write(d, ["a"], 1.0)
    d.half_close_sent()
    ended = d.stream_ended(True, now=1.1, pending=2)  # e.g. a log line queued meanwhile
    assert ended.confirmed and ended.requeue == [] and ended.next == REDIAL_NOW
    assert not d.finished
    # A break during the drain replays and also redials without delay.
    d.stream_started()
    write(d, ["b"], 2.0)
    ended = d.stream_ended(False, now=2.1, pending=0)
    assert ended.next == REDIAL_NOW and [a.batch for a in ended.requeue] == [["b"]]


def test_nothing_to_deliver_finishes_a_drain_without_a_stream():
    d = Delivery(5.0, 1 << 20)
    assert not d.nothing_to_deliver(0, False)  # not draining
    d.drain_requested()
    assert not d.nothing_to_deliver(3, False)
    assert not d.nothing_to_deliver(0, True)
    assert d.nothing_to_deliver(0, False) and d.finished


def test_batches_out_of_the_window_are_settled_in_order_and_never_replayed():
    d = Delivery(5.0, 25, in_flight_bytes=10)
    d.stream_started()
    b1, b2, b3, b4 = (Batch([str(i)]) for i in range(4))
    d.batch_taken(b1)
    assert d.written(10, 1.0) == []
    d.batch_taken(b2)
    assert d.written(10, 2.0) == []
    d.batch_taken(b3)
    assert d.written(10, 6.5) == [b1]        # 5.5 s old, 20 bytes after it: out
    d.batch_taken(b4)
    assert d.written(10, 6.6) == [b2]        # 30 bytes > 25: out by bytes
    ended = d.stream_ended(False, now=12.0, pending=0)
    # b3 is old with a batch after it: settled; b4 has nothing after it.
    assert ended.settled == [b3] and [a.batch for a in ended.requeue] == [b4]


def test_a_confirmed_end_settles_the_whole_window():
    d = Delivery(5.0, 1 << 20)
    d.stream_started()
    b1, b2 = Batch(["a"]), Batch(["b"])
    write(d, b1, 1.0)
    write(d, b2, 2.0)
    d.drain_requested()
    d.half_close_sent()
    ended = d.stream_ended(True, now=2.5, pending=0)
    assert ended.confirmed and ended.settled == [b1, b2] and ended.requeue == []
    d2 = Delivery(5.0, 1 << 20)
    d2.stream_started()
    write(d2, b1, 1.0)
    ended = d2.stream_ended(False, now=2.0, pending=0)
    assert ended.settled == [] and [a.batch for a in ended.requeue] == [b1]
