"""elkeidctl logic behind the OS-effects seam (tests/test_ctl_fake.py).

Each test builds a host in a temporary root, runs ``elkeid_agent.ctl.main``
against the recording fake and checks the exit code, the messages and the
effects (commands run, signals sent, files written)."""

import io
import json
import os
import re
import signal
import stat

import pytest

from elkeid_agent import ctl, settings
from elkeid_agent.ctl import layout
from elkeid_agent.osfx.service import Completed
from test_ctl_fake import (CTL_PID, FakeFx, cgroup_v1_host, cgroup_v2_host,
                           make_v1_agent_cgroup_files)


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return "Result(%r, out=%r, err=%r)" % (self.code, self.out, self.err)


@pytest.fixture
def fx(tmp_path):
    return FakeFx(tmp_path / "root")


def run(fx, *argv):
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(list(argv), fx=fx, out=out, err=err)
    return Result(code, out.getvalue(), err.getvalue())


def sysv(fx, extra=""):
    fx.configure("service_type=sysvinit\n" + extra)
    fx.install_agent()


def no_traceback(r):
    assert "Traceback" not in r.out + r.err


# ---------------------------------------------------------------- usage errors

@pytest.mark.parametrize("argv, needle", [
    ([], "a command is required"),
    (["bogus"], "unknown command 'bogus'"),
    (["stop", "--bogus"], "unrecognized arguments: --bogus"),
    (["status", "extra"], "unrecognized arguments: extra"),
    (["set"], "set needs at least one of"),
    (["unset"], "unset needs at least one of"),
    (["set", "--colour=blue"], "unrecognized arguments: --colour=blue"),
    (["set", "--service_type"], "expected one argument"),
])
def test_usage_errors_exit_2_with_one_clear_line(fx, argv, needle):
    r = run(fx, *argv)
    assert r.code == layout.EXIT_USAGE
    assert needle in r.err
    assert r.out == "" or r.out.startswith("usage:") or "usage" not in r.out
    no_traceback(r)
    assert fx.calls == []


def test_version_and_help_exit_0(fx):
    r = run(fx, "--version")
    assert r.code == 0 and "1." in r.out
    r = run(fx, "--help")
    assert r.code == 0 and "service-reload" in r.out
    for command in ctl.COMMANDS:
        assert "\n    %s " % command in r.out or "\n    %s\n" % command in r.out, command
    r = run(fx, "set", "--help")
    assert r.code == 0 and "--service_type" in r.out


@pytest.mark.parametrize("argv, needle", [
    (["set", "--service_type=foo"], "service_type must be one of systemd|sysvinit, got 'foo'"),
    (["set", "--service_type="], "--service_type needs a value"),
    (["set", "--id=has space"], "bad agent id"),
    (["set", "--region=a/b"], "bad region"),
    (["set", "--server=nohost"], "must be HOST:PORT"),
    (["set", "--server=127.0.0.1:99999"], "must be HOST:PORT"),
])
def test_set_rejects_bad_values_and_writes_nothing(fx, argv, needle):
    fx.configure("service_type=systemd\n")
    before = fx.read("/etc/elkeid/specified_env")
    r = run(fx, *argv)
    assert r.code == layout.EXIT_USAGE, r
    assert needle in r.err
    assert fx.read("/etc/elkeid/specified_env") == before
    no_traceback(r)


# ---------------------------------------------------------------- set / unset

def test_set_writes_the_keys_the_agent_reads(fx, tmp_path):
    r = run(fx, "set", "--service_type=sysvinit", "--id", "host-42", "--idc=bj1",
            "--region=eu", "--server=127.0.0.1:6751")
    assert r.code == 0, r
    path = fx.host("/etc/elkeid/specified_env")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    values, problems = settings.parse_env_file(fx.read("/etc/elkeid/specified_env"))
    assert problems == []
    assert values == {"service_type": "sysvinit", "SPECIFIED_AGENT_ID": "host-42",
                      "specified_idc": "bj1", "specified_region": "eu",
                      "ELKEID_SERVER": "127.0.0.1:6751"}
    # The agent reads back exactly what elkeidctl wrote.
    s = settings.load({}, {}, workdir=fx.host("/etc/elkeid"))
    assert (s.service_type, s.agent_id, s.idc, s.region) == ("sysvinit", "host-42", "bj1", "eu")
    assert s.regions["default"].server == "127.0.0.1:6751"


def test_set_replaces_go_elkeidctl_spellings_and_keeps_other_keys(fx):
    fx.configure("service_type = systemd\nspecified_id = old\nidc = old-idc\n"
                 "RUNTIME_MODE=DEBUG\n")
    assert run(fx, "set", "--id=new", "--idc=new-idc").code == 0
    values, _ = settings.parse_env_file(fx.read("/etc/elkeid/specified_env"))
    assert values == {"service_type": "systemd", "SPECIFIED_AGENT_ID": "new",
                      "specified_idc": "new-idc", "RUNTIME_MODE": "DEBUG"}


def test_unset_removes_every_spelling(fx):
    fx.configure("service_type=systemd\nSPECIFIED_AGENT_ID=a\nspecified_id=b\n"
                 "specified_region=eu\nregion=x\n")
    assert run(fx, "unset", "--id", "--region").code == 0
    values, _ = settings.parse_env_file(fx.read("/etc/elkeid/specified_env"))
    assert values == {"service_type": "systemd"}


