"""Task 1050's file upload: a client stream of FileUploadRequests over
/grpc.FileExt/Upload on the Transfer stream's channel (docs/protocol.md
section 3).

Owns the limits and the pacing, which must agree: a file that passes the
size check must be able to finish before the deadline. Elkeid's
``agent/transport/file_ext.go`` reads ``min(buf_size, 500 KiB)`` once per
second with a 600 s deadline but admits files up to ``buf_size * 600``, so
for ``buf_size`` over 500 KiB (and, by one tick, even at its own limit) an
admitted file cannot finish. Here:

* pacing as Elkeid: chunks of ``min(buf_size, 500 KiB)``, one per second
  (the first at once, on an absolute schedule so scheduling delays do not
  add up);
* size limit ``chunk * 600``: what 600 chunks carry (Elkeid's
  ``buf_size * 600`` whenever ``buf_size`` <= 500 KiB, at most 300 MiB);
* deadline 600 s of pacing plus 60 s of grace for the transfer itself; so
  an admitted file needs at most 599 intervals of pacing.

Only the bytes present at the size check are sent (a growing log file is
cut there, so the limit holds). File reads run in the ``upload`` executor.
"""

import asyncio
import logging
import os
import stat

import grpc

from . import endpoints
from .. import wire
from ..errors import ServerFault

log = logging.getLogger(__name__)

UPLOAD = "/grpc.FileExt/Upload"
MAX_CHUNK = 500 * 1024
CHUNK_INTERVAL = 1.0
MAX_CHUNKS = 600
GRACE = 60.0
_COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


def _identity(b):
    return b


class UploadPlan:
    """Chunk size, size limit and deadline for one ``buf_size``."""

    def __init__(self, buf_size, max_chunk=MAX_CHUNK, interval=CHUNK_INTERVAL,
                 max_chunks=MAX_CHUNKS, grace=GRACE):
        self.chunk = min(buf_size, max_chunk)
        self.limit = self.chunk * max_chunks
        self.interval = interval
        self.timeout = max_chunks * interval + grace


class Uploader:
    """Uploads files over ``transport``'s current channel. The knobs exist
    for tests; production uses the module constants."""

    def __init__(self, transport, executors, max_chunk=MAX_CHUNK, interval=CHUNK_INTERVAL,
                 max_chunks=MAX_CHUNKS, grace=GRACE):
        self.transport = transport
        self.executors = executors
        self.knobs = dict(max_chunk=max_chunk, interval=interval, max_chunks=max_chunks,
                          grace=grace)

    def plan(self, buf_size):
        return UploadPlan(buf_size, **self.knobs)

    async def upload(self, path, buf_size, token):
        """Send the file; returns the bytes sent. Raises ServerFault with the
        reason on any failure (refused file, no connection, timeout, the
        stream broke, the server said no)."""
        plan = self.plan(buf_size)
        f, size = await self.executors.run("upload", open_regular, path, plan.limit)
        try:
            return await self._send(f, size, plan, path, token)
        finally:
            f.close()

    async def _send(self, f, size, plan, path, token):
        from ..pb import grpc_pb2
        t = self.transport
        channel = t.channel
        if channel is None:
            raise ServerFault("no connection available", token)
        method = channel.stream_unary(UPLOAD, request_serializer=_identity,
                                      response_deserializer=_identity)
        compression = endpoints.compression_for(t.settings.compression, t.net_mode)
        token_field = wire.len_field(1, token.encode("utf-8")) if token else b""
        loop = asyncio.get_running_loop()
        sent = [0]

        async def requests():
            start = loop.time()
            k = 0
            while True:
                if k:
                    await asyncio.sleep(max(0.0, start + k * plan.interval - loop.time()))
                k += 1
                want = min(plan.chunk, size - sent[0])
                data = await self.executors.run("upload", f.read, want) if want > 0 else b""
                sent[0] += len(data)
                yield token_field + (wire.len_field(2, data) if data else b"")
                if len(data) < plan.chunk or sent[0] >= size:
                    return

        # The call runs as a task of its own: when the channel closes under
        # it, grpc cancels it, which must read as a failed upload, not as
        # this coroutine being cancelled.
        call = asyncio.ensure_future(method(requests(), compression=_COMPRESSION[compression]))
        try:
            done, _ = await asyncio.wait({call}, timeout=plan.timeout)
        finally:
            if not call.done():
                call.cancel()
        if not done:
            raise ServerFault("upload of %s timed out after %d s" % (path, plan.timeout), token)
        if call.cancelled():
            raise ServerFault("upload of %s failed: the connection closed" % path, token)
        exc = call.exception()
        if isinstance(exc, grpc.aio.AioRpcError):
            raise ServerFault("upload of %s failed: %s: %s" % (path, exc.code().name,
                                                               exc.details()), token)
        if exc is not None:
            raise ServerFault("upload of %s failed: %s" % (path, exc), token)
        try:
            status = grpc_pb2.FileUploadResponse.FromString(call.result()).status
        except Exception:
            raise ServerFault("malformed FileUploadResponse", token) from None
        if status != 0:
            raise ServerFault("server refused the upload of %s" % path, token)
        return sent[0]


def open_regular(path, limit):
    """(file, size) of a regular file no larger than ``limit``."""
    # O_NONBLOCK: opening a FIFO named by the server must not hang a worker
    # thread; it is refused below as not a regular file anyway.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ServerFault("cannot open %s: %s" % (path, e.strerror)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ServerFault("%s is not a regular file" % path)
        if st.st_size > limit:
            raise ServerFault("size limit exceeded: (%d/%d)" % (st.st_size, limit))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), st.st_size
