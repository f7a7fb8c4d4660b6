"""wire.py against the protobuf library, byte for byte."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from elkeid_agent import wire
from elkeid_agent.errors import WireError
from elkeid_agent.pb import grpc_pb2 as pb

int32s = st.integers(-(2 ** 31), 2 ** 31 - 1)
int64s = st.integers(-(2 ** 63), 2 ** 63 - 1)
texts = st.text(max_size=40)


def lib_record(dt, ts, fields):
    return pb.Record(data_type=dt, timestamp=ts, data=pb.Payload(fields=fields))


@given(int32s, int64s, st.dictionaries(texts, texts, max_size=1))
def test_record_bytes_identical_to_protobuf(dt, ts, fields):
    # One map entry: byte order is unambiguous, so bytes must match exactly.
    assert wire.encode_record(dt, ts, fields) == lib_record(dt, ts, fields).SerializeToString()


@given(int32s, int64s, st.dictionaries(texts, texts, max_size=12))
def test_record_parses_identically(dt, ts, fields):
    # Map order differs between runtimes (Go sorts keys byte-wise, upb keeps
    # insertion order, or puts "ab" before "a" when deterministic), so
    # compare what the library decodes from our bytes.
    ours = wire.encode_record(dt, ts, fields)
    parsed = pb.Record.FromString(ours)
    assert (parsed.data_type, parsed.timestamp, dict(parsed.data.fields)) == (dt, ts, fields)
    assert len(ours) == len(lib_record(dt, ts, fields).SerializeToString())
    assert wire.decode_record(ours) == (dt, ts, fields)


@given(int32s, int64s, st.dictionaries(texts, texts, max_size=5))
def test_decode_record_reads_library_output(dt, ts, fields):
    assert wire.decode_record(lib_record(dt, ts, fields).SerializeToString()) == (dt, ts, fields)


header_args = st.tuples(texts, st.lists(texts, max_size=5), st.lists(texts, max_size=3),
                        st.lists(texts, max_size=5), st.lists(texts, max_size=3),
                        texts, texts, texts)


@settings(max_examples=200)
@given(header_args, st.lists(st.tuples(int32s, int64s,
                                       st.dictionaries(texts, texts, min_size=1, max_size=1)),
                             max_size=20))
def test_packaged_data_identical_to_protobuf(h, recs):
    # Non-empty payloads: an empty one is "1a 00" in a Record (message
    # presence) but omitted in an EncodedRecord (proto3 bytes); both parse
    # to the same empty Payload.
    agent_id, i4, e4, i6, e6, hostname, version, product = h
    bodies = [wire.encode_record(*r) for r in recs]
    ours = wire.packaged_data(bodies, wire.encode_header(*h))
    lib = pb.PackagedData(
        records=[pb.EncodedRecord(data_type=dt, timestamp=ts,
                                  data=pb.Payload(fields=f).SerializeToString())
                 for dt, ts, f in recs],
        agent_id=agent_id, intranet_ipv4=i4, extranet_ipv4=e4, intranet_ipv6=i6,
        extranet_ipv6=e6, hostname=hostname, version=version, product=product)
    assert ours == lib.SerializeToString()


def test_record_forwarded_as_encoded_record():
    # docs/protocol.md section 1: a plugin's Record body is a valid EncodedRecord.
    body = lib_record(2001, 1700000000, {"exe": "/bin/sh", "pid": "1"}).SerializeToString()
    msg = pb.PackagedData.FromString(wire.packaged_data([body, body], b""))
    assert len(msg.records) == 2
    assert msg.records[0].data_type == 2001
    assert dict(pb.Payload.FromString(msg.records[0].data).fields) == {"exe": "/bin/sh", "pid": "1"}


def test_large_lengths_use_full_varints():
    body = wire.encode_record(1, 1, {"k": "x" * 70000})
    msg = pb.PackagedData.FromString(wire.packaged_data([body], b""))
    assert len(msg.records[0].data) > 70000
    assert wire.varint(300) == b"\xac\x02"
    assert wire.varint(-1) == b"\xff" * 9 + b"\x01"


@given(int32s, texts, texts, texts)
def test_task_bytes_identical(dt, name, data, token):
    lib = pb.Task(data_type=dt, object_name=name, data=data, token=token).SerializeToString()
    assert wire.encode_task(dt, name, data, token) == lib
    assert wire.decode_task(lib) == (dt, name, data, token)


def test_frame():
    assert wire.frame(b"abc") == struct.pack("<I", 3) + b"abc"


def test_known_field_with_other_wire_type_is_unknown_like_protobuf():
    body = b"\x0a\x00" + b"\x0d\x01\x02\x03\x04" + wire.encode_record(7, 0, {})
    assert wire.decode_record(body) == (7, 0, {})
    assert pb.Record.FromString(body).data_type == 7


def test_unknown_fields_and_missing_fields_are_fine():
    body = b"\x28\x05" + wire.len_field(9, b"zz") + wire.encode_record(0, 0, {"a": "b"})
    assert wire.decode_record(body) == (0, 0, {"a": "b"})
    assert wire.decode_record(b"") == (0, 0, {})
    assert wire.decode_record(b"\x08\x01", deep=False) == (1, 0, None)


@pytest.mark.parametrize("bad", [
    b"\x08",                       # truncated varint
    b"\x1a\x05ab",                 # length past the end
    b"\x1b",                       # start group
    b"\x00\x01",                   # field 0
    b"\x08" + b"\xff" * 10 + b"\x01",  # varint too long
    b"\x1a\x04\x0a\x02\x0a\x80",   # map key truncated inside
    b"\x1a\x06\x0a\x04\x0a\x02\xc3\x28",  # key not UTF-8
])
def test_malformed_records_raise_wire_error(bad):
    with pytest.raises(WireError):
        wire.decode_record(bad)


@given(st.binary(max_size=64))
def test_decoder_never_raises_anything_but_wire_error(data):
    try:
        wire.decode_record(data)
    except WireError:
        pass
    try:
        wire.decode_task(data)
    except WireError:
        pass


@given(st.binary(max_size=64))
def test_decoder_agrees_with_protobuf_on_validity(data):
    # Whatever the protobuf library accepts as a Record, we accept too and
    # read the same values.
    try:
        lib = pb.Record.FromString(data)
    except Exception:
        return
    try:
        ours = wire.decode_record(data)
    except WireError:
        # We reject groups, which proto3 parsers skip as unknown fields.
        assert any(b in data for b in (b"\x03", b"\x0b", b"\x13", b"\x1b", b"\x23"))
        return
    assert ours == (lib.data_type, lib.timestamp, dict(lib.data.fields))