def test_set_creates_a_missing_file(fx):
    assert not fx.exists("/etc/elkeid/specified_env")
    assert run(fx, "set", "--service_type=systemd").code == 0
    assert fx.read("/etc/elkeid/specified_env") == "service_type=systemd\n"


def test_set_refuses_to_rewrite_a_corrupt_file(fx):
    fx.configure("service_type=systemd\nthis line has no equals sign\n")
    before = fx.read("/etc/elkeid/specified_env")
    r = run(fx, "set", "--idc=x")
    assert r.code == layout.EXIT_NOT_CONFIGURED
    assert "corrupt" in r.err and "line 2" in r.err
    assert fx.read("/etc/elkeid/specified_env") == before


# ---------------------------------------------------------------- specified_env problems

@pytest.mark.parametrize("command", ["start", "stop", "restart", "status", "check", "enable",
                                     "disable", "cleanup", "service-reload", "cgroup"])
def test_missing_specified_env_is_a_clear_error(fx, command):
    r = run(fx, command)
    assert r.code == layout.EXIT_NOT_CONFIGURED, r
    assert "/etc/elkeid/specified_env does not exist" in r.err
    assert "elkeidctl set --service_type=" in r.err
    assert fx.commands() == [] and not [c for c in fx.calls if c[0] == "spawn"]
    no_traceback(r)


@pytest.mark.parametrize("text, needle", [
    ("service_type=sysvinit\n\x00\x01garbage\n", "line 2"),
    ("service_type='sysvinit\n", "unterminated quote"),
    ("service_type=upstart\n", "service_type='upstart'"),
    ("specified_idc=x\n", "service_type is not set"),
    ("\xff\xfe=\n", "line 1"),
])
def test_corrupt_specified_env_is_a_clear_error(fx, text, needle):
    fx.configure(text)
    fx.install_agent()
    for command in ("start", "status", "check"):
        r = run(fx, command)
        assert r.code == layout.EXIT_NOT_CONFIGURED, r
        assert needle in r.err
        no_traceback(r)
    assert not [c for c in fx.calls if c[0] == "spawn"]


def test_specified_env_that_is_a_directory(fx):
    os.makedirs(fx.host("/etc/elkeid/specified_env"))
    r = run(fx, "start")
    assert r.code == layout.EXIT_NOT_CONFIGURED
    assert "cannot read /etc/elkeid/specified_env" in r.err


# ---------------------------------------------------------------- privilege

@pytest.mark.parametrize("argv", [["start"], ["stop"], ["restart"], ["check"], ["enable"],
                                  ["disable"], ["cleanup"], ["service-reload"],
                                  ["set", "--idc=x"], ["unset", "--idc"],
                                  ["cgroup", "--apply"], ["update", "--clear"],
                                  ["rollback"], ["rollback", "--yes"]])
def test_non_root_is_refused_before_anything_happens(fx, argv):
    sysv(fx)
    fx.euid = 1000
    before = fx.read("/etc/elkeid/specified_env")
    r = run(fx, *argv)
    assert r.code == layout.EXIT_PRIVILEGE, r
    assert "must be run as root" in r.err and "sudo" in r.err
    assert [c for c in fx.calls if c[0] != "run" or c[1][0] != "systemctl"] == []
    assert fx.read("/etc/elkeid/specified_env") == before


def test_non_root_status_works_in_systemd_mode(fx):
    fx.configure("service_type=systemd\n")
    fx.euid = 1000
    fx.results[("systemctl", "show")] = Completed(0, "LoadState=loaded\nActiveState=inactive\n"
                                                     "SubState=dead\nMainPID=0\n")
    r = run(fx, "status")
    assert r.code == layout.EXIT_NOT_RUNNING
    assert "inactive" in r.out


def test_unreadable_specified_env_for_non_root(fx):
    fx.configure("service_type=systemd\n")
    fx.euid = 1000

    def denied(path, limit=1 << 20):
        raise PermissionError(13, "Permission denied", path)
    fx.read_bytes = denied
    r = run(fx, "status")
    assert r.code == layout.EXIT_PRIVILEGE
    assert "permission denied (run elkeidctl as root)" in r.err


# ---------------------------------------------------------------- systemd mode

@pytest.mark.parametrize("argv, expected", [
    (["start"], ["systemctl", "start", "elkeid-agent"]),
    (["stop"], ["systemctl", "stop", "elkeid-agent"]),
    (["restart"], ["systemctl", "restart", "elkeid-agent"]),
    (["enable"], ["systemctl", "enable", "/etc/elkeid/elkeid-agent.service"]),
    (["disable"], ["systemctl", "disable", "elkeid-agent"]),  # and link: below
    (["service-reload"], ["systemctl", "daemon-reload"]),
])
def test_systemd_commands(fx, argv, expected):
    fx.configure("service_type=systemd\n")
    r = run(fx, *argv)
    assert r.code == 0, r
    assert fx.commands() == [expected]


def test_systemd_disable_keeps_the_unit_linked(fx):
    """The unit is enabled by path, so ``systemctl disable`` also removes
    the link that makes systemd know it: a running agent would be left with
    a unit systemd cannot find (no watchdog, its notifications refused) and
    start/restart would fail with "Unit elkeid-agent.service not found".
    disable means "not at boot": link the unit file again."""
    fx.configure("service_type=systemd\n")
    fx.write("/etc/elkeid/elkeid-agent.service", "[Service]\n")
    r = run(fx, "disable")
    assert r.code == 0, r
    assert fx.commands() == [["systemctl", "disable", "elkeid-agent"],
                             ["systemctl", "link", "/etc/elkeid/elkeid-agent.service"]]


