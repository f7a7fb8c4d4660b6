"""Log lines for dropped records: every drop is counted where it happens
(``queue_dropped_records``, ``spool_dropped_records``); this module owns the
line an operator reads, at most one per ``every`` seconds per source, with
how many records and bytes were lost, why, and the record times of the
oldest and newest lost (the ``Record.timestamp`` field, unix seconds).

Cheap on the hot path: a drop stores references to the first and last
bodies of its window and adds two numbers; timestamps are decoded only
when the line is written. The line is written by a timer on the running
loop (``every`` after the window opened, so a burst becomes one line), or,
without a loop, by the next drop that finds the window due, or ``flush``.
"""

import asyncio
import logging
import time

from .. import wire
from ..errors import WireError

log = logging.getLogger("elkeid_agent.buffer")


def record_time(body):
    """The timestamp of a serialized Record, or None if it has none."""
    try:
        return wire.decode_record(body, deep=False)[1]
    except (WireError, TypeError, ValueError):
        return None


def format_time(ts):
    if ts is None:
        return "unknown"
    if ts <= 0 or ts > 1 << 40:  # a plugin's zero or garbage: show it as it is
        return str(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class DropLog:
    """``source`` names where the records were lost ("record queue",
    "spool"); ``dropped(...)`` for each drop, ``flush()`` at shutdown."""

    def __init__(self, source, every=10.0, clock=time.monotonic, logger=log):
        self.source = source
        self.every = every
        self._clock = clock
        self._log = logger
        self._last_line = None
        self._timer = None
        self._reset()

    def _reset(self):
        self.records = 0
        self.nbytes = 0
        self.reasons = {}
        self._times = []       # (oldest, newest) record times given directly
        self._first = None     # first and last lost bodies of the window
        self._last = None

    def dropped(self, records, nbytes, reason, first=None, last=None, oldest=None, newest=None):
        """``records`` records of ``nbytes`` lost for ``reason``; ``first``
        and ``last`` are the oldest and newest lost bodies (or give their
        times as ``oldest``/``newest``)."""
        if records <= 0:
            return
        self.records += records
        self.nbytes += nbytes
        self.reasons[reason] = self.reasons.get(reason, 0) + records
        if first is not None:
            if self._first is None:
                self._first = first
            self._last = last if last is not None else first
        if oldest is not None or newest is not None:
            self._times.append((oldest, newest))
        self._schedule()

    def _schedule(self):
        if self._timer is not None:
            return
        now = self._clock()
        due = 0.0 if self._last_line is None else max(0.0, self._last_line + self.every - now)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if due <= 0:
                self.flush()
            return
        # Wait at least a second so the burst a drop starts is one line.
        self._timer = loop.call_later(max(due, 1.0), self._fire)

    def _fire(self):
        self._timer = None
        self.flush()

    def flush(self):
        """Write the line for what was lost since the last one, if anything."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.records:
            return
        times = [t for pair in self._times for t in pair if t is not None]
        for body in (self._first, self._last):
            if body is not None:
                t = record_time(body)
                if t is not None:
                    times.append(t)
        why = ", ".join("%s %d" % kv for kv in sorted(self.reasons.items()))
        self._log.error("%s dropped %d records (%d bytes; %s); record times %s to %s",
                        self.source, self.records, self.nbytes, why,
                        format_time(min(times) if times else None),
                        format_time(max(times) if times else None), extra={"console": True})
        self._last_line = self._clock()
        self._reset()
