"""The agent's own logging: the local JSON log file and error lines sent home.

Owns three things:

* ``setup_logging``: JSON lines (the Go agent's zap layout: ``level``,
  ``timestamp``, ``source``, ``msg`` plus structured fields) written to
  ``<workdir>/log/elkeid-agent.log``, rotated by size with gzip-compressed
  backups ``elkeid-agent.log.1.gz`` .. ``.N.gz`` (docs/protocol.md section 7:
  1 MB, 10 backups, gzip), compressed by a background thread so no logging
  thread (the event loop included) waits for gzip.
* ``RemoteLogHandler``: error-level lines become DataType 1010 records for
  AgentCenter, rate-limited so a log storm cannot crowd out security data.
* ``task_failure_record``: the 5100 record that reports a failed task (the
  Go agent's ``log.ErrorWithToken``).

Structured fields are passed as ``log.error("msg", extra={"fields": {...}})``.
"""

import asyncio
import collections
import gzip
import json
import logging
import logging.handlers
import os
import shutil
import sys
import threading
import time

from .. import wire
from ..errors import LocalFault

LOG_DIR = "log"
LOG_NAME = "elkeid-agent.log"
DATA_TYPE_AGENT_LOG = 1010
DATA_TYPE_TASK_RESULT = 5100

# The keys every line carries; a structured field with the same name would
# silently replace them, so such a field is renamed instead.
_RESERVED = ("level", "timestamp", "source", "msg")

# Level names as zap spells them, so log tooling written for the Go agent
# keeps matching ("warn", not "warning").
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def level_name(levelno):
    if levelno in _LEVEL_NAMES:
        return _LEVEL_NAMES[levelno]
    return logging.getLevelName(levelno).lower()


def record_source(record):
    """``dir/file.py:line`` like zap's short caller (``agent/main.go:42``)."""
    parent = os.path.basename(os.path.dirname(record.pathname or ""))
    name = record.filename or "?"
    return "%s/%s:%d" % (parent, name, record.lineno) if parent else "%s:%d" % (name, record.lineno)


def record_fields(record):
    """The structured fields of a record as an ordered list of (key, value);
    keys that collide with the fixed ones get a ``fields.`` prefix."""
    fields = getattr(record, "fields", None)
    out = []
    if isinstance(fields, dict):
        for key, value in fields.items():
            key = str(key)
            if key in _RESERVED:
                key = "fields." + key
            out.append((key, value))
    return out


def _exception_text(formatter, record):
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = formatter.formatException(record.exc_info)
        return record.exc_text
    return None


class JSONFormatter(logging.Formatter):
    """One JSON object per line.

    ``timestamp`` is unix seconds as a string, exactly what the Go agent's
    encoder writes, so the same parsers read both agents' logs."""

    def format(self, record):
        obj = {
            "level": level_name(record.levelno),
            "timestamp": str(int(record.created)),
            "source": record_source(record),
            "msg": _safe_message(record),
        }
        for key, value in record_fields(record):
            obj[key] = value
        text = _exception_text(self, record)
        if text:
            obj.setdefault("error", text)
        if record.stack_info:
            obj.setdefault("stacktrace", record.stack_info)
        # default=str: a field that is not JSON-serializable (a Path, an
        # exception) is written as its text rather than losing the line.
        return json.dumps(obj, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """Human-readable lines for ``--console`` / foreground runs."""

    def format(self, record):
        parts = [
            time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)),
            level_name(record.levelno).upper(),
            record_source(record),
            _safe_message(record),
        ]
        parts.extend("%s=%s" % (k, _field_text(v)) for k, v in record_fields(record))
        line = " ".join(parts)
        text = _exception_text(self, record)
        if text:
            line += "\n" + text
        return line


def _safe_message(record):
    # A bad format string in a log call must not lose the line.
    try:
        return record.getMessage()
    except Exception:
        return "%s %r" % (record.msg, record.args)


