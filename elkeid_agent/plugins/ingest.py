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

``split_frames`` is the loop over one buffer; ``native.pick`` swaps in the C
twin from ``accel/`` when it is active (same results, same error texts).
"""

import re
import struct

from .. import native, wire
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


# split_frames statuses (accel/elkeid_accel.c uses the same numbers).
SPLIT_COMPLETE, SPLIT_PARTIAL, SPLIT_TOO_LONG, SPLIT_NOT_RECORD = range(4)


def split_frames(data, max_frame, validate):
    """The complete frames at the start of ``data``: (bodies, pos, status,
    n, why). ``pos`` is where the first unused frame starts; ``status``
    says why the split stopped there: SPLIT_COMPLETE (fewer than 4 bytes
    left), SPLIT_PARTIAL (a frame of ``n`` body bytes is incomplete),
    SPLIT_TOO_LONG (its length ``n`` exceeds ``max_frame``) or
    SPLIT_NOT_RECORD (its ``n`` bytes fail ``check_record``: ``why``)."""
    out = []
    pos = 0
    end = len(data)
    unpack = _U32.unpack_from
    while end - pos >= 4:
        n = unpack(data, pos)[0]
        if n > max_frame:
            return out, pos, SPLIT_TOO_LONG, n, None
        stop = pos + 4 + n
        if stop > end:
            return out, pos, SPLIT_PARTIAL, n, None
        body = data[pos + 4:stop]
        if validate:
            try:
                check_record(body)
            except WireError as exc:
                return out, pos, SPLIT_NOT_RECORD, n, str(exc)
        out.append(body)
        pos = stop
    return out, pos, SPLIT_COMPLETE, 0, None


_split_frames = native.pick(split_frames, "split_frames")


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
        out, pos, status, n, why = _split_frames(data, self.max_frame, self.validate)
        if status == SPLIT_TOO_LONG:
            return out, self._fail("frame length %d (0x%08x) exceeds the maximum %d"
                                   % (n, n, self.max_frame))
        if status == SPLIT_NOT_RECORD:
            return out, self._fail("frame of %d bytes is not a Record: %s" % (n, why))
        self._need = 4 + n if status == SPLIT_PARTIAL else 4
        end = len(data)
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
