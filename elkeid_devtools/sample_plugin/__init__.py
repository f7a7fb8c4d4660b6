"""The sample plugin: the test agent of docs/protocol.md section 9.4 as an
Elkeid plugin, on the SDK (``service.py`` is the same agent as a standalone
service: ``python -m elkeid_devtools.sample_plugin service --config FILE``).

What it does (the test agent's P0-P2, adapted to the plugin IPC):
- reads a JSON config file (``--config PATH``, env ``SAMPLE_PLUGIN_CONFIG``,
  else ``config.json`` in its directory if present), overlaid by the JSON
  object in ``DETAIL`` (the server's per-plugin detail string);
- sends a heartbeat record (DataType 9001) every ``heartbeat_interval``
  seconds with the test agent's fields: agent_id pid status cpu memory timestamp
  (plus counters and the HTTP port);
- serves ``GET /health``, ``POST /reload`` and ``GET /metrics`` on a loopback
  address (``http_host`` must be 127.0.0.0/8, ::1 or localhost;
  ``http_port`` 0 picks a free port, reported in every heartbeat);
- answers tasks: 9010 echo, 9011 reload, 9012 set load (data = JSON of the
  ``load`` section), 9013 heartbeat now; each answered with a 9003 record
  carrying the task's token;
- load mode: ``load.records_per_sec`` records/s (-1 = as fast as it can) of
  ``load.record_size`` bytes (DataType ``load.data_type``, fields ``pad`` and
  a 12-digit ``seq``), for benchmarks; ``load.flush_log`` (a path) logs
  each SDK flush's time and last ``seq`` for latency benchmarks;
- JSON log lines on stderr (kept by the agent in ``<name>.stderr``), and
  log lines at ``remote_log_level`` or above as 1011 records;
- SIGTERM/SIGINT, or the agent closing the task pipe: a last heartbeat with
  status ``stopping``, flush, exit 0.

Build it as a plugin executable with ``python -m elkeid_devtools.sample_plugin.build``.
"""

import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from elkeid_agent import sdk, wire

VERSION = "1.0.0"
HEARTBEAT = 9001
LOAD = 9002
TASK_RESULT = 9003
TASK_ECHO, TASK_RELOAD, TASK_SET_LOAD, TASK_HEARTBEAT = 9010, 9011, 9012, 9013

DEFAULTS = {
    "agent_id": "",
    "heartbeat_interval": 30.0,
    "http_host": "127.0.0.1",
    "http_port": 8081,
    "log_level": "info",
    "remote_log_level": "warning",
    "load": {"records_per_sec": 0, "record_size": 200, "data_type": LOAD,
             "high_priority": False, "flush_log": ""},
}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR}
SEQ_WIDTH = 12

log = logging.getLogger("sample_plugin")


class ConfigError(ValueError):
    pass


def _merge(base, over):
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(cfg):
    """Check types and ranges; returns the config with numbers normalised."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError("unknown config key(s): %s" % ", ".join(sorted(unknown)))
    try:
        interval = float(cfg["heartbeat_interval"])
        port = int(cfg["http_port"])
        load = dict(cfg["load"])
        rate = float(load["records_per_sec"])
        size = int(load["record_size"])
        data_type = int(load["data_type"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError("bad config value: %s" % exc) from None
    if set(load) - set(DEFAULTS["load"]):
        raise ConfigError("unknown load key(s): %s"
                          % ", ".join(sorted(set(load) - set(DEFAULTS["load"]))))
    if not interval > 0:
        raise ConfigError("heartbeat_interval must be > 0")
    if not 0 <= port <= 65535:
        raise ConfigError("http_port must be 0..65535")
    if rate < 0 and rate != -1:
        raise ConfigError("load.records_per_sec must be >= 0, or -1 for as fast as possible")
    if not 64 <= size <= 1024 * 1024:
        raise ConfigError("load.record_size must be 64..1048576")
    check_loopback(cfg["http_host"], "http_host")
    for key in ("log_level", "remote_log_level"):
        if cfg[key] not in _LEVELS:
            raise ConfigError("%s must be one of %s" % (key, ", ".join(sorted(_LEVELS))))
    out = dict(cfg)
    out["heartbeat_interval"] = interval
    out["http_port"] = port
    load.update(records_per_sec=rate, record_size=size, data_type=data_type,
                high_priority=bool(load.get("high_priority")),
                flush_log=str(load.get("flush_log") or ""))
    out["load"] = load
    return out


def check_loopback(host, key):
    """ConfigError unless ``host`` is a loopback IP address or localhost: the
    test agent's HTTP traffic must stay on the host."""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except (TypeError, ValueError):
        raise ConfigError("%s %r is not an IP address or localhost" % (key, host)) from None
    if not address.is_loopback:
        raise ConfigError("%s %r is not a loopback address" % (key, host))


