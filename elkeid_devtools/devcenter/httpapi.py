"""The devcenter's HTTP API (AgentCenter's, docs/protocol.md section 8, plus a few
development views).

Owns request parsing, validation and the JSON/Prometheus responses. It runs
a stdlib ThreadingHTTPServer on its own threads, so a slow client or a big
/records query never stalls the gRPC loop; anything that touches
connections runs on the loop through ``run_coroutine_threadsafe``.

Endpoints: ``POST /command/``, ``GET /conn/list``, ``GET /conn/stat``,
``GET /conn/count``, ``POST /conn/reset``, ``GET /ping``, ``GET /metrics``,
``GET /records``, ``GET /uploads``, ``GET /configs``, ``GET /services``,
``GET /metrics/host`` (the latest 1020 and 1021 records) and ``GET /seq``
(delivery counts by sequence number, store mode ``seq``). JSON answers look like
AgentCenter's: ``{"code": 0, "msg": "success", "data": ...}``; errors carry
``code`` 1 and a message with the HTTP status 400, 404, 405, 409, 413 or 5xx.
"""

import asyncio
import base64
import concurrent.futures
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .server import AgentNotConnected, command_from_json
from .store import StoreError

log = logging.getLogger("elkeid_devtools.devcenter.http")

MAX_BODY = 1024 * 1024
DISCARD_LIMIT = 16 * MAX_BODY
# How long an HTTP thread waits for the loop (command write, stream close).
LOOP_TIMEOUT = 15.0


class HttpError(Exception):
    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status
        self.msg = msg


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Fail loudly when the port is taken instead of sharing it.
    allow_reuse_address = False


class _Server6(_Server):
    address_family = socket.AF_INET6


def _ok(data=None, msg="success"):
    return 200, {"code": 0, "msg": msg, "data": data}


def _int_param(query, name, default=None, minimum=None):
    values = query.get(name)
    if not values or values[-1] == "":
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise HttpError(400, "%s must be an integer, got %r" % (name, values[-1])) from None
    if minimum is not None and value < minimum:
        raise HttpError(400, "%s must be >= %d" % (name, minimum))
    return value


def _str_param(query, name):
    values = query.get(name)
    return values[-1] if values and values[-1] != "" else None


def _record_json(rec):
    rec = dict(rec)
    rec["raw"] = base64.b64encode(rec["raw"]).decode("ascii")
    return rec


