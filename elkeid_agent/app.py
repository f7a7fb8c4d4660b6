"""The agent process: wires every component onto one asyncio loop.

Data path (README.md "Where a record goes"): plugins and the agent's own
producers put serialized
Records into ``RecordQueue``; ``Transport`` drains it onto the Transfer
stream; Commands come back through ``commands.Dispatcher`` to the agent
tasks, the plugin supervisor and (later) the updater. Timers drive the
heartbeat and the systemd watchdog; after a stall they fire once and carry
on from then (runtime/ticker.py) instead of making up every missed tick.
The local services supervisor (services/) keeps the services file's
services alive, and the host-metrics collectors run on that file's
``collectors:`` section. Signals: SIGTERM/SIGINT graceful exit (services
keep running), SIGHUP reload of the services file and a check of the TLS
files (transport/tlswatch.py: rotation without a restart), SIGUSR1 debug endpoint,
SIGUSR2 release memory.

Start-up refuses, within seconds and with one line naming the file or
setting, what can never work: a workdir that cannot be created or written,
no endpoint for the region, TLS files that are unreadable, not PEM or a key
that is not the certificate's. Every other host problem it can survive (an
unwritable log, tmp or plugin directory, an unsaved machine-id) marks the
agent abnormal and it keeps reporting, because a silent agent is worse than
a degraded one.
"""

import asyncio
import logging
import os
import signal
import sys
import time

from . import PRODUCT, __version__, native, wire
from .host import hostinfo, identity
from .runtime import logs, sdnotify
from .control.agent_tasks import AgentTasks
from .control.commands import Dispatcher
from .control.configs import ConfigsHandler
from .errors import AgentError, LocalFault
from .host.heartbeat import Heartbeat
from .metrics import Registry
from .buffer.queue import RecordQueue
from .buffer.spool import Spool
from .runtime.alloc import keep_large_buffers_on_heap
from .runtime.ctlsock import ControlError, ControlServer, socket_path
from .runtime.executors import Executors
from .services.records import Reports
from .runtime.tasks import TaskOwner
from .runtime.ticker import Ticker
from .state import AgentState
from .transport.channel import check_tls_files
from .transport.diagnose import DialDiagnosis
from .transport.stream import Transport
from .transport.tlswatch import CredentialWatcher

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE = 0, 1
EXIT_REEXEC = -1  # cli.py re-executes the (updated) zipapp
SHUTDOWN_FLUSH_SECONDS = 5.0


