"""The self-update core (elkeid_agent/update/) one piece at a time: offers,
verification, the journal's state machine, the agent's recovery after a
kill at each step, the guard under each service manager and install kind,
and the pruning of backups.

Host effects go through ``FakeInstall``, an InstallEffects whose file
copies and renames are real (temporary directories) and whose package
tools, systemctl, elkeidctl and spawning are recorded and answered from a
script. The processes that stand for the agent, the new version and the
guards are real (``sleep`` children whose pid and start time are recorded).
The guard's time is a fake clock whose sleep runs the test's events (the
new version marks itself healthy, exits, ...)."""

import asyncio
import base64
import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from elkeid_agent import __version__
from elkeid_agent.metrics import Registry
from elkeid_agent.osfx import proc_start_ticks
from elkeid_agent.osfx.install import SERVICE, InstallEffects, InstallError, staging_path
from elkeid_agent.osfx.services import Spawned
from elkeid_agent.pb import grpc_pb2
from elkeid_agent.services.config import ServiceSpec, UpdatePolicy
from elkeid_agent.settings import Settings
from elkeid_agent.state import AgentState
from elkeid_agent.update import guard as guard_module
from elkeid_agent.update import offer as offers
from elkeid_agent.update.guard import Guard, prune
from elkeid_agent.update.journal import FINAL, SCHEMA_VERSION, STATES, Journal, JournalError
from elkeid_agent.update.offer import OfferError
from elkeid_agent.update.services import ServiceUpdater, owns_backup
from elkeid_agent.update.updater import HANDOVER_GRACE, AgentUpdater
from elkeid_agent.update.verify import PublicKey, VerifyError, check_hash, check_size
from elkeid_devtools.launchers import FileServer
# wd (a workdir) and clock (a Clock at T0) are fixtures.
from test_ctl_update import T0, Clock, clock, through, wd, zipapp  # noqa: F401

AGENT = "elkeid-agent"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = "ab" * 32
NEWER = "999.0.0"   # newer than any version this tree will carry


# ================================================================ offers

def config(**fields):
    base = dict(name=AGENT, version="2.0.0", type="pyz", sha256=SHA,
                download_urls=["http://10.0.0.1/elkeid-agent.pyz"], detail="")
    base.update(fields)
    return grpc_pb2.Config(**base)


def test_a_tilde_marks_a_pre_release():
    from elkeid_agent.update.offer import compare_versions
    assert compare_versions("1.0~rc1", "1.0") < 0
    assert compare_versions("1.0~rc2", "1.0~rc1") > 0
    assert compare_versions("1.0.1~rc1", "1.0") > 0
    assert compare_versions("1.0rc1", "1.0") > 0
    assert compare_versions("1.0", "1.0") == 0


def test_a_config_offer_keeps_what_it_says():
    off = offers.from_config(config(type=" PYZ ", sha256="AB" * 32,
                                    download_urls=["https://a/x.pyz", "http://b/x.pyz"]))
    assert (off.component, off.version, off.kind, off.sha256) == (AGENT, "2.0.0", "pyz", SHA)
    assert off.urls == ("https://a/x.pyz", "http://b/x.pyz")
    assert (off.signature, off.allow_downgrade, off.notes) == (None, False, ())
    assert offers.from_config(config(type="")).kind == ""  # told from the file


@pytest.mark.parametrize("fields, needle", [
    ({"version": ""}, "not a version string"),
    ({"version": "-1.0"}, "not a version string"),
    ({"version": "1.0 beta"}, "not a version string"),
    ({"version": "1.0/../x"}, "not a version string"),
    ({"version": "1." + "0" * 64}, "not a version string"),
    ({"version": "1.2.3\n"}, "not a version string"),
    ({"sha256": ""}, "not 64 hex digits"),
    ({"sha256": "ab" * 31}, "not 64 hex digits"),
    ({"sha256": "ab" * 33}, "not 64 hex digits"),
    ({"sha256": "zz" * 32}, "not 64 hex digits"),
    ({"sha256": SHA + "\n"}, "not 64 hex digits"),
    ({"download_urls": []}, "no download URL"),
    ({"download_urls": ["ftp://10.0.0.1/a.pyz"]}, "is not http or https"),
    ({"download_urls": ["file:///etc/passwd"]}, "is not http or https"),
    ({"download_urls": ["10.0.0.1/a.pyz"]}, "is not http or https"),
    ({"download_urls": ["http://10.0.0.1/a.pyz", "gopher://x/a"]}, "is not http or https"),
    ({"type": "tar.gz"}, "is not one of deb, rpm, pyz"),
    ({"type": "exe"}, "is not one of deb, rpm, pyz"),
])
def test_a_config_offer_is_refused(fields, needle):
    with pytest.raises(OfferError, match=needle):
        offers.from_config(config(**fields))


@pytest.mark.parametrize("detail", ["not json", "[1, 2]", "\"text\"", "42"])
def test_a_detail_that_is_no_json_object_is_ignored_with_a_note(detail):
    off = offers.from_config(config(detail=detail))
    assert off.notes == ("detail is not a JSON object; ignored",)
    assert (off.signature, off.allow_downgrade) == (None, False)


def test_a_detail_signature_is_decoded_whitespace_and_all():
    sig = bytes(range(64))
    text = base64.encodebytes(sig).decode()   # with a newline every 76 characters
    off = offers.from_config(config(detail='{"signature": "  %s  "}' % text.replace("\n", "\\n")))
    assert off.signature == sig and off.notes == ()


@pytest.mark.parametrize("signature, needle", [
    ('"not base64!"', "not valid base64"),
    ('"QUJ"', "not valid base64"),   # padding missing
    ("123", "not a base64 string"),
    ('["QUJD"]', "not a base64 string"),
    ('"%s"' % ("A" * (offers.MAX_SIGNATURE_TEXT + 4)), "not a base64 string"),
])
def test_a_bad_detail_signature_refuses_the_offer(signature, needle):
    with pytest.raises(OfferError, match=needle):
        offers.from_config(config(detail='{"signature": %s}' % signature))


