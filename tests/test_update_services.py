"""Updating a local service's binary with a 1070 task, end to end: a real
agent with a services file running tests/services_fixtures/svc.py behind
small executable scripts (v1, v2, a broken copy), the development
AgentCenter sending the task, a loopback file server serving the
downloads, and the update journal and the files on disk checked after."""

import base64
import hashlib
import json
import os
import signal
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import wait_until  # noqa: E402
from services_fixtures.rig import SVC, service  # noqa: E402
from test_services_agent import alive  # noqa: E402

from elkeid_agent.services import adoption  # noqa: E402
from elkeid_agent.update.journal import Journal  # noqa: E402
from elkeid_devtools.launchers import FileServer  # noqa: E402

SID = "svc"
VERIFY_TIMEOUT = "5s"


def script(version, broken=False, silent=False):
    """An executable stand-in for a service's binary: svc.py heartbeating
    (``silent``: running without heartbeats; ``broken``: exiting at once),
    after writing ``<version> <pid>`` to ``version`` in its work dir."""
    lines = ["#!%s" % sys.executable,
             "import os, runpy, sys",
             "with open('version.tmp', 'w') as f:",
             "    f.write('%s %%d' %% os.getpid())" % version,
             "os.replace('version.tmp', 'version')"]
    if broken:
        lines.append("sys.exit(3)")
    lines.append("sys.argv[0] = %r" % SVC)
    if silent:
        lines.append("del sys.argv[1:]")
    lines.append("runpy.run_path(%r, run_name='__main__')" % SVC)
    return ("\n".join(lines) + "\n").encode()


