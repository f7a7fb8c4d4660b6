"""The asyncio protocols of a plugin's pipes: fd 4/5 (records in) and fd 3
(tasks out).

A ``RecordPipe`` splits what it reads into frames (``ingest.FrameDecoder``)
and puts the bodies, unchanged, into the record queue; it applies the
per-plugin rate cap and holds a heavy producer's pipe while the queue is
over high water. A ``TaskPipe`` is the write side the runner pumps task
frames into. Both report to their ``PluginRunner``; neither owns the process.
"""

import asyncio
import time

from ..buffer.queue import HIGH, NORMAL
from .ingest import FrameDecoder
from .policy import TokenBucket

TASK_FD, RECORD_FD, HIGH_FD = 3, 4, 5
# A pipe read at least this large that drains the pipe is a whole burst
# (queue.burst_read); smaller reads keep the batching delay so that a
# plugin writing record by record still leaves in few messages.
BURST_BYTES = 64 * 1024
_PRIORITY_LABEL = {NORMAL: "normal", HIGH: "high"}


class RecordPipe(asyncio.Protocol):
    """Reads fd 4 (NORMAL) or fd 5 (HIGH) of one plugin process."""

    def __init__(self, runner, priority):
        self.runner = runner
        self.priority = priority
        self.decoder = FrameDecoder(runner.policy.max_frame)
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self.bucket = None
        if runner.policy.ingest_max_bytes_per_sec:
            rate = runner.policy.ingest_max_bytes_per_sec
            self.bucket = TokenBucket(rate, burst=max(rate, 256 * 1024), now=time.monotonic())
        self._resume_handle = None
        self._hold_until = 0.0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        r = self.runner
        if r.discarding:
            return
        bodies, error = self.decoder.feed(data)
        if bodies:
            prio = self.priority
            size = sum(map(len, bodies))
            r.queue.put_many(bodies, prio, size)
            r.tx_records += len(bodies)
            r.tx_bytes += size
            label = _PRIORITY_LABEL[prio]
            r.metrics.inc("plugin_records", len(bodies), plugin=r.name, priority=label)
            r.metrics.inc("plugin_record_bytes", size, plugin=r.name, priority=label)
            if (len(data) >= BURST_BYTES and not self.decoder.buffered()
                    and self.transport is not None
                    and len(data) < getattr(self.transport, "max_size", 0)):
                # A burst read whole: at least 64 KiB (an SDK's buffered
                # flush, not a trickle of small writes), ending on a frame
                # boundary, and shorter than the read size, so the pipe
                # was drained. Nothing more of it is coming: send now.
                r.queue.burst_read()
        if error is not None:
            r.protocol_violation(str(error))
            return
        pause = 0.0
        if self.bucket is not None:
            pause = self.bucket.charge(time.monotonic(), len(data))
            if pause > 0:
                r.metrics.inc("plugin_ingest_paused", plugin=r.name)
        if self.transport is None or self._resume_handle is not None:
            return
        if len(data) >= r.policy.heavy_read and r.queue.bytes > r.high_water:
            # A heavy producer while the queue fills faster than it is sent:
            # reading on would only evict older records (other plugins'
            # too) and starve the sender on this loop. Hold this pipe until
            # the queue is back under high water, or ``hold_max`` passed.
            r.metrics.inc("plugin_ingest_held", plugin=r.name)
            self.transport.pause_reading()
            self._hold_until = time.monotonic() + max(pause, r.policy.hold_max)
            self._resume_handle = asyncio.get_running_loop().call_later(0.01, self._check_hold)
        elif pause > 0:
            self.transport.pause_reading()
            self._resume_handle = asyncio.get_running_loop().call_later(pause, self._resume)

    def _check_hold(self):
        r = self.runner
        if r.queue.bytes > r.high_water and time.monotonic() < self._hold_until:
            self._resume_handle = asyncio.get_running_loop().call_later(0.01, self._check_hold)
            return
        self._resume()

    def _resume(self):
        self._resume_handle = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self):
        error = self.decoder.close()
        if error is not None and not self.runner.discarding:
            self.runner.frame_error_at_eof(str(error))
        return False

    def connection_lost(self, exc):
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        if not self.closed.done():
            self.closed.set_result(None)


class TaskPipe(asyncio.Protocol):
    """The agent's end of fd 3: a write transport the runner pumps into."""

    def __init__(self, runner):
        self.runner = runner
        self.paused = False
        self.lost = False

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.runner._pump_tasks()

    def connection_lost(self, exc):
        self.lost = True
