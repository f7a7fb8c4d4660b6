"""The C allocator's policy for large buffers (glibc ``mallopt``).

Every burst a plugin writes arrives in a fresh pipe-read buffer (up to
1 MiB) and leaves as a fresh PackagedData message (up to 2 MiB). glibc
serves such sizes with ``mmap`` and, after each ``free``, moves its
threshold to the size just freed, which a shrunk read buffer keeps below
the next request: every burst paid mmap + page faults on each touched page
+ mremap + munmap (strace: ~5 of each per second at 5,000 records/s). Fixed
thresholds keep these buffers on the heap, where freed pages are reused
(~10-15 % less agent CPU per record at 5,000 records/s, <1 MB more RSS;
docs/performance.md).
"""

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024   # above the largest read buffer and message
TRIM_THRESHOLD = 8 * 1024 * 1024   # freed heap kept for the next burst
_OPERATOR_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_large_buffers_on_heap(environ=os.environ):
    """Apply the thresholds; False when the libc has no ``mallopt`` (musl)
    or the operator set them (environment or GLIBC_TUNABLES)."""
    if any(k in environ for k in _OPERATOR_KNOBS) or \
            "threshold" in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
