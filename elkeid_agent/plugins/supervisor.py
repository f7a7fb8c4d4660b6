"""PluginSupervisor: the agent's interface to its plugins.

The app calls ``sync`` with each configs list, ``send_task`` with each plugin
task, ``heartbeat_records`` every minute and ``shutdown`` at exit. Records
from plugins go straight from the pipes into the RecordQueue.

Syncs: each configs list is the complete desired state and supersedes the
one before at once. Its jobs (one per plugin to start, replace or remove)
are one group: a newer list, or shutdown, cancels the group's downloads in
progress and no job of a superseded group changes anything. Downloads run
outside the lock; only planning and the short install/remove step hold it,
so neither a newer list nor shutdown waits for a download. One plugin's
failure is its own: each job catches what it raises.

Blocking work goes to the agent's bounded executors by kind (downloads,
process reads, housekeeping, file changes), so five URLs that never answer
cannot hold up a restart or the transport.

State shown to the server: every plugin problem is an abnormal reason in
``AgentState`` under the key ``plugin:<name>`` (load failures use Elkeid's
text ``load plugin <name> failed: <why>``), cleared when the plugin is
removed, revived, reloaded or has run healthily for ``healthy_reset``
seconds. Load failures belong to the desired state that caused them: each
sync clears the previous sync's before planning. A process that outlives
SIGKILL is ``plugin-unkillable:<pid>`` until it finally exits.

Leftovers of a dead agent: each running plugin's process group is recorded
in ``plugin/.<name>.pgid`` (boot id, pgid, leader start time). ``start``
(also run by the first ``sync``) kills what an earlier agent left behind -
plugin leaders die with the agent through PR_SET_PDEATHSIG, but their
children only through their process group. A failed sweep is reported and
does not keep the monitor (limits, healthy resets, stderr bounds) from
starting.
"""

import asyncio
import logging
import os
import threading
import time

from .. import wire
from ..errors import ServerFault
from ..osfx.process import ProcessEffects
from ..host.resources import dir_size
from ..runtime.executors import Executors
from . import fetch
from .fetch import Cancelled, FetchError
from .ingest import task_frame
from .policy import Policy
from .runner import RUNNING, PluginRunner
from .syncplan import REJECT, REMOVE, REPLACE, REVIVE, START, PluginSpec, plan_sync

log = logging.getLogger("elkeid_agent.plugins")

PLUGIN_HEARTBEAT = 1001
_PGID_SUFFIX = ".pgid"
SWEEP_KEY = "plugins:sweep"


class _SyncGroup:
    """The jobs of one sync, cancelled together."""

    def __init__(self):
        self.superseded = False
        self.cancel = threading.Event()   # seen by download threads between chunks
        self.downloading = set()          # job tasks still fetching (safe to cancel)

    def supersede(self):
        self.superseded = True
        self.cancel.set()
        for task in list(self.downloading):
            task.cancel()


