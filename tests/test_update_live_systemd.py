"""Self-update of a .deb install under a live systemd (tests/nspawn.py):
the agent's unit has ``KillMode=control-group`` and ``Restart=always``, so
the guard must run outside the agent's cgroup (its own transient unit) to
survive the restart it causes.

One container, one history: v1 installed with dpkg; v2 offered and
applied (dpkg -i, systemctl restart, trial, success; the v2 package kept
for later rollbacks); a v3 that crashes at import rolled back to v2 with
the package database agreeing; a v4 package whose post-install fails
rolled back the same way, after v3 offered again was not retried.
"""

import hashlib
import json
import os
import subprocess
import time

import pytest

from debroot import debian_arch
from elkeid_devtools.launchers import FileServer
from harness import DevCenterProc, wait_until
from nspawn import AGENT_ID, CTL, container, install, wait_active  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
TRIAL = 20


def _failing_postinst(deb, out, tmp):
    """A copy of ``deb`` whose post-install exits 1 after dpkg unpacked it."""
    tree = os.path.join(tmp, "deb-tree")
    subprocess.run(["dpkg-deb", "-R", deb, tree], check=True)
    with open(os.path.join(tree, "DEBIAN", "postinst"), "w") as f:
        f.write("#!/bin/sh\necho 'elkeid-agent: post-install failed: test package' >&2\nexit 1\n")
    os.chmod(os.path.join(tree, "DEBIAN", "postinst"), 0o755)
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", tree, out], check=True, stdout=subprocess.PIPE)
    return out


def test_deb_updates_under_a_live_systemd(container, builds, tmp_path):  # noqa: F811
    c = container
    arch = debian_arch()
    b = str(tmp_path / "builds")
    debs = {v: builds.make_deb(b, builds.make_pyz(b, v, fault=f), v, arch)
            for v, f in (("1.0.0", None), ("2.0.0", None), ("3.0.0", "import"),
                         ("4.0.0", None))}
    debs["4.0.0"] = _failing_postinst(debs["4.0.0"], os.path.join(b, "v4-bad.deb"), b)
    dc = DevCenterProc(tmp_path / "devcenter")
    files = FileServer()
    try:
        rc, out, err = install(c, dc, debs["1.0.0"])
        assert rc == 0, out + err
        with open(c.path("/etc/elkeid/services.yaml"), "w") as f:
            f.write("update:\n  verify_timeout: %ds\n" % TRIAL)
        assert c.run(CTL, "restart")[0] == 0
        pid1 = wait_active(c)
        dc.wait_agent(AGENT_ID, timeout=60)

        def beats(version, after=0):
            return [r for r in dc.records(1000, AGENT_ID, after=after) if r["version"] == version]

        def last():
            recs = dc.records(None, AGENT_ID, limit=1, newest=True)
            return recs[-1]["id"] if recs else 0

        def offer(version, path):
            data = open(path, "rb").read()
            url = files.add("/%s-%d.deb" % (version, time.monotonic_ns()), data)
            status, body = dc.command(AGENT_ID, {"config": [{
                "name": "elkeid-agent", "type": "deb", "version": version,
                "sha256": hashlib.sha256(data).hexdigest(), "signature": "",
                "download_url": [url], "detail": ""}]})
            assert status == 200, body
            return url

        def report(after, timeout=TRIAL + 120):
            return wait_until(lambda: [r["fields"] for r in dc.records(5100, AGENT_ID, after=after)
                                       if r["fields"].get("kind") == "update"],
                              timeout, 0.5, "an update report")[-1]

        def dpkg_version():
            return c.run("dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}",
                         "elkeid-agent")[1].strip()

        def file_version():
            return c.run("/etc/elkeid/elkeid-agent", "--version")[1].split()[-1]

        wait_until(lambda: beats("1.0.0"), 60, 0.5, "a v1 heartbeat")

        # ---- v1 -> v2: dpkg -i, restarted by the guard from its own unit
        mark = last()
        t0 = time.monotonic()
        offer("2.0.0", debs["2.0.0"])
        wait_until(lambda: beats("2.0.0", mark), 120, 0.5, "a v2 heartbeat")
        first = time.monotonic() - t0
        r = report(mark)
        healthy = time.monotonic() - t0
        assert r["result"] == "succeeded", r
        assert dpkg_version() == "3:2.0.0-1 ii", dpkg_version()
        assert file_version() == "2.0.0"
        pid2 = wait_active(c, not_pid=pid1)
        assert beats("2.0.0", mark)[-1]["fields"]["pid"] == str(pid2)
        kept = c.path("/etc/elkeid/update/backup/elkeid-agent_2.0.0.deb")
        assert os.path.isfile(kept), os.listdir(os.path.dirname(kept))
        guard_log = open(c.path("/etc/elkeid/log/update-guard.log")).read()
        assert "succeeded" in guard_log, guard_log
        print("deb v1 -> v2: first v2 heartbeat %.1f s, trial passed %.1f s after the offer "
              "(trial %d s)" % (first, healthy, TRIAL))

        # ---- v3 crashes at import: the start fails, v2 files and package back
        mark = last()
        t0 = time.monotonic()
        offer("3.0.0", debs["3.0.0"])
        r = report(mark)
        restored = time.monotonic() - t0
        assert r["result"] == "rolled_back" and "did not start" in r["reason"], r
        assert (r["old_version"], r["new_version"]) == ("2.0.0", "3.0.0")
        assert dpkg_version() == "3:2.0.0-1 ii", "the package database agrees with the files"
        assert file_version() == "2.0.0"
        pid3 = wait_active(c, not_pid=pid2)
        wait_until(lambda: [x for x in beats("2.0.0", mark) if x["fields"]["pid"] == str(pid3)],
                   60, 0.5, "a heartbeat from the restored v2")
        print("deb v3 (crashes at import): offer -> v2 restored and reported %.1f s" % restored)

        # ---- v3 offered again: not downloaded, not tried
        hits = len(files.hits)
        mark = last()
        offer("3.0.0", debs["3.0.0"])
        wait_until(lambda: [x for x in beats("2.0.0", mark)
                            if "not retried" in x["fields"]["state_detail"]],
                   60, 0.5, "the refusal in a heartbeat")
        assert len(files.hits) == hits
        # ---- v4's post-install fails: dpkg leaves it half-configured; rolled back
        mark = last()
        offer("4.0.0", debs["4.0.0"])
        r = report(mark)
        assert r["result"] == "rolled_back" and "install failed" in r["reason"], r
        assert dpkg_version() == "3:2.0.0-1 ii", dpkg_version()
        assert file_version() == "2.0.0"
        mark = last()
        wait_until(lambda: beats("2.0.0", mark), 60, 0.5, "v2 heartbeats go on")

        rc, out, err = c.run(CTL, "update", "--json")
        hist = json.loads(out)
        assert [u["state"] for u in hist["updates"]] == ["succeeded", "rolled_back", "rolled_back"]
        # Offering 4.0.0 lifted 3.0.0's rejection (the server moved on).
        assert [x["version"] for x in hist["rejected"]] == ["4.0.0"]
        assert c.show("ActiveState")["ActiveState"] == "active"
    except BaseException:
        for path in ("/etc/elkeid/log/update-guard.log", "/etc/elkeid/log/elkeid-agent.log"):
            try:
                print("---- %s\n%s" % (path, open(c.path(path)).read()[-6000:]))
            except OSError as e:
                print("---- %s: %s" % (path, e))
        print("---- journal\n" + c.run("journalctl", "--no-pager", "-n", "80")[1])
        raise
    finally:
        files.close()
        dc.stop()
