"""Keep freed host memory in the process for the next training step (``trainer.retain_host_memory``).

Why: glibc serves large blocks (one activation of the max-pool Conv4 over an 80-image episode is 16 MB) with fresh
``mmap`` calls and hands the top of its heap back to the kernel after frees, so a step can page-fault its whole
working set in again. On the 2-core CPU a ProtoNet step on the max-pool Conv4 took 0 to 294,000 minor faults,
depending on how the heap happened to lie, and the runs that hit them were up to 19% slower. With every block
taken from the heap and the heap never trimmed, it took 0 to 980 in every run. The cost is that the process keeps
its peak footprint until it exits, which a training job reaches anyway.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
# One arena: threads started later (task threads) allocate from the main heap too, which the other settings govern;
# with an arena per thread, task threads page-fault their activations back in every step. Threads that allocated
# before this call keep their own arenas (MALLOC_ARENA_MAX=1 at startup covers those too). Measured page faults
# and throughput with and without: docs/performance.md, "Host memory".
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 * 2**20))


def retain_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory for reuse; False where the C library has no ``mallopt``
    (macOS, Windows, musl), which then allocates as it always does."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