def load_config(path, detail, required=False):
    cfg = dict(DEFAULTS)
    if path and (required or os.path.exists(path)):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError("cannot read config %s: %s" % (path, exc)) from None
        if not isinstance(data, dict):
            raise ConfigError("config %s is not a JSON object" % path)
        cfg = _merge(cfg, data)
    if detail:
        try:
            data = json.loads(detail)
        except ValueError as exc:
            raise ConfigError("DETAIL is not JSON: %s" % exc) from None
        if not isinstance(data, dict):
            raise ConfigError("DETAIL is not a JSON object")
        cfg = _merge(cfg, data)
    return validate(cfg)


def iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class LoadTemplate:
    """Pre-encoded record of a fixed size whose last 12 bytes are the
    sequence number: a load record costs a bytes concatenation."""

    def __init__(self, data_type, size, timestamp):
        pad = max(0, size - 32)
        for _ in range(8):
            body = wire.encode_record(data_type, timestamp,
                                      {"pad": "x" * pad, "seq": "0" * SEQ_WIDTH})
            if len(body) == size or pad == 0:
                break
            pad = max(0, pad + size - len(body))
        self.prefix = body[:-SEQ_WIDTH]
        self.size = len(body)

    def body(self, seq):
        return self.prefix + b"%012d" % (seq % 10 ** SEQ_WIDTH)


