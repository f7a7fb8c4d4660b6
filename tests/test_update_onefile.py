"""Self-update of a one-file install (a zipapp started by hand, no service
manager): real v1/v2/broken-v3 zipapps, the development AgentCenter
offering them through a configs list, a loopback file server serving them.

Each failure ends on a working agent of the right version: the same
process when nothing was switched, the restored v1 (a new process the guard
started) after a rollback.
"""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from harness import wait_until
from elkeid_devtools.launchers import FileServer, processes_mentioning
from update_builds import pyz_agent

V1, V2, V3 = "1.0.0", "2.0.0", "3.0.0"
TRIAL = 10  # seconds of trial (update.verify_timeout)


@pytest.fixture
def files():
    fs = FileServer()
    yield fs
    fs.close()


class OneFile:
    """v1 installed as INST/elkeid-agent, its workdir, and the agent."""

    def __init__(self, base, builds, devcenter, files, agent_id, services="", env=None,
                 v1_fault=None):
        self.base = str(base)
        self.builds = builds
        self.dc = devcenter
        self.files = files
        self.agent_id = agent_id
        self.inst = os.path.join(self.base, "inst", "elkeid-agent")
        self.workdir = os.path.join(self.base, "wd")
        os.makedirs(os.path.dirname(self.inst))
        os.makedirs(self.workdir)
        v1 = builds.make_pyz(os.path.join(self.base, "builds"), V1, fault=v1_fault)
        os.replace(v1, self.inst)
        with open(os.path.join(self.workdir, "services.yaml"), "w") as f:
            f.write("update:\n  verify_timeout: %ds\n%s" % (TRIAL, services))
        self.cache = os.path.join(self.base, "cache")
        self.env = dict(env or {})
        self.agent = pyz_agent(self.inst, self.workdir, devcenter, agent_id, cache=self.cache,
                               env=self.env)
        wait_until(lambda: self.beats(V1), 60, 0.2, "a v1 heartbeat")

    def beats(self, version, after=0):
        return [r for r in self.dc.records(1000, self.agent_id, after=after)
                if r["version"] == version]

    def wait_beat(self, version, timeout, what):
        """A heartbeat of ``version`` stored from now on."""
        mark = self.last_id()
        return wait_until(lambda: self.beats(version, mark), timeout, 0.2, what)

    def last_id(self):
        recs = self.dc.records(None, self.agent_id, limit=1, newest=True)
        return recs[-1]["id"] if recs else 0

    def serve(self, name, data):
        return self.files.add("/" + name, data)

    def offer(self, version, data=None, url=None, sha256=None, detail="", kind=""):
        if url is None:
            url = self.serve("agent-%s-%d" % (version, time.monotonic_ns()), data)
        cfg = {"name": "elkeid-agent", "type": kind, "version": version,
               "sha256": sha256 or hashlib.sha256(data).hexdigest(), "signature": "",
               "download_url": [url], "detail": detail}
        status, body = self.dc.command(self.agent_id, {"config": [cfg]})
        assert status == 200, body
        return url

    def reports(self, after=0):
        return [r["fields"] for r in self.dc.records(5100, self.agent_id, after=after)
                if r["fields"].get("kind") == "update"]

    def wait_report(self, after=0, timeout=60):
        return wait_until(lambda: self.reports(after), timeout, 0.2, "an update report")[-1]

    def next_attempt(self, after, first_id):
        """The report of the attempt after update ``first_id`` (the server
        pushing its list again once the restored version connects)."""
        return wait_until(lambda: [r for r in self.reports(after)
                                   if r["update_id"] != str(first_id)],
                          TRIAL + 60, 0.2, "the second attempt")[-1]

    def journal(self):
        path = os.path.join(self.workdir, "update", "journal.db")
        if not os.path.exists(path):
            return []
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        try:
            # The agent creates the file, then its tables one commit at a
            # time, user_version last: until then no update is recorded.
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                return []
            return [dict(r) for r in db.execute("SELECT * FROM updates ORDER BY id")]
        finally:
            db.close()

    def logged(self, text):
        try:
            with open(os.path.join(self.workdir, "log", "elkeid-agent.log")) as f:
                return text in f.read()
        except FileNotFoundError:
            return False

    def rejected(self):
        db = sqlite3.connect(os.path.join(self.workdir, "update", "journal.db"))
        try:
            return [r[1] for r in db.execute("SELECT * FROM rejected")]
        finally:
            db.close()

    def installed_version(self):
        out = subprocess.run(["/usr/bin/python3", self.inst, "--version"],
                             stdout=subprocess.PIPE, env=dict(os.environ,
                                                              ELKEID_AGENT_CACHE=self.cache))
        return out.stdout.decode().split()[-1]

    def state_detail(self, version=V1):
        beat = self.beats(version)[-1]
        return json.loads(beat["fields"]["state_detail"] or "[]")

    def close(self):
        if self.agent.alive:
            self.agent.stop()
        # A restored agent is the guard's child, not ours.
        for pid in processes_mentioning(self.inst):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        wait_until(lambda: not processes_mentioning(self.inst), 30, 0.2, "agents to exit")


