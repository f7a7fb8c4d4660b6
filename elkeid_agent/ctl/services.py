"""``elkeidctl services``: the local services of the running agent.

    elkeidctl services [--json]            list (a table, or GET /services' objects)
    elkeidctl services restart|stop|start ID
    elkeidctl services reload              re-read the services file

It talks to the agent over its control socket (``<workdir>/tmp/control.sock``,
elkeid_agent/runtime/ctlsock.py), which is always on, so it works without
the opt-in status endpoint. No agent listening is one line and exit status
3 (LSB "not running").
"""

import json
import socket

from ..runtime import ctlsock
from .layout import EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK, EXIT_PRIVILEGE, CtlError

ACTIONS = ("restart", "stop", "start", "reload")
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
    text = "" if value is None else str(value)
    text = " ".join(text.split())  # one line per service, whatever a service wrote
    return (text[:77] + "...") if len(text) > 80 else (text or "-")


def table(services):
    if not services:
        return "no local services"
    rows = [[h for h, _k in _COLUMNS]] + [[_cell(k, s) for _h, k in _COLUMNS] for s in services]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                     for r in rows)
