"""The development AgentCenter core: gRPC service, connections, commands.

Owns the ``DevCenter`` class: a grpc.aio server with mutual TLS serving
``/grpc.Transfer/Transfer`` (PackagedData up, Command down) and
``/grpc.FileExt/Upload``, the table of connected agents, command delivery,
the agents' current configs (pushed on every new connection, docs/protocol.md
section 8), and the hooks tests use (``send_command``, ``disconnect``,
``wait_for_agent``, ``wait_for_records``). The HTTP API (httpapi.py), the
store (store.py) and the live summary (summary.py) hang off it.

Both methods are registered with raw-bytes (de)serializers: every message is
decoded here with grpc_pb2, so a malformed one is counted and logged instead
of killing the stream, and tests can push arbitrary bytes down the Command
stream.
"""

import asyncio
import errno
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import time

import grpc
from google.protobuf.message import DecodeError

from elkeid_agent.runtime.httpd import check_loopback
from elkeid_agent.metrics import Registry
from elkeid_agent.pb import grpc_pb2
from . import certs as certs_mod
from .store import Store, UploadFile, decode_fields, header_of

log = logging.getLogger("elkeid_devtools.devcenter")

DATA_TYPE_AGENT_HEARTBEAT = 1000
DATA_TYPE_PLUGIN_HEARTBEAT = 1001
DATA_TYPE_UPLOAD_TASK = 1050

MiB = 1024 * 1024
# AgentCenter's limits (docs/protocol.md section 5).
MAX_MESSAGE_BYTES = 10 * MiB
MIN_PING_INTERVAL_MS = 5000
# The agent refuses files over buf_size * 600 with chunks of at most
# 500 KiB, so nothing legitimate exceeds ~293 MiB; the cap guards the disk.
MAX_UPLOAD_BYTES = 512 * MiB

# Backpressure on the Transfer streams while the store writer lags: stop
# reading (gRPC flow control then slows the agent) above HIGH queued
# messages, resume at LOW. A few thousand records per message -> ~1e5 records.
STORE_HIGH_WATER = 64
STORE_LOW_WATER = 16

SERVER_OPTIONS = [
    # grpc sets SO_REUSEPORT by default: a second devcenter on the same port
    # would bind too and the kernel would split the agents between the two.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Go AgentCenter: keepalive.EnforcementPolicy{MinTime: 5s,
    # PermitWithoutStream: true}; a client pinging faster gets GOAWAY after
    # the strikes run out.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 1),
    # Our own pings find agents that vanished without a FIN.
    ("grpc.keepalive_time_ms", 60000),
    ("grpc.keepalive_timeout_ms", 20000),
]


class AgentNotConnected(LookupError):
    """No Transfer stream is open for that agent id."""

    def __init__(self, agent_id):
        super().__init__("agent %r is not connected" % (agent_id,))
        self.agent_id = agent_id


