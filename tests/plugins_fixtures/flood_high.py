# Floods fd 5 (the high-priority pipe) with valid 200-byte records while the
# file named by DETAIL {"go": PATH} exists, about 2 MB/s; writes its progress
# ({"bytes": N, "seconds": S} since the flood began) to DETAIL's "progress".
import json
import os
import time

from elkeid_agent import wire

detail = json.loads(os.environ.get("DETAIL") or "{}")
os.write(4, wire.frame(wire.encode_record(7000, 0, {"pid": str(os.getpid())})))
chunk = wire.frame(wire.encode_record(7301, 1, {"pad": "h" * 170})) * 100
sent = 0
began = None
last_report = 0.0
while True:
    if not os.path.exists(detail["go"]):
        time.sleep(0.02)
        continue
    now = time.monotonic()
    if began is None:
        began = now
    os.write(5, chunk)
    sent += len(chunk)
    if now - last_report > 0.1:
        last_report = now
        tmp = detail["progress"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"bytes": sent, "seconds": now - began}, f)
        os.replace(tmp, detail["progress"])
    time.sleep(0.01)