def test_a_signature_text_at_the_limit_is_read():
    text = "A" * offers.MAX_SIGNATURE_TEXT
    off = offers.from_config(config(detail='{"signature": "%s"}' % text))
    assert off.signature == bytes(offers.MAX_SIGNATURE_TEXT * 3 // 4)


@pytest.mark.parametrize("value, allowed", [
    ("true", True), ('"true"', False), ("1", False), ('"yes"', False), ("false", False),
    ("null", False),
])
def test_allow_downgrade_only_when_true(value, allowed):
    assert offers.from_config(config(detail='{"allow_downgrade": %s}' % value)) \
        .allow_downgrade is allowed
    request = ('{"component": "svc", "version": "2", "hash": "%s", "download_url": "http://a/b", '
               '"allow_downgrade": %s}' % (SHA, value))
    assert offers.from_update_request(request).allow_downgrade is allowed


def test_an_update_request_offer():
    sig = bytes(range(64))
    off = offers.from_update_request(
        '{"component": "node_exporter", "version": "1.8.2", "hash": "%s", "type": "exe",'
        ' "download_url": ["http://a/ne", "https://b/ne"], "signature": "%s"}'
        % ("CD" * 32, base64.b64encode(sig).decode()), token="t-1")
    assert (off.component, off.version, off.sha256, off.token) == \
        ("node_exporter", "1.8.2", "cd" * 32, "t-1")
    assert off.urls == ("http://a/ne", "https://b/ne") and off.signature == sig
    # A service's type is its own business; the agent's must be a package kind.
    one = offers.from_update_request('{"component": "svc", "version": "2", "hash": "%s", '
                                     '"download_url": "http://a/b"}' % SHA)
    assert one.urls == ("http://a/b",) and one.signature is None


@pytest.mark.parametrize("data, needle", [
    ("{not json", "not JSON"),
    ("[1]", "not a JSON object"),
    ('{"version": "2", "hash": "%s", "download_url": "http://a"}' % SHA, "'component' missing"),
    ('{"component": "s", "hash": "%s", "download_url": "http://a"}' % SHA, "'version' missing"),
    ('{"component": "s", "version": "2", "download_url": "http://a"}', "'hash' missing"),
    ('{"component": "s", "version": 2, "hash": "%s", "download_url": "http://a"}' % SHA,
     "'version' missing or not a string"),
    ('{"component": "../etc", "version": "2", "hash": "%s", "download_url": "http://a"}' % SHA,
     "not a valid name"),
    ('{"component": "s", "version": "2", "hash": "%s", "download_url": []}' % SHA,
     "no download URL"),
    ('{"component": "s", "version": "2", "hash": "%s"}' % SHA, "no download URL"),
    ('{"component": "s", "version": "2", "hash": "%s", "download_url": "ftp://a"}' % SHA,
     "not http or https"),
    ('{"component": "s", "version": "2", "hash": "%s", "download_url": {"u": 1}}' % SHA,
     "not http or https"),
    ('{"component": "elkeid-agent", "version": "2", "hash": "%s", "download_url": "http://a",'
     ' "type": "tar"}' % SHA, "is not one of"),
    ('{"component": "s", "version": "2", "hash": "%s", "download_url": "http://a",'
     ' "signature": "!!"}' % SHA, "not valid base64"),
])
def test_an_update_request_is_refused(data, needle):
    with pytest.raises(OfferError, match=needle):
        offers.from_update_request(data)


@pytest.mark.parametrize("a, b, order", [
    ("1.10", "1.9", 1),
    ("1.7.0.24", "1.7.0.3", 1),
    ("1.7.0.3", "1.7.0.24", -1),
    ("10.0", "9.9.9", 1),
    ("2.0", "1.99.99", 1),
    ("1.2.3", "1.2.3", 0),
    ("1.02.3", "1.2.3", 0),           # numbers compare as numbers
    ("1.0", "1.0.1", -1),
    ("1.2a", "1.2b", -1),
    ("1.2RC1", "1.2rc1", 0),          # letters compare without case
    ("1.9", "1.a", -1),               # numbers rank below words
    ("1.2.3-1", "1.2.3-2", -1),       # no epoch: every piece in turn
    ("1.7.0.1", "1.7.0.1", 0),
])
def test_versions_compare_piecewise(a, b, order):
    assert offers.compare_versions(a, b) == order
    assert offers.compare_versions(b, a) == -order
    assert (offers.version_key(a) > offers.version_key(b)) - \
        (offers.version_key(a) < offers.version_key(b)) == order


def test_refusal_of_downgrades_and_the_same_version():
    older = offers.from_config(config(version="1.9"))
    assert "1.9 is older than the running 1.10" in offers.refusal(older, "1.10")
    assert '"allow_downgrade": true' in offers.refusal(older, "1.10")
    allowed = offers.from_config(config(version="1.9", detail='{"allow_downgrade": true}'))
    assert offers.refusal(allowed, "1.10") is None
    assert offers.refusal(allowed, "1.9") == "1.9 and 1.9 are the same version"
    assert offers.refusal(offers.from_config(config(version="1.10")), "1.9") is None


@pytest.mark.parametrize("install", ["pyz", "deb", "rpm", "source", "rpm-ostree"])
@pytest.mark.parametrize("kind", ["pyz", "deb", "rpm"])
def test_which_install_takes_which_download(install, kind):
    why = offers.accepts(install, kind)
    if install == kind:
        assert why is None
    elif install == "source":
        assert "runs from a source tree" in why
    else:
        assert why.startswith("a %s download cannot update this" % kind)
        assert why.endswith("(it takes %s)" % (install if install in offers.KINDS else "nothing"))


@pytest.mark.parametrize("head, kind", [
    (offers.DEB_MAGIC + b"\n2.0\n", "deb"),
    (offers.RPM_MAGIC + b"\x03\x00", "rpm"),
    (offers.ZIP_MAGIC + b"\x14\x00", "pyz"),
    (b"#!/usr/bin/env python3\n" + offers.ZIP_MAGIC + b"\x14\x00", "pyz"),
    (b"#!/bin/sh\necho not a zipapp\n", None),
    (b"<!DOCTYPE html><html>login</html>", None),
    (b"!<arch>\nsomething-else", None),
    (b"", None),
])
def test_kind_from_the_first_bytes(head, kind):
    assert offers.kind_from_head(head) == kind


@pytest.mark.parametrize("head, needle", [
    (b"  \n<!DOCTYPE html><html>", "an HTML/XML page"),
    (b"<?xml version='1.0'?><Error>", "an HTML/XML page"),
    (b"", "an empty file"),
    (b"\x7fELF\x02\x01\x01", "not a deb, rpm or elkeid-agent zipapp (first bytes b'\\x7fELF"),
])
def test_what_an_unknown_download_looks_like(head, needle):
    assert needle in offers.describe_unknown(head)


# ================================================================ verification

@pytest.fixture(scope="module")
def crypto():
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    class Keys:
        pass
    k = Keys()
    k.hashes, k.padding, k.serialization = hashes, padding, serialization
    k.ed = ed25519.Ed25519PrivateKey.generate()
    k.ed_other = ed25519.Ed25519PrivateKey.generate()
    k.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k.rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k.rsa_weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    k.ec = ec.generate_private_key(ec.SECP256R1())
    return k


# A secp112r1 public key (made once with openssl): PEM that OpenSSL reads but
# cryptography has no curve for.
SECP112R1_PUBLIC = b"""-----BEGIN PUBLIC KEY-----
MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAEDF1i+3J7rqpEBFxmBAYvnNdfeDCJPMTo
/qIkUg==
-----END PUBLIC KEY-----
"""


def pem_file(tmp_path, crypto, private, name="update.pub"):
    s = crypto.serialization
    path = tmp_path / name
    path.write_bytes(private.public_key().public_bytes(s.Encoding.PEM,
                                                       s.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


@pytest.fixture
def payload(tmp_path):
    path = tmp_path / "elkeid-agent_2.0.0.deb"
    path.write_bytes(b"!<arch>\ndebian-binary   " + bytes(range(256)) * 64)
    return str(path), path.read_bytes()


def rsa_sign(crypto, key, data, scheme):
    p, h = crypto.padding, crypto.hashes
    if scheme == "pkcs1v15":
        return key.sign(data, p.PKCS1v15(), h.SHA256())
    salt = p.PSS.MAX_LENGTH if scheme == "pss-max" else 32
    return key.sign(data, p.PSS(mgf=p.MGF1(h.SHA256()), salt_length=salt), h.SHA256())


def encodings(sig):
    """The signature raw, as base64, and as base64 with line breaks and blanks."""
    b64 = base64.b64encode(sig)
    wrapped = b"\r\n".join(b64[i:i + 20] for i in range(0, len(b64), 20))
    return [sig, b64, b"  " + base64.encodebytes(sig) + b"\n\n", wrapped]


def test_ed25519_signatures_raw_or_base64(tmp_path, crypto, payload):
    path, data = payload
    key = PublicKey(pem_file(tmp_path, crypto, crypto.ed))
    assert (key.kind, key.sig_len) == ("ed25519", 64)
    for blob in encodings(crypto.ed.sign(data)):
        assert key.verify(path, blob) == "ed25519"


@pytest.mark.parametrize("scheme, result", [("pkcs1v15", "rsa-pkcs1v15"), ("pss-max", "rsa-pss"),
                                            ("pss-32", "rsa-pss")])
def test_rsa_signatures_raw_or_base64(tmp_path, crypto, payload, scheme, result):
    path, data = payload
    key = PublicKey(pem_file(tmp_path, crypto, crypto.rsa))
    assert (key.kind, key.sig_len) == ("rsa", 256)
    for blob in encodings(rsa_sign(crypto, crypto.rsa, data, scheme)):
        assert key.verify(path, blob) == result


def signed(crypto, kind, data):
    if kind == "ed25519":
        return crypto.ed, crypto.ed_other, crypto.ed.sign(data)
    return crypto.rsa, crypto.rsa_other, rsa_sign(crypto, crypto.rsa, data, "pkcs1v15")


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_a_flipped_byte_fails(tmp_path, crypto, payload, kind):
    path, data = payload
    private, _other, sig = signed(crypto, kind, data)
    key = PublicKey(pem_file(tmp_path, crypto, private))
    flipped = bytearray(sig)
    flipped[len(sig) // 2] ^= 0x01
    with pytest.raises(VerifyError, match="bad signature"):
        key.verify(path, bytes(flipped))
    with pytest.raises(VerifyError, match="bad signature"):
        key.verify(path, base64.b64encode(bytes(flipped)))
    changed = bytearray(data)
    changed[-1] ^= 0x80
    with open(path, "wb") as f:
        f.write(changed)
    with pytest.raises(VerifyError, match="does not match the download and key %s" % key.path):
        key.verify(path, sig)


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_another_keys_signature_fails(tmp_path, crypto, payload, kind):
    path, data = payload
    private, other, _sig = signed(crypto, kind, data)
    by_other = other.sign(data) if kind == "ed25519" else \
        rsa_sign(crypto, other, data, "pkcs1v15")
    with pytest.raises(VerifyError, match="bad signature"):
        PublicKey(pem_file(tmp_path, crypto, private)).verify(path, by_other)


@pytest.mark.parametrize("kind, length", [("ed25519", 64), ("rsa", 256)])
def test_a_truncated_signature_is_refused_by_length(tmp_path, crypto, payload, kind, length):
    path, data = payload
    private, _other, sig = signed(crypto, kind, data)
    key = PublicKey(pem_file(tmp_path, crypto, private))
    with pytest.raises(VerifyError, match="the signature is %d bytes \\(%s key: %d bytes"
                       % (length - 1, kind, length)):
        key.verify(path, sig[:-1])
    with pytest.raises(VerifyError, match="%s key: %d bytes, raw or base64" % (kind, length)):
        key.verify(path, base64.b64encode(sig[:-1]))
    with pytest.raises(VerifyError, match="the signature is 0 bytes"):
        key.verify(path, b"")


def test_keys_that_are_refused(tmp_path, crypto):
    with pytest.raises(VerifyError, match="RSA key of 1024 bits is too weak"):
        PublicKey(pem_file(tmp_path, crypto, crypto.rsa_weak))
    with pytest.raises(VerifyError, match=r"(EllipticCurve|EC)PublicKey keys are not "
                                          r"supported \(Ed25519 or RSA\)"):
        PublicKey(pem_file(tmp_path, crypto, crypto.ec))
    odd_curve = tmp_path / "secp112r1.pub"
    odd_curve.write_bytes(SECP112R1_PUBLIC)
    with pytest.raises(VerifyError, match="update public key %s: .*use Ed25519 or RSA"
                       % odd_curve):
        PublicKey(str(odd_curve))


def test_key_files_that_are_no_keys(tmp_path, crypto):
    text = tmp_path / "notes.txt"
    text.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI not a PEM key\n")
    with pytest.raises(VerifyError, match="is not a PEM public key"):
        PublicKey(str(text))
    s = crypto.serialization
    private = tmp_path / "private.pem"
    private.write_bytes(crypto.ed.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                                s.NoEncryption()))
    with pytest.raises(VerifyError, match="is not a PEM public key"):
        PublicKey(str(private))
    with pytest.raises(VerifyError, match="update public key %s unreadable: No such file"
                       % (tmp_path / "missing.pub")):
        PublicKey(str(tmp_path / "missing.pub"))
    with pytest.raises(VerifyError, match="unreadable: Is a directory"):
        PublicKey(str(tmp_path))


def test_without_the_cryptography_module_it_fails_closed(tmp_path, crypto, payload, monkeypatch):
    path, data = payload
    pem = pem_file(tmp_path, crypto, crypto.ed)
    loaded = PublicKey(pem)
    for name in [n for n in sys.modules if n == "cryptography" or n.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)   # an import of it now fails
    with pytest.raises(VerifyError, match="the cryptography module is unavailable .*; refusing"):
        PublicKey(pem)
    with pytest.raises(VerifyError, match="cannot be checked"):
        loaded.verify(path, crypto.ed.sign(data))
    monkeypatch.undo()
    assert loaded.verify(path, crypto.ed.sign(data)) == "ed25519"


def test_hash_and_size_checks(payload):
    path, data = payload
    digest = hashlib.sha256(data).hexdigest()
    check_hash(path, digest.upper())
    with pytest.raises(VerifyError, match="the offer says %s, the download is %s"
                       % ("00" * 32, digest)):
        check_hash(path, "00" * 32)
    assert check_size(path, len(data)) == len(data)
    with pytest.raises(VerifyError, match="download is %d bytes, over the %d byte limit"
                       % (len(data), len(data) - 1)):
        check_size(path, len(data) - 1)


# ================================================================ journal

# The state machine as the journal's docstring draws it (and service updates'
# switch without a guard).
ALLOWED = {
    "downloading": {"verifying", "failed", "interrupted"},
    "verifying": {"backing_up", "handed_over", "failed", "refused", "interrupted"},
    "backing_up": {"handed_over", "switching", "failed", "interrupted"},
    "handed_over": {"switching", "failed", "interrupted", "rolling_back"},
    "switching": {"trial", "rolling_back", "succeeded"},
    "trial": {"succeeded", "rolling_back"},
    "rolling_back": {"rolled_back", "rollback_failed"},
}


@pytest.fixture
def j(wd, clock):
    journal = Journal(str(wd), clock=clock)
    yield journal
    journal.close()


def states(journal, uid):
    return [e["state"] for e in journal.events(uid)]


def test_every_allowed_transition(j, clock):
    for src in sorted(ALLOWED):
        for dst in sorted(ALLOWED[src]):
            uid = j.begin(AGENT, "1.0", "2.0", state=src)
            clock.tick(7)
            j.move(uid, dst, "because %s" % dst, new_pid=42)
            row = j.get(uid)
            assert (row.state, row.reason, row.new_pid, row.updated) == \
                (dst, "because %s" % dst, 42, clock.t)
            assert row.finished == (clock.t if dst in FINAL else None), (src, dst)
            assert row.final == (dst in FINAL)
            assert [(e["state"], e["note"]) for e in j.events(uid)] == \
                [(src, ""), (dst, "because %s" % dst)]


def test_every_other_transition_is_refused(j):
    for src in STATES:
        uid = j.begin(AGENT, "1.0", "2.0", state=src)
        for dst in STATES:
            if dst in ALLOWED.get(src, ()):
                continue
            with pytest.raises(JournalError, match="update %d: %s -> %s is not a transition"
                               % (uid, src, dst)):
                j.move(uid, dst, "no")
        row = j.get(uid)
        assert (row.state, row.reason) == (src, "") and states(j, uid) == [src]
    assert set(FINAL) <= set(STATES) and not any(s in ALLOWED for s in FINAL)


def test_an_unknown_update_or_column(j):
    with pytest.raises(JournalError, match="no update 999 in the journal"):
        j.move(999, "verifying")
    assert j.get(999) is None and j.events(999) == []
    with pytest.raises(JournalError, match="unknown journal column 'colour'"):
        j.begin(AGENT, "1", "2", colour="red")
    uid = j.begin(AGENT, "1", "2")
    with pytest.raises(JournalError, match="unknown journal column 'colour'"):
        j.set(uid, colour="red")
    with pytest.raises(JournalError, match="unknown journal column"):
        j.move(uid, "verifying", colour="red")
    assert j.get(uid).state == "downloading"


def test_a_row_begun_final_is_finished_and_events_keep_their_order(j, clock):
    refused = j.begin(AGENT, "2.0", "1.0", state="refused", reason="a downgrade")
    row = j.get(refused)
    assert (row.state, row.started, row.finished, row.reason) == \
        ("refused", T0, T0, "a downgrade")
    uid = j.begin(AGENT, "1.0", "2.0", context={"b": 1, "a": [2]})
    for step, state in enumerate(["verifying", "backing_up", "handed_over", "switching",
                                  "trial", "rolling_back", "rolled_back"]):
        clock.tick(1)
        j.move(uid, state, "step %d" % step)
    events = j.events(uid)
    assert [e["state"] for e in events] == ["downloading", "verifying", "backing_up",
                                            "handed_over", "switching", "trial",
                                            "rolling_back", "rolled_back"]
    assert [e["at"] for e in events] == [T0 + i for i in range(8)]
    assert [e["note"] for e in events][1:] == ["step %d" % i for i in range(7)]
    row = j.get(uid)
    assert row.context == {"a": [2], "b": 1} and row.reason == "step 6"
    assert row.as_dict()["context"] == row.context
    j.move(j.begin(AGENT, "1", "3"), "verifying")   # no reason keeps the one there is
    assert j.get(uid).reason == "step 6"


def test_rejected_versions(j, clock):
    j.reject(AGENT, "2.0", "aa" * 32, "no heartbeat")
    j.reject(AGENT, "2.1", "bb" * 32, "exited")
    j.reject("node_exporter", "2.0", "cc" * 32, "unhealthy")
    assert j.rejected(AGENT, "2.0") == {"component": AGENT, "version": "2.0",
                                        "sha256": "aa" * 32, "reason": "no heartbeat", "at": T0}
    assert j.rejected(AGENT, "2.2") is None
    clock.tick()
    j.reject(AGENT, "2.0", "aa" * 32, "no heartbeat again")   # replaces
    assert j.rejected(AGENT, "2.0")["reason"] == "no heartbeat again"
    assert j.forget_rejections(AGENT, except_version="2.1") == 1
    assert j.rejected(AGENT, "2.0") is None and j.rejected(AGENT, "2.1") is not None
    assert j.rejected("node_exporter", "2.0") is not None   # another component's
    assert [r["version"] for r in j.all_rejected()] == ["2.1", "2.0"]
    assert j.forget_rejections(AGENT) == 1 and j.forget_rejections(AGENT) == 0
    assert [r["component"] for r in j.all_rejected()] == ["node_exporter"]


def test_unreported_rows_and_in_flight_ones(j):
    done = j.begin(AGENT, "1", "2", state="refused", reason="r")
    flying = j.begin(AGENT, "1", "3")
    service = j.begin("svc", "1", "2", state="backing_up")
    failed = j.begin(AGENT, "1", "4")
    j.move(failed, "failed", "download failed")
    older = j.begin("svc", "0", "1", state="trial")
    assert [r.id for r in j.unreported()] == [done, failed]
    j.mark_reported(done)
    assert [r.id for r in j.unreported()] == [failed]
    assert j.get(done).reported == 1
    assert [r.id for r in j.in_flight()] == [flying, service, older]
    assert [r.id for r in j.in_flight(AGENT)] == [flying]
    assert [r.id for r in j.in_flight("svc")] == [service, older]
    assert [r.id for r in j.history(limit=2)] == [failed, older]
    assert j.last_succeeded(AGENT) is None


CHILD_WRITER = """
import sys, time
from elkeid_agent.update.journal import Journal
j = Journal(sys.argv[1])
uid = j.begin("elkeid-agent", "1.0.0", "2.0.0")
print(uid, flush=True)
deadline = time.monotonic() + 60
while j.rejected("elkeid-agent", "3.0.0") is None:
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.01)
j.move(uid, "verifying", "saw the rejection")
time.sleep(0.05)
j.move(uid, "failed", "done")
"""


def test_two_processes_see_each_others_commits(j, wd):
    env = dict(os.environ, PYTHONPATH=REPO)
    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(wd)], stdout=subprocess.PIPE,
                             env=env, cwd=REPO)
    try:
        uid = int(child.stdout.readline())
        assert j.get(uid).state == "downloading"
        j.reject(AGENT, "3.0.0", "", "written by the test")
        seen = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and j.get(uid).state != "failed":
            seen.add(j.get(uid).state)
            time.sleep(0.005)
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert seen <= {"downloading", "verifying"}
    assert [(e["state"], e["note"]) for e in j.events(uid)] == \
        [("downloading", ""), ("verifying", "saw the rejection"), ("failed", "done")]


def schema(path):
    db = sqlite3.connect(path)
    try:
        return (db.execute("PRAGMA user_version").fetchone()[0],
                db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall())
    finally:
        db.close()


def test_a_journal_of_a_newer_schema_is_read_not_rewritten(wd, clock):
    old = Journal(str(wd), clock=clock)
    uid = old.begin(AGENT, "2.0", "3.0", state="refused", reason="written by 2.0")
    old.close()
    path = str(wd / "update" / "journal.db")
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE updates ADD COLUMN attestation TEXT DEFAULT '';"
                     "CREATE TABLE signatures (id INTEGER PRIMARY KEY, blob BLOB);"
                     "PRAGMA user_version = %d;" % (SCHEMA_VERSION + 1))
    db.close()
    before = schema(path)
    j = Journal(str(wd), clock=clock)
    assert schema(path) == before and before[0] == SCHEMA_VERSION + 1
    assert j.get(uid).reason == "written by 2.0"
    another = j.begin(AGENT, "1.0", "3.0", state="refused", reason="written by us")
    assert [r.id for r in j.history()] == [uid, another]
    j.close()
    assert schema(path) == before


