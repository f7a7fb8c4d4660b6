"""The update guard: the process that outlives the switch.

Started by the old agent once the download is verified and backed up, from
the backup copy of the old version (known-good code, whatever the new
version does), outside the agent's cgroup: under systemd as its own
transient unit (``elkeid-agent-update-<id>.service``), since
``KillMode=control-group`` kills everything in the agent's cgroup when the
agent stops; elsewhere in its own session, moved out of the sysvinit
cgroup. It then:

1. switches: the zipapp renamed over the old one in its own directory, or
   ``dpkg -i`` / ``rpm -Uvh`` of the package;
2. restarts the agent: ``systemctl restart``, ``elkeidctl restart``
   (sysvinit), or lets the old agent re-execute itself (no manager);
3. watches the trial until ``verify_timeout`` has passed: the new version
   must mark itself healthy (connected, heartbeat sent) and the process
   that did so must still be the agent at the end. An exit, a restart, a
   failed start or no health mark by the deadline fail the trial;
4. on success keeps the installed package for a later rollback and prunes
   old backups; on failure restores the backup (and reinstalls the previous
   package where its file is at hand, so the package manager agrees with
   the files), records the version as rejected, and starts the old version.

Run again on a row whose guard vanished (host reboot, kill), it rolls back:
an unfinished trial is not a verified one.
"""

import argparse
import logging
import os
import signal
import sys
import time

from ..osfx import proc_start_ticks, signal_process
from ..osfx.install import InstallEffects, InstallError, running
from .journal import Journal, JournalError

log = logging.getLogger("elkeid_agent.update.guard")

POLL_SECONDS = 0.5
STOP_SECONDS = 20.0
RESTART_TIMEOUT = 180.0


class TrialFailed(Exception):
    """The trial failed; ``reject``: the new version is to blame (it is
    not tried again while offered)."""

    def __init__(self, message, reject=True):
        super().__init__(message)
        self.reject = reject


