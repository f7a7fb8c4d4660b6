"""The test agent as a standalone service (docs/protocol.md section 9.4): the
program the agent's service supervisor starts, watches and restarts in its
integration tests.

    python -m elkeid_devtools.sample_plugin service --config FILE
    sample-service --config FILE      (build.py service-exe: a zipapp)

Owns: its config file (YAML with PyYAML, else JSON; validated - a bad one at
start is one error line on stderr and exit 2, a bad one on reload is refused
and the old one kept), the heartbeat sender (one JSON line per beat, or a
JSON-RPC 2.0 call, on the agent's unix socket with reconnection; or ``POST``
to a loopback heartbeat URL), the loopback HTTP API (``GET /health``, ``POST
/reload``, ``GET /metrics``), graceful SIGTERM/SIGINT with a last
``stopping`` heartbeat, SIGHUP = reload, JSON log lines on stderr, and the
``misbehave:`` switches that make it fail on purpose. Every switch but
``daemonize`` and ``exit_at_start`` also takes effect on a reload, so a test
can make a running service misbehave; durations count from the moment the
config took effect.

It bundles only what the plugin executable bundles (no agent module beyond
errors/wire/sdk), hence its own small duration parser.
"""

import json
import logging
import math
import os
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from . import (_LEVELS, VERSION, ConfigError, CpuMeter, check_loopback, iso, log_to_stderr,
               rss_bytes, serve_http)

log = logging.getLogger("sample_service")

MB = 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
IO_TIMEOUT = 5.0
STATUSES = ("running", "stopping", "error")

DEFAULTS = {
    "agent_id": None, "heartbeat_interval": 30.0, "http_host": "127.0.0.1",
    "http_port": 8081, "port_file": "", "socket_path": "", "socket_protocol": "line",
    "heartbeat_url": "", "log_level": "info", "misbehave": None,
}
MISBEHAVE = {
    "stop_heartbeat_after": None, "burn_cpu": 0.0, "grow_memory_mb_per_sec": 0.0,
    "grow_memory_max_mb": 512.0, "crash_after": None, "crash_exit_code": 1,
    "exit_at_start": None, "ignore_sigterm": False, "daemonize": False,
    "flood_socket": None, "report_pid": None, "report_status": "running",
    "health_status": None, "metrics_status": None, "hang_http": False,
}
FLOOD = {"garbage_bytes_per_sec": 0, "huge_line_bytes": 0}
# Bound to the process or its listening socket: a reload reports them as
# restart_required instead of applying them.
START_ONLY = ("http_host", "http_port", "port_file", "misbehave.daemonize",
              "misbehave.exit_at_start")
GARBAGE = b"\xff\xfe{garbage: not json, not utf-8\n"


class ConfigUnreadable(ConfigError):
    """The file cannot be read at all (a reload answers 500, not 400)."""