class PluginSupervisor:
    def __init__(self, workdir, queue, metrics, state, loop=None, system=None,
                 executors=None, **policy_overrides):
        """``executors``: the agent's runtime.executors.Executors (kinds
        download, process, housekeeping, files); a private set when None."""
        self.policy = Policy.from_overrides(**policy_overrides)
        self.workdir = workdir
        self.plugin_root = os.path.join(workdir, "plugin")
        self.queue = queue
        self.metrics = metrics
        self.state = state
        self._loop = loop
        self.system = system or ProcessEffects(use_pidfd=self.policy.use_pidfd)
        self._own_executors = executors is None
        self.executors = executors if executors is not None else Executors(metrics)
        self.opener = None  # urllib opener override (tests); None = default
        self._runners = {}
        self._reasons = {}
        self._load_failures = set()  # names whose reason is the last sync's load failure
        self._group = None           # the latest sync's jobs
        self._jobs = set()           # every sync job still running
        self._lock = None
        self._started = False
        self._closing = False
        self._monitor = None
        self._boot_id = None
        for name, text in (
                ("plugin_records", "records received from plugins"),
                ("plugin_record_bytes", "record bytes received from plugins"),
                ("plugin_frame_errors", "frame protocol violations by plugins"),
                ("plugin_restarts", "plugin restarts after a failure"),
                ("plugin_limit_restarts", "plugins stopped for exceeding CPU/RSS limits"),
                ("plugin_tasks", "tasks written to plugins"),
                ("plugin_tasks_refused", "tasks refused (no plugin, not running, queue full)"),
                ("plugin_tasks_dropped", "queued tasks dropped when a plugin stopped"),
                ("plugin_loads", "plugins loaded, by source"),
                ("plugin_load_failures", "plugin configs that could not be loaded"),
                ("plugin_loads_superseded", "plugin loads abandoned for a newer configs list"),
                ("plugin_sweep_failures", "start-up sweeps of leftover plugin processes that "
                                          "failed"),
                ("plugin_unkillable", "plugin processes still there after SIGKILL"),
                ("plugin_monitor_errors", "plugin monitor rounds that failed"),
                ("plugin_ingest_paused", "times a plugin's pipe was paused by the rate cap"),
                ("plugin_ingest_held", "reads after which a heavy producer's pipe was held "
                                       "because the queue filled faster than it was sent"),
                ("plugin_leftovers_killed", "processes of an earlier agent's plugins killed")):
            metrics.describe(name, text)

    @property
    def loop(self):
        return self._loop or asyncio.get_running_loop()

    # ------------------------------------------------------------ lifecycle

    async def start(self):
        """Start the monitor, create plugin/, clear staging leftovers, kill
        leftover processes of an earlier agent. Idempotent; ``sync`` calls
        it. A failed sweep is logged, counted and reported (abnormal
        ``plugins:sweep``); it is tried again by the next start."""
        if self._started:
            return
        self._started = True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._monitor is None:
            self._monitor = self.loop.create_task(self._monitor_loop(), name="plugin-monitor")
        try:
            killed = await self.executors.run("process", self._sweep)
        except Exception as exc:  # the monitor must run whatever the sweep met
            self._started = False
            self.metrics.inc("plugin_sweep_failures")
            self.state.set_abnormal(SWEEP_KEY, "cannot sweep leftover plugin processes: %s: %s"
                                    % (type(exc).__name__, exc))
            log.error("sweeping leftover plugin processes failed: %s: %s",
                      type(exc).__name__, exc)
            return
        self.state.clear(SWEEP_KEY)
        if killed:
            self.metrics.inc("plugin_leftovers_killed", len(killed))
            log.warning("killed %d leftover plugin process(es) of an earlier agent: %s",
                        len(killed), " ".join(map(str, killed)))

    def _sweep(self):
        os.makedirs(self.plugin_root, mode=0o700, exist_ok=True)
        fetch.clean_stale(self.plugin_root)
        self._boot_id = self.system.boot_id()
        killed = []
        for entry in os.listdir(self.plugin_root):
            if not (entry.startswith(".") and entry.endswith(_PGID_SUFFIX)):
                continue
            path = os.path.join(self.plugin_root, entry)
            try:
                with open(path) as f:
                    boot_id, pgid, ticks = f.read().split()
                if boot_id == self._boot_id:
                    killed += self.system.sweep_group(int(pgid), int(ticks), [self.plugin_root])
            except (OSError, ValueError):
                pass
            try:
                os.unlink(path)
            except OSError:
                pass
        return killed

    def _group_file(self, name):
        return os.path.join(self.plugin_root, "." + name + _PGID_SUFFIX)

    def _record_group(self, runner):
        ticks = self.system.start_ticks(runner.pid)
        if ticks is None:
            return
        if self._boot_id is None:
            self._boot_id = self.system.boot_id()
        path = self._group_file(runner.name)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write("%s %d %d\n" % (self._boot_id, runner.pid, ticks))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot record process group of plugin %s: %s", runner.name, exc)

    def _forget_group(self, name, pid):
        """Drop the record of ``name``'s group if it is still ``pid``'s (a
        late exit of an abandoned process must not erase its successor's)."""
        path = self._group_file(name)
        try:
            with open(path) as f:
                fields = f.read().split()
            if len(fields) == 3 and fields[1] != str(pid):
                return
            os.unlink(path)
        except OSError:
            pass

    async def shutdown(self):
        """Stop every plugin (close pipes, wait up to stop_timeout, SIGKILL
        the group). Downloads in progress are cancelled, not awaited."""
        self._closing = True
        if self._group is not None:
            self._group.supersede()
        await asyncio.gather(*list(self._jobs), return_exceptions=True)
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        async with self._sync_lock():
            runners = list(self._runners.values())
            self._runners.clear()
            results = await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
        for runner, result in zip(runners, results):
            if isinstance(result, BaseException):
                log.error("stopping plugin %s failed: %r", runner.name, result)
        if self._own_executors:
            self.executors.close()
        log.info("all plugins stopped")

    def _sync_lock(self):
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # ------------------------------------------------------------ sync

    async def sync(self, configs):
        """Make the running plugins match ``configs`` (grpc_pb2.Config list,
        the agent's own entry already removed). Returns [(name, error)];
        a sync superseded by a newer one returns what it got done."""
        specs = [PluginSpec.from_config(c) for c in configs]
        if self._closing:
            return [(s.name, "the agent is shutting down") for s in specs]
        if self._group is not None:
            self._group.supersede()
        group = self._group = _SyncGroup()
        failures = []
        jobs = []
        async with self._sync_lock():
            if group.superseded:  # a newer list arrived while this one waited
                return failures
            await self.start()
            for name in list(self._load_failures):
                self._clear_reason(name)
            running = {n: (r.spec.version, r.fatal) for n, r in self._runners.items()}
            for action in plan_sync(specs, running):
                if action.kind == REJECT:
                    failures.append(self._reject(action))
                elif action.kind == REMOVE:
                    jobs.append(self._job(group, action.name, None))
                elif action.kind == REVIVE:
                    self._runners[action.name].revive(action.spec)
                elif action.kind in (START, REPLACE):
                    jobs.append(self._job(group, action.name, action.spec))
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                if not isinstance(result, asyncio.CancelledError):
                    log.error("plugin sync job failed: %r", result)
            elif result:
                failures.append(result)
        return failures

    def _job(self, group, name, spec):
        task = self.loop.create_task(self._run_job(group, name, spec),
                                     name="plugin-sync-" + name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _run_job(self, group, name, spec):
        """One plugin's part of a sync: fetch (cancellable), then install or
        remove under the lock unless a newer sync superseded this one."""
        me = asyncio.current_task()
        staged = None
        try:
            if spec is not None:
                group.downloading.add(me)
                try:
                    staged = await self._fetch(spec, group)
                finally:
                    group.downloading.discard(me)
            async with self._sync_lock():
                if group.superseded:
                    fetch.discard(staged)
                    staged = None
                    if spec is not None:
                        self._superseded(spec)
                    return None
                if spec is None:
                    return await self._remove(name)
                return await self._install(spec, staged)
        except asyncio.CancelledError:
            fetch.discard(staged)
            if group.superseded and spec is not None:
                self._superseded(spec)
                return None
            raise
        except Cancelled:
            if spec is not None:
                self._superseded(spec)
            return None
        except FetchError as exc:
            return self._load_failed(spec, str(exc))
        except OSError as exc:
            if spec is None:
                log.error("plugin %s: cannot remove its files: %s", name, exc)
                return (name, "cannot remove plugin files: %s" % exc)
            return self._load_failed(spec, "cannot write plugin files: %s" % exc)
        except Exception as exc:  # one plugin's trouble never touches another's
            log.exception("plugin %s: sync job failed", name)
            if spec is not None:
                return self._load_failed(spec, "internal error: %r" % (exc,))
            return (name, "internal error: %r" % (exc,))

    def _superseded(self, spec):
        self.metrics.inc("plugin_loads_superseded", plugin=spec.name)
        log.info("plugin %s: load of version %s abandoned: a newer configs list arrived",
                 spec.name, spec.version, extra={"plugin": spec.name})

    async def _fetch(self, spec, group):
        """None when the local executable is good, else a verified Staged."""
        if await self.executors.run("files", fetch.local_ok, self.plugin_root, spec, group.cancel):
            return None
        return await self.executors.run("download", _prepare, self.plugin_root, spec,
                                        self.policy, group.cancel, self.opener)

    def _reject(self, action):
        name = action.name if isinstance(action.name, str) else repr(action.name)
        shown = name[:160]
        self.metrics.inc("plugin_load_failures", reason="bad_config")
        if action.spec is not None and "more than once" in action.reason:
            log.warning("plugin config %s: %s", shown, action.reason)
        else:
            log.error("plugin config %r refused: %s", shown, action.reason)
            self._set_reason(shown, "load plugin %r failed: %s" % (shown, action.reason))
            self._load_failures.add(shown)
        return (name, action.reason)

    async def _install(self, spec, staged):
        """Under the sync lock: stop the old version, swap the files, start."""
        name = spec.name
        old = self._runners.pop(name, None)
        if old is not None:
            log.info("plugin %s: replacing version %r with %r", name, old.spec.version,
                     spec.version)
            await old.stop()
        if staged is not None:
            try:
                await self.executors.run("files", fetch.commit, self.plugin_root, staged)
            except OSError as exc:
                return self._load_failed(spec, "cannot install plugin files: %s" % exc)
        source = "local" if staged is None else "download"
        self.metrics.inc("plugin_loads", plugin=name, source=source)
        self._clear_reason(name)
        runner = PluginRunner(self, spec)
        self._runners[name] = runner
        self.metrics.set("plugin_running", lambda r=runner: int(r.state == RUNNING), plugin=name)
        self.metrics.set("plugin_consecutive_failures", lambda r=runner: r.restart.failures,
                         plugin=name)
        runner.start()
        log.info("plugin %s %s loaded (%s)", name, spec.version,
                 "local file" if staged is None else staged.source)
        return None

    def _load_failed(self, spec, message):
        self.metrics.inc("plugin_load_failures", reason="fetch")
        log.error("load plugin %s failed: %s", spec.name, message, extra={"plugin": spec.name})
        self._set_reason(spec.name, "load plugin %s failed: %s" % (spec.name, message))
        self._load_failures.add(spec.name)
        return (spec.name, message)

    async def _remove(self, name):
        runner = self._runners.pop(name)
        await runner.stop()
        await self.executors.run("files", fetch.remove_plugin_dir, self.plugin_root, name)
        self._clear_reason(name)
        self.metrics.set("plugin_running", 0, plugin=name)
        self.metrics.set("plugin_consecutive_failures", 0, plugin=name)
        log.info("plugin %s removed", name)
        return None

    # ------------------------------------------------------------ state

    def _set_reason(self, name, text):
        self._reasons[name] = text
        self.state.set_abnormal("plugin:" + name, text)

    def _clear_reason(self, name):
        self._reasons.pop(name, None)
        self.state.clear("plugin:" + name)

    def state_reasons(self):
        """{plugin name: why it is abnormal} (also in AgentState)."""
        return dict(self._reasons)

    def names(self):
        return sorted(self._runners)

    def status(self):
        """A JSON-able view of every plugin (for debug/metrics endpoints)."""
        out = []
        for name in sorted(self._runners):
            r = self._runners[name]
            out.append({"name": name, "version": r.spec.version, "state": r.state,
                        "pid": r.pid, "restarts": r.restarts,
                        "failures": r.restart.failures, "last_error": r.last_error,
                        "tx_records": r.tx_records, "tx_bytes": r.tx_bytes,
                        "rx_tasks": r.rx_tasks, "rx_bytes": r.rx_bytes})
        return out

    # ------------------------------------------------------------ tasks

    def send_task(self, task):
        """Route a Task to plugin ``task.object_name``; ServerFault (with the
        task's token) if there is no such plugin or it cannot take it now."""
        runner = self._runners.get(task.object_name)
        if runner is None:
            self.metrics.inc("plugin_tasks_refused", plugin="", reason="no_plugin")
            raise ServerFault("no plugin named %r" % task.object_name[:160], token=task.token)
        frame = task_frame(task.data_type, task.object_name, task.data, task.token)
        if len(frame) - 4 > self.policy.max_frame:
            self.metrics.inc("plugin_tasks_refused", plugin=runner.name, reason="too_large")
            raise ServerFault("task of %d bytes is larger than %d" % (len(frame) - 4,
                                                                     self.policy.max_frame),
                              token=task.token)
        runner.send_task(frame, task.token)

    # ------------------------------------------------------------ heartbeat

    def heartbeat_records(self, now):
        """One 1001 record per plugin: docs/protocol.md section 4 fields plus
        ``state``, ``last_error``, ``restarts`` (and ``next_start`` in
        backoff). Process fields are present only while it runs."""
        return [wire.encode_record(PLUGIN_HEARTBEAT, int(now),
                                   self._runners[name].heartbeat_fields(now))
                for name in sorted(self._runners)]

    # ------------------------------------------------------------ monitor

    async def _monitor_loop(self):
        last_housekeeping = None
        while True:
            await asyncio.sleep(self.policy.sample_interval)
            now = time.monotonic()
            for runner in list(self._runners.values()):
                try:
                    runner.check(now)
                except Exception:  # one plugin's bad sample must not stop the monitor
                    log.exception("checking plugin %s failed", runner.name)
            if last_housekeeping is None or now - last_housekeeping >= self.policy.du_interval:
                last_housekeeping = now
                try:
                    await self._housekeeping()
                except Exception as exc:  # a saturated pool or a bug: try again next round
                    self.metrics.inc("plugin_monitor_errors")
                    log.error("plugin housekeeping failed: %s: %s", type(exc).__name__, exc)

    async def _housekeeping(self):
        runners = list(self._runners.values())
        jobs = [(r.dir, os.path.join(r.dir, r.name + ".stderr")) for r in runners]
        results = await self.executors.run("housekeeping", _housekeep, jobs,
                                           self.policy.stderr_max_bytes)
        for runner, (size, truncated) in zip(runners, results):
            runner.du = size
            if truncated:
                log.warning("plugin %s: %s.stderr exceeded %d bytes and was truncated",
                            runner.name, runner.name, self.policy.stderr_max_bytes)


def _prepare(root, spec, policy, cancel, opener):
    """Download-pool job: fetch and verify. A result that arrives after the
    sync was superseded is thrown away here, by the thread that made it."""
    staged = fetch.prepare(root, spec, policy, cancel, opener, check_local=False)
    if cancel.is_set():
        fetch.discard(staged)
        raise Cancelled("superseded by a newer configs list")
    return staged


def _housekeep(jobs, stderr_max):
    """Executor job: du of each plugin dir; truncate oversized stderr files
    (opened O_APPEND by the agent, so the plugin keeps writing at the new end)."""
    out = []
    for directory, stderr_path in jobs:
        truncated = False
        try:
            if os.stat(stderr_path).st_size > stderr_max:
                os.truncate(stderr_path, 0)
                truncated = True
        except OSError:
            pass
        out.append((dir_size(directory), truncated))
    return out
