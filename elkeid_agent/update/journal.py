"""The update journal: ``<workdir>/update/journal.db`` (SQLite).

One row per update attempt, moving through one state machine (README
"Updates" draws it); every move is committed before the step it announces
is taken, so a process killed at any point leaves a row that says where it
stopped. The old agent, the guard, the new agent and elkeidctl all open the
same file; SQLite's locking serialises them (busy timeout 10 s).

States (docs/update.md draws them):

    downloading -> verifying -> backing_up -> handed_over -> switching
      -> trial -> succeeded
    (a local service's binary: backing_up -> switching, no hand-over)
    trial/switching -> rolling_back -> rolled_back | rollback_failed
    downloading/verifying/backing_up -> failed        (nothing changed)
    (offer checks)                   -> refused       (nothing changed)
    any step before switching, on the next start -> interrupted

``rejected`` holds the versions a trial failed for: they are not tried
again while the server keeps offering them, until it offers another
version or an operator clears them (``elkeidctl update --clear``).
"""

import functools
import json
import os
import time
import urllib.parse

STATES = ("downloading", "verifying", "backing_up", "handed_over", "switching", "trial",
          "rolling_back", "succeeded", "failed", "refused", "rolled_back", "rollback_failed",
          "interrupted")
FINAL = frozenset(("succeeded", "failed", "refused", "rolled_back", "rollback_failed",
                   "interrupted"))
_NEXT = {
    "downloading": ("verifying", "failed", "interrupted"),
    "verifying": ("backing_up", "handed_over", "failed", "refused", "interrupted"),
    # A local service's update has no guard: the agent switches itself.
    "backing_up": ("handed_over", "switching", "failed", "interrupted"),
    "handed_over": ("switching", "failed", "interrupted", "rolling_back"),
    "switching": ("trial", "rolling_back", "succeeded"),
    "trial": ("succeeded", "rolling_back"),
    "rolling_back": ("rolled_back", "rollback_failed"),
}
SCHEMA_VERSION = 1
_COLUMNS = ("id", "component", "from_version", "to_version", "kind", "install", "manager",
            "state", "reason", "started", "updated", "finished", "package", "package_sha256",
            "backup", "backup_package", "guard_pid", "guard_start", "trial_deadline",
            "healthy_at", "new_pid", "new_start", "reported", "context")


class JournalError(Exception):
    """The journal cannot be read or written (a corrupt or locked file, a
    full disk, a refused transition); callers catch this one type."""