class Agent:
    def __init__(self, settings):
        self.settings = settings
        self.metrics = Registry()
        self.state = AgentState()
        # The disk spool takes what the memory queue cannot hold (off with
        # ELKEID_SPOOL_MAX_MB=0).
        self.spool = None
        if settings.spool_max_mb > 0:
            self.spool = Spool(settings.spool_path(), settings.spool_max_mb * 1024 * 1024,
                               self.metrics, self.state)
        self.queue = RecordQueue(settings.queue_max_bytes, self.metrics, spool=self.spool)
        self.agent_id = ""
        self.host = None
        self._header = b""
        self.transport = None
        self.tls = None  # transport/tlswatch.py: the TLS files, watched
        self.plugins = None
        self.services = None
        self.heartbeat = None
        self.log_handles = None
        self.debug = None
        self.pidlock = None
        # Local services and host metrics: the services supervisor
        # (services/supervisor.py) and the host collectors (host/metrics.py)
        # when configured; reported to the server, the status endpoint and
        # the control socket whenever they are set.
        self.services = None
        self.collectors = None
        self.updater = None
        self.service_updater = None
        self.status = None
        self.control = None
        self.reports = Reports(self.queue.put_own)
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
        """Create the Elkeid layout. The workdir itself must be a writable
        directory (the agent id, specified_env and plugins live there):
        LocalFault otherwise. A subdirectory that cannot be made is
        reported, not raised."""
        wd = self.settings.workdir
        for sub in ("", "log", "tmp", "plugin"):
            path = os.path.join(wd, sub)
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                if not os.access(path, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied")
            except OSError as e:
                if not sub:
                    raise LocalFault("workdir %s is unusable: %s (--workdir / ELKEID_WORKDIR)"
                                     % (wd, e.strerror or e)) from None
                self.state.set_abnormal("workdir:" + sub,
                                       "workdir %s not writable: %s" % (path, e.strerror))

    def _setup_logging(self):
        try:
            self.log_handles = logs.setup_logging(
                self.settings.workdir, self.metrics, max_bytes=self.settings.log_max_bytes,
                backups=self.settings.log_backups, console="concise")
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
        if not s.endpoints.ordered():
            raise LocalFault("no AgentCenter endpoint configured for region %r (--server, "
                             "--service-discovery, --public-server or ELKEID_SERVER...)"
                             % s.region)
        tls_in_use = check_tls_files(s)
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
                 __version__, self.agent_id, s.workdir, s.region, extra={"console": True})
        log.info(native.describe())
        self.metrics.describe("accel_enabled", "1 when the C hot path (accel/) runs, 0 for pure Python")
        self.metrics.set("accel_enabled", 1 if native.ACTIVE else 0)
        if self.spool is not None:
            # Before the stream starts: records spooled before a restart
            # are older than anything produced from now on.
            await self.spool.start()
            self.owner.spawn("spool", self.spool.run)

        self.plugins = self._make_plugin_host()
        # systemctl status shows the last STATUS= line: keep it true.
        self.transport = Transport(s, self.queue, lambda: self._header, self._dispatcher(),
                                   self.metrics, executors=self.executors,
                                   on_state=sdnotify.status)
        self.transport.credential_set = tls_in_use
        self.tls = CredentialWatcher(s, self.metrics, self.state, tls_in_use,
                                     on_rotate=self.transport.use_credentials)
        self.transport.diagnose = DialDiagnosis(s, self.metrics, self.executors,
                                                credential_set=lambda: self.tls.current)
        self.tasks = AgentTasks(s, self.transport, self.metrics, self.report_failure,
                                self.request_shutdown, self.executors, owner=self.owner,
                                service_updates=lambda: self.service_updater)
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
        try:
            self._start_updates()
        except Exception as e:  # the rule: the agent runs on, and says why
            log.exception("updates unavailable")
            self.state.set_abnormal("update", "updates unavailable: %s: %s"
                                    % (type(e).__name__, e))
        self.owner.spawn("transport", self.transport.run)
        self.owner.spawn("tls watch", self.tls.run)
        self.owner.spawn("heartbeat", self._heartbeat_loop)
        await self._start_local_reporting()
        sdnotify.ready("connecting")

    def _start_updates(self):
        """The updaters (the agent's from configs lists, the local services'
        from 1070 tasks), recovery of updates a killed agent left, and this
        version's side of a trial. After the services boot: a service's
        recovery restarts it."""
        from .update.journal import JournalError, journal_exists
        from .update.services import ServiceUpdater
        from .update.trial import TrialReporter
        from .update.updater import AgentUpdater
        self.updater = AgentUpdater(self.settings, self.state, self.metrics, self.owner,
                                    self.executors, self.queue.put_own, self._update_policy)
        self.updater.on_reexec = lambda why: self.request_shutdown(why)
        self.service_updater = ServiceUpdater(
            self.settings, self.state, self.metrics, self.owner, self.executors,
            self.queue.put_own, self._update_policy, lambda: self.services,
            lambda: self.updater.journal)
        if not journal_exists(self.settings.workdir):
            return
        self.updater.recover()
        try:
            journal = self.updater.journal
        except JournalError as e:
            self.state.set_abnormal("update", str(e))
            return
        self.service_updater.recover()
        reporter = TrialReporter(journal, self.transport, self.queue, self._beat, self.state,
                                 self.queue.put_own)
        self.owner.run_once("update trial", reporter.run())

    def _update_policy(self):
        """The services file's ``update:`` section; None while that file is
        invalid (its key is unknown then)."""
        from .services.config import UpdatePolicy
        if self.services is None:
            return UpdatePolicy()
        return self.services.config.update if self.services.config is not None else None

    def _dispatcher(self):
        configs = ConfigsHandler(self.state, self.plugins, self.owner, lambda: self.updater)
        return Dispatcher(self.metrics, self.report_failure, configs,
                          lambda task: self.tasks.handle(task), self._on_plugin_task)

    def _make_plugin_host(self):
        try:
            from .plugins.supervisor import PluginSupervisor
        except ImportError:
            return None
        return PluginSupervisor(self.settings.workdir, self.queue, self.metrics, self.state,
                                executors=self.executors, owner=self.owner,
                                **self.settings.plugin_policy)

    # ------------------------------------------------------------ local services

    async def _start_local_reporting(self):
        """Reports of local services and host metrics to the server, the
        control socket elkeidctl talks to, and the opt-in status endpoint.
        None of them is fatal: the agent's own job goes on without them."""
        if self.services is not None:
            self.services.on_change(self.reports.service_changed)
        self.control = ControlServer(socket_path(self.settings.workdir), self.metrics,
                                     services=lambda: self.services)
        try:
            await self.control.start()
        except ControlError as e:
            self.control = None
            self.state.set_abnormal("control", str(e))
            log.error("elkeidctl cannot reach this agent: %s", e)
        if self.settings.status_addr:
            await self._start_status()

    async def _start_status(self):
        from .runtime.status import StatusEndpoint
        host, port = self.settings.status_addr
        status = StatusEndpoint(host, port, self.metrics, self.state,
                                lambda: self.transport.connected,
                                services=lambda: self.services,
                                collectors=lambda: self.collectors,
                                info={"version": __version__, "agent_id": self.agent_id,
                                      "hot_path": "C" if native.ACTIVE else "pure"},
                                started_at=self.started_at)
        try:
            await status.start()
        except OSError as e:
            self.state.set_abnormal("status", "status endpoint %s:%d: %s"
                                    % (host, port, e.strerror or e))
            log.error("status endpoint: cannot listen on %s port %d: %s", host, port, e)
            return
        self.status = status
        log.info("status endpoint listening on http://%s/", status.address)

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
        self._apply_collectors()

    def _apply_collectors(self):
        """Host metrics run when a services file is there: on its valid
        ``collectors:`` section (all four every 60 s unless it says
        otherwise). A changed section replaces the collectors; an invalid
        file keeps the ones running."""
        from .host.metrics import Collectors
        sup = self.services
        if sup is None or sup.config is None:
            return
        wanted = sup.config.collectors if sup.file_present else {}
        if self.collectors is not None and self.collectors.config == wanted:
            return
        old, self.collectors = self.collectors, None
        if old is not None:
            self.owner.run_once("collectors stop", old.stop())
        if any(c.enabled for c in wanted.values()):
            self.collectors = Collectors(wanted, self.owner, self.metrics, self.executors)
            self.collectors.start()

    @property
    def collectors(self):
        return self._collectors

    @collectors.setter
    def collectors(self, collectors):
        # Each round is reported as it ends (a 1 s poll of ``latest`` woke an
        # idle agent every second for rounds that come every minute).
        self._collectors = collectors
        if collectors is not None:
            collectors.on_round = self._report_collector_rounds

    def _report_collector_rounds(self, collectors):
        if collectors is self._collectors:  # not a replaced set still stopping
            self.reports.collector_rounds(collectors.latest)

    def _reload_services(self):
        if self.services is None:
            return
        log.info("SIGHUP: reloading the services file")

        async def reload():
            await self.services.reload()
            self._apply_collectors()
        self.owner.run_once("services reload", reload())

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
            # systemd kills us after WatchdogSec without WATCHDOG=1; ping
            # at least twice per period even if heartbeats are rarer.
            interval = min(interval, watchdog / 2)
        now = time.monotonic()
        heartbeat = Ticker(self.settings.heartbeat_interval, now)
        ping = Ticker(interval, now)
        while True:
            now = time.monotonic()
            if heartbeat.due(now):
                self._beat()
            if ping.due(now):
                sdnotify.watchdog()
            await asyncio.sleep(max(0.0, min(heartbeat.next, ping.next) - time.monotonic()))

    def _beat(self):
        try:
            self.refresh_host()
            for body in self.heartbeat.records(time.time()):
                self.queue.put_own(body)
            if self.services is not None:
                self.reports.services(self.services.status())
        except Exception:  # a broken collector must not stop the heartbeat timer
            log.exception("heartbeat failed")
            self.metrics.inc("heartbeat_errors")

    # ------------------------------------------------------------ signals

    def _install_signals(self, loop):
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown, "SIGINT")
        loop.add_signal_handler(signal.SIGUSR1, self._toggle_debug)
        loop.add_signal_handler(signal.SIGUSR2, self._release_memory)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self):
        self._reload_services()
        if self.tls is not None:
            log.info("SIGHUP: checking the TLS files")
            self.tls.check_now()

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
        if self.status is not None:
            await self.status.stop()
        if self.control is not None:
            await self.control.stop()
        if self.collectors is not None:
            await self.collectors.stop()
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
            try:
                # After the plugins: their last records are in the queue.
                await self.transport.stop(SHUTDOWN_FLUSH_SECONDS)
            except Exception:  # what is left of shutdown must still run
                log.exception("transport shutdown failed")
        self.queue.drops.flush()
        if self.spool is not None:
            try:
                # After the transport: what it settled moves the cursor.
                await self.spool.close()
            except Exception:
                log.exception("spool close failed")
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
        if agent.log_handles is not None:  # else stderr is the log: one line there
            log.error("start-up refused: %s", e)
        print("elkeid-agent: %s" % e, file=sys.stderr)
        agent.executors.close()
        return EXIT_FAILURE
    await agent.wait()
    await agent.shutdown()
    if agent.updater is not None and agent.updater.reexec_requested:
        agent.updater.mark_reexec()
        return EXIT_REEXEC
    return EXIT_OK


def run_agent(settings):
    """Run until SIGTERM/SIGINT or server task 1060; return the exit code."""
    keep_large_buffers_on_heap()
    return asyncio.run(_main(settings))