def test_systemd_disable_without_the_unit_file_only_disables(fx):
    fx.configure("service_type=systemd\n")
    r = run(fx, "disable")
    assert r.code == 0, r
    assert fx.commands() == [["systemctl", "disable", "elkeid-agent"]]


@pytest.mark.parametrize("state, wants, enabled", [
    ("enabled", False, True), ("linked", False, False), ("linked", True, True),
    ("disabled", False, False)])
def test_systemd_status_enabled_means_started_at_boot(fx, state, wants, enabled):
    fx.configure("service_type=systemd\n")
    if wants:  # older systemd says "linked" for a unit enabled by path
        fx.write("/etc/systemd/system/multi-user.target.wants/elkeid-agent.service", "")
    fx.results[("systemctl", "show")] = Completed(
        0, "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=3000\n"
           "UnitFileState=%s\n" % state)
    r = run(fx, "status", "--json")
    assert json.loads(r.out)["enabled"] is enabled


def test_systemd_check_does_nothing(fx):
    fx.configure("service_type=systemd\n")
    r = run(fx, "check")
    assert (r.code, r.out, r.err, fx.calls) == (0, "", "", [])


def test_systemctl_failure_is_reported_with_its_status(fx):
    fx.configure("service_type=systemd\n")
    fx.results[("systemctl", "start")] = Completed(5, "")
    r = run(fx, "start")
    assert r.code == 5
    assert "systemctl start elkeid-agent failed with status 5" in r.err


def test_systemd_mode_without_systemctl(fx):
    fx.configure("service_type=systemd\n")
    fx.tools.discard("systemctl")
    r = run(fx, "start")
    assert r.code == layout.EXIT_FAILURE
    assert "systemctl is not installed" in r.err and "--service_type=sysvinit" in r.err


def test_daemon_reload_failure_is_a_warning(fx):
    fx.configure("service_type=systemd\n")
    fx.results[("systemctl", "daemon-reload")] = Completed(1, "System has not been booted "
                                                              "with systemd")
    r = run(fx, "service-reload")
    assert r.code == 0
    assert "warning" in r.err and "not been booted" in r.err


def test_systemd_status_table_and_json(fx):
    fx.configure("service_type=systemd\nspecified_idc=bj1\n")
    fx.write("/etc/elkeid/machine-id", "0f1e2d3c-aaaa-bbbb-cccc-000000000001")
    fx.add_proc(3000, 1, exe="/usr/bin/python3.11", cwd="/etc/elkeid")
    fx.add_proc(3001, 3000, exe="/etc/elkeid/plugin/collector/collector",
                cwd="/etc/elkeid/plugin/collector")
    os.makedirs(fx.host("/etc/elkeid/plugin/collector"))
    os.makedirs(fx.host("/etc/elkeid/plugin/driver"))
    fx.results[("systemctl", "show")] = Completed(
        0, "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=3000\n"
           "UnitFileState=enabled\nNRestarts=2\nResult=success\n")
    r = run(fx, "status")
    assert r.code == 0, r
    assert "active (running) (pid 3000" in r.out
    assert "collector (pid 3001)" in r.out and "driver (not running)" in r.out
    assert "restarted 2 time(s)" in r.out and "bj1" in r.out
    r = run(fx, "status", "--json")
    info = json.loads(r.out)
    assert r.code == 0
    assert info["pid"] == 3000 and info["processes"] == [3000, 3001]
    assert info["enabled"] is True and info["idc"] == "bj1"
    assert info["agent_id"] == "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    assert info["plugins"] == [{"name": "collector", "pid": 3001},
                               {"name": "driver", "pid": None}]


def test_systemd_status_of_a_failed_unit(fx):
    fx.configure("service_type=systemd\n")
    fx.results[("systemctl", "show")] = Completed(
        0, "LoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\n"
           "UnitFileState=disabled\n")
    r = run(fx, "status", "--json")
    assert r.code == layout.EXIT_NOT_RUNNING
    assert json.loads(r.out)["state"] == "failed (failed)"


# ---------------------------------------------------------------- sysvinit start

def test_sysvinit_start_spawns_the_agent_in_its_cgroup(fx):
    sysv(fx, "specified_idc=bj1\n")
    cgroup_v1_host(fx)
    make_v1_agent_cgroup_files(fx)
    r = run(fx, "start")
    assert r.code == 0, r
    spawns = [c for c in fx.calls if c[0] == "spawn"]
    assert len(spawns) == 1
    _, argv, cwd, env, procs = spawns[0]
    assert argv == ["/etc/elkeid/elkeid-agent", "run"] and cwd == "/etc/elkeid"
    assert env == {"service_type": "sysvinit", "specified_idc": "bj1",
                   "PATH": layout.AGENT_PATH}
    assert procs == ["/sys/fs/cgroup/cpu,cpuacct/elkeid-agent/cgroup.procs",
                     "/sys/fs/cgroup/memory/elkeid-agent/cgroup.procs"]
    assert fx.read("/sys/fs/cgroup/cpu,cpuacct/elkeid-agent/cpu.cfs_quota_us") == "10000"
    assert fx.read("/sys/fs/cgroup/memory/elkeid-agent/memory.limit_in_bytes") == "262144000"
    assert fx.read("/etc/cron.d/elkeid-agent") == layout.CRON_LINE
    assert stat.S_IMODE(os.stat(fx.host("/etc/cron.d/elkeid-agent")).st_mode) == 0o600
    assert "elkeid-agent started (pid 7000)" in r.out
    assert ("lock", "/var/run/elkeidctl.pid") in fx.calls
    assert ("unlock", "/var/run/elkeidctl.pid") in fx.calls


