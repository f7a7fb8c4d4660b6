"""One plugin's life: spawn, pipes, ingest, tasks, exit, restart.

The asyncio shell around the sans-I/O pieces (FrameDecoder, RestartPolicy,
LimitEvaluator) and the pipe protocols (``pipes.py``). One ``PluginRunner``
per plugin name and version; its ``_supervise`` task loops start -> run ->
end -> backoff until stopped or given up. Every state change goes through
its ``runtime.lifecycle.Lifecycle`` (the table of allowed moves lives
there); the 1001 heartbeat keeps Elkeid-era state words (``fatal`` for
failed, ``stopping`` for the instant between exit and the next decision).
"""

import asyncio
import fcntl
import json
import logging
import os
import signal
import time
from collections import deque

from ..errors import ServerFault
from ..buffer.queue import HIGH, NORMAL
from ..host.resources import ProcessSampler
from ..runtime import lifecycle
from ..runtime.lifecycle import Lifecycle
from .pipes import HIGH_FD, RECORD_FD, TASK_FD, RecordPipe, TaskPipe
from .policy import LimitEvaluator, RateMeter, RestartPolicy, describe_exit

log = logging.getLogger("elkeid_agent.plugins")

# What the 1001 heartbeat says (unchanged wire values).
STARTING, RUNNING, BACKOFF, STOPPING, STOPPED, FATAL = (
    "starting", "running", "backoff", "stopping", "stopped", "fatal")
_WIRE = {lifecycle.FAILED: FATAL, lifecycle.EXITED: STOPPING}