@pytest.fixture
def onefile(tmp_path, builds, devcenter, files):
    made = []

    def make(agent_id, **kw):
        o = OneFile(tmp_path / agent_id, builds, devcenter, files, agent_id, **kw)
        made.append(o)
        return o
    yield make
    for o in made:
        o.close()


def _agent_pids(o):
    return [p for p in processes_mentioning(o.inst)
            if " run " in open("/proc/%d/cmdline" % p, "rb").read().replace(b"\0", b" ").decode()]


def test_update_v1_to_v2_keeps_the_process_and_reports_success(onefile, builds, tmp_path):
    o = onefile("onefile-ok")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    mark = o.last_id()
    t0 = time.monotonic()
    o.offer(V2, v2)
    wait_until(lambda: o.beats(V2, mark), 60, 0.2, "a v2 heartbeat")
    first_beat = time.monotonic() - t0
    report = o.wait_report(mark, timeout=TRIAL + 60)
    healthy = time.monotonic() - t0
    assert report["result"] == "succeeded", report
    assert (report["old_version"], report["new_version"]) == (V1, V2)
    assert o.agent.alive, "re-executed in place: the process the test started runs v2"
    assert o.beats(V2, mark)[-1]["fields"]["pid"] == str(o.agent.pid)
    assert o.installed_version() == V2
    rows = o.journal()
    assert [r["state"] for r in rows] == ["succeeded"]
    assert os.path.isfile(rows[0]["backup"])
    assert "update" not in json.dumps(o.state_detail(V2))
    print("offer -> first v2 heartbeat %.1f s, -> trial passed %.1f s (trial %d s)"
          % (first_beat, healthy, TRIAL))


@pytest.mark.parametrize("fault, reason", [
    ("import", "exited"),
    ("noconnect", "did not connect"),
    ("crash_after:3", "exited"),
])
def test_a_broken_v3_is_rolled_back_and_not_retried(onefile, builds, tmp_path, fault, reason):
    o = onefile("onefile-" + fault.replace(":", "-"))
    v3 = open(builds.make_pyz(str(tmp_path / "b"), V3, fault=fault), "rb").read()
    mark = o.last_id()
    t0 = time.monotonic()
    url = o.offer(V3, v3)
    report = o.wait_report(mark, timeout=TRIAL + 60)
    assert report["result"] == "rolled_back", report
    assert reason in report["reason"], report
    assert (report["old_version"], report["new_version"]) == (V1, V3)
    restored = time.monotonic() - t0
    # A working v1 again, in a process the guard started.
    o.wait_beat(V1, 60, "a v1 heartbeat after the rollback")
    assert o.installed_version() == V1
    assert o.rejected() == [V3]
    assert [r["state"] for r in o.journal()] == ["rolled_back"]
    # Offered again and again (as the server does on every configs push):
    # not downloaded, not tried, the agent says why.
    hits = len(o.files.hits)
    mark = o.last_id()
    for _ in range(3):
        o.offer(V3, v3, url=url)
    wait_until(lambda: any("not retried" in d for d in
                           (json.dumps(o.state_detail()),)) and o.beats(V1, mark), 30, 0.2,
               "the refusal in the heartbeat")
    time.sleep(1)
    assert len(o.files.hits) == hits
    assert [r["state"] for r in o.journal()] == ["rolled_back"]
    print("%s: offer -> restored v1 reported %.1f s" % (fault, restored))


