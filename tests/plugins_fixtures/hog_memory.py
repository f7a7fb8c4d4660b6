# Allocates DETAIL megabytes (touching every page), says ready, then sleeps.
import os
import time

from elkeid_agent import wire

size = int(os.environ.get("DETAIL") or "100") * 1024 * 1024
hog = bytearray(size)
for i in range(0, size, 4096):
    hog[i] = 1
os.write(4, wire.frame(wire.encode_record(7000, 0, {"pid": str(os.getpid())})))
while True:
    time.sleep(3600)
