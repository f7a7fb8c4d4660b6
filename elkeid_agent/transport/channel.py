"""The mutual-TLS channel to AgentCenter: credentials from the TLS files,
channel arguments (keepalive within AgentCenter's ping policy, message size
limits, the server name the certificate must carry), the start-up check of
the TLS files and a readiness wait that fails fast when the dial is refused.
"""

import asyncio
import logging
import ssl
import time

import grpc

from ..errors import LocalFault

log = logging.getLogger(__name__)

# AgentCenter refuses messages over 10 MiB.
MAX_MESSAGE = 10 * 1024 * 1024
# grpcio can send only these; AgentCenter accepts gzip (docs/protocol.md section 5).
COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}
# A keepalive ping unanswered this long ends the connection; with the ping
# interval (keepalive_seconds) it bounds how long a server that silently
# stopped answering (a blackhole, not a refusal) goes unnoticed.
KEEPALIVE_TIMEOUT_SECONDS = 20


def identity(b):
    """The (de)serializer of every call: the agent builds and parses the
    message bytes itself, so a malformed server message is a counted error
    of ours, not an exception inside grpc."""
    return b


def load_credentials(settings):
    """Read CA, client cert and key; LocalFault with the path on failure."""
    material = []
    for what in ("ca", "key", "cert"):
        path = settings.path(getattr(settings, what))
        try:
            with open(path, "rb") as f:
                material.append(f.read())
        except OSError as e:
            raise LocalFault("cannot read TLS %s %s: %s" % (what, path, e.strerror)) from None
    ca, key, cert = material
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def check_tls_files(settings):
    """Refuse, before any dial, TLS files grpc could only fail on later and
    silently: unreadable, not PEM, or a key that is not the certificate's.
    LocalFault naming the file. An expired or not yet valid client
    certificate is only logged: clocks drift, and the server decides."""
    paths = {what: settings.path(getattr(settings, what)) for what in ("ca", "cert", "key")}
    for what, path in paths.items():
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise LocalFault("cannot read TLS %s %s: %s (%s)"
                             % (what, path, e.strerror, _SETTING[what])) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(paths["ca"])
    except ssl.SSLError:
        raise LocalFault("TLS ca %s holds no PEM certificate (%s)"
                         % (paths["ca"], _SETTING["ca"])) from None
    try:
        # Parsing the client certificate as a trust store tells a garbage
        # certificate from a garbage key, which load_cert_chain does not.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(paths["cert"])
    except ssl.SSLError:
        raise LocalFault("TLS cert %s holds no PEM certificate (%s)"
                         % (paths["cert"], _SETTING["cert"])) from None
    try:
        # A passphrase-protected key gets a wrong passphrase, not a prompt.
        ctx.load_cert_chain(paths["cert"], paths["key"], password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise LocalFault("TLS key %s does not match the certificate %s (%s, %s)"
                             % (paths["key"], paths["cert"], _SETTING["key"],
                                _SETTING["cert"])) from None
        raise LocalFault("TLS key %s is not an unencrypted PEM private key (%s)"
                         % (paths["key"], _SETTING["key"])) from None
    _warn_validity(paths["cert"])


_SETTING = {"ca": "--ca / ELKEID_CA", "cert": "--cert / ELKEID_CERT",
            "key": "--key / ELKEID_KEY"}


def _warn_validity(path, now=None):
    try:
        # Private but long-standing; without it the check is skipped.
        info = ssl._ssl._test_decode_cert(path)
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
    except Exception:
        return
    now = time.time() if now is None else now
    if now > not_after:
        log.error("TLS cert %s expired on %s: the server will refuse it", path,
                  info["notAfter"], extra={"console": True})
    elif now < not_before:
        log.error("TLS cert %s is not valid before %s (is the clock right?)", path,
                  info["notBefore"], extra={"console": True})


def channel_options(s):
    """grpc channel arguments for ``settings`` ``s``."""
    keepalive_ms = int(s.keepalive_seconds * 1000)
    return [
        ("grpc.ssl_target_name_override", s.server_name),
        ("grpc.default_authority", s.server_name),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        # AgentCenter disconnects clients pinging more often than every
        # 5 s; ping only every keepalive_seconds and only with a call open.
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        # We run our own reconnect policy; keep grpc's short so a
        # channel_ready() wait reflects reality.
        ("grpc.initial_reconnect_backoff_ms", 1000),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


async def wait_ready(channel, timeout):
    """Like channel_ready() but fails fast on TRANSIENT_FAILURE (refused
    connection, TLS rejection) instead of waiting out the dial timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            raise ConnectionError("channel state %s" % state.name)
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise asyncio.TimeoutError("dial timeout")
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError("dial timeout") from None
        state = channel.get_state(try_to_connect=True)


def short_error(e):
    """One line of at most 300 characters describing ``e``."""
    text = str(e) or type(e).__name__
    if isinstance(e, grpc.aio.AioRpcError):
        text = "%s: %s" % (e.code().name, e.details())
    return text.splitlines()[0][:300] if text else type(e).__name__
