"""The local services file: which third-party agents this host keeps alive.

``<workdir>/services.yaml`` (or ``--services FILE`` / ``ELKEID_SERVICES``)
in the supervising-daemon format (docs/protocol.md section 9): ``agents:``
(the managed services), ``agent_defaults:`` (inherited field by field),
``collectors:`` (host metrics) and ``update:``. The ``daemon:`` and
``manager:`` sections of that format are accepted; where they overlap with
elkeid-agent's own settings one warning line says which setting wins.

Pure: ``parse(text, ...)`` turns the file's text into a ``ServicesConfig``
or a list of ``Problem``s, each with its error code (D1001 the file cannot
be loaded, D1002 its content is invalid), the path inside the document
(``agents[1].restart.policy``) and the line. A file is valid or not as a
whole: the supervisor never acts on part of a bad file. YAML is read with
PyYAML's safe loader (nodes, so that every problem has a line and duplicate
keys are caught, which plain ``safe_load`` silently merges); a ``.json``
file is read with the same rules.
"""

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

LOAD_ERROR, VALIDATE_ERROR, START_ERROR = "D1001", "D1002", "D3001"
TYPES = ("filebeat", "telegraf", "node_exporter", "custom")
POLICIES = ("always", "on-failure", "never")
MAX_FILE_BYTES = 1024 * 1024
# Alias expansion is unbounded in YAML ("billion laughs"); a services file
# has a few hundred values at most.
MAX_NODES = 100000
MAX_SERVICES = 256
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
               "m": 1000 ** 2, "mb": 1000 ** 2, "mi": 1024 ** 2, "mib": 1024 ** 2,
               "g": 1000 ** 3, "gb": 1000 ** 3, "gi": 1024 ** 3, "gib": 1024 ** 3}
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Problem:
    code: str
    path: str
    line: int      # 1-based; 0 when the problem is not tied to a line
    message: str

    def render(self, filename):
        where = "%s:%d" % (filename, self.line) if self.line else filename
        return "%s %s: %s%s" % (self.code, where, self.path + ": " if self.path else "",
                                self.message)


@dataclass(frozen=True)
class HealthCheck:
    # The supervising-daemon design's defaults.
    interval: float = 30.0
    heartbeat_timeout: float = 90.0   # 0: the service sends no heartbeats
    cpu_threshold: float = 50.0       # percent of one CPU; 0: off
    memory_threshold: int = 524288000  # RSS bytes; 0: off
    threshold_duration: float = 60.0
    http_endpoint: str = ""           # GET must answer 2xx; empty: no probe
    http_timeout: float = 5.0


@dataclass(frozen=True)
class Restart:
    max_retries: int = 10   # consecutive failures before ``failed``; 0: no limit
    backoff_base: float = 10.0
    backoff_max: float = 60.0
    policy: str = "always"


@dataclass(frozen=True)
class ServiceSpec:
    id: str
    type: str
    binary_path: str
    name: str = ""
    config_file: str = ""
    work_dir: str = ""
    socket_path: str = ""
    enabled: bool = True
    args: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    health_check: HealthCheck = field(default_factory=HealthCheck)
    restart: Restart = field(default_factory=Restart)

    def config_hash(self):
        """Changes exactly when the service must be restarted to apply it."""
        doc = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Collector:
    enabled: bool = True
    interval: float = 60.0
    only: Tuple[str, ...] = ()  # mount points (disk) or interfaces (network); empty: all


@dataclass(frozen=True)
class UpdatePolicy:
    download_dir: str = ""
    backup_dir: str = ""
    max_backups: int = 5
    verify_timeout: float = 300.0
    public_key_file: str = ""


@dataclass
class ServicesConfig:
    services: Tuple[ServiceSpec, ...] = ()
    collectors: Dict[str, Collector] = field(default_factory=lambda: {
        k: Collector() for k in ("cpu", "memory", "disk", "network")})
    update: UpdatePolicy = field(default_factory=UpdatePolicy)
    warnings: List[str] = field(default_factory=list)
    # D3001 problems of single services (a binary that is missing or not
    # executable): the file is valid, those services are not started.
    start_problems: List[Problem] = field(default_factory=list)


