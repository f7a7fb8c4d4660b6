"""The benchmark table's load plugin: writes records the way Elkeid's Go SDK
writes them and stamps each with the wall-clock time of the write.

Owns the load side of ``perf_table``: a pool of distinct 200-byte records
(random base64 padding, so nothing compresses unrealistically well), sent
in the Go SDK's pattern - one ``write`` of everything accumulated every
200 ms, and one ``write`` whenever 512 KiB have accumulated in between -
without the SDK's per-record Python work, so the plugin is not what limits
a measurement of the agent. Every record carries ``stamp``, the
``time.time_ns()`` of the write it left in (zeros during the warm-up, which
the devcenter's ``--store latency`` skips): the devcenter's arrival time
minus the stamp is the time the record spent in the agent (and on
loopback).

DETAIL (JSON): ``rate`` records/s (-1: as fast as the pipe takes them),
``size`` bytes per record (default 200), ``progress`` a file rewritten
every 200 ms with {"pid", "written", "cpu", "done"} (records in the pipe
so far, this process's CPU seconds, true once it stopped for good),
``stamp_after`` seconds of warm-up before stamps start, ``data_type``
(default 9100).

``install(workdir, name)`` puts it where the agent looks for plugin ``name``;
``python -m elkeid_devtools.bench_plugin --dry SECONDS`` writes to /dev/null
and prints the rate this machine can produce (the ceiling of any
measurement made with it).
"""

import argparse
import base64
import hashlib
import json
import os
import signal
import struct
import sys
import threading
import time

from elkeid_agent import wire

DATA_TYPE = 9100
STAMP_FIELD = "stamp"
STAMP_WIDTH = 19
FLUSH_INTERVAL = 0.2        # the Go SDK's flush ticker
BUFFER_BYTES = 512 * 1024   # the Go SDK's buffer: a write when it is full
POOL = 4096
_U32 = struct.Struct("<I")
_NO_STAMP = b"0" * STAMP_WIDTH


