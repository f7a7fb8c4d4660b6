"""The lifecycle of a supervised process, as one explicit state machine.

A plugin runner (and the service supervisor) moves one process through
these states; every move goes through ``Lifecycle.transition``, which checks
it against ``TRANSITIONS``, logs it at INFO (these lines go to stderr for
operators: they must say what happened), counts it and remembers since when
and why. An illegal move is a bug in the caller and raises.

    stopped -> starting -> running -> stopping -> exited -> backoff -> starting ...
                   \\__________________________/      \\-> failed (given up)
                                                     \\-> stopped (asked to stop)
"""

import logging
import time

STOPPED = "stopped"    # not started, or stopped for good on request
STARTING = "starting"  # spawning
RUNNING = "running"    # spawned; its pipes are being read
STOPPING = "stopping"  # being terminated (asked to, or after a failure)
EXITED = "exited"      # the process is gone (reaped, or given up on)
BACKOFF = "backoff"    # waiting for the next start after a failure
FAILED = "failed"      # too many failures in a row: left alone until revived

STATES = (STOPPED, STARTING, RUNNING, STOPPING, EXITED, BACKOFF, FAILED)

TRANSITIONS = {
    STOPPED: frozenset({STARTING}),
    # A spawn that fails never runs; a stop requested while spawning still
    # goes through running so the new process is terminated properly.
    STARTING: frozenset({RUNNING, EXITED}),
    RUNNING: frozenset({STOPPING}),
    STOPPING: frozenset({EXITED}),
    EXITED: frozenset({BACKOFF, FAILED, STOPPED}),
    BACKOFF: frozenset({STARTING, STOPPED, FAILED}),
    FAILED: frozenset({STARTING, STOPPED}),
}


class IllegalTransition(RuntimeError):
    """A caller tried a move the table does not allow (a bug)."""


class Lifecycle:
    def __init__(self, name, metrics=None, counter="lifecycle_transitions", labels=None,
                 logger=None, extra=None, clock=time.time, table=TRANSITIONS, initial=STOPPED):
        """``name`` starts each log line ("plugin probe"); ``counter`` is
        incremented with ``labels`` plus ``to=<new state>``."""
        self.name = name
        self.metrics = metrics
        self.counter = counter
        self.labels = dict(labels or {})
        self.log = logger or logging.getLogger(__name__)
        self.extra = extra  # logging ``extra`` of every line (e.g. {"plugin": name})
        self._clock = clock
        self.table = table
        self.state = initial
        self.since = clock()
        self.reason = ""
        self.history = []  # (from, to, reason), for tests and debugging; bounded
        if metrics is not None:
            metrics.describe(counter, "lifecycle state changes, by new state")

    def allowed(self, new):
        return new in self.table.get(self.state, ())

    def transition(self, new, reason=""):
        old = self.state
        if not self.allowed(new):
            raise IllegalTransition("%s: %s -> %s is not allowed (%s)" % (self.name, old, new,
                                                                          reason))
        self.state = new
        self.since = self._clock()
        self.reason = reason
        self.history.append((old, new, reason))
        del self.history[:-64]
        if self.metrics is not None:
            self.metrics.inc(self.counter, to=new, **self.labels)
        if reason:
            self.log.info("%s %s: %s", self.name, new, reason, extra=self.extra)
        else:
            self.log.info("%s %s", self.name, new, extra=self.extra)

    def __repr__(self):
        return "<Lifecycle %s %s since %.0f>" % (self.name, self.state, self.since)
