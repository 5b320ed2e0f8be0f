"""Files written whole or not at all: a temporary name beside the target, synced, then renamed.

A crash or a full disk mid-write leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    """Puts ``data`` at ``path`` atomically; on failure removes the temporary file and re-raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`write_bytes` of UTF-8 ``text``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """`write_bytes` of ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")
