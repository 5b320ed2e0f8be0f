"""Keeping XLA's per-step buffers in the process heap (glibc on Linux).

XLA on CPU allocates a training step's temporary buffer (0.7–0.9 GB at paper dims) with ``malloc``
and frees it when the step ends. glibc serves allocations above 32 MiB with a fresh ``mmap`` and
returns them with ``munmap``, so every step page-faults its whole temporary buffer back in: about
190,000 minor faults and 18 % of a paper-dims step on this project's 2-core machines
(`docs/BENCHMARKS.md`). Three glibc tunables keep the buffer in the heap from one step to the next:
one arena (XLA's worker threads allocate from the main heap, which can grow past 64 MiB), no
``mmap`` for large blocks, and no trimming of the heap's top.

glibc reads its tunables once, when the process starts, so the training CLI restarts itself with
them (`restart_with_heap_tunables`); set ``MISTER_HEAP=default`` to keep glibc's defaults. They help
XLA's few large buffers and would hurt a program that allocates from many threads at once: eager
PyTorch runs 20 % slower under them, which is why only the JAX stage uses them.
"""

from __future__ import annotations

import os
import sys

HEAP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                 "glibc.malloc.trim_threshold=68719476736")
OPT_OUT = "MISTER_HEAP"


def _is_glibc_linux() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def has_heap_tunables(env: dict[str, str]) -> bool:
    """Whether ``env`` (a process environment) already sets every one of `HEAP_TUNABLES`."""
    present = set(env.get("GLIBC_TUNABLES", "").split(":"))
    return all(t in present for t in HEAP_TUNABLES)


def with_heap_tunables(env: dict[str, str]) -> dict[str, str]:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` adds `HEAP_TUNABLES` to the caller's own (the caller's
    setting of the same tunable is replaced)."""
    names = {t.split("=")[0] for t in HEAP_TUNABLES}
    own = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=")[0] not in names]
    return {**env, "GLIBC_TUNABLES": ":".join(own + list(HEAP_TUNABLES))}


def restart_with_heap_tunables() -> None:
    """Re-executes this command line with `HEAP_TUNABLES` unless they are set, ``MISTER_HEAP=default``
    asks for glibc's defaults, or the C library is not glibc. Call it first thing in a ``__main__``
    block, never from a library function: it replaces the running process."""
    if os.environ.get(OPT_OUT) == "default" or has_heap_tunables(os.environ) or not _is_glibc_linux():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_heap_tunables(dict(os.environ)))