class _Invalid(Exception):
    def __init__(self, code, message, line=0):
        super().__init__(message)
        self.code, self.message, self.line = code, message, line


# ---------------------------------------------------------------- values

def parse_duration(value):
    """Seconds from ``30``, ``1.5``, ``"30"``, ``"30s"``, ``"1m30s"``,
    ``"500ms"`` (Go's duration syntax); ValueError otherwise or if < 0."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, got %r" % value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.match(r"^-", text):
            raise ValueError("%r is negative" % value)
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _DURATION_PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError("%r is not a duration (examples: 30s, 1m30s, 500ms, 90)"
                                 % value) from None
    else:
        raise ValueError("expected a duration such as 30s, got %s" % _kind(value))
    if seconds != seconds or seconds in (float("inf"),):
        raise ValueError("%r is not a finite duration" % value)
    if seconds < 0:
        raise ValueError("%r is negative" % value)
    return seconds


def parse_size(value):
    """Bytes from an integer or ``"500MB"``/``"500MiB"``/``"1G"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes, got %r" % value)
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and _SIZE.match(value.strip()):
        m = _SIZE.match(value.strip())
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    else:
        raise ValueError("expected a size in bytes (or 500MB, 1GiB), got %r" % (value,))
    if n < 0:
        raise ValueError("%r is negative" % value)
    return n


def _kind(value):
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "nothing"}.get(type(value),
                                                                       type(value).__name__)


# ---------------------------------------------------------------- documents

class _Node:
    """A value of the document with its line (1-based)."""
    __slots__ = ("value", "line")

    def __init__(self, value, line):
        self.value, self.line = value, line


def _from_yaml(text):
    try:
        import yaml
    except ImportError:
        raise _Invalid(LOAD_ERROR, "PyYAML is not available to read YAML; "
                                   "write the file as JSON (same structure)") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else 0
        raise _Invalid(LOAD_ERROR, "not valid YAML: %s" % (e.problem or e.context), line) \
            from None
    except RecursionError:
        raise _Invalid(LOAD_ERROR, "document nested too deeply") from None
    except (yaml.YAMLError, ValueError) as e:
        raise _Invalid(LOAD_ERROR, "not valid YAML: %s" % (str(e).splitlines() or ["?"])[0]) \
            from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        return _Node({}, 1)
    budget = [MAX_NODES]

    def convert(node, depth):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Invalid(LOAD_ERROR, "document too large or too deeply aliased")
        if depth > 64:
            raise _Invalid(LOAD_ERROR, "document nested too deeply", node.start_mark.line + 1)
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # YAML merge keys (<<)
            out = {}
            for k, v in node.value:
                key = convert(k, depth + 1)
                if not isinstance(key.value, str):
                    raise _Invalid(VALIDATE_ERROR, "key %r is not a string" % (key.value,),
                                   key.line)
                if key.value in out:
                    raise _Invalid(VALIDATE_ERROR, "duplicate key %r" % key.value, key.line)
                out[key.value] = convert(v, depth + 1)
            return _Node(out, line)
        if isinstance(node, yaml.SequenceNode):
            return _Node([convert(v, depth + 1) for v in node.value], line)
        try:
            return _Node(loader.construct_object(node, deep=True), line)
        except (yaml.YAMLError, ValueError, OverflowError) as e:
            raise _Invalid(LOAD_ERROR, "not valid YAML: %s"
                           % (getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]),
                           line) from None

    try:
        return convert(root, 0)
    except RecursionError:
        raise _Invalid(LOAD_ERROR, "document nested too deeply") from None