def parse_address(text):
    """'127.0.0.1:PORT' or '[::1]:PORT' -> (host, port). Loopback only: the
    HTTP API has no authentication, so neither server may listen elsewhere."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("address must be HOST:PORT, got %r" % text)
    if host == "localhost":
        host = "127.0.0.1"
    check_loopback(host)
    return str(ipaddress.ip_address(host)), int(port)


def check_port_free(host, port):
    """Refuse, in one line, a fixed port something already listens on
    (another devcenter, most likely). grpc would say so too, but only after
    a core log line of its own; with ``grpc.so_reuseport`` off its bind
    still fails if the port is taken between this probe and that bind."""
    if not port:
        return
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # As grpc does: connections in TIME_WAIT do not make a port busy.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OSError("cannot listen on %s: the port is in use (another devcenter?)"
                          % format_address(host, port)) from None
        raise OSError("cannot listen on %s: %s" % (format_address(host, port),
                                                   e.strerror or e)) from None
    finally:
        probe.close()


def format_address(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class _LogLimiter:
    """At most one line per key per interval, with how many were skipped, so
    a client flooding malformed messages cannot flood the log."""

    def __init__(self, interval=1.0):
        self.interval = interval
        self._last = {}
        self._skipped = {}

    def __call__(self, key, level, msg, *args):
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        skipped = self._skipped.pop(key, 0)
        self._last[key] = now
        if skipped:
            msg += " (%d similar lines suppressed)" % skipped
        log.log(level, msg, *args)


class Connection:
    """One Transfer stream; ``agent_id`` is set by its first identified message."""

    def __init__(self, context, peer):
        self.context = context
        self.peer = peer
        self.agent_id = None
        self.header = {}
        self.client_cn = ""
        self.client_cert_sha256 = ""
        self.connected_at = time.time()
        self.messages = 0
        self.records = 0
        self.bytes = 0
        self.bad_messages = 0
        self.commands_sent = 0
        self.last_message_at = None
        self.heartbeat = None
        self.heartbeat_at = None
        self.plugins = {}          # plugin name -> {"fields": ..., "at": ...}
        self.outbox = asyncio.Queue()
        self.kill = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()

    def close(self, reason):
        if not self.kill.done():
            self.kill.set_result(reason)

    def info(self):
        """JSON-ready view for /conn/list, the summary and tests."""
        out = {"agent_id": self.agent_id, "peer": self.peer, "client_cn": self.client_cn,
               "client_cert_sha256": self.client_cert_sha256,
               "connected_at": self.connected_at, "messages": self.messages,
               "records": self.records, "bytes": self.bytes,
               "bad_messages": self.bad_messages, "commands_sent": self.commands_sent,
               "last_message_at": self.last_message_at,
               "last_heartbeat_at": self.heartbeat_at, "last_heartbeat": self.heartbeat,
               "plugins": {name: dict(p) for name, p in sorted(self.plugins.items())}}
        out.update(self.header)
        return out


def _client_cert_sha256(context):
    """sha256 (hex) of the DER client certificate this stream used, so
    tests can tell which certificate a reconnect presented."""
    try:
        pems = context.auth_context().get("x509_pem_cert") or []
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pems[0].decode("ascii"))).hexdigest() \
            if pems else ""
    except Exception:  # auth_context is informational only
        return ""


def _client_cn(context):
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # auth_context is informational only
        return ""
    return names[0].decode("utf-8", "replace") if names else ""


class DevCenter:
    """The development AgentCenter, usable in-process from async tests:

    ``dc = DevCenter(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0",
    certs_dir=..., db_path=..., uploads_dir=..., store_mode="full", read_rate=0)``,
    ``await dc.start()`` ... ``await dc.stop()``. ``http_addr=None`` runs
    without the HTTP API. Certificates are made in ``certs_dir`` when absent.
    """

    def __init__(self, grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", certs_dir="certs",
                 db_path="devcenter.db", uploads_dir=None, store_mode="full",
                 max_upload_bytes=MAX_UPLOAD_BYTES, read_rate=0):
        self.grpc_host, self._grpc_port_req = parse_address(grpc_addr)
        self.http_addr = http_addr
        if http_addr is not None:
            parse_address(http_addr)  # fail early, before anything starts
        self.certs_dir = certs_dir
        self.db_path = db_path
        if uploads_dir is None:
            uploads_dir = os.path.join(os.path.dirname(os.path.abspath(db_path)), "uploads")
        self.uploads_dir = uploads_dir
        self.max_upload_bytes = max_upload_bytes
        if read_rate < 0:
            raise ValueError("read rate must be >= 0 records/s, got %r" % (read_rate,))
        # A slow server for backpressure tests: each Transfer stream reads at
        # most this many records/s (0: as fast as they come).
        self.read_rate = read_rate
        self.metrics = Registry(prefix="elkeid_devcenter")
        self._describe_metrics()
        self.store = Store(db_path, uploads_dir, store_mode, on_commit=self._on_commit_threadsafe,
                           metrics=self.metrics)
        self.grpc_port = None
        self.http_port = None
        self.http_host = None
        self.started_at = None
        self.bundle = None
        self._conns = {}           # agent_id -> Connection (the newest one)
        self._streams = set()      # every open Transfer stream
        self._configs = {}         # agent_id -> serialized Command{configs}
        self._upload_tokens = {}   # 1050 task token -> agent_id it was sent to
        self._waiters = []
        self._loop = None
        self._server = None
        self._http = None
        self._limited = _LogLimiter()

    def _describe_metrics(self):
        m = self.metrics
        m.describe("messages_total", "PackagedData messages received")
        m.describe("records_total", "records received")
        m.describe("bytes_total", "serialized PackagedData bytes received")
        m.describe("decode_errors_total", "messages or payloads that did not decode, by kind")
        m.describe("uploads_total", "FileExt uploads finished, by status")
        m.describe("upload_bytes_total", "bytes received in uploads")
        m.describe("commands_sent_total", "Command messages written to agents")
        m.describe("connections_total", "Transfer streams opened")
        m.describe("connections", "agents connected now")
        m.describe("store_pending", "record messages waiting for the store writer")
        m.describe("http_requests_total", "HTTP API requests, by status code")
        m.describe("streams", "Transfer streams open now (identified or not)")
        m.describe("store_write_errors", "store transactions SQLite refused (their items are lost)")
        m.describe("messages_without_agent_id_total", "PackagedData with an empty agent_id")
        m.set("connections", lambda: len(self._conns))
        m.set("streams", lambda: len(self._streams))
        m.set("store_pending", lambda: self.store.pending)
        m.set("store_write_errors", lambda: self.store.write_errors)

    # ------------------------------------------------------------ lifecycle

    async def start(self):
        self._loop = asyncio.get_running_loop()
        # Refusals that need nothing created first come first.
        self.store.check_paths()
        check_port_free(self.grpc_host, self._grpc_port_req)
        self.bundle = certs_mod.ensure_bundle(self.certs_dir)
        material = certs_mod.read_bundle(self.bundle)
        self.store.open()
        self._configs = self.store.load_configs()
        # Dynamic credentials: grpc asks the fetcher at every handshake, so
        # reload_certs (SIGHUP) takes effect for the next connection while
        # open streams go on.
        self._cert_config = self._certificate_configuration(material)
        self._cert_config_new = None
        credentials = grpc.dynamic_ssl_server_credentials(
            self._cert_config, self._fetch_cert_config, require_client_authentication=True)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("grpc.Transfer", {
                "Transfer": grpc.stream_stream_rpc_method_handler(
                    self._transfer, request_deserializer=None, response_serializer=None)}),
            grpc.method_handlers_generic_handler("grpc.FileExt", {
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self._upload, request_deserializer=None, response_serializer=None)}),
        ))
        address = format_address(self.grpc_host, self._grpc_port_req)
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as e:
            self.store.close()
            raise OSError("cannot listen on %s: %s" % (address, e)) from None
        if not port:  # older grpcio returns 0 instead of raising
            self.store.close()
            raise OSError("cannot listen on %s" % address)
        await server.start()
        self._server = server
        self.grpc_port = port
        if self.http_addr is not None:
            from .httpapi import HttpApi  # here: httpapi imports this module
            host, http_port = parse_address(self.http_addr)
            try:
                self._http = HttpApi(self, host, http_port, self._loop)
            except OSError:
                await server.stop(None)
                self.store.close()
                raise
            self._http.start()
            self.http_host, self.http_port = host, self._http.port
        self.started_at = time.time()
        log.info("devcenter started: grpc %s, http %s, store %s (%s)", self.grpc_address,
                 self.http_address, self.store.db_path, self.store.mode)

    @staticmethod
    def _certificate_configuration(material):
        return grpc.ssl_server_certificate_configuration(
            [(material["server_key"], material["server_crt"])],
            root_certificates=material["ca"])

    def _fetch_cert_config(self):
        # Called by grpc's handshaker: only hand over what reload_certs made.
        config, self._cert_config_new = self._cert_config_new, None
        return config

    def reload_certs(self):
        """Re-read server.crt, server.key and ca.crt (the CA bundle client
        certificates must chain to: it may hold an old and a new CA) for the
        connections that follow. Raises OSError or ValueError, keeping the
        certificates in use, when the files cannot be read."""
        material = certs_mod.read_bundle(self.bundle)
        config = self._certificate_configuration(material)
        self._cert_config = self._cert_config_new = config
        log.info("certificates reloaded from %s: new connections use them", self.bundle.dir)

    async def stop(self, grace=1.0):
        """Close every stream, stop both servers, flush the store."""
        if self._loop is None:
            return  # never started
        if self._http is not None:
            await self._loop.run_in_executor(None, self._http.stop)
            self._http = None
        if self._server is not None:
            for conn in list(self._streams):
                conn.close("devcenter stopping")
            await self._server.stop(grace)
            self._server = None
        # The writer thread joins here: its last commits are on disk after.
        await self._loop.run_in_executor(None, self.store.close)
        self._notify()

    @property
    def grpc_address(self):
        return format_address(self.grpc_host, self.grpc_port) if self.grpc_port else None

    @property
    def http_address(self):
        return format_address(self.http_host, self.http_port) if self.http_port else None

    def listening_line(self):
        """The machine-readable start line scripts and tests parse."""
        line = "devcenter listening grpc=%s" % self.grpc_address
        if self.http_port:
            line += " http=%s" % self.http_address
        return line

    # ------------------------------------------------------------ waiting

    def _notify(self):
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _on_commit_threadsafe(self):
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._notify)

    async def _wait_until(self, condition, timeout, what):
        """Re-check ``condition()`` after every change (connection, commit)
        until it returns something other than None; returns that or raises
        asyncio.TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            value = condition()
            if value is not None:
                return value
            fut = loop.create_future()
            self._waiters.append(fut)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                value = condition()
                if value is not None:
                    return value
                raise asyncio.TimeoutError(
                    "timed out after %.1fs waiting for %s" % (timeout, what)) from None

    async def wait_for_agent(self, agent_id=None, timeout=10.0):
        """Wait until ``agent_id`` (or any agent) is connected; return its info."""
        def connected():
            if agent_id is None:
                conns = list(self._conns.values())
                return conns[0].info() if conns else None
            conn = self._conns.get(agent_id)
            return conn.info() if conn else None
        return await self._wait_until(connected, timeout, "agent %s" % (agent_id or "(any)"))

    async def wait_for_disconnect(self, agent_id, timeout=10.0):
        """Wait until ``agent_id`` has no open stream."""
        await self._wait_until(lambda: True if agent_id not in self._conns else None, timeout,
                               "agent %s to disconnect" % agent_id)

    async def wait_for_records(self, what=1, timeout=10.0, agent_id=None, data_type=None):
        """Wait for stored records, optionally filtered by agent and type.

        ``what`` an int: until at least that many are stored; returns the
        count (works in both store modes). ``what`` a callable: until
        ``what(records)`` is truthy for the list of stored record dicts;
        returns that list (full mode only)."""
        if callable(what):
            def cond():
                recs = self.store.records(agent_id=agent_id, data_type=data_type)
                return recs if what(recs) else None
            desc = "records matching %r" % (what,)
        else:
            want = int(what)

            def cond():
                n = self.store.count(agent_id=agent_id, data_type=data_type)
                return n if n >= want else None
            desc = "%d records (agent_id=%s, data_type=%s)" % (want, agent_id, data_type)
        return await self._wait_until(cond, timeout, desc)

    # ------------------------------------------------------------ commands

    def connected(self):
        """agent ids with an open stream."""
        return sorted(self._conns)

    def connection(self, agent_id):
        conn = self._conns.get(agent_id)
        if conn is None:
            raise AgentNotConnected(agent_id)
        return conn.info()

    def connections(self):
        return [self._conns[a].info() for a in sorted(self._conns)]

    async def send_command(self, agent_id, command, timeout=10.0):
        """Write ``command`` (a grpc_pb2.Command, or raw bytes sent as they
        are) on the agent's stream; returns once gRPC accepted the write.
        Raises AgentNotConnected, or ConnectionError when the stream ends
        before the write."""
        conn = self._conns.get(agent_id)
        if conn is None:
            raise AgentNotConnected(agent_id)
        if isinstance(command, (bytes, bytearray, memoryview)):
            data = bytes(command)
        else:
            data = command.SerializeToString()
        self._remember_upload_token(agent_id, data)
        fut = asyncio.get_running_loop().create_future()
        conn.outbox.put_nowait((data, fut))
        await asyncio.wait_for(asyncio.shield(fut), timeout)

    def _remember_upload_token(self, agent_id, data):
        # FileUploadRequest carries no agent id; the token of the 1050 task
        # tells which agent an upload came from.
        try:
            cmd = grpc_pb2.Command.FromString(data)
        except DecodeError:
            return
        if cmd.HasField("task") and cmd.task.data_type == DATA_TYPE_UPLOAD_TASK and cmd.task.token:
            self._upload_tokens[cmd.task.token] = agent_id

    def set_configs(self, agent_id, configs):
        """Make ``configs`` (a list of grpc_pb2.Config or of dicts with the
        HTTP API's keys) the agent's current configs, pushed on each new
        connection; None forgets them. Does not send anything now."""
        if configs is None:
            self._configs.pop(agent_id, None)
            self.store.set_configs(agent_id, None)
            return
        cmd = grpc_pb2.Command()
        for c in configs:
            cmd.configs.append(c if isinstance(c, grpc_pb2.Config) else config_from_json(c))
        data = cmd.SerializeToString()
        self._configs[agent_id] = data
        self.store.set_configs(agent_id, data)

    def configs(self, agent_id):
        """The agent's current configs as a list of grpc_pb2.Config, or None."""
        data = self._configs.get(agent_id)
        return None if data is None else list(grpc_pb2.Command.FromString(data).configs)

    async def disconnect(self, agent_id, reason="closed by devcenter", timeout=10.0):
        """Abort the agent's stream (status UNAVAILABLE, like a server that
        goes away mid-batch) and wait until it is gone."""
        conn = self._conns.get(agent_id)
        if conn is None:
            raise AgentNotConnected(agent_id)
        conn.close(reason)
        await asyncio.wait_for(conn.finished.wait(), timeout)

    # ------------------------------------------------------------ Transfer

    async def _transfer(self, request_iterator, context):
        conn = Connection(context, context.peer())
        conn.client_cn = _client_cn(context)
        conn.client_cert_sha256 = _client_cert_sha256(context)
        self._streams.add(conn)
        self.metrics.inc("connections_total")
        reader = asyncio.ensure_future(self._read_stream(request_iterator, conn))
        writer = asyncio.ensure_future(self._write_stream(context, conn))
        try:
            done, _ = await asyncio.wait({reader, writer, conn.kill},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                if task in done and not task.cancelled() and task.exception() is not None:
                    log.warning("stream of %s (%s) ended: %r", conn.agent_id, conn.peer,
                                task.exception())
            if conn.kill in done:
                reason = conn.kill.result()
                log.info("closing stream of %s (%s): %s", conn.agent_id, conn.peer, reason)
                # The agent sees UNAVAILABLE with this reason. (A grpc-python
                # client busy writing at that moment may report INTERNAL
                # instead: its failed write overrides the status it got.)
                await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        finally:
            reader.cancel()
            writer.cancel()
            self._unregister(conn)

    def _unregister(self, conn):
        self._streams.discard(conn)
        if conn.agent_id is not None and self._conns.get(conn.agent_id) is conn:
            del self._conns[conn.agent_id]
            log.info("agent %s disconnected (%s)", conn.agent_id, conn.peer)
        while not conn.outbox.empty():
            _, fut = conn.outbox.get_nowait()
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("stream of %s closed before the command "
                                                  "was written" % conn.agent_id))
        conn.finished.set()
        self._notify()

    async def _write_stream(self, context, conn):
        while True:
            data, fut = await conn.outbox.get()
            try:
                await context.write(data)
            except Exception as e:
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError("write to %s failed: %r" % (conn.agent_id, e)))
                raise
            conn.commands_sent += 1
            self.metrics.inc("commands_sent_total")
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def _read_stream(self, request_iterator, conn):
        store = self.store
        async for raw in request_iterator:
            before = conn.records
            self._on_message(conn, raw)
            if self.read_rate:
                await asyncio.sleep((conn.records - before) / self.read_rate)
            if store.pending > STORE_HIGH_WATER:
                await self._wait_until(lambda: True if store.pending <= STORE_LOW_WATER else None, None,
                                       "the store writer")

    def _on_message(self, conn, raw):
        now = time.time()
        m = self.metrics
        m.inc("messages_total")
        m.inc("bytes_total", len(raw))
        conn.messages += 1
        conn.bytes += len(raw)
        conn.last_message_at = now
        try:
            pd = grpc_pb2.PackagedData.FromString(raw)
        except DecodeError as e:
            conn.bad_messages += 1
            m.inc("decode_errors_total", kind="packaged_data")
            self._limited(("pd", conn.peer), logging.WARNING,
                          "malformed PackagedData (%d bytes) from %s (agent %s) skipped: %s",
                          len(raw), conn.peer, conn.agent_id, e or "does not decode")
            return
        if conn.agent_id is None:
            if pd.agent_id:
                self._register(conn, pd)
            else:
                m.inc("messages_without_agent_id_total")
                self._limited(("noid", conn.peer), logging.WARNING,
                              "PackagedData without agent_id from %s; the stream stays "
                              "anonymous until one arrives", conn.peer)
        n = len(pd.records)
        conn.records += n
        m.inc("records_total", n)
        self._track_heartbeats(conn, pd, now)
        store = self.store
        store.add_message(pd, raw, now)
        if store.counting:
            # Counted synchronously: waiters can look now.
            self._notify()

    def _register(self, conn, pd):
        agent_id = pd.agent_id
        conn.agent_id = agent_id
        conn.header = header_of(pd)
        old = self._conns.get(agent_id)
        if old is not None:
            # An agent reconnecting before we noticed its old stream died:
            # the newest stream wins (the real AgentCenter refuses the new
            # one until the old times out, which only slows tests down).
            old.close("superseded by a newer stream from the same agent")
        self._conns[agent_id] = conn
        log.info("agent %s connected from %s: host=%s version=%s", agent_id, conn.peer,
                 pd.hostname, pd.version)
        configs = self._configs.get(agent_id)
        if configs is not None:
            conn.outbox.put_nowait((configs, None))
            log.info("pushing current configs to %s", agent_id)
        self._notify()

    def _track_heartbeats(self, conn, pd, now):
        if conn.agent_id is not None and pd.agent_id == conn.agent_id and pd.hostname:
            # Host facts may change (address, version after self-update).
            if conn.header.get("version") != pd.version or conn.header.get("hostname") != pd.hostname:
                conn.header = header_of(pd)
        for r in pd.records:
            dt = r.data_type
            if dt != DATA_TYPE_AGENT_HEARTBEAT and dt != DATA_TYPE_PLUGIN_HEARTBEAT:
                continue
            fields, error = decode_fields(r.data)
            if error is not None:
                continue  # the store counts it
            if dt == DATA_TYPE_AGENT_HEARTBEAT:
                conn.heartbeat = fields
                conn.heartbeat_at = now
            else:
                conn.plugins[fields.get("name", "")] = {"fields": fields, "at": now}

    # ------------------------------------------------------------ FileExt

    def _upload_agent(self, token, peer):
        agent_id = self._upload_tokens.get(token)
        if agent_id:
            return agent_id
        # Same channel -> same HTTP/2 connection -> same peer string.
        for conn in self._conns.values():
            if conn.peer == peer:
                return conn.agent_id
        return ""

    async def _upload(self, request_iterator, context):
        started = time.time()
        peer = context.peer()
        upload = None
        token = ""
        error = None
        status = grpc_pb2.FileUploadResponse.FAILED
        try:
            async for raw in request_iterator:
                try:
                    req = grpc_pb2.FileUploadRequest.FromString(raw)
                except DecodeError as e:
                    self.metrics.inc("decode_errors_total", kind="upload")
                    error = "malformed FileUploadRequest: %s" % (e or "does not decode")
                    break
                if upload is None:
                    token = req.token
                    # Small synchronous file writes (chunks <= 500 KiB once a
                    # second) cost less than an executor round trip.
                    upload = UploadFile(self.uploads_dir, token, self.max_upload_bytes)
                if not upload.write(req.data):
                    error = "upload exceeds %d bytes" % self.max_upload_bytes
                    break
                self.metrics.inc("upload_bytes_total", len(req.data))
            else:
                if upload is None:
                    error = "empty upload: no FileUploadRequest"
                else:
                    upload.finish()
                    status = grpc_pb2.FileUploadResponse.SUCCESS
        except OSError as e:
            error = "cannot store upload: %s" % e
        except asyncio.CancelledError:
            error = "cancelled by the client"
            raise
        finally:
            if status != grpc_pb2.FileUploadResponse.SUCCESS and upload is not None:
                upload.discard()
            state = "success" if status == grpc_pb2.FileUploadResponse.SUCCESS else "failed"
            self.metrics.inc("uploads_total", status=state)
            row = {"token": token, "agent_id": self._upload_agent(token, peer),
                   "path": upload.path if upload is not None and not error else None,
                   "size": upload.size if upload is not None else 0,
                   "sha256": upload.sha256 if upload is not None else None,
                   "status": state, "error": error, "started_at": started,
                   "finished_at": time.time()}
            written = self.store.add_upload(row)
            if error:
                log.warning("upload token=%r from %s failed: %s", token, peer, error)
            else:
                log.info("upload token=%r from %s stored: %s (%d bytes)", token, peer,
                         row["path"], row["size"])
        # The row is committed before the agent hears SUCCESS, so whoever
        # waits for the response can query the store at once.
        try:
            await asyncio.wrap_future(written)
        except Exception as e:  # the store logged and counted it
            log.error("upload token=%r: row not stored (%s); answering FAILED", token, e)
            status = grpc_pb2.FileUploadResponse.FAILED
        return grpc_pb2.FileUploadResponse(status=status).SerializeToString()

    # ------------------------------------------------------------ views

    def stats(self):
        """Aggregate numbers for /conn/stat and the summary."""
        m = self.metrics
        return {
            "connections": len(self._conns),
            "streams": len(self._streams),
            "messages_total": m.total("messages_total"),
            "records_total": m.total("records_total"),
            "bytes_total": m.total("bytes_total"),
            "decode_errors_total": m.total("decode_errors_total"),
            "uploads_total": m.total("uploads_total"),
            "commands_sent_total": m.total("commands_sent_total"),
            "store_mode": self.store.mode,
            "store_pending": self.store.pending,
            "stored_records": self.store.count(),
            "started_at": self.started_at,
            "latency": self.store.latency.summary() if self.store.latency else None,
        }


