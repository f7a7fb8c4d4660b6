"""The agent id: how it is derived and where it is kept (docs/protocol.md section 7).

This module owns the choice of the agent id and the ``<workdir>/machine-id``
file. The derivation follows Elkeid's ``agent/agent/id.go`` byte for byte
(``bytes.TrimSpace`` semantics, google/uuid v1.3.0 parsing, the exact
placeholder lists), because the id is the key under which AgentCenter stores a
host: computing a different id for the same machine would make it a new host.

Where docs/protocol.md section 7 departs from the Go code, we follow it:
- the id is always saved, also when it comes from ``SPECIFIED_AGENT_ID``;
- when the cloud/DMI source is rejected because of a placeholder or missing
  ``product_name``, Go leaves the id empty; we go on to ``/etc/machine-id``.
An empty ``SPECIFIED_AGENT_ID`` is treated as unset (Go would use "" as the id).
"""

import hashlib
import logging
import os
import tempfile
import uuid
from typing import Mapping, Optional, Tuple

from ..errors import LocalFault

log = logging.getLogger(__name__)

ENV_NAME = "SPECIFIED_AGENT_ID"
SAVED_NAME = "machine-id"

INSTANCE_ID = "var/lib/cloud/data/instance-id"
PRODUCT_UUID = "sys/class/dmi/id/product_uuid"
PRODUCT_NAME = "sys/class/dmi/id/product_name"
ETH0_ADDRESS = "sys/class/net/eth0/address"
MACHINE_ID = "etc/machine-id"

# Firmware that ships every board with the same UUID; hashing it would give
# thousands of hosts one id.
PLACEHOLDER_UUIDS = (
    b"03000200-0400-0500-0006-000700080009",
    b"02000100-0300-0400-0005-000600070008",
)
PLACEHOLDER_NAMES = (b"--", b"unknown", b"To be filled by O.E.M.", b"OEM not specify")
PLACEHOLDER_NAMES_ANY_CASE = (b"t.b.d",)

# Real id files are a few dozen bytes; anything this large is not an id and
# is not worth reading into memory.
MAX_ID_FILE = 1 << 20

# Go's unicode.IsSpace set, UTF-8 encoded, so trimming matches bytes.TrimSpace
# (Python's bytes.strip() knows only the ASCII ones).
_GO_SPACES = tuple(c.encode("utf-8") for c in (
    "\t", "\n", "\v", "\f", "\r", " ", "\u0085", "\u00a0", "\u1680",
    "\u2000", "\u2001", "\u2002", "\u2003", "\u2004", "\u2005", "\u2006",
    "\u2007", "\u2008", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f",
    "\u205f", "\u3000"))


def go_trim_space(data: bytes) -> bytes:
    """bytes.TrimSpace: strip leading and trailing Unicode white space."""
    start, end = 0, len(data)
    progress = True
    while progress and start < end:
        progress = False
        for sp in _GO_SPACES:
            if data.startswith(sp, start, end):
                start += len(sp)
                progress = True
                break
    progress = True
    while progress and start < end:
        progress = False
        for sp in _GO_SPACES:
            if data.endswith(sp, start, end):
                end -= len(sp)
                progress = True
                break
    return data[start:end]


# Error kinds of parse_go_uuid, named after google/uuid's messages because
# id.go branches on the "invalid UUID format" text.
ERR_LENGTH = "invalid UUID length"
ERR_URN = "invalid urn prefix"
ERR_FORMAT = "invalid UUID format"

_HEX = frozenset(b"0123456789abcdefABCDEF")
_DASHED_POSITIONS = (0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34)


def parse_go_uuid(data: bytes) -> Tuple[Optional[uuid.UUID], Optional[str]]:
    """google/uuid v1.3.0 ParseBytes: (uuid, None) or (None, error kind).

    Accepts the 36-char form, ``urn:uuid:`` + 36, 38 chars (the first and
    last byte are not checked, as in Go) and 32 bare hex digits.
    """
    n = len(data)
    if n == 32:
        if all(b in _HEX for b in data):
            return uuid.UUID(hex=data.decode("ascii")), None
        return None, ERR_FORMAT
    if n == 36 + 9:
        if data[:9].lower() != b"urn:uuid:":
            return None, ERR_URN
        data = data[9:]
    elif n == 36 + 2:
        data = data[1:]
    elif n != 36:
        return None, ERR_LENGTH
    if data[8:9] != b"-" or data[13:14] != b"-" or data[18:19] != b"-" or data[23:24] != b"-":
        return None, ERR_FORMAT
    digits = bytearray()
    for x in _DASHED_POSITIONS:
        pair = data[x:x + 2]
        if pair[0] not in _HEX or pair[1] not in _HEX:
            return None, ERR_FORMAT
        digits += pair
    return uuid.UUID(hex=digits.decode("ascii")), None