def _from_json(text):
    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                raise _Invalid(VALIDATE_ERROR, "duplicate key %r" % k)
            seen[k] = v
        return seen

    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except ValueError as e:
        line = getattr(e, "lineno", 0)
        raise _Invalid(LOAD_ERROR, "not valid JSON: %s" % getattr(e, "msg", e), line) \
            from None
    except RecursionError:
        raise _Invalid(LOAD_ERROR, "document nested too deeply") from None

    def wrap(v, depth=0):
        if depth > 64:
            raise _Invalid(LOAD_ERROR, "document nested too deeply")
        if isinstance(v, dict):
            return _Node({k: wrap(x, depth + 1) for k, x in v.items()}, 0)
        if isinstance(v, list):
            return _Node([wrap(x, depth + 1) for x in v], 0)
        return _Node(v, 0)

    return wrap(doc)


# ---------------------------------------------------------------- schema

class _Checker:
    def __init__(self, workdir, ncpu):
        self.workdir = workdir
        self.ncpu = max(1, ncpu)
        self.problems = []
        self.start_problems = []
        self.warnings = []

    def bad(self, path, node, message, code=VALIDATE_ERROR):
        self.problems.append(Problem(code, path, node.line if node is not None else 0, message))

    def mapping(self, path, node, known):
        """The node's dict, after reporting unknown keys; None if not a mapping."""
        if node.value is None:
            return {}
        if not isinstance(node.value, dict):
            self.bad(path, node, "expected a mapping, got %s" % _kind(node.value))
            return None
        for key, value in node.value.items():
            if key not in known:
                self.bad(_join(path, key), value, "unknown key (known: %s)"
                         % ", ".join(sorted(known)))
        return node.value

    def scalar(self, path, node, convert, default):
        if node is None:
            return default
        try:
            return convert(node.value)
        except (ValueError, TypeError) as e:
            self.bad(path, node, str(e))
            return default

    def absolute_path(self, path, node, allow_empty=True):
        value = self.scalar(path, node, _string, "")
        if not value:
            if not allow_empty and node is not None:
                self.bad(path, node, "must not be empty")
            return ""
        if "\0" in value:
            self.bad(path, node, "contains a NUL byte")
            return ""
        if not os.path.isabs(value):
            self.bad(path, node, "%r is not an absolute path" % value)
            return ""
        return os.path.normpath(value)

    # ------------------------------------------------------------ sections

    def health_check(self, path, node, base):
        known = ("interval", "heartbeat_timeout", "cpu_threshold", "memory_threshold",
                 "threshold_duration", "http_endpoint", "http_timeout")
        m = self.mapping(path, node, known) if node is not None else {}
        if m is None:
            return base
        values = {}
        for key in ("interval", "heartbeat_timeout", "threshold_duration", "http_timeout"):
            values[key] = self.scalar(_join(path, key), m.get(key), parse_duration,
                                      getattr(base, key))
        for key in ("interval", "http_timeout"):
            if values[key] == 0 and key in m:
                self.bad(_join(path, key), m[key], "must be greater than 0")
                values[key] = getattr(base, key)
        cpu_max = 100.0 * self.ncpu
        values["cpu_threshold"] = self.scalar(
            _join(path, "cpu_threshold"), m.get("cpu_threshold"),
            lambda v: _number_in(v, 0.0, cpu_max, "percent of one CPU (0 = off, at most %g "
                                 "on this %d-CPU host)" % (cpu_max, self.ncpu)),
            base.cpu_threshold)
        values["memory_threshold"] = self.scalar(_join(path, "memory_threshold"),
                                                 m.get("memory_threshold"), parse_size,
                                                 base.memory_threshold)
        values["http_endpoint"] = self.scalar(_join(path, "http_endpoint"),
                                              m.get("http_endpoint"), _http_url,
                                              base.http_endpoint)
        return HealthCheck(**values)

    def restart(self, path, node, base):
        m = self.mapping(path, node, ("max_retries", "backoff_base", "backoff_max", "policy")) \
            if node is not None else {}
        if m is None:
            return base
        values = {
            "max_retries": self.scalar(_join(path, "max_retries"), m.get("max_retries"),
                                       lambda v: _int_in(v, 0, 1000000), base.max_retries),
            "backoff_base": self.scalar(_join(path, "backoff_base"), m.get("backoff_base"),
                                        parse_duration, base.backoff_base),
            "backoff_max": self.scalar(_join(path, "backoff_max"), m.get("backoff_max"),
                                       parse_duration, base.backoff_max),
            "policy": self.scalar(_join(path, "policy"), m.get("policy"),
                                  lambda v: _choice(v, POLICIES), base.policy),
        }
        if values["backoff_max"] < values["backoff_base"]:
            self.bad(_join(path, "backoff_max"), m.get("backoff_max") or node,
                     "backoff_max (%gs) is less than backoff_base (%gs)"
                     % (values["backoff_max"], values["backoff_base"]))
        return Restart(**values)

    def service(self, path, node, defaults_hc, defaults_restart):
        known = ("id", "type", "name", "binary_path", "config_file", "work_dir", "socket_path",
                 "enabled", "args", "env", "health_check", "restart")
        m = self.mapping(path, node, known)
        if m is None:
            return None
        before = len(self.problems)
        for key in ("id", "type", "binary_path"):
            if key not in m:
                self.bad(path, node, "missing required key %r" % key)
        sid = self.scalar(_join(path, "id"), m.get("id"), _service_id, "")
        stype = self.scalar(_join(path, "type"), m.get("type"), lambda v: _choice(v, TYPES), "")
        enabled = self.scalar(_join(path, "enabled"), m.get("enabled"), _boolean, True)
        binary = self.absolute_path(_join(path, "binary_path"), m.get("binary_path"),
                                    allow_empty=False)
        if binary and enabled:
            # Not a fault of the file: the package providing the binary may
            # come later. Reported (D3001) and that one service is not started.
            problem = binary_problem(binary)
            if problem:
                self.start_problems.append(Problem(START_ERROR, _join(path, "binary_path"),
                                                   m["binary_path"].line, problem))
        work_dir = self.absolute_path(_join(path, "work_dir"), m.get("work_dir"))
        if not work_dir and sid:
            work_dir = os.path.join(self.workdir, "services", sid)
        socket_path = self.absolute_path(_join(path, "socket_path"), m.get("socket_path"))
        if len(socket_path.encode()) > MAX_SOCKET_PATH:
            self.bad(_join(path, "socket_path"), m["socket_path"],
                     "longer than %d bytes (a unix socket path limit)" % MAX_SOCKET_PATH)
        args = self._strings(_join(path, "args"), m.get("args"))
        env = self._env(_join(path, "env"), m.get("env"))
        spec = ServiceSpec(
            id=sid, type=stype, binary_path=binary, enabled=enabled,
            name=self.scalar(_join(path, "name"), m.get("name"), _string, ""),
            config_file=self.absolute_path(_join(path, "config_file"), m.get("config_file")),
            work_dir=work_dir, socket_path=socket_path, args=args, env=env,
            health_check=self.health_check(_join(path, "health_check"), m.get("health_check"),
                                           defaults_hc),
            restart=self.restart(_join(path, "restart"), m.get("restart"), defaults_restart))
        return spec if len(self.problems) == before else None

    def _strings(self, path, node):
        if node is None or node.value is None:
            return ()
        if not isinstance(node.value, list):
            self.bad(path, node, "expected a list of strings, got %s" % _kind(node.value))
            return ()
        out = []
        for i, item in enumerate(node.value):
            value = self.scalar("%s[%d]" % (path, i), item, _plain_string, "")
            if "\0" in value:
                self.bad("%s[%d]" % (path, i), item, "contains a NUL byte")
            out.append(value)
        return tuple(out)

    def _env(self, path, node):
        if node is None or node.value is None:
            return ()
        if not isinstance(node.value, dict):
            self.bad(path, node, "expected a mapping of NAME: value, got %s" % _kind(node.value))
            return ()
        out = []
        for key, item in node.value.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                self.bad(_join(path, key), item, "%r is not an environment variable name" % key)
                continue
            value = self.scalar(_join(path, key), item, _plain_string, "")
            if "\0" in value:
                self.bad(_join(path, key), item, "contains a NUL byte")
            out.append((key, value))
        return tuple(sorted(out))

    def collectors(self, path, node):
        out = ServicesConfig().collectors
        m = self.mapping(path, node, tuple(out)) if node is not None else {}
        for name, sub in (m or {}).items():
            if name not in out:
                continue
            extra = {"disk": ("mount_points",), "network": ("interfaces",)}.get(name, ())
            sm = self.mapping(_join(path, name), sub, ("enabled", "interval") + extra)
            if sm is None:
                continue
            interval = self.scalar(_join(path, name, "interval"), sm.get("interval"),
                                   parse_duration, 60.0)
            if interval < 1 and "interval" in sm:
                self.bad(_join(path, name, "interval"), sm["interval"], "must be at least 1s")
                interval = 60.0
            only = self._strings(_join(path, name, extra[0]), sm.get(extra[0])) if extra else ()
            out[name] = Collector(
                enabled=self.scalar(_join(path, name, "enabled"), sm.get("enabled"), _boolean,
                                    True),
                interval=interval, only=only)
        return out

    def update(self, path, node):
        known = ("download_dir", "backup_dir", "max_backups", "verify_timeout",
                 "public_key_file")
        m = self.mapping(path, node, known) if node is not None else {}
        if m is None:
            return UpdatePolicy()
        return UpdatePolicy(
            download_dir=self.absolute_path(_join(path, "download_dir"), m.get("download_dir")),
            backup_dir=self.absolute_path(_join(path, "backup_dir"), m.get("backup_dir")),
            max_backups=self.scalar(_join(path, "max_backups"), m.get("max_backups"),
                                    lambda v: _int_in(v, 1, 100), 5),
            verify_timeout=self.scalar(_join(path, "verify_timeout"), m.get("verify_timeout"),
                                       parse_duration, 300.0),
            public_key_file=self.absolute_path(_join(path, "public_key_file"),
                                               m.get("public_key_file")))

    def overlap_warnings(self, top):
        """daemon:/manager: belong to the design's own daemon; elkeid-agent
        has its own settings for what they set."""
        notes = {
            "daemon": ("id", "log_level", "log_file", "pid_file", "work_dir"),
            "manager": ("address", "tls", "heartbeat_interval", "reconnect_interval", "timeout"),
        }
        texts = {
            "daemon": "the 'daemon:' section is accepted but not used: elkeid-agent's agent id, "
                      "log file, pid file and workdir come from its own settings "
                      "(--agent-id, <workdir>/log, the service manager, --workdir)",
            "manager": "the 'manager:' section is accepted but not used: elkeid-agent reports "
                       "to AgentCenter through its own endpoint and TLS settings "
                       "(--server, --ca/--cert/--key, --heartbeat-interval)",
        }
        for name, known in notes.items():
            if name in top:
                node = top[name]
                if self.mapping(name, node, known) is not None:
                    self.warnings.append("%s line %d: %s" % (name, node.line, texts[name]))