def test_sysvinit_start_restarts_cron_that_exists(fx):
    sysv(fx)
    fx.write("/etc/init.d/cron", "#!/bin/sh\n")
    assert run(fx, "start").code == 0
    assert ["service", "cron", "restart"] in fx.commands()
    assert ["service", "crond", "restart"] not in fx.commands()


def test_sysvinit_start_copies_the_packaged_cron_file(fx):
    sysv(fx)
    fx.write("/etc/elkeid/elkeid-agent.cron", "*/2 * * * * root /etc/elkeid/elkeidctl check\n")
    assert run(fx, "start").code == 0
    assert fx.read("/etc/cron.d/elkeid-agent").startswith("*/2")


def test_sysvinit_start_when_already_running(fx):
    sysv(fx)
    fx.add_proc(3000, 1)
    fx.hold("/var/run/elkeid-agent.pid", 3000)
    r = run(fx, "start")
    assert r.code == 0
    assert "already running (pid 3000)" in r.out
    assert not [c for c in fx.calls if c[0] == "spawn"]


def test_sysvinit_start_over_a_pid_file_of_a_dead_process(fx):
    sysv(fx)
    fx.write("/var/run/elkeid-agent.pid", "4242\n")  # nobody holds the lock
    r = run(fx, "start")
    assert r.code == 0, r
    assert "removing stale /var/run/elkeid-agent.pid (pid 4242 is not running)" in r.out
    assert [c for c in fx.calls if c[0] == "spawn"]


def test_sysvinit_start_reports_an_agent_that_dies_at_once(fx):
    sysv(fx)
    fx.spawn_behavior = "exit"
    r = run(fx, "start")
    assert r.code == layout.EXIT_FAILURE
    assert "exited with status 1 right after start" in r.err
    assert "/etc/elkeid/log/elkeid-agent.log" in r.err
    # cron keeps trying
    assert fx.exists("/etc/cron.d/elkeid-agent")
    assert ("unlock", "/var/run/elkeidctl.pid") in fx.calls


def test_sysvinit_start_warns_about_an_agent_that_never_locks(fx):
    sysv(fx)
    fx.spawn_behavior = "hang"
    r = run(fx, "start")
    assert r.code == 0
    assert "has not taken /var/run/elkeid-agent.pid" in r.err


def test_sysvinit_start_without_the_agent_binary(fx):
    fx.configure("service_type=sysvinit\n")
    r = run(fx, "start")
    assert r.code == layout.EXIT_NOT_INSTALLED
    assert "/etc/elkeid/elkeid-agent is missing" in r.err


def test_sysvinit_start_without_cgroups_warns_and_runs(fx):
    sysv(fx)  # no /proc/self/mountinfo, no /proc/cgroups
    r = run(fx, "start")
    assert r.code == 0
    assert "no cgroup support found" in r.err
    assert [c for c in fx.calls if c[0] == "spawn"][0][4] == []


def test_sysvinit_start_on_cgroup_v2(fx):
    sysv(fx)
    cgroup_v2_host(fx)
    r = run(fx, "start")
    assert r.code == 0, r
    assert ("control", "/sys/fs/cgroup/cgroup.subtree_control", "+cpu") in fx.calls
    assert ("control", "/sys/fs/cgroup/cgroup.subtree_control", "+memory") not in fx.calls
    assert fx.read("/sys/fs/cgroup/elkeid-agent/cpu.max") == "10000 100000"
    assert fx.read("/sys/fs/cgroup/elkeid-agent/memory.max") == "262144000"
    spawn = [c for c in fx.calls if c[0] == "spawn"][0]
    assert spawn[4] == ["/sys/fs/cgroup/elkeid-agent/cgroup.procs"]


def test_sysvinit_start_mounts_unmounted_v1_hierarchies(fx):
    sysv(fx)
    fx.write("/proc/self/mountinfo", "")
    fx.write("/proc/cgroups", "#subsys\ncpu\t3\t1\t1\nmemory\t5\t1\t1\n")
    r = run(fx, "start")
    assert r.code == 0, r
    mounts = [c for c in fx.calls if c[0] == "mount"]
    assert mounts == [("mount", "cpu", "/etc/elkeid/cgroup/cpu"),
                      ("mount", "memory", "/etc/elkeid/cgroup/memory")]
    spawn = [c for c in fx.calls if c[0] == "spawn"][0]
    assert spawn[4] == ["/etc/elkeid/cgroup/cpu/elkeid-agent/cgroup.procs",
                        "/etc/elkeid/cgroup/memory/elkeid-agent/cgroup.procs"]


def test_sysvinit_start_mount_failure_is_a_warning(fx):
    sysv(fx)
    fx.write("/proc/self/mountinfo", "")
    fx.write("/proc/cgroups", "#subsys\ncpu\t3\t1\t1\n")
    fx.results[("mount",)] = Completed(32, "mount: permission denied")
    r = run(fx, "start")
    assert r.code == 0
    assert "mount cpu cgroup on /etc/elkeid/cgroup/cpu failed: mount: permission denied" in r.err