def _journal_errors(method):
    """sqlite3's errors (a page that is not a database, a lock held past the
    busy timeout, a full disk) come out as JournalError."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        import sqlite3  # imported by Journal(); here it is a dict lookup
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise JournalError("update journal %s: %s" % (self.path, e)) from None
    return wrapper


class Update:
    """One row, as read."""

    def __init__(self, row):
        for name in _COLUMNS:
            setattr(self, name, row[name])
        self.context = json.loads(row["context"] or "{}")

    @property
    def final(self):
        return self.state in FINAL

    def as_dict(self):
        d = {name: getattr(self, name) for name in _COLUMNS}
        d["context"] = dict(self.context)
        return d


def journal_dir(workdir):
    return os.path.join(workdir, "update")


def journal_exists(workdir):
    return os.path.exists(os.path.join(journal_dir(workdir), "journal.db"))


class Journal:
    def __init__(self, workdir, clock=time.time, readonly=False):
        """``readonly``: only look (elkeidctl update): nothing is created or
        written, so the right to read the file is enough."""
        self.dir = journal_dir(workdir)
        self.path = os.path.join(self.dir, "journal.db")
        self.clock = clock
        # sqlite3 (about 0.9 MB with libsqlite3) is imported when a journal
        # is opened, not when the agent starts with no update to recover.
        import sqlite3
        try:
            if readonly:
                self.db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(self.path),
                                          timeout=10.0, isolation_level=None, uri=True)
            else:
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            if not readonly:
                self._schema()
        except (sqlite3.Error, OSError) as e:
            raise JournalError("update journal %s: %s" % (self.path, e)) from None

    def close(self):
        self.db.close()

    def _schema(self):
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            # A newer agent wrote it (then rolled back to us): read what we
            # know, never rewrite its schema.
            return
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS updates (
                id INTEGER PRIMARY KEY AUTOINCREMENT, component TEXT NOT NULL,
                from_version TEXT NOT NULL, to_version TEXT NOT NULL, kind TEXT DEFAULT '',
                install TEXT DEFAULT '', manager TEXT DEFAULT '', state TEXT NOT NULL,
                reason TEXT DEFAULT '', started REAL, updated REAL, finished REAL,
                package TEXT DEFAULT '', package_sha256 TEXT DEFAULT '', backup TEXT DEFAULT '',
                backup_package TEXT DEFAULT '', guard_pid INTEGER DEFAULT 0,
                guard_start INTEGER DEFAULT 0, trial_deadline REAL DEFAULT 0,
                healthy_at REAL DEFAULT 0, new_pid INTEGER DEFAULT 0,
                new_start INTEGER DEFAULT 0, reported INTEGER DEFAULT 0,
                context TEXT DEFAULT '{}');
            CREATE TABLE IF NOT EXISTS events (
                update_id INTEGER NOT NULL, at REAL NOT NULL, state TEXT NOT NULL,
                note TEXT DEFAULT '');
            CREATE TABLE IF NOT EXISTS rejected (
                component TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT DEFAULT '',
                reason TEXT DEFAULT '', at REAL, PRIMARY KEY (component, version));
            PRAGMA user_version = %d;
        """ % SCHEMA_VERSION)

    # ------------------------------------------------------------ rows

    @_journal_errors
    def begin(self, component, from_version, to_version, state="downloading", **fields):
        now = self.clock()
        fields.setdefault("context", {})
        fields["context"] = json.dumps(fields["context"], sort_keys=True)
        names = ["component", "from_version", "to_version", "state", "started", "updated"]
        values = [component, from_version, to_version, state, now, now]
        for k, v in fields.items():
            if k not in _COLUMNS:
                raise JournalError("unknown journal column %r" % k)
            names.append(k)
            values.append(v)
        with self._tx():
            cur = self.db.execute("INSERT INTO updates (%s) VALUES (%s)"
                                  % (",".join(names), ",".join("?" * len(names))), values)
            uid = cur.lastrowid
            self._event(uid, now, state, fields.get("reason", ""))
            if state in FINAL:
                self.db.execute("UPDATE updates SET finished=? WHERE id=?", (now, uid))
        return uid

    @_journal_errors
    def move(self, uid, state, reason=None, **fields):
        """Move row ``uid`` to ``state`` (only along the machine's edges);
        ``fields`` are set in the same transaction."""
        now = self.clock()
        with self._tx():
            row = self.db.execute("SELECT state FROM updates WHERE id=?", (uid,)).fetchone()
            if row is None:
                raise JournalError("no update %d in the journal" % uid)
            if state not in _NEXT.get(row["state"], ()):
                raise JournalError("update %d: %s -> %s is not a transition"
                                   % (uid, row["state"], state))
            self._set(uid, dict(fields, state=state, updated=now,
                                **({"reason": reason} if reason is not None else {}),
                                **({"finished": now} if state in FINAL else {})))
            self._event(uid, now, state, reason or "")

    @_journal_errors
    def set(self, uid, **fields):
        with self._tx():
            self._set(uid, dict(fields, updated=self.clock()))

    def _set(self, uid, fields):
        if "context" in fields:
            fields["context"] = json.dumps(fields["context"], sort_keys=True)
        for k in fields:
            if k not in _COLUMNS:
                raise JournalError("unknown journal column %r" % k)
        self.db.execute("UPDATE updates SET %s WHERE id=?"
                        % ",".join("%s=?" % k for k in fields), list(fields.values()) + [uid])

    def _event(self, uid, at, state, note):
        self.db.execute("INSERT INTO events (update_id, at, state, note) VALUES (?,?,?,?)",
                        (uid, at, state, note))

    def _tx(self):
        return _Transaction(self.db)

    @_journal_errors
    def get(self, uid):
        row = self.db.execute("SELECT * FROM updates WHERE id=?", (uid,)).fetchone()
        return Update(row) if row is not None else None

    @_journal_errors
    def in_flight(self, component=None):
        """Rows not in a final state, oldest first."""
        q = "SELECT * FROM updates WHERE state NOT IN (%s)" % ",".join("?" * len(FINAL))
        args = list(FINAL)
        if component is not None:
            q += " AND component=?"
            args.append(component)
        return [Update(r) for r in self.db.execute(q + " ORDER BY id", args)]

    @_journal_errors
    def history(self, limit=50, component=None):
        q, args = "SELECT * FROM updates", []
        if component is not None:
            q += " WHERE component=?"
            args.append(component)
        rows = self.db.execute(q + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
        return [Update(r) for r in reversed(rows)]

    @_journal_errors
    def events(self, uid):
        return [dict(r) for r in self.db.execute(
            "SELECT at, state, note FROM events WHERE update_id=? ORDER BY rowid", (uid,))]

    @_journal_errors
    def unreported(self):
        q = ("SELECT * FROM updates WHERE reported=0 AND state IN (%s) ORDER BY id"
             % ",".join("?" * len(FINAL)))
        return [Update(r) for r in self.db.execute(q, list(FINAL))]

    @_journal_errors
    def mark_reported(self, uid):
        with self._tx():
            self.db.execute("UPDATE updates SET reported=1 WHERE id=?", (uid,))

    @_journal_errors
    def last_succeeded(self, component):
        row = self.db.execute("SELECT * FROM updates WHERE component=? AND state='succeeded' "
                              "ORDER BY id DESC LIMIT 1", (component,)).fetchone()
        return Update(row) if row is not None else None

    # ------------------------------------------------------------ rejected versions

    @_journal_errors
    def reject(self, component, version, sha256, reason):
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO rejected VALUES (?,?,?,?,?)",
                            (component, version, sha256, reason, self.clock()))

    @_journal_errors
    def rejected(self, component, version):
        row = self.db.execute("SELECT * FROM rejected WHERE component=? AND version=?",
                              (component, version)).fetchone()
        return dict(row) if row is not None else None

    @_journal_errors
    def forget_rejections(self, component, except_version=None):
        """The server offers another version: earlier refusals lapse."""
        with self._tx():
            if except_version is None:
                cur = self.db.execute("DELETE FROM rejected WHERE component=?", (component,))
            else:
                cur = self.db.execute("DELETE FROM rejected WHERE component=? AND version<>?",
                                      (component, except_version))
            return cur.rowcount

    @_journal_errors
    def all_rejected(self):
        return [dict(r) for r in self.db.execute("SELECT * FROM rejected ORDER BY at")]


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.db.execute("COMMIT")
            return
        import sqlite3
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite rolled back already (a full disk): the first error is the one to tell
