"""runtime.tasks.TaskOwner: no long-lived task dies silently."""

import asyncio

from elkeid_agent.metrics import Registry
from elkeid_agent.runtime.tasks import TaskOwner
from elkeid_agent.state import AgentState


def run(coro):
    return asyncio.run(coro)


def test_a_crashing_task_is_counted_marked_and_restarted_until_healthy():
    async def main():
        metrics, state = Registry(), AgentState()
        owner = TaskOwner(metrics, state, restart_delays=(0.01,), healthy_after=0.2)
        calls = []
        healthy = asyncio.Event()

        async def flaky():
            calls.append(1)
            if len(calls) < 3:
                raise RuntimeError("bad input #%d" % len(calls))
            healthy.set()
            await asyncio.sleep(3600)

        owner.spawn("flaky", flaky)
        await asyncio.wait_for(healthy.wait(), 5)
        assert metrics.get("tasks_crashed", task="flaky") == 2
        assert metrics.get("tasks_restarted", task="flaky") == 2
        assert any("task flaky crashed: RuntimeError: bad input #2" in r
                   for r in state.reasons())
        for _ in range(100):  # cleared once the third run has stayed up
            if not state.reasons():
                break
            await asyncio.sleep(0.01)
        assert state.reasons() == []
        assert owner.running("flaky")
        await owner.close()
        assert not owner.running("flaky")
    run(main())


def test_a_task_that_returns_is_an_unexpected_end():
    async def main():
        metrics, state = Registry(), AgentState()
        owner = TaskOwner(metrics, state, restart_delays=(0.01,), healthy_after=60)
        runs = []

        async def quits():
            runs.append(1)
            if len(runs) > 1:
                await asyncio.sleep(3600)

        owner.spawn("quits", quits)
        for _ in range(200):
            if len(runs) == 2:
                break
            await asyncio.sleep(0.01)
        assert runs == [1, 1]
        assert metrics.get("tasks_crashed", task="quits") == 1
        assert state.reasons() == ["task quits ended unexpectedly"]
        await owner.close()
    run(main())


def test_one_shot_jobs_are_owned_and_their_failures_counted():
    async def main():
        metrics, state = Registry(), AgentState()
        owner = TaskOwner(metrics, state)

        async def fails():
            raise ValueError("boom")

        blocked = asyncio.Event()

        async def waits():
            try:
                await asyncio.sleep(3600)
            finally:
                blocked.set()

        await asyncio.gather(owner.run_once("sync", fails()), return_exceptions=True)
        assert metrics.get("jobs_failed", job="sync") == 1
        owner.run_once("long", waits())
        await asyncio.sleep(0)
        await owner.close()
        assert blocked.is_set()
    run(main())


def test_close_does_not_restart_and_cancel_stops_one_task():
    async def main():
        metrics, state = Registry(), AgentState()
        owner = TaskOwner(metrics, state, restart_delays=(0.01,))

        async def forever():
            await asyncio.sleep(3600)

        owner.spawn("a", forever)
        owner.spawn("b", forever)
        await asyncio.sleep(0)
        await owner.cancel("a")
        assert not owner.running("a") and owner.running("b")
        await owner.close()
        assert metrics.total("tasks_crashed") == 0
    run(main())


def test_the_plugin_monitor_runs_under_the_owner(tmp_path):
    from elkeid_agent.buffer.queue import RecordQueue
    from elkeid_agent.plugins.supervisor import PluginSupervisor

    async def main():
        metrics, state = Registry(), AgentState()
        owner = TaskOwner(metrics, state, restart_delays=(0.01,), healthy_after=60)
        sup = PluginSupervisor(str(tmp_path), RecordQueue(1 << 20, metrics), metrics, state,
                               owner=owner)
        rounds = []
        again = asyncio.Event()

        async def monitor():
            rounds.append(1)
            if len(rounds) == 1:
                raise RuntimeError("a bad /proc sample nobody foresaw")
            again.set()
            await asyncio.sleep(3600)

        sup._monitor_loop = monitor
        await sup.start()
        await asyncio.wait_for(again.wait(), 10)
        assert owner.running("plugin-monitor")
        assert metrics.get("tasks_crashed", task="plugin-monitor") == 1
        await sup.shutdown()
        assert not owner.running("plugin-monitor")
        await owner.close()
    run(main())
