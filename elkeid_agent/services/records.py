"""Records for the server about local services and host metrics.

Owns the encoding of two DataTypes this project adds to Elkeid's (they are
not Elkeid's; docs/protocol.md section 4 lists them as this project's
additions, chosen clear of every number Elkeid's agent, plugins and
AgentCenter use):

* **1020 service status**: one record per service, on every state change
  and once per heartbeat interval. Fields: ``id type state pid restarts
  health checks last_exit last_error cpu rss uptime``; ``checks`` is a JSON
  object {check: status}.
* **1021 host metrics**: one record per collector round. Fields:
  ``collector`` plus one field per sample. A sample without labels is named
  as it is (``cpu_usage_ratio``); a labelled one carries its labels in
  Prometheus series syntax (``filesystem_used_bytes{mountpoint="/"}``,
  values escaped as in the text exposition), so every key is unambiguous
  and any Prometheus text parser reads ``key value``.

Why a field per sample rather than one JSON ``samples`` field: server-side
rules and dashboards address Elkeid record fields by name (as they do the
1000 heartbeat's ``cpu_usage``); with a field per sample the common scalars
need no JSON decoding, and the labelled series still parse without a
bespoke grammar.

Every value is a string; floats are "%.8f" and whole numbers decimal, as in
the heartbeats. Pure functions: the app queues the bytes with the agent's
own priority.
"""

import json
import math
import time

from .. import wire
from ..metrics import _escape

SERVICE_STATUS = 1020
HOST_METRICS = 1021

# The order of docs/protocol.md section 4 (Payload fields are a map: the
# order is for people reading the list, not the wire).
SERVICE_FIELDS = ("id", "type", "state", "pid", "restarts", "health", "checks", "last_exit",
                  "last_error", "cpu", "rss", "uptime")
# A service's own error text reaches the record; keep one record small.
MAX_TEXT = 1024


def _text(value):
    text = "" if value is None else str(value)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT - 3] + "..."
    # A surrogate from a badly decoded child output must not break encoding.
    return text.encode("utf-8", "replace").decode("utf-8")


def _int(value):
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return "0"
    return str(n)


def _float(value):
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        f = 0.0
    return "%.8f" % (f if math.isfinite(f) else 0.0)


def number(value):
    """A sample value as record text: whole numbers decimal, floats "%.8f"."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return _float(value)


def service_fields(status):
    """The string fields of a 1020 record for one ``status()`` dict."""
    checks = status.get("checks") or {}
    if not isinstance(checks, dict):
        checks = {}
    return {
        "id": _text(status.get("id")),
        "type": _text(status.get("type")),
        "state": _text(status.get("state")),
        "pid": _int(status.get("pid")),
        "restarts": _int(status.get("restarts")),
        "health": _text(status.get("health")),
        "checks": json.dumps({_text(k): _text(v) for k, v in checks.items()},
                             sort_keys=True, ensure_ascii=False),
        "last_exit": _text(status.get("last_exit")),
        "last_error": _text(status.get("last_error")),
        "cpu": _float(status.get("cpu")),
        "rss": _int(status.get("rss")),
        "uptime": _float(status.get("uptime")),
    }


def service_record(status, now=None):
    """A 1020 record (bytes) for one service's status dict."""
    return wire.encode_record(SERVICE_STATUS, int(time.time() if now is None else now),
                              service_fields(status))


def series_key(name, labels):
    """``name`` or ``name{k="v",...}`` (labels sorted, values escaped)."""
    if not labels:
        return name
    return "%s{%s}" % (name, ",".join('%s="%s"' % (k, _escape(str(v)))
                                      for k, v in sorted(labels.items())))


def host_metrics_fields(collector, samples):
    """The string fields of a 1021 record: ``collector`` and one field per
    sample (``samples``: objects with name, labels, value, or tuples)."""
    fields = {"collector": _text(collector)}
    for s in samples:
        if isinstance(s, tuple):
            name, labels, value = s
        else:
            name, labels, value = s.name, s.labels, s.value
        fields[_text(series_key(name, labels))] = number(value)
    return fields


def host_metrics_record(collector, samples, timestamp=None):
    """A 1021 record (bytes) for one collector round."""
    return wire.encode_record(HOST_METRICS, int(time.time() if timestamp is None else timestamp),
                              host_metrics_fields(collector, samples))


def parse_series_key(key):
    """Inverse of ``series_key``: -> (name, labels). For consumers (the
    development AgentCenter, tests). ValueError on a malformed key."""
    brace = key.find("{")
    if brace < 0:
        return key, {}
    if not key.endswith("}"):
        raise ValueError("malformed series key %r" % key)
    name, body, labels, i = key[:brace], key[brace + 1:-1], {}, 0
    while i < len(body):
        eq = body.find('="', i)
        if eq < 0:
            raise ValueError("malformed series key %r" % key)
        label = body[i:eq]
        i, value = eq + 2, []
        while True:
            if i >= len(body):
                raise ValueError("unterminated label value in %r" % key)
            c = body[i]
            if c == "\\" and i + 1 < len(body):
                value.append({"n": "\n"}.get(body[i + 1], body[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                value.append(c)
                i += 1
        labels[label] = "".join(value)
        if i < len(body):
            if body[i] != ",":
                raise ValueError("malformed series key %r" % key)
            i += 1
    return name, labels


class Reports:
    """What the app queues for the server: a 1020 record per service on each
    change and each heartbeat, a 1021 record per new collector round.
    ``put(body)`` queues one record with the agent's own priority."""

    def __init__(self, put, clock=time.time):
        self.put = put
        self.clock = clock
        self._rounds = {}  # collector -> time of the last round reported

    def service_changed(self, status):
        self.put(service_record(status, self.clock()))

    def services(self, statuses):
        now = self.clock()
        for status in statuses:
            self.put(service_record(status, now))

    def collector_rounds(self, latest):
        """``latest``: {collector: (unix time, samples)} (``Collectors.latest``).
        Queues each round not reported yet; returns how many."""
        sent = 0
        for name, (at, samples) in list(latest.items()):
            if self._rounds.get(name) == at:
                continue
            self._rounds[name] = at
            self.put(host_metrics_record(name, samples, at))
            sent += 1
        return sent
