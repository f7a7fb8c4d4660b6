"""Local services under a live systemd: each one its own transient unit.

The .deb is installed in the booted container of tests/nspawn.py (systemd
as PID 1, a development AgentCenter on 127.0.0.1), ``/etc/elkeid/
services.yaml`` names two services that exist there - the sample plugin's
standalone service (its zipapp, built on this machine and copied in;
it heartbeats on the agent's unix socket) and ``sleep infinity`` - and the
test checks what the transient-unit launcher promises: each service runs
in a unit of its own (``elkeid-service-<id>.service``, not the agent's
cgroup, which ``KillMode=control-group`` empties at every agent restart);
``systemctl restart`` of the agent and a SIGKILL of its main process
(systemd restarts it) leave the service's pid alone and the new agent
adopts it and counts its heartbeats again; ``elkeidctl services stop`` /
``start`` stop and start the unit; removing an entry and reloading stops
only that one; ``dpkg --purge`` leaves no service process or unit behind.
"""

import json
import os
import subprocess
import sys

import pytest

from debroot import debian_arch
from harness import DevCenterProc, wait_until
from nspawn import (CTL, UNIT, container, heartbeat_from,  # noqa: F401  (fixture)
                    install, wait_active)
from test_packaging import ROOT, packages  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

SERVICE_EXE = "/var/tmp/sample-service"
SERVICE_CONFIG = "/var/tmp/sample-service.json"
SERVICES = "/etc/elkeid/services.yaml"
BEATER_UNIT = "elkeid-service-beater.service"
SLEEPER_UNIT = "elkeid-service-sleeper.service"
BEATER = {"id": "beater", "type": "custom", "binary_path": SERVICE_EXE,
          "args": ["--config", SERVICE_CONFIG], "socket_path": "/run/elkeid/beater.sock",
          "health_check": {"interval": "1s", "heartbeat_timeout": "30s"}}
SLEEPER = {"id": "sleeper", "type": "custom", "binary_path": "/bin/sleep",
           "args": ["infinity"], "health_check": {"interval": "1s", "heartbeat_timeout": 0}}


def services(c):
    rc, out, err = c.run(CTL, "services", "--json")
    assert rc == 0, out + err
    return {s["id"]: s for s in json.loads(out)}


def running(c, sid, timeout=60, pid=None, beats=1):
    """The service's status once it is running (with ``pid``, if given) and
    this agent has counted ``beats`` heartbeats from it."""
    def ok():
        s = services(c).get(sid)
        if s and s["state"] == "running" and s["pid"] and (pid is None or s["pid"] == pid) \
                and s["heartbeats"] >= beats:
            return s
        return None
    return wait_until(ok, timeout, 0.3, "service %s running (pid %s, %d heartbeats)"
                      % (sid, pid, beats))


def unit(c, name):
    rc, out, err = c.run("systemctl", "show", name,
                         "--property=LoadState,ActiveState,MainPID,ControlGroup")
    assert rc == 0, out + err
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def start_ticks(c, pid):
    """Field 22 of /proc/PID/stat in the container ("" once it is gone)."""
    rc, out, _err = c.run("cat", "/proc/%d/stat" % pid)
    return out.rsplit(")", 1)[1].split()[19] if rc == 0 else ""


def gone(c, pid):
    return c.run("test", "-e", "/proc/%d" % pid)[0] != 0


def assert_own_unit(c, name, pid):
    """``pid`` is the main process of unit ``name``, in that unit's cgroup
    and not in the agent's."""
    u = unit(c, name)
    assert (u["ActiveState"], u["MainPID"]) == ("active", str(pid)), u
    assert u["ControlGroup"] == "/system.slice/" + name, u
    cgroup = c.read("/proc/%d/cgroup" % pid)
    assert "/system.slice/%s" % name in cgroup, cgroup
    assert "elkeid-agent.service" not in cgroup, cgroup


def write_services(c, *entries):
    # JSON: the package ships no PyYAML, and JSON in services.yaml is read as JSON
    with open(c.path(SERVICES), "w") as f:
        json.dump({"agents": list(entries)}, f)
    rc, out, err = c.run(CTL, "services", "reload")
    assert rc == 0, out + err


