# Says it is ready, then burns a whole core.
import os

from elkeid_agent import wire

os.write(4, wire.frame(wire.encode_record(7000, 0, {"pid": str(os.getpid())})))
n = 0
while True:
    n += 1