def corrupt_table(path, table):
    """Overwrite the root page of ``table`` (the file's first page, its
    header and schema, stay readable)."""
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xde\xad\xbe\xef" * (size // 4))


def test_a_journal_of_garbage_is_a_journal_error(wd):
    os.makedirs(str(wd / "update"))
    (wd / "update" / "journal.db").write_bytes(b"this is no SQLite database\n" * 200)
    garbage = "update journal .*journal.db: file is not a database"
    with pytest.raises(JournalError, match=garbage):
        Journal(str(wd))
    looking = Journal(str(wd), readonly=True)   # elkeidctl's: reads nothing until asked
    with pytest.raises(JournalError, match=garbage):
        looking.history()
    looking.close()


def test_a_journal_with_a_corrupt_page_raises_journal_errors_only(wd, clock):
    j = Journal(str(wd), clock=clock)
    uid = j.begin(AGENT, "1", "2")
    j.close()
    corrupt_table(str(wd / "update" / "journal.db"), "updates")
    j = Journal(str(wd), clock=clock)   # its first page is whole
    for call in (lambda: j.in_flight(), lambda: j.get(uid), lambda: j.move(uid, "verifying"),
                 lambda: j.begin(AGENT, "1", "3"), lambda: j.unreported(),
                 lambda: j.set(uid, reason="x"), lambda: j.history()):
        with pytest.raises(JournalError, match="update journal .*journal.db: database disk image "
                                               "is malformed"):
            call()
    j.close()