def _join(*parts):
    out = ""
    for p in parts:
        if not p:
            continue
        out = p if not out else "%s.%s" % (out, p)
    return out


def _string(v):
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError("expected a string, got %s" % _kind(v))
    return v


def _plain_string(v):
    """Strings, and numbers written without quotes (``PORT: 9100``)."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError("expected a string, got %s" % _kind(v))
    return v if isinstance(v, str) else str(v)


def _boolean(v):
    if not isinstance(v, bool):
        raise ValueError("expected true or false, got %r" % (v,))
    return v


def _choice(v, choices):
    if v not in choices:
        raise ValueError("%r is not one of %s" % (v, ", ".join(choices)))
    return v


def _service_id(v):
    if not isinstance(v, str) or not _ID.fullmatch(v):
        raise ValueError("%r is not a service id (letters, digits, '_', '.', '-'; at most 64)"
                         % (v,))
    return v


def _int_in(v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected a whole number, got %r" % (v,))
    if not lo <= v <= hi:
        raise ValueError("%d is out of range (%d to %d)" % (v, lo, hi))
    return v


def _number_in(v, lo, hi, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError("expected a number, %s; got %r" % (what, v))
    if not lo <= v <= hi:
        raise ValueError("%g is out of range: %s" % (v, what))
    return float(v)


def _http_url(v):
    from urllib.parse import urlsplit
    v = _string(v)
    if not v:
        return ""
    try:
        u = urlsplit(v)
        u.port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise ValueError("%r is not a URL: %s" % (v, e)) from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("%r is not an http:// or https:// URL with a host" % v)
    return v


# ---------------------------------------------------------------- entry points

def parse(text, filename="services.yaml", workdir="/etc/elkeid", ncpu=None):
    """(ServicesConfig, []) for a valid document, else (None, [Problem, ...])."""
    checker = _Checker(workdir, ncpu or os.cpu_count() or 1)
    try:
        # A JSON document in services.yaml is read as JSON: on a host
        # without PyYAML (a pip install without it) that is the only way to
        # use the default file, as the D1001 message advises.
        if filename.endswith(".json") or text.lstrip().startswith("{"):
            root = _from_json(text)
            try:  # JSON is YAML too: read it again for line numbers
                root = _from_yaml(text)
            except _Invalid:
                pass
        else:
            root = _from_yaml(text)
    except _Invalid as e:
        return None, [Problem(e.code, "", e.line, e.message)]
    top = checker.mapping("", root, ("agents", "agent_defaults", "collectors", "update",
                                     "daemon", "manager"))
    if top is None:
        return None, checker.problems
    defaults = top.get("agent_defaults")
    dm = checker.mapping("agent_defaults", defaults, ("health_check", "restart")) \
        if defaults is not None else {}
    dm = dm or {}
    hc = checker.health_check("agent_defaults.health_check", dm.get("health_check"),
                              HealthCheck())
    rs = checker.restart("agent_defaults.restart", dm.get("restart"), Restart())
    services = []
    agents = top.get("agents")
    if agents is not None and agents.value is not None:
        if not isinstance(agents.value, list):
            checker.bad("agents", agents, "expected a list of services, got %s"
                        % _kind(agents.value))
        elif len(agents.value) > MAX_SERVICES:
            checker.bad("agents", agents, "%d services; at most %d"
                        % (len(agents.value), MAX_SERVICES))
        else:
            seen = {}
            for i, item in enumerate(agents.value):
                spec = checker.service("agents[%d]" % i, item, hc, rs)
                if spec is None:
                    continue
                if spec.id in seen:
                    checker.bad("agents[%d].id" % i, item.value.get("id"),
                                "duplicate id %r (also agents[%d])" % (spec.id, seen[spec.id]))
                    continue
                seen[spec.id] = i
                services.append(spec)
            sockets = {}
            for spec in services:
                if spec.socket_path and spec.socket_path in sockets:
                    checker.bad("agents", agents, "services %s and %s share socket_path %s"
                                % (sockets[spec.socket_path], spec.id, spec.socket_path))
                sockets.setdefault(spec.socket_path, spec.id)
    collectors = checker.collectors("collectors", top.get("collectors"))
    update = checker.update("update", top.get("update"))
    checker.overlap_warnings(top)
    if checker.problems:
        return None, checker.problems
    return ServicesConfig(tuple(services), collectors, update, checker.warnings,
                          checker.start_problems), []


def binary_problem(path):
    """Why ``path`` cannot be started, or "" if it can."""
    if not os.path.isfile(path):
        return "%s does not exist or is not a file" % path
    if not os.access(path, os.X_OK):
        return "%s is not executable" % path
    return ""


def load(path, workdir="/etc/elkeid", ncpu=None):
    """Read and parse ``path`` (an unreadable or missing file is D1001)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return None, [Problem(LOAD_ERROR, "", 0, "cannot read: %s" % (e.strerror or e))]
    if len(data) > MAX_FILE_BYTES:
        return None, [Problem(LOAD_ERROR, "", 0, "larger than %d bytes" % MAX_FILE_BYTES)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [Problem(LOAD_ERROR, "", 0, "not UTF-8 text (byte %d)" % e.start)]
    return parse(text, os.path.basename(path), workdir, ncpu)
