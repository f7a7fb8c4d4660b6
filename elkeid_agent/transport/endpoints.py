"""Which AgentCenter address to dial, in which order (PROTOCOL.md section 5).

Per region: the service-discovery endpoint's answer (net_mode ``sd``), then
the private address (``private``), then the public one (``public``). The
service-discovery reply is untrusted input: anything but the documented JSON
shape is refused with a clear reason, and the agent falls through to the
next kind of endpoint. Parsing is pure; the HTTP request is a small blocking
function run in an executor.
"""

import ipaddress
import json
import re
import urllib.error
import urllib.request

from ..errors import ServerFault

SD_PATH = "/registry/detail?name=hids_svr_grpc&count=10"
SD_TIMEOUT = 5.0
SD_MAX_BYTES = 256 * 1024
_HOST = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")


def parse_sd_reply(body):
    """Turn a service-discovery reply into ["host:port", ...], highest weight
    first (ties keep the server's order). Raises ServerFault on garbage."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ServerFault("service discovery reply is not JSON: %s" % e) from None
    if not isinstance(doc, dict):
        raise ServerFault("service discovery reply is not a JSON object")
    code = doc.get("code")
    if code != 0 or isinstance(code, bool):
        raise ServerFault("service discovery answered code %r: %r" % (code, doc.get("msg")))
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        raise ServerFault("service discovery returned no servers")
    found = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            continue
        ip, port, weight = entry.get("ip"), entry.get("port"), entry.get("weight", 0)
        if not isinstance(ip, str) or not isinstance(port, int) or isinstance(port, bool):
            continue
        if not 0 < port < 65536 or not isinstance(weight, (int, float)):
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
        raise ServerFault("service discovery returned %d entries, none usable" % len(data))
    return [addr for _w, _i, addr in sorted(found)]


def fetch_sd(hostport, timeout=SD_TIMEOUT):
    """GET the service-discovery document (blocking; run in an executor)."""
    url = "http://%s%s" % (hostport, SD_PATH)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(SD_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ServerFault("service discovery %s answered HTTP %d" % (hostport, e.code)) from None
    except (OSError, ValueError) as e:
        raise ServerFault("service discovery %s unreachable: %s" % (hostport, e)) from None
    if len(body) > SD_MAX_BYTES:
        raise ServerFault("service discovery reply larger than %d bytes" % SD_MAX_BYTES)
    return body


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
    """Reconnect delays: ``first`` after a lost stream, doubling after
    each attempt in which no endpoint answered, capped at ``cap``."""

    def __init__(self, first, cap):
        self.first = first
        self.cap = cap
        self.failures = 0

    def failed(self):
        self.failures += 1
        return min(self.first * (2 ** (self.failures - 1)), self.cap)

    def connected(self):
        self.failures = 0
