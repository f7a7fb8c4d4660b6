"""``elkeidctl services``: the local services of the running agent.

    elkeidctl services [--json]            list (a table, or GET /services' objects)
    elkeidctl services restart|stop|start ID
    elkeidctl services reload              re-read the services file
    elkeidctl services stop-all            with the agent stopped: stop what it left

Services outlive the agent (docs/services.md), so stopping the agent leaves
them running; ``stop-all`` is how the package's pre-remove makes sure a
removed agent leaves no supervised process running unsupervised. It works
from the state file the agent keeps (``<workdir>/services/state.json``:
pid and start time, transient unit, run token), so it needs no agent.

It talks to the agent over its control socket (``<workdir>/tmp/control.sock``,
elkeid_agent/runtime/ctlsock.py), which is always on, so it works without
the opt-in status endpoint. No agent listening is one line and exit status
3 (LSB "not running").
"""

import json
import os
import signal
import socket
import time

from ..runtime import ctlsock
from .layout import EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK, EXIT_PRIVILEGE, CtlError
from .table import aligned, clip

ACTIONS = ("restart", "stop", "start", "reload", "stop-all")
STOP_TIMEOUT = 10.0  # the supervisor's default: SIGTERM, this long, SIGKILL
_COLUMNS = (("ID", "id"), ("TYPE", "type"), ("STATE", "state"), ("PID", "pid"),
            ("UPTIME", "uptime"), ("RESTARTS", "restarts"), ("HEALTH", "health"),
            ("LAST ERROR", "last_error"))


def ask(paths, request, timeout=ctlsock.OP_TIMEOUT + 10):
    path = paths.control_socket
    try:
        return ctlsock.call(path, request, timeout=timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise CtlError("elkeid-agent is not running (nothing answers on %s)" % path,
                       EXIT_NOT_RUNNING) from None
    except PermissionError:
        raise CtlError("cannot connect to %s: permission denied (run elkeidctl as root)"
                       % path, EXIT_PRIVILEGE) from None
    except socket.timeout:
        raise CtlError("elkeid-agent did not answer on %s within %.0f s" % (path, timeout)) \
            from None
    except ctlsock.ControlError as e:
        raise CtlError("elkeid-agent on %s: %s" % (path, e)) from None
    except OSError as e:
        raise CtlError("cannot talk to elkeid-agent on %s: %s" % (path, e.strerror or e)) \
            from None


def run(ctl, action, service_id, as_json):
    if action is None:
        answer = ask(ctl.paths, {"op": "list"})
        if not answer.get("ok"):
            raise CtlError("listing services failed: %s" % answer.get("error"))
        services = answer.get("services") or []
        ctl.say(json.dumps(services, indent=2, sort_keys=True) if as_json else table(services))
        return EXIT_OK
    if action == "stop-all":
        return stop_all(ctl)
    request = {"op": action}
    if action != "reload":
        request["id"] = service_id
    answer = ask(ctl.paths, request)
    what = action + (" " + service_id if service_id else "")
    if answer.get("ok"):
        ctl.say("%s: %s" % (what, answer.get("message") or "done"))
        return EXIT_OK
    for problem in answer.get("problems") or ():
        ctl.warn(str(problem))
    raise CtlError("%s: %s" % (what, answer.get("error") or "refused"), EXIT_FAILURE)


def _uptime(seconds):
    try:
        s = int(float(seconds))
    except (TypeError, ValueError):
        return "-"
    if s <= 0:
        return "-"
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def _cell(key, s):
    value = s.get(key)
    if key == "uptime":
        return _uptime(value)
    if key == "pid":
        return str(value) if value else "-"
    return clip(value, 80)


def table(services):
    if not services:
        return "no local services"
    return aligned([[h for h, _k in _COLUMNS]] +
                   [[_cell(k, s) for _h, k in _COLUMNS] for s in services])


def stop_all(ctl, fx=None):
    """Stop every run the state file records (a transient unit with
    ``systemctl stop``; a session leader that still has its recorded start
    time with SIGTERM to its group, then SIGKILL of the group and of what
    carries the run's token) and any loaded ``elkeid-service-*`` unit, then
    remove the state file. Refused while an agent answers: it would start
    them again."""
    from ..osfx.services import UNIT_PREFIX, ServiceProcessEffects
    from ..services import adoption
    try:
        ask(ctl.paths, {"op": "list"}, timeout=10)
    except CtlError as e:
        if e.code != EXIT_NOT_RUNNING:
            raise
    else:
        raise CtlError("elkeid-agent is running: stop it first (it would start its "
                       "services again)")
    fx = fx or ServiceProcessEffects()
    path = adoption.path_in(ctl.paths.workdir)
    try:
        records = adoption.load(path)
    except adoption.StateError as e:
        ctl.warn("%s; stopping only the elkeid-service-* units" % e)
        records = {}
    for sid in sorted(records):
        rec = records[sid]
        if rec.unit:
            fx.stop_unit(rec.unit, STOP_TIMEOUT + 30)
            continue
        ident = fx.capture(rec.pid, rec.start_time)
        if ident is not None and fx.alive(ident):
            fx.signal_session(ident, signal.SIGTERM)
            fx.signal_session(ident, signal.SIGCONT)
            deadline = time.monotonic() + STOP_TIMEOUT
            while fx.alive(ident) and time.monotonic() < deadline:
                time.sleep(0.1)
            if fx.alive(ident):
                fx.signal_session(ident, signal.SIGKILL)
                fx.kill(ident, signal.SIGKILL)
        for pid in fx.leftovers(rec.pid, rec.token, rec.start_time, by_session=False):
            fx.kill(pid, signal.SIGKILL)
    if fx.systemd_is_init():
        rc, out = fx.stop_unit(UNIT_PREFIX + "*.service", STOP_TIMEOUT + 30)
        if rc != 0:
            raise CtlError("systemctl stop %s*.service failed (%d): %s"
                           % (UNIT_PREFIX, rc, out.strip()[-300:]))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return EXIT_OK
