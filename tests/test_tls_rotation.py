"""TLS rotation end to end: a devcenter (``--store seq``), an agent process
(``elkeid-agent run``) with TLS files of its own, a plugin writing numbered
records, and the files rotated on disk while it runs. Every case settles
the load and asserts that the server counted every record produced.

The devcenter tells which client certificate each stream presented
(``client_cert_sha256`` in /conn/list); the agent's counters come from its
status endpoint's /metrics.
"""

import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

import fault_harness as fh
from elkeid_devtools.devcenter import certs
from elkeid_devtools.launchers import AgentProc, FileServer, wait_until
from test_queue_e2e import free_port

pytestmark = pytest.mark.slow

RATE = 2000  # records/s from the plugin
CHECK = "0.3"  # ELKEID_TLS_CHECK_SECONDS
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def der_sha256(pem):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))).hexdigest()


class Rotation:
    """Server, load and an agent whose TLS files live in ``tls/``: there the
    names ca.pem cert.pem key.pem are links into ``..data``, itself a link
    swapped atomically to a new version directory (as cert managers do)."""

    def __init__(self, base, name, agent_args=()):
        self.base = str(base)
        self.server = fh.SeqServer(os.path.join(self.base, "server"))
        self.ca = certs.load_ca(self.server.certs)
        self.files = FileServer()
        self.load = fh.Load(self.base, RATE)
        self.agent_id = "tls-" + name
        self.tls = os.path.join(self.base, "tls")
        os.makedirs(self.tls)
        self.versions = 0
        self.swap(self.client(), self.ca)
        for what in ("ca", "cert", "key"):
            os.symlink(os.path.join("..data", what + ".pem"), self.path(what))
        self.status_port = free_port()
        self.agent = AgentProc(
            os.path.join(self.base, "agent"),
            ["--agent-id", self.agent_id, "--heartbeat-interval", "1",
             "--server", self.server.grpc, "--status-addr", "127.0.0.1:%d" % self.status_port,
             "--ca", self.path("ca"), "--cert", self.path("cert"), "--key", self.path("key")]
            + list(agent_args),
            env=fh.agent_env(ELKEID_TLS_CHECK_SECONDS=CHECK,
                             ELKEID_SPOOL_DIR=os.path.join(self.base, "spool")))

    def path(self, what):
        return os.path.join(self.tls, what + ".pem")

    def client(self, ca=None, **validity):
        return certs.issue_cert(ca or self.ca, "elkeid-agent", "client", **validity)

    def swap(self, pair, ca_pem, key_pem=None):
        """A new version directory, then ..data pointed at it atomically."""
        if not isinstance(ca_pem, bytes):
            ca_pem = ca_pem.cert_pem
        self.versions += 1
        name = "v%d" % self.versions
        d = os.path.join(self.tls, name)
        os.makedirs(d)
        for what, data in (("ca", ca_pem), ("cert", pair.cert_pem),
                           ("key", key_pem or pair.key_pem)):
            with open(os.path.join(d, what + ".pem"), "wb") as f:
                f.write(data)
        tmp = os.path.join(self.tls, "..data.tmp")
        os.symlink(name, tmp)
        os.replace(tmp, os.path.join(self.tls, "..data"))
        return pair

    def start(self, seconds=2):
        self.server.wait_agent(self.agent_id)
        status, body = self.server.dc.command(self.agent_id,
                                              {"config": [self.load.config(self.files)]})
        assert status == 200, body
        self.load.wait_running(int(RATE * seconds), 60)

    # ---------------------------------------------------------- what they see

    def stream_cert(self):
        """sha256 of the client certificate the agent's stream presents."""
        for a in self.server.dc.agents():
            if a.get("agent_id") == self.agent_id:
                return a.get("client_cert_sha256")
        return None

    def wait_stream_cert(self, pem, timeout=30):
        want = der_sha256(pem)
        wait_until(lambda: self.stream_cert() == want, timeout, 0.1,
                   "the agent's stream to present the new certificate")

    def metrics(self):
        url = "http://127.0.0.1:%d/metrics" % self.status_port
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for m in re.finditer(r"^elkeid_agent_(\w+)(\{[^}]*\})? (\S+)$", text, re.M):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def metric(self, name):
        """A counter summed over its labels."""
        return sum(v for k, v in self.metrics().items() if k.split("{")[0] == name)

    def health(self):
        url = "http://127.0.0.1:%d/health" % self.status_port
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
        return json.loads(body.decode())

    def settle(self):
        t = fh.settle(self.server, self.agent_id, self.load, quiet=15, timeout=120)
        fh.report("tls " + self.agent_id, t)
        return t

    def close(self):
        try:
            if self.agent.alive:
                assert self.agent.stop() == 0
        finally:
            self.files.close()
            self.server.stop()


