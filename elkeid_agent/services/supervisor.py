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

import logging

log = logging.getLogger("elkeid_agent.services")

STATES = ("stopped", "starting", "running", "backoff", "stopping", "exited", "failed")


class ServiceSupervisor:
    def __init__(self, workdir, metrics, state, owner, executors, services_file,
                 explicit=False, service_type="systemd", **knobs):
        self.workdir = workdir
        self.metrics = metrics
        self.state = state
        self.owner = owner
        self.executors = executors
        self.services_file = services_file
        self.explicit = explicit
        self.service_type = service_type
        self.knobs = knobs
        self._observers = []
        self._runners = {}

    async def boot(self):
        raise NotImplementedError

    async def shutdown(self):
        raise NotImplementedError

    def status(self):
        return []

    def heartbeat(self, service_id, heartbeat, now=None):
        return False, "unknown service %s" % service_id

    async def restart(self, service_id):
        raise NotImplementedError

    async def stop(self, service_id):
        raise NotImplementedError

    async def start(self, service_id):
        raise NotImplementedError

    async def reload(self):
        raise NotImplementedError

    def on_change(self, callback):
        self._observers.append(callback)
