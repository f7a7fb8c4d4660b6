"""The disk spool: plugin records the memory queue cannot hold (the stream
is down, or slower than the producers), kept on disk in order until the
stream takes them, across restarts and SIGKILL (README "Where a record
goes", docs/operations.md "The disk spool").

Files in the spool directory (``<workdir>/spool`` by default):
``NNNNNNNNNNNNNNNN.seg`` append-only segments, oldest first; ``cursor``,
how far the stream has settled (records written to it and aged out of the
transport's replay window); ``quarantine/``, segments this version cannot
read (another version's, a foreign file), kept for a person and counted
against the quota.

Format, as pure functions without I/O (property-tested)::

    segment = header frame*
    header  = "ELKSPOOL" u8 version  u8 n  codec name (n ASCII bytes)  u32 crc32
    frame   = u32 stored  u32 crc  u32 count  u32 raw  i64 first  i64 last
              i64 sealed_ms  payload (``stored`` bytes)
    payload = codec(u32 length * count, then the record bodies)

Integers are little-endian. ``crc`` is crc32 over ``stored``, the fields
after ``crc`` and the payload; ``first``/``last`` are the Record timestamps
of the frame's first and last record, ``sealed_ms`` the wall time it was
sealed. The codec is per segment: ``snappy`` when python-snappy imports,
else ``zlib`` (level 1); ``none`` is read too. A build without
python-snappy reads snappy segments with the pure-Python decoder here
(slower, only for that case), so either build reads what the other wrote.

The shell, ``Spool``, lives on the event loop; every file write, fsync,
rename and delete runs in order on its one I/O thread. The loop's
bookkeeping never waits for that thread: a frame is encoded on the loop,
gets its segment and offset at once and keeps its records in memory until
the thread reports it written, so a reader that catches up with the writer
reads them from memory. Reads of older frames are one bounded ``pread``
of one frame (at most ``FRAME_RAW_BYTES`` before compression).

Crash safety: spilled records wait in memory for at most ``SEAL_SECONDS``
or ``FRAME_RAW_BYTES``, then go to the I/O thread, which writes at once;
written data survives SIGKILL (it is in the page cache) and is fsynced
every ``FSYNC_INTERVAL`` together with the cursor, so a power loss costs at
most that interval more. The cursor only moves past records the stream
settled; a segment is deleted once the cursor is past all of it. After a
restart the records after the cursor are sent again: duplicates bounded
by the replay window plus one fsync interval, never a gap.

Failures (a full disk, an unwritable or vanished directory, a write that
fails) stop spooling: records past the memory budget are dropped by the
queue and counted, frames not yet written stay in memory and are still
sent, the agent is abnormal (key ``spool``) with the reason, and the
spool tries a fresh segment every ``RETRY_SECONDS``.
"""

import asyncio
import collections
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib

from .. import native
from .drops import DropLog, record_time

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAGIC = b"ELKSPOOL"
VERSION = 1
FRAME = struct.Struct("<IIIIqqq")
_U32 = struct.Struct("<I")
_SEGMENT_NAME = re.compile(r"^(\d{16})\.seg$")
CURSOR = "cursor"
QUARANTINE = "quarantine"

# Frames: big enough that compression and a write cost little per record
# (~1300 records of 200 bytes), small enough that one read or one encode
# holds the loop for about a millisecond.
FRAME_RAW_BYTES = 256 * 1024
# The SIGKILL loss window: records spilled in the last SEAL_SECONDS (at
# most FRAME_RAW_BYTES) plus frames the I/O thread has not written (none
# unless the disk is slower than the producers, at most BACKLOG_BYTES).
SEAL_SECONDS = 0.25
BACKLOG_BYTES = 16 * MiB
# Power loss adds what was written since the last fsync.
FSYNC_INTERVAL = 1.0
RETRY_SECONDS = 30.0
# Sealing has its own timer, so the tick only has to meet the fsync
# interval; with nothing written since the last sync, the I/O thread's trip
# (which also checks that the directory is still ours) is made this often.
TICK_SECONDS = FSYNC_INTERVAL
IDLE_CHECK_SECONDS = 10.0
# Segments are the unit of deletion and of quota drops: an eighth of the
# quota, so a drop loses an eighth at most, and at most 8 MiB.
SEGMENT_MAX_BYTES = 8 * MiB
SEGMENT_MIN_BYTES = 64 * 1024
# Never more than this share of the free space the filesystem had at open
# (the spool's own segments counted as free): the host needs its disk.
FREE_SHARE = 0.5
DEFAULT_MAX_MB = 1024
# A frame header claiming more than this is damage, not data.
MAX_FRAME_BYTES = 64 * MiB


class CorruptFrame(Exception):
    """A frame that must not reach the stream; ``reason`` labels the count."""

    def __init__(self, reason, text):
        super().__init__(text)
        self.reason = reason


class SegmentError(Exception):
    """A segment header this version cannot use (``reason``: truncated,
    magic, version, codec, header_crc)."""

    def __init__(self, reason, text):
        super().__init__(text)
        self.reason = reason


# ---------------------------------------------------------------- codecs

def _import_snappy():
    try:
        import snappy
        if snappy.decompress(snappy.compress(b"elkeid")) != b"elkeid":
            return None
        return snappy
    except Exception:  # absent, or a broken build of it: the stdlib codec serves
        return None


SNAPPY = _import_snappy()
CODEC_NAMES = ("snappy", "zlib", "none")


class Codec:
    """``compress(raw) -> bytes`` (None when this build cannot write the
    codec) and ``decompress(data, raw_len) -> bytes`` (CorruptFrame unless
    the result is exactly ``raw_len`` bytes)."""

    __slots__ = ("name", "compress", "decompress")

    def __init__(self, name, compress, decompress):
        self.name = name
        self.compress = compress
        self.decompress = decompress


def _exact(out, raw_len, name):
    if len(out) != raw_len:
        raise CorruptFrame("codec", "%s gave %d bytes, the frame says %d" % (name, len(out), raw_len))
    return out


def _zlib_decompress(data, raw_len):
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, raw_len + 1)  # bounded: a lying header cannot balloon
    except zlib.error as e:
        raise CorruptFrame("codec", "zlib: %s" % e) from None
    return _exact(out, raw_len, "zlib")


