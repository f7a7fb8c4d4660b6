"""Keys and detached signatures for update packages (development only, never
shipped): what an operator, the demo or a test uses to sign a zipapp or a
package the agent will verify before it updates itself.

    python -m elkeid_devtools.signing keygen --type ed25519 --out release
    python -m elkeid_devtools.signing sign --key release.key elkeid-agent.pyz

``keygen`` writes PREFIX.key (private key, PKCS#8 PEM, mode 0600) and
PREFIX.pub (SubjectPublicKeyInfo PEM). ``sign`` writes FILE.sig, the raw
signature bytes over the exact bytes of FILE, and prints their base64 on
stdout: Ed25519 for an Ed25519 key; RSA with SHA-256 and PKCS#1 v1.5
(default) or PSS (MGF1-SHA-256, salt as long as the digest) for an RSA
key. Needs ``cryptography`` (in the dev extras).
"""

import argparse
import base64
import os
import sys

KINDS = ("ed25519", "rsa")
SCHEMES = ("pkcs1v15", "pss")
RSA_BITS = 3072


class SigningError(Exception):
    pass


def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    except ImportError as e:
        raise SigningError("the signing tool needs the 'cryptography' package "
                           "(pip install cryptography): %s" % e)
    return hashes, serialization, ed25519, padding, rsa


def rsa_padding(scheme):
    """The padding of an RSA-SHA-256 signature in ``scheme``; verifiers use
    the same one."""
    hashes, _s, _e, padding, _r = _crypto()
    if scheme == "pkcs1v15":
        return padding.PKCS1v15()
    if scheme == "pss":
        return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    raise SigningError("signature scheme must be one of %s, got %r" % (", ".join(SCHEMES), scheme))


def generate(kind):
    """A new key pair: (private key PEM, public key PEM), both bytes."""
    _h, serialization, ed25519, _p, rsa = _crypto()
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        raise SigningError("key type must be one of %s, got %r" % (", ".join(KINDS), kind))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def sign(private_pem, data, scheme="pkcs1v15"):
    """The detached signature of ``data`` (bytes) with the PEM private key;
    ``scheme`` matters for RSA keys only."""
    hashes, serialization, ed25519, _p, rsa = _crypto()
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as e:
        raise SigningError("not an unencrypted PEM private key: %s" % e)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, rsa_padding(scheme), hashes.SHA256())
    raise SigningError("unsupported key type %s (use ed25519 or rsa)" % type(key).__name__)


def _write(path, data, mode):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not loosen nor the file keep an older mode
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _keygen(args):
    private, public = generate(args.type)
    _write(args.out + ".key", private, 0o600)
    _write(args.out + ".pub", public, 0o644)
    print("wrote %s.key (private, 0600) and %s.pub" % (args.out, args.out), file=sys.stderr)


def _sign(args):
    with open(args.key, "rb") as f:
        private = f.read()
    with open(args.file, "rb") as f:
        data = f.read()
    signature = sign(private, data, args.scheme)
    _write(args.file + ".sig", signature, 0o644)
    print(base64.b64encode(signature).decode("ascii"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m elkeid_devtools.signing",
                                description="Keys and detached signatures for update packages.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="write PREFIX.key (0600) and PREFIX.pub")
    k.add_argument("--type", choices=KINDS, required=True)
    k.add_argument("--out", metavar="PREFIX", required=True)
    s = sub.add_parser("sign", help="write FILE.sig and print its base64")
    s.add_argument("--key", required=True, metavar="KEY", help="private key PEM")
    s.add_argument("--scheme", choices=SCHEMES, default="pkcs1v15",
                   help="RSA signature scheme (default pkcs1v15; ignored for ed25519)")
    s.add_argument("file", metavar="FILE")
    args = p.parse_args(argv)
    try:
        (_keygen if args.command == "keygen" else _sign)(args)
    except (SigningError, OSError) as e:
        print("signing: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
