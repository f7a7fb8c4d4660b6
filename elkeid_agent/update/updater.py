"""The agent's side of a self-update: from an offer to the hand-over.

``AgentUpdater.offer`` is called for the ``elkeid-agent`` entry of every
configs list whose version differs from the running one. It refuses, with
a report and before anything changes, what cannot or must not be applied
(a bad offer, a version a trial already failed for, a downgrade without
``allow_downgrade``, a package kind this install cannot take, another
update in progress, an unknown update policy). Otherwise one job downloads
(every URL in turn, sha256 checked as the bytes arrive), verifies (size,
kind from the magic bytes, the package's own name/version/architecture,
the signature when a key is configured), backs up the running file (and
the package it came from, where that is at hand), and starts the guard
(guard.py) from the backup copy. From then on the guard owns the update.
Where no service manager runs the agent, the agent re-executes itself once
the guard has switched the file (``reexec_requested``).

``recover`` runs at start-up: it closes rows a killed agent left half-done
before the hand-over (``interrupted``), and gives an update whose guard is
gone to a new guard, which rolls it back.
"""

import asyncio
import logging
import os
import sys
import time

from .. import __version__
from ..osfx import proc_start_ticks
from ..osfx.install import InstallEffects, InstallError, running, staging_path
from . import offer as offers
from .journal import Journal, JournalError
from .verify import PublicKey, VerifyError, check_size

log = logging.getLogger(__name__)

DOWNLOAD_MAX_BYTES = 512 << 20   # the plugins' rule (docs/protocol.md section 2)
DOWNLOAD_TIMEOUT = 600.0
SIGNATURE_MAX_BYTES = 16384
POLICY_UNKNOWN = ("the services file is invalid, so the update policy (and its public key) "
                  "is unknown; fix the file first")
HANDOVER_GRACE = 60.0            # a guard just spawned has this long to register
GUARD_UNIT = "elkeid-agent-update"
_DAEMONIZE = ("import os, sys\n"
              "if os.fork():\n"
              "    os._exit(0)\n"
              "os.execv(sys.argv[1], sys.argv[1:])\n")


def running_archive():
    """Path of the zipapp this process runs from, '' when it runs from a
    source tree (the bootstrap module is imported from inside the archive)."""
    boot = sys.modules.get("_elkeid_boot")
    path = getattr(boot, "__file__", "") or ""
    return os.path.dirname(os.path.abspath(path)) if path else ""


class UpdatePaths:
    """Where an update's files go (the services file's ``update:``
    section, defaults under ``<workdir>/update/``)."""

    def __init__(self, workdir, policy):
        base = os.path.join(workdir, "update")
        self.download_dir = policy.download_dir or os.path.join(base, "download")
        self.backup_dir = policy.backup_dir or os.path.join(base, "backup")
        self.guard_log = os.path.join(workdir, "log", "update-guard.log")


def upstream_version(package_version):
    """``3:1.2.3-1`` (epoch, release) -> ``1.2.3``."""
    v = package_version.split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v


def guard_alive(row):
    return running(row.guard_pid, row.guard_start)


def update_key(settings, policy):
    """The update-signing key (``verify.PublicKey``) every update is
    checked with, or None: ``update_public_key`` (ELKEID_UPDATE_PUBKEY),
    else the services file's ``update.public_key_file``. VerifyError when
    a key is configured but unusable (fails closed)."""
    path = settings.update_public_key or (policy.public_key_file if policy else "")
    return PublicKey(settings.path(path)) if path else None


def download_offer(off, dest):
    """Fetch ``off``'s bytes to ``dest`` (every URL in turn, sha256 checked
    as they arrive); the URL that served them. Blocking."""
    from ..plugins.fetch import FetchError, download
    try:
        return download(list(off.urls), dest, off.sha256, DOWNLOAD_MAX_BYTES, DOWNLOAD_TIMEOUT)
    except FetchError as e:
        raise VerifyError("download failed: %s" % e) from None


BEFORE_SWITCH = ("downloading", "verifying", "backing_up")