class PluginRunner:
    def __init__(self, sup, spec):
        self.sup = sup
        self.spec = spec
        self.name = spec.name
        self.policy = sup.policy
        self.queue = sup.queue
        self.high_water = self.policy.queue_high_water * sup.queue.max_bytes
        self.metrics = sup.metrics
        self.system = sup.system
        self.loop = sup.loop
        self.dir = os.path.join(sup.plugin_root, spec.name)
        self.exe = os.path.join(self.dir, spec.name)
        self.stderr_path = os.path.join(self.dir, spec.name + ".stderr")
        self.life = Lifecycle("plugin " + spec.name, sup.metrics, "plugin_transitions",
                              {"plugin": spec.name}, log, {"plugin": spec.name})
        self.restart = RestartPolicy(self.policy)
        self.limits = None
        self.last_error = ""
        self.restarts = 0
        self.next_start = 0.0
        # process
        self.child = None
        self.pid = 0
        self.start_time = 0.0
        self.exit_code = None
        self._watch = None
        self._abandoned = {}    # pid -> exit watch of a process that outlived SIGKILL
        self._pipes = []
        self._task_transport = None
        self._task_proto = None
        self._tasks = deque()
        self.discarding = False
        self._eof_error = ""
        self._end = None        # future: why the current run ends
        self._exited = None     # future: process exited and was reaped
        # life
        self._stop_requested = False
        self._wake = asyncio.Event()
        self._task = None
        # counters (plugin's point of view, as Elkeid: rx = tasks in, tx = records out)
        self.tx_records = self.tx_bytes = 0
        self.rx_tasks = self.rx_bytes = 0
        now = time.time()
        self.rates = RateMeter(now, 0, 0, 0, 0)
        self.hb_sampler = None  # resources.ProcessSampler of the running process
        self.du = 0

    @property
    def state(self):
        """The state as the 1001 heartbeat and status() show it."""
        return _WIRE.get(self.life.state, self.life.state)

    # ------------------------------------------------------------ control

    def start(self):
        self._task = self.loop.create_task(self._supervise(), name="plugin-" + self.name)
        return self._task

    async def stop(self):
        """Stop for good (sync removal, replacement, agent shutdown)."""
        self._stop_requested = True
        self._wake.set()
        if self._end is not None and not self._end.done():
            self._end.set_result(None)
        if self._task is not None:
            await asyncio.shield(self._task)

    def revive(self, spec):
        """A fatal plugin listed again: start over with a clean record."""
        self.spec = spec
        if self.life.state == lifecycle.FAILED:
            self.restart.reset()
            if self._task is not None and self._task.done():
                self.start()  # the loop itself had failed
            else:
                self._wake.set()

    @property
    def fatal(self):
        return self.life.state == lifecycle.FAILED

    @property
    def alive(self):
        return self.life.state in (lifecycle.RUNNING, lifecycle.STOPPING) and self.pid != 0

    # ------------------------------------------------------------ supervision loop

    async def _supervise(self):
        try:
            while not self._stop_requested:
                reason = await self._run_once()
                if self._stop_requested:
                    break
                now = time.monotonic()
                decision = self.restart.on_failure(now)
                self._record_failure(reason, decision)
                if decision.fatal:
                    self.life.transition(lifecycle.FAILED, "gave up after %d failed runs in a "
                                         "row; waiting for the server to list it again"
                                         % decision.failures)
                    await self._wait_wake(None)
                    if self._stop_requested:
                        break
                    self.sup._clear_reason(self.name)
                    log.info("plugin %s revived by the server's config", self.name,
                             extra={"plugin": self.name})
                    continue
                self.next_start = time.time() + decision.delay
                self.life.transition(lifecycle.BACKOFF, "restart %d in %g s"
                                     % (decision.failures, decision.delay))
                if decision.delay > 0:
                    await self._wait_wake(decision.delay)
                if self._stop_requested:
                    break
                self.restarts += 1
                self.metrics.inc("plugin_restarts", plugin=self.name)
        except Exception as exc:  # a bug here must not leave a process unsupervised
            log.exception("supervising plugin %s failed", self.name)
            self.last_error = "internal error: %r" % (exc,)
            self.sup._set_reason(self.name, "plugin %s: %s" % (self.name, self.last_error))
            if self.life.state == lifecycle.RUNNING:
                self.life.transition(lifecycle.STOPPING, self.last_error)
            await self._reap_after_error()
            if self.life.allowed(lifecycle.EXITED):
                self.life.transition(lifecycle.EXITED, self.last_error)
            if self.life.allowed(lifecycle.FAILED):
                self.life.transition(lifecycle.FAILED, self.last_error)
            return
        if self.life.state != lifecycle.STOPPED:
            self.life.transition(lifecycle.STOPPED, "stopped on request")

    async def _wait_wake(self, timeout):
        self._wake.clear()
        if self._stop_requested:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _record_failure(self, reason, decision):
        self.last_error = reason
        if decision.fatal:
            text = "plugin %s is fatal after %d failed runs: %s" % (
                self.name, decision.failures, reason)
            log.error(text, extra={"plugin": self.name})
        else:
            text = "plugin %s failed (%s); restart %d in %g s" % (
                self.name, reason, decision.failures, decision.delay)
        self.sup._set_reason(self.name, text)

    # ------------------------------------------------------------ one run

    async def _run_once(self):
        self.life.transition(lifecycle.STARTING, "version %s" % self.spec.version)
        self.discarding = False
        self._eof_error = ""
        self.exit_code = None
        self._end = self.loop.create_future()
        self._exited = self.loop.create_future()
        try:
            await self._spawn()
        except (OSError, ValueError) as exc:
            await self._reap_after_error()
            reason = "cannot start %s: %s" % (self.exe, getattr(exc, "strerror", None) or exc)
            self.life.transition(lifecycle.EXITED, reason)
            return reason
        self.restart.on_start(time.monotonic())
        self.limits = LimitEvaluator(self.policy.cpu_limit, self.policy.rss_limit,
                                     self.policy.limit_window)
        self.hb_sampler = ProcessSampler(self.pid)
        self.life.transition(lifecycle.RUNNING, "pid %d" % self.pid)
        end = await self._end
        if end is None:
            await self._terminate(graceful=True, why="stop requested")
            self.life.transition(lifecycle.EXITED, "stopped on request")
            return None
        kind, reason = end
        # A protocol violation gets no grace period: its output is already
        # being discarded. A limit breach is a polite restart.
        exited = await self._terminate(graceful=(kind == "limit"),
                                       why=reason if kind != "exit" else "its process ended")
        if not exited:
            reason = self.last_error
        elif kind == "exit":
            reason = describe_exit(self.exit_code)
            try:
                said = await self.sup.executors.run("process", last_line, self.stderr_path)
            except Exception as exc:  # a saturated pool costs the detail, not the restart
                log.warning("plugin %s: cannot read its stderr: %s", self.name, exc)
                said = ""
            if said:
                reason += ": " + said
            if self._eof_error:
                reason += "; " + self._eof_error
        self.life.transition(lifecycle.EXITED, reason or "")
        return reason

    async def _spawn(self):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fds = []
        try:
            stderr_fd = os.open(self.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                                | os.O_CLOEXEC, 0o600)
            fds.append(stderr_fd)
            os.fchmod(stderr_fd, 0o600)
            task_r, task_w = os.pipe()
            fds += [task_r, task_w]
            data_r, data_w = os.pipe()
            fds += [data_r, data_w]
            high_r, high_w = os.pipe()
            fds += [high_r, high_w]
            _grow_pipe(data_r, self.policy.pipe_buffer)
            self.child = self.system.spawn(
                self.exe, cwd=self.dir, env=self._env(), stderr_fd=stderr_fd,
                fd_map={TASK_FD: task_r, RECORD_FD: data_w, HIGH_FD: high_w})
        except BaseException:
            for fd in fds:
                _close(fd)
            raise
        for fd in (stderr_fd, task_r, data_w, high_w):
            _close(fd)
        # From here on the file objects own the agent's ends, and each
        # transport its file once created: closing a file under a live
        # transport would leave the loop watching a number that may be reused.
        files = [open(data_r, "rb", buffering=0), open(high_r, "rb", buffering=0),
                 open(task_w, "wb", buffering=0)]
        owned = []
        child, exited, end = self.child, self._exited, self._end
        self.pid = child.pid
        self.start_time = time.time()
        self.sup._record_group(self)
        # The watch reaps this run's process whenever it exits, even after
        # the runner gave up waiting for it.
        self._watch = self.system.watch_exit(
            self.loop, self.pid, lambda: self._on_exit(child, exited, end))
        try:
            for pipe, prio in ((files[0], NORMAL), (files[1], HIGH)):
                proto = RecordPipe(self, prio)
                transport, _ = await self.loop.connect_read_pipe(lambda p=proto: p, pipe)
                owned.append(pipe)
                # One read may take the whole pipe (asyncio's default is 256 KiB).
                transport.max_size = max(self.policy.pipe_buffer, 256 * 1024)
                self._pipes.append(proto)
            self._task_proto = TaskPipe(self)
            self._task_transport, _ = await self.loop.connect_write_pipe(
                lambda: self._task_proto, files[2])
            owned.append(files[2])
            self._task_transport.set_write_buffer_limits(high=0)
        except BaseException:
            self._close_task_pipe()
            self._close_record_pipes()
            for f in files:
                if f not in owned:
                    f.close()
            raise
        self._pump_tasks()

    def _env(self):
        env = {"PATH": self.system.sane_path}
        for key in ("HOME", "LANG", "LC_ALL", "TZ"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        env.update(self.policy.env)
        env["ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"] = "1"
        if self.spec.detail:
            env["DETAIL"] = self.spec.detail
        return env

    # ------------------------------------------------------------ endings

    def _on_exit(self, child, exited, end):
        """A leader exited (zombie, not yet reaped): the group id is still
        ours, so kill whatever it left behind, then reap. ``exited`` and
        ``end`` are the futures of the run that spawned it."""
        self.system.kill_group(child.pid, signal.SIGKILL)
        code = self.system.reap(child)
        self.sup._forget_group(self.name, child.pid)
        if self._abandoned.pop(child.pid, None) is not None:
            self.sup.state.clear("plugin-unkillable:%d" % child.pid)
            log.info("plugin %s: pid %d finally exited after SIGKILL", self.name, child.pid,
                     extra={"plugin": self.name})
        if not exited.done():
            exited.set_result(code)
        if not end.done():
            end.set_result(("exit", None))

    def protocol_violation(self, message):
        """Bad frame or absurd length: discard everything from here on."""
        self.discarding = True
        self._close_record_pipes()
        self.last_error = message
        self.metrics.inc("plugin_frame_errors", plugin=self.name)
        log.error("plugin %s broke the frame protocol: %s", self.name, message,
                  extra={"plugin": self.name})
        if self._end is not None and not self._end.done():
            self._end.set_result(("violation", message))

    def frame_error_at_eof(self, message):
        self._eof_error = message
        self.last_error = message
        self.metrics.inc("plugin_frame_errors", plugin=self.name)
        log.error("plugin %s: %s", self.name, message, extra={"plugin": self.name})

    def limit_exceeded(self, message):
        self.metrics.inc("plugin_limit_restarts", plugin=self.name)
        log.error("plugin %s over its resource limits: %s", self.name, message,
                  extra={"plugin": self.name})
        if self._end is not None and not self._end.done():
            self._end.set_result(("limit", "resource limit: " + message))

    async def _terminate(self, graceful, why):
        """Stop the running process; False if it outlived SIGKILL.

        Graceful: close fd 3 first and keep reading fds 4/5, so a plugin
        that exits on end-of-tasks (both Elkeid SDKs' main loops do) flushes
        its last records into the queue; at half the stop timeout close the
        record pipes too and SIGTERM the group; at the timeout SIGKILL it.
        A process that does not exit ``kill_timeout`` seconds after SIGKILL
        (uninterruptible sleep in the kernel) is reported and left to its
        exit watch, which reaps it whenever it finally goes."""
        self.life.transition(lifecycle.STOPPING, why)
        self._close_task_pipe()
        if graceful and not self._exited.done():
            half = self.policy.stop_timeout / 2
            if not await self._exited_within(half):
                self._close_record_pipes()
                self.system.kill_group(self.pid, signal.SIGTERM)
                if not await self._exited_within(half):
                    log.warning("plugin %s did not exit within %.0f s; killing its process group",
                                self.name, self.policy.stop_timeout,
                                extra={"plugin": self.name})
        self._kill_group()
        if not await self._exited_within(self.policy.kill_timeout):
            self._abandon()
            return False
        self.exit_code = self._exited.result()
        await self._drain()
        return True

    async def _reap_after_error(self):
        """After a failed spawn or an internal error: kill and reap what was
        started (its exit watch removes the zombie and the pgid record),
        then release the pipes."""
        if self._watch is not None:
            self._kill_group()
            if not await self._exited_within(self.policy.kill_timeout):
                self._abandon()
                return
        self._close_pipes()

    def _abandon(self):
        pid = self.pid
        text = "plugin %s did not exit after SIGKILL (D state?): pid %d" % (self.name, pid)
        self.last_error = text
        log.error(text, extra={"plugin": self.name})
        self.metrics.inc("plugin_unkillable", plugin=self.name)
        self.sup.state.set_abnormal("plugin-unkillable:%d" % pid, text)
        self._abandoned[pid] = self._watch
        self._watch = None  # still armed: it reaps the process when it exits
        self._close_pipes()

    async def _exited_within(self, timeout):
        if self._exited is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _kill_group(self):
        if self.pid and self._exited is not None and not self._exited.done():
            self.system.kill_group(self.pid, signal.SIGKILL)
            self.system.kill(self.pid, signal.SIGKILL)  # in case it left its group

    async def _drain(self):
        """Let readers take what the plugin wrote before it died, then close."""
        waits = [p.closed for p in self._pipes if not p.closed.done()]
        if waits:
            await asyncio.wait(waits, timeout=self.policy.drain_timeout)
        self._close_pipes()

    def _close_record_pipes(self):
        for proto in self._pipes:
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.close()

    def _close_pipes(self):
        self._close_task_pipe()
        self._close_record_pipes()
        self._pipes = []
        self.pid = 0
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _close_task_pipe(self):
        t = self._task_transport
        self._task_transport = None
        if t is not None and not t.is_closing():
            t.abort()
        if self._tasks:
            self.metrics.inc("plugin_tasks_dropped", len(self._tasks), plugin=self.name)
            self._tasks.clear()

    # ------------------------------------------------------------ tasks

    def send_task(self, frame, token):
        if self.life.state != lifecycle.RUNNING or self._task_transport is None:
            self.metrics.inc("plugin_tasks_refused", plugin=self.name, reason="not_running")
            raise ServerFault("plugin %s is %s and cannot take tasks" % (self.name, self.state),
                              token=token)
        if self._task_proto.lost:
            self.metrics.inc("plugin_tasks_refused", plugin=self.name, reason="pipe_closed")
            raise ServerFault("plugin %s closed its task pipe" % self.name, token=token)
        if len(self._tasks) >= self.policy.task_queue_max:
            self.metrics.inc("plugin_tasks_refused", plugin=self.name, reason="queue_full")
            raise ServerFault("task queue of plugin %s is full (%d tasks waiting; the plugin "
                              "does not read them)" % (self.name, len(self._tasks)), token=token)
        self._tasks.append(frame)
        self._pump_tasks()

    def _pump_tasks(self):
        t = self._task_transport
        proto = self._task_proto
        while self._tasks and t is not None and not proto.paused and not proto.lost:
            frame = self._tasks.popleft()
            t.write(frame)
            self.rx_tasks += 1
            self.rx_bytes += len(frame) - 4
            self.metrics.inc("plugin_tasks", plugin=self.name)

    # ------------------------------------------------------------ monitoring

    def check(self, now_mono):
        """Periodic: limits and healthy reset. Called by the supervisor."""
        if self.life.state != lifecycle.RUNNING or not self.pid:
            return
        if self.restart.check_healthy(now_mono):
            self.sup._clear_reason(self.name)
        sample = self.system.sample(self.pid)
        if sample is None:
            return
        verdict = self.limits.sample(now_mono, sample.cpu_seconds, sample.rss)
        if verdict:
            self.limit_exceeded(verdict)

    def heartbeat_fields(self, now):
        fields = {
            "name": self.name,
            "pversion": self.spec.version,
            "state": self.state,
            "last_error": self.last_error,
            "restarts": str(self.restarts),
            "du": str(self.du),
        }
        rx_tps, tx_tps, rx_speed, tx_speed = self.rates.rates(
            now, self.rx_tasks, self.tx_records, self.rx_bytes, self.tx_bytes)
        fields["rx_tps"] = "%.8f" % rx_tps
        fields["tx_tps"] = "%.8f" % tx_tps
        fields["rx_speed"] = "%.8f" % rx_speed
        fields["tx_speed"] = "%.8f" % tx_speed
        if self.state == BACKOFF:
            fields["next_start"] = str(int(self.next_start))
        stats = self.hb_sampler.sample() if self.alive and self.hb_sampler else None
        if stats is not None and stats.exists:
            fields["cpu"] = "%.8f" % stats.cpu
            fields["rss"] = str(stats.rss)
            fields["read_speed"] = "%.8f" % stats.read_speed
            fields["write_speed"] = "%.8f" % stats.write_speed
            fields["pid"] = str(self.pid)
            fields["nfd"] = str(stats.nfd)
            fields["start_time"] = str(stats.start_time)
        return fields


def last_line(path, limit=200):
    """The last non-empty line of a plugin's stderr (what it said as it
    died), at most ``limit`` characters; "" if none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[-1].decode("utf-8", "replace")
    if text.startswith("{"):  # a JSON log line: its message says it
        try:
            msg = json.loads(text).get("msg")
        except (ValueError, AttributeError):
            msg = None
        if isinstance(msg, str) and msg:
            text = msg
    return text if len(text) <= limit else text[:limit - 3] + "..."


F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ from Python 3.10 on


def _grow_pipe(fd, size):
    """A bigger record pipe: fewer wake-ups per record, more slack for the
    plugin when the agent is busy. Best effort (the kernel caps unprivileged
    users at /proc/sys/fs/pipe-max-size)."""
    if size:
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        except OSError:
            pass


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass
