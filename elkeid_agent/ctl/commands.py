"""What each elkeidctl subcommand does, in systemd and sysvinit mode.

Semantics follow the Go elkeidctl (Elkeid agent/deploy/control/cmd/*.go);
where it was silent or wrong, this does the careful thing and says so:
- a missing/corrupt specified_env is an error (Go silently did nothing);
- ``start`` in sysvinit mode waits until the agent holds its pid file, so a
  crash at start-up is reported, not hidden;
- ``stop`` sends SIGTERM to the agent first and lets it shut its plugins
  down, then SIGTERM to leftovers, SIGKILL after 30 s (as Go);
- every sysvinit action that starts or stops the agent holds
  /var/run/elkeidctl.pid, so cron's ``check`` never races ``stop``;
- the sysvinit init script and ``status`` return LSB exit codes.
All effects go through ``fx`` (elkeid_agent.osfx.service.ServiceEffects).
"""

import json

from .. import __version__
from . import config, procs
from .cgroups import AgentCgroup
from .layout import (AGENT_PATH, AGENT_PIDFILE, CRON_FILE, CRON_LINE, CTL_PIDFILE, EXIT_BUSY,
    EXIT_NOT_INSTALLED, EXIT_OK, EXIT_PRIVILEGE, INIT_SCRIPT, LEGACY_CGROUP, LOCK_TIMEOUT,
    SERVICE, START_TIMEOUT, CtlError, Paths)