def _field_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "%.8f" % value  # docs/protocol.md section 4: floats like "%.8f"
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, default=str, ensure_ascii=False)
        except Exception:
            return str(value)
    return str(value)


# ------------------------------------------------------------ file logging

class GzipRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose backups are gzip files, compressed off the
    logging thread.

    Logging happens on whatever thread logs, the event loop included, so a
    rollover only renames the live file to ``<name>.rotated.<n>`` and opens
    a new one: two metadata operations. A daemon thread owned by the
    handler then compresses each rotated file in order, shifts ``.1.gz`` ..
    ``.N.gz`` up and puts the result in ``.1.gz`` (the layout stays
    Elkeid's: ``.1.gz`` newest, at most N backups). ``compress(source,
    dest)`` is a seam for tests. Rotated files a crash left behind are
    compressed at the next start; if the worker falls more than N rotations
    behind, the oldest waiting file is deleted (counted), so the log
    directory stays bounded."""

    def __init__(self, filename, max_bytes, backups, metrics, compress=None):
        self.metrics = metrics
        self.compress = compress or _gzip_file
        self._jobs = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._seq = 0
        self._worker = None
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups,
                         encoding="utf-8", delay=False)
        leftovers = sorted(_rotated_files(self.baseFilename), key=lambda x: x[0])
        if leftovers:
            self._seq = leftovers[-1][0]
            for _n, path in leftovers:
                self._enqueue(path)

    def doRollover(self):
        if self.stream:
            self.stream.close()
            self.stream = None
        if self.backupCount > 0:
            self._seq += 1
            rotated = "%s.rotated.%d" % (self.baseFilename, self._seq)
            try:
                os.replace(self.baseFilename, rotated)
            except OSError:
                self.metrics.inc("log_rotate_errors")
                rotated = None
            if rotated is not None:
                self._enqueue(rotated)
        else:
            try:
                os.unlink(self.baseFilename)
            except OSError:
                self.metrics.inc("log_rotate_errors")
        if not self.delay:
            self.stream = self._open()

    def _enqueue(self, path):
        with self._cond:
            self._jobs.append(path)
            while len(self._jobs) > max(self.backupCount, 1):
                stale = self._jobs.popleft()
                self.metrics.inc("log_rotate_errors")
                _unlink(stale)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="elkeid-log-rotate",
                                                daemon=True)
                self._worker.start()
            self._cond.notify()

    def _work(self):
        while True:
            with self._cond:
                while not self._jobs:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                path = self._jobs.popleft()
                self._busy = True
            try:
                self._compress_one(path)
            except Exception:  # the worker must outlive any one file
                self.metrics.inc("log_rotate_errors")

    def _compress_one(self, source):
        dest = "%s.1.gz" % self.baseFilename
        tmp = dest + ".tmp"
        try:
            self.compress(source, tmp)
        except OSError:
            self.metrics.inc("log_rotate_errors")
            _unlink(tmp)
        else:
            for i in range(self.backupCount - 1, 0, -1):
                older = "%s.%d.gz" % (self.baseFilename, i)
                if os.path.exists(older):
                    try:
                        os.replace(older, "%s.%d.gz" % (self.baseFilename, i + 1))
                    except OSError:
                        self.metrics.inc("log_rotate_errors")
            try:
                # Atomic: a crash mid-compression leaves a .tmp, never a torn .gz.
                os.replace(tmp, dest)
                self.metrics.inc("log_rotations")
            except OSError:
                self.metrics.inc("log_rotate_errors")
                _unlink(tmp)
        # Either way the rotated file goes: keeping it would let the log
        # grow past its bound (e.g. when the disk is too full to compress).
        if not _unlink(source):
            self.metrics.inc("log_rotate_errors")

    def drain(self, timeout=None):
        """Wait until every rotated file is compressed; True if it is."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def handleError(self, record):
        # Count instead of printing a traceback to stderr for every line
        # while the disk is full.
        self.metrics.inc("log_write_errors")


