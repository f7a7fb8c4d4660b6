"""runtime/alloc.py: large buffers stay on the heap once the thresholds are
set (observed through glibc's own count of mmapped blocks, in a fresh
interpreter each time)."""

import subprocess
import sys

from elkeid_devtools.launchers import ROOT, _env

PROBE = r"""
import ctypes, sys
from elkeid_agent.runtime.alloc import keep_large_buffers_on_heap

class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

mallinfo = ctypes.CDLL(None).mallinfo
mallinfo.restype = MallInfo
applied = keep_large_buffers_on_heap() if sys.argv[1] == "tuned" else None
before = mallinfo().hblks
buf = bytearray(1 << 20)   # a pipe read's worth
print(applied, mallinfo().hblks - before)
"""


def probe(mode, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=_env(env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.returncode == 0, out.stdout
    applied, new_mmaps = out.stdout.decode().split()
    return applied, int(new_mmaps)


def test_a_1_mib_buffer_is_mmapped_by_default_and_on_the_heap_once_tuned():
    assert probe("default") == ("None", 1)
    assert probe("tuned") == ("True", 0)


def test_the_operators_own_malloc_settings_win():
    assert probe("tuned", {"MALLOC_MMAP_THRESHOLD_": "65536"}) == ("False", 1)