def interrupt(journal, row, reason=""):
    """Close a row a killed agent left before anything was switched: it
    becomes ``interrupted`` and its download and backup are removed."""
    journal.move(row.id, "interrupted", reason or "the agent stopped during %s" % row.state)
    remove_update_files(row)
    log.warning("update %d of %s to %s was interrupted during %s", row.id, row.component,
                row.to_version, row.state)


class UpdaterBase:
    """What every updater works with (this one and update/services.py's)."""

    def __init__(self, settings, state, metrics, owner, executors, emit, policy, fx=None,
                 clock=time.time):
        """``policy()``: the services file's UpdatePolicy, or None while that
        file is invalid (then nothing is updated: the key it names is
        unknown). ``emit(record)``: queue one of the agent's own records."""
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.owner = owner
        self.executors = executors
        self.emit = emit
        self.policy = policy
        self.fx = fx or InstallEffects()
        self.clock = clock


class AgentUpdater(UpdaterBase):
    def __init__(self, settings, state, metrics, owner, executors, emit, policy,
                 fx=None, archive=None, journal=None, clock=time.time):
        super().__init__(settings, state, metrics, owner, executors, emit, policy, fx, clock)
        self.archive = running_archive() if archive is None else archive
        self._journal = journal
        self._job = None
        self._install = None
        self._manager = None
        self.reexec_requested = None   # set to the reason by a one-file update
        self._reexec_uid = None
        self.on_reexec = None

    # ------------------------------------------------------------ journal

    @property
    def journal(self):
        if self._journal is None:
            self._journal = Journal(self.settings.workdir)
        return self._journal

    def install_kind(self):
        if self._install is None:
            self._install = self.fx.install_kind(self.archive)
        return self._install

    def manager(self):
        if self._manager is None:
            self._manager = self.fx.manager(self.settings.service_type)
        return self._manager

    # ------------------------------------------------------------ offers

    def offer(self, config):
        """A configs list names another agent version (called on the loop)."""
        self.metrics.inc("update_offers")
        try:
            off = offers.from_config(config)
        except offers.OfferError as e:
            return self._refuse_offer(config.version, "bad update offer: %s" % e)
        for note in off.notes:
            log.warning("update offer %s: %s", off.version, note)
        try:
            return self._consider(off)
        except JournalError as e:  # every journal step, not only the first
            return self._refuse_offer(off.version, "update journal unusable: %s" % e)

    def _consider(self, off):
        self.journal.forget_rejections(off.component, except_version=off.version)
        rejected = self.journal.rejected(off.component, off.version)
        if rejected:
            self.metrics.inc("update_offers_skipped", reason="rejected")
            self.state.set_abnormal(
                "update", "update to %s not retried: it failed before (%s); offer another "
                "version or run 'elkeidctl update --clear'" % (off.version, rejected["reason"]))
            return None
        busy = self._busy()
        if busy is not None:
            if busy == off.version:
                return None  # the same update, still under way
            self.metrics.inc("update_offers_skipped", reason="busy")
            log.warning("update to %s refused: the update to %s is still in progress",
                        off.version, busy)
            self.state.set_abnormal("update", "update to %s deferred: the update to %s is in "
                                    "progress" % (off.version, busy))
            return None
        why = offers.refusal(off, __version__)
        if why is None and off.kind:
            why = offers.accepts(self.install_kind(), off.kind)
        if why is None:
            why = self._policy_problem()
        if why is not None:
            return self._refuse(off, why)
        uid = self.journal.begin(off.component, __version__, off.version, kind=off.kind,
                                 install=self.install_kind(), manager=self.manager(),
                                 package_sha256=off.sha256)
        log.info("updating %s -> %s (%s install, %s)", __version__, off.version,
                 self.install_kind(), self.manager(), extra={"console": True})
        self._job = self.owner.run_once("agent update", self._run(off, uid))
        return uid

    def _busy(self):
        if self._job is not None and not self._job.done():
            return self._running_version
        for row in self.journal.in_flight(offers.AGENT):
            return row.to_version
        return None

    def _policy_problem(self):
        return POLICY_UNKNOWN if self.policy() is None else None

    def _refuse_offer(self, version, why):
        self.metrics.inc("update_refused")
        log.error("update to %s refused: %s", version, why)
        self.state.set_abnormal("update", "update to %s refused: %s" % (version, why))
        return None

    def _refuse(self, off, why):
        uid = self.journal.begin(off.component, __version__, off.version, state="refused",
                                 kind=off.kind, install=self.install_kind(),
                                 manager=self.manager(), reason=why,
                                 package_sha256=off.sha256)
        self._refuse_offer(off.version, why)
        from .trial import report
        report(self.journal, self.journal.get(uid), self.emit, self.state)
        return None

    # ------------------------------------------------------------ the job

    _running_version = ""

    async def _run(self, off, uid):
        self._running_version = off.version
        try:
            await self._steps(off, uid)
        except (VerifyError, InstallError, offers.OfferError, OSError) as e:
            self._fail(uid, _reason(e))
        except asyncio.CancelledError:
            # Shutdown mid-download: the next start marks it interrupted.
            raise
        except Exception as e:  # outside input must never end the agent
            log.exception("update to %s failed unexpectedly", off.version)
            self._fail(uid, "unexpected %s: %s" % (type(e).__name__, e))

    def _fail(self, uid, why):
        from .trial import report
        self.metrics.inc("update_failed")
        try:
            # The move first: once a guard has taken the row past handed_over
            # it is refused, and the package and backup stay the guard's.
            self.journal.move(uid, "failed", why)
            row = self.journal.get(uid)
            remove_update_files(row)
            report(self.journal, row, self.emit, self.state)
        except JournalError as e:
            log.error("update journal: %s", e)
        log.error("update failed: %s", why)

    async def _steps(self, off, uid):
        paths = UpdatePaths(self.settings.workdir, self.policy())
        run = self.executors.run
        for d in (paths.download_dir, paths.backup_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        dest = os.path.join(paths.download_dir, "elkeid-agent-%d.download" % uid)
        self.journal.set(uid, package=dest)
        url = await run("update", download_offer, off, dest)
        self.journal.move(uid, "verifying")
        kind, facts = await run("update", self._verify, off, dest, url)
        self.journal.set(uid, kind=kind)
        # Named before it is written: an agent killed while copying leaves
        # a row that says which (partial) file to remove.
        backup = self._backup_path(paths, uid)
        self.journal.move(uid, "backing_up", backup=backup)
        # The journal is the loop's (an sqlite3 connection stays in its thread).
        last = self.journal.last_succeeded(offers.AGENT)
        kept = last.context.get("installed_package", "") \
            if last is not None and last.to_version == __version__ else ""
        backup_pkg = await run("update", self._backup, backup, paths, kind, kept)
        deadline_after = self.policy().verify_timeout
        ctx = {"target": self.archive, "python": sys.executable, "argv": sys.argv[1:],
               "cwd": os.getcwd(), "env": _agent_env(), "agent_pid": os.getpid(),
               "agent_start": proc_start_ticks(os.getpid()), "verify_timeout": deadline_after,
               "facts": facts, "allow_downgrade": off.allow_downgrade,
               "backup_dir": paths.backup_dir, "max_backups": self.policy().max_backups,
               "service_type": self.settings.service_type, "pidfile": self.settings.pidfile}
        self.journal.move(uid, "handed_over", backup_package=backup_pkg, context=ctx)
        await run("update", self._spawn_guard, uid, backup, paths)
        log.info("update to %s handed over to the guard (backup %s)", off.version, backup)
        if self.manager() == "none":
            await self._wait_for_switch(uid)

    def _signature(self, off, url):
        if off.signature is not None:
            return off.signature
        try:
            return _fetch_small(url + ".sig", SIGNATURE_MAX_BYTES)
        except VerifyError as e:
            raise VerifyError("a public key is configured and the update has no usable "
                              "signature (%s.sig: %s)" % (url, e)) from None

    def _verify(self, off, dest, url):
        check_size(dest, DOWNLOAD_MAX_BYTES)
        with open(dest, "rb") as f:
            head = f.read(4096)
        kind = offers.kind_from_head(head)
        if kind is None:
            raise VerifyError("the download is %s" % offers.describe_unknown(head))
        if off.kind and off.kind != kind:
            raise VerifyError("the offer says type %s but the download is a %s" % (off.kind, kind))
        why = offers.accepts(self.install_kind(), kind)
        if why is not None:
            raise offers.OfferError(why)
        key = update_key(self.settings, self.policy())
        if key is not None:
            scheme = key.verify(dest, self._signature(off, url))
            log.info("update %s: signature verified (%s, key %s)", off.version, scheme,
                     key.path)
        facts = self.fx.package_facts(dest, kind)
        if facts["name"] != "elkeid-agent":
            raise VerifyError("the package is %r, not elkeid-agent" % facts["name"])
        if upstream_version(facts["version"]) != off.version:
            raise VerifyError("the package is version %s, the offer says %s"
                              % (facts["version"], off.version))
        want_arch = self.fx.host_arch(kind)
        if kind == "deb" and facts["arch"] not in (want_arch, "all"):
            raise VerifyError("the package is for %s, this host is %s" % (facts["arch"], want_arch))
        if kind == "pyz" and facts["arch"] not in (os.uname().machine, ""):
            raise VerifyError("the zipapp is for %s, this host is %s"
                              % (facts["arch"], os.uname().machine))
        if kind == "rpm" and facts["arch"] not in (want_arch, "noarch"):
            raise VerifyError("the package is for %s, this host is %s" % (facts["arch"], want_arch))
        return kind, facts

    def _backup_path(self, paths, uid):
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.clock()))
        return os.path.join(paths.backup_dir, "elkeid-agent_%s_%s_%d.bak"
                            % (__version__, stamp, uid))

    def _backup(self, backup, paths, kind, kept):
        """Copy the running file to ``backup``; the package file it was
        installed from, when it is at hand ('' if not). Disk full:
        InstallError, nothing switched."""
        try:
            self.fx.copy_file(self.archive, backup, 0o700)
        except OSError as e:
            raise InstallError("backup of %s to %s failed: %s"
                               % (self.archive, paths.backup_dir, e.strerror or e)) from None
        return self._current_package(kind, kept) if kind in ("deb", "rpm") else ""

    def _current_package(self, kind, kept):
        """The package file the running version was installed from: ``kept``
        by the update that installed it, or in the package manager's cache."""
        if kept and os.path.isfile(kept):
            return kept
        for d in ("/var/cache/apt/archives", "/var/cache/yum", "/var/cache/dnf"):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in sorted(names):
                if name.startswith("elkeid-agent") and name.endswith("." + kind):
                    full = os.path.join(d, name)
                    try:
                        if upstream_version(self.fx.package_facts(full, kind)["version"]) == \
                                __version__:
                            return full
                    except InstallError:
                        continue
        return ""

    def _spawn_guard(self, uid, backup, paths):
        argv = [sys.executable, "-sE", backup, "update-guard", "--workdir",
                self.settings.workdir, "--id", str(uid)]
        os.makedirs(os.path.dirname(paths.guard_log), mode=0o700, exist_ok=True)
        env = _agent_env()
        manager = self.manager()
        if manager != "systemd":
            # Through a short-lived middle process, so the guard is nobody's
            # child: the re-executed agent would never reap it.
            argv = [sys.executable, "-I", "-S", "-c", _DAEMONIZE] + argv
        spawned = self.fx.spawn_detached(argv, self.settings.workdir, env, paths.guard_log,
                                         manager, unit="%s-%d.service" % (GUARD_UNIT, uid))
        if spawned.child:
            self.fx.processes.reap(spawned)

    async def _wait_for_switch(self, uid):
        """One-file install without a service manager: re-execute once the
        guard has put the new file in place (state ``trial``)."""
        while True:
            row = self.journal.get(uid)
            if row is None or row.final:
                return
            if row.state == "trial":
                self._reexec_uid = uid
                self.reexec_requested = "update to %s" % row.to_version
                if self.on_reexec is not None:
                    self.on_reexec(self.reexec_requested)
                return
            await asyncio.sleep(0.25)

    def mark_reexec(self):
        """Tell the guard that from now on an exit is the new version's:
        called once the agent has shut down, just before it re-executes.
        Not when the shutdown begins: the old agent killed while it stops
        plugins and flushes is no fault of the new version, and the new
        version's trial window runs from its own start."""
        uid = self._reexec_uid
        try:
            row = self.journal.get(uid)
            if row is not None and row.state == "trial":
                self.journal.set(uid, context=dict(row.context, reexec_at=self.clock()))
        except JournalError as e:
            # Unmarked, the guard takes an exit for the old agent's (not rejected).
            log.error("update %d: cannot mark the re-exec: %s", uid, e)

    # ------------------------------------------------------------ start-up

    def recover(self):
        """Close what a killed agent left (see the module docstring)."""
        try:
            rows = self.journal.in_flight(offers.AGENT)
        except (JournalError, Exception) as e:
            log.error("update journal unusable: %s", e)
            self.state.set_abnormal("update", "update journal unusable: %s" % e)
            return
        for row in rows:
            try:
                self._recover_row(row)
            except JournalError as e:  # locked, or moved on meanwhile: the next start
                log.error("update %d: %s", row.id, e)
                self.state.set_abnormal("update", "update %d to %s not recovered: %s"
                                        % (row.id, row.to_version, e))

    def _recover_row(self, row):
        if row.state in BEFORE_SWITCH:
            interrupt(self.journal, row)
            return
        if guard_alive(row):
            return
        if row.state == "handed_over" and (not row.guard_pid and
                                           self.clock() - row.updated < HANDOVER_GRACE):
            return  # the guard is starting
        if row.state == "handed_over":
            interrupt(self.journal, row, "the update guard never took over")
            return
        log.warning("update %d to %s: its guard is gone during %s; starting a guard to "
                    "roll it back", row.id, row.to_version, row.state)
        # The agent to replace is this one now (no manager: the guard
        # stops it and starts the restored version the way it was run).
        self.journal.set(row.id, context=dict(
            row.context, agent_pid=os.getpid(), agent_start=proc_start_ticks(os.getpid()),
            argv=sys.argv[1:], cwd=os.getcwd(), env=_agent_env()))
        try:
            self._spawn_guard(row.id, row.backup, UpdatePaths(self.settings.workdir,
                                                              self.policy() or _NoPolicy))
        except (OSError, InstallError) as e:
            log.error("cannot start the update guard: %s", e)
            self.state.set_abnormal("update", "update %d to %s: guard gone and cannot be "
                                    "restarted: %s" % (row.id, row.to_version, e))


