# Numbered load for the fault tests (tests/test_faults.py). DETAIL is JSON:
# {"rate": records/s, "progress": DIR, "stop": PATH, "pad": N}.
#
# Writes DataType 7400 records with the fields run (this process's own id),
# seq (0, 1, 2, ... within the run) and pad (N bytes), through the SDK's
# Client: buffered as Elkeid's Go SDK buffers, 512 KiB flushed when full and
# every 200 ms. Every 200 ms it also flushes itself and then writes
# DIR/<run>.json {"run", "written", "done"}: seq 0 .. written-1 are in the
# pipe, so whatever of them the server never counts, the agent lost. Stops
# producing once the file STOP exists (then "done" is true), and exits when
# the agent closes the task pipe.
import json
import os
import threading
import time

from elkeid_agent import wire
from elkeid_agent.sdk import Client, ClientClosed

DATA_TYPE = 7400
TICK = 0.01
REPORT_EVERY = 0.2

detail = json.loads(os.environ.get("DETAIL") or "{}")
rate = float(detail["rate"])
pad = "p" * int(detail.get("pad", 40))
stop_path = detail["stop"]
run = "%d-%d" % (time.time() * 1000, os.getpid())
progress = os.path.join(detail["progress"], run + ".json")

client = Client()
closing = threading.Event()


def read_tasks():
    for _task in client.tasks():
        pass
    closing.set()


def report(written, done):
    tmp = progress + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"run": run, "written": written, "done": done}, f)
    os.replace(tmp, progress)


threading.Thread(target=read_tasks, daemon=True).start()
sent = 0
started = last_report = time.monotonic()
report(0, False)
try:
    while not closing.is_set():
        now = time.monotonic()
        if os.path.exists(stop_path):
            client.flush()
            report(sent, True)
            closing.wait()
            break
        due = int((now - started) * rate)
        if due - sent > rate:
            # Held back (the agent paused the pipe) for over a second: go on
            # at the rate from here instead of bursting to catch up.
            started = now - sent / rate
            due = sent
        ts = int(time.time())
        while sent < due:
            client.send_raw(wire.encode_record(DATA_TYPE, ts, {"run": run, "seq": str(sent),
                                                               "pad": pad}))
            sent += 1
        if now - last_report >= REPORT_EVERY:
            client.flush()
            report(sent, False)
            last_report = now
        time.sleep(TICK)
except ClientClosed:
    pass
client.close()