class SamplePlugin:
    def __init__(self, client, name, config_path, config_required, detail):
        self.client = client
        self.name = name
        self.config_path = config_path
        self.config_required = config_required
        self.detail = detail
        self.config = load_config(config_path, detail, config_required)
        self.agent_id = self.config["agent_id"] or name
        self.stop = threading.Event()
        self.load_changed = threading.Event()
        self.lock = threading.Lock()
        self.started = time.time()
        self.status = "running"
        self.heartbeat_count = 0
        self.heartbeat_failures = 0
        self.last_heartbeat = None
        self.last_heartbeat_ok = True
        self.records_sent = 0
        self.record_bytes_sent = 0
        self.tasks_received = 0
        self.cpu = CpuMeter()
        self.http = None
        self.http_port = 0
        self._flush_log = None
        if self.config["load"]["flush_log"]:
            self._flush_log = open(self.config["load"]["flush_log"], "a", buffering=1)
            client.on_flush = self._log_flush

    def _log_flush(self, _fd, buf):
        """``load.flush_log``: one line per SDK flush, "<time.time()> <seq of
        the last record in it>", so a benchmark can time the agent from the
        plugin's write to the server's receipt (plugin_bench.agent_latency)."""
        tail = bytes(buf[-SEQ_WIDTH:])
        if tail.isdigit():
            self._flush_log.write("%.6f %d\n" % (time.time(), int(tail)))

    # ------------------------------------------------------------ config

    def reload(self):
        try:
            cfg = load_config(self.config_path, self.detail, self.config_required)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            return False, str(exc), []
        with self.lock:
            old = self.config
            self.config = cfg
            self.agent_id = cfg["agent_id"] or self.name
        apply_log_levels(cfg)
        self.load_changed.set()
        restart = [k for k in ("http_host", "http_port") if cfg[k] != old[k]]
        log.info("config reloaded", extra={"restart_required": restart})
        return True, "config reloaded successfully", restart

    def set_load(self, data):
        try:
            update = json.loads(data or "{}")
            if not isinstance(update, dict):
                raise ConfigError("load update is not a JSON object")
            with self.lock:
                cfg = validate(_merge(self.config, {"load": update}))
                self.config = cfg
        except (ValueError, ConfigError) as exc:
            return False, str(exc)
        self.load_changed.set()
        return True, "load set to %s" % json.dumps(cfg["load"], sort_keys=True)

    # ------------------------------------------------------------ heartbeat

    def _sample(self):
        return self.cpu.sample(), rss_bytes()

    def heartbeat(self, status=None):
        cpu, rss = self._sample()
        now = time.time()
        fields = {
            "agent_id": self.agent_id, "pid": os.getpid(), "status": status or self.status,
            "cpu": "%.2f" % cpu, "memory": rss, "timestamp": iso(now),
            "heartbeat_count": self.heartbeat_count + 1, "uptime": int(now - self.started),
            "http_port": self.http_port, "version": VERSION,
            "records_sent": self.records_sent,
            "load_records_per_sec": self.config["load"]["records_per_sec"],
        }
        try:
            self.client.send_record(HEARTBEAT, fields, int(now))
            self.client.flush()
        except sdk.ClientClosed:
            self.heartbeat_failures += 1
            self.last_heartbeat_ok = False
            log.error("heartbeat failed: the agent closed the record pipe")
            self.stop.set()
            return False
        self.heartbeat_count += 1
        self.last_heartbeat = now
        self.last_heartbeat_ok = True
        return True

    def health(self):
        now = time.time()
        interval = self.config["heartbeat_interval"]
        stale = self.last_heartbeat is None or now - self.last_heartbeat > 3 * interval
        healthy = self.last_heartbeat_ok and not stale and self.status == "running"
        body = {"status": "healthy" if healthy else "unhealthy",
                "uptime": int(now - self.started),
                "last_heartbeat": iso(self.last_heartbeat) if self.last_heartbeat else None,
                "agent_id": self.agent_id}
        return (200 if healthy else 503), body

    def metrics(self):
        cpu, rss = self.cpu.percent, rss_bytes()
        return {"agent_id": self.agent_id, "uptime": int(time.time() - self.started),
                "heartbeat_count": self.heartbeat_count,
                "heartbeat_failures": self.heartbeat_failures,
                "last_heartbeat": iso(self.last_heartbeat) if self.last_heartbeat else None,
                "cpu_percent": round(cpu, 2), "memory_bytes": rss, "status": self.status,
                "records_sent": self.records_sent, "record_bytes_sent": self.record_bytes_sent,
                "tasks_received": self.tasks_received,
                "load": self.config["load"]}

    # ------------------------------------------------------------ tasks

    def handle_task(self, task):
        self.tasks_received += 1
        if task.data_type == TASK_ECHO:
            ok, msg = True, "echo"
        elif task.data_type == TASK_RELOAD:
            ok, msg, _ = self.reload()
        elif task.data_type == TASK_SET_LOAD:
            ok, msg = self.set_load(task.data)
        elif task.data_type == TASK_HEARTBEAT:
            ok, msg = self.heartbeat(), "heartbeat sent"
        else:
            ok, msg = False, "unknown task type %d" % task.data_type
        if not ok:
            log.warning("task failed: %s", msg, extra={"token": task.token})
        try:
            self.client.send_record(TASK_RESULT, {
                "token": task.token, "task_data_type": task.data_type,
                "status": "succeed" if ok else "failed", "msg": msg, "data": task.data})
            self.client.flush()
        except sdk.ClientClosed:
            self.stop.set()

    def task_loop(self):
        for task in self.client.tasks():
            try:
                self.handle_task(task)
            except Exception:
                log.exception("task handler crashed")
        log.info("the agent closed the task pipe; stopping")
        self.stop.set()

    # ------------------------------------------------------------ load

    def load_loop(self):
        seq = 0
        template = None
        while not self.stop.is_set():
            load = self.config["load"]
            rate = load["records_per_sec"]
            if rate == 0:
                self.load_changed.wait(0.5)
                self.load_changed.clear()
                continue
            self.load_changed.clear()
            started = time.monotonic()
            sent_here = 0
            send = self.client.send_raw
            high = load["high_priority"]
            try:
                while not self.stop.is_set() and not self.load_changed.is_set():
                    now = int(time.time())
                    if template is None or template[0] != now:
                        t = LoadTemplate(load["data_type"], load["record_size"], now)
                        template = (now, t)
                    t = template[1]
                    if rate < 0:
                        batch = 512
                    else:
                        due = int((time.monotonic() - started) * rate) - sent_here
                        if due <= 0:
                            time.sleep(0.005)
                            continue
                        batch = min(due, 4096)
                    for _ in range(batch):
                        send(t.body(seq), high)
                        seq += 1
                    sent_here += batch
                    self.records_sent += batch
                    self.record_bytes_sent += batch * t.size
            except sdk.ClientClosed:
                log.error("load stopped: the agent closed the record pipe")
                self.stop.set()

    # ------------------------------------------------------------ http

    def http_get(self, path):
        if path == "/health":
            return self.health()
        if path == "/metrics":
            return 200, self.metrics()
        return 404, {"error": "not found"}

    def http_post(self, path):
        if path != "/reload":
            return 404, {"error": "not found"}
        ok, message, restart = self.reload()
        body = {"success": ok, "message": message, "reloaded_at": iso(time.time())}
        if restart:
            body["restart_required"] = restart
        return (200 if ok else 400), body

    def start_http(self):
        self.http = serve_http(self, self.config["http_host"], self.config["http_port"],
                               "sample-plugin/" + VERSION)
        self.http_port = self.http.server_address[1]

    # ------------------------------------------------------------ main

    def run(self):
        self.start_http()
        threading.Thread(target=self.task_loop, name="tasks", daemon=True).start()
        threading.Thread(target=self.load_loop, name="load", daemon=True).start()
        self.heartbeat("starting")
        next_beat = time.monotonic() + self.config["heartbeat_interval"]
        while not self.stop.is_set():
            timeout = next_beat - time.monotonic()
            if timeout > 0 and self.stop.wait(timeout):
                break
            self.heartbeat()
            next_beat = time.monotonic() + self.config["heartbeat_interval"]
        self.status = "stopping"
        log.info("stopping")
        self.heartbeat("stopping")
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.client.close()
        return 0


