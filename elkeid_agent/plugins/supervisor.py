"""PluginSupervisor: the agent's interface to its plugins.

The app calls ``sync`` with each configs list, ``send_task`` with each plugin
task, ``heartbeat_records`` every minute and ``shutdown`` at exit. Records
from plugins go straight from the pipes into the RecordQueue.

State shown to the server: every plugin problem is an abnormal reason in
``AgentState`` under the key ``plugin:<name>`` (load failures use Elkeid's
text ``load plugin <name> failed: <why>``), cleared when the plugin is
removed, revived, reloaded or has run healthily for ``healthy_reset``
seconds. The caller resets AgentState when a configs list arrives (as Elkeid
does) *before* calling ``sync``.

Leftovers of a dead agent: each running plugin's process group is recorded
in ``plugin/.<name>.pgid`` (boot id, pgid, leader start time). ``start``
(also run by the first ``sync``) kills what an earlier agent left behind -
plugin leaders die with the agent through PR_SET_PDEATHSIG, but their
children only through their process group.
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
from . import fetch
from .fetch import FetchError
from .ingest import task_frame
from .policy import Policy
from .runner import RUNNING, PluginRunner
from .syncplan import REJECT, REMOVE, REPLACE, REVIVE, START, PluginSpec, plan_sync

log = logging.getLogger("elkeid_agent.plugins")

PLUGIN_HEARTBEAT = 1001
_PGID_SUFFIX = ".pgid"


class PluginSupervisor:
    def __init__(self, workdir, queue, metrics, state, loop=None, system=None,
                 **policy_overrides):
        self.policy = Policy.from_overrides(**policy_overrides)
        self.workdir = workdir
        self.plugin_root = os.path.join(workdir, "plugin")
        self.queue = queue
        self.metrics = metrics
        self.state = state
        self._loop = loop
        self.system = system or ProcessEffects(use_pidfd=self.policy.use_pidfd)
        self.opener = None  # urllib opener override (tests); None = default
        self._runners = {}
        self._reasons = {}
        self._cancels = set()
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
        """Create plugin/, clear staging leftovers, kill leftover processes
        of an earlier agent, start the monitor. Idempotent; ``sync`` calls it."""
        if self._started:
            return
        self._started = True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        killed = await self.loop.run_in_executor(None, self._sweep)
        if killed:
            self.metrics.inc("plugin_leftovers_killed", len(killed))
            log.warning("killed %d leftover plugin process(es) of an earlier agent: %s",
                        len(killed), " ".join(map(str, killed)))
        self._monitor = self.loop.create_task(self._monitor_loop(), name="plugin-monitor")

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

    def _forget_group(self, runner):
        try:
            os.unlink(self._group_file(runner.name))
        except OSError:
            pass

    async def shutdown(self):
        """Stop every plugin (close pipes, wait up to stop_timeout, SIGKILL
        the group). Downloads in progress are abandoned."""
        self._closing = True
        for cancel in list(self._cancels):
            cancel.set()
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        async with self._sync_lock():
            runners = list(self._runners.values())
            self._runners.clear()
            results = await asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
        for runner, result in zip(runners, results):
            if isinstance(result, BaseException):
                log.error("stopping plugin %s failed: %r", runner.name, result)
        log.info("all plugins stopped")

    def _sync_lock(self):
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # ------------------------------------------------------------ sync

    async def sync(self, configs):
        """Make the running plugins match ``configs`` (grpc_pb2.Config list,
        the agent's own entry already removed). Returns [(name, error)]."""
        specs = [PluginSpec.from_config(c) for c in configs]
        if self._closing:
            return [(s.name, "the agent is shutting down") for s in specs]
        async with self._sync_lock():
            await self.start()
            running = {n: (r.spec.version, r.fatal) for n, r in self._runners.items()}
            failures = []
            jobs = []
            for action in plan_sync(specs, running):
                if action.kind == REJECT:
                    failures.append(self._reject(action))
                elif action.kind == REMOVE:
                    jobs.append(self._remove(action.name))
                elif action.kind == REVIVE:
                    self._runners[action.name].revive(action.spec)
                elif action.kind in (START, REPLACE):
                    jobs.append(self._load(action.spec))
            for result in await asyncio.gather(*jobs):
                if result:
                    failures.append(result)
            return failures

    def _reject(self, action):
        name = action.name if isinstance(action.name, str) else repr(action.name)
        shown = name[:160]
        self.metrics.inc("plugin_load_failures", reason="bad_config")
        if action.spec is not None and "more than once" in action.reason:
            log.warning("plugin config %s: %s", shown, action.reason)
        else:
            log.error("plugin config %r refused: %s", shown, action.reason)
            self._set_reason(shown, "load plugin %r failed: %s" % (shown, action.reason))
        return (name, action.reason)

    async def _load(self, spec):
        name = spec.name
        cancel = threading.Event()
        self._cancels.add(cancel)
        try:
            staged = await self.loop.run_in_executor(
                None, fetch.prepare, self.plugin_root, spec, self.policy, cancel, self.opener)
        except FetchError as exc:
            return self._load_failed(spec, str(exc))
        except OSError as exc:
            return self._load_failed(spec, "cannot write plugin files: %s" % exc)
        finally:
            self._cancels.discard(cancel)
        if self._closing:
            fetch.discard(staged)
            return (name, "the agent is shutting down")
        old = self._runners.pop(name, None)
        if old is not None:
            log.info("plugin %s: replacing version %r with %r", name, old.spec.version,
                     spec.version)
            await old.stop()
        if staged is not None:
            try:
                await self.loop.run_in_executor(None, fetch.commit, self.plugin_root, staged)
            except OSError as exc:
                return self._load_failed(spec, "cannot install plugin files: %s" % exc)
        if self._closing:
            return (name, "the agent is shutting down")
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
        return (spec.name, message)

    async def _remove(self, name):
        runner = self._runners.pop(name)
        await runner.stop()
        await self.loop.run_in_executor(None, fetch.remove_plugin_dir, self.plugin_root, name)
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
        """One 1001 record per plugin: PROTOCOL.md section 4 fields plus
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
                await self._housekeeping()

    async def _housekeeping(self):
        runners = list(self._runners.values())
        jobs = [(r.dir, os.path.join(r.dir, r.name + ".stderr")) for r in runners]
        results = await self.loop.run_in_executor(None, _housekeep, jobs,
                                                  self.policy.stderr_max_bytes)
        for runner, (size, truncated) in zip(runners, results):
            runner.du = size
            if truncated:
                log.warning("plugin %s: %s.stderr exceeded %d bytes and was truncated",
                            runner.name, runner.name, self.policy.stderr_max_bytes)


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