def sha1_uuid(name: bytes) -> str:
    """uuid.NewSHA1(uuid.NameSpaceOID, name), for arbitrary bytes.

    uuid.uuid5 only takes str before Python 3.12, and these sources may hold
    bytes that are not UTF-8.
    """
    digest = hashlib.sha1(uuid.NAMESPACE_OID.bytes + name).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ID_FILE + 1)
    except OSError as e:
        log.debug("id source %s unreadable: %s", path, e)
        return None
    if len(data) > MAX_ID_FILE:
        log.debug("id source %s larger than %d bytes, ignored", path, MAX_ID_FILE)
        return None
    return data


def _read_id(path: str) -> Optional[bytes]:
    """id.go fromIDFile: the trimmed contents, None if unreadable or under 6 bytes raw."""
    data = _read(path)
    if data is None:
        return None
    if len(data) < 6:
        log.debug("id source %s too short", path)
        return None
    return go_trim_space(data)


def _read_uuid(path: str) -> Tuple[Optional[uuid.UUID], Optional[str]]:
    """id.go fromUUIDFile: (uuid, None), or (None, error kind or "unreadable")."""
    data = _read(path)
    if data is None:
        return None, "unreadable"
    return parse_go_uuid(go_trim_space(data))


def _hardware_id(root: str) -> Optional[str]:
    """SHA-1 UUID of instance-id + product_uuid + eth0 MAC, when trustworthy."""
    parts = [_read_id(os.path.join(root, p)) for p in (INSTANCE_ID, PRODUCT_UUID, ETH0_ADDRESS)]
    source = b"".join(p for p in parts if p is not None)
    product_uuid = parts[1]
    if len(source) <= 8 or product_uuid in PLACEHOLDER_UUIDS:
        return None
    name = _read_id(os.path.join(root, PRODUCT_NAME))
    if (not name or name in PLACEHOLDER_NAMES
            or name.lower() in PLACEHOLDER_NAMES_ANY_CASE):
        log.debug("product_name missing or a placeholder; not using the hardware id")
        return None
    return sha1_uuid(source)


def derive(workdir: str, root: str = "/") -> str:
    """The id from the host's files, ignoring any override (no side effects)."""
    hw = _hardware_id(root)
    if hw is not None:
        return hw
    machine_id = os.path.join(root, MACHINE_ID)
    parsed, err = _read_uuid(machine_id)
    if parsed is not None:
        return str(parsed)
    if err == ERR_FORMAT:
        text = _read_id(machine_id)
        if text is not None:
            return sha1_uuid(text)
    saved, _err = _read_uuid(os.path.join(workdir, SAVED_NAME))
    if saved is not None:
        return str(saved)
    return str(uuid.uuid4())


def save(workdir: str, agent_id: str) -> None:
    """Atomically write ``<workdir>/machine-id`` (mode 0600, no newline, as Go)."""
    target = os.path.join(workdir, SAVED_NAME)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".machine-id.", dir=workdir)
        with os.fdopen(fd, "wb") as f:
            f.write(agent_id.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise LocalFault("cannot save the agent id to %s: %s" % (target, e)) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    try:
        dfd = os.open(workdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename stands
    finally:
        os.close(dfd)


def agent_id(workdir: str, override: Optional[str] = None,
             environ: Optional[Mapping[str, str]] = None, root: str = "/",
             persist: bool = True) -> str:
    """The agent id: ``override``, else env SPECIFIED_AGENT_ID, else derived.

    With ``persist`` the id is saved to ``<workdir>/machine-id``; a workdir
    that cannot be written raises LocalFault (the caller decides whether the
    agent runs on with an unsaved id).
    """
    if environ is None:
        environ = os.environ
    chosen = override or environ.get(ENV_NAME) or derive(workdir, root)
    if persist:
        save(workdir, chosen)
    return chosen