# ---------------------------------------------------------------- config

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h))+")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(value):
    """Seconds from 30, 1.5, "30", "5s", "500ms", "1m30s"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a duration such as 5s, got %r" % (value,))
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION.fullmatch(text):
                raise ValueError("%r is not a duration (examples: 5s, 500ms, 1m30s, 2)"
                                 % value) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("%r is not a finite duration >= 0" % (value,))
    return seconds


def _int(value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError("expected a whole number %d..%d, got %r" % (lo, hi, value))
    return value


def _number(value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError("expected a number %g..%g, got %r" % (lo, hi, value))
    return float(value)


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError("expected true or false, got %r" % (value,))
    return value


def _string(value):
    if not isinstance(value, str):
        raise ValueError("expected a string, got %r" % (value,))
    return value


def _choice(choices):
    def check(value):
        if value not in choices:
            raise ValueError("expected one of %s, got %r" % (", ".join(choices), value))
        return value
    return check


def _agent_id(value):
    # What the agent's heartbeat parser accepts.
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise ValueError("expected a string of 1..128 characters, got %r" % (value,))
    return value


def _host(value):
    try:
        check_loopback(value, "http_host")
    except ConfigError as exc:
        raise ValueError(str(exc).split(" ", 1)[1]) from None
    return value


def _socket_path(value):
    _string(value)
    if len(value.encode()) > MAX_SOCKET_PATH:
        raise ValueError("longer than %d bytes" % MAX_SOCKET_PATH)
    return value


def _heartbeat_url(value):
    _string(value)
    if not value:
        return value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("expected http://127.0.0.1:PORT/heartbeat, got %r" % value)
    try:
        parts.port
    except ValueError as exc:
        raise ValueError("bad port in %r: %s" % (value, exc)) from None
    try:
        check_loopback(parts.hostname, "host")
    except ConfigError as exc:
        raise ValueError("%s: heartbeats stay on this host" % exc) from None
    return value


def _burn(value):
    if value is True:
        return 1.0
    if value is False:
        return 0.0
    return _number(value, 0, 1)


def _optional(check):
    return lambda value: None if value is None else check(value)


def _flood(value):
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"garbage_bytes_per_sec": value}
    return _mapping(value, FLOOD, {k: lambda v: _int(v, 0, 64 * MB) for k in FLOOD},
                    "misbehave.flood_socket.")


_TOP = {
    "agent_id": _agent_id, "heartbeat_interval": duration, "http_host": _host,
    "http_port": lambda v: _int(v, 0, 65535), "port_file": _string,
    "socket_path": _socket_path, "socket_protocol": _choice(("line", "jsonrpc")),
    "heartbeat_url": _heartbeat_url, "log_level": _choice(tuple(sorted(_LEVELS))),
    "misbehave": lambda v: _mapping(v, MISBEHAVE, _MISBEHAVE, "misbehave."),
}
_MISBEHAVE = {
    "stop_heartbeat_after": _optional(duration), "burn_cpu": _burn,
    "grow_memory_mb_per_sec": lambda v: _number(v, 0, 1024),
    "grow_memory_max_mb": lambda v: _number(v, 0, 16384),
    "crash_after": _optional(duration), "crash_exit_code": lambda v: _int(v, 0, 255),
    "exit_at_start": _optional(lambda v: _int(v, 0, 255)), "ignore_sigterm": _bool,
    "daemonize": _bool, "flood_socket": _flood,
    # Any whole number: a test may want the agent to refuse the pid.
    "report_pid": _optional(lambda v: _int(v, -2 ** 63, 2 ** 63 - 1)),
    "report_status": _choice(STATUSES),
    "health_status": _optional(lambda v: _int(v, 100, 599)),
    "metrics_status": _optional(lambda v: _int(v, 100, 599)), "hang_http": _bool,
}


def _mapping(doc, defaults, checks, prefix):
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("%s: expected a mapping, got %r" % (prefix.rstrip(".") or "config",
                                                              doc))
    unknown = sorted(str(k) for k in doc if k not in defaults)
    if unknown:
        raise ConfigError("unknown key(s): %s" % ", ".join(prefix + k for k in unknown))
    out = {}
    for key, default in defaults.items():
        value = doc.get(key)
        try:
            out[key] = checks[key](default if value is None else value)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError("%s%s: %s" % (prefix, key, exc)) from None
    return out


def validate(doc):
    """The file's mapping -> the normalised config; ConfigError naming the key."""
    cfg = _mapping(doc, DEFAULTS, _TOP, "")
    if not cfg["heartbeat_interval"] > 0:
        raise ConfigError("heartbeat_interval: must be > 0")
    if bool(cfg["socket_path"]) == bool(cfg["heartbeat_url"]):
        raise ConfigError("give exactly one of socket_path (the agent's unix socket) "
                          "and heartbeat_url (its POST /heartbeat endpoint)")
    if any(cfg["misbehave"]["flood_socket"].values()) and not cfg["socket_path"]:
        raise ConfigError("misbehave.flood_socket: needs socket_path")
    return cfg