def serve_http(app, host, port, server_version):
    """A loopback JSON API in daemon threads. ``app.http_get(path)`` and
    ``app.http_post(path)`` answer ``(code, body)``, or None to close the
    connection without an answer."""

    class Handler(BaseHTTPRequestHandler):

        def _send(self, answer):
            if answer is None:
                self.close_connection = True
                return
            code, body = answer
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(app.http_get(self.path))

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if length > 0:
                self.rfile.read(min(length, 65536))
            self._send(app.http_post(self.path))

        def log_message(self, fmt, *args):
            log.debug("http " + fmt, *args)

    Handler.server_version = server_version
    server_cls = ThreadingHTTPServer
    if ":" in host:
        class V6(ThreadingHTTPServer):
            address_family = socket.AF_INET6
        server_cls = V6
    server = server_cls((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("http listening", extra={"host": host, "port": server.server_address[1]})
    return server


def _cpu_seconds():
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """This process's CPU use in percent of one core since the last sample."""

    def __init__(self):
        self._mark = (time.monotonic(), _cpu_seconds())
        self.percent = 0.0

    def sample(self):
        now, cpu = time.monotonic(), _cpu_seconds()
        mark_t, mark_cpu = self._mark
        if now > mark_t:
            self.percent = max(0.0, (cpu - mark_cpu) / (now - mark_t) * 100)
        self._mark = (now, cpu)
        return self.percent


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def apply_log_levels(cfg):
    logging.getLogger().setLevel(_LEVELS[cfg["log_level"]])
    for handler in logging.getLogger().handlers:
        if isinstance(handler, sdk.RecordLogHandler):
            handler.setLevel(_LEVELS[cfg["remote_log_level"]])


def log_to_stderr():
    """JSON log lines on stderr at info; returns the root logger."""
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(sdk.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(stderr)
    root.setLevel(logging.INFO)
    return root


def _args(argv):
    path, required = None, False
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            path, required = next(it, None), True
        elif arg.startswith("--config="):
            path, required = arg.split("=", 1)[1], True
    if path is None and os.environ.get("SAMPLE_PLUGIN_CONFIG"):
        path, required = os.environ["SAMPLE_PLUGIN_CONFIG"], True
    if path is None:
        path = os.path.join(os.getcwd(), "config.json")
    return path, required


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["service"]:
        from . import service
        return service.main(argv[1:])
    name = os.path.basename(sys.argv[0] or "sample") or "sample"
    root = log_to_stderr()
    try:
        os.fstat(sdk.TASK_FD)
        os.fstat(sdk.RECORD_FD)
    except OSError:
        log.error("fds 3 and 4 are not open: run me as a plugin of elkeid-agent")
        return 2
    client = sdk.Client()
    remote = client.log_handler(logging.WARNING)
    root.addHandler(remote)
    path, required = _args(argv)
    try:
        plugin = SamplePlugin(client, name, path, required, os.environ.get("DETAIL", ""))
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        client.close()
        return 2
    apply_log_levels(plugin.config)

    def on_signal(signum, _frame):
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        plugin.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("started", extra={"version": VERSION, "pid": os.getpid(),
                               "high_priority_pipe": client.has_high_priority_pipe})
    return plugin.run()