def _copy_strings(obj, msg, mapping, what, other_keys=()):
    """Set string fields of ``msg`` from JSON keys (key -> attribute); a
    missing or null key is "", anything else but a string is a ValueError.
    Unknown keys are refused too: a typo must not silently send defaults."""
    unknown = set(obj) - set(mapping) - set(other_keys)
    if unknown:
        raise ValueError("unknown %s key(s): %s" % (what, ", ".join(sorted(unknown))))
    for key, attr in mapping.items():
        value = obj.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError("%s.%s must be a string" % (what, key))
        setattr(msg, attr, value)


_CONFIG_KEYS = {k: k for k in ("name", "type", "version", "sha256", "signature", "detail")}
# The HTTP API says "name"; the Task message says object_name.
_TASK_KEYS = {"name": "object_name", "data": "data", "token": "token"}


def config_from_json(obj):
    """A grpc_pb2.Config from the HTTP API's config object; ValueError with
    the offending key when a field has the wrong type."""
    if not isinstance(obj, dict):
        raise ValueError("each config must be an object, got %s" % type(obj).__name__)
    cfg = grpc_pb2.Config()
    _copy_strings(obj, cfg, _CONFIG_KEYS, "config", ("download_url",))
    urls = obj.get("download_url")
    if urls is None:
        urls = []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError("config.download_url must be a list of strings")
    cfg.download_urls.extend(urls)
    return cfg


