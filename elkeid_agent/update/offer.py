"""What the server offers and whether this host may apply it. No I/O.

Two sources, one ``Offer``:

- the ``elkeid-agent`` entry of a configs list (``Config``): ``version``,
  ``type`` (``deb``, ``rpm``, ``pyz``; empty: told from the file's magic
  bytes), ``sha256``, ``download_urls``. ``signature`` keeps Elkeid's
  meaning (a hash, docs/protocol.md section 2) and is not used here; an
  optional JSON object in ``detail`` carries ``{"signature": base64,
  "allow_downgrade": true}``. Without a signature in ``detail`` the
  detached signature is fetched from ``<url>.sig`` beside the package.
- a service UpdateRequest task (docs/update.md): JSON ``component``,
  ``version``, ``download_url``, ``hash``, ``signature`` (base64),
  ``allow_downgrade``, ``type``.

Versions compare piecewise: the text is split into runs of digits and runs
of letters (everything else separates); numbers compare as numbers and
rank below words, so ``1.10 > 1.9``; a longer version with the same start
is newer (``1.0.1 > 1.0``). A pre-release is marked as Debian marks it,
with ``~``: ``1.0~rc1 < 1.0`` (whereas ``1.0rc1 > 1.0``). An offer older than the running version is refused
unless it says ``allow_downgrade``; the same version is no update at all.
"""

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

AGENT = "elkeid-agent"
KINDS = ("deb", "rpm", "pyz")
# How each way of installing the agent can be updated.
ACCEPTS = {"pyz": ("pyz",), "deb": ("deb",), "rpm": ("rpm",)}
MAX_SIGNATURE_TEXT = 16384
# Whole strings (fullmatch): "$" alone would let a trailing newline through.
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_:-]{0,63}")
# The agent's name or a local service id (services/config.py's rule).
_COMPONENT = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,63}")


class OfferError(ValueError):
    """An offer that cannot be acted on; the message says why (D4002 or
    D4003 in the report)."""


@dataclass(frozen=True)
class Offer:
    component: str
    version: str
    kind: str                      # "" = tell from the file
    sha256: str
    urls: Tuple[str, ...]
    signature: Optional[bytes] = None   # from the offer itself
    allow_downgrade: bool = False
    token: str = ""                # the task's, for a service update
    notes: Tuple[str, ...] = field(default=(), compare=False)


def _check_common(component, version, sha256, urls, kind):
    if not _COMPONENT.fullmatch(component or ""):
        raise OfferError("component %r is not a valid name" % (component,))
    if not _VERSION.fullmatch(version or ""):
        raise OfferError("version %r is not a version string" % (version,))
    if not _HEX64.fullmatch(sha256 or ""):
        raise OfferError("sha256 %r is not 64 hex digits" % (sha256,))
    if kind and kind not in KINDS:
        raise OfferError("type %r is not one of %s (or empty)" % (kind, ", ".join(KINDS)))
    if not urls:
        raise OfferError("no download URL")
    for u in urls:
        if not isinstance(u, str) or not u.lower().startswith(("http://", "https://")):
            raise OfferError("download URL %r is not http or https" % (u,))


def decode_signature(text):
    """Signature bytes from base64 text (whitespace ignored)."""
    if not isinstance(text, str) or len(text) > MAX_SIGNATURE_TEXT:
        raise OfferError("signature is not a base64 string")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise OfferError("signature is not valid base64") from None


def from_config(config):
    """The Offer of a configs list's ``elkeid-agent`` entry (a protobuf
    Config or anything with its fields). Raises OfferError."""
    notes = []
    signature, allow_downgrade = None, False
    detail = (config.detail or "").strip()
    if detail:
        try:
            extra = json.loads(detail)
        except ValueError:
            extra = None
        if not isinstance(extra, dict):
            # Not ours to read; the Go agent ignores detail for its own entry.
            notes.append("detail is not a JSON object; ignored")
            extra = {}
        if "signature" in extra:
            signature = decode_signature(extra["signature"])
        allow_downgrade = extra.get("allow_downgrade") is True
    kind = (config.type or "").strip().lower()
    urls = tuple(config.download_urls)
    _check_common(AGENT, config.version, config.sha256, urls, kind)
    return Offer(AGENT, config.version, kind, config.sha256.lower(), urls, signature,
                 allow_downgrade, notes=tuple(notes))


