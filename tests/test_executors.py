"""runtime.executors: one stuck kind of blocking work never starves another."""

import asyncio
import threading

import pytest

from elkeid_agent.metrics import Registry
from elkeid_agent.runtime.executors import Executors, Saturated


def test_a_stalled_kind_does_not_block_another():
    async def main():
        ex = Executors(Registry(), kinds={"download": (2, 8), "discovery": (1, 1)})
        release = threading.Event()
        stuck = [asyncio.ensure_future(ex.run("download", release.wait)) for _ in range(5)]
        # Every download thread is blocked; discovery still answers at once.
        assert await asyncio.wait_for(ex.run("discovery", lambda: 42), 5) == 42
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*stuck), 5) == [True] * 5
        ex.close()
    asyncio.run(main())


def test_errors_reach_the_caller_and_a_full_backlog_is_refused_and_counted():
    async def main():
        metrics = Registry()
        ex = Executors(metrics, kinds={"upload": (1, 1)})

        def boom():
            raise OSError(5, "Input/output error")

        with pytest.raises(OSError):
            await ex.run("upload", boom)
        release = threading.Event()
        first = asyncio.ensure_future(ex.run("upload", release.wait))
        await asyncio.sleep(0)
        # Wait until the worker holds the first job, so the next one queues.
        while ex._pools["upload"].waiting():
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(ex.run("upload", release.wait))
        await asyncio.sleep(0)
        with pytest.raises(Saturated):
            await ex.run("upload", release.wait)
        assert metrics.get("executor_saturated", kind="upload") == 1
        assert metrics.get("executor_waiting", kind="upload") == 1
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        ex.close()
    asyncio.run(main())


def test_workers_are_daemon_threads_and_close_cancels_waiting_jobs():
    async def main():
        ex = Executors(kinds={"files": (1, 4)})
        release = threading.Event()
        running = asyncio.ensure_future(ex.run("files", release.wait))
        await asyncio.sleep(0)  # let it submit, then wait until a worker holds it
        while ex._pools["files"].waiting():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(ex.run("files", release.wait))
        await asyncio.sleep(0)
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("elkeid-files"))
        ex.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, 5)
        release.set()
        assert await asyncio.wait_for(running, 5) is True
    asyncio.run(main())


def test_idle_workers_exit_and_the_next_job_starts_one():
    async def main():
        ex = Executors(kinds={"probe": (3, 8)}, idle_seconds=1.0)
        pool = ex._pools["probe"]
        release = threading.Event()
        burst = [asyncio.ensure_future(ex.run("probe", release.wait)) for _ in range(3)]
        while pool.workers() < 3:
            await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*burst), 5) == [True] * 3
        # Nothing to do for longer than idle_seconds: every worker leaves.
        def probe_threads():
            return [t for t in threading.enumerate() if t.name.startswith("elkeid-probe")]
        for _ in range(1000):
            if pool.workers() == 0 and not probe_threads():
                break
            await asyncio.sleep(0.01)
        assert pool.workers() == 0
        assert not probe_threads()
        # A later job is served by a new thread.
        assert await asyncio.wait_for(ex.run("probe", lambda: 7), 5) == 7
        assert pool.workers() == 1
        ex.close()
    asyncio.run(main())