def _gzip_file(source, dest):
    with open(source, "rb") as src, open(dest, "wb") as raw:
        # Level 6: about half the CPU of gzip's default 9 for the same size
        # on log text.
        with gzip.GzipFile(filename=os.path.basename(source), mode="wb",
                           fileobj=raw, compresslevel=6) as gz:
            shutil.copyfileobj(src, gz, 64 * 1024)


def _rotated_files(base):
    """(n, path) of ``<base>.rotated.<n>`` files in the log directory."""
    directory, name = os.path.split(base)
    prefix = name + ".rotated."
    out = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return out
    for entry in entries:
        tail = entry[len(prefix):]
        if entry.startswith(prefix) and tail.isdigit():
            out.append((int(tail), os.path.join(directory, entry)))
    return out


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


class LogHandles:
    """What ``setup_logging`` installed; ``close()`` undoes it."""

    def __init__(self, logger, path, file_handler, console_handler, previous_level):
        self.logger = logger
        self.path = path
        self.file_handler = file_handler
        self.console_handler = console_handler
        self.extra_handlers = []
        self._previous_level = previous_level

    @property
    def handlers(self):
        return [h for h in (self.file_handler, self.console_handler) if h] + self.extra_handlers

    def add(self, handler):
        """Attach another handler (e.g. RemoteLogHandler) so close() removes it."""
        self.logger.addHandler(handler)
        self.extra_handlers.append(handler)
        return handler

    def close(self):
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            try:
                handler.close()
            except Exception:
                pass
        self.extra_handlers = []
        self.file_handler = self.console_handler = None
        self.logger.setLevel(self._previous_level)


def setup_logging(workdir, metrics, max_bytes=1024 * 1024, backups=10,
                  level=logging.INFO, console=False, logger_name=""):
    """Send log records of ``logger_name`` (root by default, so grpc's and
    asyncio's warnings are kept too) to the rotating JSON file.

    Raises LocalFault when the log directory or file cannot be written; the
    caller decides what to do (the agent falls back to stderr)."""
    if max_bytes <= 0:
        raise LocalFault("log size limit must be positive, got %r" % (max_bytes,))
    if backups < 0:
        raise LocalFault("log backup count must not be negative, got %r" % (backups,))
    metrics.describe("log_rotations", "log file rotations")
    metrics.describe("log_rotate_errors", "failures while compressing or removing a rotated log")
    metrics.describe("log_write_errors", "log lines that could not be written")
    log_dir = os.path.join(workdir, LOG_DIR)
    path = os.path.join(log_dir, LOG_NAME)
    try:
        # 0700: lines may carry host details an unprivileged user should not read.
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        file_handler = GzipRotatingFileHandler(path, max_bytes, backups, metrics)
    except OSError as exc:
        raise LocalFault("cannot write the log file %s: %s" % (path, exc.strerror or exc)) from exc
    file_handler.setFormatter(JSONFormatter())
    file_handler.setLevel(level)

    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.addHandler(file_handler)
    console_handler = None
    if console:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(ConsoleFormatter())
        console_handler.setLevel(level)
        logger.addHandler(console_handler)
    logger.setLevel(level)
    return LogHandles(logger, path, file_handler, console_handler, previous)


# ---------------------------------------------------------- remote logging

