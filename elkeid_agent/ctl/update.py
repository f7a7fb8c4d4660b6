"""``elkeidctl update`` and ``elkeidctl rollback``: the update journal by hand.

    elkeidctl update [--json] [--limit N]   the update history, versions not
                                            retried, an update under way
    elkeidctl update --clear                retry the versions a trial failed for
    elkeidctl rollback [--yes]              back to the version before the
                                            newest successful agent update

Both work on ``<workdir>/update/journal.db`` (elkeid_agent/update/journal.py),
which the agent, its update guard and the new version write as an update
goes. ``rollback`` is for a version that passed its trial and misbehaves
later: what the guard does after a failed trial, done by hand. It restores
the backup the newest successful update made (and reinstalls the previous
package where that update kept its file), records itself as a journal row
of its own (context ``manual``) for which elkeidctl is the guard while it
runs, marks the version it leaves as not to be retried, and restarts the
agent as ``elkeidctl restart`` does. File and package steps go through
``InstallEffects`` (elkeid_agent/osfx/install.py).
"""

import contextlib
import json
import os
import sqlite3
import time

from ..osfx import proc_start_ticks
from ..osfx.install import InstallEffects, InstallError, zipapp_meta
from ..update.guard import error_text, restore_package
from ..update.journal import Journal, JournalError, journal_dir
from ..update.offer import AGENT
from ..update.updater import guard_alive
from .layout import EXIT_FAILURE, EXIT_OK, SERVICE, CtlError
from .table import aligned, clip

REASON_WIDTH = 100
_COLUMNS = ("ID", "STARTED", "COMPONENT", "VERSIONS", "INSTALL", "RESULT", "REASON")
# Before these states nothing of an update is installed, and restarting the
# agent ends it (the next start marks it interrupted); from handed_over on
# its guard owns the files.
_UNSWITCHED = ("downloading", "verifying", "backing_up")
MANUAL_REASON = "rolled back by hand with elkeidctl rollback"


