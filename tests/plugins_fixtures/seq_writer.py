# Writes fd 4 records of type 7400 carrying a sequence number ("seq"), at
# DETAIL's "rate" records/s, while the file named by "go" exists. It resumes
# after the last seq it wrote, which it keeps in "progress" ({"sent": N}:
# records 0..N-1 were written to the pipe), so a restarted plugin continues
# the sequence instead of repeating it.
import json
import os
import time

from elkeid_agent import wire

detail = json.loads(os.environ.get("DETAIL") or "{}")
rate = float(detail.get("rate", 1000))
progress = detail["progress"]
try:
    with open(progress) as f:
        seq = json.load(f)["sent"]
except (OSError, ValueError, KeyError):
    seq = 0
pad = "p" * 150
tick = 0.02
owed = 0.0
while True:
    if not os.path.exists(detail["go"]):
        owed = 0.0
        time.sleep(tick)
        continue
    owed += rate * tick
    n = int(owed)
    owed -= n
    if n:
        now = int(time.time())
        os.write(4, b"".join(wire.frame(wire.encode_record(7400, now, {"seq": str(seq + i),
                                                                       "pad": pad}))
                             for i in range(n)))
        seq += n
        tmp = progress + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"sent": seq}, f)
        os.replace(tmp, progress)
    time.sleep(tick)