V1, V2, V3 = script("1.0"), script("2.0"), script("3.0")
BROKEN, SILENT = script("2.0", broken=True), script("2.0", silent=True)


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Host:
    """One agent with one service (``svc`` running v1) and a file server."""

    def __init__(self, tmp_path, devcenter, start_agent, agent_id, public_key=""):
        self.dc = devcenter
        self.start_agent = start_agent
        self.agent_id = agent_id
        self.dir = str(tmp_path)
        self.workdir = os.path.join(self.dir, "agent")
        self.binary = os.path.join(self.dir, "svc-bin")
        self.svc_dir = os.path.join(self.dir, "svc-wd")
        self.services_file = os.path.join(self.dir, "services.json")
        self.files = FileServer()
        self.pids = set()
        with open(self.binary, "wb") as f:
            f.write(V1)
        os.chmod(self.binary, 0o755)
        sock = os.path.join(self.dir, "svc.sock")
        entry = service(SID, "--socket", sock, "--id", SID, binary_path=self.binary,
                        work_dir=self.svc_dir, socket_path=sock,
                        health_check={"heartbeat_timeout": "2s"})
        entry["args"] = entry["args"][1:]  # the script runs svc.py itself
        update = {"verify_timeout": VERIFY_TIMEOUT}
        if public_key:
            update["public_key_file"] = public_key
        with open(self.services_file, "w") as f:
            json.dump({"agents": [entry], "update": update}, f)
        self.agent = None
        self.start()

    def start(self):
        self.agent = self.start_agent(self.agent_id, "--services", self.services_file,
                                      workdir=self.workdir)
        self.dc.wait_agent(self.agent_id, timeout=60)

    def running(self, version, other_than=0):
        """The pid of the service's process once it runs ``version``."""
        def found():
            try:
                with open(os.path.join(self.svc_dir, "version")) as f:
                    got, pid = f.read().split()
            except (OSError, ValueError):
                return None
            pid = int(pid)
            if got == version and pid != other_than and alive(pid):
                self.pids.add(pid)
                return pid
            return None
        return wait_until(found, 60, 0.1, "service running %s" % version)

    def offer(self, token, version, url, digest, **extra):
        req = dict({"component": SID, "version": version, "download_url": url,
                    "hash": digest}, **extra)
        self.send(token, json.dumps(req))

    def send(self, token, data):
        status, body = self.dc.command(self.agent_id, {"task": {
            "data_type": 1070, "name": "elkeid-agent", "data": data, "token": token}})
        assert status == 200, body

    def result(self, token, timeout=60):
        [rec] = self.dc.wait_records(5100, lambda r: r["fields"].get("token") == token,
                                     agent_id=self.agent_id, timeout=timeout)
        return rec["fields"]

    def rolled_back(self, token, path, data):
        """Offer ``data`` as 2.0 and check it is rolled back: v1 in place
        again and running in a new run. The 5100's fields and the URL."""
        old_pid = self.running("1.0")
        url = self.files.add(path, data)
        self.offer(token, "2.0", url, sha(data))
        res = self.result(token)
        assert (res["status"], res["result"], res["rolled_back"]) == \
            ("failed", "rolled_back", "true"), res
        assert self.binary_bytes() == V1
        self.running("1.0", other_than=old_pid)
        return res, url

    def binary_bytes(self):
        with open(self.binary, "rb") as f:
            return f.read()

    def rows(self):
        journal = Journal(self.workdir)
        try:
            return journal.history(component=SID)
        finally:
            journal.close()

    def backups(self):
        d = os.path.join(self.workdir, "update", "backup")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def close(self):
        if self.agent is not None and self.agent.alive:
            self.agent.stop()
        self.files.close()
        try:
            self.pids.update(r.pid for r in adoption.load(adoption.path_in(self.workdir))
                             .values())
        except adoption.StateError:
            pass
        for pid in self.pids:  # services outlive the agent by design
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def host(tmp_path, devcenter, start_agent):
    made = []

    def make(agent_id, **kw):
        h = Host(tmp_path, devcenter, start_agent, agent_id, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        print(h.agent.log_text()[-6000:])  # shown when the test failed
        h.close()


def test_update_swaps_the_binary_restarts_and_reports_with_the_token(host):
    h = host("svcup-ok")
    old_pid = h.running("1.0")
    url = h.files.add("/svc-2.0", V2)
    h.offer("t-ok", "2.0", url, sha(V2))
    res = h.result("t-ok")
    assert (res["status"], res["result"], res["kind"]) == ("succeeded", "succeeded", "update"), res
    assert (res["component"], res["old_version"], res["new_version"]) == (SID, "unknown", "2.0")
    assert h.binary_bytes() == V2
    assert os.stat(h.binary).st_mode & 0o777 == 0o755
    new_pid = h.running("2.0", other_than=old_pid)
    assert not alive(old_pid)
    [row] = h.rows()
    assert (row.state, row.install, row.manager) == ("succeeded", "binary", "agent")
    assert row.healthy_at and row.context["token"] == "t-ok"
    assert not os.path.exists(row.package)  # the download is gone once installed
    [backup] = h.backups()
    assert backup.startswith(SID + "_") and backup.endswith(".bak")
    with open(row.backup, "rb") as f:
        assert f.read() == V1
    assert h.agent.alive and alive(new_pid)

    # Now the journal knows 2.0: an older version needs allow_downgrade and is
    # refused before anything is downloaded.
    old_url = h.files.add("/svc-1.5", V1)
    h.offer("t-down", "1.5", old_url, sha(V1))
    res = h.result("t-down")
    assert (res["status"], res["result"]) == ("failed", "refused"), res
    assert "allow_downgrade" in res["reason"] and res["old_version"] == "2.0"
    assert "/svc-1.5" not in h.files.hits
    assert h.binary_bytes() == V2 and alive(new_pid)


def test_wrong_hash_changes_nothing(host):
    h = host("svcup-hash")
    pid = h.running("1.0")
    url = h.files.add("/svc-2.0", V2)
    h.offer("t-hash", "2.0", url, sha(b"something else"))
    res = h.result("t-hash")
    assert (res["status"], res["result"]) == ("failed", "failed"), res
    assert "sha256" in res["reason"]
    assert "/svc-2.0" in h.files.hits
    assert h.binary_bytes() == V1 and alive(pid)
    assert h.running("1.0") == pid  # never restarted
    assert [r.state for r in h.rows()] == ["failed"] and h.backups() == []


def test_signature_is_required_and_checked_when_a_key_is_configured(host, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    pub = str(tmp_path / "update-key.pem")
    with open(pub, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    h = host("svcup-sig", public_key=pub)
    pid = h.running("1.0")
    url = h.files.add("/svc-2.0", V2)

    h.offer("t-nosig", "2.0", url, sha(V2))
    res = h.result("t-nosig")
    assert (res["status"], res["result"]) == ("failed", "failed"), res
    assert "no signature" in res["reason"]

    wrong = base64.b64encode(key.sign(V1)).decode()
    h.offer("t-badsig", "2.0", url, sha(V2), signature=wrong)
    res = h.result("t-badsig")
    assert (res["status"], res["result"]) == ("failed", "failed"), res
    assert "bad signature" in res["reason"]
    assert h.binary_bytes() == V1 and h.running("1.0") == pid

    good = base64.b64encode(key.sign(V2)).decode()
    h.offer("t-goodsig", "2.0", url, sha(V2), signature=good)
    res = h.result("t-goodsig")
    assert (res["status"], res["result"]) == ("succeeded", "succeeded"), res
    assert h.binary_bytes() == V2
    h.running("2.0", other_than=pid)


def test_a_binary_that_exits_at_once_is_rolled_back_and_rejected(host):
    h = host("svcup-broken")
    res, url = h.rolled_back("t-broken", "/svc-broken", BROKEN)
    assert "exited with code 3" in res["reason"] or "did not start" in res["reason"], res
    assert "did not start either" not in res["reason"], res  # the restored one did
    assert h.agent.alive
    [row] = h.rows()
    assert row.state == "rolled_back"

    # The same version again: refused from the journal, not downloaded again.
    hits = h.files.hits.count("/svc-broken")
    h.offer("t-again", "2.0", url, sha(BROKEN))
    res = h.result("t-again")
    assert (res["status"], res["result"]) == ("failed", "refused"), res
    assert "failed its trial before" in res["reason"]
    assert h.files.hits.count("/svc-broken") == hits
    assert h.binary_bytes() == V1


def test_a_binary_that_runs_without_heartbeats_fails_the_gate(host):
    h = host("svcup-silent")
    res, _url = h.rolled_back("t-silent", "/svc-silent", SILENT)
    assert "no_heartbeat" in res["reason"] or "exited during the trial" in res["reason"], res


def test_unknown_service_and_the_agent_itself_are_refused(host):
    h = host("svcup-unknown")
    pid = h.running("1.0")
    url = h.files.add("/svc-2.0", V2)
    h.send("t-unknown", json.dumps({"component": "nope", "version": "2.0",
                                    "download_url": url, "hash": sha(V2)}))
    res = h.result("t-unknown")
    assert res["status"] == "failed" and "unknown service 'nope'" in res["msg"], res
    h.send("t-agent", json.dumps({"component": "elkeid-agent", "version": "9.9",
                                  "download_url": url, "hash": sha(V2)}))
    res = h.result("t-agent")
    assert res["status"] == "failed" and "configs list's elkeid-agent entry" in res["msg"], res
    h.send("t-garbage", "{not json")
    assert "not JSON" in h.result("t-garbage")["msg"]
    assert h.files.hits == [] and h.binary_bytes() == V1 and alive(pid)
    assert h.rows() == []


def test_a_second_update_while_one_is_in_flight_is_refused(host):
    h = host("svcup-busy")
    old_pid = h.running("1.0")
    release = threading.Event()

    def slow(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(V2)))
        handler.end_headers()
        release.wait(60)
        handler.wfile.write(V2)

    url = h.files.add("/svc-2.0", slow)
    other = h.files.add("/svc-3.0", V3)
    try:
        h.offer("t-first", "2.0", url, sha(V2))
        wait_until(lambda: "/svc-2.0" in h.files.hits, 60, what="the first download started")
        h.offer("t-second", "3.0", other, sha(V3))
        res = h.result("t-second")
        assert (res["status"], res["result"]) == ("failed", "refused"), res
        assert "still in progress" in res["reason"]
        assert "/svc-3.0" not in h.files.hits
    finally:
        release.set()
    res = h.result("t-first")
    assert (res["status"], res["result"]) == ("succeeded", "succeeded"), res
    h.running("2.0", other_than=old_pid)


def test_an_agent_killed_during_the_trial_rolls_back_on_its_next_start(host):
    h = host("svcup-crash")
    old_pid = h.running("1.0")
    url = h.files.add("/svc-2.0", V2)
    h.offer("t-crash", "2.0", url, sha(V2))
    wait_until(lambda: [r for r in h.rows() if r.state == "trial"], 60, what="the trial")
    new_pid = h.running("2.0", other_than=old_pid)
    h.agent.signal(signal.SIGKILL)
    h.agent.proc.wait(30)
    assert h.binary_bytes() == V2 and alive(new_pid)  # nobody rolled it back yet
    h.start()
    res = h.result("t-crash")
    assert (res["status"], res["result"]) == ("failed", "rolled_back"), res
    assert "the agent stopped during trial" in res["reason"]
    assert h.binary_bytes() == V1
    h.running("1.0", other_than=new_pid)
    # Not the version's fault: it may be offered again.
    with_journal = Journal(h.workdir)
    try:
        assert with_journal.rejected(SID, "2.0") is None
    finally:
        with_journal.close()
