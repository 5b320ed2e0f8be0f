"""The training CLI's malloc tunable: how it is set, and that large buffers then fault in huge pages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mister_jax.host_memory import MALLOC_TUNABLES, OPT_OUT, has_malloc_tunables, with_malloc_tunables

ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_pages_possible() -> bool:
    """glibc 2.35+ (the tunable) and transparent huge pages in mode ``madvise`` (``always`` needs no advice)."""
    if not GLIBC or not THP.exists():
        return False
    major, minor = (int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
    return (major, minor) >= (2, 35) and "[madvise]" in THP.read_text()


# Allocates and fills a 256 MiB buffer with malloc; prints the minor page faults it took.
FAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
libc.free(p)
"""

RESTART = """
import os
from mister_jax.host_memory import restart_with_huge_pages
restart_with_huge_pages()
print(os.environ.get("GLIBC_TUNABLES"))
"""


def _child(code: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}


def test_the_tunable_is_added_to_the_callers_own():
    env = with_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0"})
    entries = env["GLIBC_TUNABLES"].split(":")
    assert entries[0] == "glibc.malloc.tcache_count=0"
    assert "glibc.malloc.hugetlb=0" not in entries
    assert has_malloc_tunables(env) and not has_malloc_tunables({})
    assert with_malloc_tunables({})["GLIBC_TUNABLES"] == ":".join(MALLOC_TUNABLES)


@pytest.mark.skipif(not _huge_pages_possible(), reason="needs glibc 2.35+ and transparent huge pages on madvise")
def test_a_large_buffer_faults_in_huge_pages_under_the_tunable():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = int(_child(FAULTS, _clean_env()))
    tuned = int(_child(FAULTS, with_malloc_tunables(_clean_env())))
    assert default > 0.9 * pages  # one fault per 4 KiB page
    assert tuned < 0.1 * pages  # one per 2 MiB page, where the kernel has them


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_the_cli_restarts_itself_with_the_tunable_unless_told_not_to():
    assert has_malloc_tunables({"GLIBC_TUNABLES": _child(RESTART, _clean_env())})
    assert _child(RESTART, {**_clean_env(), OPT_OUT: "default"}) == "None"
