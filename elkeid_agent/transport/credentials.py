"""The TLS credential set, validated without I/O to the network.

``validate(ca, cert, key, now)`` takes the bytes of the three files and
returns a ``CredentialSet`` (the bytes, a sha256 of their contents, subject,
issuer, serial and validity of the client certificate and of the CA, days
to expiry) or raises ``CredentialError`` naming the file and the problem in
one line, with a short ``reason`` for the counters. The start-up check, the
rotation watcher (transport/tlswatch.py), the dial and elkeidctl all read
credentials through here: one validation code path.

Standard library only. Two choices want a word:

- ``ssl`` parses keys and certificates only from files
  (``load_cert_chain``, ``_test_decode_cert``), so the bytes are put in
  anonymous memory files (memfd, opened as ``/proc/self/fd/N``) for the
  duration of the check: the private key is not copied to any disk. Where
  memfd or /proc is missing, a private directory (0700, removed at once)
  serves instead.
- "The certificate chains to the CA" is checked by a TLS handshake in
  memory (two ``SSLObject`` over ``MemoryBIO`` pairs, no socket): a server
  context that trusts only the CA and requires a client certificate, and
  a client context presenting the certificate and key. OpenSSL then
  verifies the chain exactly as AgentCenter's TLS stack would, purpose
  (clientAuth) included, which no field-by-field comparison of issuer
  names could promise. The validity dates are compared first against
  ``now`` so an expired or not-yet-valid certificate gets its own reason;
  the handshake's own date check (against the real clock) maps onto the
  same reasons.

Which problems are fatal where: ``HARD`` reasons (unreadable, not PEM, a key
that is not the certificate's) make a set unusable anywhere. The others
(dates, chain) are ``soft``: ``validate(..., strict=False)`` returns the set
with ``problem`` set, because at start-up there is no better set to use and
the server decides (clocks drift); the watcher never replaces a working set
with one that has a problem.
"""

import contextlib
import hashlib
import os
import shutil
import ssl
import tempfile
import time

# CredentialError.reason values; the first three make a set unusable.
UNREADABLE = "unreadable"
NOT_PEM = "not_pem"
KEY_MISMATCH = "key_mismatch"
UNKNOWN_CA = "unknown_ca"
UNTRUSTED = "untrusted"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
HARD = frozenset({UNREADABLE, NOT_PEM, KEY_MISMATCH})
FILES = ("ca", "cert", "key")

# X509 verify codes (openssl/x509_vfy.h) the handshake can report.
_V_NOT_YET_VALID = (9,)          # CERT_NOT_YET_VALID
_V_EXPIRED = (10,)               # CERT_HAS_EXPIRED
# No path to the CA (UNABLE_TO_GET_ISSUER_CERT[_LOCALLY], DEPTH_ZERO_SELF_SIGNED,
# SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_VERIFY_LEAF_SIGNATURE).
NOT_OUR_CA = (2, 18, 19, 20, 21)
_DAY = 86400.0


class CredentialError(Exception):
    """``what``: "ca", "cert" or "key"; ``reason``: a label above;
    ``str()``: one line naming the file (when ``paths`` were given)."""

    def __init__(self, what, reason, text):
        Exception.__init__(self, text)
        self.what = what
        self.reason = reason

    @property
    def hard(self):
        return self.reason in HARD


class CertInfo:
    """Subject, issuer, serial and validity (epoch seconds) of one certificate."""

    __slots__ = ("subject", "issuer", "serial", "not_before", "not_after",
                 "not_before_text", "not_after_text")

    def __init__(self, decoded):
        self.subject = _name(decoded.get("subject", ()))
        self.issuer = _name(decoded.get("issuer", ()))
        self.serial = decoded.get("serialNumber", "")
        self.not_before_text = decoded.get("notBefore", "")
        self.not_after_text = decoded.get("notAfter", "")
        self.not_before = _seconds(self.not_before_text)
        self.not_after = _seconds(self.not_after_text)

    def days_left(self, now):
        """Days (a float, negative once expired) until notAfter; None when
        the dates could not be read."""
        if self.not_after is None:
            return None
        return (self.not_after - now) / _DAY

    def as_dict(self, now):
        days = self.days_left(now)
        return {"subject": self.subject, "issuer": self.issuer, "serial": self.serial,
                "not_before": self.not_before_text, "not_after": self.not_after_text,
                "days_left": None if days is None else round(days, 2)}


