"""Keep freed tensor memory in the process instead of handing it back to the kernel at every free.

glibc serves allocations above its mmap threshold (128 KiB at first, raised adaptively) with a fresh
``mmap`` and unmaps them on free, so a training step that allocates a few ~1 MB flat vectors pays page
faults on every touch of every new vector. Pinning the threshold at 64 MiB and raising the trim
threshold makes those allocations reuse heap memory. This is the CPU allocator tuning PyTorch's
performance guide reaches with jemalloc/tcmalloc, done with glibc's own ``mallopt`` and no preload.
Measured on the width-256 ring8 model: ``x − η·g`` on the flat vector 0.52 → 0.17 ms.

It also caps glibc at ``ARENA_MAX`` malloc arenas (its default is 8 per core). With the mmap threshold
raised, the chunks gRPC's threads receive live in per-thread arenas that glibc neither shares nor trims,
so every burst of concurrent streams left an agent a few MiB larger: the fault suite's waves of 150
stalled pushes raised a training agent's settled RSS by 4.9–7.4 MiB per wave with the default arenas
(4 waves, 4 runs; ``malloc_trim`` every 2 s did not release it) and by 0–3 MiB per wave with two
(``tests/faults.py``, stalled scenario). The environment variable ``MALLOC_ARENA_MAX``, when set, wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated large tensor allocations; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    arenas = True if "MALLOC_ARENA_MAX" in os.environ else bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
    return (
        bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        and arenas
    )
