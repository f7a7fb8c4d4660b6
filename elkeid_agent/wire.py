"""Protobuf wire helpers for the hot path (sans-I/O, stdlib only).

A record travels as bytes from the plugin pipe to the gRPC write. This module
encodes the few messages the agent builds itself (Record, the PackagedData
header, Task frames) and validates bytes it forwards, without generated
classes: those cost 2-7 us per record, a splice costs well under 1 us.

Byte-exactness: fields in number order, proto3 zero values omitted, map
keys in byte-wise lexicographic order (what Go's deterministic marshalling
emits). For messages without maps, and maps of one entry, that is exactly
what the Python protobuf library produces; with several map entries the
runtimes disagree on order (upb's deterministic mode puts "ab" before "a";
its default mode keeps insertion order), so tests/test_wire.py checks with
hypothesis that the library parses our bytes to the same content, with the
same length.

Wire facts relied on (docs/protocol.md section 1): a serialized ``Record`` is also
a valid serialized ``EncodedRecord`` because field 3 is length-delimited in
both, so a plugin frame body is forwarded unchanged as one
``PackagedData.records`` entry: ``0x0a varint(N) body``.
"""

import struct

from . import native
from .errors import WireError

# Wire types.
VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5

_U32 = struct.Struct("<I")


def _make_varint_cache(limit):
    cache = []
    for n in range(limit):
        out = bytearray()
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        cache.append(bytes(out))
    return tuple(cache)


# Lengths of records and small ints hit this table instead of the loop.
# 16,384 entries (0.7 MB) pay only on the pure splice below; with the C
# splice the other callers (field tags, task frames) need one-byte values.
_VARINT_CACHE = _make_varint_cache(1 << 7 if native.ACTIVE else 1 << 14)
_CACHE_LIMIT = len(_VARINT_CACHE)


def varint(n):
    """Encode a non-negative int, or a negative int64/int32 as protobuf does
    (two's complement over 64 bits, 10 bytes)."""
    if 0 <= n < _CACHE_LIMIT:
        return _VARINT_CACHE[n]
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field, wire_type):
    return varint((field << 3) | wire_type)


def len_field(field, data):
    """A length-delimited field: key, length, bytes."""
    return tag(field, LEN) + varint(len(data)) + data


def _str_bytes(value):
    return value if isinstance(value, bytes) else value.encode("utf-8")


def encode_payload(fields):
    """Serialize ``Payload{map<string,string> fields = 1}`` with sorted keys.

    Map entries always carry key and value (that is what the protobuf
    runtimes emit for map entries, even for empty strings)."""
    parts = []
    for key in sorted(fields):
        k = _str_bytes(key)
        v = _str_bytes(fields[key])
        entry = b"\x0a" + varint(len(k)) + k + b"\x12" + varint(len(v)) + v
        parts.append(b"\x0a")
        parts.append(varint(len(entry)))
        parts.append(entry)
    return b"".join(parts)


def encode_record(data_type, timestamp, fields):
    """Serialize ``Record{data_type, timestamp, Payload data}``.

    The result is also a valid ``EncodedRecord`` and is what goes into the
    record queue. Field 3 is always present (an empty Payload is ``1a 00``),
    matching a Record whose ``data`` was set."""
    parts = []
    if data_type:
        parts.append(b"\x08" + varint(data_type))
    if timestamp:
        parts.append(b"\x10" + varint(timestamp))
    payload = encode_payload(fields)
    parts.append(b"\x1a" + varint(len(payload)) + payload)
    return b"".join(parts)


def encode_header(agent_id, intranet_ipv4, extranet_ipv4, intranet_ipv6,
                  extranet_ipv6, hostname, version, product):
    """The non-record fields of PackagedData (2..9), encoded once and reused
    for every message until a host fact changes."""
    parts = []
    if agent_id:
        parts.append(len_field(2, _str_bytes(agent_id)))
    for field, values in ((3, intranet_ipv4), (4, extranet_ipv4),
                          (5, intranet_ipv6), (6, extranet_ipv6)):
        for value in values:
            parts.append(len_field(field, _str_bytes(value)))
    for field, value in ((7, hostname), (8, version), (9, product)):
        if value:
            parts.append(len_field(field, _str_bytes(value)))
    return b"".join(parts)


