"""The systemd notify protocol (sd_notify(3)) with the standard library.

Owns talking to the service manager: ``READY=1`` once the agent is up,
``STOPPING=1`` on shutdown, ``STATUS=...`` lines and ``WATCHDOG=1`` pings,
and reading the watchdog interval systemd asks for. Everything is a no-op
returning False/None when the agent is not run by systemd (no
``$NOTIFY_SOCKET``), so callers need no special case for sysvinit.

The supervisor should drop NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID
from the environment it gives plugins: they are meant for this process only.
"""

import os
import socket

# A datagram to systemd practically never blocks, but if the manager is
# wedged a send must not stall the event loop for long.
_SEND_TIMEOUT = 0.5


def _address(raw):
    """The socket address for a NOTIFY_SOCKET value, or None if unusable.

    '@name' is Linux's abstract namespace (a leading NUL byte); otherwise an
    absolute filesystem path. Other forms (e.g. 'vsock:') are not ours."""
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(message, environ=None):
    """Send one notification such as ``"READY=1"``; True if it was sent.

    False when not under systemd or when sending failed: notification is best
    effort and must never take the agent down."""
    env = os.environ if environ is None else environ
    address = _address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    if not data:
        return False
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        sock.settimeout(_SEND_TIMEOUT)
        sock.connect(address)
        sock.sendall(data)
        return True
    except (OSError, ValueError):
        # ValueError: a path with an embedded NUL byte.
        return False
    finally:
        sock.close()


def ready(status=None, environ=None):
    """``READY=1`` (with an optional STATUS line) for Type=notify units."""
    message = "READY=1"
    if status:
        message += "\nSTATUS=" + _one_line(status)
    return notify(message, environ)


def stopping(environ=None):
    return notify("STOPPING=1", environ)


def status(text, environ=None):
    return notify("STATUS=" + _one_line(text), environ)


def watchdog(environ=None):
    """One keep-alive ping; send it every ``watchdog_interval() / 2``."""
    return notify("WATCHDOG=1", environ)


def _one_line(text):
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return str(text).replace("\n", " ")


def watchdog_interval(environ=None):
    """Seconds systemd waits for a WATCHDOG=1 ping, or None if it does not.

    Honours WATCHDOG_PID as sd_watchdog_enabled(3) does: when set, the
    watchdog is meant for that pid only (a child that inherited the variables
    must not think it is watched)."""
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1e6
