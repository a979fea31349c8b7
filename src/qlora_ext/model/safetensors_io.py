"""safetensors read (validated header, mmap-backed data) and write (atomic), without torch.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the data; offsets count from the first byte after the header."""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile

import numpy as np

from .._native import kernels
from .json_input import parse_json
from .mapped_file import MappedFile

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_HALF_CODE = {"F16": 1, "BF16": 2}  # dtype codes of the C half_to_f32 kernel
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
INT64_MAX = (1 << 63) - 1


def read_header(path) -> dict:
    """Parse and validate a safetensors header.

    Returns {"tensors": {name: {"dtype", "shape": tuple, "begin", "end"}} (absolute file
    offsets), "metadata": dict, "data_start": int, "file_size": int}.  Raises OSError for an
    unreadable file and ValueError (naming file and tensor) for a malformed one."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{p}: truncated safetensors file ({size} bytes; expected an 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise ValueError(f"{p}: header length {n} exceeds the {MAX_HEADER}-byte limit (corrupt file?)")
            if 8 + n > size:
                raise ValueError(f"{p}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise OSError(f"{p}: safetensors file not found") from None
    except IsADirectoryError:
        raise OSError(f"{p}: is a directory, expected a .safetensors file") from None
    # a tensor name twice in the header is refused there (parse_json: duplicate keys)
    hdr = parse_json(raw, f"{p}: header")
    if not isinstance(hdr, dict):
        raise ValueError(f"{p}: header must be a JSON object, got {type(hdr).__name__}")
    data_start = 8 + n
    data_size = size - data_start
    metadata = hdr.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{p}: __metadata__ must be an object of strings")
    tensors = {}
    for name, info in hdr.items():
        where = f"{p}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: entry must be an object")
        dtype = info.get("dtype")
        if dtype not in ITEMSIZE:
            raise ValueError(f"{where}: dtype {dtype!r} is not supported; expected one of F32, F16, BF16")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ValueError(f"{where}: data_offsets must be [begin, end] integers, got {offs!r}")
        b, e = offs
        if not 0 <= b <= e <= data_size:
            raise ValueError(f"{where}: data_offsets [{b}, {e}] out of bounds of the {data_size}-byte data section")
        count = math.prod(shape)  # Python integers: a product past int64 is seen, not wrapped
        if count * ITEMSIZE[dtype] > INT64_MAX or any(d > INT64_MAX for d in shape):
            raise ValueError(f"{where}: shape {shape} has {count} elements, which overflows int64")
        want = count * ITEMSIZE[dtype]
        if e - b != want:
            raise ValueError(f"{where}: {e - b} bytes of data but shape {shape} x {dtype} needs {want}")
        tensors[name] = {"dtype": dtype, "shape": tuple(shape), "begin": data_start + b, "end": data_start + e}
    spans = sorted((t["begin"], t["end"], k) for k, t in tensors.items() if t["end"] > t["begin"])
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{p}: tensors {k0!r} and {k1!r} overlap (bytes {b0}-{e0} and {b1}-{e1})")
    return {"tensors": tensors, "metadata": metadata, "data_start": data_start, "file_size": size}


class SafetensorsFile(MappedFile):
    """A safetensors file mapped read-only.  `get` returns float32 copies (bf16/f16 converted
    by the C kernel), `get_raw` a zero-copy view of the stored bits (uint16 for BF16).
    `release(name)` drops the tensor's pages from this process's resident set, so that
    streaming over a large file keeps RSS flat."""

    def __init__(self, path):
        self.path = os.fspath(path)
        hdr = read_header(self.path)
        self.tensors = hdr["tensors"]
        self.metadata = hdr["metadata"]
        self._f = open(self.path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if hdr["file_size"] else None

    def keys(self) -> list:
        """Tensor names in file order (sequential reads)."""
        return sorted(self.tensors, key=lambda k: self.tensors[k]["begin"])

    def get_raw(self, name) -> np.ndarray:
        """Stored bits as a read-only view: float32, float16, or uint16 (bf16 patterns)."""
        t = self.info(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        npdt = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[t["dtype"]]
        count = (t["end"] - t["begin"]) // ITEMSIZE[t["dtype"]]
        return np.frombuffer(self._mm, dtype=npdt, count=count, offset=t["begin"]).reshape(t["shape"])

    def get(self, name, out: np.ndarray | None = None, chunk: int = 1 << 24) -> np.ndarray:
        """float32 copy of a tensor (into `out` if given: float32, C-contiguous, same shape).
        Converted `chunk` elements at a time, releasing pages as it goes."""
        t = self.info(name)
        if out is None:
            out = np.empty(t["shape"], dtype=np.float32)
        elif out.dtype != np.float32 or tuple(out.shape) != t["shape"] or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: out for {name!r} must be float32 C-contiguous {t['shape']}, "
                             f"got {out.dtype} {out.shape}")
        src = self.get_raw(name).reshape(-1)
        dst = out.reshape(-1)
        k = kernels() if t["dtype"] in _HALF_CODE else None
        for i in range(0, src.shape[0], chunk):
            s, d = src[i:i + chunk], dst[i:i + chunk]
            if k is None:
                d[:] = s
            else:
                k.half_to_f32(s.view(np.uint16), _HALF_CODE[t["dtype"]], d, 0)
            self._drop(t["begin"] + i * ITEMSIZE[t["dtype"]], s.nbytes)
        del src
        return out

    def release(self, name) -> None:
        """Tell the OS this tensor's pages are no longer needed by this process (a hint: the
        page cache keeps them, RSS drops)."""
        t = self.info(name)
        self._drop(t["begin"], t["end"] - t["begin"])


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_file(tensors: dict, path, metadata: dict | None = None, dtype: str | None = None) -> None:
    """Write tensors (numpy arrays) as safetensors, atomically (temp file + rename).

    Stored dtype: F32 for float32, F16 for float16; `dtype` ("float32" | "float16" |
    "bfloat16") converts float arrays on write; uint16 arrays are taken as bf16 bit
    patterns and need dtype="bfloat16"."""
    p = os.fspath(path)
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ValueError(f"save_file: dtype must be None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError("save_file: metadata must be a dict of str -> str")
    prepared = []
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"save_file: invalid tensor name {name!r}")
        a = np.asarray(arr)
        if a.dtype == np.uint16:
            if dtype != "bfloat16":
                raise ValueError(f"save_file: tensor {name!r} is uint16; pass dtype='bfloat16' to store bf16 bits")
            data, st = a, "BF16"
        elif a.dtype.kind == "f":
            if dtype == "bfloat16":
                data, st = f32_to_bf16_bits(a.astype(np.float32, copy=False)), "BF16"
            elif dtype == "float16" or (dtype is None and a.dtype == np.float16):
                data, st = a.astype("<f2", copy=False), "F16"
            else:
                data, st = a.astype("<f4", copy=False), "F32"
        else:
            raise ValueError(f"save_file: tensor {name!r} has dtype {a.dtype}; expected a float array")
        prepared.append((name, np.ascontiguousarray(data), st, a.shape))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, data, st, shape in prepared:
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    d = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, data, _, _ in prepared:
                f.write(memoryview(data.reshape(-1)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