def test_bad_downloads_change_nothing(onefile, builds, tmp_path):
    o = onefile("onefile-bad")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    html = b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"
    cases = [
        ("wrong hash", dict(data=v2, sha256=hashlib.sha256(b"other").hexdigest()),
         "sha256 mismatch"),
        ("truncated", dict(url=o.files.add("/short", v2[:1000],
                                           headers={"Content-Length": str(len(v2))}),
                           sha256=hashlib.sha256(v2).hexdigest()), "download failed"),
        ("html page hashed", dict(data=html), "HTML"),
        ("html instead of package", dict(url=o.files.add("/html", html),
                                         sha256=hashlib.sha256(v2).hexdigest()), "sha256"),
        ("not found", dict(url=o.files.url("/missing"), sha256=hashlib.sha256(v2).hexdigest()),
         "404"),
        ("a deb for a one-file install", dict(data=v2, kind="deb"), "cannot update"),
    ]
    pid = o.agent.pid
    for name, kw, expect in cases:
        mark = o.last_id()
        o.offer(V2, **kw)
        report = o.wait_report(mark)
        assert report["result"] in ("failed", "refused"), (name, report)
        assert expect in report["reason"], (name, report)
        assert o.agent.alive and o.agent.pid == pid
        assert o.installed_version() == V1, name
    o.wait_beat(V1, 30, "v1 heartbeats go on")
    assert not any(r["state"] not in ("failed", "refused") for r in o.journal())
    assert os.listdir(os.path.join(o.workdir, "update", "download")) == []


def test_downgrade_needs_the_offer_to_say_so(onefile, builds, tmp_path):
    o = onefile("onefile-down")
    v0 = open(builds.make_pyz(str(tmp_path / "b"), "0.9.0"), "rb").read()
    mark = o.last_id()
    o.offer("0.9.0", v0)
    report = o.wait_report(mark)
    assert report["result"] == "refused" and "allow_downgrade" in report["reason"], report
    mark = o.last_id()
    o.offer("0.9.0", v0, detail=json.dumps({"allow_downgrade": True}))
    report = o.wait_report(mark, timeout=TRIAL + 60)
    assert report["result"] == "succeeded", report
    assert o.installed_version() == "0.9.0"


def _sign_setup(tmp_path, kind):
    from elkeid_devtools import signing
    priv, pub = signing.generate(kind)
    key = tmp_path / ("update-%s.pub" % kind)
    key.write_bytes(pub)
    return priv, str(key)


def test_signatures_with_a_key_configured(onefile, builds, tmp_path):
    from elkeid_devtools import signing
    priv, key = _sign_setup(tmp_path, "ed25519")
    other, _ = _sign_setup(tmp_path / "..", "rsa")
    o = onefile("onefile-sig", env={"ELKEID_UPDATE_PUBKEY": key})
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    # No signature anywhere: refused (fails closed).
    mark = o.last_id()
    o.offer(V2, v2)
    assert "no usable signature" in o.wait_report(mark)["reason"]
    # A signature by another key, beside the package.
    url = o.serve("signed-bad.pyz", v2)
    o.files.add("/signed-bad.pyz.sig", signing.sign(other, v2))
    mark = o.last_id()
    o.offer(V2, v2, url=url)
    assert "signature" in o.wait_report(mark)["reason"]
    # A bad base64 signature in the offer's detail.
    import base64
    bad = bytearray(signing.sign(priv, v2))
    bad[5] ^= 1
    mark = o.last_id()
    o.offer(V2, v2, detail=json.dumps({"signature": base64.b64encode(bytes(bad)).decode()}))
    assert "bad signature" in o.wait_report(mark)["reason"]
    assert o.installed_version() == V1 and o.agent.alive
    # The right one, as a .sig file beside the package: applied.
    url = o.serve("signed.pyz", v2)
    o.files.add("/signed.pyz.sig", base64.b64encode(signing.sign(priv, v2)))
    mark = o.last_id()
    o.offer(V2, v2, url=url)
    assert o.wait_report(mark, timeout=TRIAL + 60)["result"] == "succeeded"
    assert o.installed_version() == V2


