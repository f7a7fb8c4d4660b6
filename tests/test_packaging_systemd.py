"""The .deb under a live systemd: a Debian bookworm root booted with systemd
as PID 1 in a systemd-nspawn container.

The container shares this machine's network namespace, so the agent it
runs reaches a development AgentCenter on 127.0.0.1. In it: ``dpkg -i``
(post-install picks systemd mode, enables and starts the unit, which goes
active once the agent sends READY=1), the unit's MemoryMax/CPUQuota read
back from the agent's cgroup, the watchdog killing a SIGSTOPped agent and
systemd starting a new one, elkeidctl status/restart/stop/check/start in
systemd mode, and ``dpkg --purge`` leaving nothing behind.

The container and its helpers: tests/nspawn.py. Without root,
systemd-nspawn or a container that boots, this skips; in CI (CI=true) it
fails instead.
"""

import json
import os
import shutil
import time

import pytest

from debroot import debian_arch
from harness import DevCenterProc, wait_until
from nspawn import (AGENT_ID, CTL, DEB, UNIT, container,  # noqa: F401  (fixture)
                    heartbeat_from, install, last_beat, wait_active)
from test_packaging import packages  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

def test_deb_under_a_live_systemd(container, packages, tmp_path):  # noqa: F811
    c = container
    dc = DevCenterProc(tmp_path / "devcenter")
    try:
        before = c.tree()
        # ---- install: post-install picks systemd, enables and starts the unit
        rc, out, err = install(c, dc, packages[debian_arch(), "deb"])
        print("dpkg -i said:\n" + out + err)
        assert rc == 0, out + err
        assert "elkeid-agent:" not in err and "warning" not in err.lower(), err
        with open(c.path("/etc/elkeid/specified_env")) as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line)
        assert env["service_type"] == "systemd" and env["SPECIFIED_AGENT_ID"] == AGENT_ID
        assert env["ELKEID_SERVER"] == dc.grpc and env["specified_idc"] == "nspawn"
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "enabled"
        assert c.run("systemctl", "is-active", UNIT)[1].strip() == "active"
        p = c.show("Type", "NotifyAccess", "StatusText", "MainPID", "WatchdogUSec",
                   "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        assert (p["Type"], p["NotifyAccess"], p["WatchdogUSec"]) == ("notify", "main", "3min")
        first_pid = int(p["MainPID"])
        # READY=1 arrived: a notify unit goes active only then, which is
        # after its main process started; the STATUS= line came with it.
        assert int(p["ActiveEnterTimestampMonotonic"]) > int(p["ExecMainStartTimestampMonotonic"])
        assert p["StatusText"], p

        # ---- the agent connected and its heartbeat is stored
        assert dc.wait_agent(AGENT_ID, timeout=60)["agent_id"] == AGENT_ID
        beat = heartbeat_from(dc, first_pid, since=0)[0]
        assert beat["fields"]["idc"] == "nspawn"
        wait_until(lambda: c.show("StatusText")["StatusText"].startswith("connected to "),
                   30, 0.2, "StatusText to say the agent is connected")
        assert dc.grpc in c.show("StatusText")["StatusText"]
        # One process, started with the zipapp's default Python; no
        # notification was refused (NotifyAccess=main: a forking wrapper
        # would have its READY=1 dropped).
        assert c.agent_processes() and len(c.agent_processes()) == 1
        assert "reception only permitted for main PID" not in c.journal()

        # ---- limits: MemoryMax=250M and CPUQuota=10% in the agent's cgroup
        cg = c.show("ControlGroup")["ControlGroup"]
        assert cg == "/system.slice/elkeid-agent.service"
        v1 = c.run("test", "-d", "/sys/fs/cgroup/memory")[0] == 0
        if v1:
            assert int(c.read("/sys/fs/cgroup/memory%s/memory.limit_in_bytes" % cg)) == 250 << 20
            quota = int(c.read("/sys/fs/cgroup/cpu%s/cpu.cfs_quota_us" % cg))
            period = int(c.read("/sys/fs/cgroup/cpu%s/cpu.cfs_period_us" % cg))
            assert quota * 10 == period, (quota, period)
            for ctrl in ("memory", "cpu"):
                procs = c.read("/sys/fs/cgroup/%s%s/cgroup.procs" % (ctrl, cg)).split()
                assert str(first_pid) in procs, (ctrl, procs)
        else:  # cgroup v2
            assert int(c.read("/sys/fs/cgroup%s/memory.max" % cg)) == 250 << 20
            quota, period = c.read("/sys/fs/cgroup%s/cpu.max" % cg).split()
            assert int(quota) * 10 == int(period)
            assert str(first_pid) in c.read("/sys/fs/cgroup%s/cgroup.procs" % cg).split()
        rc, out, err = c.run(CTL, "cgroup", "--json")
        facts = json.loads(out)
        assert rc == 0 and facts["ControlGroup"] == cg and facts["MemoryMax"] == "262144000"
        assert facts["CPUQuotaPerSecUSec"] == "100ms"

        # ---- upgrade (the same package again) with the agent running: the
        # post-install enables, reloads and cleans up, and leaves the agent
        # alone, files in its tmp/ included (here: the debug endpoint's address)
        c.sh("kill -USR1 %d" % first_pid)
        addr = "/etc/elkeid/tmp/debug.addr"
        wait_until(lambda: os.path.exists(c.path(addr)), 20, 0.1, "the debug endpoint")
        rc, out, err = c.run("dpkg", "-i", DEB,
                             env={"DEBIAN_FRONTEND": "noninteractive"})
        assert rc == 0 and "elkeid-agent:" not in err, out + err
        assert "over (3:" in out  # dpkg took it as an upgrade
        assert c.show("MainPID", "ActiveState") == {"MainPID": str(first_pid),
                                                     "ActiveState": "active"}
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "enabled"
        assert os.path.exists(c.path(addr)), "cleanup removed a running agent's tmp/"
        c.sh("kill -USR1 %d" % first_pid)
        wait_until(lambda: not os.path.exists(c.path(addr)), 20, 0.1, "the debug endpoint to close")

        # ---- elkeidctl in systemd mode
        rc, out, err = c.run(CTL, "status")
        assert rc == 0 and "active (running) (pid %d" % first_pid in out, out + err
        assert "service type  systemd" in out
        rc, out, err = c.run(CTL, "status", "--json")
        info = json.loads(out)
        assert rc == 0, out + err
        assert (info["state"], info["pid"], info["running"], info["enabled"]) == \
            ("active (running)", first_pid, True, True)
        assert info["service_type"] == "systemd" and info["agent_id"] == AGENT_ID
        assert info["processes"] == [first_pid] and info["idc"] == "nspawn"
        assert c.run(CTL, "check") == (0, "", "")  # systemd supervises: nothing to do

        since = last_beat(dc)
        rc, out, err = c.run(CTL, "restart")
        assert rc == 0, out + err
        second_pid = wait_active(c, not_pid=first_pid)
        heartbeat_from(dc, second_pid, since)
        assert json.loads(c.run(CTL, "status", "--json")[1])["pid"] == second_pid

        # disable: not started at boot, still a unit systemd knows (its
        # watchdog and notifications work, restart works); enable again
        rc, out, err = c.run(CTL, "disable")
        assert rc == 0, out + err
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "linked"
        info = json.loads(c.run(CTL, "status", "--json")[1])
        assert (info["state"], info["pid"], info["enabled"]) == \
            ("active (running)", second_pid, False), info
        assert c.show("LoadState", "NotifyAccess") == {"LoadState": "loaded",
                                                        "NotifyAccess": "main"}
        rc, out, err = c.run(CTL, "restart")
        assert rc == 0, out + err
        second_pid = wait_active(c, not_pid=second_pid)
        rc, out, err = c.run(CTL, "enable")
        assert rc == 0, out + err
        assert c.run("systemctl", "is-enabled", UNIT)[1].strip() == "enabled"
        assert json.loads(c.run(CTL, "status", "--json")[1])["enabled"] is True

        rc, out, err = c.run(CTL, "stop")
        assert rc == 0, out + err
        assert c.run("systemctl", "is-active", UNIT)[1].strip() == "inactive"
        rc, out, err = c.run(CTL, "status", "--json")
        assert rc == 3 and json.loads(out)["state"] == "inactive (dead)", out + err
        assert c.agent_processes() == []
        # check leaves a stopped unit alone in systemd mode: systemd restarts
        # what fails, and a stop is the operator's decision.
        assert c.run(CTL, "check") == (0, "", "")
        assert c.run("systemctl", "is-active", UNIT)[1].strip() == "inactive"
        since = last_beat(dc)
        rc, out, err = c.run(CTL, "start")
        assert rc == 0, out + err
        third_pid = wait_active(c, not_pid=second_pid)
        heartbeat_from(dc, third_pid, since)

        # ---- watchdog: a stopped (wedged) agent is killed and restarted.
        # 180 s is too long for a test: a drop-in makes it 6 s.
        dropin = "/etc/systemd/system/elkeid-agent.service.d"
        since = last_beat(dc)
        c.sh("mkdir -p %s && printf '[Service]\\nWatchdogSec=6s\\nRestartSec=1s\\n' > %s/test.conf"
             " && systemctl daemon-reload && systemctl restart %s" % (dropin, dropin, UNIT))
        p = c.show("WatchdogUSec", "NRestarts", "MainPID", "ActiveState")
        assert p["WatchdogUSec"] == "6s" and p["ActiveState"] == "active", p
        wd_pid, restarts = int(p["MainPID"]), int(p["NRestarts"])
        heartbeat_from(dc, wd_pid, since)
        # A healthy agent feeds the watchdog: no restart for more than a period.
        time.sleep(7)
        p = c.show("NRestarts", "MainPID")
        assert (int(p["NRestarts"]), int(p["MainPID"])) == (restarts, wd_pid), c.journal()
        since = last_beat(dc)
        c.sh("kill -STOP %d" % wd_pid)

        def restarted():
            p = c.show("NRestarts", "ActiveState", "MainPID")
            pid = int(p["MainPID"])
            return pid if (int(p["NRestarts"]) == restarts + 1 and p["ActiveState"] == "active"
                           and pid not in (0, wd_pid)) else None
        new_pid = wait_until(restarted, 40, 0.2,
                             "the watchdog to kill the stopped agent and systemd to restart it")
        journal = c.journal()
        assert "Watchdog timeout (limit 6s)" in journal, journal
        assert "Failed with result 'watchdog'" in journal, journal
        assert c.run("test", "-e", "/proc/%d" % wd_pid)[0] != 0  # killed, not just replaced
        heartbeat_from(dc, new_pid, since)  # the new agent reconnected
        assert json.loads(c.run(CTL, "status", "--json")[1])["restarts"] == restarts + 1
        c.sh("rm -r %s && systemctl daemon-reload" % dropin)
        journal = c.journal()
        print("the unit's journal:\n" + journal)
        assert "Traceback" not in journal
        assert "Got notification message" not in journal  # none refused

        # ---- enabled: the agent starts at boot
        since = last_beat(dc)
        assert c.reboot(), "the container did not boot again"
        boot_pid = wait_active(c)
        heartbeat_from(dc, boot_pid, since)
        assert c.show("NRestarts")["NRestarts"] == "0"

        # ---- purge with the agent running: nothing of it remains
        rc, out, err = c.run("dpkg", "--purge", UNIT, env={"DEBIAN_FRONTEND": "noninteractive"})
        print("dpkg --purge said:\n" + out + err)
        assert rc == 0, out + err
        assert "failed" not in err and "warning" not in err, err
        assert c.show("LoadState", "ActiveState") == {"LoadState": "not-found",
                                                       "ActiveState": "inactive"}
        # The unit stayed loaded while it was stopped (its notifications
        # were heard), and was unlinked only then.
        assert "Got notification message" not in c.journal(), c.journal()
        assert not os.path.exists(c.path("/etc/elkeid"))
        assert c.agent_processes() == []
        unit_cgroups = ["/sys/fs/cgroup/%s%s" % (ctrl, cg) for ctrl in ("memory", "cpu", "pids")] \
            if v1 else ["/sys/fs/cgroup" + cg]
        wait_until(lambda: all(c.run("test", "-e", d)[0] != 0 for d in unit_cgroups), 10, 0.2,
                   "systemd to remove the unit's cgroups %s" % unit_cgroups)
        shutil.rmtree(c.path("/root/elkeid-certs"))
        os.unlink(c.path(DEB))
        after = c.tree()
        assert after - before == set(), "left behind: %s" % sorted(after - before)
        assert before - after == set(), "removed: %s" % sorted(before - after)
    finally:
        dc.stop()