def _snappy_length(data):
    n = shift = pos = 0
    while True:
        if pos >= len(data) or pos > 4:
            raise CorruptFrame("codec", "snappy: bad length prefix")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def snappy_decompress_py(data):
    """Decode raw snappy (the block format python-snappy's ``compress``
    writes) in pure Python, for a build without python-snappy."""
    n, pos = _snappy_length(data)
    out = bytearray()
    end = len(data)
    try:
        while pos < end:
            tag = data[pos]
            pos += 1
            kind = tag & 3
            if kind == 0:
                length = tag >> 2
                if length >= 60:
                    extra = length - 59
                    length = int.from_bytes(data[pos:pos + extra], "little")
                    pos += extra
                length += 1
                if pos + length > end:
                    raise CorruptFrame("codec", "snappy: literal runs past the end")
                out += data[pos:pos + length]
                pos += length
                continue
            if kind == 1:
                length = ((tag >> 2) & 7) + 4
                offset = ((tag >> 5) << 8) | data[pos]
                pos += 1
            elif kind == 2:
                length = (tag >> 2) + 1
                offset = int.from_bytes(data[pos:pos + 2], "little")
                pos += 2
            else:
                length = (tag >> 2) + 1
                offset = int.from_bytes(data[pos:pos + 4], "little")
                pos += 4
            if pos > end or not 0 < offset <= len(out):
                raise CorruptFrame("codec", "snappy: copy before the start")
            start = len(out) - offset
            if offset >= length:
                out += out[start:start + length]
            else:  # overlapping copy: the last ``offset`` bytes repeat
                pattern = bytes(out[start:])
                reps, rest = divmod(length, offset)
                out += pattern * reps + pattern[:rest]
            if len(out) > n:
                raise CorruptFrame("codec", "snappy: output longer than declared")
    except IndexError:
        raise CorruptFrame("codec", "snappy: truncated element") from None
    if len(out) != n:
        raise CorruptFrame("codec", "snappy: %d bytes, declared %d" % (len(out), n))
    return bytes(out)


def get_codec(name, snappy_module=SNAPPY):
    """The codec called ``name``; KeyError for one this version does not know."""
    if name == "none":
        return Codec("none", bytes, lambda data, raw_len: _exact(bytes(data), raw_len, "none"))
    if name == "zlib":
        return Codec("zlib", lambda raw: zlib.compress(raw, 1), _zlib_decompress)
    if name == "snappy":
        def decompress(data, raw_len):
            if _snappy_length(data)[0] != raw_len:
                raise CorruptFrame("codec", "snappy: declared length is not the frame's")
            if snappy_module is None:
                return snappy_decompress_py(data)
            try:
                return _exact(snappy_module.decompress(bytes(data)), raw_len, "snappy")
            except CorruptFrame:
                raise
            except Exception as e:
                raise CorruptFrame("codec", "snappy: %s" % e) from None
        return Codec("snappy", snappy_module.compress if snappy_module is not None else None,
                     decompress)
    raise KeyError(name)


def default_codec_name(snappy_module=SNAPPY):
    return "snappy" if snappy_module is not None else "zlib"


# ---------------------------------------------------------------- frames

def pack_records(records):
    """u32 length of each record, then the records."""
    return struct.pack("<%dI" % len(records), *map(len, records)) + b"".join(records)


def unpack_records(raw, count):
    if count * 4 > len(raw):
        raise CorruptFrame("lengths", "%d record lengths do not fit in %d bytes" % (count, len(raw)))
    lengths = struct.unpack_from("<%dI" % count, raw, 0)
    pos = count * 4
    if pos + sum(lengths) != len(raw):
        raise CorruptFrame("lengths", "record lengths do not add up to the frame")
    out = []
    append = out.append
    for n in lengths:
        append(raw[pos:pos + n])
        pos += n
    return out


pack_records = native.pick(pack_records, "pack_records")
unpack_records = native.pick(unpack_records, "unpack_records")


def _frame_crc(head, payload):
    return zlib.crc32(payload, zlib.crc32(head[8:FRAME.size], zlib.crc32(head[:4])))


def encode_frame(records, codec, sealed_ms=0, first=0, last=0):
    """One frame of ``records`` (a non-empty list of bytes)."""
    raw = pack_records(records)
    payload = codec.compress(raw)
    head = FRAME.pack(len(payload), 0, len(records), len(raw), first, last, sealed_ms)
    crc = _frame_crc(head, payload)
    return b"".join((head[:4], _U32.pack(crc), head[8:], payload))


class FrameHeader(collections.namedtuple(
        "FrameHeader", "stored crc count raw first last sealed_ms")):
    __slots__ = ()

    @property
    def size(self):
        return FRAME.size + self.stored


def parse_frame_header(buf, pos=0):
    if len(buf) - pos < FRAME.size:
        raise CorruptFrame("torn", "frame header cut short")
    h = FrameHeader(*FRAME.unpack_from(buf, pos))
    if not 0 < h.count <= h.raw // 4 or h.raw > MAX_FRAME_BYTES or h.stored > MAX_FRAME_BYTES:
        raise CorruptFrame("header", "implausible frame header %r" % (h,))
    return h


def decode_frame(buf, codec, pos=0):
    """(FrameHeader, records) of the frame at ``pos`` of ``buf``; the crc
    and every length are checked, nothing corrupt comes out."""
    h = parse_frame_header(buf, pos)
    end = pos + h.size
    if len(buf) < end:
        raise CorruptFrame("torn", "frame runs past the end")
    head = bytes(buf[pos:pos + FRAME.size])
    payload = buf[pos + FRAME.size:end]
    if _frame_crc(head, payload) != h.crc:
        raise CorruptFrame("crc", "frame checksum mismatch")
    return h, unpack_records(codec.decompress(payload, h.raw), h.count)


# ---------------------------------------------------------------- segments

def encode_segment_header(codec_name, version=VERSION):
    name = codec_name.encode("ascii")
    body = MAGIC + bytes((version, len(name))) + name
    return body + _U32.pack(zlib.crc32(body))


SEGMENT_HEADER_MAX = len(MAGIC) + 2 + 255 + 4


