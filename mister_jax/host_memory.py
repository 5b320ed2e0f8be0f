"""Transparent huge pages for XLA's large host buffers (glibc on Linux).

XLA on CPU allocates every training step's outputs and temporary buffer (large at paper dims) with
``malloc`` and frees them when the step ends. glibc serves allocations above its mmap threshold with a
fresh ``mmap``, so each step maps its buffers anew and the kernel faults them in one base page at a
time, each fault paying the virtual machine's exit. The glibc tunable ``glibc.malloc.hugetlb=1``
(glibc 2.35+) makes ``malloc`` advise transparent huge pages on those mappings: the same buffer then
faults in huge pages, far fewer faults, at no cost in resident memory (docs/BENCHMARKS.md measures both).

glibc reads its tunables once, when the process starts, so the training CLI restarts itself with
the tunable (`restart_with_huge_pages`); set ``MISTER_HUGEPAGES=default`` to keep glibc's defaults.
Where the kernel's transparent huge pages are disabled or glibc is older, the tunable does nothing.
"""

from __future__ import annotations

import os
import sys

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
OPT_OUT = "MISTER_HUGEPAGES"


def _is_glibc_linux() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def has_malloc_tunables(env: dict[str, str]) -> bool:
    """Whether ``env`` (a process environment) already sets every one of `MALLOC_TUNABLES`."""
    present = set(env.get("GLIBC_TUNABLES", "").split(":"))
    return all(t in present for t in MALLOC_TUNABLES)


def with_malloc_tunables(env: dict[str, str]) -> dict[str, str]:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` adds `MALLOC_TUNABLES` to the caller's own (the
    caller's setting of the same tunable is replaced)."""
    names = {t.split("=")[0] for t in MALLOC_TUNABLES}
    own = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=")[0] not in names]
    return {**env, "GLIBC_TUNABLES": ":".join(own + list(MALLOC_TUNABLES))}


def restart_with_huge_pages() -> None:
    """Re-executes this command line with `MALLOC_TUNABLES` unless they are set, ``MISTER_HUGEPAGES=default``
    asks for glibc's defaults, or the C library is not glibc. Call it first thing in a ``__main__``
    block, never from a library function: it replaces the running process."""
    if os.environ.get(OPT_OUT) == "default" or has_malloc_tunables(os.environ) or not _is_glibc_linux():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_malloc_tunables(dict(os.environ)))