class _NoPolicy:
    download_dir = backup_dir = public_key_file = ""
    max_backups = 5
    verify_timeout = 300.0


def _agent_env():
    """What the guard and a re-started agent need of our environment."""
    keep = ("PATH", "LANG", "LC_ALL")
    return {k: v for k, v in os.environ.items()
            if k in keep or k.startswith(("ELKEID_", "SPECIFIED_"))}


def _reason(e):
    if isinstance(e, OSError) and e.strerror:
        return "%s%s" % (e.strerror, " (%s)" % e.filename if e.filename else "")
    return str(e)


def remove_update_files(row):
    """The download and backup of an update that switched nothing (and a
    backup copy a kill cut short)."""
    for path in (row.package, row.backup, staging_path(row.backup) if row.backup else ""):
        _remove_quietly(path)


def _remove_quietly(path):
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _fetch_small(url, limit):
    """Bytes of a small file at ``url`` (a signature: no hash is known for
    it beforehand, so only its size is bounded)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            data = resp.read(limit + 1)
    except Exception as e:  # HTTPError, URLError, TLS, bad status line ...
        raise VerifyError(str(getattr(e, "reason", e)) or type(e).__name__) from None
    if len(data) > limit:
        raise VerifyError("larger than %d bytes" % limit)
    return data