def parse_segment_header(buf):
    """(codec name, header length); SegmentError when this version cannot
    read the segment."""
    fixed = len(MAGIC) + 2
    if len(buf) < fixed:
        raise SegmentError("truncated", "segment header cut short")
    if bytes(buf[:len(MAGIC)]) != MAGIC:
        raise SegmentError("magic", "not a spool segment")
    version, n = buf[len(MAGIC)], buf[len(MAGIC) + 1]
    if len(buf) < fixed + n + 4:
        raise SegmentError("truncated", "segment header cut short")
    body = bytes(buf[:fixed + n])
    if _U32.unpack_from(buf, fixed + n)[0] != zlib.crc32(body):
        raise SegmentError("header_crc", "segment header checksum mismatch")
    if version != VERSION:
        raise SegmentError("version", "segment format version %d (this agent reads %d)"
                           % (version, VERSION))
    name = body[fixed:].decode("ascii", "replace")
    if name not in CODEC_NAMES:
        raise SegmentError("codec", "unknown codec %r" % name)
    return name, fixed + n + 4


SegmentScan = collections.namedtuple("SegmentScan", "codec header_len frames end problem")


def scan_segment(read, size, verify):
    """Walk one segment through ``read(offset, n) -> bytes``: the frames
    [(offset, FrameHeader)] up to the last good one, where they end, and
    why the walk stopped before ``size`` (None, "torn", "header", "crc").
    ``verify`` reads every payload for its crc (the newest segment, the one
    a crash can tear): bad frames at the end are cut, a bad one followed by
    good ones stays listed (damage, not a tear: its read drops it, counted,
    and the good ones after it are kept). Without ``verify`` headers and
    lengths are checked and the crc waits for the frame's read.
    SegmentError for a bad segment header."""
    codec, pos = parse_segment_header(read(0, min(size, SEGMENT_HEADER_MAX)))
    header_len = pos
    frames = []
    problem = None
    good_end, good_count = pos, 0
    while pos < size:
        head = read(pos, FRAME.size)
        try:
            h = parse_frame_header(head)
        except CorruptFrame as e:
            problem = e.reason
            break
        if pos + h.size > size:
            problem = "torn"
            break
        frames.append((pos, h))
        pos += h.size
        if verify and _frame_crc(head, read(pos - h.stored, h.stored)) != h.crc:
            problem = "crc"
            continue
        good_end, good_count = pos, len(frames)
    if verify and good_end < pos:
        del frames[good_count:]
        pos = good_end
    elif problem == "crc":
        problem = None  # damage inside, not at the end: nothing to cut
    return SegmentScan(codec, header_len, frames, pos, problem)


def encode_cursor(segment, offset, index):
    body = b"elkeid-spool-cursor 1 %d %d %d" % (segment, offset, index)
    return body + b" %08x\n" % zlib.crc32(body)


def parse_cursor(data):
    """(segment, offset, index), or None for anything but a sound cursor."""
    try:
        body, _sp, crc = data.rstrip(b"\n").rpartition(b" ")
        words = body.split(b" ")
        if len(words) != 5 or words[:2] != [b"elkeid-spool-cursor", b"1"] \
                or int(crc, 16) != zlib.crc32(body):
            return None
        seg, off, idx = (int(w) for w in words[2:])
    except ValueError:
        return None
    return (seg, off, idx) if min(seg, off, idx) >= 0 else None


def segment_name(number):
    return "%016d.seg" % number


# ---------------------------------------------------------------- I/O thread

class ThreadIO:
    """Jobs run one at a time, in order, on one daemon thread; each result
    comes back to the loop as ``done(result, error)``. Order is the point:
    a frame's write follows its segment's creation and precedes its
    deletion."""

    def __init__(self, loop, name="elkeid-spool"):
        self._loop = loop
        self._jobs = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, args=(), done=None):
        with self._cond:
            self._jobs.append((fn, args, done))
            self._cond.notify()

    def _work(self):
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                fn, args, done = self._jobs.popleft()
            try:
                result, error = fn(*args), None
            except Exception as e:  # reported to the loop, which decides
                result, error = None, e
            if done is not None:
                try:
                    self._loop.call_soon_threadsafe(done, result, error)
                except RuntimeError:  # the loop is gone: nobody to tell
                    pass

    def close(self, timeout):
        """Run what is queued, then end; False if it did not finish in time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class InlineIO:
    """The same jobs, run at once in the caller (unit tests, benchmark)."""

    def submit(self, fn, args=(), done=None):
        try:
            result, error = fn(*args), None
        except Exception as e:
            result, error = None, e
        if done is not None:
            done(result, error)

    def close(self, timeout):
        return True


class Vanished(OSError):
    """The spool directory was removed or replaced under the agent."""


class _Files:
    """The I/O thread's side: the segment being appended to, what needs an
    fsync, the cursor last written. Only that thread touches it."""

    def __init__(self, directory):
        self.dir = directory
        self.fd = None
        self.path = None
        self.dirty = False
        self.dir_dirty = False
        self.cursor = None
        self.identity = None

    def scan(self, verify_newest=True):
        """The blocking open: what is on disk, as a ``_Scan``."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        st = os.stat(self.dir)
        self.identity = (st.st_dev, st.st_ino)
        result = _Scan()
        names = []
        for name in os.listdir(self.dir):
            m = _SEGMENT_NAME.match(name)
            if m:
                names.append((int(m.group(1)), name))
        names.sort()
        for i, (number, name) in enumerate(names):
            path = os.path.join(self.dir, name)
            try:
                result.segments.append(self._scan_one(number, path, verify_newest and
                                                      i == len(names) - 1, result))
            except SegmentError as e:
                if e.reason == "truncated":  # created, then killed before its header was whole
                    _unlink(path)
                    result.cuts.append((name, "torn", 0))
                    continue
                try:
                    dest = self._quarantine(path, e)
                except OSError as moved:
                    result.unreadable.append((name, "%s; cannot move it aside: %s"
                                              % (e, moved.strerror or moved)))
                    continue
                result.quarantined.append((name, e.reason, str(e), dest))
            except OSError as e:
                result.unreadable.append((name, e.strerror or str(e)))
        result.segments = [s for s in result.segments if s is not None]
        try:
            with open(os.path.join(self.dir, CURSOR), "rb") as f:
                result.cursor = parse_cursor(f.read(256))
            result.cursor_bad = result.cursor is None
        except FileNotFoundError:
            pass
        try:
            _unlink(os.path.join(self.dir, CURSOR + ".tmp"))
        except OSError:  # a read-only spool: what it holds is still read
            pass
        result.quarantine_bytes = quarantine_bytes(self.dir)
        vfs = os.statvfs(self.dir)
        result.free_bytes = vfs.f_bavail * vfs.f_frsize
        return result

    def _scan_one(self, number, path, verify, result):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size

            def read(offset, n):
                return os.pread(f.fileno(), n, offset)
            s = scan_segment(read, size, verify)
        if s.problem is not None:
            # Cut at the last good frame, so the segment is sound again (on
            # a read-only spool the frames before the cut are read anyway).
            result.cuts.append((os.path.basename(path), s.problem, size - s.end))
            try:
                with open(path, "rb+") as f:
                    f.truncate(s.end)
                    os.fsync(f.fileno())
            except OSError:
                pass
        if not s.frames:
            _unlink(path)
            return None
        return (number, path, s.end, s.codec, s.frames)

    def _quarantine(self, path, error):
        qdir = os.path.join(self.dir, QUARANTINE)
        os.makedirs(qdir, mode=0o700, exist_ok=True)
        dest = os.path.join(qdir, "%s.%s" % (os.path.basename(path), error.reason))
        os.replace(path, dest)
        self.dir_dirty = True
        return dest

    def create(self, path, header):
        self.finish()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, header, 0)
        except OSError:
            os.close(fd)
            _unlink(path)
            raise
        self.fd, self.path = fd, path
        self.dirty = self.dir_dirty = True

    def write(self, path, offset, data):
        if self.fd is None or self.path != path:
            raise OSError(errno.EBADF, "segment %s is not open for writing (an earlier write "
                          "failed)" % os.path.basename(path))
        try:
            _write_all(self.fd, data, offset)
        except OSError:
            # Cut the partial frame and write nothing more here: the loop
            # gave every later frame an offset that assumed this one.
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                pass
            self.abandon()
            raise
        self.dirty = True

    def finish(self):
        """fsync and close the segment being appended to."""
        fd, self.fd, self.path = self.fd, None, None
        if fd is not None:
            try:
                if self.dirty:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self.dirty = False

    def abandon(self):
        fd, self.fd, self.path = self.fd, None, None
        if fd is not None:
            os.close(fd)

    def sync(self, cursor):
        """fsync what was written, then write the cursor (only after the
        data it points past is durable), then the directory."""
        if self.fd is not None and self.dirty:
            os.fsync(self.fd)
            self.dirty = False
        if cursor is not None and cursor != self.cursor:
            tmp = os.path.join(self.dir, CURSOR + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, cursor, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.dir, CURSOR))
            self.cursor = cursor
            self.dir_dirty = True
        try:
            st = os.stat(self.dir)
        except FileNotFoundError:
            raise Vanished(errno.ENOENT, "directory vanished") from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise Vanished(errno.ENOENT, "directory was replaced")
        if self.dir_dirty:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.dir_dirty = False

    def delete(self, path):
        _unlink(path)
        self.dir_dirty = True

    def close(self, cursor):
        try:
            self.sync(cursor)
        finally:
            self.finish()

    def probe(self, room):
        """Can the spool be used again? The directory is recreated and
        must have ``room`` bytes free (a full disk that frees a few bytes
        would only fail again); the caller then creates a fresh segment."""
        self.abandon()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        st = os.stat(self.dir)
        self.identity = (st.st_dev, st.st_ino)
        self.cursor = None
        vfs = os.statvfs(self.dir)
        if vfs.f_bavail * vfs.f_frsize < room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return quarantine_bytes(self.dir)


