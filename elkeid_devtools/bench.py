"""``./build.sh bench``: numbers, never assertions.

1. Push throughput: the agent's own RecordQueue -> Transport (grpc.aio, mutual
   TLS) -> the development AgentCenter (a separate process, ``--store counts``
   so SQLite is not what is measured), 200-byte records. Reports records/s
   and the pushing process's CPU seconds per million records, for
   ``--compression none`` and ``gzip`` in the same run (compare the ratio,
   not the absolute numbers: this machine is noisy).
2. Idle RSS: a real ``elkeid-agent run`` process connected to the development
   AgentCenter, RSS read from /proc after ``--idle-seconds`` (default 60).
"""

import argparse
import asyncio
import base64
import os
import resource
import sys
import time

from elkeid_agent import wire
from .launchers import AgentProc, DevCenterProc, wait_until
from elkeid_agent.metrics import Registry
from elkeid_agent.buffer.queue import RecordQueue
from elkeid_agent.settings import Endpoints, Settings
from elkeid_agent.transport.stream import Transport


def make_records(n, size=200):
    """n distinct serialized Records of exactly ``size`` bytes. The padding
    is base64 of random bytes: real records (paths, hashes, command lines)
    compress far worse than a run of one letter, and gzip's cost depends on
    it."""
    pad = size - len(wire.encode_record(2001, 1700000000, {"seq": "0" * 10, "pad": ""}))
    # Length prefixes grow with the padding; shrink until the total fits.
    while len(wire.encode_record(2001, 1700000000, {"seq": "0" * 10, "pad": "x" * pad})) > size:
        pad -= 1
    out = []
    noise = base64.b64encode(os.urandom(pad * 64)).decode()
    for i in range(n):
        start = (i * 7) % (len(noise) - pad)
        out.append(wire.encode_record(2001, 1700000000,
                                      {"seq": "%010d" % i, "pad": noise[start:start + pad]}))
    assert len(out[0]) == size, len(out[0])
    return out


async def _push(dc, compression, records, repeat):
    s = Settings(workdir=dc.base, compression=compression,
                 regions={"default": Endpoints(server=dc.grpc)})
    s.ca, s.cert, s.key = (os.path.join(dc.certs, n) for n in ("ca.crt", "client.crt", "client.key"))
    metrics = Registry()
    queue = RecordQueue(s.queue_max_bytes, metrics)
    header = wire.encode_header("bench-" + compression, ["10.0.0.1"], [], [], [], "bench-host",
                                "bench", "elkeid-agent")
    t = Transport(s, queue, lambda: header, lambda raw: None, metrics)
    t.start()
    await t.wait_connected(30)
    before = dc.stat()["records_total"]
    total = len(records) * repeat
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    produced = 0
    low_water = s.queue_max_bytes // 4
    while produced < total:
        if queue.bytes < low_water:
            for body in records:
                queue.put(body)
            produced += len(records)
        await asyncio.sleep(0.001)
    # stop() returns once the server ended the stream after our half-close,
    # i.e. it has read every record: that is the end of the measurement.
    await t.stop(120)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    received = dc.stat()["records_total"] - before
    if received < total:
        raise SystemExit("devcenter received %d of %d records" % (received, total))
    return {"records": total, "wall": wall, "rate": total / wall,
            "cpu_per_million": cpu / total * 1e6,
            "messages": t.stats.tx_messages, "dropped": metrics.total("queue_dropped_records")}


def bench_push(dc, n, repeat):
    records = make_records(n)
    rows = {}
    for compression in ("none", "gzip"):
        rows[compression] = asyncio.run(_push(dc, compression, records, repeat))
    return rows


def bench_idle(dc, seconds, base):
    agent = AgentProc(os.path.join(base, "idle-agent"),
                      ["--server", dc.grpc, "--agent-id", "bench-idle"] + dc.cert_args)
    try:
        wait_until(lambda: any(a.get("agent_id") == "bench-idle" for a in dc.agents()), 60,
                   0.2, "idle agent to connect")
        time.sleep(seconds)
        with open("/proc/%d/status" % agent.pid) as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        with open("/proc/%d/stat" % agent.pid) as f:
            parts = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(parts[11]) + int(parts[12])) / ticks
        return rss, cpu
    finally:
        agent.stop()


def main(argv=None):
    p = argparse.ArgumentParser(prog="elkeid-agent bench", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="distinct records per round")
    p.add_argument("--repeat", type=int, default=5, help="rounds of --records")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--skip-idle", action="store_true")
    p.add_argument("--dir", default=".bench")
    args = p.parse_args(argv)
    base = os.path.abspath(args.dir)
    dc = DevCenterProc(os.path.join(base, "devcenter"), store="counts")
    try:
        print("push: %d x 200-byte records per run, agent queue -> grpc.aio mTLS -> devcenter"
              % (args.records * args.repeat))
        rows = bench_push(dc, args.records, args.repeat)
        print("%-12s %12s %18s %10s %8s" % ("compression", "records/s", "cpu s/M records",
                                            "messages", "dropped"))
        for name, r in rows.items():
            print("%-12s %12.0f %18.2f %10d %8d" % (name, r["rate"], r["cpu_per_million"],
                                                    r["messages"], r["dropped"]))
        print("ratio gzip/none: rate %.2f, cpu %.2f" % (
            rows["gzip"]["rate"] / rows["none"]["rate"],
            rows["gzip"]["cpu_per_million"] / rows["none"]["cpu_per_million"]))
        print("bench process max RSS: %.1f MB" % (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        if not args.skip_idle:
            rss, cpu = bench_idle(dc, args.idle_seconds, base)
            print("idle agent after %.0f s: RSS %.1f MB, CPU %.2f s total"
                  % (args.idle_seconds, rss / 1e6, cpu))
    finally:
        dc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