def local_time(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@contextlib.contextmanager
def opened(ctl, look_only=False):
    """The workdir's journal, None when no update was ever recorded there.
    A journal that cannot be opened or read is one CtlError (exit 1).
    ``look_only``: a user who may read but not write the file still can;
    one who may write opens it as every writer does (which also recovers
    what a writer killed mid-transaction left)."""
    journal = None
    path = _journal_path(ctl)
    try:
        # Not os.path.exists: a journal this user may not see is no "no journal".
        os.stat(path)
        journal = Journal(ctl.paths.workdir,
                          readonly=look_only and not os.access(path, os.W_OK))
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (JournalError, OSError) as e:
        raise _unusable(ctl, e) from None
    try:
        yield journal
    except (JournalError, sqlite3.Error, json.JSONDecodeError) as e:
        raise _unusable(ctl, e) from None
    finally:
        if journal is not None:
            journal.close()


def _journal_path(ctl):
    return os.path.join(journal_dir(ctl.paths.workdir), "journal.db")


def _unusable(ctl, e):
    text = error_text(e)
    if not text.startswith("update journal"):
        text = "update journal %s: %s" % (_journal_path(ctl), text)
    hint = " (run elkeidctl as root)" if ctl.fx.geteuid() != 0 else ""
    return CtlError(text + hint, EXIT_FAILURE)


# ---------------------------------------------------------------- update

def history(ctl, as_json, limit):
    with opened(ctl, look_only=True) as journal:
        facts = {"updates": [], "rejected": [], "in_flight": []}
        if journal is not None:
            facts["updates"] = [dict(r.as_dict(), events=journal.events(r.id))
                                for r in journal.history(limit=limit)]
            facts["rejected"] = journal.all_rejected()
            facts["in_flight"] = [dict(r.as_dict(), guard_alive=guard_alive(r))
                                  for r in journal.in_flight()]
    ctl.say(json.dumps(facts, indent=2, sort_keys=True) if as_json else render(facts))
    return EXIT_OK


def render(facts):
    lines = []
    if facts["updates"]:
        lines.append(aligned([list(_COLUMNS)] + [
            [str(u["id"]), local_time(u["started"]), u["component"],
             "%s -> %s" % (u["from_version"], u["to_version"]), u["install"] or "-",
             u["state"], clip(u["reason"], REASON_WIDTH)] for u in facts["updates"]]))
    else:
        lines.append("no updates recorded")
    for r in facts["rejected"]:
        lines.append("not retried: %s %s since %s: %s"
                     % (r["component"], r["version"], local_time(r["at"]), r["reason"] or "-"))
    if facts["rejected"]:
        lines.append("('elkeidctl update --clear' forgets them: the server's next offer is "
                     "tried again)")
    for u in facts["in_flight"]:
        guard = ("guard pid %d" % u["guard_pid"]) if u["guard_alive"] else \
            "its guard is not running"
        until = (", trial until %s" % local_time(u["trial_deadline"])) \
            if u["trial_deadline"] else ""
        lines.append("in progress: update %d, %s %s -> %s: %s (%s)%s"
                     % (u["id"], u["component"], u["from_version"], u["to_version"],
                        u["state"], guard, until))
    return "\n".join(lines)


def clear(ctl):
    ctl.need_root("update --clear")
    with opened(ctl) as journal:
        rejected = journal.all_rejected() if journal is not None else []
        cleared = sum(journal.forget_rejections(c)
                      for c in sorted({r["component"] for r in rejected}))
    if not cleared:
        ctl.say("no rejected versions to clear")
    else:
        ctl.say("cleared %d rejected version(s) (%s): the server's next offer of them is "
                "tried again" % (cleared, ", ".join("%s %s" % (r["component"], r["version"])
                                                   for r in rejected)))
    return EXIT_OK


# ---------------------------------------------------------------- rollback

class Plan:
    """What ``rollback`` would do: go from ``installed`` (the file at
    ``target``) back to ``version`` (the backup ``update`` made)."""

    def __init__(self, update, target, installed, version, abandoned, restart, note=""):
        self.update = update
        self.note = note  # how ``installed`` was found, when not from the file
        self.target = target
        self.installed = installed
        self.version = version
        self.abandoned = abandoned
        self.restart = restart

    def lines(self):
        u = self.update
        out = ["roll back elkeid-agent %s -> %s by hand:" % (self.installed, self.version)]
        if self.note:
            out.append("  (%s)" % self.note)
        for row in self.abandoned:
            out.append("  end update %d to %s (%s; nothing of it is installed yet)"
                       % (row.id, row.to_version, row.state))
        out.append("  restore %s from %s (the backup update %d made)"
                   % (self.target, u.backup, u.id))
        if u.install in ("deb", "rpm"):
            if u.backup_package and os.path.isfile(u.backup_package):
                out.append("  reinstall the %s package %s" % (self.version, u.backup_package))
            else:
                out.append("  leave the %s package database as it is (it keeps recording %s: "
                           "the %s package file was not kept)"
                           % (u.install, u.to_version, self.version))
        out.append("  restart the agent (%s)" % self.restart)
        out.append("  not retry %s when the server offers it again (until 'elkeidctl update "
                   "--clear')" % self.installed)
        return out


def rollback(ctl, yes, fx=None):
    ctl.need_root("rollback")
    with opened(ctl) as journal:
        if journal is None:
            raise CtlError("nothing to roll back: no update is recorded in %s"
                           % journal_dir(ctl.paths.workdir))
        plan = _plan(ctl, journal)
        for line in plan.lines():
            ctl.say(line)
        if not yes:
            raise CtlError("nothing done: rerun with --yes to roll back")
        return _roll_back(ctl, journal, fx or InstallEffects(), plan)


def _plan(ctl, journal):
    abandoned = []
    for row in journal.in_flight(AGENT):
        if guard_alive(row):
            until = (", trial until %s" % local_time(row.trial_deadline)) \
                if row.trial_deadline else ""
            raise CtlError("update %d to %s is in progress (%s, guard pid %d%s): wait until it "
                           "ends ('elkeidctl update' shows it)"
                           % (row.id, row.to_version, row.state, row.guard_pid, until))
        if row.state not in _UNSWITCHED:
            raise CtlError("update %d to %s stopped during %s and its guard is not running: "
                           "restart the agent ('elkeidctl restart'), which finishes it, then "
                           "run this again if still needed" % (row.id, row.to_version, row.state))
        abandoned.append(row)
    last = journal.last_succeeded(AGENT)
    if last is None:
        raise CtlError("nothing to roll back: no successful update of elkeid-agent is recorded")
    if not last.backup or not os.path.isfile(last.backup):
        raise CtlError("cannot roll back update %d (%s -> %s): its backup %s is gone"
                       % (last.id, last.from_version, last.to_version, last.backup or "(none)"))
    meta = zipapp_meta(last.backup)
    if meta is None:
        raise CtlError("cannot roll back update %d: its backup %s is not an elkeid-agent zipapp"
                       % (last.id, last.backup))
    version = str(meta.get("version", ""))
    target = last.context.get("target") or ctl.paths.agent
    current = zipapp_meta(target)
    note = ""
    if current is not None:
        installed = str(current.get("version", ""))
    else:
        installed = last.to_version
        note = ("%s is not a readable elkeid-agent zipapp; taking it to be %s, what update %d "
                "installed" % (target, installed, last.id))
    if installed == version:
        raise CtlError("elkeid-agent %s, the version before update %d, is already installed at "
                       "%s: nothing to roll back" % (version, last.id, target))
    restart = ("systemctl restart %s" % SERVICE) if ctl.mode() == "systemd" else \
        "stop it, then start it, as 'elkeidctl restart' does"
    return Plan(last, target, installed, version, abandoned, restart, note)


def _roll_back(ctl, journal, fx, plan):
    u = plan.update
    for row in plan.abandoned:
        try:
            journal.move(row.id, "interrupted", "ended by 'elkeidctl rollback'")
        except JournalError:
            raise CtlError("update %d to %s moved on meanwhile; nothing done: run this again "
                           "once it ends" % (row.id, row.to_version)) from None
    pid = os.getpid()
    uid = journal.begin(
        AGENT, plan.installed, plan.version, state="rolling_back", kind="pyz",
        install=u.install, manager=ctl.mode(), backup=u.backup, backup_package=u.backup_package,
        reason="rollback by hand with elkeidctl rollback",
        # elkeidctl is this row's guard while it runs: a second rollback, or
        # an agent starting meanwhile, sees it in progress and leaves it be.
        guard_pid=pid, guard_start=proc_start_ticks(pid) or 0,
        context={"manual": True, "target": plan.target, "rolled_back_update": u.id})
    try:
        fx.replace_file(u.backup, plan.target)
    except (InstallError, OSError) as e:
        why = "restoring %s from %s failed: %s" % (plan.target, u.backup, error_text(e))
        journal.move(uid, "rollback_failed", "rollback by hand with elkeidctl rollback "
                                             "failed: %s" % why)
        raise CtlError("rollback failed, %s is unchanged: %s" % (plan.target, why)) from None
    notes = [restore_package(fx, u)] if u.install in ("deb", "rpm") else []
    notes = [n for n in notes if n]
    sha256 = u.package_sha256 if plan.installed == u.to_version else ""
    journal.reject(AGENT, plan.installed, sha256, MANUAL_REASON)
    journal.move(uid, "rolled_back", "; ".join([MANUAL_REASON] + notes))
    ctl.say("restored elkeid-agent %s at %s (journal update %d)"
            % (plan.version, plan.target, uid))
    for n in notes:
        ctl.warn(n)
    ctl.say("%s is not retried when the server offers it again; 'elkeidctl update --clear' "
            "undoes that" % plan.installed)
    try:
        ctl.restart()
    except CtlError as e:
        journal.set(uid, reason=journal.get(uid).reason +
                    "; restarting the agent failed: %s" % e)
        raise CtlError("elkeid-agent %s is restored, but restarting the agent failed: %s"
                       % (plan.version, e), e.code) from None
    ctl.say("restarted the agent")
    return EXIT_OK