def test_sysvinit_start_leaves_the_agent_cgroup_first(fx):
    """Self-update: agent -> dpkg -> post-install -> elkeidctl runs inside the
    agent's cgroup; it must move itself out before starting or stopping."""
    sysv(fx)
    cgroup_v1_host(fx)
    make_v1_agent_cgroup_files(fx)
    fx.write_proc_cgroup(CTL_PID, "4:memory:/elkeid-agent\n2:cpu,cpuacct:/elkeid-agent\n"
                                  "1:name=systemd:/\n")
    r = run(fx, "start")
    assert r.code == 0, r
    assert ("control", "/sys/fs/cgroup/memory/cgroup.procs", str(CTL_PID)) in fx.calls
    assert ("control", "/sys/fs/cgroup/cpu,cpuacct/cgroup.procs", str(CTL_PID)) in fx.calls
    assert "moved elkeidctl (pid %d) out of the agent's cgroup" % CTL_PID in r.out


# ---------------------------------------------------------------- sysvinit stop

def running_agent(fx, on_term="exit_tree", plugins=("collector",)):
    sysv(fx)
    cgroup_v1_host(fx)
    make_v1_agent_cgroup_files(fx)
    fx.spawn_plugins = plugins
    assert run(fx, "start").code == 0
    fx.procs[7000].on_term = on_term
    fx.calls.clear()
    return 7000


def test_sysvinit_stop_terms_the_agent_and_waits(fx):
    pid = running_agent(fx)
    r = run(fx, "stop")
    assert r.code == 0, r
    assert fx.signals() == [(pid, signal.SIGTERM)]
    assert not fx.exists("/etc/cron.d/elkeid-agent")
    assert "elkeid-agent stopped" in r.out
    assert not fx.alive(pid) and not fx.alive(pid + 1)
    # empty cgroups are removed
    assert not fx.isdir("/sys/fs/cgroup/memory/elkeid-agent")


def test_sysvinit_stop_kills_what_ignores_sigterm_after_30_s(fx):
    pid = running_agent(fx, on_term="ignore")
    fx.procs[pid + 1].on_term = "ignore"
    start = fx.clock
    r = run(fx, "stop")
    assert r.code == 0, r
    assert fx.clock - start >= layout.STOP_TIMEOUT
    sigs = fx.signals()
    assert sigs[0] == (pid, signal.SIGTERM)
    assert (pid, signal.SIGKILL) in sigs and (pid + 1, signal.SIGKILL) in sigs
    assert (-pid, signal.SIGKILL) in sigs  # the agent leads its process group
    assert "did not stop within 30 s" in r.out and "killed 2 process(es)" in r.out
    assert "waiting for 2 process(es) to exit" in r.out


def test_sysvinit_stop_terms_plugins_the_agent_left_behind(fx):
    pid = running_agent(fx, on_term="exit")  # exits without stopping its plugin
    r = run(fx, "stop")
    assert r.code == 0, r
    assert (pid + 1, signal.SIGTERM) in fx.signals()
    assert (pid + 1, signal.SIGKILL) not in fx.signals()
    assert not fx.alive(pid + 1)


def test_sysvinit_stop_never_signals_itself_or_its_parents(fx):
    pid = running_agent(fx, on_term="ignore", plugins=())
    # The agent runs dpkg, which runs the pre-removal script, which runs us;
    # all of them are in the agent's cgroup.
    fx.add_proc(7500, pid, exe="/usr/bin/dpkg")
    fx.procs[4000].ppid = 7500
    for root in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory"):
        for p in (7500, 4000, CTL_PID):
            fx.write_control(root + "/elkeid-agent/cgroup.procs", str(p))
    fx.calls.clear()
    r = run(fx, "stop")
    assert r.code == 0, r
    signalled = {abs(p) for p, _sig in fx.signals()}
    assert not signalled & {7500, 4000, CTL_PID, 1}


def test_sysvinit_stop_never_signals_a_process_that_reused_a_plugins_pid(fx):
    """A plugin seen at the start of the stop exits; a stranger gets its pid
    (and leads a group of its own) before the 30 s are up. Only the plugin
    that was seen may be killed, never what holds its number later."""
    pid = running_agent(fx, on_term="ignore")
    fx.procs[pid + 1].on_term = "ignore"
    fx.after(2, lambda: fx.reuse_pid(pid + 1, exe="/usr/sbin/sshd", on_term="ignore"))
    r = run(fx, "stop")
    assert r.code == 0, r
    stranger = fx.procs[pid + 1]
    assert stranger.exe == "/usr/sbin/sshd" and stranger.alive
    assert not {p for p, _sig in fx.signals()} & {pid + 1, -(pid + 1)}
    assert (pid, signal.SIGKILL) in fx.signals() and not fx.alive(pid)
    assert "killed 1 process(es)" in r.out


def test_sysvinit_stop_never_follows_the_agents_pid_to_another_process(fx):
    """The agent exits on SIGTERM and a stranger with children of its own
    gets its pid: the stop is over, the stranger's tree is not the agent's."""
    pid = running_agent(fx, on_term="exit_tree")
    real_exit = fx._exit

    def exit_then_reuse(p, status):
        real_exit(p, status)
        if p.pid == pid:
            fx._exit = real_exit
            fx.reuse_pid(pid, exe="/usr/bin/postgres", on_term="ignore")
            fx.add_proc(pid + 50, pid, exe="/usr/bin/postgres", on_term="ignore")
    fx._exit = exit_then_reuse
    r = run(fx, "stop")
    assert r.code == 0, r
    assert fx.signals() == [(pid, signal.SIGTERM)]
    assert fx.procs[pid].exe == "/usr/bin/postgres" and fx.alive(pid) and fx.alive(pid + 50)
    assert "elkeid-agent stopped" in r.out and "killed" not in r.out


