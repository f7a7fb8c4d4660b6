# Forks a grandchild that ignores SIGTERM and holds the record pipe open,
# reports both pids, then (DETAIL "exit") exits at once or (otherwise) waits
# for the task pipe to close and exits - leaving the grandchild behind.
import os
import signal
import time

from elkeid_agent import wire

r, w = os.pipe()
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.close(r)
    os.write(w, b"x")
    while True:
        time.sleep(3600)
os.close(w)
os.read(r, 1)  # the grandchild is running and has SIGTERM ignored
os.write(4, wire.frame(wire.encode_record(7000, 0, {"pid": str(os.getpid()),
                                                    "grandchild": str(child)})))
if os.environ.get("DETAIL") == "exit":
    os._exit(0)
while os.read(3, 65536):
    pass
os._exit(0)