def test_an_update_while_another_is_in_progress_is_deferred(onefile, builds, tmp_path):
    o = onefile("onefile-busy")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    v3 = open(builds.make_pyz(str(tmp_path / "b"), V3), "rb").read()
    mark = o.last_id()
    o.offer(V2, v2)
    wait_until(lambda: o.journal(), 30, 0.1, "the first update to start")
    o.offer(V3, v3)
    report = o.wait_report(mark, timeout=TRIAL + 60)
    assert (report["result"], report["new_version"]) == ("succeeded", V2), report
    assert [r["to_version"] for r in o.journal()] == [V2]
    assert o.installed_version() == V2


def _slow_body(data, first, pause):
    def body(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[:first])
        handler.wfile.flush()
        time.sleep(pause)
        try:
            handler.wfile.write(data[first:])
        except OSError:
            pass
    return body


def test_sigkill_during_download_then_the_next_start_recovers(onefile, builds, tmp_path):
    o = onefile("onefile-kill")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    url = o.files.add("/slow.pyz", _slow_body(v2, 4096, 30))
    o.offer(V2, v2, url=url)
    wait_until(lambda: o.journal() and o.journal()[0]["state"] == "downloading", 30, 0.1,
               "the download to start")
    o.agent.signal(signal.SIGKILL)
    o.agent.proc.wait(10)
    assert o.installed_version() == V1
    mark = o.last_id()
    o.agent = pyz_agent(o.inst, o.workdir, o.dc, o.agent_id, cache=o.cache, env=o.env)
    wait_until(lambda: o.beats(V1, mark), 60, 0.2, "v1 back")
    rows = o.journal()
    assert rows[0]["state"] == "interrupted" and "downloading" in rows[0]["reason"], rows
    assert o.reports(mark)[0]["result"] == "interrupted"
    # The server pushes the list again on reconnect: the fast URL now works.
    o.files.add("/slow.pyz", v2)
    mark = o.last_id()
    o.offer(V2, v2, url=url)
    assert o.wait_report(mark, timeout=TRIAL + 60)["result"] == "succeeded"


def test_sigkill_of_the_new_version_during_its_trial_restores_v1(onefile, builds, tmp_path):
    o = onefile("onefile-killtrial")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    mark = o.last_id()
    o.offer(V2, v2)
    wait_until(lambda: o.beats(V2, mark), 60, 0.2, "v2 on trial")
    o.agent.signal(signal.SIGKILL)
    report = o.wait_report(mark, timeout=TRIAL + 60)
    assert report["result"] == "rolled_back" and "exited" in report["reason"], report
    o.wait_beat(V1, 60, "v1 restored")
    assert o.installed_version() == V1


