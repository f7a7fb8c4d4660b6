"""The gRPC shell: the mutual-TLS channel to AgentCenter and the Transfer
stream on it, on the agent's one asyncio loop (grpc.aio).

Where a record leaves: ``_send_loop`` waits on the record queue, takes a
batch, splices it into PackagedData bytes with the cached header
(wire.packaged_data) and writes it. Where a command enters: ``_recv_loop``
hands each raw Command message to ``on_command`` (commands.Dispatcher).

Serializers are identity functions: the agent writes bytes it assembled
itself and parses Commands itself, so a malformed server message is a counted
error instead of an exception inside grpc.

The delivery rules (requeue of a failed write, the replay window, the
shutdown drain and its single half-close) live in ``delivery.Delivery``; this
module feeds it events and performs its actions. At-least-once delivery:
replayed records are counted (``transport_replayed_records``); batches out
of the replay window are reported to the queue as settled (the disk spool
keeps records until then). The queue hears when the stream is down
(``outage``), so plugin records go to the disk spool meanwhile.

Reconnecting: a lost stream is redialled after a random delay of up to
``reconnect_delay`` (5 s); while no endpoint answers, the ceiling doubles up
to ``reconnect_max_delay`` (10 s) and each wait is uniform below it (full
jitter), so a fleet whose server restarts comes back spread over seconds,
not in one burst, and resumes at most ~10 s after the server is back
(docs/operations.md "Reconnecting"). Attempts never stop (the Go agent
exits after six failures, discarding what it holds). Nothing from outside
(a discovery answer, a broken stream, a dial) ends the connect loop: it is
logged, counted, and the loop carries on.

New TLS credentials (``use_credentials``, from transport/tlswatch.py) are
used from the next dial; the open stream is re-established at a quiet
moment with the drain's receipt (half-close, the server's clean end) and
redialled at once, so a rotation neither loses nor repeats records.
"""

import asyncio
import logging
import time

import grpc

from . import endpoints
from .channel import (COMPRESSION, channel_options, grpc_credentials, identity,
                      load_credentials, short_error, wait_ready)
from .delivery import FINISHED, HALF_CLOSE, IDLE, REDIAL, Delivery
from .. import wire
from ..errors import LocalFault
from ..runtime.executors import KINDS as EXECUTOR_KINDS, Executors, Saturated

log = logging.getLogger(__name__)

TRANSFER = "/grpc.Transfer/Transfer"
# New credentials: wait this long at most for a quiet moment (no write in
# progress, at most one batch queued) before re-establishing the stream,
# then this long for the server to end it after our half-close (past it the
# stream is dropped and its replay window resent).
CYCLE_QUIET_MAX_WAIT = 30.0
CYCLE_END_WAIT = 10.0


class StreamClosed(Exception):
    """The server ended the Transfer stream."""


