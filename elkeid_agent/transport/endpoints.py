"""Which AgentCenter address to dial, in which order (docs/protocol.md section 5).

Per region: the service-discovery endpoint's answer (net_mode ``sd``), then
the private address (``private``), then the public one (``public``). The
service-discovery reply is untrusted input: anything but the documented JSON
shape, any broken HTTP, any nesting or number the JSON parser chokes on,
is refused as an ``SDError`` with a reason, and the agent falls through to
the next kind of endpoint. Parsing is pure; the HTTP request is a small
blocking function run in the discovery executor.
"""

import ipaddress
import json
import math
import random
import re

from ..errors import ServerFault

SD_PATH = "/registry/detail?name=hids_svr_grpc&count=10"
SD_TIMEOUT = 5.0
SD_MAX_BYTES = 256 * 1024
_HOST = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


class SDError(ServerFault):
    """A service-discovery answer the agent cannot use; ``reason`` is the
    label of ``transport_sd_errors{reason}``."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def parse_sd_reply(body):
    """Turn a service-discovery reply into ["host:port", ...], highest weight
    first (ties keep the server's order). Raises SDError on anything else,
    whatever the bytes are."""
    try:
        return _parse_sd_reply(body)
    except SDError:
        raise
    except RecursionError:
        raise SDError("too_deep", "service discovery reply is nested too deeply") from None
    except Exception as e:  # the reply is untrusted: no exception may escape the lookup
        raise SDError("bad_reply", "service discovery reply unusable: %s: %s"
                      % (type(e).__name__, _first_line(e))) from None


def _parse_sd_reply(body):
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise SDError("not_json", "service discovery reply is not JSON: %s"
                      % _first_line(e)) from None
    if not isinstance(doc, dict):
        raise SDError("bad_shape", "service discovery reply is not a JSON object")
    code = doc.get("code")
    if code != 0 or isinstance(code, bool):
        raise SDError("code", "service discovery answered code %.40r: %.200r"
                      % (code, doc.get("msg")))
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        raise SDError("no_servers", "service discovery returned no servers")
    found = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            continue
        ip, port, weight = entry.get("ip"), entry.get("port"), entry.get("weight", 0)
        if not isinstance(ip, str) or not isinstance(port, int) or isinstance(port, bool):
            continue
        if not 0 < port < 65536 or not _finite_number(weight):
            continue
        try:
            addr = ipaddress.ip_address(ip)
            host = "[%s]" % addr if addr.version == 6 else str(addr)
        except ValueError:
            if not _HOST.match(ip):
                continue
            host = ip
        found.append((-weight, i, "%s:%d" % (host, port)))
    if not found:
        raise SDError("none_usable", "service discovery returned %d entries, none usable"
                      % len(data))
    return [addr for _w, _i, addr in sorted(found)]


def _finite_number(x):
    # NaN would make the weight sort meaningless and 1e999 parses as inf;
    # a huge integer is fine (it only compares).
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return isinstance(x, int) or math.isfinite(x)


def fetch_sd(hostport, timeout=SD_TIMEOUT):
    """GET the service-discovery document (blocking; run in the discovery
    executor). Every failure, including a peer that answers non-HTTP bytes
    or closes mid-body, is an SDError. urllib.request (with http.client and
    email, about 2.5 MB) is imported by the first fetch: an agent given its
    server directly never needs it."""
    import http.client
    import urllib.error
    import urllib.request
    url = "http://%s%s" % (hostport, SD_PATH)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(SD_MAX_BYTES + 1)
            if resp.length and len(body) <= SD_MAX_BYTES:
                # read(n) returns what arrived before the peer closed, even
                # short of Content-Length; a cut JSON document must not pass
                # for a malformed one (or, cut at the right place, a good one).
                raise http.client.IncompleteRead(body, resp.length)
    except urllib.error.HTTPError as e:
        raise SDError("http_status", "service discovery %s answered HTTP %d"
                      % (hostport, e.code)) from None
    except http.client.HTTPException as e:  # BadStatusLine, IncompleteRead, RemoteDisconnected
        raise SDError("bad_http", "service discovery %s broke HTTP: %s: %s"
                      % (hostport, type(e).__name__, _first_line(e))) from None
    except (OSError, ValueError) as e:  # refused, timeout, TLS, malformed address
        raise SDError("unreachable", "service discovery %s unreachable: %s"
                      % (hostport, _first_line(e))) from None
    except Exception as e:
        raise SDError("bad_http", "service discovery %s failed: %s: %s"
                      % (hostport, type(e).__name__, _first_line(e))) from None
    if len(body) > SD_MAX_BYTES:
        raise SDError("too_large", "service discovery reply larger than %d bytes" % SD_MAX_BYTES)
    return body


def discover(hostport, timeout=SD_TIMEOUT):
    """fetch_sd + parse_sd_reply, the whole lookup for the discovery executor
    (a 256 KiB reply is parsed off the event loop too)."""
    return parse_sd_reply(fetch_sd(hostport, timeout))


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def plan(endpoints, sd_addresses):
    """[(net_mode, address)] in dial order for one connection attempt."""
    out = [("sd", a) for a in sd_addresses]
    if endpoints.server:
        out.append(("private", endpoints.server))
    if endpoints.public_server:
        out.append(("public", endpoints.public_server))
    return out


def compression_for(setting, net_mode):
    """``auto``: gzip only on the public endpoint, where bandwidth is scarce;
    on private/SD networks host CPU is the budget and gzip costs ~25x the
    rest of the pipeline per record."""
    if setting == "auto":
        return "gzip" if net_mode == "public" else "none"
    return setting


class Backoff:
    """Reconnect delays with full jitter: each wait is uniform in
    [0, ceiling). The ceiling is ``first`` after a lost stream and doubles
    after each attempt in which no endpoint answered, up to ``cap``. A
    fleet that lost its server at the same moment thus redials spread over
    the ceiling instead of in one burst, and no agent waits longer than
    ``cap`` once the server is back (docs/operations.md "Reconnecting")."""

    def __init__(self, first, cap, random=random.random):
        self.first = first
        self.cap = max(cap, first)
        self.failures = 0
        self._random = random

    def ceiling(self):
        return min(self.first * (2 ** max(self.failures - 1, 0)), self.cap)

    def failed(self):
        self.failures += 1
        return self._random() * self.ceiling()

    def after_lost_stream(self):
        return self._random() * self.first

    def connected(self):
        self.failures = 0
