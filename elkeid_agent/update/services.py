"""A local service's binary updated by the running agent (task 1070).

The server sends a task ``object_name == "elkeid-agent"``, ``data_type ==
1070``, whose ``data`` is an UpdateRequest (offer.py) naming a service of
the services file as ``component``. The agent survives a bad service, so
no guard process takes part: one job of the agent does every step, each a
state of the update journal (rows with install ``binary``, manager
``agent``; journal.py):

downloading (sha256 checked as the bytes arrive, the agent's size limit)
-> verifying (size; the signature when a key is configured) -> backing_up
(``<backup_dir>/<id>_<YYYYmmddHHMMSS>.bak``) -> switching (the new file
renamed over ``binary_path``, its mode kept; the supervisor restarts the
service) -> trial (the health gate below) -> succeeded (older backups
beyond ``max_backups`` pruned), or rolling_back -> rolled_back (backup
restored, service restarted, version rejected) | rollback_failed.

Health gate: for ``verify_timeout`` after the new run started, the service
stays running with the same pid and no restart, no health check fails, and
at the end its health is ``healthy`` (a heartbeat received when
``heartbeat_timeout`` > 0, the HTTP probe answered when ``http_endpoint``
is set; with neither, running the whole window is the evidence).

Refused with a plain 5100 and no journal row: data that is not an
UpdateRequest, ``component`` elkeid-agent (the configs list's entry updates
the agent itself), a service the file lacks or disables, any request while
the services file is invalid. Refused with a row and its 5100 (result
``refused``, nothing changed): another update of the service in flight, a
version that failed its trial before (until another version is offered),
the installed version again or an older one without ``allow_downgrade``, a
``binary_path`` that is not a regular file, a service stopped on request.
The installed version is the one the journal's last successful update of
the service installed; before any, every version is accepted.

``recover`` runs once the services are booted: a row a killed agent left
before switching is ``interrupted``; one it left switching, on trial or
rolling back is rolled back and reported (an unfinished trial is not a
verified one; the version is not rejected for it).
"""

import asyncio
import json
import logging
import os
import re
import stat
import time

from ..errors import ServerFault
from ..osfx.install import InstallError
from ..services.health import DEAD, HEALTHY, HTTP_FAILED, NO_HEARTBEAT, OVER_LIMIT
from . import offer as offers
from .guard import error_text, prune
from .journal import JournalError
from .trial import report
from .updater import (BEFORE_SWITCH, DOWNLOAD_MAX_BYTES, POLICY_UNKNOWN, UpdaterBase,
                      UpdatePaths, download_offer, interrupt, update_key)
from .verify import VerifyError, check_size

log = logging.getLogger(__name__)

INSTALL, MANAGER = "binary", "agent"
UNKNOWN_VERSION = "unknown"
POLL_SECONDS = 0.2
FAILING = (DEAD, NO_HEARTBEAT, HTTP_FAILED, OVER_LIMIT)


class TrialFailed(Exception):
    pass


def backup_name(service_id, when):
    return "%s_%s.bak" % (service_id, time.strftime("%Y%m%d%H%M%S", time.gmtime(when)))


def owns_backup(service_id):
    """Whether a backup directory entry is one of this service's backups
    (service ``a`` must not prune ``a_b``'s)."""
    return re.compile(r"^%s_\d{14}\.bak$" % re.escape(service_id)).match


