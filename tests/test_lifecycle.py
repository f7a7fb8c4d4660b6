"""runtime/lifecycle.py: the transition table, pair by pair."""

import itertools
import logging

import pytest

from elkeid_agent.metrics import Registry
from elkeid_agent.runtime import lifecycle
from elkeid_agent.runtime.lifecycle import (BACKOFF, EXITED, FAILED, RUNNING, STARTING, STATES,
                                            STOPPED, STOPPING, IllegalTransition, Lifecycle)

ALLOWED = {
    (STOPPED, STARTING),
    (STARTING, RUNNING), (STARTING, EXITED),
    (RUNNING, STOPPING),
    (STOPPING, EXITED),
    (EXITED, BACKOFF), (EXITED, FAILED), (EXITED, STOPPED),
    (BACKOFF, STARTING), (BACKOFF, STOPPED), (BACKOFF, FAILED),
    (FAILED, STARTING), (FAILED, STOPPED),
}


@pytest.mark.parametrize("old,new", list(itertools.product(STATES, STATES)))
def test_every_pair(old, new):
    life = Lifecycle("thing", initial=old)
    if (old, new) in ALLOWED:
        life.transition(new, "because")
        assert (life.state, life.reason) == (new, "because")
    else:
        with pytest.raises(IllegalTransition, match="%s -> %s" % (old, new)):
            life.transition(new, "because")
        assert life.state == old


def test_the_table_is_the_documented_one():
    assert {(a, b) for a, bs in lifecycle.TRANSITIONS.items() for b in bs} == ALLOWED


def test_transition_logs_counts_and_remembers(caplog):
    metrics = Registry()
    clock = iter([100.0, 101.0, 102.5]).__next__
    life = Lifecycle("plugin p", metrics, "plugin_transitions", {"plugin": "p"},
                     logging.getLogger("t.life"), clock=clock)
    caplog.set_level(logging.INFO, logger="t.life")
    life.transition(STARTING, "version 1")
    life.transition(RUNNING, "pid 42")
    assert life.since == 102.5 and life.reason == "pid 42"
    assert [r.getMessage() for r in caplog.records] == ["plugin p starting: version 1",
                                                        "plugin p running: pid 42"]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert metrics.get("plugin_transitions", plugin="p", to=RUNNING) == 1
    assert life.history == [(STOPPED, STARTING, "version 1"), (STARTING, RUNNING, "pid 42")]
