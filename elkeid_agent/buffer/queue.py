"""The record queue: where every record waits between its producer and the
gRPC stream.

Records are serialized ``Record`` bytes (wire.encode_record or a plugin frame
body). Three priorities, sent in this order:

* AGENT: the agent's own records (heartbeats 1000/1001, 1010 error lines,
  5100 task failures). They hold a reserved share of the byte budget
  (``agent_reserve``, an eighth by default) that plugin records can never
  use, and no plugin record ever evicts one: a plugin flooding fd 5 cannot
  make the agent go silent.
* HIGH: plugin fd 5.
* NORMAL: plugin fd 4.

The queue is bounded by bytes; ``put`` never blocks. Plugin records share
``max_bytes - agent_reserve``; when that or the whole budget is exhausted
the oldest NORMAL records make room first, then (for a HIGH record) the
oldest HIGH ones. An AGENT record may evict any plugin record, then the
oldest AGENT one. Every drop is counted by reason and priority and logged
(``drops.DropLog``: at most a line per 10 s, with the count and the record
times lost). A record that could never fit in a message is refused at
``put``.

Batches leave through ``take_batch`` as a ``Batch`` (a list that remembers
how many records of each priority it holds); a batch the stream failed to
write is handed back with ``requeue`` and goes out first next time, each
record back in its own priority, so a broken stream loses nothing that was
not yet written and the budget still holds.

The disk spool (``spool.Spool``, or any object with its seam:
``available``, ``spill(bodies, nbytes)``, ``pending()``, ``take(max_records,
max_bytes, must_fit)``, ``unread(mark)``, ``settled(mark)``): what memory
evicts goes there instead of being dropped, at least ``spill_chunk`` bytes
at a time; while the stream is down (``outage(True)``) every plugin record
goes there at once, so records survive a SIGKILL of the agent. Spooled
records are older than the plugin records in memory: a batch is the
agent's own records first, then spooled ones, and memory plugin records
only once the spool is empty. A batch that goes back is rewound in the
spool (``unread``), not copied into memory; ``settled`` tells the spool
which records the stream is done with. The agent's own records never go
to the spool while the agent runs: a heartbeat must not wait behind a deep
spool (``save_to_spool`` at exit is the exception).

Thread model: call everything from the event loop thread; other threads use
``loop.call_soon_threadsafe(queue.put, ...)``.
"""

import asyncio
from collections import deque
from itertools import islice, repeat, starmap

from .drops import DropLog

NORMAL, HIGH, AGENT = 0, 1, 2
# Batch segment tag of records taken from the spool.
SPOOLED = 3
_PRIORITY_NAMES = ("normal", "high", "agent")
# take_batch order: the agent's own records, then plugin fd 5, then fd 4.
SEND_ORDER = (AGENT, HIGH, NORMAL)
_PLUGIN = (NORMAL, HIGH)


class Batch(list):
    """Record bytes in send order, plus ``segments``: ((priority, count), ...)
    runs in the same order, so ``requeue`` can restore each record's own
    priority (``SPOOLED``: rewound in the spool, ``spool_mark`` says where)."""

    __slots__ = ("segments", "spool_mark")

    def __init__(self, records=(), segments=(), spool_mark=None):
        super().__init__(records)
        self.segments = tuple(segments)
        self.spool_mark = spool_mark


