"""What the agent started, remembered across its own restarts.

``<workdir>/services/state.json`` holds, per service, the run the agent
left running: ``pid``, ``start_time`` (field 22 of /proc/PID/stat, which
tells that process from a later one with the same pid), ``config_hash`` of
the entry it was started from, ``unit`` (systemd launcher) and ``token``
(its environment marker, see osfx/services.py). Written atomically (tmp,
fsync, rename, fsync of the directory) after every start and end.

``plan`` is pure: given the records and the services now configured, it
says which runs to adopt, which to stop (entry changed or removed) and
which to forget (the pid was reused, or the process is gone: never
signalled).
"""

import json
import os
from dataclasses import dataclass

VERSION = 1
MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Record:
    pid: int
    start_time: int
    config_hash: str
    unit: str = ""
    token: str = ""
    started_at: float = 0.0   # unix time the run started

    def to_json(self):
        return {"pid": self.pid, "start_time": self.start_time,
                "config_hash": self.config_hash, "unit": self.unit, "token": self.token,
                "started_at": self.started_at}


class StateError(ValueError):
    """The state file exists but cannot be used."""


def path_in(workdir):
    return os.path.join(workdir, "services", "state.json")


def load(path):
    """{service id: Record}; {} when there is no file. StateError when it is
    unreadable or malformed (the caller reports it and starts afresh)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StateError("cannot read %s: %s" % (path, e.strerror or e)) from None
    if len(data) > MAX_BYTES:
        raise StateError("%s is larger than %d bytes" % (path, MAX_BYTES))
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateError("%s is not valid JSON: %s" % (path, str(e)[:200])) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise StateError("%s: expected {\"version\": 1, \"services\": {...}}" % path)
    out = {}
    for sid, rec in doc["services"].items():
        try:
            out[sid] = _record(rec)
        except (TypeError, ValueError) as e:
            raise StateError("%s: services.%s: %s" % (path, sid, e)) from None
    return out


def _record(rec):
    if not isinstance(rec, dict):
        raise ValueError("expected an object")
    pid, start = rec.get("pid"), rec.get("start_time")
    for name, v in (("pid", pid), ("start_time", start)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError("%s must be a positive integer" % name)
    if pid <= 1 or pid >= 2 ** 22:
        raise ValueError("pid %d is not a service's" % pid)
    texts = {k: rec.get(k, "") for k in ("config_hash", "unit", "token")}
    for name, v in texts.items():
        if not isinstance(v, str) or len(v) > 256:
            raise ValueError("%s must be a short string" % name)
    started = rec.get("started_at", 0.0)
    if isinstance(started, bool) or not isinstance(started, (int, float)):
        raise ValueError("started_at must be a number")
    return Record(pid, start, texts["config_hash"], texts["unit"], texts["token"],
                  float(started))


def save(path, records):
    """Atomically replace the state file with ``records`` {id: Record}."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    doc = {"version": VERSION,
           "services": {sid: records[sid].to_json() for sid in sorted(records)}}
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


ADOPT, STOP, FORGET = "adopt", "stop", "forget"


def plan(records, specs, is_current):
    """[(action, id, record, why)] for every record.

    ``specs``: {id: ServiceSpec} of the enabled services now configured;
    ``is_current(record)``: the recorded process still runs with its
    recorded start time (False for a reused pid: such a record is only
    forgotten, its pid is never signalled)."""
    out = []
    for sid in sorted(records):
        rec = records[sid]
        if not is_current(rec):
            out.append((FORGET, sid, rec, "pid %d is gone or now another process" % rec.pid))
            continue
        spec = specs.get(sid)
        if spec is None:
            out.append((STOP, sid, rec, "no longer configured"))
        elif spec.config_hash() != rec.config_hash:
            out.append((STOP, sid, rec, "its entry changed"))
        else:
            out.append((ADOPT, sid, rec, "pid %d still running" % rec.pid))
    return out
