"""The local services supervisor: keeps the services of the services file
alive, checks their health and re-adopts them across agent restarts.

Public API (stable; the status endpoint, the server reports and
``elkeidctl services`` build on it):

``ServiceSupervisor(settings-like arguments...)``
    ``await boot()``: load the services file, re-adopt what an earlier
    agent started (``<workdir>/services/state.json``), start the rest.
    ``await shutdown()``: stop supervising; the services keep running
    (stopping the daemon does not stop what it manages).

``status() -> list of dict``, one per configured (or still running) service,
    sorted by id, every value JSON-serialisable:
    ``id``, ``type``, ``name``,
    ``state``: stopped | starting | running | backoff | stopping | exited | failed,
    ``pid`` (0 when none), ``restarts`` (starts after the first),
    ``health``: one word (healthy, starting, dead, no_heartbeat, http_failed,
    over_limit, or "" when not running),
    ``checks``: {check: status} (alive, heartbeat, http, resources),
    ``last_error`` (one line, "" when none), ``last_exit`` ("exited with
    code 3", "killed by signal 9 (SIGKILL)", "" when it never ended),
    ``uptime`` (seconds in the current run, 0 when not running),
    ``cpu`` (percent of one CPU), ``rss`` (bytes),
    ``enabled``, ``adopted`` (this run was started by an earlier agent),
    ``launcher`` ("direct" or "systemd"), ``unit`` (systemd unit or ""),
    ``config_hash``, ``since`` (unix time of the last state change),
    ``heartbeats`` (accepted), ``heartbeats_refused`` (refused).

``heartbeat(service_id, heartbeat, now=None) -> (ok, error)``
    A ``services.heartbeat.Heartbeat`` for one service (from its socket or
    ``POST /heartbeat``). Refused (``ok`` False, ``error`` says why, counted
    ``service_heartbeats_refused{service,reason}``) when the service is
    unknown or not running, ``agent_id`` is not ``service_id``, or the pid
    is neither the service's process nor one of its descendants. ``now`` is
    ``time.monotonic()`` (the default).

``async restart(id)``, ``async stop(id)``, ``async start(id)``
    -> (ok, message). ``stop`` stops the service and keeps it stopped until
    ``start`` (or a reload that changes its entry); ``start`` also revives a
    failed or exited service; ``restart`` stops and starts it now, forgiving
    earlier failures.

``status_of(id) -> dict or None``, ``enabled_spec(id) -> (ServiceSpec, None)``
    One service's status dict; its entry, or (None, why it is unknown or
    disabled): what a binary update (``update/services.py``) works from.

``async reload() -> (ok, problems)``
    Re-read the services file. Invalid: nothing changes, ``problems`` are
    the rendered problems (code, file:line, path, message), the agent's
    state is abnormal (``services``). Valid: only services whose entry
    changed (``ServiceSpec.config_hash``) are restarted; new ones start,
    removed ones stop. SIGHUP calls this.

``on_change(callback)``
    ``callback(status_dict)`` after every state change of any service (the
    same dict ``status()`` lists). Exceptions are logged and counted
    (``service_observer_errors``), never propagated.
"""

import asyncio
import logging
import os
import shutil
import time

from ..osfx.services import ServiceProcessEffects
from . import adoption, config
from .runner import ServiceRunner

log = logging.getLogger("elkeid_agent.services")

STATES = ("stopped", "starting", "running", "backoff", "stopping", "exited", "failed")
LAUNCHERS = ("auto", "direct", "systemd")


