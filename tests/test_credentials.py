"""The TLS credential core (transport/credentials.py) and the watcher that
rotates sets (transport/tlswatch.py), on real files, without a server."""

import datetime
import logging
import os
import time

import pytest

from elkeid_agent.metrics import Registry
from elkeid_agent.settings import Settings
from elkeid_agent.state import AgentState
from elkeid_agent.transport import credentials as cr
from elkeid_agent.transport.delivery import HALF_CLOSE, REDIAL_NOW, Delivery
from elkeid_agent.transport.tlswatch import CredentialWatcher
from elkeid_devtools.devcenter import certs

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def pki():
    ca, other = certs.make_ca("one"), certs.make_ca("two")
    return {
        "ca": ca, "other_ca": other,
        "good": certs.issue_cert(ca, "elkeid-agent", "client"),
        "good2": certs.issue_cert(ca, "elkeid-agent-2", "client"),
        "other": certs.issue_cert(other, "elkeid-agent", "client"),
        "expired": certs.issue_cert(ca, "old", "client", not_before=NOW - 10 * DAY,
                                    not_after=NOW - DAY),
        "future": certs.issue_cert(ca, "new", "client", not_before=NOW + DAY,
                                   not_after=NOW + 10 * DAY),
        "short": certs.issue_cert(ca, "short", "client", not_after=NOW + 3 * DAY),
        "server": certs.issue_cert(ca, "elkeid.com", "server"),
    }


def validate(pki, cert="good", key=None, ca="ca", **kw):
    return cr.validate(pki[ca].cert_pem, pki[cert].cert_pem, pki[key or cert].key_pem, **kw)


# ------------------------------------------------------------------ the core

def test_a_good_set_carries_names_dates_and_a_content_fingerprint(pki):
    s = validate(pki)
    assert s.cert_info.subject == "CN=elkeid-agent" and s.cert_info.issuer == "CN=one"
    assert s.ca_info.subject == "CN=one"
    assert int(s.cert_info.serial, 16) == pki["good"].cert.serial_number
    assert 3648 < s.cert_info.days_left(time.time()) < 3651
    assert s.problem is None
    assert s.fingerprint == cr.fingerprint(s.ca, s.cert, s.key)
    assert s.fingerprint != validate(pki, "good2").fingerprint
    # Bytes moved from one file to the next are another set.
    assert cr.fingerprint(b"ab", b"c", b"") != cr.fingerprint(b"a", b"bc", b"")


def test_days_left_counts_down_and_goes_negative(pki):
    s = validate(pki, "short")
    now = time.time()
    assert 2.9 < s.cert_info.days_left(now) < 3.01
    assert -1.01 < s.cert_info.days_left(now + 4 * 86400) < -0.9
    assert s.as_dict(now)["cert"]["days_left"] == round(s.cert_info.days_left(now), 2)


@pytest.mark.parametrize("case,args,reason,what,needle", [
    ("garbage CA", dict(), cr.NOT_PEM, "ca", "TLS ca /p/ca holds no PEM certificate"),
    ("garbage cert", dict(), cr.NOT_PEM, "cert", "TLS cert /p/cert holds no PEM certificate"),
    ("garbage key", dict(), cr.NOT_PEM, "key", "TLS key /p/key is not an unencrypted PEM"),
    ("key of another cert", dict(key="good2"), cr.KEY_MISMATCH, "key",
     "TLS key /p/key does not match the certificate /p/cert"),
    ("cert of another CA", dict(cert="other"), cr.UNKNOWN_CA, "cert",
     "TLS cert /p/cert is not signed by the CA /p/ca"),
    ("server cert", dict(cert="server"), cr.UNTRUSTED, "cert", "is refused by the CA /p/ca"),
    ("expired", dict(cert="expired"), cr.EXPIRED, "cert", "TLS cert /p/cert expired on "),
    ("not yet valid", dict(cert="future"), cr.NOT_YET_VALID, "cert",
     "TLS cert /p/cert is not valid before "),
])
def test_every_problem_names_the_file_and_its_reason(pki, case, args, reason, what, needle):
    paths = {"ca": "/p/ca", "cert": "/p/cert", "key": "/p/key"}
    data = {"ca": pki["ca"].cert_pem, "cert": pki[args.get("cert", "good")].cert_pem,
            "key": pki[args.get("key", args.get("cert", "good"))].key_pem}
    if case.startswith("garbage"):
        data[what] = b"-----BEGIN NONSENSE-----\nxx\n"
    with pytest.raises(cr.CredentialError) as e:
        cr.validate(data["ca"], data["cert"], data["key"], paths=paths)
    assert e.value.reason == reason and e.value.what == what
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert e.value.hard == (reason in (cr.NOT_PEM, cr.KEY_MISMATCH))
    if not e.value.hard:
        soft = cr.validate(data["ca"], data["cert"], data["key"], paths=paths, strict=False)
        assert soft.problem.reason == reason