def test_sysvinit_stop_sweeps_plugins_of_a_crashed_agent(fx):
    pid = running_agent(fx)
    fx.procs[pid].alive = False              # killed -9: no pid-file holder any more
    fx.locks.clear()
    r = run(fx, "stop")
    assert r.code == 0, r
    sigs = fx.signals()
    assert (pid + 1, signal.SIGTERM) in sigs and not fx.alive(pid + 1)
    assert all(p not in (0, -1, pid) for p, _sig in sigs)


def test_sysvinit_stop_when_not_running(fx):
    sysv(fx)
    r = run(fx, "stop")
    assert (r.code, fx.signals()) == (0, [])
    assert "elkeid-agent is not running" in r.out


def test_sysvinit_stop_with_a_pid_file_of_a_dead_process(fx):
    sysv(fx)
    fx.write("/var/run/elkeid-agent.pid", "31337\n")
    r = run(fx, "stop")
    assert r.code == 0
    assert fx.signals() == []  # never signal a pid nobody holds the lock for
    assert "removed stale pid file naming pid 31337" in r.out
    assert not fx.exists("/var/run/elkeid-agent.pid")


def test_sysvinit_restart_stops_then_starts(fx):
    pid = running_agent(fx)
    r = run(fx, "restart")
    assert r.code == 0, r
    assert fx.signals()[0] == (pid, signal.SIGTERM)
    spawns = [c for c in fx.calls if c[0] == "spawn"]
    assert len(spawns) == 1 and fx.pidfile_holder("/var/run/elkeid-agent.pid") == 7100


def test_stop_waits_for_another_elkeidctl_then_gives_up(fx):
    sysv(fx)
    fx.add_proc(6000, 1)
    fx.hold("/var/run/elkeidctl.pid", 6000)
    r = run(fx, "stop")
    assert r.code == layout.EXIT_BUSY
    assert "another elkeidctl (pid 6000) is still running" in r.err
    assert "waiting for another elkeidctl (pid 6000)" in r.out


# ---------------------------------------------------------------- check

def test_check_is_quiet_when_the_agent_runs(fx):
    running_agent(fx)
    r = run(fx, "check")
    assert (r.code, r.out, r.err) == (0, "", "")
    assert not [c for c in fx.calls if c[0] == "spawn"]


def test_check_starts_a_dead_agent(fx):
    pid = running_agent(fx)
    fx._exit(fx.procs[pid], -9)
    r = run(fx, "check")
    assert r.code == 0, r
    assert "was not running; started (pid 7100)" in r.out


def test_two_checks_at_once_the_second_says_so(fx):
    sysv(fx)
    fx.add_proc(6000, 1)
    fx.hold("/var/run/elkeidctl.pid", 6000)  # the first check
    r = run(fx, "check")
    assert r.code == layout.EXIT_BUSY
    assert "another elkeidctl (pid 6000) holds /var/run/elkeidctl.pid" in r.err
    assert not [c for c in fx.calls if c[0] == "spawn"]
    assert r.out == ""  # check never waits


def test_check_takes_over_a_lock_of_a_dead_elkeidctl(fx):
    sysv(fx)
    fx.write("/var/run/elkeidctl.pid", "6000\n")  # holder died: no flock
    r = run(fx, "check")
    assert r.code == 0, r
    assert [c for c in fx.calls if c[0] == "spawn"]


# ---------------------------------------------------------------- enable / disable

def test_sysvinit_enable_installs_the_init_script(fx):
    sysv(fx)
    fx.write("/etc/elkeid/elkeid-agent.sysvinit", "#!/bin/sh\n# init\n", 0o700)
    r = run(fx, "enable")
    assert r.code == 0, r
    assert fx.read("/etc/init.d/elkeid-agent") == "#!/bin/sh\n# init\n"
    assert stat.S_IMODE(os.stat(fx.host("/etc/init.d/elkeid-agent")).st_mode) == 0o755
    assert fx.commands() == [["update-rc.d", "elkeid-agent", "defaults"]]


def test_sysvinit_enable_and_disable_with_chkconfig(fx):
    sysv(fx)
    fx.write("/etc/init.d/elkeid-agent", "#!/bin/sh\n")
    fx.tools = {"chkconfig", "service"}
    assert run(fx, "enable").code == 0
    assert run(fx, "disable").code == 0
    assert fx.commands() == [["chkconfig", "--add", "elkeid-agent"],
                             ["chkconfig", "--del", "elkeid-agent"]]


def test_sysvinit_disable_with_update_rc_d(fx):
    sysv(fx)
    assert run(fx, "disable").code == 0
    assert fx.commands() == [["update-rc.d", "-f", "elkeid-agent", "remove"]]


def test_sysvinit_enable_without_any_tool(fx):
    sysv(fx)
    fx.write("/etc/init.d/elkeid-agent", "#!/bin/sh\n")
    fx.tools = set()
    r = run(fx, "enable")
    assert r.code == layout.EXIT_NOT_INSTALLED
    assert "no available service management tool" in r.err