def task_from_json(obj):
    """A grpc_pb2.Task from the HTTP API's task object (name -> object_name)."""
    if not isinstance(obj, dict):
        raise ValueError("task must be an object")
    task = grpc_pb2.Task()
    _copy_strings(obj, task, _TASK_KEYS, "task", ("data_type",))
    dt = obj.get("data_type", 0)
    if isinstance(dt, bool) or not isinstance(dt, int) or not -2**31 <= dt < 2**31:
        raise ValueError("task.data_type must be a 32-bit integer")
    task.data_type = dt
    return task


def command_from_json(obj):
    """(Command, has_config) from the ``command`` object of POST /command/.

    At least one of ``task`` and ``config`` must be present: an empty
    Command means "no plugins at all" to an agent, too easy to send by
    mistake. ``"config": []`` is that, on purpose."""
    if not isinstance(obj, dict):
        raise ValueError("command must be an object")
    unknown = set(obj) - {"task", "config"}
    if unknown:
        raise ValueError("unknown command key(s): %s" % ", ".join(sorted(unknown)))
    if obj.get("task") is None and obj.get("config") is None:
        raise ValueError("command needs a task or a config list")
    cmd = grpc_pb2.Command()
    if obj.get("task") is not None:
        cmd.task.CopyFrom(task_from_json(obj["task"]))
    has_config = obj.get("config") is not None
    if has_config:
        if not isinstance(obj["config"], list):
            raise ValueError("command.config must be a list")
        for c in obj["config"]:
            cmd.configs.append(config_from_json(c))
    return cmd, has_config