def read_config(path):
    """The config file's mapping: JSON for a ``.json`` file or text starting
    with ``{``, YAML otherwise (PyYAML, when importable)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigUnreadable("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("%s is larger than %d bytes" % (path, MAX_CONFIG_BYTES))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("%s is not UTF-8" % path) from None
    if path.endswith(".json") or text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigError("%s is not valid JSON: %s" % (path, exc)) from None
    try:
        import yaml
    except ImportError:
        raise ConfigError("%s is YAML but PyYAML is not installed here: install it, or "
                          "write the config as JSON (a .json file)" % path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("%s is not valid YAML: %s"
                          % (path, " ".join(str(exc).split()))) from None
    except RecursionError:
        raise ConfigError("%s is nested too deeply" % path) from None


def load_config(path):
    return validate(read_config(path))


def start_only_changes(old, new):
    changed = []
    for key in START_ONLY:
        section, _, name = key.rpartition(".")
        a, b = (old[section], new[section]) if section else (old, new)
        if a[name] != b[name]:
            changed.append(key)
    return changed


# ---------------------------------------------------------------- senders

class SocketSender:
    """Heartbeats as lines on the agent's unix socket; connects lazily and
    again after any failure, so the agent may start or restart later."""

    def __init__(self, path, jsonrpc, counters):
        self.path, self.jsonrpc, self.counters = path, jsonrpc, counters
        self.sock = None
        self.lock = threading.Lock()
        self.rpc_id = 0
        self._replies = bytearray()

    def describe(self):
        return "unix:%s (%s)" % (self.path, "jsonrpc" if self.jsonrpc else "line")

    def heartbeat(self, fields):
        if self.jsonrpc:
            self.rpc_id += 1
            fields = {"jsonrpc": "2.0", "method": "heartbeat", "params": fields,
                      "id": self.rpc_id}
        self.send_raw(json.dumps(fields).encode() + b"\n")

    def send_raw(self, data):
        with self.lock:
            if self.sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(IO_TIMEOUT)
                try:
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    raise
                self.sock = sock
                self.counters["socket_connects"] += 1
            try:
                self._drain()
                self.sock.sendall(data)
            except OSError:
                self._close()
                raise

    def _drain(self):
        """Read what the agent answered so far (JSON-RPC results) without
        waiting; an end of stream means the agent closed the connection."""
        # select, not MSG_DONTWAIT: a socket with a timeout waits for that
        # timeout before any recv.
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("the agent closed the socket")
            self._replies += data
            *lines, rest = bytes(self._replies).split(b"\n")
            self._replies = bytearray(rest[-65536:])
            for line in lines:
                if not line.strip():
                    continue
                self.counters["rpc_replies"] += 1
                try:
                    ok = "result" in json.loads(line)
                except (ValueError, TypeError):
                    ok = False
                if not ok:
                    self.counters["rpc_errors"] += 1

    def _close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self):
        with self.lock:
            self._close()


class HttpSender:
    """Heartbeats as ``POST`` bodies to the agent's loopback endpoint."""

    def __init__(self, url):
        self.url = url
        # Never through a proxy from the environment: the target is loopback.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def describe(self):
        return self.url

    def heartbeat(self, fields):
        req = urllib.request.Request(self.url, data=json.dumps(fields).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(req, timeout=IO_TIMEOUT) as resp:
                resp.read(65536)
        except urllib.error.HTTPError as exc:
            body = exc.read(512).decode("utf-8", "replace")
            raise OSError("HTTP %d: %s" % (exc.code, body)) from None

    def send_raw(self, data):
        raise OSError("flooding needs socket_path")

    def close(self):
        pass


def make_sender(cfg, counters):
    if cfg["socket_path"]:
        return SocketSender(cfg["socket_path"], cfg["socket_protocol"] == "jsonrpc", counters)
    return HttpSender(cfg["heartbeat_url"])


def _target(cfg):
    return (cfg["socket_path"], cfg["socket_protocol"], cfg["heartbeat_url"])


# ---------------------------------------------------------------- service

class Service:
    def __init__(self, path, cfg):
        self.path = path
        self.config = cfg
        self.started = time.time()
        self.applied = time.monotonic()      # when the current config took effect
        self.counters = dict.fromkeys((
            "heartbeat_count", "heartbeat_failures", "socket_connects", "rpc_replies",
            "rpc_errors", "flood_bytes_sent", "flood_failures", "sigterm_ignored",
            "reloads", "reload_failures", "http_hung"), 0)
        self.sender = make_sender(cfg, self.counters)
        self.last_heartbeat = None
        self.last_heartbeat_ok = False
        self.heartbeats_stopped = False
        self.stopping = False
        self.cpu = CpuMeter()
        self.hog = []
        self.hog_bytes = 0
        self.http = None
        self.http_port = 0
        self.changed = threading.Condition()
        self.done = threading.Event()
        self.lock = threading.Lock()         # one reload at a time
        # Signal handlers only set flags and write to this pipe (through
        # set_wakeup_fd): the main loop does the work outside the handler.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.signals = []

    @property
    def misbehave(self):
        return self.config["misbehave"]

    def poke(self):
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------ config

    def reload(self):
        """-> (http code, message, restart_required)."""
        with self.lock:
            try:
                new = load_config(self.path)
            except ConfigError as exc:
                self.counters["reload_failures"] += 1
                log.error("reload refused, the old config stays: %s", exc)
                return (500 if isinstance(exc, ConfigUnreadable) else 400), str(exc), []
            old = self.config
            restart = start_only_changes(old, new)
            for key in restart:
                section, _, name = key.rpartition(".")
                (new[section] if section else new)[name] = \
                    (old[section] if section else old)[name]
            if _target(new) != _target(old):
                self.sender.close()
                self.sender = make_sender(new, self.counters)
            self.config = new
            self.applied = time.monotonic()
            self.heartbeats_stopped = False
            self.counters["reloads"] += 1
        logging.getLogger().setLevel(_LEVELS[new["log_level"]])
        with self.changed:
            self.changed.notify_all()
        self.poke()
        log.info("config reloaded", extra={"restart_required": restart,
                                           "misbehave": _active(new["misbehave"])})
        return 200, "config reloaded successfully", restart

    # ------------------------------------------------------------ heartbeat

    def heartbeat(self, status=None):
        m = self.misbehave
        after = m["stop_heartbeat_after"]
        if after is not None and time.monotonic() - self.applied >= after:
            if not self.heartbeats_stopped:
                self.heartbeats_stopped = True
                log.warning("heartbeats stopped on purpose (misbehave.stop_heartbeat_after)")
            return False
        now = time.time()
        fields = {
            "agent_id": self.config["agent_id"],
            "pid": os.getpid() if m["report_pid"] is None else m["report_pid"],
            "status": status or m["report_status"], "cpu": round(self.cpu.sample(), 2),
            "memory": rss_bytes(), "timestamp": iso(now), "version": VERSION,
            "heartbeat_count": self.counters["heartbeat_count"] + 1,
            "uptime": int(now - self.started), "http_port": self.http_port,
        }
        self.last_heartbeat = now
        try:
            self.sender.heartbeat(fields)
        except OSError as exc:
            self.counters["heartbeat_failures"] += 1
            self.last_heartbeat_ok = False
            log.warning("heartbeat failed: %s", exc, extra={"target": self.sender.describe()})
            return False
        self.counters["heartbeat_count"] += 1
        self.last_heartbeat_ok = True
        return True

    # ------------------------------------------------------------ http

    def _hang(self):
        """Accept and never answer, until a reload clears hang_http or the
        service stops; then close without an answer."""
        self.counters["http_hung"] += 1
        with self.changed:
            self.changed.wait_for(lambda: self.stopping or not self.misbehave["hang_http"])

    def health(self):
        now = time.time()
        interval = self.config["heartbeat_interval"]
        fresh = self.last_heartbeat is not None and now - self.last_heartbeat <= 3 * interval
        healthy = self.last_heartbeat_ok and fresh and not self.stopping
        code = 200 if healthy else 503
        if self.misbehave["health_status"] is not None:
            code = self.misbehave["health_status"]
            healthy = code < 300
        return code, {"status": "healthy" if healthy else "unhealthy",
                      "uptime": int(now - self.started),
                      "last_heartbeat": iso(self.last_heartbeat) if self.last_heartbeat
                      else None,
                      "agent_id": self.config["agent_id"]}

    def metrics(self):
        m = self.misbehave
        if m["metrics_status"] is not None and m["metrics_status"] >= 300:
            return m["metrics_status"], {"error": "metrics failing on purpose"}
        body = {"agent_id": self.config["agent_id"], "uptime": int(time.time() - self.started),
                "last_heartbeat": iso(self.last_heartbeat) if self.last_heartbeat else None,
                "cpu_percent": round(self.cpu.percent, 2), "memory_bytes": rss_bytes(),
                "status": "stopping" if self.stopping else m["report_status"],
                "pid": os.getpid(), "version": VERSION, "target": self.sender.describe(),
                "heartbeats_stopped": self.heartbeats_stopped,
                "memory_grown_bytes": self.hog_bytes, "misbehave": _active(m)}
        body.update(self.counters)
        return (m["metrics_status"] or 200), body

    def http_get(self, path):
        if path in ("/health", "/metrics") and self.misbehave["hang_http"]:
            self._hang()
            return None
        if path == "/health":
            return self.health()
        if path == "/metrics":
            return self.metrics()
        return 404, {"error": "not found"}

    def http_post(self, path):
        if path != "/reload":
            return 404, {"error": "not found"}
        code, message, restart = self.reload()
        body = {"success": code == 200, "message": message, "reloaded_at": iso(time.time())}
        if restart:
            body["restart_required"] = restart
        return code, body

    # ------------------------------------------------------------ misbehaviour

    def burn_loop(self):
        slice_ = 0.1
        while not self.done.is_set():
            fraction = self.misbehave["burn_cpu"]
            if fraction <= 0:
                with self.changed:
                    self.changed.wait(1.0)
                continue
            end = time.monotonic() + slice_ * fraction
            while time.monotonic() < end:
                pass
            if fraction < 1:
                self.done.wait(slice_ * (1 - fraction))

    def grow_loop(self):
        mark = time.monotonic()
        while not self.done.wait(0.1):
            m = self.misbehave
            now = time.monotonic()
            elapsed, mark = now - mark, now
            if m["grow_memory_mb_per_sec"] <= 0:
                if self.hog:
                    log.info("releasing grown memory", extra={"bytes": self.hog_bytes})
                    self.hog, self.hog_bytes = [], 0
                continue
            chunk = int(m["grow_memory_mb_per_sec"] * MB * elapsed)
            chunk = min(chunk, int(m["grow_memory_max_mb"] * MB) - self.hog_bytes)
            if chunk > 0:
                # Written bytes, not calloc'ed zero pages: the RSS must grow.
                self.hog.append(b"\x01" * chunk)
                self.hog_bytes += chunk

    def flood_loop(self):
        next_huge = time.monotonic()
        while not self.done.wait(0.1):
            flood = self.misbehave["flood_socket"]
            data = b""
            if flood["garbage_bytes_per_sec"]:
                n = max(1, flood["garbage_bytes_per_sec"] // 10)
                data += (GARBAGE * (n // len(GARBAGE) + 1))[:n]
            if flood["huge_line_bytes"] and time.monotonic() >= next_huge:
                # No newline: the agent's framing must drop it, and the
                # heartbeat line that follows with it.
                data += b"x" * flood["huge_line_bytes"]
                next_huge = time.monotonic() + 1.0
            if not data:
                continue
            try:
                self.sender.send_raw(data)
                self.counters["flood_bytes_sent"] += len(data)
            except OSError as exc:
                self.counters["flood_failures"] += 1
                log.debug("flood write failed: %s", exc)

    # ------------------------------------------------------------ signals

    def on_signal(self, signum, _frame):
        self.signals.append(signum)

    def handle_signals(self):
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                self.reload()
            elif signum == signal.SIGTERM and self.misbehave["ignore_sigterm"]:
                self.counters["sigterm_ignored"] += 1
                log.warning("ignoring SIGTERM on purpose (misbehave.ignore_sigterm)")
            else:
                log.info("signal received, stopping", extra={"signal": name})
                self.stopping = True

    # ------------------------------------------------------------ main

    def start_http(self):
        cfg = self.config
        self.http = serve_http(self, cfg["http_host"], cfg["http_port"],
                               "sample-service/" + VERSION)
        self.http_port = self.http.server_address[1]
        if cfg["port_file"]:
            _write_atomic(cfg["port_file"], "%d\n" % self.http_port)

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        signal.set_wakeup_fd(self._wake_w)
        self.start_http()
        for target in (self.burn_loop, self.grow_loop, self.flood_loop):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        log.info("started", extra={"version": VERSION, "pid": os.getpid(),
                                   "http_port": self.http_port,
                                   "target": self.sender.describe(),
                                   "misbehave": _active(self.misbehave)})
        next_beat = time.monotonic()
        applied = self.applied
        while True:
            self.handle_signals()
            if self.stopping:
                break
            now = time.monotonic()
            if self.applied != applied:
                applied = self.applied
                next_beat = min(next_beat, now + self.config["heartbeat_interval"])
            m = self.misbehave
            crash_at = None if m["crash_after"] is None else self.applied + m["crash_after"]
            if crash_at is not None and now >= crash_at:
                log.error("crashing on purpose (misbehave.crash_after)",
                          extra={"exit_code": m["crash_exit_code"]})
                _flush()
                os._exit(m["crash_exit_code"])
            if now >= next_beat:
                self.heartbeat()
                next_beat = time.monotonic() + self.config["heartbeat_interval"]
            due = min(t for t in (next_beat, crash_at) if t is not None)
            select.select([self._wake_r], [], [], max(0.0, due - time.monotonic()))
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        self.heartbeat("stopping")
        self.done.set()
        with self.changed:
            self.changed.notify_all()
        self.http.shutdown()
        self.http.server_close()
        self.sender.close()
        log.info("stopped")
        return 0


def _active(m):
    """The misbehaviour switches that are on (for logs and /metrics)."""
    return {k: v for k, v in m.items()
            if v != MISBEHAVE[k] and not (k == "flood_socket" and not any(v.values()))}


def _write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".port-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _flush():
    for handler in logging.getLogger().handlers:
        handler.flush()


def daemonize():
    """The classic double fork: the original process exits 0 at once, the
    grandchild (no session leader, so no controlling terminal) goes on. The
    working directory and stderr stay: the supervisor's log file is where
    its output belongs."""
    _flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    except OSError:
        pass


def _config_arg(argv):
    """--config FILE / --config=FILE, else a one-line reason."""
    path, rest = None, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--config" and rest:
            path = rest.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            raise ConfigError("unexpected argument %r (usage: --config FILE)" % arg)
    if not path:
        raise ConfigError("usage: --config FILE")
    return os.path.abspath(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = log_to_stderr()
    try:
        path = _config_arg(argv)
        cfg = load_config(path)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc, extra={"code": "D1002"})
        return 2
    root.setLevel(_LEVELS[cfg["log_level"]])
    m = cfg["misbehave"]
    if m["exit_at_start"] is not None:
        log.warning("exiting at once on purpose (misbehave.exit_at_start)",
                    extra={"exit_code": m["exit_at_start"]})
        return m["exit_at_start"]
    if m["daemonize"]:
        daemonize()
    service = Service(path, cfg)
    try:
        return service.run()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