# ================================================================ the agent: offers, recovery

POLICY = UpdatePolicy(verify_timeout=30.0, max_backups=3)


class Killed(BaseException):
    """What SIGKILL does to the agent: nothing after it runs, no handler
    sees it."""


class FakeInstall(InstallEffects):
    """Real copies and renames; every other host effect recorded in
    ``calls`` and answered from ``outcomes`` (per effect, first used first:
    an exception to raise or a value to return)."""

    def __init__(self, install="pyz", manager="systemd"):
        super().__init__()
        self.install, self.mgr = install, manager
        self.calls = []
        self.outcomes = {}
        self.unit = {"ActiveState": "active", "SubState": "running", "MainPID": "0",
                     "ExecMainStatus": "0"}
        self.holder = None
        self.recorded_version = ""
        self.kill_in_copy = False

    def script(self, name, *outcomes):
        self.outcomes.setdefault(name, []).extend(outcomes)

    def _effect(self, name, *args, default=None):
        self.calls.append((name,) + args)
        queue = self.outcomes.get(name)
        if queue:
            out = queue.pop(0)
            if isinstance(out, BaseException):
                raise out
            return out
        return default

    def install_kind(self, archive):
        return self.install

    def manager(self, service_type):
        return self.mgr

    def run(self, argv, timeout=300.0, env=None):
        return self._effect("run", tuple(argv), default=(0, ""))

    def installed_version(self, family):
        self._effect("installed_version", family)
        return self.recorded_version

    def copy_file(self, src, dst, mode=0o600):
        if self.kill_in_copy:
            with open(staging_path(dst), "wb") as f:
                f.write(b"the first half of a backup")
            raise Killed()
        super().copy_file(src, dst, mode)

    def replace_file(self, src, target):
        self._effect("replace_file", src, target)
        super().replace_file(src, target)

    def install_package(self, path, family, allow_downgrade=False):
        return self._effect("install_package", path, family, allow_downgrade, default="")

    def systemctl(self, *args, timeout=120.0):
        return self._effect("systemctl", *args, default="")

    def unit_state(self):
        return dict(self.unit)

    def spawn_detached(self, argv, cwd, env, log_path, manager, unit=""):
        return self._effect("spawn_detached", list(argv), manager, unit,
                            default=Spawned(0, None, child=False))

    def ctl(self, workdir, action):
        return self._effect("ctl", workdir, action, default=0)

    def pidfile_holder(self, path):
        return self.holder

    def leave_agent_cgroup(self, pid, warn):
        self._effect("leave_agent_cgroup", pid)


class Owner:
    """The agent's TaskOwner: keeps the update job for the test to run."""

    def __init__(self):
        self.jobs = []

    def run_once(self, name, coro):
        self.jobs.append(coro)
        return self

    def done(self):
        return True


class InlineExecutors:
    """Runs the blocking steps on the loop; ``kill(fn, args)`` may end the
    agent before one."""

    def __init__(self):
        self.kill = None

    async def run(self, pool, fn, *args):
        if self.kill is not None:
            self.kill(fn, args)
        return fn(*args)


