# A good record, then 10 bytes of a frame that claims 100, then exit.
import os
import struct

from elkeid_agent import wire

good = wire.frame(wire.encode_record(7200, 1, {"pid": str(os.getpid())}))
os.write(4, good + struct.pack("<I", 100) + b"0123456789")
os._exit(0)
