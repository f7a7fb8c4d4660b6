"""Persistence of the development AgentCenter: SQLite (WAL) plus upload files.

Owns everything the devcenter keeps: received records, record counts, the
agents' current configs and uploaded files. One writer thread owns the write
connection and drains a queue, so the asyncio loop never waits on SQLite; a
separate read connection (WAL lets it read while the writer writes) serves
the query helpers that tests, the HTTP API and the summary call.

Store modes:

* ``full``: every record becomes a row with the PackagedData header fields,
  data_type, timestamp, the decoded Payload as JSON and the EncodedRecord
  bytes exactly as they arrived (split out of the message bytes, never
  re-serialized, so tests can compare bytes).
* ``counts``: records are only counted per (agent_id, data_type) in memory
  and the totals are written to ``record_counts`` when the store closes. For
  benchmarks, where inserting 300k rows/s would make SQLite the bottleneck.
* ``seq``: as ``counts``, and the ``seq`` number of every record that has
  one is counted per agent and producer run (seqcount.py; its log is the
  database path with ``.seq`` appended). For the fault tests, which count
  what arrived, twice or never.
* ``latency``: as ``counts``, and each record's ``stamp`` (the bench
  plugin's write time) is subtracted from its arrival time (latency.py):
  the benchmark table's agent-added latency, in ``GET /conn/stat``.

Configs and uploads are written in every mode.
"""

import hashlib
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from concurrent.futures import Future

from google.protobuf.message import DecodeError

from elkeid_agent import wire
from elkeid_agent.errors import WireError
from elkeid_agent.pb import grpc_pb2
from elkeid_agent.services import records
from .latency import LatencyRecorder
from .seqcount import SeqCounter

log = logging.getLogger("elkeid_devtools.devcenter.store")