class Agent:
    """One agent process's updater, on the journal file of ``wd``
    (``opens_journal``: the updater opens it the first time it needs it)."""

    def __init__(self, wd, fx, clock, archive="", journal=None, policy=POLICY,
                 opens_journal=False):
        self.state, self.metrics, self.records = AgentState(), Registry(), []
        self.owner, self.executors = Owner(), InlineExecutors()
        if journal is None and not opens_journal:
            journal = Journal(str(wd), clock=clock)
        self.journal = journal
        self.updater = AgentUpdater(Settings(workdir=str(wd)), self.state, self.metrics,
                                    self.owner, self.executors, self.records.append,
                                    lambda: policy, fx=fx, archive=archive,
                                    journal=self.journal, clock=clock)


def test_a_garbage_journal_refuses_the_offer(wd, clock):
    os.makedirs(str(wd / "update"))
    (wd / "update" / "journal.db").write_bytes(b"\x00garbage\xff" * 500)
    agent = Agent(wd, FakeInstall(), clock, opens_journal=True)
    assert agent.updater.offer(config(version=NEWER)) is None
    assert agent.state.reasons() == [
        "update to %s refused: update journal unusable: update journal %s: file is not a "
        "database" % (NEWER, wd / "update" / "journal.db")]
    assert agent.metrics.get("update_refused") == 1 and agent.owner.jobs == []
    agent.updater.recover()   # at start-up: the same, no exception
    assert "update journal unusable" in agent.state.reasons()[0]


def test_a_journal_with_a_corrupt_page_refuses_the_offer(wd, clock):
    j = Journal(str(wd), clock=clock)
    j.begin(AGENT, __version__, "1.0.0", state="refused", reason="older")
    j.close()
    corrupt_table(str(wd / "update" / "journal.db"), "updates")
    agent = Agent(wd, FakeInstall(), clock, opens_journal=True)
    assert agent.updater.offer(config(version=NEWER)) is None
    [reason] = agent.state.reasons()
    assert reason.startswith("update to %s refused: update journal unusable: " % NEWER)
    assert reason.endswith("database disk image is malformed")
    assert agent.owner.jobs == []


def test_a_journal_that_takes_no_writes_leaves_recovery_abnormal_not_raising(wd, clock):
    j = Journal(str(wd), clock=clock)
    uid = j.begin(AGENT, __version__, NEWER, state="verifying")
    j.close()
    agent = Agent(wd, FakeInstall(), clock, journal=Journal(str(wd), readonly=True))
    agent.updater.recover()
    [reason] = agent.state.reasons()
    assert reason.startswith("update %d to %s not recovered: update journal " % (uid, NEWER))
    assert "readonly database" in reason


class Procs:
    """Real processes standing for agents, new versions and guards."""

    def __init__(self):
        self.all = []

    def start(self):
        p = subprocess.Popen(["sleep", "300"])
        deadline = time.monotonic() + 30
        while proc_start_ticks(p.pid) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        p.start = proc_start_ticks(p.pid)
        p.end = lambda: (p.kill(), p.wait())
        self.all.append(p)
        return p

    def dead(self):
        p = self.start()
        p.end()
        return p

    def close(self):
        for p in self.all:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


class Update:
    """One agent update driven through AgentUpdater from an offer, with a
    loopback server for the download."""

    def __init__(self, tmp_path, wd, clock, manager="systemd"):
        self.wd, self.clock = wd, clock
        self.archive = str(tmp_path / "opt" / "elkeid-agent")
        zipapp(self.archive, __version__, b"# the running one\n")
        self.server = FileServer()
        self.new_bytes = zipapp(str(tmp_path / "new.pyz"), NEWER, b"# the new one\n")
        self.url = self.server.add("/elkeid-agent.pyz", self.new_bytes)
        self.sha = hashlib.sha256(self.new_bytes).hexdigest()
        self.fx = FakeInstall("pyz", manager)
        self.agent = Agent(wd, self.fx, clock, archive=self.archive)

    def offer(self):
        uid = self.agent.updater.offer(config(version=NEWER, sha256=self.sha,
                                              download_urls=[self.url]))
        assert uid is not None, self.agent.state.reasons()
        self.uid = uid
        return uid

    def killed_during(self, step):
        """Run the update until SIGKILL hits it during ``step``."""
        ex = self.agent.executors

        def kill(fn, args):
            if step == "downloading" and fn.__name__ == "download_offer":
                with open(args[1], "wb") as f:
                    f.write(self.new_bytes[:100])
                raise Killed()
            if step == "verifying" and fn.__name__ == "_verify":
                raise Killed()
        ex.kill = kill
        self.fx.kill_in_copy = step == "backing_up"
        if step == "handed_over":
            self.fx.script("spawn_detached", Killed())
        self.offer()
        with pytest.raises(Killed):
            asyncio.run(self.agent.owner.jobs[0])
        row = self.agent.journal.get(self.uid)
        assert row.state == step
        self.agent.journal.close()
        return row

    def restarted(self, fx=None):
        """The agent that starts next (a new process: its own journal)."""
        return Agent(self.wd, fx or FakeInstall("pyz", self.fx.mgr), self.clock,
                     archive=self.archive)

    def close(self):
        self.server.close()


@pytest.fixture
def update(tmp_path, wd, clock):
    u = Update(tmp_path, wd, clock)
    yield u
    u.close()


def test_an_update_runs_to_the_hand_over(update):
    update.offer()
    asyncio.run(update.agent.owner.jobs[0])
    j = update.agent.journal
    row = j.get(update.uid)
    assert states(j, update.uid) == ["downloading", "verifying", "backing_up", "handed_over"]
    with open(row.package, "rb") as f:
        assert f.read() == update.new_bytes
    with open(row.backup, "rb") as f, open(update.archive, "rb") as g:
        assert f.read() == g.read()
    assert (row.context["target"], row.context["agent_pid"]) == (update.archive, os.getpid())
    [(name, argv, manager, unit)] = update.fx.calls
    assert (name, manager, unit) == ("spawn_detached", "systemd",
                                     "elkeid-agent-update-%d.service" % update.uid)
    assert argv == [sys.executable, "-sE", row.backup, "update-guard", "--workdir",
                    str(update.wd), "--id", str(update.uid)]


@pytest.mark.parametrize("step", ["downloading", "verifying", "backing_up"])
def test_sigkill_before_the_hand_over_interrupts_and_cleans_up(update, step):
    row = update.killed_during(step)
    leftovers = [row.package] + ([row.backup, staging_path(row.backup)] if row.backup else [])
    assert all(os.path.exists(p) for p in leftovers[:1])
    if step == "backing_up":
        # The backup's name is in the row before a byte of it is written.
        assert row.backup and os.path.exists(staging_path(row.backup))
    after = update.restarted()
    after.updater.recover()
    row = after.journal.get(update.uid)
    assert (row.state, row.reason) == ("interrupted", "the agent stopped during %s" % step)
    assert [p for p in leftovers if os.path.exists(p)] == []
    assert os.listdir(os.path.dirname(row.package)) == []
    backup_dir = os.path.join(str(update.wd), "update", "backup")
    assert os.listdir(backup_dir) == []
    assert after.state.reasons() == []


def test_sigkill_after_the_hand_over_within_the_grace_leaves_the_guard_to_start(update):
    row = update.killed_during("handed_over")
    update.clock.tick(HANDOVER_GRACE - 1)
    after = update.restarted()
    after.updater.recover()
    assert after.journal.get(update.uid).state == "handed_over"
    assert os.path.exists(row.package) and os.path.exists(row.backup)
    assert after.updater.fx.calls == []


def test_sigkill_after_the_hand_over_past_the_grace_interrupts_and_cleans_up(update):
    row = update.killed_during("handed_over")
    update.clock.tick(HANDOVER_GRACE + 1)
    after = update.restarted()
    after.updater.recover()
    now = after.journal.get(update.uid)
    assert (now.state, now.reason) == ("interrupted", "the update guard never took over")
    assert not os.path.exists(row.package) and not os.path.exists(row.backup)
    assert after.updater.fx.calls == []


class Supervisor:
    """The services the service updater sees: one, running."""

    def __init__(self, binary):
        self.spec = ServiceSpec(id="svc", type="exec", binary_path=binary)

    def enabled_spec(self, service_id):
        return (self.spec, None) if service_id == "svc" else (None, "no service %s" % service_id)

    def status_of(self, service_id):
        return {"state": "running", "pid": 1, "restarts": 0, "health": "", "checks": {}}