@pytest.fixture
def rotation(request, tmp_path):
    made = []

    def make(name, **kw):
        made.append(Rotation(tmp_path, name, **kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


def test_client_certificate_rotated_from_the_same_ca_under_load(rotation):
    r = rotation("same-ca")
    r.start()
    first = r.stream_cert()
    new = r.swap(r.client(), r.ca)
    r.wait_stream_cert(new.cert_pem)
    assert r.stream_cert() != first
    r.load.wait_running(r.load.produced() + RATE * 2, 60)
    t = r.settle()
    assert t.missing == 0, t
    # The stream ended with the server's receipt: nothing was resent.
    assert t.duplicates == 0, t
    assert r.metric("tls_rotations") == 1
    assert r.metric("tls_reload_failures") == 0
    assert r.metric("transport_replayed_records") == 0
    assert "TLS files rotated: client certificate CN=elkeid-agent" in r.agent.log_text()
    assert r.health()["state"] == "running"
    # Days to expiry in the heartbeat and on /metrics (the certificates
    # are issued for ten years).
    beat = r.server.heartbeat(r.agent_id)
    assert 3640 < float(beat["cert_expire_days"]) < 3651, beat
    assert 3640 < float(beat["ca_expire_days"]) < 3651, beat
    assert 3640 < r.metrics()["tls_cert_expiry_days"] < 3651
    # What elkeidctl status shows as in use.
    with open(os.path.join(r.agent.workdir, "tmp", "tls-in-use.json")) as f:
        in_use = json.load(f)
    assert in_use["pid"] == r.agent.pid
    assert int(in_use["set"]["cert"]["serial"], 16) == new.cert.serial_number


def test_sighup_checks_the_files_at_once(rotation):
    r = rotation("sighup", agent_args=["--tls-check-seconds", "3600"])
    r.start(seconds=1)
    new = r.swap(r.client(), r.ca)
    time.sleep(1)
    assert r.stream_cert() != der_sha256(new.cert_pem)  # no check due for an hour
    r.agent.signal(signal.SIGHUP)
    r.wait_stream_cert(new.cert_pem, timeout=15)
    assert r.agent.alive and "SIGHUP: checking the TLS files" in r.agent.log_text()
    t = r.settle()
    assert t.missing == 0, t


def test_rotation_to_a_new_ca_the_server_trusts(rotation):
    r = rotation("new-ca")
    r.start()
    new_ca = certs.make_ca("elkeid-devcenter CA 2")
    # The server trusts old and new CA from its next handshake on.
    bundle = certs.bundle_paths(r.server.certs)
    old_ca_pem = r.ca.cert_pem
    with open(bundle.ca, "wb") as f:
        f.write(new_ca.cert_pem + old_ca_pem)
    r.server.dc.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    # The agent: a certificate of the new CA; its CA file trusts both while
    # the server's own certificate is still of the old one.
    new = r.swap(r.client(ca=new_ca), new_ca.cert_pem + old_ca_pem)
    r.wait_stream_cert(new.cert_pem)
    # Then the server moves to a certificate of the new CA; a redial works.
    certs.reissue_server_cert(r.server.certs, ca=new_ca)
    r.server.dc.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    status, _ = r.server.dc.request("POST", "/conn/reset", {"agent_id": r.agent_id})
    assert status == 200
    wait_until(lambda: r.agent.log_text().count("connected to %s" % r.server.grpc) >= 3,
               30, 0.2, "the agent to reconnect after the reset")
    r.wait_stream_cert(new.cert_pem)
    t = r.settle()
    assert t.missing == 0, t
    assert r.metric("tls_rotations") == 1 and r.metric("tls_reload_failures") == 0
    assert r.metrics()["tls_ca_expiry_days"] > 3000


def test_devcenter_rotates_its_server_certificate_on_sighup(rotation):
    r = rotation("server-cert")
    r.start()
    new = certs.reissue_server_cert(r.server.certs)
    r.server.dc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "certificates reloaded" in open(r.server.dc.stderr.name).read(), 10,
               0.1, "the devcenter's reload line")
    status, _ = r.server.dc.request("POST", "/conn/reset", {"agent_id": r.agent_id})
    assert status == 200
    wait_until(lambda: r.agent.log_text().count("connected to %s" % r.server.grpc) >= 3,
               30, 0.2, "the agent to reconnect after the reset")
    # What a new connection is served now: the new certificate.
    host, port = r.server.grpc.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(r.path("ca"))
    ctx.load_cert_chain(r.path("cert"), r.path("key"))
    with socket.create_connection((host, int(port)), 10) as sock:
        with ctx.wrap_socket(sock, server_hostname="elkeid.com") as tls:
            served = hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
    assert served == der_sha256(new.cert_pem)
    t = r.settle()
    assert t.missing == 0, t


def test_every_bad_set_is_kept_out_while_the_stream_flows(rotation):
    r = rotation("bad")
    r.start()
    other_ca = certs.make_ca("not ours")
    good = r.client()
    cases = []

    def bad_swap(name, pair, ca_pem=None, key_pem=None):
        cases.append((name, lambda: r.swap(pair, ca_pem or r.ca.cert_pem, key_pem)))

    bad_swap("garbage PEM", good, key_pem=b"-----BEGIN PRIVATE KEY-----\nnonsense\n")
    bad_swap("key of another certificate", good, key_pem=r.client().key_pem)
    bad_swap("certificate of another CA", r.client(ca=other_ca))
    bad_swap("expired", r.client(not_before=NOW - 10 * DAY, not_after=NOW - DAY))
    bad_swap("not yet valid", r.client(not_before=NOW + DAY, not_after=NOW + 10 * DAY))
    cases.append(("file removed", lambda: os.unlink(r.path("key"))))
    # Tests run as root, so chmod 000 would not stop a read: a directory
    # where the file should be makes open() fail (EISDIR) for anyone.
    cases.append(("unreadable (a directory)",
                  lambda: (os.unlink(r.path("key")), os.mkdir(r.path("key")))))

    def restore_links():
        for what in ("ca", "cert", "key"):
            p = r.path(what)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
            os.symlink(os.path.join("..data", what + ".pem"), p)

    in_use = r.stream_cert()
    for n, (name, apply) in enumerate(cases, 1):
        apply()
        wait_until(lambda: r.metric("tls_reload_failures") >= n, 20, 0.1,
                   "the agent to refuse: %s" % name)
        health = r.health()
        assert health["state"] == "abnormal", (name, health)
        assert any("TLS files refused" in reason for reason in health["reasons"]), health
        assert r.agent.alive and r.stream_cert() == in_use, name
        # A good set (a swap of its own) clears it and is used.
        restore_links()
        good = r.swap(r.client(), r.ca)
        r.wait_stream_cert(good.cert_pem)
        in_use = r.stream_cert()
        wait_until(lambda: r.health()["state"] == "running", 10, 0.1, "running again")
    log = r.agent.log_text(stderr=False)
    assert log.count("TLS files not reloaded, keeping the set in use") == len(cases), log
    m = r.metrics()
    for reason in ("not_pem", "key_mismatch", "unknown_ca", "expired", "not_yet_valid",
                   "unreadable"):
        assert m.get('tls_reload_failures{reason="%s"}' % reason, 0) >= 1, (reason, m)
    assert r.metric("tls_rotations") == len(cases)
    t = r.settle()
    assert t.missing == 0, t


def test_a_certificate_written_long_before_its_key_is_never_half_applied(rotation):
    r = rotation("mid-write")
    r.start()
    in_use = r.stream_cert()
    new = r.client()
    # Plain files this time, rewritten in place one after the other.
    for what in ("ca", "cert", "key"):
        os.unlink(r.path(what))
        shutil.copy(os.path.join(r.tls, "v1", what + ".pem"), r.path(what))
    with open(r.path("cert"), "wb") as f:
        f.write(new.cert_pem)
    # Many checks later the key is still the old one: refused (once), not used.
    wait_until(lambda: r.metric("tls_reload_failures") >= 1, 20, 0.1, "the mismatch refused")
    time.sleep(1)
    assert r.metric("tls_reload_failures") == 1 and r.metric("tls_rotations") == 0
    assert r.stream_cert() == in_use
    with open(r.path("key"), "wb") as f:
        f.write(new.key_pem)
    r.wait_stream_cert(new.cert_pem)
    assert r.metric("tls_rotations") == 1
    wait_until(lambda: r.health()["state"] == "running", 10, 0.1, "running again")
    t = r.settle()
    assert t.missing == 0, t


def test_an_expired_client_certificate_refused_by_the_server_is_named(tmp_path):
    server = fh.SeqServer(os.path.join(str(tmp_path), "server"))
    try:
        ca = certs.load_ca(server.certs)
        old = certs.issue_cert(ca, "elkeid-agent", "client", not_before=NOW - 10 * DAY,
                               not_after=NOW - DAY)
        cert = os.path.join(str(tmp_path), "expired.crt")
        key = os.path.join(str(tmp_path), "expired.key")
        certs.write_pair(old, cert, key)
        agent = AgentProc(tmp_path / "wd", ["--server", server.grpc, "--agent-id", "expired",
                                            "--ca", os.path.join(server.certs, "ca.crt"),
                                            "--cert", cert, "--key", key],
                          env={"ELKEID_DIAL_TIMEOUT": "1", "ELKEID_RECONNECT_DELAY": "0.2"})
        try:
            line = wait_until(lambda: [l for l in agent.log_text().splitlines()
                                       if "cannot connect to %s" % server.grpc in l], 60, 0.2,
                              "the dial diagnosis")[0]
            assert "rejected our client certificate %s" % cert in line, line
            assert "TLS cert %s expired on " % cert in line, line
            assert agent.alive
        finally:
            assert agent.stop() == 0
    finally:
        server.stop()


def test_the_dial_probe_presents_the_set_in_memory_and_names_its_files(tmp_path):
    from elkeid_agent.transport import credentials, diagnose
    server = fh.SeqServer(os.path.join(str(tmp_path), "server"))
    try:
        ca = certs.load_ca(server.certs)
        paths = {"ca": "/etc/elkeid/cert/ca.crt", "cert": "/etc/elkeid/cert/client.crt",
                 "key": "/etc/elkeid/cert/client.key"}  # named only, never read
        good = certs.issue_cert(ca, "elkeid-agent", "client")
        in_memory = credentials.validate(ca.cert_pem, good.cert_pem, good.key_pem, paths=paths)
        d = diagnose.probe_set(server.grpc, in_memory, "elkeid.com", 5)
        assert d.reason == "ok", d
        foreign = certs.issue_cert(certs.make_ca("not ours"), "elkeid-agent", "client")
        refused = credentials.validate(ca.cert_pem, foreign.cert_pem, foreign.key_pem,
                                       paths=paths, strict=False)
        d = diagnose.probe_set(server.grpc, refused, "elkeid.com", 5)
        assert d.reason == "client_cert_rejected", d
        assert "rejected our client certificate /etc/elkeid/cert/client.crt" in d.text, d
    finally:
        server.stop()
