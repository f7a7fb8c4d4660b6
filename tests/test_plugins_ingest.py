"""Frame splitting and record validation (sans-I/O, fed bytes)."""

import random
import struct

import pytest

from elkeid_agent import wire
from elkeid_agent.errors import PluginFault, WireError
from elkeid_agent.plugins.ingest import FrameDecoder, FrameError, check_record, task_frame

MAX = 1024 * 1024


def rec(i, size=0):
    return wire.encode_record(7000 + i % 7, 1700000000 + i, {"i": str(i), "pad": "p" * size})


def feed_in_pieces(dec, data, cuts):
    out = []
    pos = 0
    for cut in sorted(cuts) + [len(data)]:
        bodies, err = dec.feed(data[pos:cut])
        assert err is None
        out += bodies
        pos = cut
    return out


def test_bodies_are_returned_unchanged_whatever_the_chunking():
    rng = random.Random(1)
    bodies = [rec(i, rng.randrange(0, 3000)) for i in range(200)]
    stream = b"".join(wire.frame(b) for b in bodies)
    for _ in range(50):
        cuts = [rng.randrange(0, len(stream)) for _ in range(rng.randrange(0, 40))]
        dec = FrameDecoder(MAX)
        got = feed_in_pieces(dec, stream, cuts)
        assert got == bodies
        assert dec.buffered() == 0 and dec.close() is None


def test_byte_at_a_time():
    bodies = [rec(i, 5) for i in range(5)]
    stream = b"".join(wire.frame(b) for b in bodies)
    dec = FrameDecoder(MAX)
    assert feed_in_pieces(dec, stream, range(1, len(stream))) == bodies


def test_a_large_frame_arriving_in_many_chunks():
    body = rec(1, 3 * 1024 * 1024)
    data = wire.frame(body)
    dec = FrameDecoder(4 * MAX)
    got = feed_in_pieces(dec, data, range(65536, len(data), 65536))
    assert got == [body]


def test_zero_length_frame_is_an_empty_record():
    dec = FrameDecoder(MAX)
    assert dec.feed(b"\0\0\0\0" + wire.frame(rec(1))) == ([b"", rec(1)], None)


def test_absurd_length_is_refused_from_the_header_alone():
    dec = FrameDecoder(MAX)
    good = wire.frame(rec(1))
    bodies, err = dec.feed(good + b"\xff\xff")
    assert bodies == [rec(1)] and err is None
    bodies, err = dec.feed(b"\xff\xff" + wire.frame(rec(2)))
    assert bodies == [] and isinstance(err, FrameError) and isinstance(err, PluginFault)
    assert "4294967295 (0xffffffff) exceeds the maximum" in str(err)
    # Dead from now on: nothing after the bad point comes out.
    assert dec.feed(wire.frame(rec(3))) == ((), err)
    assert dec.close() is None


def test_length_just_over_the_maximum():
    dec = FrameDecoder(100)
    assert dec.feed(struct.pack("<I", 100) + b"\x1a\x62" + b"\0" * 98)[1] is None
    _, err = dec.feed(struct.pack("<I", 101))
    assert err is not None


def test_bodies_before_a_bad_record_are_kept_and_nothing_after():
    dec = FrameDecoder(MAX)
    stream = wire.frame(rec(1)) + wire.frame(b"\x1a\x05ab") + wire.frame(rec(2))
    bodies, err = dec.feed(stream)
    assert bodies == [rec(1)]
    assert "is not a Record" in str(err) and "runs past the end" in str(err)


def test_truncated_frame_at_end_of_stream():
    dec = FrameDecoder(MAX)
    bodies, err = dec.feed(wire.frame(rec(1)) + struct.pack("<I", 100) + b"0123456789")
    assert bodies == [rec(1)] and err is None
    err = dec.close()
    assert "stream ended inside a frame (10 of 100 bytes)" in str(err)


def test_truncated_header_at_end_of_stream():
    dec = FrameDecoder(MAX)
    dec.feed(b"\x05\x00")
    assert "2 of 4 header bytes" in str(dec.close())


def test_validation_can_be_switched_off():
    dec = FrameDecoder(MAX, validate=False)
    assert dec.feed(wire.frame(b"\x0b"))[0] == [b"\x0b"]


def _slow_ok(body):
    try:
        wire.decode_record(body, deep=False)
        return True
    except WireError:
        return False


def _fast_ok(body):
    try:
        check_record(body)
        return True
    except WireError:
        return False


def _mutations(rng, body):
    b = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
    return bytes(b)


def test_check_record_accepts_exactly_what_decode_record_accepts():
    """Differential: the fast validator and wire.decode_record(deep=False)
    agree on valid records of every shape and on mutated garbage."""
    rng = random.Random(7)
    samples = [b"", b"\x1a\x00", b"\x08\x01", b"\x10\x01", b"\x08" + b"\xff" * 9 + b"\x01",
               b"\x10" + b"\xff" * 9 + b"\x02", b"\x08" + b"\x80" * 10 + b"\x00",
               b"\x1a\x80\x80\x80\x80\x01", b"\x1a\x05abc", b"\x22\x00\x1a\x00",
               wire.encode_record(-1, -5, {"a": "b"}), b"\x1a\x00\x1a\x00",
               b"\x1a\x00\x08\x01", b"\x0d\x00\x00\x00\x00", b"\x00",
               wire.encode_record(1, 2, {"big": "x" * 20000}),       # 3-byte length
               wire.encode_record(1, 2, {"big": "x" * 3000000})]     # 4-byte length
    for i in range(300):
        samples.append(wire.encode_record(rng.randrange(-2 ** 31, 2 ** 31),
                                          rng.randrange(-2 ** 63, 2 ** 63),
                                          {"k%d" % j: "v" * rng.randrange(0, 200)
                                           for j in range(rng.randrange(0, 6))}))
    for body in list(samples):
        for _ in range(20):
            samples.append(_mutations(rng, body))
    for _ in range(2000):
        samples.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))))
    disagreements = [s for s in samples if _fast_ok(s) != _slow_ok(s)]
    assert disagreements == []
    assert sum(map(_fast_ok, samples)) > 300 and sum(not _fast_ok(s) for s in samples) > 1000


def test_check_record_matches_the_protobuf_library():
    pb = pytest.importorskip("elkeid_agent.pb.grpc_pb2")
    r = pb.Record(data_type=1001, timestamp=1700000000)
    r.data.fields.update({"name": "collector", "x": "y"})
    body = r.SerializeToString(deterministic=True)
    check_record(body)
    assert body == wire.encode_record(1001, 1700000000, {"name": "collector", "x": "y"})


def test_task_frame_is_what_protobuf_would_send():
    pb = pytest.importorskip("elkeid_agent.pb.grpc_pb2")
    t = pb.Task(data_type=9010, object_name="p", data="{}", token="tok")
    assert task_frame(9010, "p", "{}", "tok") == wire.frame(t.SerializeToString())


def test_canonical_records_take_the_fast_path(monkeypatch):
    from elkeid_agent.plugins import ingest
    calls = []
    monkeypatch.setattr(ingest.wire, "decode_record",
                        lambda body, deep=True: calls.append(body))
    for size in (0, 100, 20000, 3000000):          # 1- to 4-byte payload lengths
        for dt, ts in ((1001, 1700000000), (0, 5), (7, 0), (0, 0), (2 ** 31 - 1, 2 ** 62)):
            check_record(wire.encode_record(dt, ts, {"p": "x" * size} if size else {}))
    assert calls == []
    check_record(b"\x1a\x00\x08\x01")              # not canonical: the general parser
    assert calls == [b"\x1a\x00\x08\x01"]