def test_sigkill_while_a_service_binary_is_backed_up_interrupts_and_cleans_up(tmp_path, wd,
                                                                               clock):
    binary = str(tmp_path / "svc")
    with open(binary, "wb") as f:
        f.write(b"#!/bin/sh\necho 1\n")
    new = b"#!/bin/sh\necho 2\n"
    server = FileServer()
    try:
        request = json.dumps({"component": "svc", "version": "2",
                              "hash": hashlib.sha256(new).hexdigest(),
                              "download_url": server.add("/svc", new)})

        def updater(fx):
            agent = Agent(wd, fx, clock)
            return agent, ServiceUpdater(
                Settings(workdir=str(wd)), agent.state, agent.metrics, agent.owner,
                agent.executors, agent.records.append, lambda: POLICY,
                lambda: Supervisor(binary), lambda: agent.journal, fx=fx, clock=clock)
        fx = FakeInstall("binary", "agent")
        fx.kill_in_copy = True
        agent, service_updater = updater(fx)
        uid = service_updater.offer(request, "token-1")
        with pytest.raises(Killed):
            asyncio.run(agent.owner.jobs[0])
    finally:
        server.close()
    row = agent.journal.get(uid)
    assert row.state == "backing_up" and os.path.exists(staging_path(row.backup))
    agent.journal.close()
    after, service_updater = updater(FakeInstall("binary", "agent"))
    service_updater.recover()
    row = after.journal.get(uid)
    assert (row.state, row.reason) == ("interrupted", "the agent stopped during backing_up")
    assert [p for p in (row.package, row.backup, staging_path(row.backup))
            if os.path.exists(p)] == []
    with open(binary, "rb") as f:
        assert f.read() == b"#!/bin/sh\necho 1\n"


def guard_took_over(update, guard, *moves):
    """The row as a guard leaves it: registered, then moved along ``moves``;
    its context names another agent process than this one."""
    row = update.killed_during("handed_over")
    j = Journal(str(update.wd), clock=update.clock)
    j.set(update.uid, guard_pid=guard.pid, guard_start=guard.start,
          context=dict(row.context, agent_pid=1, agent_start=0, argv=["--the-old-agent"]))
    for state in moves:
        j.move(update.uid, state, "the guard's %s" % state)
    j.close()
    return row


GUARD_STEPS = {"switching": ("switching",), "trial": ("switching", "trial"),
               "rolling_back": ("switching", "trial", "rolling_back")}


@pytest.mark.parametrize("step", sorted(GUARD_STEPS))
def test_sigkill_of_the_agent_while_its_guard_lives_leaves_the_guard_alone(update, procs, step):
    guard_took_over(update, procs.start(), *GUARD_STEPS[step])
    after = update.restarted()
    after.updater.recover()
    row = after.journal.get(update.uid)
    assert row.state == step and row.context["agent_pid"] == 1
    assert after.updater.fx.calls == [] and after.state.reasons() == []


@pytest.mark.parametrize("manager", ["systemd", "none"])
@pytest.mark.parametrize("step", sorted(GUARD_STEPS))
def test_sigkill_of_the_guard_starts_a_new_guard_with_the_backup(update, procs, step, manager):
    before = guard_took_over(update, procs.dead(), *GUARD_STEPS[step])
    after = update.restarted(FakeInstall("pyz", manager))
    after.updater.recover()
    row = after.journal.get(update.uid)
    assert row.state == step   # the new guard moves it, not the agent
    assert (row.context["agent_pid"], row.context["agent_start"], row.context["argv"],
            row.context["cwd"]) == (os.getpid(), proc_start_ticks(os.getpid()), sys.argv[1:],
                                    os.getcwd())
    assert row.context["target"] == before.context["target"]
    [(name, argv, spawned_as, unit)] = after.updater.fx.calls
    guard_argv = [sys.executable, "-sE", before.backup, "update-guard", "--workdir",
                  str(update.wd), "--id", str(update.uid)]
    assert (name, spawned_as, unit) == ("spawn_detached", manager,
                                        "elkeid-agent-update-%d.service" % update.uid)
    if manager == "systemd":
        assert argv == guard_argv
    else:   # through a middle process that exits: the guard is nobody's child
        assert argv[:4] == [sys.executable, "-I", "-S", "-c"] and argv[5:] == guard_argv
    assert after.state.reasons() == []


def test_a_guard_that_cannot_be_started_again_is_abnormal(update, procs):
    guard_took_over(update, procs.dead(), "switching", "trial")
    fx = FakeInstall("pyz", "systemd")
    fx.script("spawn_detached", OSError("systemd-run failed (1): Access denied"))
    after = update.restarted(fx)
    after.updater.recover()
    assert after.state.reasons() == [
        "update %d to %s: guard gone and cannot be restarted: systemd-run failed (1): Access "
        "denied" % (update.uid, NEWER)]


def test_a_failing_job_leaves_the_files_of_a_row_a_guard_took(update, procs):
    """The job fails after the guard moved on (the journal busy in the wait
    for the switch): the package and backup are the guard's now."""
    row = guard_took_over(update, procs.start(), "switching", "trial")
    agent = update.restarted()
    agent.updater._fail(update.uid, "update journal: database is locked")
    assert agent.journal.get(update.uid).state == "trial"
    assert os.path.exists(row.package) and os.path.exists(row.backup)


# ================================================================ the guard

class TrialClock(Clock):
    """The guard's time: ``sleep`` moves it and runs the events due."""

    def __init__(self):
        super().__init__()
        self.events = []

    def at(self, seconds, fn):
        self.events.append((self.t + seconds, fn))

    def sleep(self, seconds):
        time.sleep(0.002)   # a real instant: a signalled process gets to end
        self.t += seconds
        for event in [e for e in self.events if e[0] <= self.t]:
            self.events.remove(event)
            event[1]()


class GuardedUpdate:
    """A row in handed_over as the agent leaves it for the guard, with real
    files: the target (the old version), its backup, the package."""

    OLD, NEW = b"the old version\n", b"the new version\n"

    def __init__(self, tmp_path, procs, install, manager, backup_package=False,
                 allow_downgrade=False, max_backups=5):
        self.install, self.manager = install, manager
        self.wd = tmp_path / "wd"
        self.clock = TrialClock()
        self.j = Journal(str(self.wd), clock=self.clock)
        self.fx = FakeInstall(install, manager)
        self.agent = procs.start()
        self.new = self.agent if manager == "none" else procs.start()
        self.fx.unit["MainPID"] = str(self.new.pid)
        self.fx.holder = self.new.pid
        self.backup_dir = str(self.wd / "update" / "backup")
        download_dir = str(self.wd / "update" / "download")
        for d in (self.backup_dir, download_dir, str(tmp_path / "opt")):
            os.makedirs(d, exist_ok=True)
        self.target = str(tmp_path / "opt" / "elkeid-agent")
        self.backup = os.path.join(self.backup_dir, "elkeid-agent_1.0.0_20240501120000_1.bak")
        self.package = os.path.join(download_dir, "elkeid-agent-1.download")
        for path, data in ((self.target, self.OLD), (self.backup, self.OLD),
                           (self.package, self.NEW)):
            with open(path, "wb") as f:
                f.write(data)
        self.backup_package = ""
        if backup_package:
            self.backup_package = os.path.join(self.backup_dir, "elkeid-agent_1.0.0.%s" % install)
            with open(self.backup_package, "wb") as f:
                f.write(b"the old package\n")
        self.ctx = {"target": self.target, "python": sys.executable, "argv": ["--as-before"],
                    "cwd": str(tmp_path), "env": {"PATH": "/usr/bin:/bin"},
                    "agent_pid": self.agent.pid, "agent_start": self.agent.start,
                    "verify_timeout": 30.0, "facts": {}, "allow_downgrade": allow_downgrade,
                    "backup_dir": self.backup_dir, "max_backups": max_backups,
                    "service_type": manager, "pidfile": str(self.wd / "elkeid-agent.pid")}
        self.uid = self.j.begin(AGENT, "1.0.0", "2.0.0", kind=install, install=install,
                                manager=manager, package_sha256="cd" * 32)
        self.j.set(self.uid, package=self.package)
        through(self.j, self.uid, "verifying", "backing_up")
        self.j.move(self.uid, "handed_over", backup=self.backup,
                    backup_package=self.backup_package, context=self.ctx)

    @property
    def row(self):
        return self.j.get(self.uid)

    def states(self):
        return states(self.j, self.uid)

    def healthy_after(self, seconds):
        self.clock.at(seconds, self._healthy)

    def reexec_after(self, seconds):
        """The old agent (no manager) has shut down and re-executes."""
        self.clock.at(seconds, self._reexec)

    def _reexec(self):
        row = self.j.get(self.uid)
        self.j.set(self.uid, context=dict(row.context, reexec_at=self.clock.t))

    def _healthy(self):
        if self.manager == "none":
            # The old agent marks the re-exec first (updater.mark_reexec).
            self._reexec()
        self.j.set(self.uid, healthy_at=self.clock.t, new_pid=self.new.pid,
                   new_start=self.new.start)

    def run(self):
        return Guard(self.j, self.uid, fx=self.fx, clock=self.clock,
                     sleep=self.clock.sleep).run()

    def target_bytes(self):
        with open(self.target, "rb") as f:
            return f.read()

    # ---------------------------------------------------- expected effects

    def leave_cgroup(self):
        return [("leave_agent_cgroup", os.getpid())] if self.manager == "sysvinit" else []

    def switch(self):
        if self.install == "pyz":
            return [("replace_file", self.package, self.target)]
        return [("install_package", self.package, self.install, self.ctx["allow_downgrade"])]

    def start_new(self):
        return {"systemd": [("systemctl", "restart", SERVICE)],
                "sysvinit": [("ctl", str(self.wd), "restart")], "none": []}[self.manager]

    def restore(self):
        """Files back, then the package database (deb, rpm)."""
        calls = [("replace_file", self.backup, self.target)]
        if self.install == "pyz":
            return calls
        if self.backup_package:
            return calls + [("install_package", self.backup_package, self.install, True)]
        return calls + [("installed_version", self.install)]

    def start_old(self):
        return {"systemd": [("run", ("systemctl", "reset-failed", SERVICE)),
                            ("systemctl", "restart", SERVICE)],
                "sysvinit": [("ctl", str(self.wd), "restart")],
                "none": [("spawn_detached", [sys.executable, "-sE", self.target, "--as-before"],
                          "none", "")]}[self.manager]

    def assert_rolled_back(self, reason, rejected=True):
        row = self.row
        assert row.state == "rolled_back", (row.state, row.reason)
        assert reason in row.reason
        assert self.target_bytes() == self.OLD
        assert not os.path.exists(self.package)
        assert (self.j.rejected(AGENT, "2.0.0") is not None) == rejected
        if rejected:
            assert self.j.rejected(AGENT, "2.0.0")["reason"] == row.reason.split("; ")[0]


