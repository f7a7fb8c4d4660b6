"""``python -m elkeid_devtools.spool_bench`` (part of ``./build.sh bench``):
the disk spool's write and replay throughput, as numbers (never
assertions), for each codec this build can write.

Write: the agent's path during an outage, ``RecordQueue.put`` of 200-byte
records into a queue whose stream is down, so each goes to the spool; the
spool's I/O thread writes and fsyncs as it does in the agent. Timed from
the first put until ``close`` returned (everything written and fsynced);
the producer waits whenever the spool's write backlog is full, so the rate
is what the disk and the encoder sustain.
Replay: a new spool opens the directory (the open is timed apart), then
``take_batch`` of 4096 records / 2 MiB until it is empty, each batch
settled at once as the stream does when it ages out of the replay window.
CPU is the whole process's (the I/O thread included), per record. Replay
reads come from the page cache here: a cold disk adds its read time.

Two kinds of records: ``random``, each padded with its own random bytes
(base64), so a frame compresses only as far as field names and framing
repeat (the worst case for a codec's CPU); ``redundant``, the push
benchmark's records (slices of one random text), a best case. Real records
(paths, command lines, hashes seen before) fall between.
"""

import argparse
import asyncio
import base64
import os
import shutil
import sys
import time

from elkeid_agent import wire
from elkeid_agent.buffer import spool as sp
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.metrics import Registry
from elkeid_agent.state import AgentState
from .bench import make_records as make_redundant_records


def make_random_records(n, size=200):
    """n serialized Records of ``size`` bytes, each padded with its own
    random bytes."""
    pad = size - len(wire.encode_record(2001, 1700000000, {"seq": "0" * 10, "pad": ""})) - 3
    out = []
    for i in range(n):
        text = base64.b64encode(os.urandom(pad)).decode()[:pad]
        out.append(wire.encode_record(2001, 1700000000 + i // 1000,
                                      {"seq": "%010d" % i, "pad": text}))
    return out


def _spool(directory, codec, metrics):
    return sp.Spool(directory, 4096 * sp.MiB, metrics, AgentState(), codec_name=codec)


async def _write(directory, codec, records, repeat):
    metrics = Registry()
    spool = _spool(directory, codec, metrics)
    await spool.start()
    timer = asyncio.ensure_future(spool.run())
    queue = RecordQueue(48 * sp.MiB, metrics, spool=spool)
    queue.outage(True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(repeat):
        for i in range(0, len(records), 1000):
            while not spool.available:
                await asyncio.sleep(0.001)
            for body in records[i:i + 1000]:
                queue.put(body)
            await asyncio.sleep(0)  # the I/O thread's reports come back here
    queue.save_to_spool()  # as the agent does at exit: what a busy spool left in memory
    await spool.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    timer.cancel()
    total = len(records) * repeat
    return {"rate": total / wall, "cpu_us": cpu / total * 1e6, "disk": spool.disk_bytes,
            "dropped": metrics.total("queue_dropped_records")
            + metrics.total("spool_dropped_records")}


async def _replay(directory, codec, total):
    metrics = Registry()
    spool = _spool(directory, codec, metrics)
    t0 = time.perf_counter()
    await spool.start()
    opened = time.perf_counter() - t0
    queue = RecordQueue(48 * sp.MiB, metrics, spool=spool)
    taken = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while queue.pending():
        batch = queue.take_batch(4096, 2 * sp.MiB)
        taken += len(batch)
        queue.settled(batch)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await spool.close()
    if taken != total:
        raise SystemExit("replayed %d of %d records" % (taken, total))
    return {"rate": taken / wall, "cpu_us": cpu / taken * 1e6, "open": opened}


def bench(base, codec, records, repeat):
    directory = os.path.join(base, codec)
    shutil.rmtree(directory, ignore_errors=True)
    w = asyncio.run(_write(directory, codec, records, repeat))
    r = asyncio.run(_replay(directory, codec, len(records) * repeat - w["dropped"]))
    shutil.rmtree(directory, ignore_errors=True)
    return w, r


def main(argv=None):
    p = argparse.ArgumentParser(prog="spool_bench", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="distinct records per round")
    p.add_argument("--repeat", type=int, default=3, help="rounds of --records")
    p.add_argument("--data", choices=("random", "redundant", "both"), default="both")
    p.add_argument("--dir", default=".bench/spool")
    args = p.parse_args(argv)
    base = os.path.abspath(args.dir)
    codecs = [c for c in sp.CODEC_NAMES if c != "snappy" or sp.SNAPPY is not None]
    total = args.records * args.repeat
    print("spool: %d x 200-byte records per codec, RecordQueue (stream down) -> disk spool in %s"
          % (total, base))
    print("%-10s %-7s %12s %13s %12s %14s %10s %9s %8s" % (
        "records", "codec", "write rec/s", "write us/rec", "replay rec/s", "replay us/rec",
        "disk B/rec", "open s", "dropped"))
    kinds = ("random", "redundant") if args.data == "both" else (args.data,)
    for kind in kinds:
        make = make_random_records if kind == "random" else make_redundant_records
        records = make(args.records)
        for codec in codecs:
            w, r = bench(base, codec, records, args.repeat)
            print("%-10s %-7s %12.0f %13.2f %12.0f %14.2f %10.1f %9.3f %8d" % (
                kind, codec, w["rate"], w["cpu_us"], r["rate"], r["cpu_us"], w["disk"] / total,
                r["open"], w["dropped"]))
    if sp.SNAPPY is None:
        print("(python-snappy not installed: snappy not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