def test_dates_are_checked_against_the_given_now(pki):
    later = time.time() + 3700 * 86400
    with pytest.raises(cr.CredentialError) as e:
        validate(pki, now=later)
    assert e.value.reason == cr.EXPIRED and e.value.what == "cert"


def test_unreadable_files_are_named(tmp_path, pki):
    paths = {w: str(tmp_path / w) for w in cr.FILES}
    (tmp_path / "ca").write_bytes(pki["ca"].cert_pem)
    os.mkdir(paths["cert"])  # a directory where the file should be
    with pytest.raises(cr.CredentialError) as e:
        cr.load(paths)
    assert e.value.reason == cr.UNREADABLE and "cannot read TLS cert %s" % paths["cert"] \
        in str(e.value)


# ------------------------------------------------------------------ the watcher

class Files:
    """The three files in a directory of their own, written like a cert
    manager does (or not)."""

    def __init__(self, base, pki):
        self.dir = str(base)
        self.pki = pki
        self.paths = {w: os.path.join(self.dir, w + ".pem") for w in cr.FILES}

    def write(self, ca="ca", cert="good", key=None, only=None):
        data = {"ca": self.pki[ca].cert_pem, "cert": self.pki[cert].cert_pem,
                "key": self.pki[key or cert].key_pem}
        for what in only or cr.FILES:
            with open(self.paths[what], "wb") as f:
                f.write(data[what])

    def settings(self):
        return Settings(workdir=self.dir, ca=self.paths["ca"], cert=self.paths["cert"],
                        key=self.paths["key"], cert_expiry_warn_days=30)


@pytest.fixture
def watched(tmp_path, pki):
    os.makedirs(str(tmp_path / "tmp"))
    files = Files(tmp_path, pki)
    files.write()
    s = files.settings()
    metrics, state, rotated = Registry(), AgentState(), []
    w = CredentialWatcher(s, metrics, state, cr.load(files.paths), on_rotate=rotated.append)
    return files, w, metrics, state, rotated


def failures(metrics):
    return metrics.total("tls_reload_failures")


def test_a_changed_good_set_is_rotated_once(watched, caplog):
    files, w, metrics, state, rotated = watched
    w.check()
    assert rotated == [] and metrics.get("tls_rotations") == 0
    files.write(cert="good2")
    with caplog.at_level(logging.INFO):
        w.check()
        w.check()
    assert [s.cert_info.subject for s in rotated] == ["CN=elkeid-agent-2"]
    assert metrics.get("tls_rotations") == 1 and state.state == "running"
    assert "TLS files rotated: client certificate CN=elkeid-agent-2" in caplog.text
    assert '"CN=elkeid-agent-2"' in open(os.path.join(files.dir, "tmp",
                                                      "tls-in-use.json")).read()


def test_a_touched_file_is_no_rotation(watched):
    files, w, metrics, _state, rotated = watched
    os.utime(files.paths["cert"], (1, 1))
    w.check()
    assert rotated == [] and metrics.get("tls_rotations") == 0


@pytest.mark.parametrize("bad", ["garbage", "other_key", "other_ca", "expired", "future",
                                 "removed", "directory"])
