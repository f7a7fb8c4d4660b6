"""Plugin -> agent frames (sans-I/O): split, bound, validate.

A frame is ``u32 little-endian N`` + N bytes of a serialized ``Record``.
``FrameDecoder.feed`` takes whatever a pipe read returned and gives back the
complete bodies it contains, unchanged (slices of the input: the bytes that
go into the record queue are the bytes the plugin wrote), and the first
protocol error, if any. After an error the decoder is dead: nothing the
plugin sent after the bad point is ever returned.

Validation cost (200-byte record, 5 fields, this project's 2-vCPU VM):
``wire.decode_record(body, deep=True)`` ~32 us, ``deep=False`` ~5.6 us,
``check_record`` below ~0.8 us. The pipe -> gRPC path costs ~1.2 us per
record in total, so a deep parse would multiply the agent's CPU per record
by ~25 and a generic shallow one by ~5. ``check_record`` accepts exactly
what ``decode_record(body, deep=False)`` accepts (a differential test checks
that): the top level parses as protobuf (keys, varints, lengths in bounds).
That is precisely what makes the body a valid ``EncodedRecord`` inside
``PackagedData``, i.e. what AgentCenter parses; payload contents are the
consumer's business, as in Elkeid (whose agent forwards payload bytes
without looking at them). The fast path recognises the layout every SDK
emits with one regular expression and defers anything else to wire.py.
"""

import re
import struct

from .. import wire
from ..errors import PluginFault, WireError

_U32 = struct.Struct("<I")
_EMPTY = ()

# The layout every SDK emits: [08 varint] [10 varint] 1a len payload-to-end.
# Varints up to 9 bytes (63 bits) so no value can overflow; anything else
# takes the general path.
_CANONICAL = re.compile(
    rb"(?:\x08[\x80-\xff]{0,8}[\x00-\x7f])?(?:\x10[\x80-\xff]{0,8}[\x00-\x7f])?"
    rb"\x1a([\x80-\xff]{0,3}[\x00-\x7f])", re.S)


class FrameError(PluginFault):
    """A plugin broke the frame protocol."""


def check_record(body, _match=_CANONICAL.match):
    """Raise WireError unless ``body`` parses as a Record at the top level."""
    m = _match(body)
    if m is not None:
        end = m.end()
        start = m.start(1)
        width = end - start
        if width == 1:
            n = body[start]
        elif width == 2:
            n = (body[start] & 0x7F) | (body[start + 1] << 7)
        else:
            n = 0
            for i in range(width):
                n |= (body[start + i] & 0x7F) << (7 * i)
        if end + n == len(body):
            return
    wire.decode_record(body, deep=False)


class FrameDecoder:
    """Incremental frame splitter for one pipe."""

    __slots__ = ("max_frame", "validate", "error", "_parts", "_have", "_need")

    def __init__(self, max_frame, validate=True):
        self.max_frame = max_frame
        self.validate = validate
        self.error = None
        self._parts = []   # pending bytes of an incomplete frame
        self._have = 0
        self._need = 0     # bytes needed before _parts can yield something

    def buffered(self):
        return self._have

    def feed(self, data):
        """Returns (bodies, error): the complete frames in order and, if the
        stream broke here, a FrameError (bodies before the bad point are
        still returned)."""
        if self.error is not None:
            return _EMPTY, self.error
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return _EMPTY, None
            data = b"".join(self._parts)
            self._parts = []
            self._have = 0
        out = []
        pos = 0
        end = len(data)
        unpack = _U32.unpack_from
        max_frame = self.max_frame
        check = check_record if self.validate else None
        while end - pos >= 4:
            n = unpack(data, pos)[0]
            if n > max_frame:
                return out, self._fail("frame length %d (0x%08x) exceeds the maximum %d"
                                       % (n, n, max_frame))
            stop = pos + 4 + n
            if stop > end:
                self._need = 4 + n
                break
            body = data[pos + 4:stop]
            if check is not None:
                try:
                    check(body)
                except WireError as exc:
                    return out, self._fail("frame of %d bytes is not a Record: %s" % (n, exc))
            out.append(body)
            pos = stop
        else:
            self._need = 4
        if pos < end:
            rest = data[pos:] if pos else data
            self._parts = [rest]
            self._have = len(rest)
        return out, None

    def close(self):
        """End of stream: a FrameError if it stopped inside a frame."""
        if self.error is None and self._have:
            if self._have < 4:
                what = "%d of 4 header bytes" % self._have
            else:
                what = "%d of %d bytes" % (self._have - 4, self._need - 4)
            return self._fail("stream ended inside a frame (%s)" % what)
        return None

    def _fail(self, message):
        self.error = FrameError(message)
        self._parts = []
        self._have = 0
        return self.error


def task_frame(data_type, object_name, data, token):
    """``u32 LE length + Task`` for fd 3."""
    return wire.frame(wire.encode_task(data_type, object_name, data, token))
