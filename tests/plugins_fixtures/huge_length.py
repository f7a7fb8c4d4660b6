# A good record, then a frame length of 0xFFFFFFFF, then a good record that
# must never reach the server.
import os
import time

from elkeid_agent import wire

before = wire.frame(wire.encode_record(7100, 1, {"when": "before", "pid": str(os.getpid())}))
after = wire.frame(wire.encode_record(7101, 2, {"when": "after"}))
os.write(4, before + b"\xff\xff\xff\xff" + b"junk" * 4 + after)
while True:
    time.sleep(3600)
