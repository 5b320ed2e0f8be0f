"""How a checkpoint's buffers reach the disk: whole buffers, with direct I/O (``O_DIRECT``) where the
filesystem allows it, bypassing the page cache.

On the project's VMs every fresh page-cache page costs a fault in the hypervisor, and the kernel soon
reclaims a checkpoint's cached pages, so a buffered write of a paper-dims checkpoint takes kernel CPU
from training every time, a direct one almost none (docs/BENCHMARKS.md, "training-state checkpoints
written from the host mirrors' buffers with direct I/O"). Direct I/O needs memory, file offsets and
sizes aligned to 4 KiB, which `mister_jax.runtime.host_mirror.HostMirror` buffers are. Where the
filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems) the same bytes go through the page
cache.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

_CHUNK = 1 << 26  # bytes per read or write call (Linux moves less than 2**31 bytes per call)


def write_buffer(path: Path, buffer: np.ndarray) -> None:
    """Writes ``buffer`` (uint8, page-aligned, a multiple of 4 KiB) to a new file ``path`` and syncs it,
    with ``O_DIRECT`` where the filesystem accepts it, else through the page cache."""
    direct = getattr(os, "O_DIRECT", 0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    view = memoryview(buffer).cast("B")
    for mode in (flags | direct, flags) if direct else (flags,):
        try:
            fd = os.open(path, mode, 0o644)
        except OSError as err:
            if mode != flags and err.errno == errno.EINVAL:
                continue  # the filesystem does not do direct I/O (e.g. tmpfs)
            raise
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done : done + _CHUNK])
            os.fsync(fd)
            return
        except OSError as err:
            if mode == flags or err.errno != errno.EINVAL:
                raise  # EINVAL on a direct write: the filesystem took the flag but not the I/O; retry buffered
        finally:
            os.close(fd)


def read_buffer(path: Path, buffer: np.ndarray) -> None:
    """Fills ``buffer`` with the file ``path``, which must have exactly its size (ValueError otherwise)."""
    view = memoryview(buffer).cast("B")
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = f.readinto(view[done : done + _CHUNK])
            if not n:
                raise ValueError(f"{path.name} holds {done} bytes, {len(view)} expected")
            done += n
        if f.read(1):
            raise ValueError(f"{path.name} is longer than the {len(view)} bytes expected")


def sync_directory(path: Path) -> None:
    """Syncs the directory ``path`` itself, so that a rename inside it is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
