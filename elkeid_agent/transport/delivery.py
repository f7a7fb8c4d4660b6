"""The delivery rules of the Transfer stream, without I/O.

Elkeid's stream has no acknowledgements, so the only receipt the agent ever
gets is the server ending the call cleanly after the agent half-closed it.
This object owns what follows from that: which batch is being written, the
replay window of batches written recently (a message grpc accepted may still
be in socket buffers when the stream breaks), what goes back to the queue
when a write fails or a stream ends, and the shutdown drain (send what is
queued, records queued meanwhile included, then half-close once and wait for
the server's end). ``stream.Transport`` is the shell: it feeds events in
(``batch_taken``, ``written``, ``write_failed``, ``stream_ended``,
``drain_requested``) and performs the actions it gets back; nothing here
touches a socket, a clock or the queue, so every rule is tested without them.

Requeued batches are handed back as the objects the queue gave out, one
``Requeue`` per batch and newest first (``RecordQueue.requeue`` pushes to the
front, so the oldest ends up first), never flattened into one list: a batch
may carry more than its records (how many of them were HIGH priority).
Batches that are no longer at risk (aged out of the window, or confirmed by
the server's end) are handed back too, as ``settled``: the disk spool keeps
records until then.

A batch ages out of the window when it is older than ``replay_seconds``
*and* at least ``in_flight_bytes`` were written after it (or when the
window outgrows ``replay_max_bytes``, its memory bound). Time alone is not
enough: a server that stops answering without closing (a dropped route, a
frozen host) lets grpc accept writes until the flow-control window and
the socket buffer are full, and keepalive notices only 20 s later; by then
every batch is "old", though the last ones never left this host. What was
written with ``in_flight_bytes`` more behind it has left the socket
buffer, which happens only once the peer acknowledged it.
"""

from collections import deque, namedtuple

# Actions for the shell.
Requeue = namedtuple("Requeue", "batch")       # queue.requeue(batch)
Take = namedtuple("Take", "delay")             # wait for records (batching delay), take a batch
HalfClose = namedtuple("HalfClose", "")        # call.done_writing(), once
Idle = namedtuple("Idle", "")                  # nothing more to write on this stream
# How a stream ended: the batches to requeue (newest first), how many records
# of them are replays of written batches, whether the server confirmed
# receipt, what the connect loop should do next, and the batches no longer
# at risk (oldest first).
Ended = namedtuple("Ended", "requeue replayed confirmed next settled")

# Ended.next values.
REDIAL = "redial"          # after the reconnect delay
REDIAL_NOW = "redial_now"  # draining with records left, or cycling: no delay
FINISHED = "finished"      # drain complete: everything queued was confirmed

HALF_CLOSE = HalfClose()
IDLE = Idle()


# More than a stalled stream can have accepted without the peer's
# acknowledgement: Linux's largest default TCP send buffer (tcp_wmem max,
# 4 MiB) plus the HTTP/2 flow-control window grpc opens (measured: under
# 1 MiB on loopback with the default BDP probing).
IN_FLIGHT_BYTES = 5 << 20


class Delivery:
    def __init__(self, replay_seconds, replay_max_bytes, in_flight_bytes=IN_FLIGHT_BYTES):
        self.replay_seconds = replay_seconds
        self.replay_max_bytes = max(replay_max_bytes, 1)
        self.in_flight_bytes = in_flight_bytes
        # (written_at, batch, nbytes, bytes written on this stream up to and
        # including it) on the current stream
        self._window = deque()
        self._window_bytes = 0
        self._written = 0
        self._in_flight = None  # taken, write outcome unknown
        self.draining = False
        # Re-establish the stream (new TLS credentials): half-close now,
        # the rest stays queued for the next stream.
        self.cycling = False
        self.half_closed = False  # on the current stream
        self.finished = False     # the drain completed

    # ------------------------------------------------------------ sending

    def stream_started(self):
        self.half_closed = False

    def next_send(self, pending):
        """What the send loop does next, with ``pending`` records queued."""
        if self.half_closed:
            return IDLE
        if self.cycling:
            return HALF_CLOSE
        if self.draining:
            # No batching delay while draining: every millisecond spent
            # waiting comes out of the shutdown budget.
            return HALF_CLOSE if pending == 0 else Take(0.0)
        return Take(None)

    def batch_taken(self, batch):
        if self.half_closed:
            raise RuntimeError("batch taken after the half-close")
        self._in_flight = batch

    def written(self, nbytes, now):
        """The in-flight batch was written; returns the batches that aged
        out of the window (settled), oldest first."""
        batch, self._in_flight = self._in_flight, None
        self._written += nbytes
        self._window.append((now, batch, nbytes, self._written))
        self._window_bytes += nbytes
        return self._trim(now)

    def write_failed(self):
        """The write did not complete: the batch goes back first."""
        batch, self._in_flight = self._in_flight, None
        return [] if batch is None else [Requeue(batch)]

    def half_close_sent(self):
        self.half_closed = True

    @property
    def writing(self):
        return self._in_flight is not None

    @property
    def unconfirmed(self):
        """Batches written on this stream that would replay if it broke."""
        return len(self._window)

    # ------------------------------------------------------------ ending

    def stream_ended(self, server_ok, now, pending):
        """The stream is over. ``server_ok``: the server ended it with OK;
        only after our half-close is that a receipt for everything written
        (a server that ends a stream on its own may not have read it all).
        ``pending``: records still queued, before the requeue."""
        requeue = self.write_failed()
        confirmed = server_ok and self.half_closed
        settled = self._trim(now)  # aged entries are no longer at risk, whatever the last write was
        window, self._window = self._window, deque()
        self._window_bytes = 0
        replayed = 0
        if confirmed:
            settled.extend(entry[1] for entry in window)
        else:
            for _t, batch, _n, _w in reversed(window):
                requeue.append(Requeue(batch))
                replayed += len(batch)
        self.half_closed = False
        cycling, self.cycling = self.cycling, False
        left = pending + sum(len(a.batch) for a in requeue)
        if self.draining and confirmed and not left:
            self.finished = True
            nxt = FINISHED
        elif self.draining or cycling:
            nxt = REDIAL_NOW
        else:
            nxt = REDIAL
        return Ended(requeue, replayed, confirmed, nxt, settled)

    def drain_requested(self):
        self.draining = True

    def cycle_requested(self):
        """End the current stream with a receipt (half-close, the server's
        clean end) and redial at once, e.g. with new credentials."""
        self.cycling = True

    def nothing_to_deliver(self, pending, streaming):
        """Draining with no stream open and nothing queued: done (a stream's
        window is settled when it ends, so nothing is unconfirmed)."""
        if self.draining and not streaming and not pending and self._in_flight is None:
            self.finished = True
        return self.finished

    def _trim(self, now):
        w = self._window
        horizon = now - self.replay_seconds
        aged = []
        while w and (self._window_bytes > self.replay_max_bytes or
                     (w[0][0] < horizon and self._written - w[0][3] >= self.in_flight_bytes)):
            _t, batch, nbytes, _w = w.popleft()
            self._window_bytes -= nbytes
            aged.append(batch)
        return aged