class Ctl:
    def __init__(self, fx, out, err, paths=None):
        self.fx = fx
        self.paths = paths or Paths()
        self._out = out
        self._err = err
        self._values = None

    # ------------------------------------------------------------ helpers

    def say(self, msg):
        self._out.write(msg + "\n")
        self._out.flush()

    def warn(self, msg):
        self._err.write("elkeidctl: warning: %s\n" % msg)
        self._err.flush()

    def need_root(self, what):
        if self.fx.geteuid() != 0:
            raise CtlError("'%s' must be run as root (try: sudo elkeidctl %s)" % (what, what),
                           EXIT_PRIVILEGE)

    def values(self):
        if self._values is None:
            self._values = config.read(self.fx, path=self.paths.specified_env)
        return self._values

    def mode(self):
        return config.service_type(self.values(), self.paths.specified_env)

    def systemctl(self, *args, capture=False, check=True):
        tool = self.fx.which("systemctl")
        if tool is None:
            raise CtlError("service_type is systemd but systemctl is not installed. Run "
                           "'elkeidctl set --service_type=sysvinit' on hosts without systemd.")
        r = self.fx.run([tool] + list(args), capture=capture)
        if check and r.rc != 0:
            detail = (": " + r.output.strip()) if r.output.strip() else ""
            raise CtlError("systemctl %s failed with status %d%s"
                           % (" ".join(args), r.rc, detail), r.rc if 0 < r.rc < 126 else 1)
        return r

    def restart_cron(self):
        """Go: ``service cron restart; service crond restart``, errors ignored
        (one of the two names exists, depending on the distribution)."""
        tool = self.fx.which("service")
        if tool is None:
            return
        for name in ("cron", "crond"):
            if self.fx.exists("/etc/init.d/" + name):
                self.fx.run([tool, name, "restart"])

    def agent_holder(self):
        return self.fx.pidfile_holder(AGENT_PIDFILE)

    def unit_running(self):
        """True when systemd has the agent's unit running or on its way up
        or down (systemd mode keeps no pid file). False when systemctl is
        missing or systemd is not running: then it supervises nothing."""
        if self.fx.which("systemctl") is None:
            return False
        r = self.systemctl("show", SERVICE, "--no-pager", "--property=ActiveState,MainPID",
                           capture=True, check=False)
        if r.rc != 0:
            return False
        props = dict(line.split("=", 1) for line in r.output.splitlines() if "=" in line)
        return (props.get("ActiveState", "").strip() in ("active", "activating", "deactivating",
                                                         "reloading")
                or props.get("MainPID", "0").strip() not in ("", "0"))

    def stale_pid(self, path):
        """The pid named by ``path`` when no live process holds it, else None."""
        text = self.fx.read_text(path, 64)
        if text is None or self.fx.pidfile_holder(path) is not None:
            return None
        word = text.strip()
        return word if word else "(empty)"

    def leave_agent_cgroup(self, cg):
        if cg.release(self.fx.getpid(), self.warn):
            self.say("moved elkeidctl (pid %d) out of the agent's cgroup" % self.fx.getpid())

    # ------------------------------------------------------------ locking

    def locked(self, wait):
        """Hold /var/run/elkeidctl.pid (Go: ctlPidFile) for a sysvinit action."""
        return _CtlLock(self, wait)

    # ------------------------------------------------------------ commands

    def start(self):
        self.need_root("start")
        if self.mode() == "systemd":
            self.systemctl("start", SERVICE)
            return EXIT_OK
        with self.locked(wait=True):
            return self._sysv_start(from_cron=False)

    def stop(self):
        self.need_root("stop")
        if self.mode() == "systemd":
            self.systemctl("stop", SERVICE)
            return EXIT_OK
        with self.locked(wait=True):
            return self._sysv_stop()

    def restart(self):
        self.need_root("restart")
        if self.mode() == "systemd":
            self.systemctl("restart", SERVICE)
            return EXIT_OK
        with self.locked(wait=True):
            self._sysv_stop()
            return self._sysv_start(from_cron=False)

    def check(self):
        """Run by cron every minute in sysvinit mode: start the agent if it
        is not running. Two checks never run at once: the second says so
        and exits with EXIT_BUSY. Quiet when all is well."""
        self.need_root("check")
        if self.mode() != "sysvinit":
            return EXIT_OK  # systemd supervises the agent itself
        with self.locked(wait=False):
            if self.agent_holder() is not None:
                return EXIT_OK
            return self._sysv_start(from_cron=True)

    def enable(self):
        self.need_root("enable")
        if self.mode() == "systemd":
            self.systemctl("enable", self.paths.unit_file)
            return EXIT_OK
        if not self.fx.exists(INIT_SCRIPT):
            if not self.fx.exists(self.paths.sysvinit_source):
                raise CtlError("%s is missing and %s is not installed to copy it from"
                               % (INIT_SCRIPT, self.paths.sysvinit_source), EXIT_NOT_INSTALLED)
            self.fx.makedirs("/etc/init.d", 0o755)
            self.fx.copy(self.paths.sysvinit_source, INIT_SCRIPT, 0o755)
        return self._rc_tool(("update-rc.d", SERVICE, "defaults"), ("chkconfig", "--add", SERVICE))

    def disable(self):
        self.need_root("disable")
        if self.mode() == "systemd":
            self.systemctl("disable", SERVICE)
            # The unit is enabled by path, so that also removed the link
            # that makes systemd know it: a running agent would be left in a
            # unit systemd cannot find (no watchdog, notifications refused)
            # and start/restart would fail. Disabled means "not at boot":
            # link it again. (Removal unlinks it: packaging/scripts/preremove.sh.)
            if self.fx.exists(self.paths.unit_file):
                self.systemctl("link", self.paths.unit_file)
            return EXIT_OK
        return self._rc_tool(("update-rc.d", "-f", SERVICE, "remove"),
                             ("chkconfig", "--del", SERVICE))

    def _rc_tool(self, debian, redhat):
        for argv in (debian, redhat):
            tool = self.fx.which(argv[0])
            if tool is None:
                continue
            r = self.fx.run([tool] + list(argv[1:]))
            if r.rc != 0:
                raise CtlError("%s failed with status %d: %s"
                               % (" ".join(argv), r.rc, r.output.strip()))
            return EXIT_OK
        raise CtlError("no available service management tool (need update-rc.d or chkconfig)",
                       EXIT_NOT_INSTALLED)

    def set(self, pairs):
        self.need_root("set")
        config.write(self.fx, config.changes_for_set(pairs), self.paths.specified_env)
        return EXIT_OK

    def unset(self, flags):
        self.need_root("unset")
        config.write(self.fx, config.changes_for_unset(flags), self.paths.specified_env)
        return EXIT_OK

    def service_reload(self):
        """Go: ``systemctl daemon-reload`` or ``service cron(d) restart``,
        errors ignored (old systemd, containers). We warn instead."""
        self.need_root("service-reload")
        if self.mode() == "systemd":
            r = self.systemctl("daemon-reload", capture=True, check=False)
            if r.rc != 0:
                self.warn("systemctl daemon-reload failed (status %d): %s"
                          % (r.rc, r.output.strip()))
        else:
            self.restart_cron()
        return EXIT_OK

    def cleanup(self):
        """Go: in sysvinit mode unmount and remove the legacy /elkeid-agent
        cgroup mounts and move processes that are not the agent's out of
        its cgroup. Also (both modes) remove pid files of dead processes
        and, when the agent is not running, its tmp/ directory."""
        self.need_root("cleanup")
        mode = self.mode()
        fx = self.fx
        if mode == "sysvinit":
            if fx.exists(LEGACY_CGROUP):
                for sub in ("cpu", "memory", "named"):
                    fx.umount(LEGACY_CGROUP + "/" + sub)
                try:
                    fx.rmtree(LEGACY_CGROUP)
                except OSError as e:
                    self.warn("cannot remove %s: %s" % (LEGACY_CGROUP, e.strerror or e))
            cg = AgentCgroup(fx, mounts=self.paths.cgroup_mounts)
            strays = []
            for pid in sorted(cg.members()):
                cwd = fx.proc_link(pid, "cwd")
                wd = self.paths.workdir
                if cwd is None or cwd == wd or cwd.startswith(wd + "/"):
                    continue
                strays.append(pid)
            for pid in strays:
                cg.release(pid, self.warn)
            if strays:
                self.say("moved %d process(es) that are not the agent's out of its cgroup: %s"
                         % (len(strays), " ".join(map(str, strays))))
        running = self.agent_holder() is not None or (mode == "systemd" and self.unit_running())
        for path in (AGENT_PIDFILE, CTL_PIDFILE):
            if self.stale_pid(path) is not None:
                fx.remove(path)
        if not running and fx.isdir(self.paths.tmp_dir):
            fx.rmtree(self.paths.tmp_dir)
        return EXIT_OK

    def cgroup(self, apply, as_json):
        """Show the agent's cgroup and limits; ``--apply`` (sysvinit) creates
        it with its limits and moves the running agent's processes into it.
        Under systemd the unit's CPUQuota/MemoryMax are the limits."""
        if apply:
            self.need_root("cgroup --apply")
        mode = self.mode()
        if mode == "systemd":
            r = self.systemctl("show", SERVICE, "--no-pager",
                               "--property=ControlGroup,MemoryMax,CPUQuotaPerSecUSec",
                               capture=True, check=False)
            facts = {"service_type": mode, "managed_by": "systemd"}
            for line in r.output.splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    facts[key] = value
            if apply:
                self.say("service_type is systemd: the unit's CPUQuota and MemoryMax apply; "
                         "nothing to do")
        else:
            cg = AgentCgroup(self.fx, mounts=self.paths.cgroup_mounts)
            if apply:
                holder = self.agent_holder()
                pids = procs.agent_pids(self.fx, cg, holder) if holder is not None else set()
                cg.move(pids, self.warn)
            facts = {"service_type": mode, "mode": cg.system.mode,
                     "hierarchies": cg.limits(), "members": sorted(cg.members())}
        if as_json:
            self.say(json.dumps(facts, indent=2, sort_keys=True))
        else:
            self.say(_render_cgroup(facts))
        return EXIT_OK

    # ------------------------------------------------------------ sysvinit

    def _sysv_start(self, from_cron):
        fx = self.fx
        cg = AgentCgroup(fx, mounts=self.paths.cgroup_mounts)
        self.leave_agent_cgroup(cg)
        holder = self.agent_holder()
        if holder is not None:
            self.say("elkeid-agent is already running (pid %d)" % holder)
            self._install_cron()
            return EXIT_OK
        stale = self.stale_pid(AGENT_PIDFILE)
        if stale is not None:
            self.say("removing stale %s (pid %s is not running)" % (AGENT_PIDFILE, stale))
            fx.remove(AGENT_PIDFILE)
        if not fx.exists(self.paths.agent):
            raise CtlError("%s is missing; reinstall the elkeid-agent package" % self.paths.agent,
                           EXIT_NOT_INSTALLED)
        cgroup_procs = cg.prepare(self.warn)
        env = dict(self.values())
        env["PATH"] = AGENT_PATH
        if not self.paths.default:
            env["ELKEID_WORKDIR"] = self.paths.workdir
        child = fx.spawn([self.paths.agent, "run"], cwd=self.paths.workdir, env=env,
                         cgroup_procs=cgroup_procs)
        # Write the cron file even if the start fails: cron keeps retrying.
        self._install_cron()
        return self._wait_started(child, cg, cgroup_procs, from_cron)

    def _wait_started(self, child, cg, cgroup_procs, from_cron):
        fx = self.fx
        deadline = fx.monotonic() + START_TIMEOUT
        while True:
            status = child.poll()
            # The agent writes its pid only once it holds the lock. Read the
            # file rather than probing the lock: a probe is a brief shared
            # flock, and one at the wrong instant would make the starting
            # agent believe another agent holds its pid file.
            if (fx.read_text(AGENT_PIDFILE, 64) or "").strip() == str(child.pid):
                break
            if status is not None:
                holder = self.agent_holder()
                if holder is not None:
                    self.say("elkeid-agent is already running (pid %d)" % holder)
                    return EXIT_OK
                raise CtlError("elkeid-agent exited with status %s right after start; see %s"
                               % (status, self.paths.log_file))
            if fx.monotonic() >= deadline:
                self.warn("elkeid-agent (pid %d) is running but has not taken %s after %d s"
                          % (child.pid, AGENT_PIDFILE, START_TIMEOUT))
                break
            fx.sleep(0.1)
        if cgroup_procs and not cg.contains(child.pid):
            self.warn("elkeid-agent (pid %d) is not in its cgroup; it runs without limits"
                      % child.pid)
        what = "was not running; started" if from_cron else "started"
        self.say("elkeid-agent %s (pid %d)" % (what, child.pid))
        return EXIT_OK

    def _install_cron(self):
        fx = self.fx
        line = CRON_LINE
        if fx.exists(self.paths.cron_source):
            line = fx.read_text(self.paths.cron_source) or CRON_LINE
        current = fx.read_text(CRON_FILE)
        if current == line:
            return
        fx.makedirs("/etc/cron.d", 0o755)
        fx.write_file(CRON_FILE, line.encode("utf-8"), 0o600)
        self.restart_cron()

    def _sysv_stop(self):
        fx = self.fx
        # First the cron file, or cron restarts what we are stopping.
        if fx.remove(CRON_FILE):
            self.restart_cron()
        cg = AgentCgroup(fx, mounts=self.paths.cgroup_mounts)
        self.leave_agent_cgroup(cg)
        holder = self.agent_holder()
        stale = self.stale_pid(AGENT_PIDFILE)
        killed = procs.stop(fx, cg, holder, self.say) if holder is not None else []
        if holder is None:
            # No agent, but maybe leftovers in its cgroup (plugins of a crashed agent).
            killed = procs.stop(fx, cg, 0, self.say) if cg.members() else []
        if stale is not None:
            fx.remove(AGENT_PIDFILE)
        cg.remove()
        if holder is None:
            note = " (removed stale pid file naming pid %s)" % stale if stale else ""
            self.say("elkeid-agent is not running%s" % note)
        elif killed:
            self.say("elkeid-agent stopped (killed %d process(es))" % len(killed))
        else:
            self.say("elkeid-agent stopped")
        return EXIT_OK


