# Says it is ready, then writes 1 KiB lines to stderr forever.
import os
import sys
import time

from elkeid_agent import wire

os.write(4, wire.frame(wire.encode_record(7000, 0, {"pid": str(os.getpid())})))
line = "x" * 1023 + "\n"
while True:
    for _ in range(10):
        sys.stderr.write(line)
    sys.stderr.flush()
    time.sleep(0.01)