def packaged_data(records, header):
    """Splice record bodies and a cached header into PackagedData bytes.

    Records come first because field 1 precedes the header fields; that keeps
    the output identical to the protobuf library's."""
    parts = []
    append = parts.append
    cache = _VARINT_CACHE
    for body in records:
        n = len(body)
        append(b"\x0a")
        append(cache[n] if n < _CACHE_LIMIT else varint(n))
        append(body)
    append(header)
    return b"".join(parts)


packaged_data = native.pick(packaged_data, "packaged_data")


def packaged_size(record_len):
    """Bytes one record of ``record_len`` adds to a PackagedData message."""
    return 1 + len(varint(record_len)) + record_len


def encode_task(data_type, object_name, data, token):
    """Serialize ``Task`` (the body of an agent -> plugin frame)."""
    parts = []
    if data_type:
        parts.append(b"\x08" + varint(data_type))
    for field, value in ((2, object_name), (3, data), (4, token)):
        if value:
            parts.append(len_field(field, _str_bytes(value)))
    return b"".join(parts)


def frame(body):
    """``u32 little-endian length`` + body: the plugin pipe framing."""
    return _U32.pack(len(body)) + body


# ---------------------------------------------------------------- decoding

def read_varint(buf, pos):
    """Decode a varint at ``pos``; return (value, new_pos). At most 10 bytes."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result > 0xFFFFFFFFFFFFFFFF:
                raise WireError("varint overflows 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def iter_fields(buf):
    """Yield (field_number, wire_type, value) for each field in ``buf``.

    value is an int for VARINT/FIXED32/FIXED64 and a memoryview slice for LEN.
    Groups are rejected (no Elkeid message uses them, and proto3 forbids
    them)."""
    view = memoryview(buf)
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = read_varint(view, pos)
        field = key >> 3
        wire_type = key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(view, pos)
        elif wire_type == LEN:
            n, pos = read_varint(view, pos)
            if n > end - pos:
                raise WireError("length-delimited field runs past the end")
            value = view[pos:pos + n]
            pos += n
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            value = int.from_bytes(view[pos:pos + 8], "little")
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            value = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
        else:
            raise WireError("unsupported wire type %d" % wire_type)
        yield field, wire_type, value


def _as_int32(v):
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _as_int64(v):
    return v - (1 << 64) if v & (1 << 63) else v


def _utf8(view, what):
    try:
        return bytes(view).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("%s is not valid UTF-8" % what) from None


# A known field arriving with another wire type is an unknown field to the
# protobuf runtimes (upb, protobuf-go): it is skipped, not an error. The
# decoders below do the same so they accept exactly what the server accepts.

def decode_payload(buf):
    """Parse a Payload into a dict (later duplicate keys win, as in protobuf)."""
    fields = {}
    for field, wire_type, value in iter_fields(buf):
        if field != 1 or wire_type != LEN:
            continue
        key = val = ""
        for efield, ewire, evalue in iter_fields(value):
            if efield in (1, 2) and ewire == LEN:
                if efield == 1:
                    key = _utf8(evalue, "map key")
                else:
                    val = _utf8(evalue, "map value")
        fields[key] = val
    return fields


def decode_record(body, deep=True):
    """Validate a serialized Record and return (data_type, timestamp, fields).

    Missing fields take proto3 defaults; unknown fields are skipped. With
    ``deep=False`` the payload is only checked to be length-delimited and
    ``fields`` is None: that is the cheap check for forwarding."""
    data_type = 0
    timestamp = 0
    payload = None
    for field, wire_type, value in iter_fields(body):
        if field == 1 and wire_type == VARINT:
            data_type = _as_int32(value)
        elif field == 2 and wire_type == VARINT:
            timestamp = _as_int64(value)
        elif field == 3 and wire_type == LEN:
            payload = value
    fields = None
    if deep:
        fields = decode_payload(payload) if payload is not None else {}
    return data_type, timestamp, fields


def decode_task(body):
    """Parse a Task body into (data_type, object_name, data, token)."""
    data_type = 0
    strings = {2: "", 3: "", 4: ""}
    for field, wire_type, value in iter_fields(body):
        if field == 1 and wire_type == VARINT:
            data_type = _as_int32(value)
        elif field in strings and wire_type == LEN:
            strings[field] = _utf8(value, "Task field %d" % field)
    return data_type, strings[2], strings[3], strings[4]