def test_sysvinit_enable_tool_failure(fx):
    sysv(fx)
    fx.write("/etc/init.d/elkeid-agent", "#!/bin/sh\n")
    fx.results[("update-rc.d",)] = Completed(1, "update-rc.d: error: bad LSB header")
    r = run(fx, "enable")
    assert r.code == layout.EXIT_FAILURE
    assert "bad LSB header" in r.err


# ---------------------------------------------------------------- status (sysvinit)

def test_sysvinit_status_running(fx):
    running_agent(fx)
    fx.write("/etc/init.d/elkeid-agent", "#!/bin/sh\n")
    fx.write("/etc/rc2.d/S01elkeid-agent", "")
    r = run(fx, "status")
    assert r.code == 0, r
    assert "running (pid 7000" in r.out and "cron check on" in r.out
    assert "collector (pid 7001)" in r.out
    info = json.loads(run(fx, "status", "--json").out)
    assert info["state"] == "running" and info["enabled"] is True
    assert info["processes"] == [7000, 7001]
    assert info["cgroup"]["agent_in_cgroup"] is True
    assert info["cgroup"]["hierarchies"]["cpu"]["cpu.cfs_quota_us"] == 10000


def test_sysvinit_status_stopped(fx):
    sysv(fx)
    r = run(fx, "status", "--json")
    assert r.code == layout.EXIT_NOT_RUNNING
    assert json.loads(r.out)["state"] == "stopped"


def test_sysvinit_status_with_a_pid_file_of_a_dead_process(fx):
    sysv(fx)
    fx.write("/var/run/elkeid-agent.pid", "31337\n")
    r = run(fx, "status")
    assert r.code == 1  # LSB: dead, but the pid file exists
    assert "dead" in r.out
    assert "/var/run/elkeid-agent.pid names pid 31337, which is not running" in r.out


# ---------------------------------------------------------------- cgroup, cleanup

def test_cgroup_apply_moves_a_running_agent(fx):
    sysv(fx)
    cgroup_v1_host(fx)
    make_v1_agent_cgroup_files(fx)
    fx.add_proc(3000, 1)
    fx.add_proc(3001, 3000)
    fx.hold("/var/run/elkeid-agent.pid", 3000)
    r = run(fx, "cgroup", "--apply", "--json")
    assert r.code == 0, r
    facts = json.loads(r.out)
    assert facts["mode"] == "v1" and facts["members"] == [3000, 3001]
    assert facts["hierarchies"]["memory"]["memory.limit_in_bytes"] == 262144000
    r = run(fx, "cgroup")
    assert "3000 3001" in r.out and "cfs_quota_us=10000" in r.out


def test_cgroup_in_systemd_mode_shows_the_unit(fx):
    fx.configure("service_type=systemd\n")
    fx.results[("systemctl", "show")] = Completed(
        0, "ControlGroup=/system.slice/elkeid-agent.service\nMemoryMax=262144000\n"
           "CPUQuotaPerSecUSec=100ms\n")
    r = run(fx, "cgroup")
    assert r.code == 0
    assert "/system.slice/elkeid-agent.service" in r.out and "100ms" in r.out


def test_cleanup_sysvinit(fx):
    sysv(fx)
    cgroup_v1_host(fx)
    make_v1_agent_cgroup_files(fx)
    os.makedirs(fx.host("/elkeid-agent/cpu"))
    fx.add_proc(3000, 1, cwd="/etc/elkeid")  # the agent
    fx.add_proc(3100, 1, cwd="/home/user")  # a stray
    fx.hold("/var/run/elkeid-agent.pid", 3000)
    for p in (3000, 3100):
        fx.write_control("/sys/fs/cgroup/memory/elkeid-agent/cgroup.procs", str(p))
    fx.write_proc_cgroup(3100, "4:memory:/elkeid-agent\n")
    fx.write("/var/run/elkeidctl.pid", "999\n")  # dead holder
    fx.calls.clear()
    r = run(fx, "cleanup")
    assert r.code == 0, r
    assert ("umount", "/elkeid-agent/cpu") in fx.calls
    assert not fx.exists("/elkeid-agent")
    assert ("control", "/sys/fs/cgroup/memory/cgroup.procs", "3100") in fx.calls
    assert ("control", "/sys/fs/cgroup/memory/cgroup.procs", "3000") not in fx.calls
    assert not fx.exists("/var/run/elkeidctl.pid")
    assert fx.exists("/var/run/elkeid-agent.pid")


def test_cleanup_removes_tmp_only_when_the_agent_is_stopped(fx):
    fx.configure("service_type=systemd\n")
    os.makedirs(fx.host("/etc/elkeid/tmp/x"))
    assert run(fx, "cleanup").code == 0
    assert not fx.exists("/etc/elkeid/tmp")


@pytest.mark.parametrize("props", ["ActiveState=active\nMainPID=3000\n",
                                   "ActiveState=activating\nMainPID=0\n",
                                   "ActiveState=deactivating\nMainPID=3000\n"])
def test_cleanup_keeps_tmp_of_an_agent_systemd_runs(fx, props):
    """systemd mode has no pid file: whether the agent runs is systemd's to
    say. (post-install runs cleanup on upgrade, with the agent running.)"""
    fx.configure("service_type=systemd\n")
    fx.write("/etc/elkeid/tmp/debug.addr", "127.0.0.1:4242\n")
    fx.results[("systemctl", "show")] = Completed(0, props)
    assert run(fx, "cleanup").code == 0
    assert fx.read("/etc/elkeid/tmp/debug.addr") == "127.0.0.1:4242\n"


