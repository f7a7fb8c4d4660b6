"""The periodic timer schedule behind the heartbeat and the watchdog ping,
fed a fake clock."""

import pytest

from elkeid_agent.runtime.ticker import Ticker


def fires(ticker, times):
    return [t for t in times if ticker.due(t)]


def test_on_time_keeps_the_grid():
    t = Ticker(10, now=0)
    assert fires(t, [0, 3, 10.2, 15, 20.1, 29.9, 30]) == [0, 10.2, 20.1, 30]
    assert t.next == 40  # no drift from the late looks


def test_after_a_stall_one_tick_then_one_interval_from_now():
    t = Ticker(60, now=0)
    assert t.due(0)
    # SIGSTOPped for ten minutes: ten ticks missed.
    assert fires(t, [600, 600.001, 600.5, 659]) == [600]
    assert t.next == 660
    assert fires(t, [660, 720]) == [660, 720]


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        Ticker(0, now=0)
