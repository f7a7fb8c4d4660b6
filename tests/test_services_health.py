"""services.health: verdicts and per-check statuses from observations."""

from elkeid_agent.services.config import HealthCheck
from elkeid_agent.services.health import (DEAD, HEALTHY, HTTP_FAILED, NO_HEARTBEAT, OVER_LIMIT,
                                          HealthEvaluator)

MiB = 1024 * 1024


def test_heartbeat_timeout_counts_from_start_then_from_each_heartbeat():
    h = HealthEvaluator(HealthCheck(heartbeat_timeout=90, http_endpoint=""), started_at=100)
    assert h.verdict(150).state == HEALTHY and h.summary(150) == "starting"
    assert h.checks(150)["heartbeat"] == "waiting"
    v = h.verdict(191)
    assert v.state == NO_HEARTBEAT and "since start" in v.reason
    h.heartbeat(180, "running")
    assert h.verdict(191).healthy and h.summary(191) == HEALTHY
    assert h.checks(200)["heartbeat"] == "ok"
    assert h.verdict(271).state == NO_HEARTBEAT
    assert h.checks(280)["heartbeat"] == "late by 10 s"


def test_heartbeat_off_and_dead():
    h = HealthEvaluator(HealthCheck(heartbeat_timeout=0), started_at=0)
    assert h.verdict(10 ** 6).healthy and h.checks(0)["heartbeat"] == "off"
    h.exited("exited with code 3")
    v = h.verdict(1)
    assert v.state == DEAD and v.reason == "exited with code 3"


def test_http_probe_fails_only_after_consecutive_failures():
    h = HealthEvaluator(HealthCheck(heartbeat_timeout=0, http_endpoint="http://127.0.0.1:1/"),
                        started_at=0)
    assert h.checks(0)["http"] == "waiting"
    h.probe(1, False, "connection refused")
    h.probe(2, False, "connection refused")
    assert h.verdict(2).healthy and h.checks(2)["http"].startswith("failing (2)")
    h.probe(3, True)
    h.probe(4, False, "HTTP 500")
    h.probe(5, False, "HTTP 500")
    h.probe(6, False, "HTTP 500")
    v = h.verdict(6)
    assert v.state == HTTP_FAILED and "3 times" in v.reason and "HTTP 500" in v.reason


def test_resources_over_threshold_for_the_duration():
    h = HealthEvaluator(HealthCheck(heartbeat_timeout=0, cpu_threshold=50,
                                    memory_threshold=100 * MiB,
                                    threshold_duration=60), started_at=0)
    h.resources(0, 0.0, 10 * MiB)
    h.resources(30, 27.0, 10 * MiB)    # 90 % of a core
    assert h.verdict(30).healthy and h.checks(30)["resources"] == "over threshold"
    h.resources(60, 54.0, 10 * MiB)
    assert h.verdict(60).state == OVER_LIMIT and "cpu 90%" in h.verdict(60).reason
    h.clear_over_limit()
    h.resources(90, 54.5, 10 * MiB)    # back under: the period ends
    assert h.verdict(90).healthy and h.checks(90)["resources"] == "ok"
    for t in (120, 150, 180):
        h.resources(t, 54.5, 200 * MiB)
    assert h.verdict(180).state == OVER_LIMIT and "rss 200 MiB" in h.verdict(180).reason
