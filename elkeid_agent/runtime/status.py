"""The status endpoint: opt-in, loopback-only HTTP for local monitoring.

Owns the pages served with ``--status-addr 127.0.0.1:PORT`` on
``httpd.LoopbackHTTPServer``:

* ``GET /health``: 200 ``{"status": "healthy", ...}`` while the agent is
  running (no abnormal reason) and connected to the server, else 503
  ``{"status": "unhealthy", "reasons": [...]}``;
* ``GET /metrics``: Prometheus text: the agent's registry (queue,
  transport, plugins, tasks, ...), ``elkeid_agent_info``/``_healthy``, one
  set of ``elkeid_service_*`` series per local service, and the host
  collectors' latest samples (``elkeid_host_*``);
* ``GET /services``: the supervisor's ``status()`` list as JSON;
* ``POST /heartbeat``: a local service's heartbeat (the JSON of
  ``services.heartbeat``), handed to the supervisor; 200 ``{"message":
  "heartbeat received"}`` or 400 ``{"error": ...}`` saying what is wrong.
  Bodies over 64 KiB get 413 from the server; every refusal is counted
  (``status_heartbeats{result}``).

The supervisor and the collectors are looked up on every request through
zero-argument callables, so the endpoint works (with empty lists) when
there are none and follows them when they are replaced.
"""

import json
import logging
import time

from ..metrics import _escape, _number
from ..services import heartbeat as hbmod
from .httpd import LoopbackHTTPServer

log = logging.getLogger(__name__)

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEARTBEAT_BYTES = 64 * 1024
SERVICE_STATES = ("stopped", "starting", "running", "backoff", "stopping", "exited", "failed")


def _json(status, obj):
    return status, JSON, json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n"


class StatusEndpoint:
    """See the module docstring. ``connected()`` says whether the stream to
    the server is up; ``services()``/``collectors()`` return the supervisor
    and the host collectors, or None."""

    def __init__(self, host, port, metrics, state, connected, services=lambda: None,
                 collectors=lambda: None, info=None, started_at=None,
                 server_factory=LoopbackHTTPServer):
        self.metrics = metrics
        self.state = state
        self.connected = connected
        self.services = services
        self.collectors = collectors
        self.info = dict(info or {})
        self.started_at = time.time() if started_at is None else started_at
        self.server = server_factory(host=host, port=port, metrics=metrics, name="status",
                                     max_body_bytes=MAX_HEARTBEAT_BYTES)
        self.server.route("GET", "/health", self.health)
        self.server.route("GET", "/metrics", self.prometheus)
        self.server.route("GET", "/services", self.list_services)
        self.server.route("POST", "/heartbeat", self.heartbeat)
        metrics.describe("status_heartbeats", "heartbeats posted to the status endpoint, by result")

    async def start(self):
        return await self.server.start()

    async def stop(self):
        await self.server.stop()

    @property
    def address(self):
        return self.server.address

    # ------------------------------------------------------------ pages

    def problems(self):
        reasons = list(self.state.reasons())
        if not self.connected():
            reasons.append("not connected to the server")
        return reasons

    def health(self, request):
        reasons = self.problems()
        body = {"status": "unhealthy" if reasons else "healthy", "reasons": reasons,
                "state": self.state.state, "connected": bool(self.connected()),
                "uptime": round(time.time() - self.started_at, 3)}
        body.update(self.info)
        return _json(503 if reasons else 200, body)

    def service_list(self):
        sup = self.services()
        return list(sup.status()) if sup is not None else []

    def list_services(self, request):
        return _json(200, self.service_list())

    def heartbeat(self, request):
        try:
            hb = hbmod.parse(request.body)
        except hbmod.HeartbeatError as e:
            self.metrics.inc("status_heartbeats", result=e.reason)
            detail = e.detail if e.reason == "bad_field" else "%s: %s" % (
                "body is not a heartbeat" if e.reason == "bad_shape" else "body is not JSON",
                e.detail)
            return _json(400, {"error": detail})
        sup = self.services()
        if sup is None:
            ok, error = False, "unknown service %s: no local services are configured" % hb.agent_id
        else:
            ok, error = sup.heartbeat(hb.agent_id, hb, time.monotonic())
        if not ok:
            self.metrics.inc("status_heartbeats", result="refused")
            return _json(400, {"error": error or "heartbeat refused"})
        self.metrics.inc("status_heartbeats", result="accepted")
        return _json(200, {"message": "heartbeat received"})

    def prometheus(self, request):
        parts = [self.metrics.render_prometheus(), self._agent_text(),
                 render_services(self.service_list())]
        collectors = self.collectors()
        if collectors is not None:
            parts.append(collectors.render_prometheus())
        return 200, PROMETHEUS, "".join(parts)

    def _agent_text(self):
        labels = ",".join('%s="%s"' % (k, _escape(str(v))) for k, v in sorted(self.info.items()))
        return ("# HELP elkeid_agent_info the agent's version and id\n"
                "# TYPE elkeid_agent_info gauge\n"
                "elkeid_agent_info{%s} 1\n"
                "# HELP elkeid_agent_healthy 1 when GET /health answers 200\n"
                "# TYPE elkeid_agent_healthy gauge\n"
                "elkeid_agent_healthy %d\n" % (labels, 0 if self.problems() else 1))


