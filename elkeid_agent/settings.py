"""Every setting of the agent, in one place.

Precedence: CLI flag > environment > ``<workdir>/specified_env`` > default.
``specified_env`` is the ``key=value`` file systemd reads as an
EnvironmentFile and ``elkeidctl set`` writes (docs/protocol.md section 7); under
systemd its keys also arrive as environment variables, so both spellings
resolve to the same setting.

Server endpoints are per region: ``ELKEID_SERVER``, ``ELKEID_SERVICE_DISCOVERY``
and ``ELKEID_PUBLIC_SERVER`` are the ``default`` region; a suffix names
another region (``ELKEID_SERVER_EU=10.0.0.5:6751`` is region ``eu``). The CLI
flags set the default region. A region is "configured" when it has at least
one endpoint; task 1051 may switch only to a configured region.

``ELKEID_ACCEL=0`` (the environment only; systemd passes specified_env as
environment) forces the pure-Python hot path; it is read at import by
``native.py``, not here, because the hot-path modules choose their
functions when they load.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import ConfigError

DEFAULT_WORKDIR = "/etc/elkeid"
SPECIFIED_ENV = "specified_env"
DEFAULT_REGION = "default"
COMPRESSIONS = ("none", "gzip", "auto")
SERVICE_TYPES = ("systemd", "sysvinit")

_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_REGION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Endpoint kinds in the order they are tried (docs/protocol.md section 5), with
# the net_mode each one reports in the heartbeat.
ENDPOINT_KINDS = (("service_discovery", "sd"), ("server", "private"),
                  ("public_server", "public"))
_ENDPOINT_ENV = {"service_discovery": "ELKEID_SERVICE_DISCOVERY",
                 "server": "ELKEID_SERVER",
                 "public_server": "ELKEID_PUBLIC_SERVER"}


@dataclass
class Endpoints:
    """Where to find AgentCenter for one region."""
    service_discovery: Optional[str] = None
    server: Optional[str] = None
    public_server: Optional[str] = None

    def ordered(self):
        """[(kind, net_mode, "host:port")] in dial order, skipping unset."""
        return [(kind, mode, getattr(self, kind)) for kind, mode in ENDPOINT_KINDS
                if getattr(self, kind)]


@dataclass
class Settings:
    workdir: str = DEFAULT_WORKDIR
    # Region-name -> endpoints; "default" always exists.
    regions: Dict[str, Endpoints] = field(default_factory=lambda: {DEFAULT_REGION: Endpoints()})
    region: str = DEFAULT_REGION
    idc: str = ""
    service_type: str = "systemd"
    agent_id: Optional[str] = None
    # TLS material; relative paths resolve against the workdir (the CLI
    # makes its own absolute against the current directory first).
    ca: str = "cert/ca.crt"
    cert: str = "cert/client.crt"
    key: str = "cert/client.key"
    # The TLS files are re-read this often (and on SIGHUP); a changed set
    # that validates is used for the next dial (transport/tlswatch.py).
    tls_check_seconds: float = 10.0
    # Below this many days to expiry of the client certificate or the CA
    # the agent logs a warning (once a day).
    cert_expiry_warn_days: float = 30.0
    # The real AgentCenter certificate carries this name whatever was dialed.
    server_name: str = "elkeid.com"
    # Elkeid heartbeats every 60 s; the server's dashboards assume it.
    heartbeat_interval: float = 60.0
    compression: str = "auto"
    # Go agent: dial timeout 15 s, reconnect after 5 s. We redial a lost
    # stream within 5 s and back off to 10 s, each wait random below its
    # ceiling (full jitter): a restarted server sees its fleet spread over
    # 10 s, and an agent resumes at most 10 s after the server is back
    # (docs/operations.md "Reconnecting").
    dial_timeout: float = 15.0
    reconnect_delay: float = 5.0
    reconnect_max_delay: float = 10.0
    # AgentCenter drops clients that ping more often than every 5 s; 30 s
    # keeps NAT state alive with a wide margin.
    keepalive_seconds: float = 30.0
    # Memory queue budget. The systemd unit caps the agent at 250 MB and the
    # Python+grpc floor is ~40 MB, so 48 MiB of queued records is safe.
    queue_max_bytes: int = 48 * 1024 * 1024
    # A gRPC message costs ~140 us of client CPU whatever its size, so batch
    # hard; but AgentCenter rejects messages over 10 MiB, so stay far below.
    batch_max_records: int = 4096
    batch_max_bytes: int = 2 * 1024 * 1024
    flush_delay: float = 0.005
    # The disk spool (buffer/spool.py): "" = <workdir>/spool. The quota is
    # this many MiB but never more than half the free space the filesystem
    # had at open; 0 turns the spool off (memory only, drops counted).
    # 1 GiB holds ~5M records of 200 bytes before compression (over 15
    # minutes at 5,000 records/s even uncompressed).
    spool_dir: str = ""
    spool_max_mb: int = 1024
    # Elkeid's stream has no acknowledgements: a message grpc accepted may
    # still be in socket buffers when the stream breaks. Batches written in
    # the last replay_seconds (at most replay_max_bytes) are sent again on
    # the next stream: duplicates instead of silent loss.
    replay_seconds: float = 5.0
    replay_max_bytes: int = 8 * 1024 * 1024
    log_max_bytes: int = 1024 * 1024
    log_backups: int = 10
    # Error-level log lines sent to the server as 1010, at most this many
    # per minute, so a log storm cannot crowd out security data.
    remote_log_per_minute: int = 60
    debug_port: int = 0  # 0: an ephemeral loopback port when toggled on
    pidfile: str = "/var/run/elkeid-agent.pid"
    # The status endpoint (/health, /metrics, /services, POST /heartbeat) is
    # opt-in: (host, port) on a loopback address, None = off. Off by default
    # because it shows internals to every local user.
    status_addr: Optional[Tuple[str, int]] = None
    # The local services file (services/config.py); "" = <workdir>/services.yaml,
    # where a missing file simply means no services. A file named by
    # --services / ELKEID_SERVICES must exist (D1001 otherwise).
    services_file: str = ""
    # Public key (PEM) self-updates must be signed with; "" = the services
    # file's update.public_key_file, and with neither only the sha256 is
    # checked (elkeid_agent/update/verify.py).
    update_public_key: str = ""
    # Plugin supervision knobs set by the user (plugins.policy.Policy field
    # -> value); unset ones keep the Policy defaults.
    plugin_policy: Dict[str, object] = field(default_factory=dict)
    # Bad lines seen in specified_env: (line number, reason). Reported, never fatal.
    env_file_problems: List[Tuple[int, str]] = field(default_factory=list)

    def path(self, name):
        """Resolve a path setting against the workdir."""
        return name if os.path.isabs(name) else os.path.join(self.workdir, name)

    def spool_path(self):
        return self.path(self.spool_dir) if self.spool_dir else os.path.join(self.workdir, "spool")

    def services_path(self):
        """(path of the services file, whether the user named it)."""
        if self.services_file:
            return self.path(self.services_file), True
        return os.path.join(self.workdir, "services.yaml"), False

    @property
    def endpoints(self):
        return self.regions.get(self.region) or Endpoints()

    def configured_regions(self):
        return sorted(r for r, e in self.regions.items() if e.ordered())


def parse_env_file(text):
    """Parse ``key=value`` lines. Returns (values, problems).

    Comments (#) and blank lines are skipped; ``export`` prefixes and matching
    quotes are accepted because people hand-edit this file. A malformed line
    is reported and skipped, never fatal: losing one setting is better than
    an agent that refuses to start on a fleet."""
    values = {}
    problems = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep:
            problems.append((lineno, "no '=' in line"))
            continue
        if not _ENV_KEY.match(key):
            problems.append((lineno, "bad key %r" % key))
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif value[:1] in ("'", '"'):
            problems.append((lineno, "unterminated quote"))
            continue
        if "\x00" in value:
            problems.append((lineno, "NUL byte in value"))
            continue
        values[key] = value
    return values, problems


def read_env_file(path):
    """Read specified_env; a missing file is simply empty."""
    try:
        with open(path, "rb") as f:
            data = f.read(1024 * 1024)
    except FileNotFoundError:
        return {}, []
    except OSError as e:
        return {}, [(0, "cannot read %s: %s" % (path, e.strerror))]
    return parse_env_file(data.decode("utf-8", "replace"))


def format_env_file(values):
    """Inverse of parse_env_file for the values elkeidctl writes."""
    return "".join("%s=%s\n" % (k, values[k]) for k in sorted(values))


def check_hostport(value, what):
    m = _HOSTPORT.match(value or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError("%s must be HOST:PORT, got %r" % (what, value))
    return value


def loopback_addr(value, what):
    """``127.0.0.1:PORT`` or ``[::1]:PORT`` -> (host, port). Anything that
    is not a literal loopback address is refused: the pages it serves are
    for this host only, and a name could resolve anywhere."""
    text = str(value).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not port.isascii() or len(port) > 5:
        raise ConfigError("%s must be 127.0.0.1:PORT or [::1]:PORT, got %r" % (what, text))
    if not 0 < int(port) < 65536:
        raise ConfigError("%s port must be 1-65535, got %r" % (what, text))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError("%s must be a loopback address (127.0.0.1 or ::1), got %r"
                          % (what, text))
    return host, int(port)


def _number(value, what, kind=float, minimum=None, maximum=None):
    try:
        n = kind(value)
    except (TypeError, ValueError):
        raise ConfigError("%s must be a number, got %r" % (what, value)) from None
    if n != n or (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        raise ConfigError("%s must be between %s and %s, got %r" % (what, minimum, maximum, value))
    return n


# Scalar settings: attribute -> (environment names, most specific first; parser).
def _choice(options, what):
    def parse(value):
        if value not in options:
            raise ConfigError("%s must be one of %s, got %r" % (what, "|".join(options), value))
        return value
    return parse


def _text(what, pattern=None, maximum=256):
    def parse(value):
        if len(value) > maximum or (pattern and not re.match(pattern, value)):
            raise ConfigError("bad %s: %r" % (what, value))
        return value
    return parse


_SCALARS = {
    "region": (("ELKEID_REGION", "specified_region", "SPECIFIED_REGION"),
               _text("region", _REGION.pattern)),
    "idc": (("ELKEID_IDC", "specified_idc", "SPECIFIED_IDC"), _text("idc", r"^[^\n\r]*$")),
    "service_type": (("service_type", "SERVICE_TYPE"), _choice(SERVICE_TYPES, "service_type")),
    "agent_id": (("SPECIFIED_AGENT_ID", "specified_agent_id"),
                 _text("agent id", r"^[A-Za-z0-9_.:-]{1,128}$")),
    "ca": (("ELKEID_CA",), _text("CA path")),
    "cert": (("ELKEID_CERT",), _text("certificate path")),
    "key": (("ELKEID_KEY",), _text("key path")),
    "tls_check_seconds": (("ELKEID_TLS_CHECK_SECONDS",),
                          lambda v: _number(v, "TLS check seconds", float, 0.05, 86400)),
    "cert_expiry_warn_days": (("ELKEID_CERT_EXPIRY_WARN_DAYS",),
                              lambda v: _number(v, "certificate expiry warning days", float, 0,
                                                36500)),
    "server_name": (("ELKEID_SERVER_NAME",), _text("server name", r"^[A-Za-z0-9_.-]{1,253}$")),
    "heartbeat_interval": (("ELKEID_HEARTBEAT_INTERVAL",),
                           lambda v: _number(v, "heartbeat interval", float, 0.05, 86400)),
    "compression": (("ELKEID_COMPRESSION",), _choice(COMPRESSIONS, "compression")),
    "queue_max_bytes": (("ELKEID_QUEUE_MAX_BYTES",),
                        lambda v: _number(v, "queue max bytes", int, 1 << 16, 1 << 34)),
    "debug_port": (("ELKEID_DEBUG_PORT",), lambda v: _number(v, "debug port", int, 0, 65535)),
    "dial_timeout": (("ELKEID_DIAL_TIMEOUT",),
                     lambda v: _number(v, "dial timeout", float, 0.1, 600)),
    "reconnect_delay": (("ELKEID_RECONNECT_DELAY",),
                        lambda v: _number(v, "reconnect delay", float, 0.01, 3600)),
    "reconnect_max_delay": (("ELKEID_RECONNECT_MAX_DELAY",),
                            lambda v: _number(v, "reconnect max delay", float, 0.01, 3600)),
    "spool_dir": (("ELKEID_SPOOL_DIR",), _text("spool directory", r"^[^\x00]+$", maximum=4096)),
    "spool_max_mb": (("ELKEID_SPOOL_MAX_MB",),
                     lambda v: _number(v, "spool max MB", int, 0, 1 << 22)),
    "pidfile": (("ELKEID_PIDFILE",), _text("pid file path", maximum=4096)),
    "status_addr": (("ELKEID_STATUS_ADDR",), lambda v: loopback_addr(v, "status address")),
    "services_file": (("ELKEID_SERVICES",), _text("services file path", r"^[^\x00]*$",
                                                   maximum=4096)),
    "update_public_key": (("ELKEID_UPDATE_PUBKEY",), _text("update public key path",
                                                           r"^[^\x00]*$", maximum=4096)),
}


def _delays(value):
    """``0,10,30,60``: restart delays in seconds, the last one repeating."""
    parts = [p.strip() for p in value.split(",")]
    if not 1 <= len(parts) <= 32 or "" in parts:
        raise ConfigError("plugin backoff must be 1-32 comma-separated delays, got %r" % value)
    return tuple(_number(p, "plugin backoff delay", float, 0, 86400) for p in parts)


# Plugin supervision: Policy field -> (environment names; parser). The
# environment speaks the units people think in (percent, MiB).
_PLUGIN_POLICY = {
    "backoff": (("ELKEID_PLUGIN_BACKOFF",), _delays),
    "healthy_reset": (("ELKEID_PLUGIN_HEALTHY_RESET",),
                      lambda v: _number(v, "plugin healthy reset", float, 1, 86400)),
    "max_failures": (("ELKEID_PLUGIN_MAX_FAILURES",),
                     lambda v: _number(v, "plugin max failures", int, 1, 1000000)),
    "cpu_limit": (("ELKEID_PLUGIN_CPU_LIMIT_PERCENT",),
                  lambda v: _number(v, "plugin CPU limit percent", float, 0, 102400) / 100),
    "rss_limit": (("ELKEID_PLUGIN_RSS_LIMIT_MB",),
                  lambda v: _number(v, "plugin RSS limit MB", int, 0, 1 << 20) * 1024 * 1024),
    "limit_window": (("ELKEID_PLUGIN_LIMIT_WINDOW",),
                     lambda v: _number(v, "plugin limit window", float, 1, 86400)),
    "stop_timeout": (("ELKEID_PLUGIN_STOP_TIMEOUT",),
                     lambda v: _number(v, "plugin stop timeout", float, 0.1, 3600)),
}


def load(cli=None, environ=None, workdir=None):
    """Build Settings from CLI values (a dict of attribute -> value, None for
    unset), the environment and specified_env. Raises ConfigError with a
    message naming the bad setting and where it came from."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    s = Settings()
    s.workdir = os.path.abspath(workdir or cli.pop("workdir", None)
                                or environ.get("ELKEID_WORKDIR") or DEFAULT_WORKDIR)
    file_values, s.env_file_problems = read_env_file(os.path.join(s.workdir, SPECIFIED_ENV))

    def lookup(names):
        for source, mapping in (("environment", environ), (SPECIFIED_ENV, file_values)):
            for name in names:
                value = mapping.get(name)
                if value not in (None, ""):
                    return source, name, value
        return None

    def resolved(table):
        """(attribute, parsed value) for each setting of ``table`` that is set."""
        for attr, (names, parse) in table.items():
            if attr in cli:
                source, name, value = "command line", "--" + attr.replace("_", "-"), str(cli[attr])
            else:
                found = lookup(names)
                if not found:
                    continue
                source, name, value = found
            try:
                yield attr, parse(value)
            except ConfigError as e:
                raise ConfigError("%s (from %s %s)" % (e, source, name)) from None

    for attr, value in resolved(_SCALARS):
        setattr(s, attr, value)
    s.plugin_policy = dict(resolved(_PLUGIN_POLICY))

    s.regions = _regions(cli, environ, file_values)
    if s.region not in s.regions:
        s.regions[s.region] = Endpoints()
    return s


_ENDPOINT_KEY = re.compile(
    r"^(ELKEID_SERVICE_DISCOVERY|ELKEID_PUBLIC_SERVER|ELKEID_SERVER)(?:_([A-Za-z0-9-]+))?$")
_ENDPOINT_KIND = {v: k for k, v in _ENDPOINT_ENV.items()}


def _regions(cli, environ, file_values):
    regions = {DEFAULT_REGION: Endpoints()}
    # File first, then environment, then CLI, each overriding the last.
    for source, mapping in ((SPECIFIED_ENV, file_values), ("environment", environ)):
        for key, value in mapping.items():
            m = _ENDPOINT_KEY.match(key)
            if not m or not value or key == "ELKEID_SERVER_NAME":
                continue
            region = (m.group(2) or DEFAULT_REGION).lower()
            try:
                check_hostport(value, key)
            except ConfigError as e:
                raise ConfigError("%s (from %s)" % (e, source)) from None
            setattr(regions.setdefault(region, Endpoints()), _ENDPOINT_KIND[m.group(1)], value)
    for kind in _ENDPOINT_ENV:
        if kind in cli:
            flag = "--" + kind.replace("_", "-")
            setattr(regions[DEFAULT_REGION], kind, check_hostport(cli[kind], flag))
    return regions


def env_file_path(workdir):
    return os.path.join(workdir, SPECIFIED_ENV)


def updated_env_file(values, changes):
    """Apply {key: value or None} to env-file values (None removes); used by
    task 1051 and elkeidctl set/unset so both write the same format."""
    out = dict(values)
    for key, value in changes.items():
        if not _ENV_KEY.match(key):
            raise ConfigError("bad key %r" % key)
        if value is None:
            out.pop(key, None)
        else:
            if "\n" in value or "\x00" in value:
                raise ConfigError("value for %s contains a newline or NUL" % key)
            out[key] = value
    return out


def write_env_file(workdir, changes):
    """Atomically rewrite specified_env with ``changes`` applied."""
    path = env_file_path(workdir)
    values, _problems = read_env_file(path)
    text = format_env_file(updated_env_file(values, changes))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def public_view(s):
    """Settings as a plain dict for status output and the debug endpoint."""
    return {
        "workdir": s.workdir, "region": s.region, "idc": s.idc,
        "service_type": s.service_type, "server_name": s.server_name,
        "compression": s.compression, "heartbeat_interval": s.heartbeat_interval,
        "status_addr": (("[%s]:%d" if ":" in s.status_addr[0] else "%s:%d") % s.status_addr
                        if s.status_addr else None),
        "regions": {r: e.__dict__ for r, e in s.regions.items()},
        "spool_dir": s.spool_path(), "spool_max_mb": s.spool_max_mb,
        "plugin_policy": {k: list(v) if isinstance(v, tuple) else v
                          for k, v in s.plugin_policy.items()},
    }


