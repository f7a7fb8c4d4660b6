"""Checks of a downloaded update, all over the exact bytes on disk: size,
sha256, and a detached signature when a public key is configured.

Keys: PEM public keys, Ed25519 or RSA (>= 2048 bits). Signatures: Ed25519
over the bytes; RSA with SHA-256, PKCS#1 v1.5 or PSS (any salt length).
A signature arrives raw or base64-encoded; both are accepted, told apart by
length. With a key configured verification fails closed: no signature, a
bad one, an unreadable key or no ``cryptography`` module all refuse the
update. Without a key only the hash is checked (Elkeid's behaviour).
"""

import base64
import binascii
import hashlib
import os

from ..errors import AgentError

_CHUNK = 1 << 20


class VerifyError(AgentError):
    """The download is not what the server promised (D4002)."""


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def check_hash(path, want):
    got = file_sha256(path)
    if got != want.lower():
        raise VerifyError("sha256 mismatch: the offer says %s, the download is %s"
                          % (want.lower(), got))


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    except ImportError as e:
        raise VerifyError("a public key is configured but signatures cannot be checked: "
                          "the cryptography module is unavailable (%s); refusing" % e) from None
    return InvalidSignature, UnsupportedAlgorithm, hashes, serialization, ed25519, padding, rsa


class PublicKey:
    """A loaded update-signing key."""

    def __init__(self, path):
        self.path = path
        _inv, unsupported, _h, serialization, ed25519, _p, rsa = _crypto()
        try:
            with open(path, "rb") as f:
                pem = f.read(65536)
        except OSError as e:
            raise VerifyError("update public key %s unreadable: %s" % (path, e.strerror or e)) \
                from None
        try:
            self.key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as e:
            raise VerifyError("update public key %s is not a PEM public key: %s" % (path, e)) \
                from None
        except unsupported as e:  # a curve or algorithm cryptography does not support
            raise VerifyError("update public key %s: %s; use Ed25519 or RSA" % (path, e)) \
                from None
        if isinstance(self.key, ed25519.Ed25519PublicKey):
            self.kind, self.sig_len = "ed25519", 64
        elif isinstance(self.key, rsa.RSAPublicKey):
            if self.key.key_size < 2048:
                raise VerifyError("update public key %s: RSA key of %d bits is too weak "
                                  "(at least 2048)" % (path, self.key.key_size))
            self.kind, self.sig_len = "rsa", (self.key.key_size + 7) // 8
        else:
            raise VerifyError("update public key %s: %s keys are not supported (Ed25519 or RSA)"
                              % (path, type(self.key).__name__))

    def decode(self, blob):
        """Signature bytes from raw or base64 ``blob``."""
        if len(blob) == self.sig_len:
            return blob
        try:
            raw = base64.b64decode(b"".join(blob.split()), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != self.sig_len:
            raise VerifyError("the signature is %d bytes (%s key: %d bytes, raw or base64)"
                              % (len(blob), self.kind, self.sig_len))
        return raw

    def verify(self, path, blob):
        """Raise VerifyError unless ``blob`` signs the bytes of ``path``."""
        InvalidSignature, _u, hashes, _s, _e, padding, _r = _crypto()
        sig = self.decode(blob)
        if self.kind == "ed25519":
            # Ed25519 signs the message itself (no pre-hash): read it whole.
            with open(path, "rb") as f:
                data = f.read()
            try:
                self.key.verify(sig, data)
                return "ed25519"
            except InvalidSignature:
                raise VerifyError("bad signature: the Ed25519 signature does not match "
                                  "the download and key %s" % self.path) from None
        # RSA signs a SHA-256 digest: hash in chunks, so a large package never
        # has to fit in the agent's memory limit.
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
        data = bytes.fromhex(file_sha256(path))
        schemes = (("pkcs1v15", padding.PKCS1v15()),
                   ("pss", padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                       salt_length=padding.PSS.AUTO)))
        for name, pad in schemes:
            try:
                self.key.verify(sig, data, pad, Prehashed(hashes.SHA256()))
                return "rsa-" + name
            except InvalidSignature:
                continue
        raise VerifyError("bad signature: the RSA signature (PKCS#1 v1.5 or PSS, SHA-256) "
                          "does not match the download and key %s" % self.path)


def check_size(path, max_bytes):
    size = os.path.getsize(path)
    if size > max_bytes:
        raise VerifyError("download is %d bytes, over the %d byte limit" % (size, max_bytes))
    return size
