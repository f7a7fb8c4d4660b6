"""Counters and gauges for everything the agent drops, refuses or moves.

One registry per agent process. Every refusal path increments a counter with
a reason label; the heartbeat and the Prometheus ``/metrics`` endpoint read
the same numbers, so what an operator sees in either place agrees.
Plain dicts and ints: no locks needed because all writers run on the event
loop thread (executor jobs report back through the loop).
"""

import re
import threading

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _label_key(labels):
    return tuple(sorted(labels.items()))


class Registry:
    def __init__(self, prefix="elkeid_agent"):
        self.prefix = prefix
        self._counters = {}  # name -> {label_key: value}
        self._gauges = {}    # name -> {label_key: value or callable}
        self._help = {}
        # Executor threads (downloads, uploads) increment too.
        self._lock = threading.Lock()

    def describe(self, name, text):
        self._help[name] = text

    def inc(self, name, n=1, **labels):
        if not _NAME.match(name):
            raise ValueError("bad metric name %r" % name)
        key = _label_key(labels)
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + n

    def set(self, name, value, **labels):
        """A gauge; ``value`` may be a zero-argument callable read at render."""
        if not _NAME.match(name):
            raise ValueError("bad metric name %r" % name)
        with self._lock:
            self._gauges.setdefault(name, {})[_label_key(labels)] = value

    def get(self, name, **labels):
        key = _label_key(labels)
        if name in self._counters:
            return self._counters[name].get(key, 0)
        value = self._gauges.get(name, {}).get(key, 0)
        return value() if callable(value) else value

    def total(self, name):
        """Sum of a counter over all label values."""
        return sum(self._counters.get(name, {}).values())

    def snapshot(self):
        """{name: {"label=value,...": number}} for JSON views."""
        out = {}
        with self._lock:
            items = list(self._counters.items()) + list(self._gauges.items())
        for name, series in items:
            out[name] = {",".join("%s=%s" % kv for kv in key): (v() if callable(v) else v)
                         for key, v in series.items()}
        return out

    def render_prometheus(self):
        lines = []
        with self._lock:
            groups = [("counter", self._counters), ("gauge", self._gauges)]
            groups = [(kind, {n: dict(s) for n, s in d.items()}) for kind, d in groups]
        for kind, metrics in groups:
            for name in sorted(metrics):
                full = "%s_%s" % (self.prefix, name)
                if name in self._help:
                    lines.append("# HELP %s %s" % (full, self._help[name]))
                lines.append("# TYPE %s %s" % (full, kind))
                for key, value in sorted(metrics[name].items()):
                    if callable(value):
                        try:
                            value = value()
                        except Exception:  # a broken gauge must not break /metrics
                            continue
                    labels = ",".join('%s="%s"' % (k, _escape(str(v))) for k, v in key)
                    lines.append("%s%s %s" % (full, "{%s}" % labels if labels else "",
                                               _number(value)))
        return "\n".join(lines) + "\n"


def _escape(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, float):
        return repr(value)
    return str(int(value))