MANAGERS = ["systemd", "sysvinit", "none"]
INSTALLS = ["pyz", "deb", "rpm"]


def guarded(tmp_path, procs, install="pyz", manager="systemd", **kw):
    return GuardedUpdate(tmp_path, procs, install, manager, **kw)


def old_files(directory, names, age):
    """Files in ``directory`` last written ``age`` seconds (and more) ago."""
    now = time.time()
    for i, name in enumerate(names):
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(name.encode())
        os.utime(path, (now - age - i * 100, now - age - i * 100))


@pytest.mark.parametrize("install", INSTALLS)
@pytest.mark.parametrize("manager", MANAGERS)
def test_a_healthy_trial_succeeds(tmp_path, procs, install, manager):
    u = guarded(tmp_path, procs, install, manager, max_backups=2)
    packages = [] if install == "pyz" else ["elkeid-agent_0.9.0.%s" % install,
                                            "elkeid-agent_0.8.0.%s" % install]
    old_files(u.backup_dir, ["elkeid-agent_0.9.0_20240101000000_3.bak",
                             "elkeid-agent_0.8.0_20231201000000_2.bak",
                             "somebody-elses.bak"] + packages, age=3600)
    u.healthy_after(5)
    assert u.run() == 0
    row = u.row
    assert (row.state, row.reason) == ("succeeded", "healthy for the whole trial")
    assert u.states() == ["downloading", "verifying", "backing_up", "handed_over", "switching",
                          "trial", "succeeded"]
    assert u.fx.calls == u.leave_cgroup() + u.switch() + u.start_new()
    assert row.trial_deadline == T0 + 30 and u.clock.t >= row.trial_deadline
    assert (row.guard_pid, row.new_pid) == (os.getpid(), u.new.pid)
    assert not os.path.exists(u.package)
    if install == "pyz":
        assert u.target_bytes() == u.NEW and row.context["installed_package"] == ""
        kept = []
    else:
        kept = ["elkeid-agent_2.0.0.%s" % install, "elkeid-agent_0.9.0.%s" % install]
        assert row.context["installed_package"] == os.path.join(u.backup_dir, kept[0])
        with open(row.context["installed_package"], "rb") as f:
            assert f.read() == u.NEW
    # The newest two of each kind, this update's backup among them.
    assert sorted(os.listdir(u.backup_dir)) == sorted(
        [os.path.basename(u.backup), "elkeid-agent_0.9.0_20240101000000_3.bak",
         "somebody-elses.bak"] + kept)
    assert u.agent.poll() is None   # nobody stopped the agent


def test_a_package_kept_across_file_systems_is_copied(tmp_path, procs, monkeypatch):
    u = guarded(tmp_path, procs, "deb", "systemd")
    real_replace = os.replace

    def replace(src, dst):
        if src == u.package:
            raise OSError(errno.EXDEV, "Invalid cross-device link", src)
        return real_replace(src, dst)
    monkeypatch.setattr(guard_module.os, "replace", replace)
    u.healthy_after(5)
    assert u.run() == 0
    kept = u.row.context["installed_package"]
    assert kept == os.path.join(u.backup_dir, "elkeid-agent_2.0.0.deb")
    with open(kept, "rb") as f:
        assert f.read() == u.NEW
    assert not os.path.exists(u.package)


@pytest.mark.parametrize("manager, failure, reason", [
    ("systemd", InstallError("systemctl restart elkeid-agent.service failed (1): Job failed"),
     "the new version did not start: systemctl restart elkeid-agent.service failed (1)"),
    ("sysvinit", 1, "the new version did not start (elkeidctl restart: 1)"),
])
@pytest.mark.parametrize("install", INSTALLS)
def test_a_restart_that_fails_rolls_back(tmp_path, procs, manager, failure, reason, install):
    u = guarded(tmp_path, procs, install, manager, backup_package=True)
    u.fx.script("systemctl" if manager == "systemd" else "ctl", failure)
    assert u.run() == 0
    u.assert_rolled_back(reason)
    assert u.fx.calls == u.leave_cgroup() + u.switch() + u.start_new() + u.restore() + \
        u.start_old()
    assert u.states()[-4:] == ["switching", "trial", "rolling_back", "rolled_back"]


def exit_mid_trial(u):
    if u.manager == "systemd":
        u.fx.unit.update(MainPID="31337", SubState="running")   # restarted behind our back
    elif u.manager == "sysvinit":
        u.fx.holder = None
    else:
        u.agent.end()


@pytest.mark.parametrize("manager, reason", [
    ("systemd", "the new version exited during the trial (active/running, exit status 0)"),
    ("sysvinit", "the new version exited during the trial"),
    ("none", "the new version exited during the trial"),
])
def test_the_new_version_exiting_mid_trial_rolls_back(tmp_path, procs, manager, reason):
    u = guarded(tmp_path, procs, "pyz", manager)
    u.healthy_after(5)
    u.clock.at(10, lambda: exit_mid_trial(u))
    assert u.run() == 0
    u.assert_rolled_back(reason)
    assert u.fx.calls == u.leave_cgroup() + u.switch() + u.start_new() + u.restore() + \
        u.start_old()
    assert u.clock.t < T0 + 30   # it did not wait for the deadline


def test_the_old_agent_dying_before_its_reexec_is_not_the_new_versions_fault(tmp_path, procs):
    u = guarded(tmp_path, procs, "pyz", "none")
    u.clock.at(3, u.agent.end)   # no re-exec mark: killed while shutting down for it
    assert u.run() == 0
    u.assert_rolled_back("the old agent exited before it re-executed the new version",
                         rejected=False)


def test_an_old_agent_still_shutting_down_at_the_deadline_is_not_the_new_versions_fault(
        tmp_path, procs):
    u = guarded(tmp_path, procs, "pyz", "none")   # no re-exec mark: it never got that far
    assert u.run() == 0
    u.assert_rolled_back("the old agent did not re-execute the new version within 30 s",
                         rejected=False)
    assert u.agent.wait(10) == -signal.SIGTERM   # stopped before its file is put back


