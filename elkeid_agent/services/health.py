"""Health of one local service, decided from what the supervisor observed.

Pure: ``HealthEvaluator`` is fed observations (the process is alive or
not, a heartbeat arrived, an HTTP probe answered or failed, a CPU/RSS
sample) with the time they were made, and ``verdict(now)`` says whether the
service is healthy or which check demands a restart. Each check also has a
status for reports (``ok``, ``off``, ``waiting`` for the first evidence, or
what is wrong), so ``GET /services`` shows every check, not just a summary.

The checks follow the supervising-daemon design: the process is alive; a
heartbeat within ``heartbeat_timeout`` (0 = the service sends none); the
HTTP endpoint answers 2xx (a probe failing ``probe_failures`` times in a
row fails the check: one lost probe on a busy host is not a reason to
restart); CPU or RSS over its threshold for ``threshold_duration`` (reusing
the plugins' sustained-limit evaluator). A freshly started service gets one
``heartbeat_timeout`` (or probe interval) of grace before silence counts.
"""

from dataclasses import dataclass
from typing import Optional

from ..plugins.policy import LimitEvaluator

HEALTHY = "healthy"
DEAD, NO_HEARTBEAT, HTTP_FAILED, OVER_LIMIT = "dead", "no_heartbeat", "http_failed", "over_limit"
PROBE_FAILURES = 3


@dataclass
class Verdict:
    state: str          # HEALTHY or one of the failing checks
    reason: str = ""    # one line for logs and last_error

    @property
    def healthy(self):
        return self.state == HEALTHY


class HealthEvaluator:
    def __init__(self, health_check, started_at, probe_failures=PROBE_FAILURES):
        hc = health_check
        self.heartbeat_timeout = hc.heartbeat_timeout
        self.probing = bool(hc.http_endpoint)
        self.probe_failures = probe_failures
        self.interval = hc.interval
        self.started_at = started_at
        self.alive = True
        self.exit_reason = ""
        self.last_heartbeat = None   # time of receipt
        self.heartbeat_status = ""   # status the service reported
        self.last_probe_ok = None
        self.probe_error = ""
        self.failed_probes = 0
        self._limits = LimitEvaluator(hc.cpu_threshold / 100.0, hc.memory_threshold,
                                      hc.threshold_duration)
        self._over = ""   # the limit message once sustained
        self.cpu = 0.0
        self.rss = 0

    # ------------------------------------------------------------ observations

    def exited(self, reason):
        self.alive = False
        self.exit_reason = reason

    def heartbeat(self, now, status):
        self.last_heartbeat = now
        self.heartbeat_status = status

    def probe(self, now, ok, error=""):
        if ok:
            self.last_probe_ok = now
            self.failed_probes = 0
            self.probe_error = ""
        else:
            self.failed_probes += 1
            self.probe_error = error

    def resources(self, now, cpu_seconds, rss):
        message = self._limits.sample(now, cpu_seconds, rss)
        self.cpu, self.rss = self._limits.cpu, rss
        if message:
            self._over = message

    # ------------------------------------------------------------ decisions

    def verdict(self, now):
        if not self.alive:
            return Verdict(DEAD, self.exit_reason or "process is gone")
        if self.heartbeat_timeout:
            since = self.last_heartbeat if self.last_heartbeat is not None else self.started_at
            if now - since > self.heartbeat_timeout:
                what = "no heartbeat for %.0f s" % (now - since) if self.last_heartbeat \
                    is not None else "no heartbeat since start %.0f s ago" % (now - since)
                return Verdict(NO_HEARTBEAT, "%s (timeout %.0f s)"
                               % (what, self.heartbeat_timeout))
        if self.probing and self.failed_probes >= self.probe_failures:
            return Verdict(HTTP_FAILED, "HTTP probe failed %d times in a row: %s"
                           % (self.failed_probes, self.probe_error))
        if self._over:
            return Verdict(OVER_LIMIT, self._over)
        return Verdict(HEALTHY)

    def checks(self, now):
        """{check: status} for reports."""
        out = {"alive": "ok" if self.alive else (self.exit_reason or "gone")}
        if not self.heartbeat_timeout:
            out["heartbeat"] = "off"
        elif self.last_heartbeat is None:
            out["heartbeat"] = "waiting"
        else:
            age = now - self.last_heartbeat
            out["heartbeat"] = "ok" if age <= self.heartbeat_timeout else \
                "late by %.0f s" % (age - self.heartbeat_timeout)
        if not self.probing:
            out["http"] = "off"
        elif self.failed_probes:
            out["http"] = "failing (%d): %s" % (self.failed_probes, self.probe_error)
        else:
            out["http"] = "ok" if self.last_probe_ok is not None else "waiting"
        out["resources"] = self._over or ("over threshold" if self._limits._over_since
                                          is not None else "ok")
        return out

    def summary(self, now):
        """One word for tables: healthy, starting, or the failing check."""
        v = self.verdict(now)
        if not v.healthy:
            return v.state
        waiting = (self.heartbeat_timeout and self.last_heartbeat is None) or \
            (self.probing and self.last_probe_ok is None)
        return "starting" if waiting else HEALTHY

    def clear_over_limit(self):
        self._over = ""

    @property
    def reported_status(self) -> Optional[str]:
        return self.heartbeat_status or None
