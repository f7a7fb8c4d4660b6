"""A minimal asyncio HTTP/1.1 server for the agent's loopback-only endpoints.

Owns the HTTP plumbing shared by the status endpoint (``/health``,
Prometheus ``/metrics``) and the SIGUSR1 debug pages: binding (loopback
addresses only), parsing one request per connection with hard bounds,
routing to handlers and writing the response. It runs on the agent's event
loop, so it must stay cheap: one request per connection (``Connection:
close``), a cap on concurrent connections, bounded head and body, and a
deadline for reading and for writing.

A handler is ``handler(request) -> (status, content_type, body)``, plain or
``async``; ``body`` is bytes or str (sent as UTF-8). A handler that raises or
returns something else gets the client a 500 and bumps
``http_handler_errors``; nothing a client sends or a handler does stops the
server or the loop.
"""

import asyncio
import inspect
import ipaddress
import logging
import re
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

from ..metrics import Registry

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/1\.[01]$")
_TARGET_BAD = re.compile(r"[\x00-\x20\x7f]")


def check_loopback(host):
    """Raise ValueError unless ``host`` is a literal loopback address.

    Names (even "localhost") are refused: what they resolve to is up to
    /etc/hosts, and these endpoints show internals to anyone who reaches
    them."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("refusing to bind %r: only the loopback addresses 127.0.0.1 and ::1 "
                         "are allowed" % (host,)) from None
    if not addr.is_loopback:
        raise ValueError("refusing to bind %s: it is not a loopback address" % host)


def _host_is_local(value):
    """Whether a Host header names this machine's loopback. Checking it stops
    DNS-rebinding pages in a local browser from reading the endpoints."""
    if value.startswith("["):
        host = value[1:value.find("]")] if "]" in value else ""
    else:
        host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPError(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ClientGone(Exception):
    """The peer closed before sending a request: nothing to answer."""


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "peer")

    def __init__(self, method, target, path, query, version, headers, body, peer):
        self.method = method
        self.target = target
        self.path = path
        self.query = query      # {name: [values]}
        self.version = version
        self.headers = headers  # lower-case names
        self.body = body
        self.peer = peer

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def __repr__(self):
        return "<Request %s %s>" % (self.method, self.target)


class LoopbackHTTPServer:
    def __init__(self, host="127.0.0.1", port=0, metrics=None, name="http",
                 max_head_bytes=8192, max_body_bytes=64 * 1024, timeout=5.0,
                 max_connections=16):
        check_loopback(host)
        if not 0 <= int(port) <= 65535:
            raise ValueError("port %r is out of range" % (port,))
        self.host = host
        self.port = int(port)
        self.metrics = metrics if metrics is not None else Registry()
        self.name = name
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.max_connections = max_connections
        self._routes = {}  # path -> {method: handler}
        self._server = None
        self._conns = {}  # connection task -> its StreamWriter
        self.metrics.describe("http_requests", "HTTP responses by server and status code")
        self.metrics.describe("http_handler_errors", "HTTP handlers that raised or returned garbage")
        self.metrics.describe("http_rejected_connections",
                              "HTTP connections closed at once because too many were open")

    # -------------------------------------------------------------- setup

    def route(self, method, path, handler):
        if not _TOKEN.match(method) or method != method.upper():
            raise ValueError("bad HTTP method %r" % (method,))
        if not path.startswith("/"):
            raise ValueError("route path must start with '/': %r" % (path,))
        self._routes.setdefault(path, {})[method] = handler

    async def start(self):
        """Listen; return the bound port (the ephemeral one when port=0)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        # The stream limit bounds how far readuntil() buffers looking for the
        # end of the head; past it the reader raises instead of growing.
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=self.max_head_bytes, backlog=16)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def running(self):
        return self._server is not None

    @property
    def address(self):
        """HOST:PORT as a URL or a log line writes it (IPv6 in brackets)."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)

    def url(self, path="/"):
        return "http://%s%s" % (self.address, path)

    async def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        conns = list(self._conns)
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        try:
            # Bounded: since 3.12.1 wait_closed also waits for connections.
            await asyncio.wait_for(server.wait_closed(), self.timeout)
        except asyncio.TimeoutError:
            pass

    # ---------------------------------------------------------- connections

    async def _serve(self, reader, writer):
        if self._server is None or len(self._conns) >= self.max_connections:
            # Stopped, or a flood of idle connections: refuse cheaply rather
            # than let them pile up on the loop.
            self._count_rejected()
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._conns[task] = writer
        try:
            await self._exchange(reader, writer)
        except Exception:
            log.exception("http server %s: unexpected error on a connection", self.name)
        finally:
            # The connection counts against max_connections until it is
            # really closed: a peer that never reads keeps unsent bytes alive.
            try:
                await self._close(writer)
            finally:
                self._conns.pop(task, None)

    async def _close(self, writer):
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self.timeout)
        except Exception:
            writer.transport.abort()

    async def _exchange(self, reader, writer):
        head_only = False
        unread_input = True
        try:
            request = await asyncio.wait_for(
                self._read_request(reader, writer.get_extra_info("peername")), self.timeout)
        except _ClientGone:
            return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.TimeoutError:
            status, ctype, body, extra = _error(408, "request not received in time")
        except HTTPError as exc:
            status, ctype, body, extra = _error(exc.status, exc.reason)
        else:
            unread_input = False
            head_only = request.method == "HEAD"
            status, ctype, body, extra = await self._dispatch(request)
        if await self._respond(writer, status, ctype, body, extra, head_only) and unread_input:
            await self._linger(reader, writer)

    async def _linger(self, reader, writer):
        """After an early error reply, read and drop (a bounded amount of)
        what the client is still sending: closing a socket with unread input
        sends a reset, which can destroy the reply before the client reads it."""
        # Enough for a client that sends a body somewhat over the limit.
        budget = [4 * self.max_body_bytes]

        async def discard():
            while budget[0] > 0:
                chunk = await reader.read(min(budget[0], 16384))
                if not chunk:
                    return
                budget[0] -= len(chunk)

        try:
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(discard(), min(self.timeout, 1.0))
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass

    async def _read_request(self, reader, peer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HTTPError(431, "request line and headers exceed %d bytes"
                            % self.max_head_bytes) from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ClientGone() from None
            raise HTTPError(400, "connection closed inside the request head") from None
        method, target, path, query, version, headers = _parse_head(head)
        if "transfer-encoding" in headers:
            raise HTTPError(501, "transfer codings are not supported; send Content-Length")
        length = _content_length(headers)
        if length > self.max_body_bytes:
            raise HTTPError(413, "body larger than %d bytes" % self.max_body_bytes)
        body = await reader.readexactly(length) if length else b""
        return Request(method, target, path, query, version, headers, body, peer)

    async def _dispatch(self, request):
        methods = self._routes.get(request.path)
        if methods is None:
            return _error(404, "no such page: %s" % request.path)
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allow = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
            return _error(405, "method %s not allowed here" % request.method,
                          (("Allow", ", ".join(allow)),))
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            status, ctype, body = _check_result(result)
        except Exception:
            self.metrics.inc("http_handler_errors", server=self.name)
            log.error("http server %s: handler for %s %s failed", self.name, request.method,
                      request.path, exc_info=True, extra={"fields": {"path": request.path}})
            return _error(500, "internal error")
        return status, ctype, body, ()

    async def _respond(self, writer, status, ctype, body, extra, head_only):
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
        lines = ["HTTP/1.1 %d %s" % (status, phrase),
                 "Content-Type: " + ctype,
                 "Content-Length: %d" % len(body),
                 "Connection: close",
                 "Cache-Control: no-store",
                 "X-Content-Type-Options: nosniff"]
        lines.extend("%s: %s" % kv for kv in extra)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.metrics.inc("http_requests", server=self.name, code=str(status))
        try:
            writer.write(head if head_only else head + body)
            # A client that stops reading must not keep the connection (and
            # the body) forever.
            await asyncio.wait_for(writer.drain(), self.timeout)
            return True
        except (ConnectionError, asyncio.TimeoutError):
            writer.transport.abort()
            return False

    def _count_rejected(self):
        self.metrics.inc("http_rejected_connections", server=self.name)


def _parse_head(head):
    """Parse request line and headers; raise HTTPError(400/421) on junk."""
    try:
        text = head[:-4].decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes anything; kept for clarity
        raise HTTPError(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HTTPError(400, "malformed method")
    if not _VERSION.match(version):
        raise HTTPError(400, "unsupported HTTP version %r" % version[:20])
    if not target.startswith("/") or _TARGET_BAD.search(target):
        raise HTTPError(400, "request target must be an absolute path")
    raw_path, _, query = target.partition("?")
    headers = {}
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise HTTPError(400, "folded or empty header line")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HTTPError(400, "malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name in ("content-length", "host") and headers[name] != value:
                raise HTTPError(400, "conflicting %s headers" % name)
            if name not in ("content-length", "host"):
                headers[name] += ", " + value
        else:
            headers[name] = value
    host = headers.get("host")
    if host is not None and not _host_is_local(host):
        raise HTTPError(421, "this endpoint only answers to loopback host names")
    try:
        query_dict = parse_qs(query, keep_blank_values=True, max_num_fields=100)
    except ValueError:
        raise HTTPError(400, "too many query parameters") from None
    return method, target, unquote(raw_path), query_dict, version, headers


def _content_length(headers):
    value = headers.get("content-length")
    if value is None:
        return 0
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise HTTPError(400, "malformed Content-Length")
    return int(value)


def _check_result(result):
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError("handler must return (status, content_type, body), got %r"
                        % (type(result).__name__,))
    status, ctype, body = result
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise TypeError("bad status %r" % (status,))
    if not isinstance(ctype, str) or not ctype.isascii() or "\r" in ctype or "\n" in ctype:
        raise TypeError("bad content type %r" % (ctype,))
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    elif not isinstance(body, bytes):
        raise TypeError("body must be bytes or str, got %s" % type(body).__name__)
    return status, ctype, body


def _error(status, reason, extra=()):
    """(status, content_type, body, extra_headers) for an error page."""
    phrase = HTTPStatus(status).phrase
    body = ("%d %s: %s\n" % (status, phrase, reason)).encode("utf-8", "replace")
    return status, "text/plain; charset=utf-8", body, extra
