"""One local service's life: start (or adopt), health checks, exit,
restart through its policy, stop.

The asyncio shell around the pure pieces (``HealthEvaluator``,
``RestartPolicy``) and the one process state machine
(``runtime.lifecycle``, with the services' extra edges in ``TRANSITIONS``).
``ServiceRunner.run`` is owned by the agent's ``TaskOwner`` (task
``service:<id>``): a bug in it is logged, counted and the loop starts over,
picking up the process it was supervising, so one service's crash never
stops another's supervision. Every OS effect goes through
``osfx.services.ServiceProcessEffects``.
"""

import asyncio
import logging
import os
import secrets
import signal
import time

from ..osfx.services import TOKEN_ENV, Spawned, unit_name
from ..plugins.policy import RestartPolicy, describe_exit
from ..plugins.runner import last_line
from ..runtime import lifecycle as lc
from ..runtime.lifecycle import Lifecycle
from . import config
from .health import HealthEvaluator

log = logging.getLogger("elkeid_agent.services")

# The plugins' table plus what services need: a process re-adopted from an
# earlier agent is running without having been started by this one; a
# process may end by itself (no stopping in between); an exited service the
# policy does not restart may be started again on request.
TRANSITIONS = dict(lc.TRANSITIONS)
TRANSITIONS[lc.STOPPED] = TRANSITIONS[lc.STOPPED] | {lc.RUNNING}
TRANSITIONS[lc.RUNNING] = TRANSITIONS[lc.RUNNING] | {lc.EXITED}
TRANSITIONS[lc.EXITED] = TRANSITIONS[lc.EXITED] | {lc.STARTING}

DAEMONIZED = "service daemonized itself; run it in the foreground"
RESCAN_DELAYS = (0.05, 0.25)


class _RestartKnobs:
    """RestartPolicy's view of a service's ``restart:`` section: the design's
    0/10/30/60 s from backoff_base 10 s and backoff_max 60 s."""

    def __init__(self, restart, healthy_reset):
        base, top = restart.backoff_base, restart.backoff_max
        self.backoff = (0.0, base, min(3 * base, top), top)
        self.healthy_reset = healthy_reset
        self.max_failures = restart.max_retries if restart.max_retries > 0 else float("inf")


def probe_http(url, timeout):
    """GET ``url``: (True, "") on a 2xx answer within ``timeout``, else
    (False, why). Blocking: runs in the ``probe`` executor. No proxy: the
    endpoint is the service's own. urllib.request is imported here: it and
    what it pulls in (http.client, email) cost an idle agent without HTTP
    health checks about 2.5 MB."""
    import urllib.error
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            resp.read(64 * 1024)
            if 200 <= resp.status < 300:
                return True, ""
            return False, "HTTP %d" % resp.status
    except urllib.error.HTTPError as e:
        return False, "HTTP %d" % e.code
    except urllib.error.URLError as e:
        return False, str(getattr(e, "reason", e))[:200]
    except (OSError, ValueError) as e:  # timeouts, resets, a malformed answer
        return False, (str(e) or type(e).__name__)[:200]
    except Exception as e:  # http.client's own errors on a hostile answer
        return False, ("%s: %s" % (type(e).__name__, e))[:200]


