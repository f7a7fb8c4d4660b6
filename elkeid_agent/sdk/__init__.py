"""Python plugin SDK for Elkeid (and this agent). Standard library only.

A plugin is an executable the agent starts with the task pipe on fd 3, the
record pipe on fd 4 and, when ``ELKEID_PLUGIN_HIGH_PRIORITY_PIPE`` is set, a
high-priority record pipe on fd 5 (docs/protocol.md section 1)::

    from elkeid_agent.sdk import Client
    client = Client()
    client.send_record(6000, {"msg": "hello"})
    for task in client.tasks():        # ends when the agent closes fd 3
        ...
    client.close()

Writes behave like Elkeid's Go SDK: a 512 KiB buffer, flushed when full and
every 200 ms by a background thread; ``flush()`` forces it. When the agent
goes away, ``receive_task`` returns None and ``client.closed`` is set (the
agent closes fd 3 first when it stops a plugin and keeps reading records for
a while, so a plugin can still flush its last records); once the record pipe
is gone, sends raise ``ClientClosed``. A plugin's main loop thus ends
cleanly instead of spinning on errors.

``client.log_handler()`` is a ``logging.Handler`` that sends log lines as
DataType 1011 records with the fields Elkeid's Go logger uses (``level``,
``msg``, ``source``, plus structured extras), sampled like zap: at most 4
identical messages per second.

``JsonFormatter`` writes JSON log lines (for stderr, which the agent keeps
in ``<name>.stderr``).
"""

import json
import logging
import os
import struct
import threading
import time
import traceback
from collections import namedtuple

from .. import wire

TASK_FD = 3
RECORD_FD = 4
HIGH_PRIORITY_FD = 5
HIGH_PRIORITY_ENV = "ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"
PLUGIN_LOG = 1011
BUFFER_SIZE = 512 * 1024
FLUSH_INTERVAL = 0.2
MAX_TASK = 64 * 1024 * 1024

_U32 = struct.Struct("<I")

Task = namedtuple("Task", "data_type object_name data token")


class ClientClosed(Exception):
    """The agent closed the pipes (or is gone)."""