# Per-service series: (name, type, help, value of a status dict).
_SERVICE_SERIES = (
    ("elkeid_service_up", "gauge", "1 when the service is running",
     lambda s: 1 if s.get("state") == "running" else 0),
    ("elkeid_service_restarts_total", "counter", "starts of the service after its first",
     lambda s: s.get("restarts") or 0),
    ("elkeid_service_pid", "gauge", "the service's process id (0 when none)",
     lambda s: s.get("pid") or 0),
    ("elkeid_service_cpu_percent", "gauge", "the service's CPU, percent of one core",
     lambda s: float(s.get("cpu") or 0.0)),
    ("elkeid_service_rss_bytes", "gauge", "the service's resident memory",
     lambda s: s.get("rss") or 0),
    ("elkeid_service_uptime_seconds", "gauge", "seconds in the service's current run",
     lambda s: float(s.get("uptime") or 0.0)),
)


def render_services(statuses):
    """Prometheus text for the supervisor's status list. ``state`` and
    ``health`` are enums as label sets: one series per possible value, 1 on
    the current one, so a query can alert on ``state="failed"``."""
    if not statuses:
        return ""
    lines = []

    def label(s, **extra):
        pairs = [("service", s.get("id", ""))] + sorted(extra.items())
        return "{%s}" % ",".join('%s="%s"' % (k, _escape(str(v))) for k, v in pairs)

    lines += ["# HELP elkeid_service_info a local service and its type",
              "# TYPE elkeid_service_info gauge"]
    lines += ["elkeid_service_info%s 1" % label(s, type=s.get("type", "")) for s in statuses]
    lines += ["# HELP elkeid_service_state the service's state (1 on the current one)",
              "# TYPE elkeid_service_state gauge"]
    for s in statuses:
        for state in SERVICE_STATES:
            lines.append("elkeid_service_state%s %d" % (label(s, state=state),
                                                         1 if s.get("state") == state else 0))
    lines += ["# HELP elkeid_service_health the service's health word (1 on the current one)",
              "# TYPE elkeid_service_health gauge"]
    lines += ["elkeid_service_health%s 1" % label(s, health=s.get("health") or "none")
              for s in statuses]
    for name, kind, text, value in _SERVICE_SERIES:
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for s in statuses:
            try:
                v = value(s)
            except (TypeError, ValueError):
                v = 0
            lines.append("%s%s %s" % (name, label(s), _number(v)))
    return "\n".join(lines) + "\n"