class RemoteLogHandler(logging.Handler):
    """Turns ERROR and above into 1010 records handed to ``sink(bytes)``.

    Rate limit: a token bucket holding ``per_minute`` tokens, refilled at
    ``per_minute`` per minute. Suppressed lines are counted
    (``log_remote_suppressed``) and the next line that passes is preceded by
    one 1010 saying how many were dropped. ``per_minute <= 0`` sends nothing.

    Threads: ``sink`` (the record queue) belongs to the loop thread. With a
    ``loop`` set, a call from any other thread is handed over with
    ``call_soon_threadsafe``; without one, ``sink`` is called directly.

    It never raises and never recurses: a log call made while emitting (by the
    sink, or by anything it calls) is dropped and counted, not re-emitted.
    """

    def __init__(self, sink, metrics, per_minute=60, loop=None, level=logging.ERROR,
                 clock=time.monotonic, wall=time.time):
        super().__init__(level)
        self.sink = sink
        self.metrics = metrics
        self.loop = loop
        self.per_minute = per_minute
        self._clock = clock
        self._wall = wall
        self._capacity = float(max(per_minute, 0))
        self._tokens = self._capacity
        self._refilled = clock()
        self._suppressed = 0
        self._local = threading.local()
        self._formatter = logging.Formatter()  # only for exception text
        metrics.describe("log_remote_sent", "error log lines sent to the server as 1010")
        metrics.describe("log_remote_suppressed", "error log lines not sent because of the rate limit")
        metrics.describe("log_remote_errors", "error log lines lost while building or queueing a 1010")

    def set_loop(self, loop):
        self.loop = loop

    def _take_token(self):
        now = self._clock()
        elapsed = now - self._refilled
        self._refilled = now
        if elapsed > 0:
            self._tokens = min(self._capacity, self._tokens + elapsed * self.per_minute / 60.0)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def emit(self, record):
        local = self._local
        if getattr(local, "busy", False):
            # Logged from inside our own emit (e.g. the sink logged an
            # error): sending it would loop forever.
            self._count("log_remote_errors", reason="recursion")
            return
        self._guarded(self._emit, record, "emit")

    def _guarded(self, fn, arg, reason):
        """Run fn(arg) with this thread marked busy; count, never raise."""
        local = self._local
        was_busy = getattr(local, "busy", False)
        local.busy = True
        try:
            fn(arg)
        except Exception:
            self._count("log_remote_errors", reason=reason)
        finally:
            local.busy = was_busy

    def _emit(self, record):
        # handle() holds self.lock around emit, so the bucket and the
        # suppressed count are only touched by one thread at a time.
        if self.per_minute <= 0 or not self._take_token():
            self._suppressed += 1
            self._count("log_remote_suppressed")
            return
        bodies = []
        if self._suppressed:
            bodies.append(self.summary_record(self._suppressed))
            self._suppressed = 0
        bodies.append(self.build_record(record))
        for body in bodies:
            self._deliver(body)
        self._count("log_remote_sent")

    def summary_record(self, dropped):
        return wire.encode_record(DATA_TYPE_AGENT_LOG, int(self._wall()), {
            "level": "warn",
            "msg": "%d error log lines were not sent (rate limit %d per minute)"
                   % (dropped, self.per_minute),
            "source": "elkeid_agent/runtime/logs.py",
            "suppressed": str(dropped),
        })

    def build_record(self, record):
        fields = {}
        for key, value in record_fields(record):
            fields[key] = _field_text(value)
        text = _exception_text(self._formatter, record)
        if text:
            fields.setdefault("error", text)
        fields["level"] = level_name(record.levelno)
        fields["msg"] = _safe_message(record)
        fields["source"] = record_source(record)
        return wire.encode_record(DATA_TYPE_AGENT_LOG, int(record.created), fields)

    def _deliver(self, body):
        loop = self.loop
        if loop is not None and not _on_loop(loop):
            try:
                loop.call_soon_threadsafe(self._sink_safely, body)
            except RuntimeError:  # the loop is closed: nowhere to send it
                self._count("log_remote_errors", reason="loop_closed")
            return
        self._sink_safely(body)

    def _sink_safely(self, body):
        # Runs on the loop thread when handed over, so guard again there.
        self._guarded(self.sink, body, "sink")

    def _count(self, name, **labels):
        try:
            self.metrics.inc(name, **labels)
        except Exception:
            pass

    def handleError(self, record):
        self._count("log_remote_errors", reason="emit")


def _on_loop(loop):
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def task_failure_record(token, msg, now=None):
    """The 5100 record reporting a failed task (fields token, msg, status)."""
    when = int(time.time() if now is None else now)
    return wire.encode_record(DATA_TYPE_TASK_RESULT, when,
                              {"token": str(token), "msg": str(msg), "status": "failed"})
