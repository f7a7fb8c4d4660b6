"""Why a dial failed, in words a person can act on.

grpc reports every failed dial as TRANSIENT_FAILURE or a timeout, whatever
went wrong. After a failure the same endpoint is probed with the standard
library, step by step as grpc does it: TCP connect, TLS handshake with the
same CA, client certificate and server name (ALPN h2), then one read,
because TLS 1.3 reports a rejected client certificate only after the
handshake. ``classify`` (pure) turns what broke into a reason; ``probe`` is
the blocking probe (``probe_set`` with the credential set in memory, which
after a refused rotation is not what the files hold); a refused client
certificate that is expired, not yet valid or not of our CA is named so.
``DialDiagnosis`` runs it off the loop, counts ``dial_failures{reason}``
and logs each endpoint+reason at most once a minute.
"""

import ipaddress
import logging
import socket
import ssl
import time

from . import credentials

log = logging.getLogger(__name__)

REPORT_EVERY = 60.0
# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server that
# accepted us answers with its own SETTINGS, one that did not sends an alert.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_READ_WAIT = 2.0
# TLS alerts a server sends about the client certificate.
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                       "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "CERTIFICATE_UNKNOWN",
                       "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")


class Diagnosis:
    """``reason``: a short label (the counter's); ``text``: one line for people."""

    __slots__ = ("reason", "text")

    def __init__(self, reason, text):
        self.reason = reason
        self.text = text

    def __repr__(self):
        return "Diagnosis(%r, %r)" % (self.reason, self.text)


def classify(exc, stage, address, timeout=None, ca="", cert=""):
    """Diagnosis for ``exc`` raised at ``stage`` ("tcp", "tls" or "read")."""
    if isinstance(exc, socket.gaierror):
        return Diagnosis("dns", "cannot resolve %s: %s" % (address, exc.strerror or exc))
    if isinstance(exc, ConnectionRefusedError):
        return Diagnosis("refused", "connection refused: nothing listens on %s" % address)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        if stage == "tcp":
            return Diagnosis("timeout", "TCP connect to %s timed out after %g s"
                             % (address, timeout or 0))
        return Diagnosis("timeout", "%s accepted the connection but did not answer TLS "
                         "within %g s" % (address, timeout or 0))
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in credentials.NOT_OUR_CA:
            return Diagnosis("unknown_ca", "the server certificate of %s is not signed by our "
                             "CA %s (%s)" % (address, ca, exc.verify_message))
        return Diagnosis("server_cert", "the server certificate of %s was refused: %s"
                         % (address, exc.verify_message))
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)):
        if stage == "read":
            return _silent_close(address, cert)
        return Diagnosis("reset", "%s closed the connection during the TLS handshake"
                         % address)
    if isinstance(exc, ssl.SSLError):
        why = exc.reason or ""
        if "ALERT" in why and any(why.endswith(a) for a in _CLIENT_CERT_ALERTS):
            alert = why.split("ALERT_", 1)[-1].lower().replace("_", " ")
            return Diagnosis("client_cert_rejected", "the server %s rejected our client "
                             "certificate %s (TLS alert: %s)" % (address, cert, alert))
        if why in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                   "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
            return Diagnosis("not_tls", "%s does not speak TLS (%s)" % (address, why.lower()))
        return Diagnosis("tls_error", "TLS with %s failed: %s" % (address, why or exc))
    if isinstance(exc, OSError):
        return Diagnosis("unreachable", "cannot reach %s: %s" % (address, exc.strerror or exc))
    return Diagnosis("other", "%s: %s" % (type(exc).__name__, exc))


def _silent_close(address, cert):
    # grpc servers drop a client certificate they refuse without an alert:
    # under TLS 1.3 our handshake completes, then the connection just ends,
    # where an accepting server would have answered our HTTP/2 hello.
    return Diagnosis("client_cert_rejected", "the server %s rejected our client certificate "
                     "%s (it closed the connection right after the TLS handshake instead of "
                     "answering)" % (address, cert))


def peer_names(peercert):
    """["DNS:x", "IP:1.2.3.4"] from ``SSLSocket.getpeercert()``."""
    out = []
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        out.append("%s:%s" % ("IP" if kind == "IP Address" else kind, value))
    return out