def test_services_as_transient_units(container, packages, tmp_path):  # noqa: F811
    c = container
    dc = DevCenterProc(tmp_path / "devcenter")
    try:
        # The test service: the sample plugin's service mode as a zipapp
        # that needs only the container's python3 (a JSON config: no PyYAML).
        subprocess.run([sys.executable, "-m", "elkeid_devtools.sample_plugin.build",
                        "service-exe", c.path(SERVICE_EXE), "--python", "/usr/bin/python3"],
                       cwd=ROOT, check=True)
        with open(c.path(SERVICE_CONFIG), "w") as f:
            json.dump({"agent_id": "beater", "heartbeat_interval": "1s", "http_port": 0,
                       "socket_path": "/run/elkeid/beater.sock"}, f)

        rc, out, err = install(c, dc, packages[debian_arch(), "deb"])
        assert rc == 0, out + err
        agent_pid = wait_active(c)
        heartbeat_from(dc, agent_pid, since=0)

        # ---- two services, each started as its own transient unit
        write_services(c, BEATER, SLEEPER)
        beater = running(c, "beater")
        sleeper = running(c, "sleeper", beats=0)
        assert (beater["launcher"], beater["unit"]) == ("systemd", BEATER_UNIT), beater
        assert (sleeper["launcher"], sleeper["unit"]) == ("systemd", SLEEPER_UNIT), sleeper
        pid, sleeper_pid = beater["pid"], sleeper["pid"]
        assert_own_unit(c, BEATER_UNIT, pid)
        assert_own_unit(c, SLEEPER_UNIT, sleeper_pid)
        ticks = start_ticks(c, pid)
        # the agent's cgroup holds the agent alone
        agent_cg = c.read("/sys/fs/cgroup/systemd/system.slice/elkeid-agent.service/cgroup.procs") \
            if c.run("test", "-d", "/sys/fs/cgroup/systemd")[0] == 0 else \
            c.read("/sys/fs/cgroup/system.slice/elkeid-agent.service/cgroup.procs")
        assert agent_cg.split() == [str(agent_pid)], agent_cg

        # ---- agent restarts: the service runs on, the new agent adopts it
        rc, out, err = c.run("systemctl", "restart", UNIT)
        assert rc == 0, out + err
        agent_pid = wait_active(c, not_pid=agent_pid)
        s = running(c, "beater", pid=pid)
        assert s["adopted"] is True and s["unit"] == BEATER_UNIT, s
        assert start_ticks(c, pid) == ticks
        assert running(c, "sleeper", pid=sleeper_pid, beats=0)["adopted"] is True
        assert_own_unit(c, BEATER_UNIT, pid)

        dropin = "/etc/systemd/system/elkeid-agent.service.d"
        c.sh("mkdir -p %s && printf '[Service]\\nRestartSec=1s\\n' > %s/test.conf"
             " && systemctl daemon-reload" % (dropin, dropin))
        c.sh("kill -KILL %d" % agent_pid)
        agent_pid = wait_active(c, not_pid=agent_pid)
        s = running(c, "beater", pid=pid)
        assert s["adopted"] is True and start_ticks(c, pid) == ticks, s
        assert running(c, "sleeper", pid=sleeper_pid, beats=0)["adopted"] is True
        assert_own_unit(c, BEATER_UNIT, pid)
        c.sh("rm -r %s && systemctl daemon-reload" % dropin)

        # ---- elkeidctl services stop / start
        rc, out, err = c.run(CTL, "services", "stop", "beater")
        assert rc == 0, out + err
        wait_until(lambda: gone(c, pid), 30, 0.2, "the stopped service's pid to go")
        assert unit(c, BEATER_UNIT)["ActiveState"] in ("inactive", "failed") or \
            unit(c, BEATER_UNIT)["LoadState"] == "not-found"
        assert unit(c, BEATER_UNIT)["ActiveState"] != "active"
        s = services(c)["beater"]
        assert (s["state"], s["pid"]) == ("stopped", 0), s
        assert s["last_error"] == "", s

        rc, out, err = c.run(CTL, "services", "start", "beater")
        assert rc == 0, out + err
        s = running(c, "beater")
        assert s["pid"] != pid and s["adopted"] is False, s
        pid = s["pid"]
        assert_own_unit(c, BEATER_UNIT, pid)

        # ---- an entry removed from the file: that service stops, the other runs on
        write_services(c, BEATER)
        wait_until(lambda: "sleeper" not in services(c), 30, 0.2, "sleeper to be dropped")
        wait_until(lambda: gone(c, sleeper_pid), 30, 0.2, "sleeper's pid to go")
        assert unit(c, SLEEPER_UNIT)["ActiveState"] != "active"
        assert running(c, "beater", pid=pid)["state"] == "running"

        # ---- purge with a service running: no service is left unsupervised
        rc, out, err = c.run("dpkg", "--purge", UNIT, env={"DEBIAN_FRONTEND": "noninteractive"})
        print("dpkg --purge said:\n" + out + err)
        assert rc == 0, out + err
        assert "failed" not in err and "pre-remove" not in err, err
        assert gone(c, pid), "the service runs on after the agent was purged"
        # the operator's services.yaml stays (so dpkg says /etc/elkeid is not empty)
        assert os.listdir(c.path("/etc/elkeid")) == ["services.yaml"]
        rc, out, err = c.run("systemctl", "list-units", "--all", "--no-legend",
                             "elkeid-service-*")
        assert rc == 0 and out.strip() == "", out + err
        for name in (BEATER_UNIT, SLEEPER_UNIT):
            assert unit(c, name)["ActiveState"] != "active"
        journal = c.run("journalctl", "--no-pager", "-u", UNIT)[1]
        print("the agent's journal:\n" + journal)
        assert "Traceback" not in journal
    finally:
        dc.stop()
