"""Files written whole or not at all: a temporary name beside the target, then renamed over it.

A crash or a full disk mid-write leaves the previous file (or none), never a truncated one. This is
the one atomic writer of `mister_jax`: results, run configurations, reports, checkpoint metadata and
cached programs all go through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Puts ``data`` at ``path`` atomically; on failure removes the temporary file and re-raises.

    ``durable``: the bytes are synced to disk before the rename, so the file survives a power loss as
    well as a crash; a cache that can always be rebuilt passes False and skips the sync.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, durable: bool = True) -> None:
    """`write_bytes` of UTF-8 ``text``."""
    write_bytes(path, text.encode("utf-8"), durable)


def write_json(path: Path, obj: Any, durable: bool = True) -> None:
    """`write_bytes` of ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n", durable)


@contextlib.contextmanager
def interrupts_deferred():
    """Lets checkpoint writes finish before a Ctrl-C takes effect (then raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
