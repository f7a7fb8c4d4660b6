"""The mutual-TLS channel to AgentCenter: credentials from the TLS files,
channel arguments (keepalive within AgentCenter's ping policy, message size
limits, the server name the certificate must carry), the start-up check of
the TLS files and a readiness wait that fails fast when the dial is refused.
"""

import asyncio
import logging

import grpc

from . import credentials
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


def grpc_credentials(cred_set):
    """grpc channel credentials from a validated CredentialSet (memory,
    not the files: what is on disk may be a newer set that failed)."""
    return grpc.ssl_channel_credentials(root_certificates=cred_set.ca,
                                        private_key=cred_set.key,
                                        certificate_chain=cred_set.cert)


def load_credentials(settings):
    """The CredentialSet of the TLS files; LocalFault naming the file and
    setting when they cannot be used at all (unreadable, not PEM, a key
    that is not the certificate's). Dates and the chain to the CA are a
    soft ``problem`` on the set: clocks drift, and the server decides."""
    try:
        return credentials.load(credentials.tls_paths(settings), strict=False)
    except credentials.CredentialError as e:
        raise LocalFault("%s (%s)" % (e, _SETTING[e.what])) from None


def check_tls_files(settings):
    """Refuse, before any dial, TLS files grpc could only fail on later and
    silently (load_credentials). A soft problem (expired, not yet valid,
    not signed by the CA) is logged; returns the set."""
    cred_set = load_credentials(settings)
    if cred_set.problem is not None:
        log.error("%s: the server will likely refuse it", cred_set.problem,
                  extra={"console": True})
    return cred_set


_SETTING = {"ca": "--ca / ELKEID_CA", "cert": "--cert / ELKEID_CERT",
            "key": "--key / ELKEID_KEY"}


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