def name_matches(name, names):
    """Does ``name`` (the --server-name) match one of ``names`` (peer_names)?
    DNS names case-insensitively with a wildcard only as the whole leftmost
    label, IP addresses by value, as grpc checks them."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    name = name.lower().rstrip(".")
    for entry in names:
        kind, _sep, value = entry.partition(":")
        if kind == "IP" and ip is not None:
            try:
                if ipaddress.ip_address(value.strip()) == ip:
                    return True
            except ValueError:
                continue
        elif kind == "DNS" and ip is None:
            value = value.lower().rstrip(".")
            if value == name:
                return True
            if value.startswith("*.") and "." in name and name.split(".", 1)[1] == value[2:]:
                return True
    return False


def _split(address):
    host, _sep, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe_set(address, cred_set, server_name, timeout):
    """``probe`` with a CredentialSet (the one dials use, which after a
    refused rotation is not what the files hold); messages name its files."""
    with credentials.written(cred_set.ca, cred_set.cert, cred_set.key) as files:
        return probe(address, files["ca"], files["cert"], files["key"], server_name, timeout,
                     shown=cred_set.paths)


def probe(address, ca, cert, key, server_name, timeout, shown=None):
    """Blocking: dial ``address`` as grpc would and say what breaks.
    Returns a Diagnosis; reason ``ok`` when nothing below gRPC is wrong.
    ``shown``: the paths to name in messages instead of ``ca`` and ``cert``."""
    shown = shown or {}
    ca_name, cert_name = shown.get("ca", ca), shown.get("cert", cert)
    try:
        sock = socket.create_connection(_split(address), timeout)
    except (OSError, ValueError) as e:
        return classify(e, "tcp", address, timeout)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The name is checked by hand below, to say what the certificate carries.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as e:
        sock.close()
        return Diagnosis("local_tls", "our TLS files cannot be used: %s" % e)
    try:
        sock.settimeout(timeout)
        try:
            tls = ctx.wrap_socket(sock, server_hostname=server_name)
        except OSError as e:
            return classify(e, "tls", address, timeout, ca_name, cert_name)
        sock = tls
        names = peer_names(tls.getpeercert())
        if not name_matches(server_name, names):
            return Diagnosis("server_name", "the server certificate of %s does not carry the "
                             "server name %s (it carries %s); see --server-name"
                             % (address, server_name, ", ".join(names) or "no names"))
        try:
            tls.sendall(_H2_HELLO)
            tls.settimeout(min(timeout, _READ_WAIT))
            if not tls.recv(1):
                return _silent_close(address, cert_name)
        except (socket.timeout, TimeoutError):
            pass  # silence after our hello is not a refusal
        except OSError as e:
            return classify(e, "read", address, timeout, ca_name, cert_name)
        return Diagnosis("ok", "TCP, TLS and certificates with %s are fine" % address)
    finally:
        sock.close()


class DialDiagnosis:
    """Probe after each failed dial; count every one, log each endpoint and
    reason at most once per ``every`` seconds."""

    def __init__(self, settings, metrics, executors, every=REPORT_EVERY, clock=time.monotonic,
                 credential_set=None):
        """``credential_set``: returns the CredentialSet dials use; the
        probe presents it, and a refusal says what is wrong with it
        (default: the files)."""
        self.credential_set = credential_set
        self.settings = settings
        self.metrics = metrics
        self.executors = executors
        self.every = every
        self._clock = clock
        self._reported = {}  # (address, reason) -> (when, failures since)
        metrics.describe("dial_failures", "failed dials by the cause the probe found")

    async def __call__(self, address, net_mode, error):
        s = self.settings
        timeout = min(s.dial_timeout, 10.0)
        try:
            if self.credential_set is not None:
                d = await self.executors.run("discovery", probe_set, address,
                                             self.credential_set(), s.server_name, timeout)
            else:
                d = await self.executors.run("discovery", probe, address, s.path(s.ca),
                                             s.path(s.cert), s.path(s.key), s.server_name,
                                             timeout)
        except Exception as e:  # a probe that cannot run must not stop the dial loop
            d = Diagnosis("other", "probe failed: %s" % (e,))
        if d.reason == "ok":
            d.text += "; grpc said: %s" % (error,)
        elif d.reason == "client_cert_rejected":
            d = self._why_rejected(d)
        self.metrics.inc("dial_failures", reason=d.reason)
        self.report(address, net_mode, d)
        return d

    def _why_rejected(self, d):
        """A refused client certificate that is expired, not yet valid or
        not signed by our CA: name that, with the file and the date."""
        try:
            if self.credential_set is not None:
                cred_set = self.credential_set()
            else:
                cred_set = credentials.load(credentials.tls_paths(self.settings), strict=False)
        except Exception:  # the files may be gone; the plain diagnosis stands
            return d
        problem = cred_set.problem
        if problem is None:
            return d
        return Diagnosis("client_cert_" + problem.reason, "%s; %s" % (d.text, problem))

    def report(self, address, net_mode, d):
        now = self._clock()
        key = (address, d.reason)
        last, missed = self._reported.get(key, (None, 0))
        if last is not None and now - last < self.every:
            self._reported[key] = (last, missed + 1)
            return False
        more = " (%d more since the last report)" % missed if missed else ""
        log.warning("cannot connect to %s (%s): %s%s", address, net_mode, d.text, more,
                    extra={"console": True})
        self._reported[key] = (now, 0)
        return True
