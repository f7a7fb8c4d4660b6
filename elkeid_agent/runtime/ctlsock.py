"""The agent's local control socket: how ``elkeidctl services`` reaches it.

Owns ``<workdir>/tmp/control.sock`` (mode 0600, in the 0700 ``tmp``
directory, so only the agent's user and root can connect; peers of any
other uid are refused by SO_PEERCRED as well). It is always on, unlike the
opt-in status endpoint, because it is for the host's operator only.

Protocol: one JSON object per connection, one line (at most 4 KiB), one
JSON line back, then close::

    {"op": "list"}                      -> {"ok": true, "services": [...]}
    {"op": "restart", "id": "sample"}   -> {"ok": true, "message": "..."}
    {"op": "stop"|"start", "id": ...}   -> {"ok": true|false, "message"|"error": ...}
    {"op": "reload"}                    -> {"ok": true} or {"ok": false, "problems": [...]}

Everything a client sends is untrusted: bounded in size and time, validated,
counted (``control_requests{op,result}``) and answered with ``{"ok":
false, "error": ...}``; nothing a client does ends the server or the loop.
The supervisor is looked up per request (``services()``), so the socket
answers "no local services are configured" when there is none.
"""

import asyncio
import json
import logging
import os
import re
import socket
import struct

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
# A restart waits for the service's stop (SIGTERM, then SIGKILL after its
# stop timeout): the answer may take that long.
OP_TIMEOUT = 120.0
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 8
OPS = ("list", "restart", "stop", "start", "reload")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# sun_path holds 108 bytes with the terminating NUL.
MAX_SUN_PATH = 107


def socket_path(workdir):
    return os.path.join(workdir, "tmp", "control.sock")


def bindable(path):
    """(address to bind/connect, directory fd to close or None). A path
    longer than sun_path is reached through /proc/self/fd of its directory
    (Linux resolves the magic link), so a deep workdir still works."""
    if len(os.fsencode(path)) <= MAX_SUN_PATH:
        return path, None
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return "/proc/self/fd/%d/%s" % (fd, os.path.basename(path)), fd


class ControlError(Exception):
    pass


def _answer(ok, **fields):
    fields["ok"] = ok
    return fields


class ControlServer:
    def __init__(self, path, metrics, services=lambda: None):
        self.path = path
        self.metrics = metrics
        self.services = services
        self._server = None
        self._conns = set()
        metrics.describe("control_requests", "requests on the local control socket, by op and result")

    async def start(self):
        """Listen. Raises ControlError when another live agent holds the
        socket or it cannot be made."""
        dirfd = None
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            addr, dirfd = bindable(self.path)
            if os.path.lexists(self.path):
                if self._alive(addr):
                    raise ControlError("another agent answers on %s" % self.path)
                os.unlink(self.path)  # left behind by an agent that was killed
            self._server = await asyncio.start_unix_server(
                self._serve, addr, limit=MAX_REQUEST + 1, backlog=8)
            os.chmod(self.path, 0o600)
        except OSError as e:
            await self.stop()
            raise ControlError("control socket %s: %s" % (self.path, e.strerror or e)) from None
        finally:
            if dirfd is not None:
                os.close(dirfd)

    @staticmethod
    def _alive(addr):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(1.0)
        try:
            s.connect(addr)
            return True
        except OSError:
            return False
        finally:
            s.close()

    async def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        try:
            await asyncio.wait_for(server.wait_closed(), 5.0)
        except asyncio.TimeoutError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _count(self, op, result):
        self.metrics.inc("control_requests", op=op, result=result)

    async def _serve(self, reader, writer):
        task = asyncio.current_task()
        if self._server is None or len(self._conns) >= MAX_CONNECTIONS:
            self._count("none", "busy")
            writer.transport.abort()
            return
        self._conns.add(task)
        try:
            answer = await self._exchange(reader, writer)
            writer.write(json.dumps(answer, ensure_ascii=False, sort_keys=True).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass
        except Exception:
            log.exception("control socket: unexpected error on a connection")
            self._count("none", "internal_error")
        finally:
            self._conns.discard(task)
            writer.close()

    async def _exchange(self, reader, writer):
        if not self._peer_allowed(writer):
            self._count("none", "forbidden")
            return _answer(False, error="permission denied: connect as root or the agent's user")
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            self._count("none", "too_large")
            return _answer(False, error="request larger than %d bytes" % MAX_REQUEST)
        except asyncio.IncompleteReadError as e:
            line = e.partial  # a client may half-close instead of sending a newline
            if not line:
                self._count("none", "empty")
                return _answer(False, error="empty request")
        except asyncio.TimeoutError:
            self._count("none", "timeout")
            return _answer(False, error="request not received in time")
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._count("none", "not_json")
            return _answer(False, error="request is not a JSON object")
        op, error = _validate(request)
        if error:
            self._count(op or "none", "invalid")
            return _answer(False, error=error)
        try:
            answer = await asyncio.wait_for(self._do(op, request.get("id")), OP_TIMEOUT)
        except asyncio.TimeoutError:
            answer = _answer(False, error="%s did not finish within %.0f s" % (op, OP_TIMEOUT))
        except Exception as e:  # a supervisor bug costs this request, not the socket
            log.exception("control socket: %s failed", op)
            answer = _answer(False, error="%s failed: %s: %s" % (op, type(e).__name__, e))
        self._count(op, "ok" if answer.get("ok") else "failed")
        return answer

    def _peer_allowed(self, writer):
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        except (OSError, AttributeError, struct.error):
            return False
        return uid in (0, os.geteuid())

    async def _do(self, op, service_id):
        sup = self.services()
        if op == "list":
            return _answer(True, services=list(sup.status()) if sup is not None else [])
        if sup is None:
            return _answer(False, error="no local services are configured (--services FILE)")
        if op == "reload":
            ok, problems = await sup.reload()
            if ok:
                return _answer(True, message="services file reloaded")
            return _answer(False, error="services file refused; nothing changed",
                           problems=[str(p) for p in problems or ()])
        if service_id not in {s.get("id") for s in sup.status()}:
            return _answer(False, error="unknown service %s" % service_id)
        ok, message = await getattr(sup, op)(service_id)
        return _answer(True, message=message) if ok else _answer(False, error=message)


def _validate(request):
    """-> (op or None, error text or None)."""
    if not isinstance(request, dict):
        return None, "request must be a JSON object"
    op = request.get("op")
    if op not in OPS:
        return None, "op must be one of %s" % ", ".join(OPS)
    unknown = set(request) - {"op", "id"}
    if unknown:
        return op, "unknown request keys: %s" % ", ".join(sorted(map(str, unknown)))
    if op in ("restart", "stop", "start"):
        sid = request.get("id")
        if not isinstance(sid, str) or not _ID.match(sid):
            return op, "%s needs a service id (letters, digits, _.-, at most 64)" % op
    elif "id" in request:
        return op, "%s takes no id" % op
    return op, None


def call(path, request, timeout=OP_TIMEOUT + 10):
    """Client side (elkeidctl): send ``request``, return the answer dict.
    Raises FileNotFoundError/ConnectionRefusedError when no agent listens,
    ControlError for a garbled answer."""
    addr, dirfd = bindable(path) if os.path.isdir(os.path.dirname(path) or ".") else (path, None)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(json.dumps(request).encode() + b"\n")
        data = bytearray()
        while b"\n" not in data and len(data) < 64 * 1024 * 1024:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
        if dirfd is not None:
            os.close(dirfd)
    try:
        answer = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ControlError("the agent sent an answer that is not JSON") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError("the agent sent an unexpected answer")
    return answer
