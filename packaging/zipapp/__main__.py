# -*- coding: utf-8 -*-
# The zipapp's entry point. Keep this file valid Python 2.7 and 3.x: on a
# host whose python3 is too old (or too new) it must say so in one line, or
# hand over to a supported interpreter found on PATH, never print a
# traceback. Everything else lives in _elkeid_boot (Python 3.9+).
import os
import sys

SUPPORTED = ((3, 9), (3, 13))
# pythonX.Y names tried, newest first, when the interpreter that runs us is
# not supported (RHEL 8: python3 is 3.6, python3.9 is a separate package).
CANDIDATES = ["python3.%d" % minor for minor in range(SUPPORTED[1][1], SUPPORTED[0][1] - 1, -1)]


def _supported():
    impl = getattr(sys, "implementation", None)
    return (impl is not None and impl.name == "cpython"
            and SUPPORTED[0] <= tuple(sys.version_info[:2]) <= SUPPORTED[1])


def _reexec():
    if os.environ.get("ELKEID_AGENT_REEXEC"):
        return
    archive = os.path.dirname(os.path.abspath(__file__))
    me = os.path.realpath(sys.executable or "")
    for d in os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep):
        for name in CANDIDATES:
            path = os.path.join(d or ".", name)
            if os.path.isfile(path) and os.access(path, os.X_OK) and \
                    os.path.realpath(path) != me and _works(path):
                os.environ["ELKEID_AGENT_REEXEC"] = "1"
                try:
                    os.execv(path, [path, "-sE", archive] + sys.argv[1:])
                except OSError:
                    continue


def _works(path):
    """The candidate really is a supported CPython (not a broken shim)."""
    import subprocess
    check = ("import sys; sys.exit(not (sys.implementation.name == 'cpython' and "
             "%r <= sys.version_info[:2] <= %r))" % (SUPPORTED[0], SUPPORTED[1]))
    try:
        with open(os.devnull, "wb") as null:
            return subprocess.call([path, "-sE", "-c", check], stdout=null, stderr=null) == 0
    except OSError:
        return False


if not _supported():
    _reexec()
    sys.stderr.write(
        "elkeid-agent: Python %d.%d (%s) is not supported: it needs CPython %d.%d to %d.%d "
        "(install one, e.g. python3.11, or point ELKEID_PYTHON at it)\n"
        % (sys.version_info[0], sys.version_info[1], sys.executable or "python",
           SUPPORTED[0][0], SUPPORTED[0][1], SUPPORTED[1][0], SUPPORTED[1][1]))
    sys.exit(1)

import _elkeid_boot  # noqa: E402

_elkeid_boot.main()
