"""``elkeidctl update`` and ``elkeidctl rollback`` on a real update journal.

Each test builds ``<workdir>/update/journal.db`` through the Journal API in a
temporary workdir, the way the agent, its guard and the new version write it
(rows moved along the state machine). Guards are real processes. elkeidctl
runs in-process against the recording service fake (tests/test_ctl_fake.py)
for the systemctl calls; rollback's file switch is the real InstallEffects
on real files, its package tool calls are recorded."""

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import zipfile

import pytest

from elkeid_agent import ctl
from elkeid_agent.ctl import layout
from elkeid_agent.osfx import proc_start_ticks
from elkeid_agent.osfx.install import InstallEffects
from elkeid_agent.osfx.service import Completed
from elkeid_agent.update.journal import Journal
from elkeid_agent.update.trial import summary
from test_ctl_fake import FakeFx

T0 = 1714564800.0  # 2024-05-01 12:00:00 UTC
AGENT = "elkeid-agent"
LONG_REASON = ("the new version did not connect and send a heartbeat within 300 s; it logged: "
               + "grpc handshake to 10.0.0.5:6751 failed (certificate verify failed) " * 3)


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return "Result(%r, out=%r, err=%r)" % (self.code, self.out, self.err)


class RecordingInstall(InstallEffects):
    """The real InstallEffects (files are really copied and renamed); the
    package tools it would run are recorded and answered from ``answers``."""

    def __init__(self):
        super().__init__()
        self.ran = []
        self.answers = {}  # tool name -> (rc, output)

    def run(self, argv, timeout=300.0, env=None):
        self.ran.append(list(argv))
        return self.answers.get(argv[0], (0, ""))


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def wd(tmp_path):
    d = tmp_path / "wd"
    d.mkdir()
    return d


@pytest.fixture
def fx(tmp_path, wd):
    f = FakeFx(tmp_path / "root")
    # elkeidctl reads <workdir>/specified_env through the seam (re-based).
    f.write(str(wd / "specified_env"), "service_type=systemd\n", 0o600)
    return f


@pytest.fixture
def install():
    return RecordingInstall()


def run(fx, wd, *argv, install=None):
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(["--workdir", str(wd)] + list(argv), fx=fx, out=out, err=err,
                    install_fx=install)
    return Result(code, out.getvalue(), err.getvalue())


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t

    def tick(self, seconds=60.0):
        self.t += seconds
        return self.t


def journal(wd, clock=None):
    return Journal(str(wd), clock=clock or Clock())


def through(j, uid, *states, reason=None, **fields):
    for s in states[:-1]:
        j.move(uid, s)
    j.move(uid, states[-1], reason, **fields)