MODES = ("full", "counts", "seq", "latency")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    version TEXT NOT NULL,
    product TEXT NOT NULL,
    intranet_ipv4 TEXT NOT NULL,
    extranet_ipv4 TEXT NOT NULL,
    intranet_ipv6 TEXT NOT NULL,
    extranet_ipv6 TEXT NOT NULL,
    data_type INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    fields TEXT,
    raw BLOB NOT NULL,
    received_at REAL NOT NULL,
    decode_error TEXT
);
CREATE INDEX IF NOT EXISTS records_agent_type ON records (agent_id, data_type);
CREATE TABLE IF NOT EXISTS record_counts (
    agent_id TEXT NOT NULL,
    data_type INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (agent_id, data_type)
);
CREATE TABLE IF NOT EXISTS services (
    agent_id TEXT NOT NULL,
    service_id TEXT NOT NULL,
    fields TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (agent_id, service_id)
);
CREATE TABLE IF NOT EXISTS host_metrics (
    agent_id TEXT NOT NULL,
    collector TEXT NOT NULL,
    fields TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (agent_id, collector)
);
CREATE TABLE IF NOT EXISTS configs (
    agent_id TEXT PRIMARY KEY,
    command BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id INTEGER PRIMARY KEY,
    token TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    path TEXT,
    size INTEGER NOT NULL,
    sha256 TEXT,
    status TEXT NOT NULL,
    error TEXT,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL
);
"""

_RECORD_COLUMNS = ("id", "agent_id", "hostname", "version", "product",
                   "intranet_ipv4", "extranet_ipv4", "intranet_ipv6", "extranet_ipv6",
                   "data_type", "timestamp", "fields", "raw", "received_at", "decode_error")
_ADDRESS_COLUMNS = ("intranet_ipv4", "extranet_ipv4", "intranet_ipv6", "extranet_ipv6")
_UPLOAD_COLUMNS = ("id", "token", "agent_id", "path", "size", "sha256", "status", "error",
                   "started_at", "finished_at")

# How many queued items one transaction may take: big enough that a burst of
# small messages costs one commit, small enough that a commit stays short.
_MAX_ITEMS_PER_TRANSACTION = 64

_STOP = object()

# The latest 1020 record per (agent, service) and 1021 per (agent,
# collector) are kept apart from the record log for GET /services and
# GET /metrics/host (elkeid_agent/services/records.py encodes them).
_LATEST = {records.SERVICE_STATUS: ("services", "service_id", "id"),
           records.HOST_METRICS: ("host_metrics", "collector", "collector")}
_SERVICE_INTS = ("pid", "restarts", "rss")
_SERVICE_FLOATS = ("cpu", "uptime")


class StoreError(Exception):
    """A query the store cannot answer (e.g. records in counts mode)."""


def header_of(pd):
    """The PackagedData header fields as a dict (addresses as lists)."""
    return {
        "agent_id": pd.agent_id,
        "hostname": pd.hostname,
        "version": pd.version,
        "product": pd.product,
        "intranet_ipv4": list(pd.intranet_ipv4),
        "extranet_ipv4": list(pd.extranet_ipv4),
        "intranet_ipv6": list(pd.intranet_ipv6),
        "extranet_ipv6": list(pd.extranet_ipv6),
    }


def record_spans(raw):
    """The bytes of every ``PackagedData.records`` entry, in order, exactly
    as they appear in the serialized message ``raw``."""
    return [bytes(value) for field, wire_type, value in wire.iter_fields(raw)
            if field == 1 and wire_type == wire.LEN]


def decode_fields(data):
    """(fields dict, None) for Payload bytes, or (None, error text)."""
    try:
        payload = grpc_pb2.Payload.FromString(data)
    except DecodeError as e:
        return None, "Payload does not decode: %s" % (e or "malformed")
    return dict(payload.fields), None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 120


def _as(kind, text, default):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return default


def safe_name(token):
    """A file name made from an upload token that cannot leave its directory.

    Every run of characters outside ``[A-Za-z0-9._-]`` (so every ``/``, ``\\``
    and NUL) becomes ``_``; leading dots and underscores go, so neither ``..``
    nor a hidden file can result; empty -> ``upload``."""
    name = _UNSAFE.sub("_", token)[:_MAX_NAME].lstrip("._")
    return name or "upload"


class UploadFile:
    """One upload being received: written to ``<name>.part`` and renamed to
    a unique final name only when complete, hashing as it goes."""

    def __init__(self, directory, token, max_bytes):
        self.directory = os.path.realpath(directory)
        self.token = token
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self.name = safe_name(token)
        fd = None
        for n in range(10000):
            # O_EXCL: two uploads with the same token never share a part file.
            candidate = self.name if n == 0 else "%s.%d" % (self.name, n)
            part = self._inside(candidate + ".part")
            try:
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            if os.path.exists(self._inside(candidate)):
                os.close(fd)
                os.unlink(part)
                fd = None
                continue
            self.name = candidate
            break
        if fd is None:
            raise OSError("no free file name for upload token %r" % token)
        self.part_path = part
        self.path = self._inside(self.name)
        self._file = os.fdopen(fd, "wb")

    def _inside(self, name):
        path = os.path.realpath(os.path.join(self.directory, name))
        # safe_name already prevents escaping; this is the belt to its braces.
        if os.path.dirname(path) != self.directory:
            raise OSError("upload name %r escapes %s" % (name, self.directory))
        return path

    def write(self, data):
        """Append a chunk; False (nothing written) when it would exceed the cap."""
        if self.size + len(data) > self.max_bytes:
            return False
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return True

    @property
    def sha256(self):
        return self._hash.hexdigest()

    def finish(self):
        self._file.close()
        # The name may have been taken meanwhile by a file someone put there;
        # os.link refuses to overwrite, unlike rename.
        os.link(self.part_path, self.path)
        os.unlink(self.part_path)
        return self.path

    def discard(self):
        self._file.close()
        try:
            os.unlink(self.part_path)
        except FileNotFoundError:
            pass


class Store:
    """SQLite store with a writer thread; see the module docstring."""

    def __init__(self, db_path, uploads_dir, mode="full", on_commit=None, metrics=None):
        if mode not in MODES:
            raise ValueError("store mode must be one of %s, got %r" % ("|".join(MODES), mode))
        self.db_path = os.path.abspath(db_path)
        self.uploads_dir = os.path.abspath(uploads_dir)
        self.mode = mode
        # Only counted, no record rows (counts and seq modes).
        self.counting = mode != "full"
        self.seq = SeqCounter(self.db_path + ".seq") if mode == "seq" else None
        self.latency = LatencyRecorder() if mode == "latency" else None
        # Called on the writer thread after each commit (the devcenter hands
        # it to its loop with call_soon_threadsafe).
        self.on_commit = on_commit
        # A metrics.Registry (thread-safe) for payload decode errors.
        self.metrics = metrics
        self._queue = queue.Queue()
        self._pending = 0          # queued record messages, for backpressure
        self._lock = threading.Lock()
        self._counts = {}          # (agent_id, data_type) -> committed records
        self.payload_errors = 0    # records whose data is not a Payload
        self.write_errors = 0      # transactions SQLite refused
        self._thread = None
        self._writer = None
        self._reader = None
        self._read_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def check_paths(self):
        """Refuse a database path that cannot be one, before anything is
        made. Missing parent directories are not created: the devcenter
        often runs as root, and a typo must not grow a tree under /."""
        if os.path.isdir(self.db_path):
            raise StoreError("database %s is a directory; name a file in it" % self.db_path)
        for what, path in (("database", self.db_path), ("uploads directory", self.uploads_dir)):
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                raise StoreError("the directory of the %s %s does not exist (%s); create it first"
                                 % (what, path, parent))
        if os.path.exists(self.uploads_dir) and not os.path.isdir(self.uploads_dir):
            raise StoreError("uploads directory %s is not a directory" % self.uploads_dir)

    def open(self):
        self.check_paths()
        try:
            os.mkdir(self.uploads_dir, 0o700)
        except FileExistsError:
            pass
        try:
            self._open_db()
        except sqlite3.Error as e:
            self._close_dbs()
            raise StoreError("cannot open database %s: %s" % (self.db_path, e)) from None
        if self.seq is not None:
            try:
                self.seq.open()
            except OSError as e:
                self._close_dbs()
                raise StoreError("cannot open the sequence log %s: %s"
                                 % (self.seq.log_path, e.strerror or e)) from None
        log.debug("store %s opened (%s mode)", self.db_path, self.mode)
        self._thread = threading.Thread(target=self._run, name="devcenter-store", daemon=True)
        self._thread.start()

    def _close_dbs(self):
        for db in (self._writer, self._reader):
            if db is not None:
                db.close()
        self._writer = self._reader = None

    def _open_db(self):
        # Autocommit mode: transactions are explicit BEGIN/COMMIT below.
        self._writer = sqlite3.connect(self.db_path, check_same_thread=False,
                                       isolation_level=None)
        self._writer.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable enough for a development server and avoids an
        # fsync per commit.
        self._writer.execute("PRAGMA synchronous=NORMAL")
        self._writer.executescript(_SCHEMA)
        self._reader = sqlite3.connect(self.db_path, check_same_thread=False,
                                       isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout=5000")
        if self.mode == "full":
            rows = self._writer.execute(
                "SELECT agent_id, data_type, COUNT(*) FROM records GROUP BY agent_id, data_type")
        else:
            rows = self._writer.execute("SELECT agent_id, data_type, count FROM record_counts")
        self._counts = {(a, t): n for a, t, n in rows}

    def close(self):
        """Flush everything queued, write counts (counts mode), close."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        if self.seq is not None:
            self.seq.close()
        if self.counting:
            with self._lock:
                counts = list(self._counts.items())
            self._writer.execute("BEGIN")
            self._writer.executemany(
                "INSERT OR REPLACE INTO record_counts (agent_id, data_type, count) VALUES (?,?,?)",
                [(a, t, n) for (a, t), n in counts])
            self._writer.execute("COMMIT")
        self._writer.close()
        with self._read_lock:
            self._reader.close()
            self._reader = None

    # ------------------------------------------------------------ writing

    @property
    def pending(self):
        """Record messages queued but not committed yet."""
        return self._pending

    def add_message(self, pd, raw, received_at=None):
        """Take one decoded PackagedData ``pd`` and its serialized bytes.

        Full mode queues it for the writer (Payload decoding happens there,
        off the loop); counts mode counts it right here, which needs only the
        data_type of each EncodedRecord, already decoded with ``pd``; seq
        mode also decodes the Payloads that carry a ``seq`` field."""
        if received_at is None:
            received_at = time.time()
        if self.counting:
            if self.seq is not None:
                self.seq.add_message(pd, received_at)
            if self.latency is not None:
                self.latency.add_message(pd)
            types = [r.data_type for r in pd.records]
            agent_id = pd.agent_id
            with self._lock:
                counts = self._counts
                if len(set(types)) == 1:  # the common case: one plugin, one type
                    key = (agent_id, types[0])
                    counts[key] = counts.get(key, 0) + len(types)
                else:
                    for t in types:
                        key = (agent_id, t)
                        counts[key] = counts.get(key, 0) + 1
            return
        with self._lock:
            self._pending += 1
        self._queue.put(("message", pd, raw, received_at))

    def call(self, op, *args):
        """Run a write ``op`` ("configs", "upload") on the writer thread;
        the returned concurrent Future resolves after its commit."""
        future = Future()
        self._queue.put((op, args, future))
        return future

    def set_configs(self, agent_id, command_bytes):
        """Persist (or with None, forget) an agent's current configs."""
        return self.call("configs", agent_id, command_bytes)

    def add_upload(self, row):
        """Persist an upload row (a dict with the ``uploads`` columns)."""
        return self.call("upload", row)

    def _run(self):
        stop = False
        while not stop:
            items = [self._queue.get()]
            while len(items) < _MAX_ITEMS_PER_TRANSACTION:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is _STOP or _STOP in items:
                stop = True
                items = [i for i in items if i is not _STOP]
            if items:
                self._write(items)

    def _write(self, items):
        record_rows = []
        latest_rows = []
        added = {}
        messages = [i for i in items if i[0] == "message"]
        other = [i for i in items if i[0] != "message"]
        futures = [future for _op, _args, future in other]
        db = self._writer
        error = None
        # Everything that can fail is inside the try: whatever happens, the
        # pending count drops and every future resolves, so no stream waits
        # on backpressure and no upload waits for its row forever.
        try:
            for _kind, pd, raw, received_at in messages:
                self._message_rows(pd, raw, received_at, record_rows, added, latest_rows)
            db.execute("BEGIN")
            if record_rows:
                db.executemany(
                    "INSERT INTO records (agent_id, hostname, version, product, intranet_ipv4,"
                    " extranet_ipv4, intranet_ipv6, extranet_ipv6, data_type, timestamp,"
                    " fields, raw, received_at, decode_error)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", record_rows)
            for table, key_column, row in latest_rows:
                # Records of one agent arrive in order; an older one (a
                # replayed batch) must not overwrite a newer state.
                db.execute("INSERT INTO %s (agent_id, %s, fields, timestamp, received_at)"
                           " VALUES (?,?,?,?,?) ON CONFLICT (agent_id, %s) DO UPDATE SET"
                           " fields = excluded.fields, timestamp = excluded.timestamp,"
                           " received_at = excluded.received_at"
                           " WHERE excluded.timestamp >= %s.timestamp"
                           % (table, key_column, key_column, table), row)
            for op, args, _future in other:
                if op == "configs":
                    agent_id, command = args
                    if command is None:
                        db.execute("DELETE FROM configs WHERE agent_id = ?", (agent_id,))
                    else:
                        db.execute("INSERT OR REPLACE INTO configs (agent_id, command, updated_at)"
                                   " VALUES (?,?,?)", (agent_id, command, time.time()))
                elif op == "upload":
                    row = args[0]
                    cols = [c for c in _UPLOAD_COLUMNS if c != "id"]
                    db.execute("INSERT INTO uploads (%s) VALUES (%s)"
                               % (",".join(cols), ",".join("?" * len(cols))),
                               [row.get(c) for c in cols])
                else:
                    raise ValueError("unknown store op %r" % (op,))
            db.execute("COMMIT")
        except Exception as e:  # disk full, locked db: count, log, keep serving
            error = e
            self.write_errors += 1
            log.error("store transaction failed (%d items lost): %s", len(items), e)
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        with self._lock:
            self._pending -= len(messages)
            if error is None:
                for key, n in added.items():
                    self._counts[key] = self._counts.get(key, 0) + n
        for future in futures:
            # The waiter may have gone (its stream was cancelled): settling a
            # cancelled future raises, and must not end the store thread.
            if not future.set_running_or_notify_cancel():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:  # e.g. the loop closed during shutdown
                log.debug("on_commit hook failed", exc_info=True)

    def _message_rows(self, pd, raw, received_at, rows, added, latest=None):
        agent_id = pd.agent_id
        head = (agent_id, pd.hostname, pd.version, pd.product,
                json.dumps(list(pd.intranet_ipv4)), json.dumps(list(pd.extranet_ipv4)),
                json.dumps(list(pd.intranet_ipv6)), json.dumps(list(pd.extranet_ipv6)))
        records = pd.records
        try:
            spans = record_spans(raw)
        except WireError:
            spans = None
        if spans is None or len(spans) != len(records):
            # protobuf accepted what our splitter did not (e.g. a group in
            # an unknown field): fall back to re-serializing, which is the
            # same bytes for every canonical encoder.
            log.warning("message from %r: raw record split failed; storing re-serialized records",
                        agent_id)
            spans = [r.SerializeToString() for r in records]
        for r, span in zip(records, spans):
            fields, error = decode_fields(r.data)
            if error is not None:
                self.payload_errors += 1
                if self.metrics is not None:
                    self.metrics.inc("decode_errors_total", kind="payload")
                fields_json = None
            else:
                fields_json = json.dumps(fields, ensure_ascii=False, sort_keys=True)
            rows.append(head + (r.data_type, r.timestamp, fields_json, span, received_at, error))
            where = _LATEST.get(r.data_type)
            if where is not None and latest is not None and fields is not None:
                table, key_column, key_field = where
                key = fields.get(key_field)
                if key:
                    latest.append((table, key_column, (agent_id, key, fields_json, r.timestamp,
                                                       received_at)))
            key = (agent_id, r.data_type)
            added[key] = added.get(key, 0) + 1

    # ------------------------------------------------------------ reading

    def count(self, agent_id=None, data_type=None):
        """Records committed (full) or counted (counts), optionally filtered."""
        with self._lock:
            items = list(self._counts.items())
        return sum(n for (a, t), n in items
                   if (agent_id is None or a == agent_id) and (data_type is None or t == data_type))

    def counts(self):
        """{agent_id: {data_type: count}}."""
        out = {}
        with self._lock:
            items = list(self._counts.items())
        for (a, t), n in sorted(items):
            out.setdefault(a, {})[t] = n
        return out

    def _query(self, sql, args):
        with self._read_lock:
            if self._reader is None:
                # Not open (yet) or closed already: tests inspect the store
                # after stopping the devcenter, so read the file directly.
                if not os.path.exists(self.db_path):
                    raise StoreError("no database at %s" % self.db_path)
                db = sqlite3.connect(self.db_path)
                try:
                    return db.execute(sql, args).fetchall()
                finally:
                    db.close()
            return self._reader.execute(sql, args).fetchall()

    def records(self, agent_id=None, data_type=None, limit=None, after_id=0, newest=False):
        """Stored records as dicts, oldest first.

        ``after_id`` skips records with id <= it (for polling); ``limit``
        returns at most that many: the oldest ones, or with ``newest=True``
        the newest ones (still oldest first). ``fields`` is the Payload map
        (None when it did not decode, see ``decode_error``); ``raw`` is the
        EncodedRecord bytes as received; addresses are lists."""
        if self.mode != "full":
            raise StoreError("store mode %r keeps no records, only counts" % self.mode)
        where = ["id > ?"]
        args = [int(after_id or 0)]
        if agent_id is not None:
            where.append("agent_id = ?")
            args.append(agent_id)
        if data_type is not None:
            where.append("data_type = ?")
            args.append(int(data_type))
        sql = "SELECT %s FROM records WHERE %s ORDER BY id %s" % (
            ",".join(_RECORD_COLUMNS), " AND ".join(where), "DESC" if newest else "ASC")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        rows = self._query(sql, args)
        if newest:
            rows.reverse()
        out = []
        for row in rows:
            rec = dict(zip(_RECORD_COLUMNS, row))
            for col in _ADDRESS_COLUMNS:
                rec[col] = json.loads(rec[col])
            rec["fields"] = json.loads(rec["fields"]) if rec["fields"] is not None else None
            rec["raw"] = bytes(rec["raw"])
            out.append(rec)
        return out

    def services(self, agent_id=None):
        """The latest 1020 state of each (agent, service), as dicts: the
        record's fields with numbers as numbers and ``checks`` decoded,
        plus ``agent_id``, ``timestamp`` and ``received_at``."""
        out = []
        for agent, fields, ts, received in self._latest("services", agent_id):
            row = dict(fields)
            for name in _SERVICE_INTS:
                row[name] = _as(int, row.get(name), 0)
            for name in _SERVICE_FLOATS:
                row[name] = _as(float, row.get(name), 0.0)
            try:
                row["checks"] = json.loads(row.get("checks") or "{}")
            except ValueError:
                pass  # kept as the text that arrived
            row.update(agent_id=agent, timestamp=ts, received_at=received)
            out.append(row)
        return out

    def host_metrics(self, agent_id=None):
        """The latest 1021 round of each (agent, collector): ``collector``,
        ``samples`` ([{name, labels, value}]), ``agent_id``, ``timestamp``,
        ``received_at``; a field that is not a sample is in ``bad_fields``."""
        out = []
        for agent, fields, ts, received in self._latest("host_metrics", agent_id):
            samples, bad = [], []
            for key, text in sorted(fields.items()):
                if key == "collector":
                    continue
                try:
                    name, labels = records.parse_series_key(key)
                    value = float(text)
                except ValueError:
                    bad.append(key)
                    continue
                samples.append({"name": name, "labels": labels,
                                "value": int(value) if text.lstrip("-").isdigit() else value})
            out.append({"agent_id": agent, "collector": fields.get("collector"),
                        "samples": samples, "bad_fields": bad, "timestamp": ts,
                        "received_at": received})
        return out

    def _latest(self, table, agent_id):
        sql = "SELECT agent_id, fields, timestamp, received_at FROM %s" % table
        args = []
        if agent_id is not None:
            sql += " WHERE agent_id = ?"
            args.append(agent_id)
        key = "service_id" if table == "services" else "collector"
        rows = self._query(sql + " ORDER BY agent_id, %s" % key, args)
        return [(a, json.loads(f), t, r) for a, f, t, r in rows]

    def uploads(self, token=None):
        """Upload rows as dicts, oldest first."""
        sql = "SELECT %s FROM uploads" % ",".join(_UPLOAD_COLUMNS)
        args = []
        if token is not None:
            sql += " WHERE token = ?"
            args.append(token)
        return [dict(zip(_UPLOAD_COLUMNS, row)) for row in self._query(sql + " ORDER BY id", args)]

    def load_configs(self):
        """{agent_id: serialized Command with configs} as persisted."""
        return {a: bytes(c) for a, c in self._query("SELECT agent_id, command FROM configs", [])}