class TransferStats:
    """Byte and record counters for the heartbeat's rx/tx speed and tps.

    Sizes are of the (uncompressed) gRPC messages. ``rates`` returns
    per-second values since the previous call, like the Go agent's
    GetState, which swaps its counters every heartbeat."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.tx_bytes = self.rx_bytes = 0
        self.tx_records = self.rx_commands = 0
        self.tx_messages = 0
        self._last = (clock(), 0, 0, 0, 0)

    def sent(self, nbytes, nrecords):
        self.tx_bytes += nbytes
        self.tx_records += nrecords
        self.tx_messages += 1

    def received(self, nbytes):
        self.rx_bytes += nbytes
        self.rx_commands += 1

    def rates(self):
        now = self._clock()
        t0, rx_b, tx_b, rx_c, tx_r = self._last
        dt = now - t0
        self._last = (now, self.rx_bytes, self.tx_bytes, self.rx_commands, self.tx_records)
        if dt <= 0:
            return {"rx_speed": 0.0, "tx_speed": 0.0, "rx_tps": 0.0, "tx_tps": 0.0}
        return {"rx_speed": (self.rx_bytes - rx_b) / dt, "tx_speed": (self.tx_bytes - tx_b) / dt,
                "rx_tps": (self.rx_commands - rx_c) / dt, "tx_tps": (self.tx_records - tx_r) / dt}


class Transport:
    def __init__(self, settings, queue, header, on_command, metrics, loop=None,
                 executors=None, on_state=None):
        """``header`` is a zero-argument callable returning the cached
        PackagedData header bytes; ``on_command(raw_bytes)`` must not raise.
        ``on_state(text)`` hears one line whenever the connection comes or
        goes (the agent passes it to systemd as its STATUS).
        ``executors``: the agent's ``Executors`` (the discovery lookup runs in
        its ``discovery`` pool); in-process users may pass none and get a
        private discovery pool, closed by ``stop``."""
        self.settings = settings
        self.queue = queue
        self.header = header
        self.on_command = on_command
        self.on_state = on_state
        self.metrics = metrics
        self.stats = TransferStats()
        self.net_mode = "unknown"
        self.connected_to = None
        self.channel = None
        self.delivery = Delivery(settings.replay_seconds, settings.replay_max_bytes)
        self._own_executors = None
        if executors is None:
            executors = self._own_executors = Executors(
                None, kinds={"discovery": EXECUTOR_KINDS["discovery"]})
        self._executors = executors
        # The CredentialSet dials use (``use_credentials`` replaces it; None:
        # read the files at the first dial) and the grpc credentials made
        # from it.
        self.credential_set = None
        self._credentials = None
        self._credentials_of = None
        self._cycle = asyncio.Event()   # new credentials: re-establish the stream
        self._call = None
        self._stopping = False
        self._connected = asyncio.Event()
        self._run_task = None
        self._reconnect = asyncio.Event()
        self._drain = asyncio.Event()     # wakes an idle send loop for the drain
        self._finished = asyncio.Event()  # the drain completed
        self._stopped = asyncio.Event()
        # Optional ``async diagnose(address, net_mode, error)`` run after a
        # failed dial (transport/diagnose.py); it must not raise.
        self.diagnose = None
        self._backoff = endpoints.Backoff(settings.reconnect_delay, settings.reconnect_max_delay)
        metrics.set("transport_connected", lambda: 1 if self._call is not None else 0)
        metrics.describe("transport_connect_failures", "dial attempts that failed, by net_mode")
        metrics.describe("transport_connect_errors",
                         "connection attempts that failed unexpectedly, by exception type")
        metrics.describe("transport_sd_errors", "service discovery lookups refused, by reason")
        metrics.describe("transport_stream_errors", "Transfer streams that ended abnormally")
        metrics.describe("transport_requeued_records", "records put back after a failed write")
        metrics.describe("transport_replayed_records",
                         "records resent because their stream broke soon after they were written")
        metrics.describe("transport_drain_incomplete",
                         "shutdowns whose flush budget ran out before the server confirmed")

    # ------------------------------------------------------------ lifecycle

    def start(self):
        """Run the connect loop in a task of its own (for in-process users;
        the agent runs ``run`` under its TaskOwner instead)."""
        return asyncio.ensure_future(self.run())

    async def wait_connected(self, timeout=None):
        await asyncio.wait_for(self._connected.wait(), timeout)

    @property
    def connected(self):
        return self._call is not None

    def use_credentials(self, cred_set):
        """Dial with ``cred_set`` from now on; an open stream is
        re-established at a quiet moment, with a receipt for what it carried
        (no record lost, none sent twice unless the server fails to end it)."""
        self.credential_set = cred_set
        if self._call is not None:
            self._cycle.set()

    def reconnect(self):
        """Drop the current stream and dial again now (e.g. the region
        changed). Whatever was queued stays queued."""
        self._reconnect.set()

    async def stop(self, flush_timeout=5.0):
        """Deliver what is queued (bounded by ``flush_timeout``), then close.
        Returns True when the server confirmed everything.

        The send loop drains the queue without its batching delay, records
        queued meanwhile included, half-closes the stream once and the
        server's clean end confirms receipt. A stream that breaks during the
        drain replays its window and is redialled at once. Whatever is
        still queued at the deadline is counted. Never raises because the
        connect loop crashed: shutdown must go on."""
        d = self.delivery
        d.drain_requested()
        # Spooled records stay on disk for the next start: the flush budget
        # is for what memory holds.
        self.queue.stop_spool_reads()
        self._drain.set()
        self.queue.interrupt()
        task = self._run_task
        if task is not None and not task.done() \
                and not d.nothing_to_deliver(self.queue.pending(), self._call is not None):
            try:
                await asyncio.wait_for(self._finished.wait(), flush_timeout)
            except asyncio.TimeoutError:
                self.metrics.inc("transport_drain_incomplete")
                log.warning("flush budget of %.1f s spent before the server confirmed delivery",
                            flush_timeout)
        self._stopping = True
        self._stopped.set()
        if task is not None:
            task.cancel()
            for result in await asyncio.gather(task, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("transport connect loop had crashed: %s: %s",
                              type(result).__name__, short_error(result))
        await self._close_channel()
        if self._own_executors is not None:
            self._own_executors.close()
        kept = self.queue.save_to_spool()
        if kept:
            log.info("%d records not delivered before exit are in the spool for the next start",
                     kept, extra={"console": True})
        left = self.queue.pending()
        if left:
            self.metrics.inc("records_undelivered_at_exit", left)
            log.error("%d records could not be delivered before exit", left)
        return d.finished and not left and not kept

    # ------------------------------------------------------------ connect

    async def run(self):
        """The connect loop: dial, stream, redial, until ``stop``."""
        self._run_task = asyncio.current_task()
        # A previous incarnation that crashed (restarted by the TaskOwner)
        # may have left its channel open.
        await self._close_channel()
        while not self._stopping:
            if self.delivery.nothing_to_deliver(self.queue.pending(), False):
                self._finished.set()
                await self._stopped.wait()
                return
            try:
                connected = await self._connect()
            except LocalFault as e:
                log.error("cannot connect: %s", e)
                connected = False
            except Exception as e:  # a bug or input nobody foresaw: never the end of the loop
                self.metrics.inc("transport_connect_errors", error=type(e).__name__)
                log.error("connection attempt failed: %s: %s", type(e).__name__,
                          short_error(e), exc_info=e)
                await self._close_channel()
                connected = False
            if not connected:
                self.queue.outage(True)
                delay = self._backoff.failed()
                log.warning("no AgentCenter endpoint reachable; retrying in %.1f s", delay)
                self._state("no AgentCenter endpoint reachable; retrying in %.1f s" % delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.connected()
            ended, problem = await self._stream()
            await self._close_channel()
            if not self._stopping and ended.next != FINISHED:
                self._state("disconnected from %s; reconnecting" % self.connected_to)
            if problem is not None:
                self.metrics.inc("transport_stream_errors")
                log.warning("transfer stream lost (%s: %s); reconnecting", type(problem).__name__,
                            short_error(problem), extra={"console": True})
            if ended.next == FINISHED:
                self._finished.set()
                await self._stopped.wait()
                return
            if self._reconnect.is_set():
                self._reconnect.clear()
            elif ended.next == REDIAL and not self._stopping:
                await asyncio.sleep(self._backoff.after_lost_stream())

    async def _candidates(self):
        eps = self.settings.endpoints
        sd_addrs = []
        if eps.service_discovery:
            try:
                sd_addrs = await self._executors.run("discovery", endpoints.discover,
                                                     eps.service_discovery)
            except endpoints.SDError as e:
                self._sd_failed(e.reason, e)
            except Saturated as e:  # earlier lookups are still stuck in their timeout
                self._sd_failed("saturated", e)
            except Exception as e:
                self._sd_failed("internal", e)
        return endpoints.plan(eps, sd_addrs)

    def _sd_failed(self, reason, e):
        self.metrics.inc("transport_sd_errors", reason=reason)
        log.warning("service discovery failed, falling back: %s", short_error(e))

    async def _connect(self):
        if self.credential_set is None:
            self.credential_set = load_credentials(self.settings)
        if self._credentials_of is not self.credential_set:
            self._credentials = grpc_credentials(self.credential_set)
            self._credentials_of = self.credential_set
            self._cycle.clear()  # this dial already uses the newest set
        plan = await self._candidates()
        if not plan:
            raise LocalFault("no AgentCenter endpoint configured for region %r"
                             % self.settings.region)
        for net_mode, address in plan:
            channel = None
            try:
                channel = grpc.aio.secure_channel(address, self._credentials,
                                                  options=channel_options(self.settings))
                await wait_ready(channel, self.settings.dial_timeout)
            except Exception as e:
                self.metrics.inc("transport_connect_failures", net_mode=net_mode)
                log.warning("dial %s (%s) failed: %s", address, net_mode, short_error(e))
                await _close_quietly(channel)
                if self.diagnose is not None:
                    await self.diagnose(address, net_mode, short_error(e))
                continue
            self.channel = channel
            self.net_mode = net_mode
            self.connected_to = address
            log.info("connected to %s (%s)", address, net_mode, extra={"console": True})
            return True
        return False

    async def _close_channel(self):
        self._call = None
        self._connected.clear()
        channel, self.channel = self.channel, None
        await _close_quietly(channel)

    def _state(self, text):
        if self.on_state is not None:
            try:
                self.on_state(text)
            except Exception:  # a status line must never break the stream
                log.exception("connection state callback failed")

    # ------------------------------------------------------------ stream

    async def _stream(self):
        """One Transfer call; returns (delivery.Ended, the exception that
        broke it or None)."""
        compression = endpoints.compression_for(self.settings.compression, self.net_mode)
        method = self.channel.stream_stream(TRANSFER, request_serializer=identity,
                                            response_deserializer=identity)
        call = method(compression=COMPRESSION[compression])
        self._call = call
        self._connected.set()
        self._state("connected to %s (%s)" % (self.connected_to, self.net_mode))
        self.delivery.stream_started()
        self.queue.outage(False)
        sender = asyncio.ensure_future(self._send_loop(call))
        receiver = asyncio.ensure_future(self._recv_loop(call))
        reconnect = asyncio.ensure_future(self._reconnect.wait())
        cycler = asyncio.ensure_future(self._cycle_when_quiet())
        tasks = (sender, receiver, reconnect, cycler)
        done = ()
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._call = None
            self._connected.clear()
            call.cancel()
            server_ok = (receiver in done and not receiver.cancelled()
                         and receiver.exception() is None)
            ended = self.delivery.stream_ended(server_ok, time.monotonic(), self.queue.pending())
            self._settle(ended)
            if ended.next != FINISHED:
                self.queue.outage(True)
        if ended.confirmed or reconnect in done:
            return ended, None
        if cycler in done and not cycler.cancelled() and cycler.exception() is None:
            return ended, StreamClosed("the server did not end the stream within %g s of our "
                                       "half-close" % CYCLE_END_WAIT)
        for task in done:
            exc = StreamClosed("stream cancelled") if task.cancelled() else task.exception()
            if exc is not None:
                return ended, exc
        return ended, StreamClosed("server closed the stream")

    async def _cycle_when_quiet(self):
        """Once new credentials arrived: wait for a quiet moment, then
        half-close; the server's clean end is the receipt, and the connect
        loop redials at once with the new set. Returns (ending the stream
        without a receipt) only if the server does not end it."""
        await self._cycle.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CYCLE_QUIET_MAX_WAIT
        while loop.time() < deadline and (
                self.delivery.writing or self.queue.pending() > self.settings.batch_max_records):
            await asyncio.sleep(0.05)
        self._cycle.clear()
        log.info("re-establishing the stream to %s with the new TLS credentials",
                 self.connected_to)
        self.delivery.cycle_requested()
        self.queue.interrupt()
        await asyncio.sleep(CYCLE_END_WAIT)

    def _settle(self, ended):
        for batch in ended.settled:
            self.queue.settled(batch)
        for action in ended.requeue:
            self.queue.requeue(action.batch)
        requeued = sum(len(a.batch) for a in ended.requeue) - ended.replayed
        if requeued:
            self.metrics.inc("transport_requeued_records", requeued)
        if ended.replayed:
            self.metrics.inc("transport_replayed_records", ended.replayed)

    async def _send_loop(self, call):
        s = self.settings
        q = self.queue
        d = self.delivery
        while True:
            action = d.next_send(q.pending())
            if action is IDLE:
                # Half-closed: only the server's end is left to wait for.
                await asyncio.get_running_loop().create_future()
            if action is HALF_CLOSE:
                await call.done_writing()
                d.half_close_sent()
                continue
            if not q.pending():
                await self._records_or_drain()
                continue
            delay = s.flush_delay if action.delay is None else action.delay
            await q.wait_ready(delay, s.batch_max_records, s.batch_max_bytes)
            batch = q.take_batch(s.batch_max_records, s.batch_max_bytes)
            if not batch:
                continue
            message = wire.packaged_data(batch, self.header())
            d.batch_taken(batch)
            await call.write(message)
            for settled in d.written(len(message), time.monotonic()):
                q.settled(settled)
            self.stats.sent(len(message), len(batch))

    async def _records_or_drain(self):
        """Wait for the first record, or for a drain or cycle request (both
        must half-close even if nothing arrives)."""
        if not self._drain.is_set() and not self.delivery.cycling:
            # ``stop`` and a credentials cycle interrupt this wait (one
            # future per idle spell, not a task per reason).
            await self.queue.first_record()

    async def _recv_loop(self, call):
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                return
            self.stats.received(len(raw))
            self.on_command(raw)


async def _close_quietly(channel):
    if channel is None:
        return
    try:
        await channel.close(grace=None)
    except Exception:  # closing a broken channel can raise; it is gone either way
        pass
