"""The heap tunables of the training CLI: how they are set, and that they keep large buffers resident."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mister_jax.host_memory import HEAP_TUNABLES, OPT_OUT, has_heap_tunables, with_heap_tunables

ROOT = Path(__file__).resolve().parents[1]
GLIBC_LINUX = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")

# Allocates, fills and frees a 256 MiB buffer twice; prints the minor page faults of the second time.
REFAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
def fill():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

RESTART = """
import os
from mister_jax.host_memory import restart_with_heap_tunables
restart_with_heap_tunables()
print(os.environ.get("GLIBC_TUNABLES"))
"""


def _child(code: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}


def test_tunables_are_added_to_the_callers_own():
    env = with_heap_tunables({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4"})
    entries = env["GLIBC_TUNABLES"].split(":")
    assert entries[0] == "glibc.malloc.tcache_count=0"
    assert "glibc.malloc.arena_max=4" not in entries
    assert has_heap_tunables(env) and not has_heap_tunables({})
    assert with_heap_tunables({})["GLIBC_TUNABLES"] == ":".join(HEAP_TUNABLES)


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables")
def test_a_freed_large_buffer_stays_resident_under_the_tunables():
    page = os.sysconf("SC_PAGE_SIZE")
    default = int(_child(REFAULTS, _clean_env()))
    tuned = int(_child(REFAULTS, with_heap_tunables(_clean_env())))
    assert default > 0.9 * (256 << 20) / page  # glibc's default: a fresh mmap, every page faulted again
    assert tuned < 0.01 * (256 << 20) / page


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables")
def test_the_cli_restarts_itself_with_the_tunables_unless_told_not_to():
    assert has_heap_tunables({"GLIBC_TUNABLES": _child(RESTART, _clean_env())})
    assert _child(RESTART, {**_clean_env(), OPT_OUT: "default"}) == "None"