def test_a_bad_set_keeps_the_old_one_with_one_line_and_a_count(watched, bad, caplog):
    files, w, metrics, state, rotated = watched
    before = w.current
    if bad == "garbage":
        with open(files.paths["cert"], "wb") as f:
            f.write(b"garbage\n")
    elif bad == "other_key":
        files.write(key="good2", only=("key",))
    elif bad == "other_ca":
        files.write(cert="other")
    elif bad == "expired":
        files.write(cert="expired")
    elif bad == "future":
        files.write(cert="future")
    elif bad == "removed":
        os.unlink(files.paths["key"])
    else:
        os.unlink(files.paths["key"])
        os.mkdir(files.paths["key"])
    with caplog.at_level(logging.INFO, logger="elkeid_agent"):
        w.check()  # the grace: maybe mid-write
        assert failures(metrics) == 0 and state.state == "running"
        for _ in range(3):
            w.check()
    lines = [r for r in caplog.records if "TLS files not reloaded" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert failures(metrics) == 1
    assert w.current is before and rotated == []
    assert state.state == "abnormal" and state.keys() == ["tls"]
    # A good set clears it.
    if bad == "directory":
        os.rmdir(files.paths["key"])
    files.write(cert="good2")
    w.check()
    assert state.state == "running" and len(rotated) == 1


def test_a_bad_set_reverted_clears_the_abnormal_state(watched):
    files, w, metrics, state, rotated = watched
    files.write(cert="other")
    w.check()
    w.check()
    assert state.state == "abnormal"
    files.write()
    w.check()
    assert state.state == "running" and rotated == [] and failures(metrics) == 1


def test_a_certificate_written_before_its_key_is_applied_once_both_are_in(watched):
    files, w, metrics, state, rotated = watched
    files.write(cert="good2", only=("cert",))
    w.check()  # the new certificate with the old key: not applied, not reported
    assert rotated == [] and failures(metrics) == 0 and state.state == "running"
    files.write(cert="good2", only=("key",))
    w.check()
    assert [s.cert_info.subject for s in rotated] == ["CN=elkeid-agent-2"]
    assert failures(metrics) == 0


def test_a_symlink_swap_is_followed_and_a_bad_swap_kept_out(tmp_path, pki):
    # The way Kubernetes secrets and cert managers rotate: the names are
    # links into ..data, itself a link swapped atomically to a new directory.
    os.makedirs(str(tmp_path / "tmp"))
    def version(name, cert, ca="ca"):
        d = tmp_path / name
        d.mkdir()
        Files(d, pki).write(ca=ca, cert=cert)
        return name
    def point_at(name):
        os.symlink(name, str(tmp_path / "..data.new"))
        os.replace(str(tmp_path / "..data.new"), str(tmp_path / "..data"))
    point_at(version("v1", "good"))
    for what in cr.FILES:
        os.symlink(os.path.join("..data", what + ".pem"), str(tmp_path / (what + ".pem")))
    files = Files(tmp_path, pki)
    metrics, state, rotated = Registry(), AgentState(), []
    w = CredentialWatcher(files.settings(), metrics, state, cr.load(files.paths),
                          on_rotate=rotated.append)
    point_at(version("v2", "good2"))
    w.check()
    assert [s.cert_info.subject for s in rotated] == ["CN=elkeid-agent-2"]
    point_at(version("v3", "other"))
    w.check()
    w.check()
    assert len(rotated) == 1 and failures(metrics) == 1 and state.state == "abnormal"
    assert metrics.get("tls_reload_failures", reason=cr.UNKNOWN_CA) == 1


def test_expiry_gauges_and_a_warning_once_a_day(tmp_path, pki, caplog):
    os.makedirs(str(tmp_path / "tmp"))
    files = Files(tmp_path, pki)
    files.write(cert="short")
    clock = [time.time()]
    metrics = Registry()
    w = CredentialWatcher(files.settings(), metrics, AgentState(), cr.load(files.paths),
                          clock=lambda: clock[0])
    assert 2.9 < metrics.get("tls_cert_expiry_days") < 3.01
    assert metrics.get("tls_ca_expiry_days") > 3000
    assert "elkeid_agent_tls_cert_expiry_days 2.9" in metrics.render_prometheus()
    with caplog.at_level(logging.WARNING, logger="elkeid_agent"):
        w.check()
        clock[0] += 3600
        w.check()
        clock[0] += 86400
        w.check()
    warned = [r.getMessage() for r in caplog.records if "in use expires in" in r.getMessage()]
    assert len(warned) == 2, warned
    assert warned[0].startswith("TLS cert %s in use expires in 3.0 days" % files.paths["cert"])


# ------------------------------------------------------------------ the stream's cycle

def cycling_stream():
    """A Delivery with one batch written, then a cycle requested."""
    d = Delivery(5.0, 1 << 20)
    d.stream_started()
    d.batch_taken(["r1"])
    d.written(10, 1.0)
    d.cycle_requested()
    return d


def test_a_cycle_half_closes_at_once_and_redials_without_delay():
    d = cycling_stream()
    assert d.next_send(pending=7) is HALF_CLOSE  # the 7 wait for the next stream
    d.half_close_sent()
    ended = d.stream_ended(server_ok=True, now=2.0, pending=7)
    assert ended.confirmed and ended.next == REDIAL_NOW and ended.replayed == 0
    assert ended.settled == [["r1"]] and not d.cycling
    d.stream_started()
    assert d.next_send(pending=7) is not HALF_CLOSE


def test_a_cycle_the_server_did_not_confirm_replays_the_window():
    d = cycling_stream()
    d.half_close_sent()
    ended = d.stream_ended(server_ok=False, now=2.0, pending=0)
    assert not ended.confirmed and ended.replayed == 1 and ended.next == REDIAL_NOW