@pytest.mark.parametrize("manager", MANAGERS)
def test_no_health_mark_by_the_deadline_rolls_back(tmp_path, procs, manager):
    u = guarded(tmp_path, procs, "pyz", manager)
    u.reexec_after(1)   # no manager: the new version runs (and never connects)
    assert u.run() == 0
    u.assert_rolled_back("the new version did not connect and send a heartbeat within 30 s")
    assert u.clock.t >= T0 + 30
    assert u.fx.calls == u.leave_cgroup() + u.switch() + u.start_new() + u.restore() + \
        u.start_old()
    if manager == "none":   # the agent on trial is stopped before its file is put back
        assert u.agent.wait(10) == -signal.SIGTERM


@pytest.mark.parametrize("manager", ["systemd", "sysvinit"])
def test_the_healthy_process_dying_rolls_back(tmp_path, procs, manager):
    u = guarded(tmp_path, procs, "pyz", manager)
    u.healthy_after(5)
    u.clock.at(12, u.new.end)
    assert u.run() == 0
    u.assert_rolled_back("the new version exited after it reported healthy")


@pytest.mark.parametrize("backup_package", [True, False])
@pytest.mark.parametrize("install", ["deb", "rpm"])
def test_an_install_that_fails_rolls_back_files_and_package(tmp_path, procs, install,
                                                            backup_package):
    u = guarded(tmp_path, procs, install, "systemd", backup_package=backup_package)
    u.fx.script("install_package", InstallError("dpkg --force-confold -i exited with 1: "
                                                 "dependency problems"))
    u.fx.recorded_version = "2.0.0"   # half installed
    assert u.run() == 0
    u.assert_rolled_back("install failed: dpkg --force-confold -i exited with 1")
    assert u.fx.calls == u.switch() + u.restore() + u.start_old()
    assert u.states()[-3:] == ["switching", "rolling_back", "rolled_back"]
    note = ("the package database says 2.0.0 while the files are 1.0.0 again: the 1.0.0 package "
            "file is not at hand")
    assert (note in u.row.reason) == (not backup_package)


def test_a_previous_package_that_will_not_reinstall_is_noted(tmp_path, procs):
    u = guarded(tmp_path, procs, "rpm", "systemd", backup_package=True)
    u.fx.script("install_package", None, InstallError("rpm -Uvh --oldpackage exited with 1: "
                                                       "conflicts"))
    assert u.run() == 0
    u.assert_rolled_back("did not connect and send a heartbeat")
    assert u.row.reason.endswith("; reinstalling the 1.0.0 package failed: rpm -Uvh "
                                 "--oldpackage exited with 1: conflicts")


@pytest.mark.parametrize("manager", MANAGERS)
def test_a_rollback_that_fails_still_starts_the_old_version(tmp_path, procs, manager):
    u = guarded(tmp_path, procs, "pyz", manager)
    u.reexec_after(1)
    u.fx.script("replace_file", None, OSError(errno.ENOSPC, "No space left on device", u.target))
    assert u.run() == 1
    row = u.row
    assert row.state == "rollback_failed"
    assert row.reason == ("the new version did not connect and send a heartbeat within 30 s; "
                          "rollback failed: No space left on device (%s)" % u.target)
    assert u.target_bytes() == u.NEW
    assert u.fx.calls == u.leave_cgroup() + u.switch() + u.start_new() + \
        [("replace_file", u.backup, u.target)] + u.start_old()


def test_a_sysvinit_old_version_that_does_not_start_is_noted(tmp_path, procs):
    u = guarded(tmp_path, procs, "pyz", "sysvinit")
    u.fx.script("ctl", 0, 3)   # the new version starts; the old one then does not
    assert u.run() == 0
    assert u.row.state == "rolled_back"
    assert u.row.reason.endswith("; starting it again failed: elkeidctl restart exited with 3")


@pytest.mark.parametrize("left_in", sorted(GUARD_STEPS))
@pytest.mark.parametrize("manager", MANAGERS)
def test_a_guard_started_again_rolls_back_and_does_not_reject(tmp_path, procs, left_in, manager):
    u = guarded(tmp_path, procs, "pyz", manager)
    u.j.set(u.uid, guard_pid=procs.dead().pid)
    for state in GUARD_STEPS[left_in]:
        u.j.move(u.uid, state, "the first guard's %s" % state)
    u.fx.replace_file(u.package, u.target)   # the first guard switched
    u.fx.calls.clear()
    assert u.run() == 0
    u.assert_rolled_back("the update guard stopped during %s (host reboot or kill); an "
                         "unfinished trial is not a verified one" % left_in, rejected=False)
    assert u.states().count("rolling_back") == 1 and u.states()[-1] == "rolled_back"
    assert u.fx.calls == u.leave_cgroup() + u.restore() + u.start_old()


def test_a_guard_on_a_finished_row_does_nothing(tmp_path, procs):
    u = guarded(tmp_path, procs)
    u.j.move(u.uid, "interrupted", "the update guard never took over")
    assert u.run() == 0 and u.fx.calls == [] and u.row.guard_pid == 0


def test_an_rpm_downgrade_passes_oldpackage(tmp_path, procs):
    u = guarded(tmp_path, procs, "rpm", "systemd", allow_downgrade=True)
    u.healthy_after(1)
    assert u.run() == 0
    assert u.fx.calls[0] == ("install_package", u.package, "rpm", True)


class ToolRecorder(InstallEffects):
    def __init__(self, rc=0, output=""):
        super().__init__()
        self.ran, self.answer = [], (rc, output)

    def run(self, argv, timeout=300.0, env=None):
        self.ran.append(list(argv))
        return self.answer


def test_package_tool_command_lines():
    fx = ToolRecorder()
    fx.install_package("/p/a.rpm", "rpm", allow_downgrade=True)
    fx.install_package("/p/a.rpm", "rpm")
    fx.install_package("/p/a.deb", "deb", allow_downgrade=True)
    assert fx.ran == [["rpm", "-Uvh", "--oldpackage", "/p/a.rpm"], ["rpm", "-Uvh", "/p/a.rpm"],
                      ["dpkg", "--force-confold", "-i", "/p/a.deb"]]
    failing = ToolRecorder(1, "preparing\nerror: a\n\nerror: b\nerror: c\n")
    with pytest.raises(InstallError, match=r"^rpm -Uvh --oldpackage exited with 1: error: a \| "
                                           r"error: b \| error: c$"):
        failing.install_package("/p/a.rpm", "rpm", allow_downgrade=True)


def test_the_pid_file_holder_through_the_seam(tmp_path):
    assert InstallEffects().pidfile_holder(str(tmp_path / "nobody.pid")) is None
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from elkeid_agent.runtime.pidlock import PidLock\n"
        "PidLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"), str(tmp_path / "agent.pid")], stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline() == b"locked\n"
        assert InstallEffects().pidfile_holder(str(tmp_path / "agent.pid")) == holder.pid
    finally:
        holder.kill()
        holder.wait()


# ================================================================ prune

def test_prune_keeps_the_newest_of_each_kind_and_what_it_is_told(tmp_path):
    d = str(tmp_path)
    old_files(d, ["elkeid-agent_%d.bak" % i for i in range(5)], age=1000)     # 0 newest
    old_files(d, ["elkeid-agent_%d.deb" % i for i in range(3)], age=1000)
    old_files(d, ["elkeid-agent_%d.rpm" % i for i in range(1)], age=1000)
    old_files(d, ["other_1.bak", "elkeid-agent_notes.txt"], age=5000)
    prune(d, 2, keep=(os.path.join(d, "elkeid-agent_4.bak"),))
    assert sorted(os.listdir(d)) == sorted(
        ["elkeid-agent_0.bak", "elkeid-agent_1.bak", "elkeid-agent_4.bak",
         "elkeid-agent_0.deb", "elkeid-agent_1.deb", "elkeid-agent_0.rpm",
         "other_1.bak", "elkeid-agent_notes.txt"])
    prune(d, 0)
    assert sorted(os.listdir(d)) == ["elkeid-agent_notes.txt", "other_1.bak"]


def test_prune_touches_only_the_names_it_owns(tmp_path):
    d = str(tmp_path)
    mine = ["svc_2024050%d120000.bak" % i for i in range(1, 5)]
    old_files(d, mine, age=1000)   # svc_20240501... the newest
    old_files(d, ["svc_b_20240101000000.bak", "svc_20240101.bak", "elkeid-agent_1.bak"],
              age=9000)
    prune(d, 1, keep=(), owns=owns_backup("svc"))
    assert sorted(os.listdir(d)) == sorted([mine[0], "svc_b_20240101000000.bak",
                                            "svc_20240101.bak", "elkeid-agent_1.bak"])
    prune(str(tmp_path / "missing"), 1)   # no directory: nothing to do