def binary_refusal(path):
    """Why the file at ``path`` cannot be replaced by an update, or None."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return "binary_path %s: %s" % (path, e.strerror or e)
    if stat.S_ISLNK(st.st_mode):
        return ("binary_path %s is a symbolic link; an update replaces a regular file, so "
                "name the file it points to" % path)
    if not stat.S_ISREG(st.st_mode):
        return "binary_path %s is not a regular file" % path
    return None


class ServiceUpdater(UpdaterBase):
    def __init__(self, settings, state, metrics, owner, executors, emit, policy, services,
                 journal, fx=None, clock=time.time):
        """``services()``: the ServiceSupervisor or None; ``journal()``: the
        update journal the agent's updater uses; the rest as UpdaterBase."""
        super().__init__(settings, state, metrics, owner, executors, emit, policy, fx, clock)
        self.services = services
        self.journal = journal
        metrics.describe("service_update_requests", "service update tasks (1070) received")
        metrics.describe("service_updates", "finished service updates, by result")

    # ------------------------------------------------------------ requests

    def offer(self, data, token):
        """A 1070 task's data (called on the loop): the journal row's id,
        a refusal included; ServerFault for a request no row is kept of."""
        self.metrics.inc("service_update_requests")
        try:
            off = offers.from_update_request(data, token)
        except offers.OfferError as e:
            raise ServerFault("service update: %s" % e, token) from None
        sid = off.component
        if sid == offers.AGENT:
            raise ServerFault("service update: component elkeid-agent is this agent; use the "
                              "configs list's elkeid-agent entry to update it", token)
        sup, policy = self.services(), self.policy()
        if sup is None:
            raise ServerFault("service update of %s: no local services are configured" % sid,
                              token)
        if policy is None:
            raise ServerFault("service update of %s: %s" % (sid, POLICY_UNKNOWN), token)
        spec, unknown = sup.enabled_spec(sid)
        if unknown:
            raise ServerFault("service update: %s" % unknown, token)
        try:
            journal = self.journal()
            journal.forget_rejections(sid, except_version=off.version)
            rejected = journal.rejected(sid, off.version)
            last = journal.last_succeeded(sid)
            busy = journal.in_flight(sid)
        except Exception as e:  # JournalError, sqlite3.Error
            raise _journal_fault(sid, e, token) from None
        current = last.to_version if last is not None else ""
        if busy:
            why = "the update of %s to %s is still in progress" % (sid, busy[0].to_version)
        elif rejected:
            why = ("%s failed its trial before (%s); offer another version"
                   % (off.version, rejected["reason"]))
        else:
            why = offers.refusal(off, current) if current else None
        why = why or binary_refusal(spec.binary_path)
        if why is None and (sup.status_of(sid) or {}).get("state") == "stopped":
            why = "service %s is stopped on request; start it first" % sid
        try:
            uid = journal.begin(sid, current or UNKNOWN_VERSION, off.version,
                                state="refused" if why else "downloading", install=INSTALL,
                                manager=MANAGER, reason=why or "", package_sha256=off.sha256,
                                context={"token": token, "binary": spec.binary_path})
        except Exception as e:  # JournalError, sqlite3.Error (a full disk)
            raise _journal_fault(sid, e, token) from None
        if why:
            log.error("update of service %s to %s refused: %s", sid, off.version, why)
            self._finish(uid)
            return uid
        log.info("updating service %s %s -> %s (%s)", sid, current or UNKNOWN_VERSION,
                 off.version, spec.binary_path, extra={"console": True})
        self.owner.run_once("service update %s" % sid, self._run(off, uid, spec, policy))
        return uid

    # ------------------------------------------------------------ the job

    async def _run(self, off, uid, spec, policy):
        try:
            download = await self._prepare(off, uid, spec.binary_path, policy)
        except asyncio.CancelledError:
            raise  # the next start marks it interrupted
        except (VerifyError, InstallError, OSError) as e:
            return self._fail(uid, error_text(e))
        except Exception as e:  # a saturated pool, the journal: nothing switched yet
            log.exception("update of service %s to %s failed unexpectedly", spec.id, off.version)
            return self._fail(uid, "unexpected %s: %s" % (type(e).__name__, e))
        try:
            await self.executors.run("update", self.fx.replace_file, download, spec.binary_path)
        except asyncio.CancelledError:
            raise  # switching: the next start rolls it back
        except Exception as e:  # OSError (disk full ...), Saturated: the old file stays
            return await self._rollback(uid, "switching failed: %s" % error_text(e), reject=False,
                                        restart=False)
        try:
            await self._trial(uid, spec.id, policy.verify_timeout)
        except asyncio.CancelledError:
            raise  # on trial: the next start rolls it back
        except TrialFailed as e:
            return await self._rollback(uid, str(e), reject=True)
        except Exception as e:
            log.exception("trial of service %s %s failed unexpectedly", spec.id, off.version)
            return await self._rollback(uid, "trial not completed: %s: %s"
                                        % (type(e).__name__, e), reject=False)
        await self._succeed(uid, spec.id, policy)

    async def _prepare(self, off, uid, binary, policy):
        """Download, verify, back up; the downloaded file. The row is in
        ``switching`` when this returns."""
        journal = self.journal()
        paths = UpdatePaths(self.settings.workdir, policy)
        dest = os.path.join(paths.download_dir, "%s-%d.download" % (off.component, uid))
        journal.set(uid, package=dest)
        await self.executors.run("update", _fetch, off, dest, paths)
        journal.move(uid, "verifying")
        await self.executors.run("update", self._verify, off, dest, policy)
        backup = os.path.join(paths.backup_dir, backup_name(off.component, self.clock()))
        # Named before it is written: a kill while copying leaves a row that
        # says which (partial) file to remove.
        journal.move(uid, "backing_up", backup=backup)
        try:
            await self.executors.run("update", self.fx.copy_file, binary, backup, 0o700)
        except OSError as e:
            raise InstallError("backup of %s to %s failed: %s"
                               % (binary, paths.backup_dir, e.strerror or e)) from None
        journal.move(uid, "switching")
        return dest

    def _verify(self, off, dest, policy):
        check_size(dest, DOWNLOAD_MAX_BYTES)
        key = update_key(self.settings, policy)
        if key is None:
            return
        if off.signature is None:
            raise VerifyError("a public key is configured (%s) and the update request has no "
                              "signature" % key.path)
        scheme = key.verify(dest, off.signature)
        log.info("update of service %s to %s: signature verified (%s, key %s)", off.component,
                 off.version, scheme, key.path)

    async def _trial(self, uid, sid, window):
        sup = self.services()
        ok, said = await sup.restart(sid)
        first = sup.status_of(sid)
        if not ok or first is None:
            raise TrialFailed("the new binary did not start: %s" % _ending(first, said))
        deadline = self.clock() + window
        journal = self.journal()
        journal.move(uid, "trial", trial_deadline=deadline, new_pid=first["pid"])
        log.info("update %d: service %s restarted as pid %d; trial of %g s", uid, sid,
                 first["pid"], window)
        healthy = False
        while True:
            now = sup.status_of(sid)
            if now is None:
                raise TrialFailed("service %s left the services file during its trial" % sid)
            if now["state"] != "running" or now["pid"] != first["pid"] \
                    or now["restarts"] != first["restarts"]:
                raise TrialFailed("the new binary exited during the trial (%s)"
                                  % _ending(now, "service %s is %s" % (sid, now["state"])))
            if now["health"] in FAILING:
                raise TrialFailed("health check %s during the trial (checks %s)"
                                  % (now["health"], json.dumps(now["checks"], sort_keys=True)))
            if now["health"] == HEALTHY and not healthy:
                healthy = True
                journal.set(uid, healthy_at=self.clock())
            if self.clock() >= deadline:
                if now["health"] != HEALTHY:
                    raise TrialFailed("not healthy within %g s (health %s, checks %s)"
                                      % (window, now["health"] or "unknown",
                                         json.dumps(now["checks"], sort_keys=True)))
                return
            await asyncio.sleep(POLL_SECONDS)

    async def _succeed(self, uid, sid, policy):
        journal = self.journal()
        row = journal.get(uid)
        self.fx.remove(row.package)
        journal.move(uid, "succeeded", "healthy for the whole trial")
        self._finish(uid)
        paths = UpdatePaths(self.settings.workdir, policy)
        try:
            await self.executors.run("update", prune, paths.backup_dir, policy.max_backups,
                                     (row.backup,), owns_backup(sid))
        except Exception as e:  # a saturated pool: the next success prunes
            log.warning("service %s: old backups not pruned: %s", sid, e)

    def _fail(self, uid, why):
        try:
            journal = self.journal()
            journal.move(uid, "failed", why)
            self.fx.remove(journal.get(uid).package)
            self._finish(uid)
        except JournalError as e:
            log.error("update journal: %s", e)

    async def _rollback(self, uid, reason, reject, restart=True):
        journal = self.journal()
        row = journal.get(uid)
        binary = row.context.get("binary", "")
        log.error("update %d of service %s: %s; restoring %s", uid, row.component, reason,
                  row.backup)
        if row.state != "rolling_back":
            journal.move(uid, "rolling_back", reason)
        try:
            if not row.backup or not binary:
                raise InstallError("the row names no backup or binary")
            await self.executors.run("update", self.fx.replace_file, row.backup, binary)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # OSError, InstallError, Saturated
            journal.move(uid, "rollback_failed", "%s; restoring %s failed: %s"
                         % (reason, row.backup, error_text(e)))
            self._finish(uid)
            return
        if reject:
            journal.reject(row.component, row.to_version, row.package_sha256, reason)
        self.fx.remove(row.package)
        notes = [reason]
        if restart:
            notes.append(await self._start_restored(row.component))
        journal.move(uid, "rolled_back", "; ".join(n for n in notes if n))
        self._finish(uid)

    async def _start_restored(self, sid):
        sup = self.services()
        if sup is None or sup.status_of(sid) is None:
            return "service %s is no longer supervised: the restored binary was not started" % sid
        ok, said = await sup.restart(sid)
        return "" if ok else "the restored binary did not start either: %s" % said

    def _finish(self, uid):
        journal = self.journal()
        row = journal.get(uid)
        self.metrics.inc("service_updates", result=row.state)
        report(journal, row, self.emit, self.state)

    # ------------------------------------------------------------ start-up

    def recover(self):
        """Close or roll back what a killed agent left (module docstring)."""
        try:
            journal = self.journal()
            rows = [r for r in journal.in_flight() if r.install == INSTALL
                    and r.component != offers.AGENT]
        except Exception as e:  # JournalError, sqlite3.Error
            log.error("update journal unusable: %s", e)
            return
        for row in rows:
            if row.state in BEFORE_SWITCH:
                interrupt(journal, row)
                self._finish(row.id)
                continue
            reason = ("the agent stopped during %s; an unfinished trial is not a verified one"
                      % row.state)
            self.owner.run_once("service update %s" % row.component,
                                self._rollback(row.id, reason, reject=False))


def _journal_fault(sid, error, token):
    return ServerFault("service update of %s: update journal unusable: %s" % (sid, error), token)


def _fetch(off, dest, paths):
    for d in (paths.download_dir, paths.backup_dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
    return download_offer(off, dest)


def _ending(status, fallback):
    """How a run ended, from its status dict."""
    if not status:
        return fallback
    said = []
    for text in (status.get("last_exit"), status.get("last_error")):
        if text and text not in said:
            said.append(text)
    return "; ".join(said) or fallback