class _Writer:
    """One buffered record pipe."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.broken = False

    def write(self, frame, client):
        with self.lock:
            if self.broken:
                raise ClientClosed("the agent closed the record pipe")
            self.buf += frame
            if len(self.buf) >= self.size:
                self._flush(client)

    def flush(self, client):
        with self.lock:
            self._flush(client)

    def _flush(self, client):
        if self.broken:
            raise ClientClosed("the agent closed the record pipe")
        if not self.buf:
            return
        if client.on_flush is not None:
            client.on_flush(self.fd, self.buf)
        view = memoryview(self.buf)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            self.broken = True
            client._mark_closed()
            raise ClientClosed("record pipe: %s" % exc) from None
        finally:
            view.release()
            self.buf.clear()


class Client:
    """Plugin side of the agent IPC."""

    def __init__(self, task_fd=TASK_FD, record_fd=RECORD_FD, high_priority_fd=None,
                 buffer_size=BUFFER_SIZE, flush_interval=FLUSH_INTERVAL, flusher=True):
        if high_priority_fd is None and os.environ.get(HIGH_PRIORITY_ENV):
            high_priority_fd = HIGH_PRIORITY_FD
        self.task_fd = task_fd
        self.closed = threading.Event()
        self._normal = _Writer(record_fd, buffer_size)
        self._high = _Writer(high_priority_fd, buffer_size) if high_priority_fd is not None \
            else self._normal
        self._rlock = threading.Lock()
        self._rbuf = b""
        self._fds = {task_fd, record_fd} | ({high_priority_fd} - {None})
        self.flush_interval = flush_interval
        # ``on_flush(fd, buffer)``: called with the bytes a flush is about to
        # write (instrumentation: benchmarks time the agent from here).
        self.on_flush = None
        self._stop = threading.Event()
        self._flusher = None
        if flusher:
            self._flusher = threading.Thread(target=self._flush_loop, name="elkeid-sdk-flush",
                                             daemon=True)
            self._flusher.start()

    @property
    def has_high_priority_pipe(self):
        return self._high is not self._normal

    # ------------------------------------------------------------ sending

    def send_record(self, data_type, fields, timestamp=None):
        """Queue one record. ``fields`` maps str to str (other values are
        converted with str()). ``timestamp`` defaults to now (unix seconds)."""
        self.send_raw(self.encode(data_type, fields, timestamp))

    def send_record_high_priority(self, data_type, fields, timestamp=None):
        """Like send_record, on fd 5 when the agent offers it (records there
        leave the agent ahead of normal ones); on fd 4 otherwise."""
        self.send_raw(self.encode(data_type, fields, timestamp), high_priority=True)

    @staticmethod
    def encode(data_type, fields, timestamp=None):
        if timestamp is None:
            timestamp = int(time.time())
        clean = {str(k): v if isinstance(v, (str, bytes)) else str(v) for k, v in fields.items()}
        return wire.encode_record(int(data_type), int(timestamp), clean)

    def send_raw(self, body, high_priority=False):
        """Queue an already serialized Record. Raises ClientClosed once the
        agent no longer reads (a plugin may still send after the task pipe
        closed: the agent keeps reading while the plugin winds down)."""
        writer = self._high if high_priority else self._normal
        writer.write(_U32.pack(len(body)) + body, self)

    def flush(self):
        self._normal.flush(self)
        if self._high is not self._normal:
            self._high.flush(self)

    def _flush_loop(self):
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except ClientClosed:
                return

    # ------------------------------------------------------------ receiving

    def receive_task(self):
        """Block for the next Task; None once the agent closed fd 3."""
        with self._rlock:
            header = self._read_exact(4)
            if header is None:
                self._mark_closed()
                return None
            n = _U32.unpack(header)[0]
            if n > MAX_TASK:
                self._mark_closed()
                raise ClientClosed("task frame of %d bytes: the task pipe is corrupt" % n)
            body = self._read_exact(n) if n else b""
            if body is None:
                self._mark_closed()
                return None
        return Task(*wire.decode_task(body))

    def tasks(self):
        """Iterate over tasks until the agent closes the task pipe."""
        while True:
            task = self.receive_task()
            if task is None:
                return
            yield task

    def _read_exact(self, n):
        buf = self._rbuf
        while len(buf) < n:
            try:
                chunk = os.read(self.task_fd, max(65536, n - len(buf)))
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self._rbuf = b""
                return None
            buf += chunk
        self._rbuf = buf[n:]
        return buf[:n]

    # ------------------------------------------------------------ closing

    def _mark_closed(self):
        self.closed.set()

    def close(self):
        """Flush what is buffered and close the pipes."""
        self._stop.set()
        try:
            self.flush()
        except ClientClosed:
            pass
        self.closed.set()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ logging

    def log_handler(self, level=logging.INFO, per_second=4, clock=time.monotonic):
        return RecordLogHandler(self, level, per_second, clock)


_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
           logging.ERROR: "error", logging.CRITICAL: "fatal"}

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def level_name(levelno):
    if levelno in _LEVELS:
        return _LEVELS[levelno]
    return logging.getLevelName(levelno).lower()


def structured_fields(record, stringify=True):
    """Fields of a LogRecord as Elkeid's zap encoder names them; with
    ``stringify`` every value is a str (records carry string maps)."""
    fields = {
        "level": level_name(record.levelno),
        "msg": record.getMessage(),
        "source": "%s:%d" % (os.path.basename(record.pathname), record.lineno),
    }
    if record.name and record.name != "root":
        fields["logger"] = record.name
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            if stringify and not isinstance(value, str):
                value = json.dumps(value, default=str)
            fields[key] = value
    if record.exc_info:
        fields["stacktrace"] = "".join(traceback.format_exception(*record.exc_info))
    return fields


class RecordLogHandler(logging.Handler):
    """Log lines -> DataType 1011 records (Elkeid's remote log writer)."""

    def __init__(self, client, level=logging.INFO, per_second=4, clock=time.monotonic):
        super().__init__(level)
        self.client = client
        self.per_second = per_second
        self.clock = clock
        self.sampled_out = 0
        self._window = None
        self._seen = {}

    def _admit(self, record):
        now = int(self.clock())
        if now != self._window:
            self._window = now
            self._seen = {}
        key = (record.levelno, record.msg)
        count = self._seen.get(key, 0) + 1
        self._seen[key] = count
        return count <= self.per_second

    def emit(self, record):
        try:
            if not self._admit(record):
                self.sampled_out += 1
                return
            fields = structured_fields(record)
            self.client.send_record(PLUGIN_LOG, fields, int(record.created))
        except ClientClosed:
            pass
        except Exception:
            self.handleError(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339 UTC), level, msg, source, extras."""

    def format(self, record):
        fields = structured_fields(record, stringify=False)
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + ".%03dZ" % (record.msecs,)}
        out.update(fields)
        return json.dumps(out, ensure_ascii=False, default=str)
