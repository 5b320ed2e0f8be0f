"""A `torch.save`d state_dict read without torch: a restricted unpickler that can run no code.

torch's zip format (the default of `torch.save` since torch 1.6; the older raw-pickle format is refused
with a line saying so) is an archive holding a pickle whose tensors point at raw storages in the same
archive. The unpickler admits only the globals a `state_dict` needs (torch's `_rebuild_tensor_v2` and
`_rebuild_parameter`, its storage types, `collections.OrderedDict`) and refuses every other, so a
checkpoint cannot run code; each tensor's size, stride and offset are checked against its storage
before it is read.

Why not `torch.load`: it would make `mister_jax` depend on torch, which it must not load
(tests/test_imports.py), and a full `torch.load` runs whatever the pickle names; `weights_only=True`
restricts it as this reader does, but still needs torch installed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class CheckpointFormatError(ValueError):
    """A file that is not a state_dict this reader admits."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    """A tensor as a copy of its elements in ``storage`` (torch's `_rebuild_tensor_v2` arguments:
    storage offset, size and stride in elements), refused if they reach outside the storage."""
    size, stride = tuple(size), tuple(stride)
    if (
        len(size) != len(stride)
        or offset < 0
        or any(n < 0 for n in size)
        or any(s < 0 for s in stride)
        or (0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage))
    ):
        raise CheckpointFormatError(
            f"holds a tensor of size {list(size)}, stride {list(stride)} at offset {offset} "
            f"outside its storage of {len(storage)} elements"
        )
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    ).copy()


def _rebuild_parameter(data, *_):
    """An `nn.Parameter` (a state_dict saved with keep_vars=True) as its tensor."""
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state_dict admitting only torch's tensor rebuild functions, its storage types and
    `collections.OrderedDict`; storages are read from ``archive`` under ``prefix``/data/."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointFormatError(
            f"refers to {module}.{name}, which a state_dict does not need; only tensors and OrderedDict are read"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise CheckpointFormatError(f"holds a persistent object {pid!r:.80} that is not a tensor storage")
        _, storage_type, key, _location, numel = pid
        dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder(self._byteorder)
        try:
            data = self._archive.read(f"{self._prefix}/data/{key}")
        except KeyError:
            raise CheckpointFormatError(f"lacks the storage {self._prefix}/data/{key}") from None
        if len(data) != numel * dtype.itemsize:
            raise CheckpointFormatError(
                f"storage {key} has {len(data)} bytes where {numel} elements of "
                f"{storage_type} need {numel * dtype.itemsize}"
            )
        array = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
        if storage_type == "BFloat16Storage":  # bfloat16 is the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state_dict (zip format) as NumPy arrays, by key.

    A dict wrapping the state_dict under "state_dict" or "model" is unwrapped, and the "module." prefix
    of a model saved inside `nn.DataParallel` dropped. Raises `CheckpointFormatError` (one line) for
    anything else; `OSError` when the file cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointFormatError("is not a torch.save zip archive (no single data.pkl)")
            prefix = pickles[0][: -len("/data.pkl")]
            byteorder = "little"
            if f"{prefix}/byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"names an unknown byte order {byteorder!r:.20}")
            order = "<" if byteorder == "little" else ">"
            obj = _StateDictUnpickler(archive.read(pickles[0]), archive, prefix, order).load()
    except zipfile.BadZipFile:
        raise CheckpointFormatError("is not a zip archive (save it with torch.save of torch >= 1.6)") from None
    except (CheckpointFormatError, OSError):
        raise
    except Exception as err:  # a damaged pickle fails in many ways; none of them may run code (find_class)
        raise CheckpointFormatError(f"holds a pickle that cannot be read ({type(err).__name__}: {err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointFormatError("does not hold a state_dict (a mapping of names to tensors)")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)