class Guard:
    def __init__(self, journal, uid, fx=None, clock=time.time, sleep=time.sleep):
        self.journal = journal
        self.uid = uid
        self.fx = fx or InstallEffects()
        self.clock = clock
        self.sleep = sleep

    @property
    def row(self):
        return self.journal.get(self.uid)

    def run(self):
        row = self.row
        if row is None or row.final:
            log.info("update %s: nothing to do (%s)", self.uid,
                     "no such update" if row is None else row.state)
            return 0
        self.journal.set(self.uid, guard_pid=os.getpid(),
                         guard_start=proc_start_ticks(os.getpid()) or 0)
        if row.manager == "sysvinit":
            try:
                self.fx.leave_agent_cgroup(os.getpid(), log.warning)
            except Exception as e:  # no cgroups here: nothing to leave
                log.warning("could not leave the agent's cgroup: %s", e)
        if row.state == "handed_over":
            return self.update(row)
        return self.rollback(row, "the update guard stopped during %s (host reboot or kill); "
                                  "an unfinished trial is not a verified one" % row.state,
                             reject=False)

    # ------------------------------------------------------------ update

    def update(self, row):
        ctx = row.context
        self.journal.move(self.uid, "switching")
        try:
            if row.install == "pyz":
                self.fx.replace_file(row.package, ctx["target"])
            else:
                self.fx.install_package(row.package, row.install, ctx.get("allow_downgrade"))
        except (InstallError, OSError) as e:
            return self.rollback(self.row, "install failed: %s" % error_text(e), reject=True)
        timeout = float(ctx.get("verify_timeout", 300))
        self.journal.move(self.uid, "trial", trial_deadline=self.clock() + timeout)
        log.info("update %d: %s in place; restarting", self.uid, row.to_version)
        try:
            same = self._restart(row)
            # The window runs from the new version's start, not from the
            # switch: stopping the old agent and a cold start take their time.
            deadline = self.clock() + timeout
            self.journal.set(self.uid, trial_deadline=deadline)
            log.info("update %d: trial until %s", self.uid,
                     time.strftime("%H:%M:%S", time.localtime(deadline)))
            self.watch(same, deadline, timeout)
        except TrialFailed as e:
            return self.rollback(self.row, str(e), reject=e.reject)
        return self.succeed(self.row)

    def _restart(self, row):
        """Start the new version; returns a function telling whether the
        agent that started is still the one running (TrialFailed if not)."""
        ctx = row.context
        if row.manager == "systemd":
            try:
                self.fx.systemctl("restart", "elkeid-agent.service", timeout=RESTART_TIMEOUT)
            except InstallError as e:
                raise TrialFailed("the new version did not start: %s" % e) from None
            first = self.fx.unit_state()

            def same():
                now = self.fx.unit_state()
                if now.get("ActiveState") != "active" or now.get("MainPID") != first.get("MainPID"):
                    raise TrialFailed("the new version exited during the trial (%s/%s, exit "
                                      "status %s)" % (now.get("ActiveState"), now.get("SubState"),
                                                      now.get("ExecMainStatus")))
            return same
        if row.manager == "sysvinit":
            code = self._ctl("restart")
            if code != 0:
                raise TrialFailed("the new version did not start (elkeidctl restart: %d)" % code)
            holder = self._pidfile_holder(ctx)

            def same():
                if holder is None or self._pidfile_holder(ctx) != holder:
                    raise TrialFailed("the new version exited during the trial")
            return same
        pid, start = ctx["agent_pid"], ctx["agent_start"]

        def same():
            # The old agent re-executes itself: same pid, same start time;
            # it marks the re-exec once it has shut down (updater.mark_reexec).
            if not running(pid, start):
                if not self.row.context.get("reexec_at"):
                    raise TrialFailed("the old agent exited before it re-executed the new "
                                      "version", reject=False)
                raise TrialFailed("the new version exited during the trial")
        return same

    def watch(self, same, deadline, timeout):
        while True:
            same()
            row = self.row
            reexec_at = row.context.get("reexec_at")
            if reexec_at:  # no manager: the new version starts when the old one re-executes
                deadline = max(deadline, reexec_at + timeout)
            if row.healthy_at and not running(row.new_pid, row.new_start):
                raise TrialFailed("the new version exited after it reported healthy")
            if self.clock() >= deadline:
                if not row.healthy_at and row.manager == "none" and not reexec_at:
                    # The old agent is still shutting down for its re-exec:
                    # the new version never ran, so it is not to blame.
                    raise TrialFailed("the old agent did not re-execute the new version "
                                      "within %d s" % round(timeout), reject=False)
                if not row.healthy_at:
                    raise TrialFailed("the new version did not connect and send a heartbeat "
                                      "within %d s" % round(row.context.get("verify_timeout", 0)))
                return
            self.sleep(POLL_SECONDS)

    def succeed(self, row):
        ctx = dict(row.context)
        kept = ""
        if row.install in ("deb", "rpm") and row.package:
            kept = os.path.join(ctx["backup_dir"], "elkeid-agent_%s.%s" % (row.to_version,
                                                                         row.install))
            try:
                os.replace(row.package, kept)
            except OSError:
                # The download and backup directories may be on two file
                # systems (each is a setting): copy where a rename cannot.
                try:
                    self.fx.copy_file(row.package, kept)
                except OSError as e:
                    log.warning("cannot keep the installed package for rollbacks: %s",
                                error_text(e))
                    kept = ""
        _unlink(row.package)
        ctx["installed_package"] = kept
        self.journal.move(self.uid, "succeeded", "healthy for the whole trial", context=ctx)
        log.info("update %d: %s -> %s succeeded", self.uid, row.from_version, row.to_version)
        prune(ctx["backup_dir"], int(ctx.get("max_backups", 5)), keep=(kept, row.backup))
        return 0

    # ------------------------------------------------------------ rollback

    def rollback(self, row, reason, reject):
        ctx = row.context
        log.error("update %d: %s; rolling back to %s", self.uid, reason, row.from_version)
        if row.state != "rolling_back":  # else a guard before us began it
            self.journal.move(self.uid, "rolling_back", reason)
        notes = []
        try:
            self._stop_new(row)
            self.fx.replace_file(row.backup, ctx["target"])
            if row.install in ("deb", "rpm"):
                notes.append(restore_package(self.fx, row))
        except (InstallError, OSError, KeyError) as e:
            why = "%s; rollback failed: %s" % (reason, error_text(e))
            self.journal.move(self.uid, "rollback_failed", why)
            log.error("update %d: %s", self.uid, why)
            self._start_old(row)
            return 1
        if reject:
            self.journal.reject(row.component, row.to_version, row.package_sha256, reason)
        _unlink(row.package)
        self.journal.move(self.uid, "rolled_back",
                          "; ".join([reason] + [n for n in notes if n]))
        self._start_old(row)
        log.info("update %d: %s restored", self.uid, row.from_version)
        return 0

    def _stop_new(self, row):
        if row.manager != "none":
            return  # the restart below replaces it
        pid, start = row.context["agent_pid"], row.context["agent_start"]
        for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 5.0)):
            if not running(pid, start):
                return
            signal_process(pid, sig)
            end = self.clock() + wait
            while self.clock() < end and running(pid, start):
                self.sleep(0.1)

    def _start_old(self, row):
        ctx = row.context
        try:
            if row.manager == "systemd":
                self.fx.run(["systemctl", "reset-failed", "elkeid-agent.service"], 30)
                self.fx.systemctl("restart", "elkeid-agent.service", timeout=RESTART_TIMEOUT)
            elif row.manager == "sysvinit":
                code = self._ctl("restart")
                if code != 0:
                    raise InstallError("elkeidctl restart exited with %d" % code)
            else:
                # Started by hand before, so its console is gone: its
                # stdout/stderr go to a file beside the agent's log.
                log_path = os.path.join(os.path.dirname(self.journal.dir), "log",
                                        "elkeid-agent.restored.log")
                self.fx.spawn_detached([ctx["python"], "-sE", ctx["target"]] + ctx["argv"],
                                       ctx.get("cwd", "/"), ctx.get("env", {}), log_path, "none")
        except (InstallError, OSError) as e:
            log.error("update %d: starting %s again failed: %s", self.uid, row.from_version, e)
            self.journal.set(self.uid, reason=(self.row.reason or "") +
                             "; starting it again failed: %s" % error_text(e))

    # ------------------------------------------------------------ sysvinit

    def _ctl(self, action):
        return self.fx.ctl(os.path.dirname(self.journal.dir), action)

    def _pidfile_holder(self, ctx):
        return self.fx.pidfile_holder(ctx.get("pidfile", "/var/run/elkeid-agent.pid"))


