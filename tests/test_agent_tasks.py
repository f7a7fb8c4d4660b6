"""Agent tasks do their blocking file work off the loop: 1051's fsync of
specified_env runs in the files executor while the loop keeps its timers."""

import asyncio
import threading

from elkeid_agent import settings as settings_mod
from elkeid_agent.control.agent_tasks import AgentTasks
from elkeid_agent.metrics import Registry
from elkeid_agent.pb import grpc_pb2 as pb
from elkeid_agent.runtime.executors import Executors
from elkeid_agent.settings import Settings


class NoTransport:
    channel = None

    def reconnect(self):
        pass


def test_set_metadata_persists_off_the_loop(tmp_path):
    release = threading.Event()
    writing = threading.Event()
    threads = []

    def slow_write(workdir, changes):
        threads.append(threading.current_thread().name)
        writing.set()
        release.wait(60)
        settings_mod.write_env_file(workdir, changes)

    async def main():
        loop = asyncio.get_running_loop()
        s = Settings(workdir=str(tmp_path))
        executors = Executors(Registry())
        failures = []
        tasks = AgentTasks(s, NoTransport(), Registry(), lambda t, m: failures.append(m),
                           lambda r: None, executors, write_env=slow_write)
        ticks = []

        def tick():
            ticks.append(1)
            loop.call_later(0.01, tick)
        tick()
        tasks.handle(pb.Task(data_type=1051, object_name="elkeid-agent", token="t-m",
                             data='{"idc": "dc-9"}'))
        while not writing.is_set():
            await asyncio.sleep(0.01)
        seen = len(ticks)
        deadline = loop.time() + 30
        while len(ticks) < seen + 5 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        held = len(ticks) - seen
        # Not applied before it is on disk.
        assert s.idc == ""
        release.set()
        while s.idc != "dc-9" and loop.time() < deadline:
            await asyncio.sleep(0.01)
        executors.close()
        return held, s, failures

    try:
        held, s, failures = asyncio.run(main())
    finally:
        release.set()
    assert held >= 5
    assert s.idc == "dc-9" and not failures
    assert threads and threads[0].startswith("elkeid-files")
    assert "specified_idc=dc-9\n" in (tmp_path / "specified_env").read_text()


def test_set_metadata_that_cannot_be_persisted_is_a_5100(tmp_path):
    async def main():
        s = Settings(workdir=str(tmp_path / "missing" / "dir"))
        executors = Executors(Registry())
        failures = []
        tasks = AgentTasks(s, NoTransport(), Registry(),
                           lambda t, m: failures.append((t, m)), lambda r: None, executors)
        tasks.handle(pb.Task(data_type=1051, object_name="elkeid-agent", token="t-x",
                             data='{"idc": "dc-1"}'))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not failures and loop.time() < deadline:
            await asyncio.sleep(0.01)
        executors.close()
        return s, failures

    s, failures = asyncio.run(main())
    assert failures and failures[0][0] == "t-x"
    assert failures[0][1].startswith("cannot persist metadata")
    assert s.idc == ""