class _CtlLock:
    def __init__(self, ctl, wait):
        self.ctl = ctl
        self.wait = wait
        self.lock = None

    def __enter__(self):
        fx = self.ctl.fx
        deadline = fx.monotonic() + (LOCK_TIMEOUT if self.wait else 0)
        noted = False
        while True:
            self.lock = fx.try_lock(CTL_PIDFILE)
            if self.lock is not None:
                return self
            holder = fx.pidfile_holder(CTL_PIDFILE)
            who = "pid %d" % holder if holder else "another process"
            if fx.monotonic() >= deadline:
                if self.wait:
                    raise CtlError("another elkeidctl (%s) is still running after %d s; "
                                   "try again later" % (who, LOCK_TIMEOUT), EXIT_BUSY)
                raise CtlError("another elkeidctl (%s) holds %s; not running this check"
                               % (who, CTL_PIDFILE), EXIT_BUSY)
            if not noted:
                self.ctl.say("waiting for another elkeidctl (%s) to finish..." % who)
                noted = True
            fx.sleep(0.2)

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _render_cgroup(facts):
    if facts.get("managed_by") == "systemd":
        keys = ("ControlGroup", "CPUQuotaPerSecUSec", "MemoryMax")
        return "\n".join("%-18s  %s" % (k, facts.get(k, "?")) for k in keys)
    lines = ["%-18s  %s" % ("cgroup", facts["mode"])]
    for kind, h in sorted(facts["hierarchies"].items()):
        detail = ", ".join("%s=%s" % (k, v) for k, v in sorted(h.items())
                           if k not in ("path", "exists"))
        lines.append("%-18s  %s%s" % (kind, h["path"], (" (%s)" % detail) if detail else
                                      ("" if h["exists"] else " (absent)")))
    members = facts["members"]
    lines.append("%-18s  %s" % ("processes", " ".join(map(str, members)) if members else "none"))
    return "\n".join(lines)


def version_line():
    return "elkeidctl (elkeid-agent %s)" % __version__