class CredentialSet:
    """A CA, client certificate and key that parse and belong together."""

    def __init__(self, ca, cert, key, cert_info, ca_info, paths=None, problem=None):
        self.ca = ca
        self.cert = cert
        self.key = key
        self.fingerprint = fingerprint(ca, cert, key)
        self.cert_info = cert_info
        self.ca_info = ca_info
        self.paths = dict(paths or {})
        # A soft CredentialError (dates, chain) when validated non-strictly.
        self.problem = problem

    def as_dict(self, now=None):
        now = time.time() if now is None else now
        return {"fingerprint": self.fingerprint, "paths": self.paths,
                "cert": self.cert_info.as_dict(now), "ca": self.ca_info.as_dict(now),
                "problem": None if self.problem is None else str(self.problem)}


def fingerprint(ca, cert, key):
    """sha256 (hex) of the three files' contents, in a form where moving
    bytes from one file to the next changes it."""
    h = hashlib.sha256()
    for part in (ca, cert, key):
        h.update(b"%d:" % len(part))
        h.update(part)
    return h.hexdigest()


def validate(ca, cert, key, now=None, paths=None, strict=True):
    """The CredentialSet of ``ca``, ``cert`` and ``key`` (bytes); raises
    CredentialError. ``paths`` ({"ca": path, ...}) name the files in the
    messages. ``strict=False`` returns a set with a soft problem instead of
    raising for it."""
    now = time.time() if now is None else now
    paths = dict(paths or {})
    name = {w: paths.get(w) or w for w in FILES}
    with written(ca, cert, key) as files:
        ca_info = _parse_cert("ca", ca, files["ca"], name)
        cert_info = _parse_cert("cert", cert, files["cert"], name)
        _check_key(files, name)
        problem = _dates("cert", cert_info, now, name) or _dates("ca", ca_info, now, name) \
            or _chain(files, name)
    if problem is not None and strict:
        raise problem
    return CredentialSet(ca, cert, key, cert_info, ca_info, paths, problem)


@contextlib.contextmanager
def written(ca, cert, key):
    """{"ca", "cert", "key": path} holding the bytes for the duration of the
    block, for the ``ssl`` calls that only take files. Anonymous memory
    files (memfd, reached as /proc/self/fd/N) where Linux has them, so the
    private key never touches a disk; else a private directory (0700,
    files 0600) removed at once."""
    try:
        fds = _memfds((("ca", ca), ("cert", cert), ("key", key)))
    except (AttributeError, OSError):
        fds = None
    if fds is not None:
        try:
            yield {what: "/proc/self/fd/%d" % fd for what, fd in fds.items()}
        finally:
            for fd in fds.values():
                os.close(fd)
        return
    tmp = tempfile.mkdtemp(prefix="elkeid-tls-")
    try:
        files = {}
        for what, data in (("ca", ca), ("cert", cert), ("key", key)):
            files[what] = os.path.join(tmp, what + ".pem")
            fd = os.open(files[what], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _memfds(items):
    """{what: fd} of memfds holding each item's bytes, readable through
    /proc/self/fd; raises AttributeError/OSError where that is not there."""
    fds = {}
    try:
        for what, data in items:
            fd = os.memfd_create("elkeid-tls-" + what, os.MFD_CLOEXEC)
            fds[what] = fd
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        # ssl opens the path itself: make sure this host's /proc serves it.
        os.stat("/proc/self/fd/%d" % fds["key"])
        return fds
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise


def tls_paths(settings):
    """{"ca", "cert", "key": absolute path} of ``settings``."""
    return {what: settings.path(getattr(settings, what)) for what in FILES}


def read_files(paths):
    """{"ca": bytes, ...} of ``paths``; CredentialError(unreadable) naming
    the first file that cannot be read. ``open`` follows symlinks at read
    time, so a cert manager's atomic ``..data`` swap is seen whole."""
    out = {}
    for what in FILES:
        try:
            with open(paths[what], "rb") as f:
                out[what] = f.read()
        except OSError as e:
            raise CredentialError(what, UNREADABLE, "cannot read TLS %s %s: %s"
                                  % (what, paths[what], e.strerror or e)) from None
    return out


def load(paths, now=None, strict=True):
    """read_files + validate."""
    data = read_files(paths)
    return validate(data["ca"], data["cert"], data["key"], now, paths, strict)


# ------------------------------------------------------------------ checks

def _parse_cert(what, data, path, name):
    try:
        # Parsing as a trust store tells a garbage certificate from a
        # garbage key, which load_cert_chain does not.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise CredentialError(what, NOT_PEM, "TLS %s %s holds no PEM certificate"
                              % (what, name[what])) from None
    return CertInfo(_decode(path))


