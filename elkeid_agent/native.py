"""Which hot path runs: the C extension ``elkeid_agent._accel`` (built from
the repository's ``accel/``) or the pure-Python functions it mirrors.

Decided once, at import: ``ELKEID_ACCEL=0`` forces the pure path; otherwise
``_accel`` is used when it imports and offers the interface this version
expects. A missing, broken or mismatching binary leaves the pure path, with
the reason in ``REASON`` (logged once at start by the app), never an error.
``ACTIVE`` says which path runs; ``pick(pure, name)`` is how a module
chooses its function. The pure functions stay the reference: the C twins
must give byte-identical results (tests/test_accel.py), and wherever the C
code meets input it does not handle (other types, errors the pure code
reports with an exception) it returns NotImplemented and the pure function
answers, so every error text has one source.
"""

import os

ENV = "ELKEID_ACCEL"
INTERFACE = 1
FUNCTIONS = ("record_error", "split_frames", "packaged_data", "pack_records", "unpack_records")


def _load():
    """(module or None, reason)."""
    setting = os.environ.get(ENV, "").strip()
    if setting == "0":
        return None, "%s=0" % ENV
    try:
        from . import _accel
    except ImportError as exc:
        return None, "C extension not available (%s)" % exc
    except Exception as exc:  # a corrupt or foreign binary must not stop the agent
        return None, "C extension failed to load (%s: %s)" % (type(exc).__name__, exc)
    interface = getattr(_accel, "INTERFACE", None)
    missing = [name for name in FUNCTIONS if not callable(getattr(_accel, name, None))]
    if interface != INTERFACE or missing:
        return None, "C extension %s has interface %r, this version needs %d%s" % (
            getattr(_accel, "__file__", "?"), interface, INTERFACE,
            " (missing %s)" % ", ".join(missing) if missing else "")
    return _accel, "C extension %s" % os.path.basename(getattr(_accel, "__file__", "_accel"))


accel, REASON = _load()
ACTIVE = accel is not None


def describe():
    """One line for the start-up log and the status output."""
    return "hot path: %s (%s)" % ("C" if ACTIVE else "pure Python", REASON)


def pick(pure, name):
    """``pure``, or its C twin when active; the twin's NotImplemented hands
    the call to ``pure``. ``.pure`` on the result is the reference."""
    if not ACTIVE:
        return pure
    fast = getattr(accel, name)

    def accelerated(*args):
        out = fast(*args)
        return pure(*args) if out is NotImplemented else out

    accelerated.__name__ = pure.__name__
    accelerated.__qualname__ = pure.__qualname__
    accelerated.__doc__ = pure.__doc__
    accelerated.pure = pure
    return accelerated
