# Writes valid 200-byte records as fast as the pipe takes them; never reads tasks.
import os

from elkeid_agent import wire

os.write(4, wire.frame(wire.encode_record(7000, 0, {"pid": str(os.getpid())})))
body = wire.encode_record(7300, 1, {"pad": "f" * 170})
chunk = wire.frame(body) * 1000
while True:
    os.write(4, chunk)
