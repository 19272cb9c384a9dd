"""`torch.save` state dicts read and written without torch.

The reference release stores its cache mapper as `torch.save(module.state_dict(), "cache_mapper.pt")`:
a zip archive holding `<root>/data.pkl` (a pickle of an OrderedDict name -> tensor, each tensor
rebuilt by `torch._utils._rebuild_tensor_v2` from a persistent-id storage), the raw storages as
`<root>/data/<key>`, and small records (`byteorder`, `version`). Both directions here use only
numpy, zipfile and pickle, so an inference or export box without torch reads and writes it:

- `read_torch_state_dict`: a restricted unpickler that rebuilds plain tensors only and refuses
  every other global (a pickled module, optimizer state, arbitrary objects);
- `write_torch_state_dict`: the pickle opcodes torch itself emits (protocol 2), storages stored
  uncompressed at 64-byte aligned offsets as torch does (so `torch.load(..., mmap=True)` works too).
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np


class TorchFileError(ValueError):
    """A .pt file that is not a torch.save'd state dict of plain tensors (or cannot be read)."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
}
_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}
_ALIGN = 64  # torch's storage alignment inside the archive


# ------------------------------------------------------------------------------- read
def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> np.ndarray:
    item = storage.dtype.itemsize
    return np.array(np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                                    strides=[s * item for s in stride]))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into numpy arrays; refuses every other global."""

    def __init__(self, archive: zipfile.ZipFile, root: str):
        super().__init__(archive.open(f"{root}data.pkl"))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name}: only state dicts of plain tensors can be read without torch")

    def persistent_load(self, pid: Any) -> np.ndarray:
        _, dtype, key, _, numel = pid  # ("storage", dtype, key, location, numel)
        raw = self.archive.read(f"{self.root}data/{key}")
        return np.frombuffer(raw, dtype, count=numel)


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of a `torch.save(state_dict)` file (zip format, torch >= 1.6), without torch.

    Storages are read as little-endian (what every x86/ARM machine writes; others are refused).
    Anything but a flat mapping of names to tensors is a `TorchFileError` naming the entry.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise TorchFileError(f"{path} is not a torch.save zip archive (truncated, or the legacy pre-1.6 format: "
                             "re-save it with a recent torch)")
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkl:
                raise TorchFileError(f"{path}: no data.pkl inside; not a torch.save file")
            root = pkl[0][: -len("data.pkl")]
            order = f"{root}byteorder"
            if order in z.namelist() and z.read(order).decode().strip() != "little":
                raise TorchFileError(f"{path} was saved on a big-endian machine; only little-endian files are read")
            obj = _StateDictUnpickler(z, root).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError, struct.error) as e:
        if isinstance(e, TorchFileError):
            raise
        raise TorchFileError(f"{path}: {e}") from e
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise TorchFileError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor "
                                 "(only state dicts of plain tensors are read)")
    return dict(obj)


# ------------------------------------------------------------------------------ write
class _Opcodes:
    """The few pickle (protocol 2) opcodes a torch state dict needs, appended to a buffer."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.out.write(pickle.PROTO + b"\x02")

    def op(self, code: bytes) -> None:
        self.out.write(code)

    def glob(self, module: str, name: str) -> None:
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def text(self, s: str) -> None:
        b = s.encode("utf-8")
        self.out.write(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

    def int(self, n: int) -> None:
        if 0 <= n < 256:
            self.out.write(pickle.BININT1 + struct.pack("<B", n))
        elif -(2**31) <= n < 2**31:
            self.out.write(pickle.BININT + struct.pack("<i", n))
        else:
            b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(pickle.LONG1 + struct.pack("<B", len(b)) + b)

    def tuple_of_ints(self, values: tuple[int, ...]) -> None:
        self.op(pickle.MARK)
        for v in values:
            self.int(v)
        self.op(pickle.TUPLE)


def _pickle_state_dict(tensors: Mapping[str, np.ndarray]) -> bytes:
    """data.pkl of an OrderedDict name -> tensor, storage i holding tensor i (contiguous, offset 0)."""
    p = _Opcodes()
    p.glob("collections", "OrderedDict")
    p.op(pickle.EMPTY_TUPLE)
    p.op(pickle.REDUCE)
    p.op(pickle.MARK)
    for i, (name, t) in enumerate(tensors.items()):
        p.text(name)
        p.glob("torch._utils", "_rebuild_tensor_v2")
        p.op(pickle.MARK)  # the args tuple
        p.op(pickle.MARK)  # the persistent id ("storage", type, key, location, numel)
        p.text("storage")
        p.glob("torch", _STORAGE_NAMES[t.dtype])
        p.text(str(i))
        p.text("cpu")
        p.int(int(t.size))
        p.op(pickle.TUPLE)
        p.op(pickle.BINPERSID)
        p.int(0)  # storage offset
        p.tuple_of_ints(tuple(t.shape))
        p.tuple_of_ints(tuple(int(s // t.dtype.itemsize) for s in t.strides) if t.ndim else ())
        p.op(pickle.NEWFALSE)  # requires_grad
        p.glob("collections", "OrderedDict")  # backward hooks: empty
        p.op(pickle.EMPTY_TUPLE)
        p.op(pickle.REDUCE)
        p.op(pickle.TUPLE)
        p.op(pickle.REDUCE)
    p.op(pickle.SETITEMS)
    p.op(pickle.STOP)
    return p.out.getvalue()


def _aligned_entry(archive: zipfile.ZipFile, fp: Any, name: str, data: bytes) -> None:
    """Store `data` uncompressed with its bytes starting at a multiple of 64 (torch's padding extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = fp.tell() + 30 + len(name.encode()) + 4  # local header + name + the extra field's own header
    pad = -start % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    archive.writestr(info, data)


def write_torch_state_dict(tensors: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write `tensors` as `torch.save(state_dict)` would: loadable by `torch.load` (weights_only too)
    and by `read_torch_state_dict`. Arrays are stored C-contiguous, little-endian, in their dtype
    (float32, float64, float16, bfloat16, int64 or int32)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        a = np.asarray(t, order="C")  # (ascontiguousarray would turn a 0-d tensor into 1-d)
        if a.dtype not in _STORAGE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {a.dtype}; a torch state dict here takes "
                            f"{sorted(str(d) for d in _STORAGE_NAMES)}")
        arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    root = path.stem or "archive"
    pkl = _pickle_state_dict(arrays)
    with open(path, "wb") as fp, zipfile.ZipFile(fp, "w", zipfile.ZIP_STORED) as z:
        _aligned_entry(z, fp, f"{root}/data.pkl", pkl)
        _aligned_entry(z, fp, f"{root}/.format_version", b"1")
        _aligned_entry(z, fp, f"{root}/.storage_alignment", str(_ALIGN).encode())
        _aligned_entry(z, fp, f"{root}/byteorder", b"little")
        for i, a in enumerate(arrays.values()):
            _aligned_entry(z, fp, f"{root}/data/{i}", a.tobytes())
        _aligned_entry(z, fp, f"{root}/version", b"3\n")
        serial = str(int(hashlib.sha1(pkl).hexdigest(), 16))[:40].encode()  # deterministic, like torch's id
        _aligned_entry(z, fp, f"{root}/.data/serialization_id", serial)
    return path