def _write_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def quarantine_bytes(directory):
    total = 0
    try:
        with os.scandir(os.path.join(directory, QUARANTINE)) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return 0
    return total


class _Scan:
    """What the open found: segments [(number, path, size, codec, frames)],
    cuts [(name, reason, bytes)], quarantined [(name, reason, text, dest)],
    unreadable [(name, error)], the cursor, free and quarantine bytes."""

    def __init__(self):
        self.segments = []
        self.cuts = []
        self.quarantined = []
        self.unreadable = []
        self.cursor = None
        self.cursor_bad = False
        self.free_bytes = 0
        self.quarantine_bytes = 0


# ---------------------------------------------------------------- the spool

class _Segment:
    __slots__ = ("number", "path", "size", "codec", "live")

    def __init__(self, number, path, size, codec):
        self.number = number
        self.path = path
        self.size = size
        self.codec = codec
        self.live = 0  # frames of it still held (unread or not yet settled)


class _Frame:
    """One frame: where it is (``seg``/``offset``; ``seg`` None for a frame
    only in memory), what it holds, its encoded bytes until they are
    written (or for good, if the write failed), and its records while they
    are being read (or for good, for a frame never meant for the disk)."""

    __slots__ = ("fid", "seg", "offset", "length", "count", "nbytes", "first", "last",
                 "sealed", "records", "data", "on_disk")

    def __init__(self, fid, count, nbytes, first, last, sealed):
        self.fid = fid
        self.count = count
        self.nbytes = nbytes
        self.first = first
        self.last = last
        self.sealed = sealed
        self.seg = None
        self.offset = 0
        self.length = 0
        self.records = None
        self.data = None
        self.on_disk = False

    @property
    def rereadable(self):
        """Its records can be dropped from memory and decoded again."""
        return self.on_disk or self.data is not None


class Mark:
    """The records one ``take`` returned: (fid, index) positions from
    ``start`` up to ``end``; ``settled`` once the stream is done with them."""

    __slots__ = ("start", "end", "settled")

    def __init__(self, start, end):
        self.start = start
        self.end = end
        self.settled = False


