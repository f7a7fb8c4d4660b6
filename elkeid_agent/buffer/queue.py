"""The record queue: where every record waits between its producer and the
gRPC stream.

Records are serialized ``Record`` bytes (wire.encode_record or a plugin frame
body). Two priorities: HIGH (plugin fd 5, agent heartbeats and task errors)
always leaves before NORMAL. The queue is bounded by bytes; ``put`` never
blocks. When the budget is exhausted the oldest NORMAL records make room
first, then the oldest HIGH ones; every drop is counted by reason and
priority. A record that could never fit in a message is refused at ``put``.

Batches leave through ``take_batch``; a batch the stream failed to write is
handed back with ``requeue`` and goes out first next time, so a broken
stream loses nothing that was not yet written.

Spool seam: an object with ``spill(bodies)``, ``pending()`` and
``take(max_records, max_bytes)`` can be attached as ``spool``; overflow then
goes to it instead of being dropped, and spooled (older) records are sent
before memory ones.

Thread model: call everything from the event loop thread; other threads use
``loop.call_soon_threadsafe(queue.put, ...)``.
"""

import asyncio
from collections import deque

NORMAL, HIGH = 0, 1
_PRIORITY_NAMES = ("normal", "high")


class RecordQueue:
    def __init__(self, max_bytes, metrics, max_record_bytes=4 * 1024 * 1024, spool=None):
        self.max_bytes = max_bytes
        self.max_record_bytes = max_record_bytes
        self.metrics = metrics
        self.spool = spool
        self._queues = (deque(), deque())
        # Bytes per priority, so a full queue finds room in O(records evicted)
        # instead of summing every queued length on each put.
        self._pbytes = [0, 0]
        self.bytes = 0
        self.count = 0
        self._waiter = None       # woken by the first record
        self._full_waiter = None  # woken when a batch threshold is reached
        self._threshold = (1, 1)
        metrics.describe("queue_dropped_records", "records dropped by the record queue")
        metrics.describe("queue_dropped_bytes", "bytes dropped by the record queue")
        metrics.set("queue_records", lambda: self.count)
        metrics.set("queue_bytes", lambda: self.bytes)

    def __len__(self):
        return self.count

    # ------------------------------------------------------------ producers

    def put(self, body, priority=NORMAL):
        """Queue one record; returns False if it was refused."""
        size = len(body)
        if size > self.max_record_bytes:
            self._drop(1, size, "too_large", priority)
            return False
        if self.bytes + size > self.max_bytes and not self._make_room(size, priority):
            self._drop(1, size, "overflow", priority)
            return False
        self._queues[priority].append(body)
        self._pbytes[priority] += size
        self.bytes += size
        self.count += 1
        self._wake()
        return True

    def _make_room(self, size, priority):
        """Evict oldest records (NORMAL first; HIGH only for a HIGH record)
        until ``size`` fits. With a spool attached, evicted records are
        spilled to disk instead of dropped."""
        victims_from = (NORMAL, HIGH) if priority == HIGH else (NORMAL,)
        need = self.bytes + size - self.max_bytes
        if sum(self._pbytes[p] for p in victims_from) < need:
            return False
        for p in victims_from:
            q = self._queues[p]
            evicted = []
            freed = 0
            while q and freed < need:
                body = q.popleft()
                freed += len(body)
                evicted.append(body)
            if evicted:
                self._pbytes[p] -= freed
                self.bytes -= freed
                self.count -= len(evicted)
                need -= freed
                if self.spool is not None:
                    self.spool.spill(evicted)
                else:
                    self._drop(len(evicted), freed, "overflow", p)
            if need <= 0:
                return True
        return need <= 0

    def _drop(self, records, nbytes, reason, priority):
        name = _PRIORITY_NAMES[priority]
        self.metrics.inc("queue_dropped_records", records, reason=reason, priority=name)
        self.metrics.inc("queue_dropped_bytes", nbytes, reason=reason, priority=name)

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
        return self.count + (self.spool.pending() if self.spool is not None else 0)

    async def wait_ready(self, delay, batch_records, batch_bytes):
        """Return once there is something to send and either a full batch is
        waiting or ``delay`` seconds passed since the first record: an idle
        agent sends within milliseconds, a busy one sends full batches."""
        loop = asyncio.get_running_loop()
        while self.pending() == 0:
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.count >= batch_records or self.bytes >= batch_bytes or delay <= 0:
            return
        if self.spool is not None and self.spool.pending():
            return
        self._threshold = (batch_records, batch_bytes)
        self._full_waiter = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._full_waiter), delay)
        except asyncio.TimeoutError:
            pass
        finally:
            self._full_waiter = None

    def take_batch(self, max_records, max_bytes):
        """Pop up to ``max_records`` records totalling at most ``max_bytes``
        (at least one record if any is queued). Spooled records first, then
        HIGH, then NORMAL."""
        if self.spool is not None and self.spool.pending():
            batch = self.spool.take(max_records, max_bytes)
            if batch:
                return batch
        batch = []
        total = 0
        for p in (HIGH, NORMAL):
            q = self._queues[p]
            taken = 0
            while q and len(batch) < max_records:
                size = len(q[0])
                if batch and total + size > max_bytes:
                    break
                batch.append(q.popleft())
                total += size
                taken += size
            self._pbytes[p] -= taken
            if len(batch) >= max_records or (q and total + len(q[0]) > max_bytes):
                break
        self.bytes -= total
        self.count -= len(batch)
        return batch

    def requeue(self, batch):
        """Put a batch that was not written back at the front, in order.
        It goes ahead of HIGH records queued since: it is older."""
        q = self._queues[HIGH]
        q.extendleft(reversed(batch))
        size = sum(map(len, batch))
        self._pbytes[HIGH] += size
        self.bytes += size
        self.count += len(batch)
        self._wake()
