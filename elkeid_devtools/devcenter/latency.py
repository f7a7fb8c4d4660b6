"""Agent-added latency for the benchmark table (``--store latency``).

Owns ``LatencyRecorder``: for every record carrying a ``stamp`` field (the
wall-clock ns at which the bench plugin wrote it into the agent's pipe,
elkeid_devtools/bench_plugin.py), arrival time here minus the stamp, kept
as microseconds; ``summary()`` gives count, p50, p99 and max. Both clocks
are this host's ``time.time_ns``, so the difference is pipe -> agent ->
gRPC -> this server, nothing else.

A stamp of all zeros (the plugin's warm-up) is skipped; one that is not a
number, or a Payload that does not decode, is counted by kind in
``errors``. At most ``MAX_SAMPLES`` are kept (then ``overflow`` counts the
rest): memory stays bounded whatever a peer sends.
"""

import array
import math
import threading
import time

from google.protobuf.message import DecodeError

from elkeid_agent.pb import grpc_pb2

STAMP_FIELD = "stamp"
MAX_SAMPLES = 4_000_000


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted sequence (None if empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(len(sorted_values) * fraction))
    return sorted_values[min(len(sorted_values), rank) - 1]


class LatencyRecorder:
    def __init__(self, max_samples=MAX_SAMPLES):
        self.max_samples = max_samples
        self._us = array.array("q")
        self.overflow = 0
        self.errors = {}
        self._lock = threading.Lock()

    def add_message(self, pd, arrival_ns=None):
        arrival_ns = time.time_ns() if arrival_ns is None else arrival_ns
        out = []
        needle = STAMP_FIELD.encode()
        for r in pd.records:
            if needle not in r.data:
                continue
            try:
                text = grpc_pb2.Payload.FromString(r.data).fields.get(STAMP_FIELD)
            except DecodeError:
                self._error("payload")
                continue
            if text is None or text.strip("0") == "":
                continue
            if not (text.isascii() and text.isdigit()):
                self._error("stamp")
                continue
            out.append((arrival_ns - int(text)) // 1000)
        if out:
            with self._lock:
                room = self.max_samples - len(self._us)
                self._us.extend(out[:max(0, room)])
                self.overflow += max(0, len(out) - max(0, room))

    def _error(self, kind):
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self):
        """{count, p50_us, p99_us, max_us, overflow, errors}."""
        with self._lock:
            values = sorted(self._us)
            overflow, errors = self.overflow, dict(self.errors)
        return {"count": len(values), "p50_us": percentile(values, 0.50),
                "p99_us": percentile(values, 0.99), "max_us": values[-1] if values else None,
                "overflow": overflow, "errors": errors}
