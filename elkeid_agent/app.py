"""The agent process: wires every component onto one asyncio loop.

Data path (DESIGN.md): plugins and the agent's own producers put serialized
Records into ``RecordQueue``; ``Transport`` drains it onto the Transfer
stream; Commands come back through ``commands.Dispatcher`` to the agent
tasks, the plugin supervisor and (later) the updater. Timers drive the
heartbeat. The local services supervisor (services/) keeps the services
file's services alive. Signals: SIGTERM/SIGINT graceful exit (services keep
running), SIGHUP reload of the services file, SIGUSR1 debug endpoint,
SIGUSR2 release memory.

Start-up never gives up on a host problem it can survive: an unwritable
workdir or log directory marks the agent abnormal and it keeps reporting,
because a silent agent is worse than a degraded one.
"""

import asyncio
import logging
import os
import signal
import sys
import time

from . import PRODUCT, __version__, wire
from .host import hostinfo, identity
from .runtime import logs, sdnotify
from .control.agent_tasks import AgentTasks
from .control.commands import Dispatcher
from .control.configs import ConfigsHandler
from .errors import AgentError, LocalFault
from .host.heartbeat import Heartbeat
from .metrics import Registry
from .buffer.queue import RecordQueue
from .runtime.executors import Executors
from .runtime.tasks import TaskOwner
from .state import AgentState
from .transport.stream import Transport

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE = 0, 1
SHUTDOWN_FLUSH_SECONDS = 5.0


