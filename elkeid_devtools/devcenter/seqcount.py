"""Sequence counting for delivery tests (``--store seq``).

Owns ``SeqCounter``: for each agent and each producer run (a record's
``run`` field), which ``seq`` numbers arrived, so a test can tell what a
fault cost: ``unique`` numbers received, ``duplicates`` (deliveries beyond
the first), ``highest`` number seen and ``missing``, the numbers below the
highest that never arrived. One byte per number in a bytearray: counting
millions of records costs memory in megabytes and no SQLite row.

Every message's numbers are appended, as ranges, to a log (one JSON line
per message) before they are counted, and a devcenter opened on the same
log replays it: the counts survive a SIGKILL of the server (the log is
written with ``os.write``, so the page cache keeps it without an fsync)
and a restart on the same data. A torn last line (the server died while
writing it) is skipped and counted, like any line that does not parse.

Outside input is bounded: a ``seq`` that is not a decimal number below
``MAX_SEQ``, a Payload that does not decode, or a run beyond ``MAX_RUNS``
per agent is counted by kind (``errors``), never a crash.
"""

import json
import logging
import os
import threading

from google.protobuf.message import DecodeError

from elkeid_agent.pb import grpc_pb2

log = logging.getLogger("elkeid_devtools.devcenter.seq")

# One byte per number: 64 Mi numbers are 64 MiB for one run, the most a
# peer can make this server allocate per run.
MAX_SEQ = 1 << 26
MAX_RUNS = 1000
SEQ_FIELD = "seq"
RUN_FIELD = "run"


class _Run:
    __slots__ = ("seen", "unique", "received", "highest")

    def __init__(self):
        self.seen = bytearray()
        self.unique = 0
        self.received = 0
        self.highest = -1

    def mark(self, start, end):
        """Count numbers start..end-1 as received once more."""
        if end > len(self.seen):
            # Doubling keeps growth amortized over millions of numbers.
            size = min(max(end, 2 * len(self.seen)), MAX_SEQ)
            self.seen.extend(bytes(size - len(self.seen)))
        fresh = self.seen.count(0, start, end)
        self.seen[start:end] = b"\x01" * (end - start)
        self.unique += fresh
        self.received += end - start
        if end - 1 > self.highest:
            self.highest = end - 1

    def view(self):
        return {"unique": self.unique, "duplicates": self.received - self.unique,
                "highest": self.highest, "missing": self.highest + 1 - self.unique}


def ranges(numbers):
    """[[start, end), ...] of consecutive runs in ``numbers``, in order."""
    out = []
    for n in numbers:
        if out and out[-1][1] == n:
            out[-1][1] = n + 1
        else:
            out.append([n, n + 1])
    return out


class SeqCounter:
    def __init__(self, log_path):
        self.log_path = log_path
        self._runs = {}       # (agent_id, run) -> _Run
        self._per_agent = {}  # agent_id -> number of runs
        self.errors = {}      # kind -> count
        self._lock = threading.Lock()
        self._fd = None

    def open(self):
        """Replay the log (if any), then keep it open for appending."""
        torn = False
        try:
            with open(self.log_path, "rb") as f:
                for line in f:
                    self._replay(line)
                    torn = not line.endswith(b"\n")
        except FileNotFoundError:
            pass
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if torn:  # the next entry must not continue the torn line
            os.write(self._fd, b"\n")

    def _replay(self, line):
        try:
            entry = json.loads(line)
            agent_id, per_run = entry["a"], entry["r"]
            for run, spans in per_run.items():
                for start, end in spans:
                    if not (isinstance(start, int) and isinstance(end, int)
                            and 0 <= start < end <= MAX_SEQ):
                        raise ValueError("bad range")
        except (ValueError, KeyError, TypeError, AttributeError):
            self._error("log_line")
            return
        self._count(agent_id, per_run)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _error(self, kind, n=1):
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + n

    def add_message(self, pd, received_at=None):
        """Count the numbered records of one decoded PackagedData; the log
        line carries ``received_at`` as "t" (latency benchmarks)."""
        numbers = {}
        bad_payload = bad_seq = 0
        for r in pd.records:
            if SEQ_FIELD.encode() not in r.data:
                continue  # cheap pre-check: heartbeats and the like
            try:
                fields = grpc_pb2.Payload.FromString(r.data).fields
            except DecodeError:
                bad_payload += 1
                continue
            text = fields.get(SEQ_FIELD)
            if text is None:
                continue
            if not (text.isdigit() and text.isascii()) or int(text) >= MAX_SEQ:
                bad_seq += 1
                continue
            numbers.setdefault(fields.get(RUN_FIELD, ""), []).append(int(text))
        if bad_payload:
            self._error("payload", bad_payload)
        if bad_seq:
            self._error("seq", bad_seq)
        if not numbers:
            return
        per_run = {run: ranges(seqs) for run, seqs in numbers.items()}
        if self._fd is not None:
            entry = {"a": pd.agent_id, "r": per_run}
            if received_at is not None:
                entry["t"] = round(received_at, 6)
            line = json.dumps(entry, separators=(",", ":"))
            try:
                os.write(self._fd, line.encode("utf-8") + b"\n")
            except OSError as e:  # counted and still counted in memory
                self._error("log_write")
                log.error("cannot append to %s: %s", self.log_path, e)
        self._count(pd.agent_id, per_run)

    def _count(self, agent_id, per_run):
        with self._lock:
            for run, spans in per_run.items():
                key = (agent_id, run)
                counter = self._runs.get(key)
                if counter is None:
                    if self._per_agent.get(agent_id, 0) >= MAX_RUNS:
                        self.errors["runs"] = self.errors.get("runs", 0) + 1
                        continue
                    counter = self._runs[key] = _Run()
                    self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + 1
                for start, end in spans:
                    counter.mark(start, end)

    def snapshot(self, agent_id=None):
        """{agent_id: {run: {unique, duplicates, highest, missing}}}."""
        out = {}
        with self._lock:
            for (agent, run), counter in sorted(self._runs.items()):
                if agent_id is None or agent == agent_id:
                    out.setdefault(agent, {})[run] = counter.view()
        return out

    def error_counts(self):
        with self._lock:
            return dict(self.errors)