class HttpApi:
    """Owns the HTTP server thread; see the module docstring."""

    def __init__(self, devcenter, host, port, loop):
        self.dc = devcenter
        self.loop = loop
        cls = _Server6 if ":" in host else _Server
        self.server = cls((host, port), _Handler)
        self.server.api = self
        self.port = self.server.server_address[1]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="devcenter-http", daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def on_loop(self, coro, what="the devcenter"):
        """Run ``coro`` on the devcenter's loop and return its result; a
        timeout (of the wait here or inside ``coro``) becomes a 504."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(LOOP_TIMEOUT)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError):
            # Three names for one thing on 3.11+, distinct classes on 3.9.
            future.cancel()  # do not leave the work running on the loop
            raise HttpError(504, "timed out waiting for %s" % what) from None

    # ------------------------------------------------------------ routes

    def route(self, method, path, query, body):
        """(status, JSON object or (content_type, text))."""
        path = path.rstrip("/") or "/"
        routes = {
            "/command": ("POST", self.post_command),
            "/conn/list": ("GET", self.conn_list),
            "/conn/stat": ("GET", self.conn_stat),
            "/conn/count": ("GET", self.conn_count),
            "/conn/reset": ("POST", self.conn_reset),
            "/ping": ("GET", self.ping),
            "/metrics": ("GET", self.prometheus),
            "/records": ("GET", self.records),
            "/uploads": ("GET", self.uploads),
            "/configs": ("GET", self.configs),
            "/services": ("GET", self.services),
            "/metrics/host": ("GET", self.host_metrics),
            "/seq": ("GET", self.seq),
        }
        if path not in routes:
            raise HttpError(404, "no such endpoint: %s" % path)
        want, handler = routes[path]
        if method != want:
            raise HttpError(405, "%s wants %s, not %s" % (path, want, method))
        return handler(query, body)

    @staticmethod
    def _json_body(body):
        if not body:
            raise HttpError(400, "request body must be JSON, got nothing")
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise HttpError(400, "request body is not valid JSON: %s" % e) from None
        except RecursionError:
            # json recurses once per bracket: 100k of them exhaust the stack.
            raise HttpError(400, "request body nests too deeply") from None

    def post_command(self, query, body):
        obj = self._json_body(body)
        if not isinstance(obj, dict):
            raise HttpError(400, "body must be an object with agent_id and command")
        agent_id = obj.get("agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise HttpError(400, "agent_id must be a non-empty string")
        if "command" not in obj:
            raise HttpError(400, "command is missing")
        try:
            cmd, has_config = command_from_json(obj["command"])
        except ValueError as e:
            raise HttpError(400, str(e)) from None

        async def deliver():
            dc = self.dc
            dc.connection(agent_id)  # AgentNotConnected before anything changes
            if has_config:
                dc.set_configs(agent_id, list(cmd.configs))
            await dc.send_command(agent_id, cmd, timeout=LOOP_TIMEOUT - 1)

        try:
            self.on_loop(deliver(), "agent %s to take the command" % agent_id)
        except AgentNotConnected as e:
            raise HttpError(404, str(e)) from None
        except ConnectionError as e:
            raise HttpError(503, str(e)) from None
        return _ok()

    def conn_list(self, query, body):
        async def view():
            return self.dc.connections()
        return _ok(self.on_loop(view()))

    def conn_stat(self, query, body):
        async def view():
            stats = self.dc.stats()
            stats["agents"] = {c["agent_id"]: {k: c[k] for k in
                                               ("messages", "records", "bytes", "bad_messages",
                                                "commands_sent", "connected_at",
                                                "last_message_at", "last_heartbeat_at")}
                               for c in self.dc.connections()}
            return stats
        stats = self.on_loop(view())
        stats["stored"] = {a: {str(t): n for t, n in per.items()}
                           for a, per in self.dc.store.counts().items()}
        return _ok(stats)

    def conn_count(self, query, body):
        async def view():
            return len(self.dc.connected())
        return _ok(self.on_loop(view()))

    def conn_reset(self, query, body):
        obj = self._json_body(body)
        ids = obj.get("agent_id") if isinstance(obj, dict) else obj
        if isinstance(ids, str):
            ids = [ids]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise HttpError(400, 'body must be {"agent_id": id or [ids]} or a list of ids')

        async def reset():
            done, missing = [], []
            for agent_id in ids:
                try:
                    await self.dc.disconnect(agent_id, "reset via the HTTP API",
                                             timeout=LOOP_TIMEOUT - 1)
                    done.append(agent_id)
                except AgentNotConnected:
                    missing.append(agent_id)
            return done, missing

        done, missing = self.on_loop(reset())
        if not done:
            raise HttpError(404, "not connected: %s" % ", ".join(missing))
        return _ok({"reset": done, "not_found": missing})

    def ping(self, query, body):
        return _ok("pong")

    def prometheus(self, query, body):
        return 200, ("text/plain; version=0.0.4; charset=utf-8",
                     self.dc.metrics.render_prometheus())

    def records(self, query, body):
        try:
            recs = self.dc.store.records(
                agent_id=_str_param(query, "agent_id"),
                data_type=_int_param(query, "data_type"),
                limit=_int_param(query, "limit", 100, minimum=0),
                after_id=_int_param(query, "after", 0),
                newest=_str_param(query, "newest") in ("1", "true", "yes"))
        except StoreError as e:
            raise HttpError(409, str(e)) from None
        return _ok([_record_json(r) for r in recs])

    def services(self, query, body):
        try:
            return _ok(self.dc.store.services(agent_id=_str_param(query, "agent_id")))
        except StoreError as e:
            raise HttpError(409, str(e)) from None

    def host_metrics(self, query, body):
        try:
            return _ok(self.dc.store.host_metrics(agent_id=_str_param(query, "agent_id")))
        except StoreError as e:
            raise HttpError(409, str(e)) from None

    def seq(self, query, body):
        counter = self.dc.store.seq
        if counter is None:
            raise HttpError(409, "store mode %r counts no seq numbers (run with --store seq)"
                            % self.dc.store.mode)
        return _ok({"agents": counter.snapshot(agent_id=_str_param(query, "agent_id")),
                    "errors": counter.error_counts()})

    def uploads(self, query, body):
        return _ok(self.dc.store.uploads(token=_str_param(query, "token")))

    def configs(self, query, body):
        agent_id = _str_param(query, "agent_id")
        if agent_id is None:
            raise HttpError(400, "agent_id is required")

        async def view():
            return self.dc.configs(agent_id)
        cfgs = self.on_loop(view())
        if cfgs is None:
            raise HttpError(404, "no configs set for agent %s" % agent_id)
        return _ok([{"name": c.name, "type": c.type, "version": c.version, "sha256": c.sha256,
                     "signature": c.signature, "download_url": list(c.download_urls),
                     "detail": c.detail} for c in cfgs])


class _Handler(BaseHTTPRequestHandler):
    server_version = "elkeid-devcenter"
    protocol_version = "HTTP/1.1"

    def _handle(self, method):
        api = self.server.api
        status = 500
        try:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            body = b""
            length = self.headers.get("Content-Length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    raise HttpError(400, "bad Content-Length") from None
                if n < 0:
                    raise HttpError(400, "bad Content-Length")
                if n > MAX_BODY:
                    self._discard(n)
                    raise HttpError(413, "body larger than %d bytes" % MAX_BODY)
                body = self.rfile.read(n)
            elif self.headers.get("Transfer-Encoding"):
                raise HttpError(411, "send a Content-Length")
            status, payload = api.route(method, parts.path, query, body)
        except HttpError as e:
            status, payload = e.status, {"code": 1, "msg": e.msg, "data": None}
            if status >= 500 or status == 413 or status == 411:
                self.close_connection = True
        except Exception as e:  # a bug here must cost one 500, not the server
            log.exception("HTTP %s %s failed", method, self.path)
            status, payload = 500, {"code": 1, "msg": "internal error: %r" % (e,), "data": None}
        api.dc.metrics.inc("http_requests_total", code=str(status))
        if status >= 400:
            log.info("HTTP %s %s -> %d: %s", method, self.path, status, payload.get("msg"))
        if isinstance(payload, tuple):
            ctype, text = payload
            data = text.encode("utf-8")
        else:
            ctype = "application/json"
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _discard(self, n):
        # Reading a moderately oversized body lets the client see the 413
        # instead of a broken pipe; past DISCARD_LIMIT we just hang up.
        if n > DISCARD_LIMIT:
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 65536))
            if not chunk:
                return
            n -= len(chunk)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def log_message(self, format, *args):
        log.debug("http %s " + format, self.address_string(), *args)
