"""Ingest benchmark of the development AgentCenter itself.

Owns ``python -m elkeid_devtools.devcenter.bench``: starts ``elkeid-devcenter``
as a subprocess (port 0, a scratch directory), pushes pre-serialized
PackagedData messages at it over one mTLS Transfer stream from this process
and prints how many records per second the devcenter took in. The client
sends the same bytes over and over, so its own cost is only the gRPC write:
what is measured is the server side. Not a test: it asserts nothing about
speed, it prints a table.
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

from elkeid_agent import wire


def _env():
    # Run the devcenter from the same tree as this module, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_server(workdir, store):
    proc = subprocess.Popen(
        [sys.executable, "-m", "elkeid_devtools.devcenter", "--grpc", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--certs", os.path.join(workdir, "certs"),
         "--db", os.path.join(workdir, "dc.db"), "--store", store, "--quiet",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=None, env=_env())
    line = proc.stdout.readline().decode()
    m = re.match(r"devcenter listening grpc=(\S+) http=(\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError("devcenter did not start: %r" % line)
    # Keep draining stdout so the server never blocks on a full pipe.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, m.group(1), m.group(2)


def _records_total(http):
    with urllib.request.urlopen("http://%s/conn/stat" % http, timeout=10) as r:
        return json.loads(r.read())["data"]["records_total"]


def _server_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def _push(grpc_addr, certs_dir, message, count, compression):
    def read(name):
        with open(os.path.join(certs_dir, name), "rb") as f:
            return f.read()
    creds = grpc.ssl_channel_credentials(read("ca.crt"), read("client.key"), read("client.crt"))
    async with grpc.aio.secure_channel(
            grpc_addr, creds, options=[("grpc.ssl_target_name_override", "elkeid.com")],
            compression=compression) as channel:
        call = channel.stream_stream("/grpc.Transfer/Transfer", request_serializer=None,
                                     response_deserializer=None)()
        for _ in range(count):
            await call.write(message)
        await call.done_writing()
        # Closing the channel before the server ends the call would cancel
        # it and drop whatever is still in flight.
        code = await call.code()
        if code != grpc.StatusCode.OK:
            raise RuntimeError("Transfer ended with %s: %s" % (code, await call.details()))


def run(records, batch, size, store, gzip):
    body = wire.encode_record(2001, 1700000000, {"data": "x" * max(0, size - 16)})
    header = wire.encode_header("bench-agent", ["10.0.0.1"], [], [], [], "bench-host",
                                "1.0.0", "elkeid-agent")
    message = wire.packaged_data([body] * batch, header)
    messages = max(1, records // batch)
    total = messages * batch
    with tempfile.TemporaryDirectory(prefix="devcenter-bench-") as workdir:
        proc, grpc_addr, http = _start_server(workdir, store)
        try:
            cpu0 = _server_cpu(proc.pid)
            t0 = time.monotonic()
            compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
            asyncio.run(_push(grpc_addr, os.path.join(workdir, "certs"), message, messages,
                              compression))
            # The server ends the call after its last read, so this normally
            # succeeds at once; the loop only covers counting stragglers.
            deadline = time.monotonic() + 30
            while _records_total(http) < total and time.monotonic() < deadline:
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            got = _records_total(http)
            cpu = _server_cpu(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(30)
    return {"records": got, "record_bytes": len(body), "batch": batch,
            "message_bytes": len(message), "seconds": elapsed, "rate": got / elapsed,
            "server_cpu": cpu, "cpu_per_record_us": cpu / max(got, 1) * 1e6}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m elkeid_devtools.devcenter.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1000000)
    p.add_argument("--batch", type=int, default=2000, help="records per PackagedData")
    p.add_argument("--size", type=int, default=200, help="approximate bytes per record")
    p.add_argument("--store", choices=("counts", "full"), default="counts")
    p.add_argument("--gzip", action="store_true", help="gzip-compress messages")
    args = p.parse_args(argv)
    r = run(args.records, args.batch, args.size, args.store, args.gzip)
    print("store=%s gzip=%s" % (args.store, "yes" if args.gzip else "no"))
    print("%-10s %-8s %-6s %-10s %-8s %-12s %-10s %s" % (
        "records", "rec_B", "batch", "msg_B", "seconds", "records/s", "srv_cpu_s", "srv_us/rec"))
    print("%-10d %-8d %-6d %-10d %-8.2f %-12.0f %-10.2f %.2f" % (
        r["records"], r["record_bytes"], r["batch"], r["message_bytes"], r["seconds"],
        r["rate"], r["server_cpu"], r["cpu_per_record_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
