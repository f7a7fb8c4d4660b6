"""The gRPC shell: the mutual-TLS channel to AgentCenter and the Transfer
stream on it, on the agent's one asyncio loop (grpc.aio).

Where a record leaves: ``_send_loop`` waits on the record queue, takes a
batch, splices it into PackagedData bytes with the cached header
(wire.packaged_data) and writes it. Where a command enters: ``_recv_loop``
hands each raw Command message to ``on_command`` (commands.Dispatcher).

Serializers are identity functions: the agent writes bytes it assembled
itself and parses Commands itself, so a malformed server message is a counted
error instead of an exception inside grpc.

Failure handling: a batch whose write did not complete is requeued (it goes
out first on the next stream). Elkeid's stream has no acknowledgements, so
a message grpc accepted may still be in flight when the stream breaks; the
batches written in the last few seconds (bounded by bytes) are kept in a
replay window and requeued too when a stream ends: at-least-once delivery,
with the resent records counted (``transport_replayed_records``). The stream is re-established 5 s after it is
lost; while no endpoint answers, attempts back off to a cap and never stop
(the Go agent exits after six failures, discarding what it holds).
"""

import asyncio
import logging
import time
from collections import deque

import grpc

from . import endpoints
from .channel import channel_options, load_credentials, short_error, wait_ready
from .. import wire
from ..errors import LocalFault, ServerFault

log = logging.getLogger(__name__)

TRANSFER = "/grpc.Transfer/Transfer"
_COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