class Agent:
    def __init__(self, settings):
        self.settings = settings
        self.metrics = Registry()
        self.state = AgentState()
        self.queue = RecordQueue(settings.queue_max_bytes, self.metrics)
        self.agent_id = ""
        self.host = None
        self._header = b""
        self.transport = None
        self.plugins = None
        self.services = None
        self.heartbeat = None
        self.log_handles = None
        self.debug = None
        self.pidlock = None
        self._stop = None
        self._stop_reason = ""
        # Owns every long-lived task: a crash is logged, counted, marked
        # abnormal and restarted instead of silently ending the task.
        self.owner = TaskOwner(self.metrics, self.state)
        # Blocking work, in a bounded pool per kind (runtime/executors.py).
        self.executors = Executors(self.metrics)
        self.started_at = time.time()

    # ------------------------------------------------------------ start-up

    def _prepare_workdir(self):
        """Create the Elkeid layout; report (not raise) what cannot be made."""
        wd = self.settings.workdir
        for sub in ("", "log", "tmp", "plugin"):
            path = os.path.join(wd, sub)
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                if not os.access(path, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied")
            except OSError as e:
                self.state.set_abnormal("workdir:" + sub,
                                       "workdir %s not writable: %s" % (path, e.strerror))

    def _setup_logging(self):
        try:
            self.log_handles = logs.setup_logging(
                self.settings.workdir, self.metrics, max_bytes=self.settings.log_max_bytes,
                backups=self.settings.log_backups, console=sys.stderr.isatty())
        except LocalFault as e:
            # Fall back to stderr (journald captures it under systemd).
            logging.basicConfig(level=logging.INFO, stream=sys.stderr)
            self.state.set_abnormal("log", str(e))
            log.error("file logging unavailable: %s", e)
        remote = logs.RemoteLogHandler(self.queue.put_own, self.metrics,
                                       per_minute=self.settings.remote_log_per_minute,
                                       loop=asyncio.get_running_loop())
        logging.getLogger("elkeid_agent").addHandler(remote)
        self._remote_log = remote

    def _make_header(self):
        h = self.host
        return wire.encode_header(self.agent_id, h.intranet_ipv4, h.extranet_ipv4,
                                  h.intranet_ipv6, h.extranet_ipv6, h.hostname,
                                  __version__, PRODUCT)

    def refresh_host(self):
        """Re-read host facts; re-encode the header only if they changed."""
        host = hostinfo.collect()
        if host != self.host:
            self.host = host
            self._header = self._make_header()

    def report_failure(self, token, msg):
        """A 5100 record for a task the server sent with ``token``."""
        self.queue.put_own(logs.task_failure_record(token, msg))

    def request_shutdown(self, reason):
        if self._stop is not None and not self._stop.done():
            self._stop_reason = reason
            self._stop.set_result(reason)

    async def start(self):
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        s = self.settings
        self._prepare_workdir()
        self._setup_logging()
        for lineno, problem in s.env_file_problems:
            log.error("specified_env line %d ignored: %s", lineno, problem)
            self.metrics.inc("settings_bad_lines")
        if s.service_type == "sysvinit":
            from .runtime.pidlock import PidLock
            self.pidlock = PidLock(s.pidfile)
            self.pidlock.acquire()  # LocalFault: another agent runs; refuse to start
        try:
            self.agent_id = identity.agent_id(s.workdir, override=s.agent_id)
        except LocalFault as e:
            self.state.set_abnormal("identity", str(e))
            log.error("agent id not persisted: %s", e)
            self.agent_id = identity.agent_id(s.workdir, override=s.agent_id, persist=False)
        self.refresh_host()
        log.info("elkeid-agent %s starting: id %s, workdir %s, region %s",
                 __version__, self.agent_id, s.workdir, s.region)

        self.plugins = self._make_plugin_host()
        self.transport = Transport(s, self.queue, lambda: self._header, self._dispatcher(),
                                   self.metrics)
        self.tasks = AgentTasks(s, self.transport, self.metrics, self.report_failure,
                                self.request_shutdown, self.executors, owner=self.owner)
        if self.plugins is not None:
            try:
                # Kills plugin processes a crashed earlier agent left behind.
                await self.plugins.start()
            except (AgentError, OSError) as e:
                self.state.set_abnormal("plugins", "plugin supervisor: %s" % e)
                log.error("plugin supervisor failed to start: %s", e)
        # Before the services boot: a SIGHUP sent once they run must reload,
        # not end the agent (its default action).
        self._install_signals(loop)
        await self._start_services()
        self.heartbeat = Heartbeat(self)
        self.owner.spawn("transport", self.transport.run)
        self.owner.spawn("heartbeat", self._heartbeat_loop)
        sdnotify.ready("connecting")

    def _dispatcher(self):
        configs = ConfigsHandler(self.state, self.plugins, self.owner)
        return Dispatcher(self.metrics, self.report_failure, configs,
                          lambda task: self.tasks.handle(task), self._on_plugin_task)

    def _make_plugin_host(self):
        try:
            from .plugins.supervisor import PluginSupervisor
        except ImportError:
            return None
        return PluginSupervisor(self.settings.workdir, self.queue, self.metrics, self.state,
                                executors=self.executors, **self.settings.plugin_policy)

    async def _start_services(self):
        """Local services: an invalid file or a broken supervisor leaves the
        agent running (plugins and the server link do not depend on it)."""
        from .services.supervisor import ServiceSupervisor
        path, explicit = self.settings.services_path()
        try:
            self.services = ServiceSupervisor(
                self.settings.workdir, self.metrics, self.state, self.owner, self.executors,
                services_file=path, explicit=explicit, service_type=self.settings.service_type)
            await self.services.boot()
        except Exception as e:  # the rule: the agent runs on
            log.exception("services supervisor failed to start")
            self.state.set_abnormal("services", "services supervisor: %s" % e)

    def _reload_services(self):
        if self.services is None:
            return
        log.info("SIGHUP: reloading the services file")
        self.owner.run_once("services reload", self.services.reload())

    # ------------------------------------------------------------ commands

    def _on_plugin_task(self, task):
        if self.plugins is None:
            self.tasks.fail(task.token, "can't find plugin: %s" % task.object_name, "plugin_task")
            return
        try:
            self.plugins.send_task(task)
        except AgentError as e:
            self.tasks.fail(task.token, str(e), "plugin_task")

    # ------------------------------------------------------------ timers

    async def _heartbeat_loop(self):
        interval = self.settings.heartbeat_interval
        watchdog = sdnotify.watchdog_interval()
        if watchdog:
            # systemd kills us after WatchdogSec without WATCHDOG=1; beat at
            # least twice per period even if heartbeats are rarer.
            interval = min(interval, watchdog / 2)
        next_beat = time.monotonic()
        next_heartbeat = next_beat
        while True:
            now = time.monotonic()
            if now >= next_heartbeat:
                self._beat()
                next_heartbeat += self.settings.heartbeat_interval
            sdnotify.watchdog()
            next_beat += interval
            await asyncio.sleep(max(0.0, min(next_beat, next_heartbeat) - time.monotonic()))

    def _beat(self):
        try:
            self.refresh_host()
            for body in self.heartbeat.records(time.time()):
                self.queue.put_own(body)
        except Exception:  # a broken collector must not stop the heartbeat timer
            log.exception("heartbeat failed")
            self.metrics.inc("heartbeat_errors")

    # ------------------------------------------------------------ signals

    def _install_signals(self, loop):
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown, "SIGINT")
        loop.add_signal_handler(signal.SIGUSR1, self._toggle_debug)
        loop.add_signal_handler(signal.SIGUSR2, self._release_memory)
        loop.add_signal_handler(signal.SIGHUP, self._reload_services)

    def _toggle_debug(self):
        from .runtime import debug
        if self.debug is None:
            self.debug = debug.DebugEndpoint(
                self.metrics, port=self.settings.debug_port,
                addr_file=os.path.join(self.settings.workdir, "tmp", "debug.addr"))
        self.owner.run_once("debug endpoint", self.debug.toggle())

    def _release_memory(self):
        from .runtime import debug
        log.info("SIGUSR2: released memory: %s", debug.release_memory())

    # ------------------------------------------------------------ shutdown

    async def wait(self):
        return await self._stop

    async def shutdown(self):
        log.info("shutting down (%s)", self._stop_reason or "requested")
        sdnotify.stopping()
        await self.owner.cancel("heartbeat")
        if self.services is not None:
            try:
                await self.services.shutdown()
            except Exception:
                log.exception("services supervisor shutdown failed")
        if self.plugins is not None:
            try:
                await self.plugins.shutdown()
            except Exception:
                log.exception("plugin shutdown failed")
        if self.transport is not None:
            await self.transport.stop(SHUTDOWN_FLUSH_SECONDS)
        await self.owner.close()
        if self.debug is not None:
            await self.debug.close()
        if self.pidlock is not None:
            self.pidlock.release()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGHUP):
            loop.remove_signal_handler(sig)
        logging.getLogger("elkeid_agent").removeHandler(self._remote_log)
        self.executors.close()
        if self.log_handles is not None:
            self.log_handles.close()


async def _main(settings):
    agent = Agent(settings)
    try:
        await agent.start()
    except AgentError as e:
        print("elkeid-agent: %s" % e, file=sys.stderr)
        return EXIT_FAILURE
    await agent.wait()
    await agent.shutdown()
    return EXIT_OK


def run_agent(settings):
    """Run until SIGTERM/SIGINT or server task 1060; return the exit code."""
    return asyncio.run(_main(settings))