def restore_package(fx, row):
    """After the files of ``row.from_version`` are back: reinstall its
    package, so the package manager agrees with the files. '' when done,
    else a note saying what the package database records instead."""
    if not row.backup_package or not os.path.isfile(row.backup_package):
        recorded = fx.installed_version("deb" if row.install == "deb" else "rpm")
        return ("the package database says %s while the files are %s again: the %s "
                "package file is not at hand" % (recorded or row.to_version,
                                                 row.from_version, row.from_version))
    try:
        fx.install_package(row.backup_package, row.install, allow_downgrade=True)
    except InstallError as e:
        return "reinstalling the %s package failed: %s" % (row.from_version, e)
    return ""


def prune(backup_dir, keep_count, keep=(), owns=lambda name: name.startswith("elkeid-agent_")):
    """Keep the newest ``keep_count`` backups of each kind (and every path
    in ``keep``) among the names ``owns`` says are this component's."""
    try:
        names = [n for n in os.listdir(backup_dir) if owns(n)]
    except OSError:
        return
    full = []
    for n in names:
        p = os.path.join(backup_dir, n)
        try:
            full.append((os.stat(p).st_mtime, p))
        except OSError:
            continue
    for kind in (".bak", ".deb", ".rpm"):
        group = sorted((m, p) for m, p in full if p.endswith(kind))
        for _m, p in group[:max(0, len(group) - keep_count)]:
            if p not in keep:
                _unlink(p)


def _unlink(path):
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def error_text(e):
    return getattr(e, "strerror", None) and "%s (%s)" % (e.strerror, getattr(e, "filename", "")) \
        or str(e)


def main(argv=None):
    p = argparse.ArgumentParser(prog="elkeid-agent update-guard",
                                description="watch one update (started by the agent)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--id", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s update-guard[%(process)d] %(levelname)s %(message)s")
    try:
        journal = Journal(args.workdir)
        return Guard(journal, args.id).run()
    except JournalError as e:
        log.error("%s", e)
        return 1