class Spool:
    """See the module docstring. The queue's seam: ``available``,
    ``spill(bodies, nbytes)``, ``pending()``, ``take(max_records,
    max_bytes, must_fit)``, ``unread(mark)`` and ``settled(mark)``. The
    agent: ``start()`` (or ``open_now()``), ``run()`` (the timer),
    ``close()``."""

    def __init__(self, directory, max_bytes, metrics, state, codec_name=None, io=None,
                 clock=time.monotonic, wall=time.time, free_share=FREE_SHARE,
                 frame_bytes=FRAME_RAW_BYTES, snappy_module=SNAPPY, retry_seconds=RETRY_SECONDS,
                 fsync_interval=FSYNC_INTERVAL, backlog_bytes=BACKLOG_BYTES):
        self.dir = directory
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.state = state
        self.codec = get_codec(codec_name or default_codec_name(snappy_module), snappy_module)
        if self.codec.compress is None:
            raise ValueError("this build cannot write %s segments" % self.codec.name)
        self._header_len = len(encode_segment_header(self.codec.name))
        self._snappy = snappy_module
        self._io = io
        self._clock = clock
        self._wall = wall
        self.free_share = free_share
        self.frame_bytes = frame_bytes
        self.retry_seconds = retry_seconds
        self.fsync_interval = fsync_interval
        self.backlog_bytes = backlog_bytes
        self.quota = 0
        self.segment_bytes = SEGMENT_MAX_BYTES
        self.available = False
        self.drops = DropLog("spool")
        self._files = _Files(directory)
        self._ready = False
        self._closed = False
        self._fault = None           # why spooling is off, or None
        self._blocked = False        # the quarantine leaves no room for a segment
        self._quarantine_bytes = 0
        self._segments = collections.deque()   # _Segment, oldest first
        self._active = None          # the segment frames are appended to
        self._next_seg = 1
        self._frames = collections.deque()     # _Frame, oldest first, contiguous fids
        self._base = 0               # fid of _frames[0]
        self._next_fid = 0
        self._rpos = (0, 0)          # the reader: (fid, index) of the next record
        self._cpos = (0, 0)          # settled up to here
        self._marks = collections.deque()
        self._tail = []              # spilled, not yet in a frame
        self._tail_bytes = 0
        self._tail_since = 0.0
        self._tail_wall = 0.0
        self._loop = None            # set by start(): the seal timer runs on it
        self._seal_timer = None
        self._pending = 0            # records not yet taken (frames and tail)
        self._backlog = 0            # record bytes sealed but not yet written
        self.disk_bytes = 0          # segment bytes (quarantine apart)
        self._read_seg = None
        self._read_fd = None
        self._read_failed = None
        self._next_sync = 0.0
        self._next_retry = 0.0
        self._unsynced = False       # a write, create or delete since the last sync
        self._synced_cursor = None   # the cursor the last sync was given
        self._next_idle_check = 0.0
        self._rate = collections.deque(maxlen=11)  # (time, records taken so far)
        self._taken_total = 0
        m = metrics
        m.describe("spool_spilled_records", "records written to the disk spool")
        m.describe("spool_replayed_records", "records taken from the disk spool for the stream")
        m.describe("spool_dropped_records", "records the disk spool lost, by reason")
        m.describe("spool_dropped_bytes", "bytes the disk spool lost, by reason")
        m.describe("spool_cut_bytes", "bytes cut from torn or corrupt segment tails at open")
        m.describe("spool_corrupt_frames", "frames found damaged, by reason; none is ever sent")
        m.describe("spool_quarantined_segments", "segments this version cannot read, set aside")
        m.describe("spool_errors", "spool file operations that failed, by operation")
        m.set("spool_records", self.pending)
        m.set("spool_bytes", lambda: self.disk_bytes)
        m.set("spool_quota_bytes", lambda: self.quota)
        m.set("spool_quarantine_bytes", lambda: self._quarantine_bytes)
        m.set("spool_available", lambda: 1 if self.available else 0)
        m.set("spool_oldest_age_seconds", self.oldest_age)
        m.set("spool_replay_rate", self.replay_rate)

    # ------------------------------------------------------------ opening

    async def start(self):
        """Open on the I/O thread (never raises: a spool that cannot open
        leaves the agent on memory alone, abnormal, retrying)."""
        loop = self._loop = asyncio.get_running_loop()
        if self._io is None:
            self._io = ThreadIO(loop)
        opened = loop.create_future()

        def done(result, error):
            try:
                self._opened(result, error)
            finally:
                if not opened.done():
                    opened.set_result(None)
        self._io.submit(self._files.scan, (), done)
        await opened

    def open_now(self):
        """Open in the caller (with ``InlineIO``)."""
        if self._io is None:
            self._io = InlineIO()
        self._io.submit(self._files.scan, (), self._opened)

    def _opened(self, scan, error):
        self._ready = True
        self._next_sync = self._clock() + self.fsync_interval
        if error is None:
            try:
                self._install(scan)
            except Exception as e:  # a bug must cost the spool, never the agent
                log.exception("spool: open failed")
                error = e
        if error is not None:
            self.quota = self.quota or self.max_bytes
            self._failed("open", error)
            return
        self._update_available()

    def _install(self, scan):
        existing = sum(s[2] for s in scan.segments)
        self._quarantine_bytes = scan.quarantine_bytes
        self.quota = min(self.max_bytes,
                         int((scan.free_bytes + existing + scan.quarantine_bytes) * self.free_share))
        self.segment_bytes = max(SEGMENT_MIN_BYTES, min(SEGMENT_MAX_BYTES, self.quota // 8))
        log.info("spool %s: quota %d MB (ELKEID_SPOOL_MAX_MB %d, half of %d MB free), codec %s",
                 self.dir, self.quota // MiB, self.max_bytes // MiB,
                 (scan.free_bytes + existing + scan.quarantine_bytes) // MiB, self.codec.name)
        for name, reason, nbytes in scan.cuts:
            self.metrics.inc("spool_corrupt_frames", reason=reason)
            self.metrics.inc("spool_cut_bytes", nbytes)
            log.warning("spool: cut %d bytes of %s at its last good frame (%s)", nbytes, name,
                        reason, extra={"console": True})
        for name, reason, text, dest in scan.quarantined:
            self.metrics.inc("spool_quarantined_segments", reason=reason)
            log.error("spool: %s cannot be read by this version (%s); moved to %s", name, text,
                      dest, extra={"console": True})
        for name, error in scan.unreadable:
            self.metrics.inc("spool_errors", op="open")
            log.error("spool: %s unreadable: %s; left where it is", name, error)
        if scan.unreadable:
            self.state.set_abnormal("spool:unreadable", "spool: %d file(s) in %s cannot be read "
                                    "or set aside (%s: %s)" % ((len(scan.unreadable), self.dir)
                                                               + scan.unreadable[0]))
        if scan.cursor_bad:
            self.metrics.inc("spool_corrupt_frames", reason="cursor")
            log.warning("spool: cursor file unreadable; sending every spooled record again")
        cseg, coff, cidx = scan.cursor or (0, 0, 0)
        # New segments number after the cursor's (whose file may be gone):
        # one below it would read as settled at the next start.
        self._next_seg = max(self._next_seg, cseg + 1)
        start_idx = None
        for number, path, size, codec_name, frames in scan.segments:
            self._next_seg = max(self._next_seg, number + 1)
            if number < cseg:  # settled before the restart
                self._submit_change(self._files.delete, (path,))
                continue
            seg = _Segment(number, path, size, get_codec(codec_name, self._snappy))
            for offset, h in frames:
                skip = 0
                if number == cseg and offset <= coff:
                    if offset < coff or cidx >= h.count:
                        continue
                    skip = cidx
                f = _Frame(self._next_fid, h.count, h.raw - 4 * h.count, h.first, h.last,
                           h.sealed_ms / 1000.0)
                f.seg, f.offset, f.length, f.on_disk = seg, offset, h.size, True
                if start_idx is None:
                    start_idx = skip
                self._next_fid += 1
                self._frames.append(f)
                seg.live += 1
                self._pending += h.count - skip
            if seg.live:
                self._segments.append(seg)
                self.disk_bytes += seg.size
            else:
                self._submit_change(self._files.delete, (path,))
        self._rpos = self._cpos = (self._base, start_idx or 0)
        if self._pending:
            log.info("spool %s: %d records from before the restart to send (%d bytes on disk)",
                     self.dir, self._pending, self.disk_bytes, extra={"console": True})
        self._note_quarantine()
        # A quota smaller than what is here (less free space than last
        # time) drops the oldest now; another version's files never do.
        self._make_room(0, quarantine=False)
        # The segment new frames go to, now: an unwritable directory shows
        # at start, not at the first outage.
        self._new_segment()

    # ------------------------------------------------------------ the queue's seam

    def _update_available(self):
        self.available = (self._ready and not self._closed and self._fault is None
                          and not self._blocked and self._backlog < self.backlog_bytes)

    def spill(self, bodies, nbytes):
        """Keep ``bodies`` (``nbytes`` in all), oldest first; False when
        the spool cannot take them now (the caller counts the drop)."""
        if not self.available:
            return False
        if not self._tail:
            self._tail_began()
        if self._tail_bytes + nbytes < self.frame_bytes:
            self._tail.extend(bodies)
            self._tail_bytes += nbytes
            self._pending += len(bodies)
            return True
        for body in bodies:  # a frame's worth or more: cut it into frames
            if not self._tail:
                self._tail_began()
            self._tail.append(body)
            self._tail_bytes += len(body)
            self._pending += 1
            if self._tail_bytes >= self.frame_bytes:
                self._seal(True)
        return True

    def _tail_began(self):
        self._tail_since = self._clock()
        self._tail_wall = self._wall()
        # SEAL_SECONDS is the loss window: a timer keeps it exact (the tick
        # alone would add up to its own period).
        if self._seal_timer is None and self._loop is not None:
            self._seal_timer = self._loop.call_later(SEAL_SECONDS, self._seal_due)

    def _seal_due(self):
        self._seal_timer = None
        if not self._tail or self._closed:
            return
        age = self._clock() - self._tail_since
        if age >= SEAL_SECONDS * 0.99:
            self._seal(True)
        else:  # sealed by size meanwhile: this is a younger tail
            self._seal_timer = self._loop.call_later(SEAL_SECONDS - age, self._seal_due)

    def pending(self):
        return self._pending

    def take(self, max_records, max_bytes, must_fit=False):
        """(records, Mark): up to ``max_records`` totalling at most
        ``max_bytes``, oldest first; one record even if larger, unless
        ``must_fit``. ([], None) when there is nothing to take."""
        out = []
        size = 0
        start = fid, idx = self._rpos
        frames = self._frames
        while len(out) < max_records:
            i = fid - self._base
            if i >= len(frames):
                if not self._tail:
                    break
                self._seal(False)  # read at once: no need to write it
                continue
            frame = frames[i]
            records = frame.records
            if records is None:
                records = self._load(frame, idx)
                if records is None:
                    fid, idx = fid + 1, 0
                    continue
            n = len(records)
            full = False
            while idx < n and len(out) < max_records:
                r = records[idx]
                if (out or must_fit) and size + len(r) > max_bytes:
                    full = True
                    break
                out.append(r)
                size += len(r)
                idx += 1
            if idx >= n:
                fid, idx = fid + 1, 0
                if frame.rereadable:
                    frame.records = None
            if full:
                break
        self._rpos = (fid, idx)
        if not out:
            return [], None
        self._pending -= len(out)
        mark = Mark(start, self._rpos)
        self._marks.append(mark)
        self._taken_total += len(out)
        self.metrics.inc("spool_replayed_records", len(out))
        now = self._clock()
        if not self._rate or now - self._rate[-1][0] >= 1.0:
            self._rate.append((now, self._taken_total))
        return out, mark

    def unread(self, mark):
        """The stream did not deliver ``mark``'s records: they are the next
        to be taken (call newest first when several go back)."""
        marks = self._marks
        while marks and marks[-1].start >= mark.start:
            marks.pop()
        pos = mark.start
        if pos[0] < self._base:  # dropped by the quota meanwhile
            pos = (self._base, 0)
        if pos < self._rpos:
            self._pending += self._records_between(pos, self._rpos)
            self._rpos = pos

    def settled(self, mark):
        """``mark``'s records left the stream and its replay window."""
        mark.settled = True
        marks = self._marks
        moved = False
        while marks and marks[0].settled:
            end = marks.popleft().end
            if end > self._cpos:
                self._cpos = end
                moved = True
        if moved:
            self._release()

    def _records_between(self, a, b):
        (fa, ia), (fb, ib) = a, b
        frames = self._frames
        total = 0
        for fid in range(fa, min(fb, self._base + len(frames))):
            total += frames[fid - self._base].count
        return total - ia + (ib if fb < self._base + len(frames) else 0)

    # ------------------------------------------------------------ frames

    def _seal(self, to_disk):
        records = self._tail
        if not records:
            return
        nbytes = self._tail_bytes
        self._tail = []
        self._tail_bytes = 0
        frame = _Frame(self._next_fid, len(records), nbytes, record_time(records[0]) or 0,
                       record_time(records[-1]) or 0, self._tail_wall)
        self._next_fid += 1
        frame.records = records
        self._frames.append(frame)
        self.metrics.inc("spool_spilled_records", len(records))
        # The backlog limit refuses new spills; what was accepted is written.
        if to_disk and self._ready and not self._closed and self._fault is None \
                and not self._blocked:
            self._write(frame)

    def _write(self, frame):
        data = encode_frame(frame.records, self.codec, int(frame.sealed * 1000), frame.first,
                            frame.last)
        seg = self._active
        if seg is None or (seg.size + len(data) > self.segment_bytes
                           and seg.size > self._header_len):
            seg = self._new_segment()
        if not self._make_room(len(data)):
            self._blocked = True
            self._update_available()
            self._note_quarantine()
            return  # kept in memory; the quarantine has the room
        frame.seg, frame.offset, frame.length = seg, seg.size, len(data)
        # Only the encoded bytes stay in memory until written: half the room.
        frame.data, frame.records = data, None
        seg.size += len(data)
        seg.live += 1
        self.disk_bytes += len(data)
        self._backlog += frame.nbytes
        self._update_available()
        self._submit_change(self._files.write, (seg.path, frame.offset, data),
                        lambda _r, error: self._written(frame, error))

    def _written(self, frame, error):
        self._backlog -= frame.nbytes
        held = frame.fid >= self._base  # not yet settled or dropped
        if error is None:
            frame.on_disk = True
            frame.data = None  # on disk now; read back from there when its turn comes
        else:
            # Still in memory: sent from there, only not crash-safe.
            seg = frame.seg
            frame.seg = None
            if seg is not None and held:
                seg.live -= 1
                seg.size -= frame.length
                self.disk_bytes -= frame.length
                if seg is self._active:
                    self._active = None
                if not seg.live:
                    self._forget_segment(seg)
            self._failed("write", error)
        self._update_available()

    def _new_segment(self):
        old = self._active
        number = self._next_seg
        self._next_seg += 1
        header = encode_segment_header(self.codec.name)
        seg = _Segment(number, os.path.join(self.dir, segment_name(number)), len(header),
                       self.codec)
        self._segments.append(seg)
        self.disk_bytes += seg.size
        self._active = seg
        if old is not None and not old.live:
            self._forget_segment(old)

        def created(_r, error):
            if error is not None:
                self._failed("create", error)
                if not seg.live:
                    self._forget_segment(seg, delete=False)
        self._submit_change(self._files.create, (seg.path, header), created)
        return seg

    def _forget_segment(self, seg, delete=True):
        try:
            self._segments.remove(seg)
        except ValueError:
            return
        self.disk_bytes -= seg.size
        if self._active is seg:
            self._active = None
        if self._read_seg is seg:
            self._close_read()
        if delete:
            self._submit_change(self._files.delete, (seg.path,), self._io_error("delete"))

    def _io_error(self, op):
        def done(_r, error):
            if error is not None:
                self.metrics.inc("spool_errors", op=op)
                log.warning("spool: %s failed: %s", op, _describe(error))
        return done

    def _load(self, frame, idx):
        """Read a frame back; None (counted, logged) if it is unreadable or
        damaged: its records are never sent."""
        seg = frame.seg
        try:
            if frame.data is not None:  # not written (yet): decode what is in memory
                _h, records = decode_frame(frame.data, self.codec)
                frame.records = records
                return records
            if self._read_seg is not seg:
                self._close_read()
                self._read_fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                self._read_seg = seg
            buf = os.pread(self._read_fd, frame.length, frame.offset)
            _h, records = decode_frame(buf, seg.codec)
        except OSError as e:
            self._lost_frame(frame, idx, "unreadable")
            self.metrics.inc("spool_errors", op="read")
            if self._read_failed is not seg:  # once per segment, not per frame
                self._read_failed = seg
                log.error("spool: cannot read %s: %s", seg.path, _describe(e))
            return None
        except CorruptFrame as e:
            self._lost_frame(frame, idx, "corrupt")
            self.metrics.inc("spool_corrupt_frames", reason=e.reason)
            log.error("spool: damaged frame at %s:%d (%s); its %d records are dropped",
                      seg.path if seg is not None else "memory", frame.offset, e,
                      frame.count - idx)
            return None
        if len(records) != frame.count:
            self._lost_frame(frame, idx, "corrupt")
            return None
        frame.records = records
        return records

    def _lost_frame(self, frame, idx, reason):
        self._lost(frame, idx, reason)
        # Empty from now on, so a rewind over it neither counts nor sends it again.
        frame.records, frame.count, frame.on_disk, frame.data = [], 0, False, None

    def _close_read(self):
        fd, self._read_fd, self._read_seg = self._read_fd, None, None
        if fd is not None:
            os.close(fd)

    def _lost(self, frame, idx, reason):
        n = frame.count - idx
        self._pending -= n
        nbytes = frame.nbytes * n // max(frame.count, 1)
        self.metrics.inc("spool_dropped_records", n, reason=reason)
        self.metrics.inc("spool_dropped_bytes", nbytes, reason=reason)
        self.drops.dropped(n, nbytes, reason, oldest=frame.first, newest=frame.last)

    # ------------------------------------------------------------ room and release

    def _make_room(self, nbytes, quarantine=True):
        """Drop the oldest segments until ``nbytes`` more fit the quota;
        False if even that is not enough (the segment being written and
        the quarantine are all there is)."""
        held = self._quarantine_bytes if quarantine else 0
        while self.disk_bytes + held + nbytes > self.quota:
            if not self._segments or self._segments[0] is self._active:
                return False
            self._drop_oldest_segment()
        return True

    def _drop_oldest_segment(self):
        seg = self._segments[0]
        frames = self._frames
        rfid, ridx = self._rpos
        while frames and frames[0].seg in (seg, None):
            f = frames.popleft()
            self._base += 1
            if f.fid >= rfid:
                self._lost(f, ridx if f.fid == rfid else 0, "quota")
        if self._rpos[0] < self._base:
            self._rpos = (self._base, 0)
        if self._cpos[0] < self._base:
            self._cpos = (self._base, 0)
        seg.live = 0
        self._forget_segment(seg)

    def _release(self):
        """Forget frames the stream settled; delete segments left empty."""
        frames = self._frames
        cfid = self._cpos[0]
        while frames and frames[0].fid < cfid:
            f = frames.popleft()
            self._base += 1
            seg = f.seg
            if seg is not None:
                seg.live -= 1
                if not seg.live and seg is not self._active:
                    self._forget_segment(seg)

    def _cursor(self):
        """Everything before this position is settled. With nothing held,
        that is the end of the segment being appended to, never past it:
        frames written there later are not settled."""
        for f in self._frames:
            if f.seg is not None:
                idx = self._cpos[1] if f.fid == self._cpos[0] else 0
                return encode_cursor(f.seg.number, f.offset, idx)
        if self._active is not None:
            return encode_cursor(self._active.number, self._active.size, 0)
        return encode_cursor(self._next_seg, 0, 0)

    # ------------------------------------------------------------ faults

    def _failed(self, op, error):
        self.metrics.inc("spool_errors", op=op)
        text = "spool %s unusable: %s failed: %s; records past the memory budget are " \
               "dropped (retried every %g s)" % (self.dir, op, _describe(error), self.retry_seconds)
        if self._fault is None:
            log.error("%s", text, extra={"console": True})
        self._fault = text
        active, self._active = self._active, None
        if active is not None and not active.live:
            self._forget_segment(active)
        self._next_retry = self._clock() + self.retry_seconds
        self.state.set_abnormal("spool", text)
        self._update_available()

    def _retry(self):
        self._next_retry = self._clock() + self.retry_seconds

        def probed(qbytes, error):
            if error is not None:
                self._failed("retry", error)
                return
            self._quarantine_bytes = qbytes
            seg = self._new_segment()

            def confirm(_r, _error):
                # After the segment's creation (jobs run in order): it
                # failed if _failed let go of it.
                if self._active is seg:
                    self._fault = None
                    self.state.clear("spool")
                    log.info("spool %s usable again", self.dir, extra={"console": True})
                    self._update_available()
            self._io.submit(lambda: None, (), confirm)
        self._io.submit(self._files.probe, (self.segment_bytes,), probed)

    def _note_quarantine(self):
        if not self._quarantine_bytes:
            self.state.clear("spool:quarantine")
            if self._blocked:
                self._blocked = False
                self._update_available()
            return
        text = "spool: %d MB in %s that this version cannot read (another version's " \
               "segments?) count against the %d MB quota%s" % (
                   -(-self._quarantine_bytes // MiB), os.path.join(self.dir, QUARANTINE),
                   self.quota // MiB,
                   "; no room left: spooling off until they are removed" if self._blocked
                   else "")
        self.state.set_abnormal("spool:quarantine", text)

    # ------------------------------------------------------------ timer

    async def run(self):
        """Seal partial frames, fsync, retry after faults; forever."""
        while True:
            # Woken at the fsync due time, not a fixed period after the last
            # tick: timer jitter would otherwise skip every other sync.
            due = self._next_sync - self._clock() if self._ready else TICK_SECONDS
            await asyncio.sleep(min(max(due, 0.01), TICK_SECONDS))
            self.tick()

    def tick(self):
        now = self._clock()
        if not self._ready or self._closed:
            return
        if self._tail and now - self._tail_since >= SEAL_SECONDS:
            self._seal(True)
        if now >= self._next_sync:
            self._next_sync = now + self.fsync_interval
            if self._sync_due(now):
                self._sync()
        if self._fault is not None and now >= self._next_retry:
            self._retry()
        elif (self._quarantine_bytes or self._blocked) and now >= self._next_retry:
            self._next_retry = now + self.retry_seconds

            def checked(qbytes, error):
                if error is None:
                    self._quarantine_bytes = qbytes
                    if self._blocked and self.disk_bytes + qbytes + self.segment_bytes <= self.quota:
                        self._blocked = False
                        self._update_available()
                    self._note_quarantine()
            self._io.submit(quarantine_bytes, (self.dir,), checked)

    def _submit_change(self, fn, args, done=None):
        self._unsynced = True
        self._io.submit(fn, args, done)

    def _sync_due(self, now):
        """Is there anything for a sync to make durable? An idle spool
        still checks its directory every IDLE_CHECK_SECONDS."""
        if self._unsynced or self._cursor() != self._synced_cursor:
            return True
        return now >= self._next_idle_check

    def _sync(self):
        if self._fault is not None:
            return
        cursor = self._cursor()
        self._unsynced, self._synced_cursor = False, cursor
        self._next_idle_check = self._clock() + IDLE_CHECK_SECONDS

        def synced(_r, error):
            if error is not None:
                self._failed("directory check" if isinstance(error, Vanished) else "fsync",
                             error)
        self._io.submit(self._files.sync, (cursor,), synced)

    async def close(self, timeout=5.0):
        """Write what is spilled, fsync, persist the cursor, end the thread."""
        if self._closed or self._io is None:
            return
        self._finish_writes()
        finished = asyncio.get_running_loop().create_future()
        self._io.submit(lambda: None, (), lambda _r, _e: finished.done() or finished.set_result(None))
        try:
            await asyncio.wait_for(finished, timeout)
        except asyncio.TimeoutError:
            log.error("spool: the disk did not finish the last writes within %.0f s", timeout)
        self._io.close(0)
        self.drops.flush()

    def close_now(self):
        """``close`` for ``InlineIO`` users."""
        if not self._closed and self._io is not None:
            self._finish_writes()
            self._io.close(0)
            self.drops.flush()

    def _finish_writes(self):
        if self._ready and self._fault is None:
            self._seal(True)
        self._closed = True
        self._update_available()
        cursor = self._cursor() if self._fault is None else None
        self._io.submit(self._files.close, (cursor,), self._io_error("close"))
        self._close_read()

    # ------------------------------------------------------------ reporting

    def oldest_age(self):
        """Seconds since the oldest record waiting here was spilled."""
        i = self._rpos[0] - self._base
        if 0 <= i < len(self._frames):
            sealed = self._frames[i].sealed
        elif self._tail:
            sealed = self._tail_wall
        else:
            return 0.0
        return max(0.0, self._wall() - sealed)

    def replay_rate(self):
        """Records/s taken for the stream over the last ten seconds."""
        if not self._rate:
            return 0.0
        now = self._clock()
        while len(self._rate) > 1 and now - self._rate[0][0] > 10.0:
            self._rate.popleft()
        t0, n0 = self._rate[0]
        if now - t0 > 10.0 or now <= t0:
            return 0.0
        return (self._taken_total - n0) / (now - t0)

    def heartbeat_fields(self):
        return {"spool_records": str(self._pending), "spool_bytes": str(self.disk_bytes),
                "spool_oldest_age": "%.8f" % self.oldest_age(),
                "spool_replay_rate": "%.8f" % self.replay_rate(),
                "spool_dropped": str(self.metrics.total("spool_dropped_records"))}


def _describe(error):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return "%s: %s" % (type(error).__name__, error)