def test_sigkill_of_the_guard_during_the_trial_rolls_back_on_the_next_start(onefile, builds,
                                                                              tmp_path):
    o = onefile("onefile-killguard")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    mark = o.last_id()
    o.offer(V2, v2)
    wait_until(lambda: o.beats(V2, mark), 60, 0.2, "v2 on trial")
    row = o.journal()[0]
    assert row["state"] == "trial" and row["guard_pid"]
    os.kill(row["guard_pid"], signal.SIGKILL)
    o.agent.stop()
    mark = o.last_id()
    o.agent = pyz_agent(o.inst, o.workdir, o.dc, o.agent_id, cache=o.cache, env=o.env)
    report = o.wait_report(mark, timeout=60)
    assert report["result"] == "rolled_back" and "guard stopped" in report["reason"], report
    # Not the version's fault, so not rejected: the restored v1 connects, the
    # server pushes its list again, and this time the update goes through.
    assert report["update_id"] == str(row["id"])
    final = o.next_attempt(mark, row["id"])
    assert final["result"] == "succeeded", final
    assert o.installed_version() == V2
    assert [r["state"] for r in o.journal()] == ["rolled_back", "succeeded"]


def test_sigkill_of_the_old_agent_mid_switch_ends_on_a_working_version(onefile, builds,
                                                                       tmp_path):
    o = onefile("onefile-killswitch")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    mark = o.last_id()
    o.offer(V2, v2)
    # Once the guard has registered: a kill before that is the hand-over's
    # (the next start, 60 s on, closes the row as interrupted; update_core).
    wait_until(lambda: [r for r in o.journal() if r["guard_pid"]], 60, 0.01,
               "the guard to take over")
    o.agent.signal(signal.SIGKILL)
    report = o.wait_report(mark, timeout=TRIAL + 60)
    assert report["result"] == "rolled_back", report
    _ends_on_a_working_version(o, mark, report)


def _ends_on_a_working_version(o, mark, report):
    if "the old agent exited before it re-executed the new version" in report["reason"]:
        # Killed before its re-exec (also while shutting down for it): not
        # v2's fault, so not rejected; the restored v1 takes the server's
        # next push of v2, and that one goes through.
        assert o.rejected() == []
        final = o.next_attempt(mark, report["update_id"])
        assert final["result"] == "succeeded", final
        assert o.installed_version() == V2
    else:  # the kill landed on v2, re-executed in the same process
        assert "the new version exited" in report["reason"], report
        assert o.rejected() == [V2]
        o.wait_beat(V1, 60, "v1 restored")
        assert o.installed_version() == V1


def test_sigkill_of_the_old_agent_shutting_down_for_its_reexec_is_not_v2s_fault(
        onefile, builds, tmp_path):
    # v1 waits 4 s before it shuts down: the kill lands after the guard has
    # switched the file and before v1 re-executes it.
    o = onefile("onefile-killshutdown", v1_fault="slow_shutdown:4")
    v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
    mark = o.last_id()
    o.offer(V2, v2)
    wait_until(lambda: o.logged("test fault slow_shutdown"), 60, 0.05,
               "v1 shutting down for its re-exec")
    assert o.journal()[0]["state"] == "trial"
    o.agent.signal(signal.SIGKILL)
    report = o.wait_report(mark, timeout=TRIAL + 60)
    assert report["result"] == "rolled_back", report
    assert "before it re-executed" in report["reason"], report
    _ends_on_a_working_version(o, mark, report)


def _tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(path)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs for a full disk: %s" % r.stdout.decode())


@pytest.mark.parametrize("which", ["backup_dir", "download_dir"])
def test_a_full_disk_stops_the_update_before_the_switch(onefile, builds, tmp_path, which):
    full = tmp_path / ("full-" + which)
    _tmpfs(full, "256k")
    try:
        o = onefile("onefile-full-" + which.split("_")[0],
                    services="  %s: %s\n" % (which, full))
        v2 = open(builds.make_pyz(str(tmp_path / "b"), V2), "rb").read()
        mark = o.last_id()
        o.offer(V2, v2)
        report = o.wait_report(mark)
        assert report["result"] == "failed", report
        assert "No space left on device" in report["reason"], report
        assert o.installed_version() == V1 and o.agent.alive
        assert os.listdir(str(full)) == [] or all(not n.endswith(".part")
                                                  for n in os.listdir(str(full)))
    finally:
        subprocess.run(["umount", "-l", str(full)])
