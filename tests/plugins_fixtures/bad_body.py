# A good record, then a frame whose body is not a Record (a length-delimited
# field running past the end: no protobuf parser takes it), then a good
# record that must never reach the server.
import os
import time

from elkeid_agent import wire

before = wire.frame(wire.encode_record(7110, 1, {"when": "before", "pid": str(os.getpid())}))
bad = wire.frame(b"\x1a\x05ab")
after = wire.frame(wire.encode_record(7111, 2, {"when": "after"}))
os.write(4, before + bad + after)
while True:
    time.sleep(3600)