class ServiceRunner:
    def __init__(self, sup, spec, record=None):
        self.sup = sup
        self.fx = sup.fx
        self.metrics = sup.metrics
        self.spec = spec
        self.id = spec.id
        self.life = self._new_life(lc.STOPPED)
        self.restart_policy = RestartPolicy(_RestartKnobs(spec.restart, sup.healthy_reset))
        self.desired_run = spec.enabled
        self._adopt_record = record  # an earlier agent's run to adopt
        self.launcher = sup.launcher
        self.proc = None            # Spawned of the current run
        self.ident = None           # its ProcessIdentity
        self.token = ""
        self.watch = None
        self.health = None
        self.exited = False         # the current run's process has ended
        self.exit_code = None
        self.daemonized = False
        self.started_mono = 0.0
        self.started_wall = 0.0
        self.adopted = False
        self.restarts = 0
        self.runs = 0               # processes started or adopted by this runner
        self.last_error = ""
        self.last_exit = ""
        self.heartbeats = 0
        self.refused = 0
        self.next_start = 0.0
        self._parked = False        # ended; its policy does not restart it
        self._control = False       # a control request is waiting for the loop
        self._restart_requested = False
        self._poke = asyncio.Event()
        self._waiters = []          # (predicate, future)
        self._entered = False
        self._health_word = ""
        self._never_reported = ""

    # ------------------------------------------------------------ state

    def _new_life(self, initial):
        runner = self

        class _Life(Lifecycle):
            def transition(self, new, reason=""):
                super().transition(new, reason)
                runner._changed()

        return _Life("service " + self.id, self.sup.metrics, "service_transitions",
                     {"service": self.id}, log, {"service": self.id}, table=TRANSITIONS,
                     initial=initial)

    def _to(self, new, reason=""):
        if self.life.state != new:
            self.life.transition(new, reason)

    def _changed(self):
        for pred, fut in list(self._waiters):
            if not fut.done() and pred():
                fut.set_result(True)
        self.sup._notify(self)

    async def until(self, predicate, timeout):
        """Wait (at most ``timeout``) until ``predicate()`` holds after a
        state change; True if it does."""
        if predicate():
            return True
        fut = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return predicate()
        finally:
            self._waiters.remove(entry)

    def poke(self):
        self._control = True
        self._poke.set()

    async def _sleep(self, timeout):
        """Until poked (control request, exit) or ``timeout`` (None: forever)."""
        if not self._poke.is_set():
            try:
                await asyncio.wait_for(self._poke.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self._poke.clear()

    @property
    def state(self):
        return self.life.state

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None and not self.exited else 0

    def _abnormal(self, text):
        self.sup.state.set_abnormal("service:" + self.id, text)

    def _clear_abnormal(self):
        self.sup.state.clear("service:" + self.id)

    # ------------------------------------------------------------ control (sup)

    def request_stop(self):
        self.desired_run = False
        self.poke()

    def request_start(self):
        self.desired_run = True
        if self._parked or self.life.state == lc.FAILED:
            self._parked = False
            self.restart_policy.reset()
        self.poke()

    def request_restart(self):
        self.desired_run = True
        self._restart_requested = True
        self.poke()

    @property
    def restart_pending(self):
        """A requested restart the loop has not taken up yet."""
        return self._restart_requested

    # ------------------------------------------------------------ the loop

    async def run(self):
        self._recover()
        while True:
            self._control = False
            if not self.desired_run:
                if self.proc is not None:
                    await self._terminate("stop requested")
                self._to(lc.STOPPED, "stopped on request")
                await self._sleep(None)
                continue
            if self._restart_requested:
                self._restart_requested = False
                self._parked = False
                self.restart_policy.reset()
                self._clear_abnormal()
                if self.proc is not None:
                    await self._terminate("restart requested")
                if self.life.state not in (lc.STOPPED,):
                    self._count_restart()
                await self._start_run()
                continue
            if self._parked or self.life.state == lc.FAILED:
                await self._sleep(None)
                continue
            if self.proc is None:
                if self.life.state == lc.BACKOFF:
                    left = self.next_start - time.monotonic()
                    if left > 0:
                        await self._sleep(left)
                        continue
                    self._count_restart()
                await self._start_run()
                continue
            outcome = await self._monitor()
            if outcome is not None:
                await self._ended(*outcome)

    def _count_restart(self):
        self.restarts += 1
        self.metrics.inc("service_restarts", service=self.id)

    def _recover(self):
        """First entry: adopt a recorded run. Re-entry after a crash of this
        loop: carry on with the process it was supervising."""
        if not self._entered:
            self._entered = True
            if self._adopt_record is not None:
                self._adopt(self._adopt_record)
                self._adopt_record = None
            return
        self.last_error = "internal error in supervision; resumed"
        if self.proc is not None and not self.exited:
            if self.life.state != lc.RUNNING:
                self.life = self._new_life(lc.RUNNING)
        else:
            self._release()
            if self.life.state not in (lc.STOPPED, lc.FAILED):
                self.life = self._new_life(lc.STOPPED)

    def _adopt(self, rec):
        ident = self.fx.capture(rec.pid, rec.start_time)
        if ident is None:
            log.info("service %s: recorded pid %d is gone; starting it", self.id, rec.pid)
            return
        self.ident = ident
        self.proc = Spawned(rec.pid, rec.start_time, child=False, unit=rec.unit)
        self.token = rec.token
        self.launcher = "systemd" if rec.unit else "direct"
        self.adopted = True
        self._begin_run(rec.started_at or time.time())
        self.metrics.inc("services_adopted", service=self.id)
        self._to(lc.RUNNING, "adopted pid %d (left running by an earlier agent)" % rec.pid)
        self.sup._save_state()

    # ------------------------------------------------------------ start

    def _env(self):
        env = {"PATH": self.fx.sane_path}
        for key in ("HOME", "LANG", "LC_ALL", "TZ"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        env.update(dict(self.spec.env))
        env["ELKEID_SERVICE_ID"] = self.id
        env[TOKEN_ENV] = self.token
        if self.spec.socket_path:
            env["ELKEID_SERVICE_SOCKET"] = self.spec.socket_path
        return env

    def _paths(self):
        wd = self.spec.work_dir
        return os.path.join(wd, "stdout.log"), os.path.join(wd, "stderr.log")

    async def _start_run(self):
        spec = self.spec
        self._to(lc.STARTING, " ".join((spec.binary_path,) + spec.args)[:200])
        self.exited = False
        self.exit_code = None
        self.adopted = False
        self.token = "%s.%s" % (self.id, secrets.token_hex(8))
        self.launcher = self.sup.launcher
        problem = config.binary_problem(spec.binary_path)
        try:
            if problem:
                raise OSError("%s %s" % (config.START_ERROR, problem))
            os.makedirs(spec.work_dir, mode=0o750, exist_ok=True)
            out, err = self._paths()
            if self.launcher == "systemd":
                proc = await self.sup.executors.run(
                    "process", self.fx.spawn_unit, unit_name(self.id), spec.binary_path,
                    spec.args, spec.work_dir, self._env(), out, err, self.sup.stop_timeout)
            else:
                proc = self.fx.spawn_direct(spec.binary_path, spec.args, spec.work_dir,
                                            self._env(), out, err)
        except Exception as e:  # OSError mostly; a saturated pool too
            reason = "cannot start %s: %s" % (spec.binary_path, getattr(e, "strerror", None)
                                              or e)
            self.metrics.inc("service_start_errors", service=self.id)
            self._to(lc.EXITED, reason)
            await self._decide(reason, failure=True)
            return
        self.proc = proc
        self.runs += 1
        self.ident = self.fx.capture(proc.pid, proc.start_ticks)
        self._begin_run(time.time())
        self._to(lc.RUNNING, "pid %d" % proc.pid)
        self.sup._save_state()
        if self.ident is None:  # gone before we could look at it
            self._on_exit()

    def _begin_run(self, started_wall):
        now = time.monotonic()
        self.started_mono = now
        self.started_wall = started_wall
        self.health = HealthEvaluator(self.spec.health_check, now)
        self._health_word = ""
        self._never_reported = ""
        self.restart_policy.on_start(now)
        self.exited = False
        self.watch = self.fx.watch_exit(asyncio.get_running_loop(), self.proc, self._on_exit)

    def _on_exit(self):
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        self.exited = True
        self._poke.set()

    # ------------------------------------------------------------ running

    async def _monitor(self):
        """Until the run ends -> (reason, failure, still_alive), or a control
        request -> None."""
        hc = self.spec.health_check
        next_check = time.monotonic() + min(hc.interval, 1.0)
        while True:
            if self.exited:
                code = await self._collect()
                if self.daemonized:
                    return DAEMONIZED, True, False
                return self._exit_reason(code), self._is_failure(code), False
            if self._control:
                return None
            left = next_check - time.monotonic()
            if left > 0:
                await self._sleep(left)
                continue
            verdict = await self._check()
            next_check = time.monotonic() + hc.interval
            if verdict is None or verdict.healthy or self.exited:
                continue
            if self.spec.restart.policy == "never":
                if self._never_reported != verdict.state:
                    self._never_reported = verdict.state
                    log.warning("service %s is unhealthy (%s); restart policy never: left "
                                "running", self.id, verdict.reason)
                self.last_error = verdict.reason
                continue
            self.metrics.inc("service_health_restarts", service=self.id, check=verdict.state)
            return "health check %s: %s" % (verdict.state, verdict.reason), True, True

    async def _check(self):
        now = time.monotonic()
        sample = self.fx.sample(self.proc.pid)
        if sample is not None and sample.start_ticks == self.proc.start_ticks:
            self.health.resources(now, sample.cpu_seconds, sample.rss)
        hc = self.spec.health_check
        if hc.http_endpoint:
            try:
                ok, error = await asyncio.wait_for(
                    self.sup.executors.run("probe", probe_http, hc.http_endpoint,
                                           hc.http_timeout), hc.http_timeout + 5)
            except asyncio.TimeoutError:
                ok, error = False, "no answer within %g s" % hc.http_timeout
            except Exception as e:  # a saturated pool: not the service's fault
                log.warning("service %s: probe not run: %s", self.id, e)
                ok, error = None, ""
            if ok is not None:
                if not ok:
                    self.metrics.inc("service_probe_failures", service=self.id)
                self.health.probe(time.monotonic(), ok, error)
        if self.restart_policy.check_healthy(time.monotonic()):
            self._clear_abnormal()
            log.info("service %s has been healthy for %.0f s: earlier failures forgiven",
                     self.id, self.sup.healthy_reset)
        word = self.health.summary(time.monotonic())
        if word != self._health_word:
            self._health_word = word
            self.sup._notify(self)
        return self.health.verdict(time.monotonic())

    # ------------------------------------------------------------ endings

    def _is_failure(self, code):
        return code is None or code != 0

    def _exit_reason(self, code):
        if code is None:
            what = "its process ended (exit status unknown: not our child)"
        else:
            what = describe_exit(code)
        said = last_line(self._paths()[1])
        return "%s: %s" % (what, said) if said and code not in (0, None) else what

    async def _collect(self):
        """The current run's process has ended: its code, after the
        leftovers of its session / token are stopped. Reaps a child."""
        proc = self.proc
        code = None
        if proc.child:
            # Leader still a zombie: its session and group ids cannot be
            # reused until it is reaped, so the searches below are safe.
            pass
        elif proc.unit:
            try:
                code = await self.sup.executors.run("process", self.fx.unit_exit_code,
                                                    proc.unit)
            except Exception:
                code = None
        left = self.fx.leftovers(proc.pid, self.token, proc.start_ticks)
        if proc.child:
            code = self.fx.reap(proc)
        if not left and code in (0, None):
            # A daemonizing run exits 0 while its child forks the daemon: one
            # scan can fall between the child's exit and the daemon showing
            # up. Look again (by token: the leader may be reaped now).
            for delay in RESCAN_DELAYS:
                await asyncio.sleep(delay)
                left = self.fx.leftovers(proc.pid, self.token, proc.start_ticks,
                                         by_session=False)
                if left:
                    break
        self.daemonized = bool(left) and code == 0
        if left:
            if self.daemonized:
                self.metrics.inc("service_daemonized", service=self.id)
                log.error("service %s: %s (pid %d exited 0, %d processes left); stopping "
                          "them", self.id, DAEMONIZED, proc.pid, len(left))
            else:
                log.warning("service %s: stopping %d processes its run left behind",
                            self.id, len(left))
            await self._stop_pids(left, proc.start_ticks)
        self.exit_code = code
        return code

    async def _stop_pids(self, pids, min_start):
        for pid in pids:
            self.fx.kill(pid, signal.SIGTERM)
            self.fx.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + min(self.sup.stop_timeout, 5.0)
        while time.monotonic() < deadline:
            if not self.fx.leftovers(self.proc.pid, self.token, min_start):
                return
            await asyncio.sleep(0.1)
        for pid in self.fx.leftovers(self.proc.pid, self.token, min_start):
            self.metrics.inc("service_kills", service=self.id)
            self.fx.kill(pid, signal.SIGKILL)

    async def _terminate(self, why):
        """Stop the running process: SIGTERM (its session's group, or
        ``systemctl stop``), ``stop_timeout``, then SIGKILL of the group and
        of every leftover of the run."""
        self._to(lc.STOPPING, why)
        proc = self.proc
        if not self.exited:
            if proc.unit:
                try:
                    await self.sup.executors.run("process", self.fx.stop_unit, proc.unit,
                                                 self.sup.stop_timeout + 30)
                except Exception as e:
                    log.warning("service %s: systemctl stop failed: %s", self.id, e)
            elif self.ident is not None:
                self.fx.signal_session(self.ident, signal.SIGTERM)
                self.fx.signal_session(self.ident, signal.SIGCONT)  # a stopped one must see it
            if not await self._exited_within(self.sup.stop_timeout):
                log.warning("service %s did not exit within %.0f s of SIGTERM; killing it",
                            self.id, self.sup.stop_timeout)
                self.metrics.inc("service_kills", service=self.id)
                if proc.unit:
                    await self.sup.executors.run("process", self.fx.kill_unit, proc.unit,
                                                 signal.SIGKILL)
                if self.ident is not None:
                    self.fx.signal_session(self.ident, signal.SIGKILL)
                    self.fx.kill(self.ident, signal.SIGKILL)
                for pid in self.fx.leftovers(proc.pid, self.token, proc.start_ticks):
                    self.fx.kill(pid, signal.SIGKILL)
                if not await self._exited_within(self.sup.kill_timeout):
                    text = "service %s: pid %d did not exit after SIGKILL (D state?)" % (
                        self.id, proc.pid)
                    log.error(text)
                    self.metrics.inc("service_unkillable", service=self.id)
                    self._abnormal(text)
                    self.last_error = text
                    self._release()
                    self._to(lc.EXITED, text)
                    return
        code = await self._collect()
        self.last_exit = describe_exit(code) if code is not None else "exited"
        self._release()
        self._to(lc.EXITED, "%s: %s" % (why, self.last_exit))

    async def _exited_within(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.exited:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._sleep(left)
        return True

    def _release(self):
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self.ident is not None:
            self.ident.close()
            self.ident = None
        self.proc = None
        self.exited = True
        self.sup._save_state()

    async def _ended(self, reason, failure, alive):
        if alive:
            await self._terminate(reason)
            self.last_exit = self.last_exit or "stopped"
        else:
            self.last_exit = describe_exit(self.exit_code) if self.exit_code is not None \
                else "exited"
            self._release()
            self._to(lc.EXITED, reason)
        self.last_error = reason if failure else self.last_error
        await self._decide(reason, failure)

    async def _decide(self, reason, failure):
        """After a run ended without being asked to: restart per policy."""
        policy = self.spec.restart.policy
        if policy == "never" or (policy == "on-failure" and not failure):
            self._parked = True
            log.info("service %s ended (%s); restart policy %s: not restarted", self.id,
                     reason, policy)
            if failure:
                self._abnormal("service %s ended: %s" % (self.id, reason))
            return
        decision = self.restart_policy.on_failure(time.monotonic())
        if decision.fatal:
            text = "service %s failed %d times in a row (last: %s); given up" % (
                self.id, decision.failures, reason)
            log.error(text)
            self.metrics.inc("services_failed", service=self.id)
            self._abnormal(text)
            self._to(lc.FAILED, "gave up after %d failed runs" % decision.failures)
            return
        self._abnormal("service %s: %s; restart %d in %g s" % (
            self.id, reason, decision.failures, decision.delay))
        self.next_start = time.monotonic() + decision.delay
        self._to(lc.BACKOFF, "restart %d in %g s" % (decision.failures, decision.delay))

    # ------------------------------------------------------------ heartbeats

    def accept_heartbeat(self, beat, now):
        """-> (ok, error, reason label)."""
        if self.proc is None or self.exited or self.life.state != lc.RUNNING:
            return False, "service %s is %s" % (self.id, self.life.state), "not_running"
        if beat.agent_id != self.id:
            return False, "agent_id %r is not %r" % (beat.agent_id, self.id), "wrong_agent_id"
        if not self.fx.is_descendant(beat.pid, self.proc.pid):
            return False, "pid %d is not service %s's process (%d) or one of its " \
                "descendants" % (beat.pid, self.id, self.proc.pid), "wrong_pid"
        self.health.heartbeat(now, beat.status)
        self.heartbeats += 1
        return True, "", ""

    # ------------------------------------------------------------ reports

    def record(self):
        """The adoption record of the current run, or None."""
        if self.proc is None or self.exited:
            return None
        from .adoption import Record
        return Record(self.proc.pid, self.proc.start_ticks, self.spec.config_hash(),
                      self.proc.unit, self.token, self.started_wall)

    def status(self):
        now = time.monotonic()
        running = self.proc is not None and not self.exited
        h = self.health
        return {
            "id": self.id, "type": self.spec.type, "name": self.spec.name or self.id,
            "state": self.life.state, "pid": self.pid, "restarts": self.restarts,
            "health": h.summary(now) if running and h is not None else "",
            "checks": h.checks(now) if running and h is not None else {},
            "last_error": self.last_error, "last_exit": self.last_exit,
            "uptime": round(now - self.started_mono, 3) if running else 0,
            "cpu": round(h.cpu * 100, 2) if running and h is not None else 0.0,
            "rss": h.rss if running and h is not None else 0,
            "enabled": self.spec.enabled, "adopted": self.adopted and running,
            "launcher": self.launcher, "unit": self.proc.unit if running else "",
            "config_hash": self.spec.config_hash(), "since": self.life.since,
            "heartbeats": self.heartbeats, "heartbeats_refused": self.refused,
        }
