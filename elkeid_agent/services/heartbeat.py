"""Heartbeats from local services: the message format and its framing.

A service reports itself alive with a small JSON object (the test-agent
design's heartbeat, docs/protocol.md section 9)::

    {"agent_id": "filebeat-logs", "pid": 1234, "status": "running",
     "cpu": 5.0, "memory": 102400, "timestamp": "2025-12-05T10:00:00Z"}

either as one JSON line on the service's unix socket, or wrapped in JSON-RPC
2.0 on that socket (``{"jsonrpc": "2.0", "method": "heartbeat", "params":
{...}, "id": 1}``, answered when it has an id), or as the body of ``POST
/heartbeat`` on the status endpoint. Everything here is pure: ``LineSplitter``
turns socket bytes into lines (bounded: an over-long line is discarded up
to its newline and counted), ``parse`` turns one message into a
``Heartbeat`` or raises ``HeartbeatError`` with a reason that is also the
counter label. Whether the pid belongs to the service is for the
supervisor to judge; the timestamp is checked for form only (liveness uses
the time of receipt, so a service's clock cannot fake or break it).
"""

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

MAX_LINE = 64 * 1024
STATUSES = ("running", "stopping", "error")


class HeartbeatError(ValueError):
    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason    # short label for counters: not_json, bad_field, ...
        self.detail = detail


@dataclass(frozen=True)
class Heartbeat:
    agent_id: str
    pid: int
    status: str
    timestamp: str
    cpu: Optional[float] = None      # percent
    memory: Optional[int] = None     # bytes
    rpc_id: object = None            # JSON-RPC id to answer, if any
    rpc: bool = False


def parse(data):
    """One message (bytes or str) -> Heartbeat; HeartbeatError otherwise."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise HeartbeatError("not_utf8", "message is not UTF-8") from None
    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise HeartbeatError("not_json", "nested too deeply") from None
    except ValueError as e:
        raise HeartbeatError("not_json", str(e)[:200]) from None
    rpc, rpc_id = False, None
    if isinstance(doc, dict) and "jsonrpc" in doc:
        if doc.get("jsonrpc") != "2.0" or doc.get("method") != "heartbeat":
            raise HeartbeatError("bad_rpc", "expected a JSON-RPC 2.0 call of method heartbeat")
        rpc, rpc_id = True, doc.get("id")
        if not isinstance(rpc_id, (str, int, type(None))) or isinstance(rpc_id, bool):
            raise HeartbeatError("bad_rpc", "bad JSON-RPC id")
        doc = doc.get("params")
        if isinstance(doc, list) and len(doc) == 1:
            doc = doc[0]
    if not isinstance(doc, dict):
        raise HeartbeatError("bad_shape", "expected a JSON object")
    agent_id = doc.get("agent_id")
    if not isinstance(agent_id, str) or not agent_id or len(agent_id) > 128:
        raise HeartbeatError("bad_field", "invalid agent_id")
    pid = doc.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2 ** 22:
        raise HeartbeatError("bad_field", "invalid pid")
    status = doc.get("status")
    if status not in STATUSES:
        raise HeartbeatError("bad_field", "status must be one of %s" % ", ".join(STATUSES))
    timestamp = doc.get("timestamp")
    if not isinstance(timestamp, str) or not _iso8601(timestamp):
        raise HeartbeatError("bad_field", "timestamp must be ISO 8601 (2025-12-05T10:00:00Z)")
    cpu = doc.get("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not \
                math.isfinite(cpu) or cpu < 0:
            raise HeartbeatError("bad_field", "cpu must be a percentage >= 0")
        cpu = float(cpu)
    memory = doc.get("memory")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, int) or not 0 <= memory < 2 ** 63:
            raise HeartbeatError("bad_field", "memory must be a whole number of bytes")
    return Heartbeat(agent_id, pid, status, timestamp, cpu, memory, rpc_id, rpc)


def rpc_reply(heartbeat, error=None):
    """The JSON-RPC answer line for a heartbeat that had an id, else b""."""
    if not heartbeat.rpc or heartbeat.rpc_id is None:
        return b""
    body = {"jsonrpc": "2.0", "id": heartbeat.rpc_id}
    if error:
        body["error"] = {"code": -32602, "message": error}
    else:
        body["result"] = {"message": "heartbeat received"}
    return json.dumps(body).encode() + b"\n"


def _no_constant(name):
    raise ValueError("%s is not allowed" % name)


def _iso8601(text):
    if len(text) > 64:
        return False
    t = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        datetime.fromisoformat(t)
    except ValueError:
        return False
    return True


class LineSplitter:
    """Bytes of a stream -> complete lines, each at most ``max_line`` bytes.
    A longer line is dropped through its newline; ``feed`` reports how many
    were dropped so the caller can count them."""

    def __init__(self, max_line=MAX_LINE):
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data):
        """-> (lines, dropped_count)."""
        lines, dropped = [], 0
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    if not self._discarding:
                        dropped += 1
                    self._discarding = True
                    del self._buf[:]
                return lines, dropped
            if self._discarding:
                self._discarding = False
            elif nl <= self.max_line:
                line = bytes(self._buf[:nl]).strip()
                if line:
                    lines.append(line)
            else:
                dropped += 1
            del self._buf[:nl + 1]