def _identity(b):
    return b


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
    def __init__(self, settings, queue, header, on_command, metrics, loop=None):
        """``header`` is a zero-argument callable returning the cached
        PackagedData header bytes; ``on_command(raw_bytes)`` must not raise."""
        self.settings = settings
        self.queue = queue
        self.header = header
        self.on_command = on_command
        self.metrics = metrics
        self.stats = TransferStats()
        self.net_mode = "unknown"
        self.connected_to = None
        self.channel = None
        self._credentials = None
        self._call = None
        self._stopping = False
        self._connected = asyncio.Event()
        self._run_task = None
        self._reconnect = asyncio.Event()
        self._window = deque()  # (written_at, batch, nbytes) on the current stream
        self._window_bytes = 0
        self._writing = False  # a batch is between take_batch and write()
        self._clean_end = False  # the last stream ended with the server's OK
        self._half_closed = None  # the call we half-closed (only then is OK a receipt)
        self._backoff = endpoints.Backoff(settings.reconnect_delay, settings.reconnect_max_delay)
        metrics.set("transport_connected", lambda: 1 if self._call is not None else 0)
        metrics.describe("transport_connect_failures", "dial attempts that failed, by net_mode")
        metrics.describe("transport_stream_errors", "Transfer streams that ended abnormally")
        metrics.describe("transport_requeued_records", "records put back after a failed write")
        metrics.describe("transport_replayed_records",
                         "records resent because their stream broke soon after they were written")

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

    def reconnect(self):
        """Drop the current stream and dial again now (e.g. the region
        changed). Whatever was queued stays queued."""
        self._reconnect.set()

    async def stop(self, flush_timeout=5.0):
        """Deliver what is queued (bounded by ``flush_timeout``), then close.

        The reconnect loop keeps running while draining, so a stream that
        breaks during shutdown is re-established if the server is there.
        Delivery is confirmed only by the server ending the stream cleanly
        after our half-close; any other end replays the window and drains
        again. Whatever is still queued at the deadline is counted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout

        def running():
            return self._run_task is not None and not self._run_task.done()

        while running() and loop.time() < deadline:
            if self.queue.pending() or self._writing or self._call is None:
                if not self.queue.pending() and not self._writing and self._call is None \
                        and not self._window:
                    break  # nothing queued and nothing unconfirmed
                await asyncio.sleep(0.01)
                continue
            call = self._call
            self._clean_end = False
            self._half_closed = call
            try:
                await asyncio.wait_for(call.done_writing(), max(0.1, deadline - loop.time()))
            except Exception:  # the stream is going away; the window replays
                pass
            while self._call is call and loop.time() < deadline:
                await asyncio.sleep(0.01)
            if self._clean_end and not self.queue.pending():
                break
        self._stopping = True
        if self._run_task is not None:
            self._run_task.cancel()
            try:
                await self._run_task
            except asyncio.CancelledError:
                pass
        await self._close_channel()
        left = self.queue.pending()
        if left:
            self.metrics.inc("records_undelivered_at_exit", left)
            log.error("%d records could not be delivered before exit", left)

    # ------------------------------------------------------------ connect

    async def run(self):
        """The connect loop: dial, stream, redial, until ``stop``."""
        self._run_task = asyncio.current_task()
        while not self._stopping:
            try:
                connected = await self._connect()
            except LocalFault as e:
                log.error("cannot connect: %s", e)
                connected = False
            if not connected:
                delay = self._backoff.failed()
                log.warning("no AgentCenter endpoint reachable; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.connected()
            try:
                await self._stream()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.metrics.inc("transport_stream_errors")
                log.warning("transfer stream lost (%s: %s); reconnecting in %.1f s",
                            type(e).__name__, short_error(e), self.settings.reconnect_delay)
            await self._close_channel()
            if self._reconnect.is_set():
                self._reconnect.clear()
            elif not self._stopping:
                await asyncio.sleep(self.settings.reconnect_delay)

    async def _candidates(self):
        eps = self.settings.endpoints
        sd_addrs = []
        if eps.service_discovery:
            loop = asyncio.get_running_loop()
            try:
                body = await loop.run_in_executor(None, endpoints.fetch_sd, eps.service_discovery)
                sd_addrs = endpoints.parse_sd_reply(body)
            except ServerFault as e:
                self.metrics.inc("transport_sd_errors")
                log.warning("service discovery failed, falling back: %s", e)
        return endpoints.plan(eps, sd_addrs)

    async def _connect(self):
        if self._credentials is None:
            self._credentials = load_credentials(self.settings)
        plan = await self._candidates()
        if not plan:
            raise LocalFault("no AgentCenter endpoint configured for region %r"
                             % self.settings.region)
        for net_mode, address in plan:
            channel = grpc.aio.secure_channel(address, self._credentials,
                                              options=channel_options(self.settings))
            try:
                await wait_ready(channel, self.settings.dial_timeout)
            except Exception as e:
                self.metrics.inc("transport_connect_failures", net_mode=net_mode)
                log.warning("dial %s (%s) failed: %s", address, net_mode, short_error(e))
                await channel.close()
                continue
            self.channel = channel
            self.net_mode = net_mode
            self.connected_to = address
            log.info("connected to %s (net_mode %s)", address, net_mode)
            return True
        return False

    async def _close_channel(self):
        self._call = None
        self._connected.clear()
        channel, self.channel = self.channel, None
        if channel is not None:
            try:
                await channel.close(grace=None)
            except Exception:  # closing a broken channel can raise; it is gone either way
                pass

    # ------------------------------------------------------------ stream

    async def _stream(self):
        compression = endpoints.compression_for(self.settings.compression, self.net_mode)
        method = self.channel.stream_stream(TRANSFER, request_serializer=_identity,
                                            response_deserializer=_identity)
        call = method(compression=_COMPRESSION[compression])
        self._call = call
        self._connected.set()
        sender = asyncio.ensure_future(self._send_loop(call))
        receiver = asyncio.ensure_future(self._recv_loop(call))
        reconnect = asyncio.ensure_future(self._reconnect.wait())
        tasks = (sender, receiver, reconnect)
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._call = None
            self._connected.clear()
            call.cancel()
            # The server's OK confirms receipt only after our half-close: a
            # server that ends the stream on its own may not have read it all.
            self._clean_end = (self._half_closed is call and receiver in done
                               and not receiver.cancelled() and receiver.exception() is None)
            self._replay_window()
        if reconnect in done or self._clean_end:
            return
        for task in done:
            if task.cancelled():
                raise StreamClosed("stream cancelled")
            exc = task.exception()
            if exc is not None:
                raise exc
        raise StreamClosed("server closed the stream")

    async def _send_loop(self, call):
        s = self.settings
        q = self.queue
        while True:
            await q.wait_ready(s.flush_delay, s.batch_max_records, s.batch_max_bytes)
            batch = q.take_batch(s.batch_max_records, s.batch_max_bytes)
            if not batch:
                continue
            message = wire.packaged_data(batch, self.header())
            written = False
            self._writing = True
            try:
                await call.write(message)
                written = True
            finally:
                self._writing = False
                if not written:
                    q.requeue(batch)
                    self.metrics.inc("transport_requeued_records", len(batch))
            self.stats.sent(len(message), len(batch))
            self._remember(batch, len(message))

    def _remember(self, batch, nbytes):
        now = time.monotonic()
        w = self._window
        w.append((now, batch, nbytes))
        self._window_bytes += nbytes
        horizon = now - self.settings.replay_seconds
        while w and (self._window_bytes > self.settings.replay_max_bytes or w[0][0] < horizon):
            self._window_bytes -= w.popleft()[2]

    def _replay_window(self):
        """Requeue what may have been in flight when the stream ended,
        unless the server ended it cleanly (it has read everything)."""
        w, self._window = self._window, deque()
        self._window_bytes = 0
        if self._clean_end or not w:
            return
        records = [body for _t, batch, _n in w for body in batch]
        self.queue.requeue(records)
        self.metrics.inc("transport_replayed_records", len(records))

    async def _recv_loop(self, call):
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                return
            self.stats.received(len(raw))
            self.on_command(raw)