class ServiceSupervisor:
    def __init__(self, workdir, metrics, state, owner, executors, services_file="",
                 explicit=False, service_type="systemd", launcher="auto", fx=None,
                 stop_timeout=10.0, kill_timeout=5.0, healthy_reset=300.0,
                 log_max_bytes=10 * 1024 * 1024, log_backups=3, housekeeping_interval=30.0):
        """``services_file`` "" means ``<workdir>/services.yaml``; ``explicit``:
        the file was named by the user (a missing one is then a D1001, not
        "no services"). ``launcher`` auto: transient systemd units when
        ``service_type`` is systemd and systemd is PID 1, else direct."""
        if launcher not in LAUNCHERS:
            raise ValueError("launcher must be one of %s" % ", ".join(LAUNCHERS))
        self.workdir = workdir
        self.metrics = metrics
        self.state = state
        self.owner = owner
        self.executors = executors
        self.services_file = services_file or os.path.join(workdir, "services.yaml")
        self.explicit = explicit
        self.service_type = service_type
        self.fx = fx or ServiceProcessEffects()
        self.stop_timeout = stop_timeout
        self.kill_timeout = kill_timeout
        self.healthy_reset = healthy_reset
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.housekeeping_interval = housekeeping_interval
        self.state_path = adoption.path_in(workdir)
        self.launcher = self._launcher(launcher)
        self._observers = []
        self.config = None         # the last valid ServicesConfig
        self.file_present = False  # whether it came from a file
        self._runners = {}      # id -> ServiceRunner
        self._receivers = {}    # id -> HeartbeatReceiver
        self._lock = asyncio.Lock()
        self._booted = False
        self._pending = {}      # recorded runs not yet adopted (invalid file at start)
        for name, text in (
                ("service_transitions", "service state changes, by new state"),
                ("service_restarts", "service restarts"),
                ("service_heartbeats", "heartbeats accepted from services"),
                ("service_heartbeats_refused", "heartbeats refused, by reason"),
                ("service_heartbeat_lines_dropped", "over-long heartbeat lines dropped"),
                ("service_health_restarts", "restarts caused by a failed health check"),
                ("service_daemonized", "runs that daemonized themselves"),
                ("service_kills", "service processes that needed SIGKILL"),
                ("services_adopted", "services re-adopted from an earlier agent"),
                ("services_config_errors", "services files refused"),
                ("services_state_errors", "state file problems")):
            metrics.describe(name, text)

    def _launcher(self, wanted):
        if wanted != "auto":
            return wanted
        if self.service_type == "systemd" and self.fx.systemd_is_init() and \
                shutil.which("systemd-run", path=self.fx.sane_path):
            return "systemd"
        return "direct"

    # ------------------------------------------------------------ boot / shutdown

    async def boot(self):
        async with self._lock:
            cfg, problems = self._load()
            self._pending = self._load_records()
            self._booted = True
            if cfg is not None:
                await self._reconcile(cfg)
            else:
                # An invalid file at start: nothing is started, and what an
                # earlier agent left running stays recorded, untouched, until
                # a valid file says what to do with it.
                log.error("services not started: the services file is invalid")
            self._save_state()
            self.owner.spawn("services-housekeeping", self._housekeeping)
        return cfg is not None, problems

    async def _reconcile(self, cfg):
        """Apply a valid file: adopt, stop or forget the recorded runs of an
        earlier agent, then add every service not yet supervised."""
        specs = {s.id: s for s in cfg.services}
        enabled = {sid: s for sid, s in specs.items() if s.enabled}
        pending, self._pending = self._pending, {}
        adopt = {}
        for action, sid, rec, why in adoption.plan(pending, enabled, self._is_current):
            if action == adoption.ADOPT and sid not in self._runners:
                adopt[sid] = rec
            elif action == adoption.FORGET:
                log.info("service %s: forgetting pid %d (%s)", sid, rec.pid, why)
            elif action == adoption.STOP or action == adoption.ADOPT:
                log.info("service %s: stopping pid %d an earlier agent started (%s)",
                         sid, rec.pid, why)
                await self._stop_orphan(sid, rec)
        for spec in cfg.services:
            if spec.id not in self._runners:
                await self._add(spec, adopt.get(spec.id))

    def _is_current(self, rec):
        ident = self.fx.capture(rec.pid, rec.start_time)
        if ident is None:
            return False
        ident.close()
        return True

    async def shutdown(self):
        """Stop supervising. The services keep running; the state file says
        what to re-adopt."""
        async with self._lock:
            self._save_state()
            await self.owner.cancel("services-housekeeping")
            for sid in list(self._runners):
                await self.owner.cancel("service:" + sid)
                runner = self._runners.pop(sid)
                if runner.watch is not None:
                    runner.watch.cancel()
                    runner.watch = None
                if runner.ident is not None:
                    runner.ident.close()
            for sid in list(self._receivers):
                await self._receivers.pop(sid).close()

    # ------------------------------------------------------------ the file

    def _load(self):
        """(ServicesConfig or None, rendered problems); reports them. The
        last valid configuration stays in ``config``; ``file_present`` says
        whether it came from a file (host metrics run only then)."""
        path = self.services_file
        self.file_present = os.path.exists(path)
        if not self.explicit and not self.file_present:
            self.state.clear("services")
            self.config = config.ServicesConfig()
            return self.config, []
        cfg, problems = config.load(path, self.workdir)
        name = path
        if cfg is None:
            rendered = [p.render(name) for p in problems]
            for line in rendered:
                log.error("services file: %s", line)
            self.metrics.inc("services_config_errors")
            self.state.set_abnormal("services", "services file %s is invalid (%d problems; "
                                    "first: %s)" % (path, len(rendered), rendered[0]))
            return None, rendered
        self.state.clear("services")
        self.config = cfg
        for warning in cfg.warnings:
            log.warning("services file %s: %s", path, warning)
        for p in cfg.start_problems:
            log.error("services file: %s", p.render(name))
        return cfg, [p.render(name) for p in cfg.start_problems]

    def _load_records(self):
        try:
            records = adoption.load(self.state_path)
        except adoption.StateError as e:
            log.error("services state: %s; nothing can be re-adopted", e)
            self.metrics.inc("services_state_errors", reason="unreadable")
            self.state.set_abnormal("services-state", str(e))
            return {}
        return records

    def _save_state(self):
        if not self._booted:
            return
        records = dict(self._pending)
        for sid, runner in self._runners.items():
            rec = runner.record()
            if rec is not None:
                records[sid] = rec
        try:
            adoption.save(self.state_path, records)
            self.state.clear("services-state")
        except OSError as e:
            log.error("services state %s not written: %s", self.state_path, e.strerror or e)
            self.metrics.inc("services_state_errors", reason="write")
            self.state.set_abnormal("services-state", "cannot write %s: %s"
                                    % (self.state_path, e.strerror or e))

    # ------------------------------------------------------------ runners

    async def _add(self, spec, record=None):
        runner = ServiceRunner(self, spec, record)
        self._runners[spec.id] = runner
        if spec.socket_path:
            from .receiver import HeartbeatReceiver
            rcv = HeartbeatReceiver(spec.id, spec.socket_path, self.heartbeat, self.metrics)
            if await rcv.open():
                self.state.clear("service-socket:" + spec.id)
            else:
                log.error("service %s: %s", spec.id, rcv.error)
                self.state.set_abnormal("service-socket:" + spec.id, "service %s: %s"
                                        % (spec.id, rcv.error))
            self._receivers[spec.id] = rcv
        self.owner.spawn("service:" + spec.id, runner.run)
        return runner

    async def _remove(self, sid, why):
        runner = self._runners.get(sid)
        if runner is None:
            return
        runner.request_stop()
        if not await runner.until(lambda: runner.state == "stopped",
                                  self.stop_timeout + self.kill_timeout + 30):
            log.error("service %s did not reach stopped (%s); supervision ends anyway",
                      sid, runner.state)
        await self.owner.cancel("service:" + sid)
        self._runners.pop(sid, None)
        rcv = self._receivers.pop(sid, None)
        if rcv is not None:
            await rcv.close()
        for prefix in ("service:", "service-socket:"):
            self.state.clear(prefix + sid)
        log.info("service %s removed (%s)", sid, why)
        self._save_state()

    async def _stop_orphan(self, sid, rec):
        """Stop a run an earlier agent started that is no longer wanted."""
        if rec.unit:
            try:
                await self.executors.run("process", self.fx.stop_unit, rec.unit,
                                         self.stop_timeout + 30)
            except Exception as e:
                log.error("service %s: systemctl stop %s failed: %s", sid, rec.unit, e)
            return
        ident = self.fx.capture(rec.pid, rec.start_time)
        if ident is None:
            return
        try:
            self.fx.signal_session(ident, 15)
            self.fx.signal_session(ident, 18)
            deadline = time.monotonic() + self.stop_timeout
            while self.fx.alive(ident) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.fx.alive(ident):
                self.metrics.inc("service_kills", service=sid)
                self.fx.signal_session(ident, 9)
            for pid in self.fx.leftovers(rec.pid, rec.token, rec.start_time):
                self.fx.kill(pid, 9)
        finally:
            ident.close()

    # ------------------------------------------------------------ API

    def status(self):
        return [self._runners[sid].status() for sid in sorted(self._runners)]

    def heartbeat(self, service_id, heartbeat, now=None):
        now = time.monotonic() if now is None else now
        runner = self._runners.get(service_id)
        if runner is None:
            ok, error, reason = False, "unknown service %r" % service_id, "unknown_service"
        else:
            ok, error, reason = runner.accept_heartbeat(heartbeat, now)
        if ok:
            self.metrics.inc("service_heartbeats", service=service_id)
            return True, ""
        if runner is not None:
            runner.refused += 1
        self.metrics.inc("service_heartbeats_refused", service=service_id, reason=reason)
        log.debug("heartbeat refused: %s", error)
        return False, error

    def _enabled_runner(self, service_id):
        """(runner, None), or (None, why a request for it is refused)."""
        runner = self._runners.get(service_id)
        if runner is None:
            return None, "unknown service %r" % service_id
        if not runner.spec.enabled:
            return None, "service %s is disabled in the services file" % service_id
        return runner, None

    def status_of(self, service_id):
        runner = self._runners.get(service_id)
        return runner.status() if runner is not None else None

    def enabled_spec(self, service_id):
        runner, refused = self._enabled_runner(service_id)
        return (runner.spec if runner is not None else None), refused

    async def restart(self, service_id):
        runner, refused = self._enabled_runner(service_id)
        if refused:
            return False, refused
        before = runner.runs
        runner.request_restart()
        # A service in backoff is already in an end state: only the outcome
        # of the restart taken up counts.
        ok = await runner.until(lambda: not runner.restart_pending and (
            runner.state == "running" and runner.runs > before
            or runner.state in ("failed", "exited", "backoff")),
            self.stop_timeout + self.kill_timeout + 30)
        return ok and runner.state == "running", "service %s is %s" % (service_id,
                                                                       runner.state)

    async def stop(self, service_id):
        runner = self._runners.get(service_id)
        if runner is None:
            return False, "unknown service %r" % service_id
        runner.request_stop()
        ok = await runner.until(lambda: runner.state == "stopped",
                                self.stop_timeout + self.kill_timeout + 30)
        return ok, "service %s is %s" % (service_id, runner.state)

    async def start(self, service_id):
        runner, refused = self._enabled_runner(service_id)
        if refused:
            return False, refused
        runner.request_start()
        ok = await runner.until(lambda: runner.state in ("running", "failed", "exited",
                                                         "backoff"),
                                self.stop_timeout + self.kill_timeout + 30)
        return ok and runner.state == "running", "service %s is %s" % (service_id,
                                                                       runner.state)

    async def reload(self):
        async with self._lock:
            cfg, problems = self._load()
            if cfg is None:
                log.error("services file not reloaded: nothing changed")
                return False, problems
            wanted = {s.id: s for s in cfg.services}
            if self._pending:
                await self._reconcile(cfg)
            for sid in sorted(set(self._runners) - set(wanted)):
                await self._remove(sid, "no longer in the services file")
            changed = 0
            for sid, spec in wanted.items():
                runner = self._runners.get(sid)
                if runner is None:
                    await self._add(spec)
                    changed += 1
                elif runner.spec.config_hash() != spec.config_hash():
                    await self._remove(sid, "its entry changed")
                    await self._add(spec)
                    changed += 1
            log.info("services file reloaded: %d services, %d started or restarted",
                     len(wanted), changed)
            self._save_state()
            return True, problems

    def on_change(self, callback):
        self._observers.append(callback)

    def _notify(self, runner):
        if not self._observers:
            return
        status = runner.status()
        for cb in list(self._observers):
            try:
                cb(status)
            except Exception:
                self.metrics.inc("service_observer_errors")
                log.exception("service observer failed")

    # ------------------------------------------------------------ housekeeping

    async def _housekeeping(self):
        while True:
            await asyncio.sleep(self.housekeeping_interval)
            paths = []
            for runner in list(self._runners.values()):
                paths.extend(runner._paths())
            for path in paths:
                try:
                    await self.executors.run("housekeeping", rotate, path, self.log_max_bytes,
                                             self.log_backups)
                except Exception as e:  # a full disk, a saturated pool: try next time
                    log.warning("cannot rotate %s: %s", path, e)


def rotate(path, max_bytes, backups):
    """Copy-and-truncate rotation of a file the service holds open in
    O_APPEND: ``path.1`` ... ``path.<backups>``. What the service writes
    between the copy and the truncate is lost (docs/services.md)."""
    try:
        if os.path.getsize(path) <= max_bytes:
            return False
    except OSError:
        return False
    for i in range(backups - 1, 0, -1):
        src = "%s.%d" % (path, i)
        if os.path.exists(src):
            os.replace(src, "%s.%d" % (path, i + 1))
    with open(path, "rb") as src, open(path + ".1", "wb") as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
    os.truncate(path, 0)
    return True