def zipapp(path, version, payload=b""):
    """A tiny stand-in for an elkeid-agent zipapp: its metadata file and a
    body that makes each version's bytes differ."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("elkeid_zipapp.json", json.dumps({"name": AGENT, "version": version}))
        zf.writestr("__main__.py", "print(%r)\n%s" % (version, payload.decode()))
    os.chmod(path, 0o700)
    with open(path, "rb") as f:
        return f.read()


class Updated:
    """One finished update, as succeeded_update() made it."""

    def __init__(self, j, uid, target, backup, old, new):
        self.j, self.uid, self.target, self.backup, self.old, self.new = \
            j, uid, target, backup, old, new

    def installed(self):
        with open(self.target, "rb") as f:
            return f.read()


def succeeded_update(j, wd, clock, old="1.0.0", new="2.0.0", install="pyz", backup_package=""):
    """A finished update old -> new as the guard leaves it: the new zipapp
    at the target, the old one in the backup directory."""
    target = str(wd / "elkeid-agent")
    backup = str(wd / "update" / "backup" / ("elkeid-agent_%s_20240501120000_1.bak" % old))
    old_bytes = zipapp(backup, old, b"# the old one\n")
    new_bytes = zipapp(target, new, b"# the new one\n" * 40)
    uid = j.begin(AGENT, old, new, kind=install, install=install, manager="systemd",
                  package_sha256="ab" * 32)
    clock.tick()
    through(j, uid, "verifying", "backing_up")
    j.move(uid, "handed_over", backup=backup, backup_package=backup_package,
           context={"target": target, "backup_dir": os.path.dirname(backup)})
    through(j, uid, "switching", "trial")
    clock.tick(300)
    j.move(uid, "succeeded", "healthy for the whole trial")
    return Updated(j, uid, target, backup, old_bytes, new_bytes)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def updated(wd, clock):
    """A one-file install updated 1.0.0 -> 2.0.0."""
    return succeeded_update(journal(wd, clock), wd, clock)


@pytest.fixture
def sleeper():
    """A real live process to stand for a guard."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    deadline = time.monotonic() + 30
    while proc_start_ticks(p.pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    yield p
    p.kill()
    p.wait()


def cells(line):
    return re.split(r"\s{2,}", line.rstrip())


# ---------------------------------------------------------------- update: history

def busy_journal(wd, sleeper):
    """Rows in every final state the history shows, a rejected version and
    an update on trial whose guard is ``sleeper``."""
    clock = Clock()
    j = journal(wd, clock)
    ok = succeeded_update(j, wd, clock).uid
    clock.tick(3600)
    failed = j.begin(AGENT, "2.0.0", "2.1.0", install="pyz", manager="systemd")
    j.move(failed, "failed", "download failed: http://10.0.0.9/a.pyz: HTTP 404")
    clock.tick(3600)
    rolled = j.begin(AGENT, "2.0.0", "3.0.0", kind="pyz", install="pyz", manager="systemd",
                     package_sha256="cd" * 32)
    through(j, rolled, "verifying", "backing_up", "handed_over", "switching", "trial")
    clock.tick(300)
    j.move(rolled, "rolling_back", LONG_REASON)
    j.reject(AGENT, "3.0.0", "cd" * 32, LONG_REASON)
    j.move(rolled, "rolled_back", LONG_REASON)
    clock.tick(3600)
    refused = j.begin(AGENT, "2.0.0", "1.5.0", state="refused", install="pyz",
                      reason="a downgrade (2.0.0 -> 1.5.0) needs allow_downgrade")
    clock.tick(3600)
    flying = j.begin(AGENT, "2.0.0", "3.1.0", kind="pyz", install="pyz", manager="systemd")
    through(j, flying, "verifying", "backing_up", "handed_over")
    j.set(flying, guard_pid=sleeper.pid, guard_start=proc_start_ticks(sleeper.pid))
    j.move(flying, "switching")
    j.move(flying, "trial", trial_deadline=clock.t + 300)
    j.close()
    return {"succeeded": ok, "failed": failed, "rolled_back": rolled, "refused": refused,
            "trial": flying}


def test_history_table_row_by_row(fx, wd, sleeper):
    ids = busy_journal(wd, sleeper)
    r = run(fx, wd, "update")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert cells(lines[0]) == ["ID", "STARTED", "COMPONENT", "VERSIONS", "INSTALL", "RESULT",
                               "REASON"]
    rows = {int(cells(line)[0]): cells(line) for line in lines[1:6]}
    assert rows[ids["succeeded"]] == [str(ids["succeeded"]), "2024-05-01 12:00:00", AGENT,
                                      "1.0.0 -> 2.0.0", "pyz", "succeeded",
                                      "healthy for the whole trial"]
    assert rows[ids["failed"]] == [str(ids["failed"]), "2024-05-01 13:06:00", AGENT,
                                   "2.0.0 -> 2.1.0", "pyz", "failed",
                                   "download failed: http://10.0.0.9/a.pyz: HTTP 404"]
    rolled = rows[ids["rolled_back"]]
    assert rolled[:6] == [str(ids["rolled_back"]), "2024-05-01 14:06:00", AGENT,
                          "2.0.0 -> 3.0.0", "pyz", "rolled_back"]
    # The reason is the last column, cut to 100 characters (on one line).
    folded = " ".join(LONG_REASON.split())
    assert len(folded) > 100 and rolled[6] == folded[:97] + "..." and len(rolled[6]) == 100
    assert rows[ids["refused"]][5:] == ["refused",
                                        "a downgrade (2.0.0 -> 1.5.0) needs allow_downgrade"]
    assert rows[ids["trial"]][5:] == ["trial", "-"]
    assert lines[6] == "not retried: elkeid-agent 3.0.0 since 2024-05-01 14:11:00: " + LONG_REASON
    assert "elkeidctl update --clear" in lines[7]
    assert lines[8] == ("in progress: update %d, elkeid-agent 2.0.0 -> 3.1.0: trial (guard pid "
                        "%d), trial until 2024-05-01 16:16:00" % (ids["trial"], sleeper.pid))
    assert len(lines) == 9
    assert r.err == ""


def test_history_json_field_by_field(fx, wd, sleeper):
    ids = busy_journal(wd, sleeper)
    r = run(fx, wd, "update", "--json")
    assert r.code == 0, r
    facts = json.loads(r.out)
    assert sorted(facts) == ["in_flight", "rejected", "updates"]
    by_id = {u["id"]: u for u in facts["updates"]}
    assert [u["id"] for u in facts["updates"]] == sorted(ids.values())
    ok = by_id[ids["succeeded"]]
    assert (ok["component"], ok["from_version"], ok["to_version"], ok["install"],
            ok["manager"], ok["state"], ok["reason"]) == (
        AGENT, "1.0.0", "2.0.0", "pyz", "systemd", "succeeded", "healthy for the whole trial")
    assert ok["started"] == T0 and ok["finished"] == T0 + 360
    assert ok["backup"].endswith("elkeid-agent_1.0.0_20240501120000_1.bak")
    assert ok["context"]["target"] == str(wd / "elkeid-agent")
    assert [e["state"] for e in ok["events"]] == ["downloading", "verifying", "backing_up",
                                                  "handed_over", "switching", "trial",
                                                  "succeeded"]
    assert ok["events"][-1] == {"at": T0 + 360, "state": "succeeded",
                                "note": "healthy for the whole trial"}
    rolled = by_id[ids["rolled_back"]]
    assert rolled["reason"] == LONG_REASON  # never cut in JSON
    assert [e["state"] for e in rolled["events"]][-2:] == ["rolling_back", "rolled_back"]
    assert by_id[ids["refused"]]["events"] == [
        {"at": by_id[ids["refused"]]["started"], "state": "refused",
         "note": "a downgrade (2.0.0 -> 1.5.0) needs allow_downgrade"}]
    assert facts["rejected"] == [{"component": AGENT, "version": "3.0.0", "sha256": "cd" * 32,
                                  "reason": LONG_REASON, "at": T0 + 7200 + 660}]
    [flying] = facts["in_flight"]
    assert (flying["id"], flying["state"], flying["guard_pid"], flying["guard_alive"],
            flying["trial_deadline"]) == (ids["trial"], "trial", sleeper.pid, True,
                                          T0 + 4 * 3600 + 660 + 300)


def test_history_limit_shows_the_newest(fx, wd, sleeper):
    ids = busy_journal(wd, sleeper)
    r = run(fx, wd, "update", "--limit", "2")
    assert r.code == 0, r
    shown = [int(cells(line)[0]) for line in r.out.splitlines()[1:3]]
    assert shown == [ids["refused"], ids["trial"]]
    assert r.out.splitlines()[3].startswith("not retried: elkeid-agent 3.0.0")
    assert [u["id"] for u in json.loads(run(fx, wd, "update", "--json", "--limit", "1").out)
            ["updates"]] == [ids["trial"]]


def test_an_in_flight_update_whose_guard_is_gone(fx, wd):
    j = journal(wd)
    uid = j.begin(AGENT, "2.0.0", "3.1.0", install="pyz", manager="systemd")
    through(j, uid, "verifying", "backing_up", "handed_over")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    j.set(uid, guard_pid=gone.pid, guard_start=12345)
    j.move(uid, "switching")
    r = run(fx, wd, "update")
    assert r.code == 0, r
    assert r.out.splitlines()[-1] == ("in progress: update %d, elkeid-agent 2.0.0 -> 3.1.0: "
                                      "switching (its guard is not running)" % uid)
    assert json.loads(run(fx, wd, "update", "--json").out)["in_flight"][0]["guard_alive"] \
        is False


def test_no_journal_yet(fx, wd):
    r = run(fx, wd, "update")
    assert (r.code, r.out, r.err) == (0, "no updates recorded\n", "")
    r = run(fx, wd, "update", "--json")
    assert r.code == 0 and json.loads(r.out) == {"updates": [], "rejected": [], "in_flight": []}
    assert not (wd / "update").exists()  # looking creates nothing


def test_an_empty_journal(fx, wd):
    journal(wd).close()
    r = run(fx, wd, "update")
    assert (r.code, r.out) == (0, "no updates recorded\n")


def test_a_corrupt_journal_is_one_line(fx, wd):
    (wd / "update").mkdir()
    (wd / "update" / "journal.db").write_bytes(b"this is no SQLite database\n" * 100)
    for argv in (["update"], ["update", "--json"], ["rollback"]):
        r = run(fx, wd, *argv)
        assert r.code == 1, r
        assert r.out == "" and len(r.err.splitlines()) == 1
        assert r.err.startswith("elkeidctl: update journal %s: " % (wd / "update" / "journal.db"))
        assert "Traceback" not in r.err


def test_a_row_with_a_broken_context_is_one_line(fx, wd):
    j = journal(wd)
    j.begin(AGENT, "1.0.0", "2.0.0", state="refused", reason="x")
    j.close()
    db = sqlite3.connect(str(wd / "update" / "journal.db"))
    db.execute("UPDATE updates SET context='{not json'")
    db.commit()
    db.close()
    r = run(fx, wd, "update")
    assert r.code == 1 and len(r.err.splitlines()) == 1 and "update journal" in r.err, r


def _python_for_nobody():
    """An interpreter uid 65534 may run (the test's own may sit in root's
    home); elkeidctl needs only the standard library of 3.9+."""
    for py in (sys.executable, "/usr/bin/python3"):
        try:
            p = subprocess.run([py, "-c", "import sys; assert sys.version_info >= (3, 9)"],
                               user=65534, group=65534, extra_groups=[], timeout=60,
                               capture_output=True)
        except OSError:
            continue
        if p.returncode == 0:
            return py
    pytest.skip("no Python 3.9+ that uid 65534 may run")


def test_another_user_reads_a_journal_it_may_read_and_is_told_when_it_may_not(tmp_path):
    """A real elkeidctl process as uid 65534: a world-readable journal is
    read without writing it; one in a 0700 directory is one line, not
    "no updates recorded"."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run elkeidctl as another user")
    import shutil
    import tempfile
    from elkeid_devtools.launchers import _env
    py = _python_for_nobody()
    base = tempfile.mkdtemp(prefix="elkeid-ctl-update-")  # tmp_path is root's only
    try:
        os.chmod(base, 0o755)
        j = journal(base)
        j.begin(AGENT, "1.0.0", "2.0.0", state="refused", reason="offer without a sha256")
        j.close()
        db = os.path.join(base, "update", "journal.db")
        os.chmod(os.path.dirname(db), 0o755)
        os.chmod(db, 0o644)
        before = os.stat(db)

        def as_nobody(*argv):
            p = subprocess.run([py, "-m", "elkeid_agent", "ctl", "--workdir", base] + list(argv),
                               env=_env(), capture_output=True, text=True, timeout=120,
                               user=65534, group=65534, extra_groups=[])
            return p.returncode, p.stdout, p.stderr

        code, out, err = as_nobody("update")
        assert code == 0, err
        assert cells(out.splitlines()[1])[3:] == ["1.0.0 -> 2.0.0", "-", "refused",
                                                  "offer without a sha256"]
        assert os.stat(db).st_mtime_ns == before.st_mtime_ns
        assert sorted(os.listdir(os.path.dirname(db))) == ["journal.db"]
        code, out, err = as_nobody("update", "--clear")
        assert code == layout.EXIT_PRIVILEGE and "must be run as root" in err

        os.chmod(os.path.dirname(db), 0o700)
        code, out, err = as_nobody("update")
        assert code == 1 and out == "", (code, out, err)
        assert err.splitlines() == ["elkeidctl: update journal %s: Permission denied (%s) (run "
                                    "elkeidctl as root)" % (db, db)]
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- update --clear

def test_clear_forgets_the_rejected_versions(fx, wd, sleeper):
    busy_journal(wd, sleeper)
    j = journal(wd, Clock(T0 + 86400))
    j.reject("elkeid-service-demo", "0.9", "", "trial failed")
    j.close()
    r = run(fx, wd, "update", "--clear")
    assert r.code == 0, r
    assert r.out == ("cleared 2 rejected version(s) (elkeid-agent 3.0.0, elkeid-service-demo "
                     "0.9): the server's next offer of them is tried again\n")
    j = journal(wd)
    assert j.all_rejected() == [] and j.rejected(AGENT, "3.0.0") is None
    assert len(j.history()) == 5  # the history itself stays
    r = run(fx, wd, "update", "--clear")
    assert (r.code, r.out) == (0, "no rejected versions to clear\n")
    assert "not retried" not in run(fx, wd, "update").out


def test_clear_needs_root(fx, wd, sleeper):
    busy_journal(wd, sleeper)
    fx.euid = 1000
    r = run(fx, wd, "update", "--clear")
    assert r.code == layout.EXIT_PRIVILEGE, r
    assert "'update --clear' must be run as root (try: sudo elkeidctl update --clear)" in r.err
    assert [x["version"] for x in journal(wd).all_rejected()] == ["3.0.0"]
    # Reading needs no root (only the right to read the file).
    assert run(fx, wd, "update").code == 0


def test_clear_without_a_journal(fx, wd):
    r = run(fx, wd, "update", "--clear")
    assert (r.code, r.out) == (0, "no rejected versions to clear\n")
    assert not (wd / "update").exists()


@pytest.mark.parametrize("argv, needle", [
    (["update", "--clear", "--json"], "update --clear takes neither --json nor --limit"),
    (["update", "--clear", "--limit", "3"], "update --clear takes neither --json nor --limit"),
    (["update", "--limit", "0"], "needs a whole number of 1 or more, got '0'"),
    (["update", "--limit", "x"], "needs a whole number of 1 or more, got 'x'"),
    (["rollback", "--force"], "unrecognized arguments: --force"),
])
def test_usage_errors(fx, wd, argv, needle):
    r = run(fx, wd, *argv)
    assert r.code == layout.EXIT_USAGE and needle in r.err, r
    assert fx.calls == [] and not (wd / "update").exists()


# ---------------------------------------------------------------- rollback: refusals

def refused(fx, wd, needle, install=None):
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 1, r
    assert len(r.err.splitlines()) == 1 and needle in r.err, r
    assert fx.commands() == []
    return r


def test_rollback_without_any_journal(fx, wd):
    refused(fx, wd, "nothing to roll back: no update is recorded in %s" % (wd / "update"))
    assert not (wd / "update").exists()


def test_rollback_without_a_successful_update(fx, wd):
    j = journal(wd)
    uid = j.begin(AGENT, "1.0.0", "2.0.0", install="pyz")
    j.move(uid, "failed", "download failed")
    j.close()
    refused(fx, wd, "no successful update of elkeid-agent is recorded")
    assert len(journal(wd).history()) == 1


def test_rollback_when_the_backup_is_gone(fx, wd, updated):
    os.unlink(updated.backup)
    refused(fx, wd, "cannot roll back update %d (1.0.0 -> 2.0.0): its backup %s is gone"
            % (updated.uid, updated.backup))
    assert updated.installed() == updated.new and len(updated.j.history()) == 1


def test_rollback_when_the_backup_is_no_zipapp(fx, wd, updated):
    with open(updated.backup, "wb") as f:
        f.write(b"#!/bin/sh\necho not a zipapp\n")
    refused(fx, wd, "its backup %s is not an elkeid-agent zipapp" % updated.backup)
    assert updated.installed() == updated.new
    # A zip that is some other program's is no elkeid-agent either.
    with zipfile.ZipFile(updated.backup, "w") as zf:
        zf.writestr("elkeid_zipapp.json", json.dumps({"name": "other", "version": "1.0.0"}))
    refused(fx, wd, "is not an elkeid-agent zipapp")


def test_rollback_while_an_update_runs(fx, wd, updated, sleeper):
    j = updated.j
    flying = j.begin(AGENT, "2.0.0", "3.0.0", install="pyz", manager="systemd")
    through(j, flying, "verifying", "backing_up", "handed_over")
    j.set(flying, guard_pid=sleeper.pid, guard_start=proc_start_ticks(sleeper.pid))
    through(j, flying, "switching", "trial", trial_deadline=T0 + 7200)
    refused(fx, wd, "update %d to 3.0.0 is in progress (trial, guard pid %d, trial until "
            "2024-05-01 14:00:00): wait until it ends" % (flying, sleeper.pid))
    assert updated.installed() == updated.new
    assert len(j.history()) == 2 and j.get(flying).state == "trial"


def test_rollback_while_an_update_has_lost_its_guard(fx, wd, updated):
    j = updated.j
    stuck = j.begin(AGENT, "2.0.0", "3.0.0", install="pyz", manager="systemd")
    through(j, stuck, "verifying", "backing_up", "handed_over", "switching")
    refused(fx, wd, "update %d to 3.0.0 stopped during switching and its guard is not running: "
            "restart the agent ('elkeidctl restart')" % stuck)
    assert j.get(stuck).state == "switching"


def test_rollback_when_already_at_the_previous_version(fx, wd, updated):
    zipapp(updated.target, "1.0.0")
    refused(fx, wd, "elkeid-agent 1.0.0, the version before update %d, is already installed at "
            "%s: nothing to roll back" % (updated.uid, updated.target))


@pytest.mark.parametrize("problem", ["not root", "no service_type"])
def test_rollback_refused_before_anything_changes(fx, wd, updated, problem):
    if problem == "not root":
        fx.euid = 1000
        code, needle = layout.EXIT_PRIVILEGE, "sudo elkeidctl rollback"
    else:
        fx.write(str(wd / "specified_env"), "SPECIFIED_AGENT_ID=x\n", 0o600)
        code, needle = layout.EXIT_NOT_CONFIGURED, "service_type is not set"
    r = run(fx, wd, "rollback", "--yes")
    assert r.code == code and needle in r.err, r
    assert updated.installed() == updated.new and len(updated.j.history()) == 1


def test_rollback_without_yes_says_what_it_would_do(fx, wd, updated):
    r = run(fx, wd, "rollback")
    assert r.code == 1, r
    assert r.out.splitlines() == [
        "roll back elkeid-agent 2.0.0 -> 1.0.0 by hand:",
        "  restore %s from %s (the backup update %d made)"
        % (updated.target, updated.backup, updated.uid),
        "  restart the agent (systemctl restart elkeid-agent)",
        "  not retry 2.0.0 when the server offers it again (until 'elkeidctl update --clear')"]
    assert r.err == "elkeidctl: nothing done: rerun with --yes to roll back\n"
    assert updated.installed() == updated.new
    j = updated.j
    assert len(j.history()) == 1 and j.all_rejected() == [] and fx.commands() == []


# ---------------------------------------------------------------- rollback: done

def test_rollback_of_a_one_file_install(fx, wd, install, updated):
    j, uid, target, backup, old, new = (updated.j, updated.uid, updated.target, updated.backup,
                                        updated.old, updated.new)
    assert old != new
    before = os.stat(target)
    reader = open(target, "rb")  # a process that has the installed file open
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 0, r
    # Swapped by one rename: the new file is another inode with the old
    # bytes and the target's mode; whoever had the old one open still reads it.
    after = os.stat(target)
    assert updated.installed() == old
    assert after.st_ino != before.st_ino and (after.st_mode & 0o7777) == 0o700
    assert reader.read() == new
    reader.close()
    assert sorted(os.listdir(str(wd))) == ["elkeid-agent", "update"]  # nothing staged left
    with open(backup, "rb") as f:
        assert f.read() == old  # the backup stays for another time
    assert install.ran == []  # a one-file install has no package to reinstall

    [manual] = [row for row in j.history() if row.id != uid]
    assert (manual.component, manual.from_version, manual.to_version, manual.state) == (
        AGENT, "2.0.0", "1.0.0", "rolled_back")
    assert manual.context == {"manual": True, "target": target, "rolled_back_update": uid}
    assert manual.reason == "rolled back by hand with elkeidctl rollback"
    assert (manual.backup, manual.install, manual.manager) == (backup, "pyz", "systemd")
    assert [e["state"] for e in j.events(manual.id)] == ["rolling_back", "rolled_back"]
    assert j.in_flight() == []
    assert j.rejected(AGENT, "2.0.0")["reason"] == "rolled back by hand with elkeidctl rollback"
    assert j.rejected(AGENT, "2.0.0")["sha256"] == "ab" * 32
    # The restart went through the service seam, as 'elkeidctl restart' does.
    assert fx.commands() == [["systemctl", "restart", "elkeid-agent"]]
    assert "2.0.0 is not retried when the server offers it again; 'elkeidctl update --clear' " \
           "undoes that" in r.out
    assert r.out.splitlines()[-1] == "restarted the agent"
    # What the restored agent reports to the server says it was by hand.
    assert summary(manual) == ("elkeid-agent 2.0.0 -> 1.0.0: rolled back by hand with "
                               "elkeidctl rollback")

    # The history shows it; a second rollback has nothing left to do.
    hist = run(fx, wd, "update")
    [row] = [cells(line) for line in hist.out.splitlines()
             if cells(line)[0] == str(manual.id)]
    assert row[3:] == ["2.0.0 -> 1.0.0", "pyz", "rolled_back",
                       "rolled back by hand with elkeidctl rollback"]
    assert re.search(r"^not retried: elkeid-agent 2\.0\.0 since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: "
                     r"rolled back by hand with elkeidctl rollback$", hist.out, re.M)
    again = run(fx, wd, "rollback", "--yes", install=install)
    assert again.code == 1 and "already installed" in again.err, again
    # --clear undoes the refusal, not the rollback.
    assert run(fx, wd, "update", "--clear").code == 0
    assert j.rejected(AGENT, "2.0.0") is None and updated.installed() == old


def test_rollback_ends_an_update_that_had_not_switched_yet(fx, wd, install, updated):
    j = updated.j
    downloading = j.begin(AGENT, "2.0.0", "2.2.0", install="pyz", manager="systemd")
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 0, r
    assert "  end update %d to 2.2.0 (downloading; nothing of it is installed yet)" \
        % downloading in r.out.splitlines()
    assert j.get(downloading).state == "interrupted"
    assert j.get(downloading).reason == "ended by 'elkeidctl rollback'"
    assert updated.installed() == updated.old


def test_rollback_of_a_deb_install_reinstalls_the_kept_package(fx, wd, install, clock):
    kept = wd / "update" / "backup" / "elkeid-agent_1.0.0.deb"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"!<arch>\n")
    updated = succeeded_update(journal(wd, clock), wd, clock, install="deb",
                               backup_package=str(kept))
    plan = run(fx, wd, "rollback")
    assert "  reinstall the 1.0.0 package %s" % kept in plan.out.splitlines()
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 0, r
    assert updated.installed() == updated.old
    assert install.ran == [["dpkg", "--force-confold", "-i", str(kept)]]
    assert r.err == ""
    assert updated.j.history()[-1].reason == "rolled back by hand with elkeidctl rollback"


def test_rollback_of_an_rpm_install_without_the_package_file_says_so(fx, wd, install, clock):
    updated = succeeded_update(journal(wd, clock), wd, clock, install="rpm")
    install.answers["rpm"] = (0, "2.0.0")
    plan = run(fx, wd, "rollback")
    assert ("  leave the rpm package database as it is (it keeps recording 2.0.0: the 1.0.0 "
            "package file was not kept)") in plan.out.splitlines()
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 0, r
    assert updated.installed() == updated.old
    assert install.ran == [["rpm", "-q", "--qf", "%{VERSION}", "elkeid-agent"]]
    note = ("the package database says 2.0.0 while the files are 1.0.0 again: the 1.0.0 "
            "package file is not at hand")
    assert r.err == "elkeidctl: warning: %s\n" % note
    row = updated.j.history()[-1]
    assert (row.state, row.reason) == ("rolled_back", "rolled back by hand with elkeidctl "
                                                      "rollback; " + note)
    assert fx.commands() == [["systemctl", "restart", "elkeid-agent"]]


def test_rollback_that_cannot_write_the_target_changes_nothing(fx, wd, install, updated):
    j, uid = updated.j, updated.uid
    elsewhere = str(wd / "gone" / "elkeid-agent")  # its directory does not exist
    j.set(uid, context=dict(j.get(uid).context, target=elsewhere))
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 1, r
    assert r.err.startswith("elkeidctl: rollback failed, %s is unchanged: restoring %s from %s "
                            "failed: " % (elsewhere, elsewhere, updated.backup))
    assert len(r.err.splitlines()) == 1
    assert "(%s is not a readable elkeid-agent zipapp; taking it to be 2.0.0, what update %d " \
           "installed)" % (elsewhere, uid) in r.out
    failed = j.history()[-1]
    assert failed.state == "rollback_failed" and failed.context["manual"] is True
    assert failed.reason.startswith("rollback by hand with elkeidctl rollback failed: restoring")
    assert j.all_rejected() == [] and fx.commands() == []
    assert not os.path.exists(str(wd / "gone"))


def test_rollback_whose_restart_fails(fx, wd, install, updated):
    fx.results[("systemctl", "restart")] = Completed(1, "Job for elkeid-agent.service failed.")
    r = run(fx, wd, "rollback", "--yes", install=install)
    assert r.code == 1, r
    assert r.err == ("elkeidctl: elkeid-agent 1.0.0 is restored, but restarting the agent "
                     "failed: systemctl restart elkeid-agent failed with status 1: Job for "
                     "elkeid-agent.service failed.\n")
    assert updated.installed() == updated.old
    row = updated.j.history()[-1]
    assert row.state == "rolled_back"
    assert row.reason == ("rolled back by hand with elkeidctl rollback; restarting the agent "
                          "failed: systemctl restart elkeid-agent failed with status 1: Job for "
                          "elkeid-agent.service failed.")
    assert updated.j.rejected(AGENT, "2.0.0") is not None
