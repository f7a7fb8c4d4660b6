"""Restart/backoff, resource limits and rate meters (pure, fed fake times)."""

import pytest

from elkeid_agent.plugins.policy import (MiB, LimitEvaluator, Policy, RateMeter, RestartPolicy,
    TokenBucket, describe_exit)


def test_defaults_match_the_issue_and_the_daemon_design():
    p = Policy()
    assert p.backoff == (0.0, 10.0, 30.0, 60.0)
    assert p.healthy_reset == 300.0 and p.stop_timeout == 10.0
    assert (p.cpu_limit, p.rss_limit, p.limit_window) == (0.5, 500 * MiB, 60.0)
    assert p.download_max_bytes == 512 * MiB and p.download_timeout == 600.0


def test_overrides_are_checked():
    assert Policy.from_overrides(backoff=[1, 2]).backoff == (1.0, 2.0)
    with pytest.raises(TypeError, match="unknown plugin policy"):
        Policy.from_overrides(bakoff=(1,))
    with pytest.raises(ValueError):
        Policy.from_overrides(backoff=())
    with pytest.raises(ValueError):
        Policy.from_overrides(stop_timeout=0)
    with pytest.raises(ValueError):
        Policy.from_overrides(max_frame=0)
    with pytest.raises(ValueError):
        Policy.from_overrides(cpu_limit=-1)


def crash(policy, now, ran=1.0):
    policy.on_start(now - ran)
    return policy.on_failure(now)


def test_backoff_sequence_then_fatal():
    rp = RestartPolicy(Policy(max_failures=6))
    delays = [crash(rp, t * 100.0) for t in range(1, 6)]
    assert [d.delay for d in delays] == [0.0, 10.0, 30.0, 60.0, 60.0]
    assert [d.failures for d in delays] == [1, 2, 3, 4, 5]
    assert not any(d.fatal for d in delays)
    last = crash(rp, 700.0)
    assert last.fatal and last.failures == 6


def test_a_long_healthy_run_forgives_earlier_failures():
    rp = RestartPolicy(Policy())
    for t in (10.0, 20.0, 30.0):
        crash(rp, t)
    assert rp.failures == 3
    d = crash(rp, 1000.0, ran=300.0)
    assert d.failures == 1 and d.delay == 0.0


def test_check_healthy_resets_while_running():
    rp = RestartPolicy(Policy())
    crash(rp, 10.0)
    crash(rp, 20.0)
    rp.on_start(100.0)
    assert rp.check_healthy(399.0) is False and rp.failures == 2
    assert rp.check_healthy(400.0) is True and rp.failures == 0
    assert rp.check_healthy(500.0) is False  # nothing left to forgive


def test_spawn_failure_counts_without_a_start():
    rp = RestartPolicy(Policy(max_failures=2))
    assert rp.on_failure(5.0).delay == 0.0
    assert rp.on_failure(6.0).fatal


def test_reset():
    rp = RestartPolicy(Policy(max_failures=2))
    crash(rp, 1.0)
    rp.reset()
    assert crash(rp, 2.0).failures == 1


def test_cpu_limit_must_be_sustained_for_the_window():
    ev = LimitEvaluator(cpu_limit=0.5, rss_limit=0, window=60.0)
    assert ev.sample(0.0, 0.0, 1) is None          # first sample: no rate yet
    for t in range(10, 60, 10):                     # 90 % CPU, 10..50 s
        assert ev.sample(float(t), t * 0.9, 1) is None
    verdict = ev.sample(60.0, 54.0, 1)             # over since t=0, now 60 s
    assert verdict.startswith("cpu 90% > 50%") and "60 s" in verdict
    assert ev.cpu == pytest.approx(0.9)


def test_a_dip_below_the_limit_restarts_the_window():
    ev = LimitEvaluator(cpu_limit=0.5, rss_limit=0, window=30.0)
    cpu = 0.0
    ev.sample(0.0, cpu, 0)
    for t in (10.0, 20.0):
        cpu += 9.0
        assert ev.sample(t, cpu, 0) is None
    cpu += 1.0                                      # 10 % in 20..30
    assert ev.sample(30.0, cpu, 0) is None
    for t in (40.0, 50.0):
        cpu += 9.0
        assert ev.sample(t, cpu, 0) is None
    cpu += 9.0
    assert ev.sample(60.0, cpu, 0) is not None      # over since 30


def test_rss_limit():
    ev = LimitEvaluator(cpu_limit=0, rss_limit=100 * MiB, window=5.0)
    ev.sample(0.0, 0.0, 50 * MiB)
    assert ev.sample(1.0, 0.0, 200 * MiB) is None
    verdict = ev.sample(6.0, 0.0, 200 * MiB)
    assert verdict.startswith("rss 200 MiB > 100 MiB")


def test_zero_limits_disable():
    ev = LimitEvaluator(cpu_limit=0, rss_limit=0, window=1.0)
    ev.sample(0.0, 0.0, 0)
    for t in range(1, 10):
        assert ev.sample(float(t), t * 4.0, 10 ** 12) is None


def test_time_going_backwards_is_ignored():
    ev = LimitEvaluator(cpu_limit=0.1, rss_limit=0, window=1.0)
    ev.sample(5.0, 0.0, 0)
    assert ev.sample(5.0, 10.0, 0) is None
    assert ev.sample(4.0, 20.0, 0) is None


def test_token_bucket():
    tb = TokenBucket(rate=1000.0, burst=1000.0, now=0.0)
    assert tb.charge(0.0, 600) == 0.0
    assert tb.charge(0.0, 600) == pytest.approx(0.2)   # 200 bytes short at 1000/s
    assert tb.charge(1.0, 100) == 0.0                   # refilled (capped at burst)


def test_rate_meter():
    rm = RateMeter(100.0, 0, 0)
    assert rm.rates(110.0, 50, 1000) == (5.0, 100.0)
    assert rm.rates(120.0, 50, 3000) == (0.0, 200.0)
    assert rm.rates(120.0, 60, 3000) == (0.0, 0.0)      # no time passed: no division


def test_describe_exit():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
