"""RecordPipe (plugins/pipes.py) with a real queue: when a read counts as a
whole burst that may leave without the batching delay."""

import asyncio
import types

from elkeid_agent import wire
from elkeid_agent.buffer.queue import NORMAL, RecordQueue
from elkeid_agent.metrics import Registry
from elkeid_agent.plugins.pipes import BURST_BYTES, RecordPipe
from elkeid_agent.plugins.policy import Policy


def frames(total):
    body = wire.encode_record(2001, 1700000000, {"pad": "x" * 180})
    one = wire.frame(body)
    return one * (total // len(one) + 1)


class FakeTransport:
    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def pipe_and_queue():
    queue = RecordQueue(64 * 1024 * 1024, Registry())
    runner = types.SimpleNamespace(
        discarding=False, policy=Policy(), queue=queue, metrics=Registry(), name="p",
        tx_records=0, tx_bytes=0, high_water=48 * 1024 * 1024,
        protocol_violation=lambda text: None)
    pipe = RecordPipe(runner, NORMAL)
    pipe.connection_made(FakeTransport())
    return pipe, queue


def test_only_a_large_read_that_drained_the_pipe_on_a_frame_boundary_is_a_burst():
    async def main():
        burst = frames(BURST_BYTES * 2)
        cases = {
            "a whole SDK flush": (burst, 1024 * 1024, True),
            "a small write": (frames(4096), 1024 * 1024, False),
            "a read as large as the read size (more may wait)": (burst, len(burst), False),
            "a burst cut inside a frame": (burst[:-7], 1024 * 1024, False),
        }
        for name, (data, read_size, expect) in cases.items():
            pipe, queue = pipe_and_queue()
            pipe.transport.max_size = read_size
            pipe.data_received(data)
            assert len(queue) > 0, name
            assert queue._burst_in is expect, name
    asyncio.run(main())