class Burst:
    """Frames of a pool of distinct records whose stamp bytes are filled in
    by one ``bytes.join``: a burst costs C time, not a Python loop per record."""

    def __init__(self, size=200, data_type=DATA_TYPE, timestamp=None):
        timestamp = int(time.time()) if timestamp is None else timestamp
        pad = max(0, size - 40)
        for _ in range(4):  # length prefixes grow with the pad: converge on ``size``
            pad = max(0, pad + size - len(wire.encode_record(
                data_type, timestamp, {"pad": "x" * pad, STAMP_FIELD: _NO_STAMP.decode()})))
        heads, tails = [], []
        noise = base64.b64encode(os.urandom(POOL * 3 // 4 + pad)).decode()
        for i in range(POOL):
            body = wire.encode_record(data_type, timestamp, {
                "pad": noise[i:i + pad], STAMP_FIELD: _NO_STAMP.decode()})
            frame = _U32.pack(len(body)) + body
            at = frame.rfind(_NO_STAMP)
            heads.append(frame[:at])
            tails.append(frame[at + STAMP_WIDTH:])
        self.frame_bytes = len(frame)
        self.per_buffer = max(1, BUFFER_BYTES // self.frame_bytes)
        self.heads, self.tails = heads, tails
        # glue[j] ends record j-1 and begins record j (pool indices mod POOL),
        # long enough that any burst of per_buffer records is one slice.
        self.glue = [tails[(j - 1) % POOL] + heads[j % POOL]
                     for j in range(POOL + self.per_buffer + 1)]
        self.next = 0

    def make(self, n, stamp):
        """``n`` frames (n <= per_buffer) stamped ``stamp`` (bytes)."""
        s = self.next
        parts = [self.heads[s]]
        parts += self.glue[s + 1:s + n]
        parts.append(self.tails[(s + n - 1) % POOL])
        self.next = (s + n) % POOL
        return stamp.join(parts)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Producer:
    def __init__(self, fd, rate, burst, stamp_after=0.0, clock=time.monotonic):
        self.fd = fd
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.stamp_from = clock() + stamp_after
        self.written = 0

    def _send(self, n):
        now = self.clock()
        stamp = b"%019d" % time.time_ns() if now >= self.stamp_from else _NO_STAMP
        _write_all(self.fd, self.burst.make(n, stamp))
        self.written += n

    def run(self, stop, on_tick=lambda: None):
        """Produce until ``stop`` is set; ``on_tick`` every flush interval."""
        per_buffer = self.burst.per_buffer
        started = last_flush = self.clock()
        if self.rate < 0:
            while not stop.is_set():
                self._send(per_buffer)
                if self.clock() - last_flush >= FLUSH_INTERVAL:
                    last_flush = self.clock()
                    on_tick()
            return
        # Wake when the next buffer would be full or the ticker fires.
        nap = min(FLUSH_INTERVAL, per_buffer / self.rate) if self.rate else FLUSH_INTERVAL
        while not stop.wait(max(0.0, nap - (self.clock() - last_flush) % nap)):
            now = self.clock()
            due = int((now - started) * self.rate) - self.written
            while due >= per_buffer:
                self._send(per_buffer)
                due -= per_buffer
            if now - last_flush >= FLUSH_INTERVAL - 1e-3:
                if due > 0:
                    self._send(due)
                last_flush = now
                on_tick()


def _cpu_seconds():
    t = os.times()
    return t.user + t.system


def _report(path, written, done=False):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "written": written, "cpu": _cpu_seconds(),
                   "done": done}, f)
    os.replace(tmp, path)


def run_plugin():
    """The plugin's main: fd 3 tasks (read until the agent closes it), fd 4 records."""
    from elkeid_agent.sdk import Client
    detail = json.loads(os.environ.get("DETAIL") or "{}")
    client = Client(flusher=False)
    stop = threading.Event()

    def read_tasks():
        for _task in client.tasks():
            pass
        stop.set()

    threading.Thread(target=read_tasks, daemon=True).start()
    # The agent's SIGTERM ends the plugin like the task pipe's close: the
    # final count still gets written.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    burst = Burst(int(detail.get("size", 200)), int(detail.get("data_type", DATA_TYPE)))
    producer = Producer(4, float(detail["rate"]), burst, float(detail.get("stamp_after", 0)))
    progress = detail["progress"]
    _report(progress, 0)
    try:
        producer.run(stop, lambda: _report(progress, producer.written))
    except OSError:  # the agent closed the record pipe
        pass
    _report(progress, producer.written, done=True)
    return 0


def script_bytes(interpreter=None):
    """The plugin executable: this interpreter, this checkout on sys.path
    (the agent gives plugins a minimal environment)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return ("#!%s\nimport sys\nsys.path.insert(0, %r)\n"
            "from elkeid_devtools.bench_plugin import run_plugin\n"
            "raise SystemExit(run_plugin())\n"
            % (interpreter or sys.executable, root)).encode()


def install(workdir, name, interpreter=None):
    """Write the executable as <workdir>/plugin/<name>/<name>; returns its sha256."""
    data = script_bytes(interpreter)
    directory = os.path.join(workdir, "plugin", name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o700)
    return hashlib.sha256(data).hexdigest()


def dry_rate(seconds=1.0, size=200):
    """Records/s this process produces into /dev/null (no reader to wait for)."""
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        producer = Producer(fd, -1, Burst(size))
        stop = threading.Event()
        timer = threading.Timer(seconds, stop.set)
        t0 = time.monotonic()
        timer.start()
        producer.run(stop)
        return producer.written / (time.monotonic() - t0)
    finally:
        os.close(fd)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m elkeid_devtools.bench_plugin")
    p.add_argument("--dry", type=float, default=1.0, metavar="SECONDS",
                   help="produce into /dev/null for this long and print records/s")
    args = p.parse_args(argv)
    print("%.0f records/s" % dry_rate(args.dry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