def test_cleanup_in_systemd_mode_without_systemd_running(fx):
    fx.configure("service_type=systemd\n")
    os.makedirs(fx.host("/etc/elkeid/tmp/x"))
    fx.results[("systemctl", "show")] = Completed(1, "System has not been booted with systemd")
    assert run(fx, "cleanup").code == 0
    assert not fx.exists("/etc/elkeid/tmp")


# ---------------------------------------------------------------- robustness

def test_unexpected_os_error_is_one_line(fx):
    sysv(fx)

    def boom(*a, **kw):
        raise OSError(28, "No space left on device", "/etc/cron.d/elkeid-agent")
    fx.write_file = boom
    r = run(fx, "start")
    assert r.code == layout.EXIT_FAILURE
    assert r.err.strip().splitlines()[-1] == \
        "elkeidctl: start: /etc/cron.d/elkeid-agent No space left on device"
    no_traceback(r)


def test_a_bug_is_reported_not_a_traceback(fx):
    fx.configure("service_type=systemd\n")

    def bug(*a, **kw):
        raise KeyError("oops")
    fx.run = bug
    r = run(fx, "start")
    assert r.code == 70
    assert "internal error in 'start'" in r.err and "please report" in r.err
    no_traceback(r)


def test_cli_dispatches_ctl_by_argv0_and_subcommand(tmp_path, monkeypatch):
    from elkeid_agent import cli
    seen = []
    monkeypatch.setattr(ctl, "main", lambda argv: seen.append(list(argv)) or 0)
    monkeypatch.setattr("sys.argv", ["/etc/elkeid/elkeidctl", "status"])
    assert cli.main() == 0
    monkeypatch.setattr("sys.argv", ["elkeid-agent.pyz", "ctl", "stop"])
    assert cli.main() == 0
    assert seen == [["status"], ["stop"]]


def test_run_turns_grpc_fork_handlers_off_unless_the_user_chose(tmp_path, monkeypatch):
    from elkeid_agent import app, cli
    seen = []
    monkeypatch.setattr(app, "run_agent",
                        lambda s: seen.append(os.environ.get("GRPC_ENABLE_FORK_SUPPORT")) or 0)
    monkeypatch.delenv("GRPC_ENABLE_FORK_SUPPORT", raising=False)
    monkeypatch.setattr("sys.argv", ["elkeid-agent"])
    assert cli.main(["run", "--workdir", str(tmp_path)]) == 0
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "1")
    assert cli.main(["run", "--workdir", str(tmp_path)]) == 0
    assert seen == ["0", "1"]


# ---------------------------------------------------------------- TLS in status

def write_tls(fx, ca, pair, where="/etc/elkeid/cert", names=("ca.crt", "client.crt",
                                                             "client.key")):
    for name, data in zip(names, (ca.cert_pem, pair.cert_pem, pair.key_pem)):
        fx.write(where + "/" + name, data.decode())


def test_status_shows_the_tls_files_when_the_agent_is_down(fx):
    from elkeid_devtools.devcenter import certs
    sysv(fx, "ELKEID_CERT=/srv/tls/agent.crt\n")
    ca = certs.make_ca("fleet CA")
    pair = certs.issue_cert(ca, "host-42", "client")
    write_tls(fx, ca, pair)
    fx.write("/srv/tls/agent.crt", pair.cert_pem.decode())
    r = run(fx, "status")
    assert r.code == layout.EXIT_NOT_RUNNING
    assert re.search(r"^tls +files$", r.out, re.M), r.out
    assert re.search(r"^client cert +CN=host-42, issuer CN=fleet CA, expires \w+ .* GMT "
                     r"\(36[45]\d\.\d days\)$", r.out, re.M), r.out
    info = json.loads(run(fx, "status", "--json").out)["tls"]
    assert info["source"] == "files" and info["problem"] is None
    assert info["cert"]["subject"] == "CN=host-42" and info["ca"]["subject"] == "CN=fleet CA"
    assert info["paths"]["cert"] == "/srv/tls/agent.crt"
    assert 3649 < info["cert"]["days_left"] < 3651
    # A key of another certificate: said, not a traceback.
    write_tls(fx, ca, certs.issue_cert(ca, "other", "client"), names=("x", "y", "client.key"))
    info = json.loads(run(fx, "status", "--json").out)["tls"]
    assert "does not match the certificate /srv/tls/agent.crt" in info["problem"]


def test_status_shows_the_set_the_running_agent_uses(fx):
    running_agent(fx)
    fx.write("/etc/elkeid/tmp/tls-in-use.json", json.dumps({"pid": 7000, "set": {
        "cert": {"subject": "CN=in-use", "issuer": "CN=ca", "not_after": "Jan  1 00:00:00 2030 GMT",
                 "days_left": -2.5}, "ca": None, "problem": None}}))
    r = run(fx, "status")
    assert "the running agent (in use)" in r.out
    assert "CN=in-use, issuer CN=ca, expires Jan  1 00:00:00 2030 GMT (EXPIRED 2.5 days ago)" \
        in r.out, r.out
    # A file a dead agent left is not the running one's: the files are read.
    fx.write("/etc/elkeid/tmp/tls-in-use.json", json.dumps({"pid": 4242, "set": {}}))
    info = json.loads(run(fx, "status", "--json").out)["tls"]
    assert info["source"] == "files" and "cannot read TLS ca" in info["problem"]