def _check_key(files, name):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # A passphrase-protected key gets a wrong passphrase, not a prompt.
        ctx.load_cert_chain(files["cert"], files["key"], password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise CredentialError("key", KEY_MISMATCH, "TLS key %s does not match the "
                                  "certificate %s" % (name["key"], name["cert"])) from None
        raise CredentialError("key", NOT_PEM, "TLS key %s is not an unencrypted PEM private "
                              "key" % name["key"]) from None


def _dates(what, info, now, name):
    if info.not_after is not None and now > info.not_after:
        return CredentialError(what, EXPIRED, "TLS %s %s expired on %s"
                               % (what, name[what], info.not_after_text))
    if info.not_before is not None and now < info.not_before:
        return CredentialError(what, NOT_YET_VALID, "TLS %s %s is not valid before %s "
                               "(is the clock right?)" % (what, name[what],
                                                          info.not_before_text))
    return None


def _chain(files, name):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(files["ca"])
    # The server side needs a certificate of its own; which one does not
    # matter (the client does not verify it), so it reuses the client's.
    server.load_cert_chain(files["cert"], files["key"], password=lambda: b"")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(files["cert"], files["key"], password=lambda: b"")
    try:
        _handshake(client, server)
    except ssl.SSLCertVerificationError as e:
        if e.verify_code in _V_EXPIRED:
            reason, why = EXPIRED, "has expired"
        elif e.verify_code in _V_NOT_YET_VALID:
            reason, why = NOT_YET_VALID, "is not valid yet"
        elif e.verify_code in NOT_OUR_CA:
            reason, why = UNKNOWN_CA, "is not signed by the CA %s" % name["ca"]
        else:
            reason, why = UNTRUSTED, "is refused by the CA %s" % name["ca"]
        return CredentialError("cert", reason, "TLS cert %s %s (%s)"
                               % (name["cert"], why, e.verify_message))
    except ssl.SSLError as e:
        return CredentialError("cert", UNTRUSTED, "TLS cert %s is not accepted by the CA %s "
                               "(%s)" % (name["cert"], name["ca"], e.reason or e))
    return None


def _handshake(client_ctx, server_ctx):
    """Run a TLS handshake between two in-memory endpoints; raises what the
    server side raised (its verification of the client certificate)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _round in range(20):  # a handshake takes 2-3 flights; more is a bug
        for side, obj in (("client", client), ("server", server)):
            if done[side]:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["server"]:
            return
    raise ssl.SSLError("in-memory handshake did not complete")


def _decode(path):
    try:
        # Private but long-standing; without it the dates stay unknown and
        # the handshake still catches an expired certificate.
        return ssl._ssl._test_decode_cert(path)
    except Exception:
        return {}


def _seconds(text):
    try:
        return ssl.cert_time_to_seconds(text) if text else None
    except ValueError:
        return None


def _name(rdns):
    parts = []
    for rdn in rdns:
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O",
                     "organizationalUnitName": "OU", "countryName": "C",
                     "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            parts.append("%s=%s" % (short, value))
    return ",".join(parts)
