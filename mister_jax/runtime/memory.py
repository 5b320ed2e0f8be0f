"""The process's freed heap handed back to the operating system (glibc only).

XLA's compiler frees most of what it allocates, but glibc keeps freed heap pages mapped for later
allocations. Trimming them after a compile keeps compiling and training from adding up in the peak
memory of the process (docs/BENCHMARKS.md, "compile before the state exists + malloc_trim").
"""

from __future__ import annotations

import ctypes


def release_free_heap() -> None:
    """Returns the heap's free pages to the OS with glibc's ``malloc_trim``; does nothing elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory stays with the process, which only raises its peak