def from_update_request(data, token=""):
    """The Offer of a service UpdateRequest task (its JSON ``data``)."""
    try:
        req = json.loads(data)
    except ValueError as e:
        raise OfferError("update request is not JSON: %s" % e) from None
    if not isinstance(req, dict):
        raise OfferError("update request is not a JSON object")
    url = req.get("download_url")
    urls = tuple(url) if isinstance(url, list) else ((url,) if url else ())
    kind = str(req.get("type") or "").strip().lower()
    component = req.get("component")
    version = req.get("version")
    sha256 = req.get("hash")
    for name, value in (("component", component), ("version", version), ("hash", sha256)):
        if not isinstance(value, str):
            raise OfferError("update request field %r missing or not a string" % name)
    _check_common(component, version, sha256, urls, kind if component == AGENT else "")
    signature = decode_signature(req["signature"]) if req.get("signature") else None
    return Offer(component, version, kind, sha256.lower(), urls, signature,
                 req.get("allow_downgrade") is True, token=token)


# ------------------------------------------------------------------ versions

_PIECE = re.compile(r"\d+|[A-Za-z]+")


def _pieces(text):
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower())
                 for p in _PIECE.findall(text))


def version_key(version):
    """Sort key of a version string (module docstring)."""
    main, tilde, pre = (version or "").partition("~")
    # Anything after "~" sorts before the version without it.
    return (_pieces(main), (0, version_key(pre)) if tilde else (1,))


def compare_versions(a, b):
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def refusal(offer, current):
    """Why ``offer`` must not replace ``current`` (None: go ahead). The
    caller has already checked that the versions differ."""
    if compare_versions(offer.version, current) < 0 and not offer.allow_downgrade:
        return ("%s is older than the running %s; a downgrade needs "
                "\"allow_downgrade\": true in the offer" % (offer.version, current))
    if compare_versions(offer.version, current) == 0:
        return "%s and %s are the same version" % (offer.version, current)
    return None


def accepts(install, kind):
    """Whether an install of kind ``install`` (pyz, deb, rpm, source) can
    apply a download of kind ``kind``; None or the reason it cannot."""
    if install == "source":
        return ("this agent runs from a source tree, not from an installed zipapp or "
                "package; it cannot update itself")
    if kind not in ACCEPTS.get(install, ()):
        return ("a %s download cannot update this %s install (it takes %s)"
                % (kind, _INSTALL_NAMES.get(install, install),
                   " or ".join(ACCEPTS.get(install, ("nothing",)))))
    return None


_INSTALL_NAMES = {"pyz": "one-file (zipapp)", "deb": "deb package", "rpm": "rpm package"}


# ------------------------------------------------------------------ file kinds

DEB_MAGIC = b"!<arch>\ndebian-binary"
RPM_MAGIC = b"\xed\xab\xee\xdb"
ZIP_MAGIC = b"PK\x03\x04"


def kind_from_head(head):
    """deb, rpm, pyz (a zip, possibly behind a ``#!`` preamble), or None;
    the caller checks a pyz's contents."""
    if head.startswith(DEB_MAGIC):
        return "deb"
    if head.startswith(RPM_MAGIC):
        return "rpm"
    if head.startswith(ZIP_MAGIC) or (head.startswith(b"#!") and ZIP_MAGIC in head):
        return "pyz"
    return None


def describe_unknown(head):
    """A one-line guess at what a download that is no package is."""
    text = head.lstrip()[:64].lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<")):
        return "an HTML/XML page (an error or login page?), not a package"
    if not head:
        return "an empty file"
    return "not a deb, rpm or elkeid-agent zipapp (first bytes %r)" % head[:16]
