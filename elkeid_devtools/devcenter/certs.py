"""Throwaway certificates for the development AgentCenter.

Owns the CA, server and client certificates the devcenter and its tests use.
A bundle is ``ca.crt server.crt server.key client.crt client.key`` in one
directory (keys mode 0600), plus ``ca.key`` so ``reissue_server_cert`` can
issue a new server certificate from the same CA (the devcenter loads it on
SIGHUP). The server certificate names ``elkeid.com``
because that is the agent's default ``--server-name``: the agent dials
127.0.0.1 and overrides the TLS target name, exactly as it does against a
real AgentCenter.

``make_ca`` and ``issue_cert`` are public so tests can build an unrelated CA
or a server certificate for another name and check that the agent refuses
them. ECDSA P-256 keys keep generation fast (milliseconds, not seconds).
"""

import datetime
import ipaddress
import os
from collections import namedtuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SERVER_NAME = "elkeid.com"
DEFAULT_CLIENT_NAME = "elkeid-agent"
FILES = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
# The CA's key, so a server certificate can be reissued from the same CA.
CA_KEY = "ca.key"

# Starting a day in the past tolerates clock skew between the machine that
# made the bundle and the one using it (and a VM whose clock jumped).
_BACKDATE = datetime.timedelta(days=1)
_LIFETIME = datetime.timedelta(days=3650)

Bundle = namedtuple("Bundle", "dir ca server_crt server_key client_crt client_key")
Bundle.__doc__ = "Paths of the five files of a certificate bundle."


class KeyPair:
    """A private key with its certificate, plus their PEM encodings."""

    def __init__(self, key, cert):
        self.key = key
        self.cert = cert

    @property
    def cert_pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self):
        # PKCS#8 unencrypted: what grpc (BoringSSL) and Go's tls package read.
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def name(self):
        attrs = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return attrs[0].value if attrs else ""


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder, not_before=None, not_after=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(not_before or now - _BACKDATE) \
        .not_valid_after(not_after or now + _LIFETIME)


def make_ca(name="elkeid-devcenter CA"):
    """A self-signed CA that may sign leaf certificates only."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    cert = _validity(builder).sign(key, hashes.SHA256())
    return KeyPair(key, cert)


def _san_entry(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_cert(ca, name, kind="server", extra_names=(), not_before=None, not_after=None):
    """A leaf certificate for ``name`` signed by ``ca`` (a KeyPair).

    ``kind`` is "server" or "client" and selects the extended key usage;
    BoringSSL (grpc) checks it, so a client certificate cannot serve and vice
    versa. ``name`` goes into the CN and the SAN (as an IP entry when it is an
    address); ``extra_names`` adds more SAN entries. ``not_before`` and
    ``not_after`` (aware datetimes) replace the default validity, e.g. for
    an expired or not yet valid certificate."""
    if kind == "server":
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    elif kind == "client":
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    else:
        raise ValueError("kind must be 'server' or 'client', got %r" % (kind,))
    key = _new_key()
    sans = [_san_entry(n) for n in (name,) + tuple(extra_names)]
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca.cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    cert = _validity(builder, not_before, not_after).sign(ca.key, hashes.SHA256())
    return KeyPair(key, cert)


def _write(path, data, mode):
    # O_CREAT with the final mode, then fchmod: a key is never readable by
    # others, not even for a moment, and an existing file gets tightened too.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
    finally:
        if fd is not None:
            os.close(fd)


def bundle_paths(directory):
    directory = os.path.abspath(directory)
    return Bundle(directory, *(os.path.join(directory, f) for f in FILES))


def write_bundle(directory, ca=None, server_name=DEFAULT_SERVER_NAME,
                 client_name=DEFAULT_CLIENT_NAME):
    """Write the five bundle files into ``directory`` (created 0700 when
    missing), replacing what is there. A new CA is made unless one is given.
    Returns the Bundle of paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca = ca or make_ca()
    server = issue_cert(ca, server_name, "server")
    client = issue_cert(ca, client_name, "client")
    paths = bundle_paths(directory)
    _write(paths.ca, ca.cert_pem, 0o644)
    _write(paths.server_crt, server.cert_pem, 0o644)
    _write(paths.server_key, server.key_pem, 0o600)
    _write(paths.client_crt, client.cert_pem, 0o644)
    _write(paths.client_key, client.key_pem, 0o600)
    _write(os.path.join(paths.dir, CA_KEY), ca.key_pem, 0o600)
    return paths


def load_ca(directory):
    """The bundle's CA as a KeyPair (needs ``ca.key``, which bundles made
    before it was written do not have: OSError then)."""
    with open(os.path.join(directory, "ca.crt"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(directory, CA_KEY), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    return KeyPair(key, cert)


def write_pair(pair, cert_path, key_path):
    """Write a KeyPair's certificate (0644) and key (0600), e.g. a new
    server certificate for the devcenter to load on SIGHUP."""
    _write(cert_path, pair.cert_pem, 0o644)
    _write(key_path, pair.key_pem, 0o600)


def reissue_server_cert(directory, ca=None, server_name=DEFAULT_SERVER_NAME):
    """A new server certificate and key in the bundle ``directory``, issued
    by ``ca`` (default: the bundle's own CA, from ca.key); returns it."""
    paths = bundle_paths(directory)
    server = issue_cert(ca or load_ca(directory), server_name, "server")
    write_pair(server, paths.server_crt, paths.server_key)
    return server


def ensure_bundle(directory):
    """Use the bundle in ``directory`` when all five files exist, else write
    a fresh one (a partial bundle is replaced: its parts may not match)."""
    paths = bundle_paths(directory)
    if all(os.path.isfile(p) for p in paths[1:]):
        return paths
    return write_bundle(directory)


def read_bundle(paths):
    """{"ca", "server_crt", ...: bytes} for the Bundle ``paths``."""
    out = {}
    for field in Bundle._fields[1:]:
        with open(getattr(paths, field), "rb") as f:
            out[field] = f.read()
    return out