class RecordQueue:
    def __init__(self, max_bytes, metrics, max_record_bytes=4 * 1024 * 1024, spool=None,
                 agent_reserve=None):
        self.max_bytes = max_bytes
        self.max_record_bytes = max_record_bytes
        # An eighth of 48 MiB holds thousands of heartbeats: hours of outage.
        self.agent_reserve = max_bytes // 8 if agent_reserve is None else agent_reserve
        self.metrics = metrics
        self.spool = spool
        # Evicting for the spool in chunks makes each spill a frame's worth
        # instead of one record per put of a full queue.
        self.spill_chunk = min(256 * 1024, max_bytes // 16)
        self._through = False      # the stream is down: plugin records go to the spool
        self._mover = None         # the loop callback moving memory's plugin records there
        self._spool_reads = True   # False once shutting down: the spool stays for next start
        self.drops = DropLog("record queue")
        self._queues = (deque(), deque(), deque())
        # Bytes per priority, so a full queue finds room in O(records evicted)
        # instead of summing every queued length on each put.
        self._pbytes = [0, 0, 0]
        self.bytes = 0
        self.count = 0
        self._waiter = None       # woken by the first record
        self._full_waiter = None  # woken when a batch threshold is reached
        self._threshold = (1, 1)
        self._burst_in = False    # burst_read(): send without the batching delay
        metrics.describe("queue_dropped_records", "records dropped by the record queue")
        metrics.describe("queue_dropped_bytes", "bytes dropped by the record queue")
        metrics.set("queue_records", lambda: self.count)
        metrics.set("queue_bytes", lambda: self.bytes)

    def __len__(self):
        return self.count

    @property
    def plugin_bytes(self):
        return self._pbytes[NORMAL] + self._pbytes[HIGH]

    def own_pending(self):
        """How many of the agent's own records (heartbeats ...) wait."""
        return len(self._queues[AGENT])

    # ------------------------------------------------------------ producers

    def put(self, body, priority=NORMAL):
        """Queue one record; returns False if it was refused."""
        size = len(body)
        if size > self.max_record_bytes:
            self._drop(1, size, "too_large", priority, body, body)
            return False
        if self._through and priority != AGENT:
            if self.plugin_bytes:
                # Older records are still here (the outage just began, or the
                # spool was busy): this one queues behind them, in order.
                self._schedule_move()
            elif self.spool.available and self.spool.spill((body,), size):
                self._wake()
                return True
        if not self._make_room(size, priority):
            self._drop(1, size, "overflow", priority, body, body)
            return False
        self._queues[priority].append(body)
        self._pbytes[priority] += size
        self.bytes += size
        self.count += 1
        self._wake()
        return True

    def put_many(self, bodies, priority=NORMAL, nbytes=None):
        """Queue ``bodies`` in order, exactly as ``put`` one by one would
        (refusals, evictions, the spool during an outage, drop counts), with
        one accounting pass and one wake when they simply fit. ``nbytes``:
        their total length, if the caller already has it. Returns how many
        were accepted."""
        if not bodies:
            return 0
        if nbytes is None:
            nbytes = sum(map(len, bodies))
        fits = not (self._through and priority != AGENT) and (
            nbytes <= self.max_record_bytes or max(map(len, bodies)) <= self.max_record_bytes)
        if fits:
            # Whole batch fits without eviction => each put on its own would
            # have fitted too (the totals only grow), so nothing differs.
            limit = self.max_bytes if priority == AGENT else self.max_bytes - self.agent_reserve
            used = self.bytes if priority == AGENT else self.plugin_bytes
            fits = self.bytes + nbytes <= self.max_bytes and used + nbytes <= limit
        if not fits:
            accepted = 0
            put = self.put
            for body in bodies:
                accepted += put(body, priority)
            return accepted
        self._queues[priority].extend(bodies)
        self._pbytes[priority] += nbytes
        self.bytes += nbytes
        self.count += len(bodies)
        self._wake()
        return len(bodies)

    def put_own(self, body):
        """Queue one of the agent's own records (AGENT priority)."""
        return self.put(body, AGENT)

    def _make_room(self, size, priority):
        """Evict oldest records until ``size`` fits: NORMAL first, HIGH only
        for a HIGH or AGENT record, AGENT only for an AGENT record. With a
        spool attached, evicted records are spilled to disk instead of
        dropped."""
        need = self.bytes + size - self.max_bytes
        if priority == AGENT:
            victims_from = (NORMAL, HIGH, AGENT)
        else:
            victims_from = (NORMAL, HIGH) if priority == HIGH else (NORMAL,)
            need = max(need, self.plugin_bytes + size - (self.max_bytes - self.agent_reserve))
        if need <= 0:
            return True
        movable = sum(self._pbytes[p] for p in victims_from)
        if movable < need:
            return False
        if self._spool_usable():
            need = min(movable, max(need, self.spill_chunk))
        for p in victims_from:
            need -= self._evict(p, need, "overflow", newest=False)
            if need <= 0:
                return True
        return need <= 0

    def _evict(self, priority, need, reason, newest):
        """Remove records of one priority until ``need`` bytes are freed (or
        none is left); returns the bytes freed."""
        q = self._queues[priority]
        pop = q.pop if newest else q.popleft
        evicted = []
        freed = 0
        while q and freed < need:
            body = pop()
            freed += len(body)
            evicted.append(body)
        if evicted:
            self._pbytes[priority] -= freed
            self.bytes -= freed
            self.count -= len(evicted)
            if newest:
                evicted.reverse()
            if not (self._spool_usable() and self.spool.spill(evicted, freed)):
                self._drop(len(evicted), freed, reason, priority, evicted[0], evicted[-1])
        return freed

    def _spool_usable(self):
        return self.spool is not None and self.spool.available

    def _drop(self, records, nbytes, reason, priority, first, last):
        name = _PRIORITY_NAMES[priority]
        self.metrics.inc("queue_dropped_records", records, reason=reason, priority=name)
        self.metrics.inc("queue_dropped_bytes", nbytes, reason=reason, priority=name)
        self.drops.dropped(records, nbytes, "%s %s" % (name, reason), first, last)

    # ------------------------------------------------------------ the spool

    def outage(self, down):
        """The stream went down (True) or came up (False). While it is
        down, plugin records go to the spool (the ones in memory first),
        where a SIGKILL of the agent does not lose them."""
        self._through = down and self.spool is not None
        if self._through:
            self._schedule_move()

    def _schedule_move(self):
        """Move memory's plugin records to the spool, oldest first, a
        ``spill_chunk`` per loop iteration: encoding a full 48 MiB budget
        at once would hold the loop for up to a second. Without a running
        loop (tests), all at once."""
        if self._mover is not None or not self.plugin_bytes:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self.spool.available:
                self._move_to_spool((HIGH, NORMAL))
            return
        self._mover = loop.call_soon(self._move_step)

    def _move_step(self):
        self._mover = None
        if not self._through:
            return
        if self.spool.available:
            self._move_to_spool((HIGH, NORMAL), self.spill_chunk)
        if self.plugin_bytes:
            # A busy spool is asked again shortly, not on every put.
            delay = 0.0 if self.spool.available else 0.05
            self._mover = asyncio.get_running_loop().call_later(delay, self._move_step)

    def save_to_spool(self):
        """At exit: whatever is still queued, the agent's own records too,
        goes to the spool for the next start. Returns how many went."""
        if not self._spool_usable():
            return 0
        before = self.count
        self._move_to_spool((AGENT, HIGH, NORMAL))
        return before - self.count

    def _move_to_spool(self, priorities, limit=None):
        """Hand the oldest records of ``priorities`` to the spool, in that
        order, ``limit`` bytes or all; what it refuses stays here (nothing
        is dropped for being moved)."""
        budget = self.bytes if limit is None else limit
        for p in priorities:
            q = self._queues[p]
            moved = []
            size = 0
            while q and size < budget:
                body = q.popleft()
                moved.append(body)
                size += len(body)
            if not moved:
                continue
            if not self.spool.spill(moved, size):
                q.extendleft(reversed(moved))
                return
            self.count -= len(moved)
            self.bytes -= size
            self._pbytes[p] -= size
            budget -= size
            if budget <= 0:
                return

    def stop_spool_reads(self):
        """Shutting down: spooled records stay on disk for the next start
        (a deep spool would not fit in the flush budget anyway)."""
        self._spool_reads = False

    def _spooled(self):
        spool = self.spool
        return spool.pending() if spool is not None and self._spool_reads else 0

    def settled(self, batch):
        """The stream is done with ``batch`` (written and out of its
        replay window, or confirmed): its spooled records may go."""
        mark = getattr(batch, "spool_mark", None)
        if mark is not None:
            self.spool.settled(mark)

    def _wake(self):
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        fw = self._full_waiter
        if fw is not None and not fw.done() and (
                self.count >= self._threshold[0] or self.bytes >= self._threshold[1]):
            fw.set_result(None)

    # ------------------------------------------------------------ consumer

    def pending(self):
        return self.count + self._spooled()

    async def first_record(self):
        """Return once something is queued, or ``interrupt`` was called."""
        if self.pending():
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def interrupt(self):
        """Wake a ``first_record`` waiter although nothing was queued (the
        sender must half-close for a drain)."""
        if self._waiter is not None:
            _resolve(self._waiter)

    async def wait_ready(self, delay, batch_records, batch_bytes):
        """Return once there is something to send and either a full batch is
        waiting or ``delay`` seconds passed since the first record: an idle
        agent sends within milliseconds, a busy one sends full batches."""
        loop = asyncio.get_running_loop()
        while self.pending() == 0:
            # first_record also returns on interrupt(): wait again then.
            await self.first_record()
        if (self.count >= batch_records or self.bytes >= batch_bytes or delay <= 0
                or self._burst_in):
            return
        if self._spooled():
            return
        self._threshold = (batch_records, batch_bytes)
        # A plain timer on the future: wait_for+shield cost two extra tasks
        # per batch.
        full = self._full_waiter = loop.create_future()
        timer = loop.call_later(delay, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full_waiter = None

    def burst_read(self):
        """A producer has just handed over a whole burst (a plugin's
        buffered flush, read to its end): the batching delay, which exists
        to let the rest of a burst arrive, would only add latency and one
        more timer wake-up per burst. The next ``wait_ready`` (or the one
        under way) returns at once; ``take_batch`` consumes the hint."""
        self._burst_in = True
        if self._full_waiter is not None:
            _resolve(self._full_waiter)

    def take_batch(self, max_records, max_bytes):
        """Pop up to ``max_records`` records totalling at most ``max_bytes``
        (at least one record if any is queued) as a ``Batch``. AGENT
        records first, then spooled ones, then HIGH, then NORMAL (these
        two only once the spool is empty: they are newer)."""
        self._burst_in = False
        batch = Batch()
        segments = []
        total = 0
        from_memory = 0
        for p in SEND_ORDER:
            if p == HIGH and self._spooled():
                if len(batch) < max_records and (not batch or total < max_bytes):
                    spooled, mark = self.spool.take(max_records - len(batch), max_bytes - total,
                                                    must_fit=bool(batch))
                    if spooled:
                        batch.extend(spooled)
                        segments.append((SPOOLED, len(spooled)))
                        batch.spool_mark = mark
                        total += sum(map(len, spooled))
                if self._spooled():
                    break
            q = self._queues[p]
            taken = 0
            n = 0
            room = max_records - len(batch)
            sliced = False
            if q and room > 0:
                # The common case in one slice: the whole run (its byte
                # total is kept per priority), or its first ``room`` records.
                k = min(room, len(q))
                size = self._pbytes[p] if k == len(q) else sum(map(len, islice(q, k)))
                if total + size <= max_bytes:
                    batch.extend(starmap(q.popleft, repeat((), k)))
                    total += size
                    taken = size
                    n = k
                    sliced = True
            while not sliced and q and len(batch) < max_records:
                size = len(q[0])
                if batch and total + size > max_bytes:
                    break
                batch.append(q.popleft())
                total += size
                taken += size
                n += 1
            self._pbytes[p] -= taken
            from_memory += taken
            if n:
                segments.append((p, n))
                self.count -= n
            if len(batch) >= max_records or (q and total + len(q[0]) > max_bytes):
                break
        batch.segments = tuple(segments)
        self.bytes -= from_memory
        return batch

    def requeue(self, batch):
        """Put a batch that was not written back at the front of its records'
        own priority queues, in order: it is older than what was queued
        since. ``batch`` is a ``Batch`` exactly as ``take_batch`` returned it;
        a plain list is taken as HIGH records.

        When several batches go back, requeue the newest first, so the
        oldest ends up in front.

        The budget still holds afterwards: what no longer fits is evicted
        newest and lowest priority first (NORMAL, then HIGH, then AGENT) and
        counted as drops with ``reason=requeue_overflow``; plugin records
        still stay out of the agent's reserved share."""
        segments = getattr(batch, "segments", None)
        if segments is None:
            segments = ((HIGH, len(batch)),)
        end = len(batch)
        for p, n in reversed(segments):
            part = batch[end - n:end]
            end -= n
            if p == SPOOLED:  # still in the spool: only its reader goes back
                self.spool.unread(batch.spool_mark)
                continue
            self._queues[p].extendleft(reversed(part))
            size = sum(map(len, part))
            self._pbytes[p] += size
            self.bytes += size
            self.count += n
        if end > 0:  # segments did not cover it all: the rest as HIGH
            part = batch[:end]
            self._queues[HIGH].extendleft(reversed(part))
            size = sum(map(len, part))
            self._pbytes[HIGH] += size
            self.bytes += size
            self.count += end
        self._trim_after_requeue()
        self._wake()

    def _trim_after_requeue(self):
        plugin_cap = self.max_bytes - self.agent_reserve
        # Dropping, the newest go (the requeued ones were already sent
        # once); spilling, the oldest, so the spool stays older than memory.
        newest = not self._spool_usable()
        for p in (NORMAL, HIGH):
            need = max(self.bytes - self.max_bytes, self.plugin_bytes - plugin_cap)
            if need <= 0:
                return
            self._evict(p, need, "requeue_overflow", newest=newest)
        need = self.bytes - self.max_bytes
        if need > 0:
            self._evict(AGENT, need, "requeue_overflow", newest=True)


def _resolve(future):
    if not future.done():
        future.set_result(None)
