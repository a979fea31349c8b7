"""NF4 (4-bit NormalFloat) quantization, bit-exact with bitsandbytes' quantize_4bit(nf4).

Public API: quantize_nf4, dequantize_nf4, NF4Tensor.  Checks live here; the loops live in
csrc/nf4.c behind the Cython contract in nf4.pxi."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._native import kernels, resolve_threads

NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)

NESTED_BLOCKSIZE = 256  # bitsandbytes' block for the double-quantized absmax
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) bit for bit: a float32 step, the
    first half fused-multiply-added up from start, the second half down from end."""
    s, e = np.float64(np.float32(start)), np.float64(np.float32(end))
    step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    # a product of two float32 values is exact in float64, so one rounding = a float32 FMA
    up, down = (s + i * step).astype(np.float32), (e - (steps - 1 - i) * step).astype(np.float32)
    return np.where(i < steps // 2, up, down)


@lru_cache(maxsize=1)
def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (max_exponent_bits=7), sorted, float32 (256,).

    Same construction: for exponent i, `2**i + 1` float32 linspace points in [0.1, 1]; the
    midpoints of neighbours scaled by 10**(i-6), both signs; then 0 and 1."""
    data: list[float] = []
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-6 + i))
        data += (means * scale).tolist()
        data += (means * -scale).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.array(sorted(data), dtype=np.float32)


@dataclass(eq=False)
class NF4Tensor:
    """A tensor quantized to NF4 in blocks of `blocksize` consecutive (row-major) elements.

    packed: uint8 (ceil(n/2),), element 2i in the high nibble.  For double quantization the
    per-block scales are stored as 8-bit codes (`absmax_q`) with one float32 scale per 256
    blocks (`absmax_nested`) and a float32 `absmax_offset`; `absmax` is then their
    dequantized value."""

    packed: np.ndarray
    shape: tuple
    blocksize: int
    absmax_f32: np.ndarray | None = None
    absmax_q: np.ndarray | None = None
    absmax_nested: np.ndarray | None = None
    absmax_offset: float = 0.0

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def absmax(self) -> np.ndarray:
        """float32 scale per block (dequantized when double-quantized)."""
        if self.absmax_f32 is not None:
            return self.absmax_f32
        return _dequantize_nested(self.absmax_q, self.absmax_nested, self.absmax_offset)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales (8-bit + nested for double quant)."""
        if self.double_quant:
            return self.packed.nbytes + self.absmax_q.nbytes + self.absmax_nested.nbytes + 4
        return self.packed.nbytes + self.absmax_f32.nbytes

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}{dq}, nbytes={self.nbytes})"


def _dequantize_nested(q: np.ndarray, nested: np.ndarray, offset: float) -> np.ndarray:
    code = dynamic_code()
    blocks = np.repeat(nested, NESTED_BLOCKSIZE)[: q.shape[0]]
    return (code[q] * blocks + np.float32(offset)).astype(np.float32)


def _check_blocksize(blocksize) -> int:
    if not isinstance(blocksize, (int, np.integer)) or isinstance(blocksize, bool):
        raise ValueError(f"blocksize must be an int, got {type(blocksize).__name__}")
    b = int(blocksize)
    if b < 32 or b > 4096 or b & (b - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {b}")
    return b


def _as_flat_input(x, dtype) -> tuple[np.ndarray, str]:
    """Flat C-contiguous view (or copy, for strided input) and the element type name."""
    arr = np.asarray(x)
    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise ValueError(f"dtype='bfloat16' expects uint16 bit patterns, got {arr.dtype}")
        kind = "bfloat16"
    elif dtype is not None and dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    elif arr.dtype == np.float32:
        kind = "float32"
    elif arr.dtype == np.float16:
        kind = "float16"
    elif arr.dtype == np.float64:
        # accepted as a convenience: rounded to float32 first, as torch's .float() would
        arr, kind = arr.astype(np.float32), "float32"
    else:
        raise ValueError(
            f"unsupported dtype {arr.dtype}: expected float32, float16, or uint16 bfloat16 "
            "bit patterns with dtype='bfloat16'"
        )
    if dtype in ("float32", "float16") and kind != dtype:
        raise ValueError(f"dtype={dtype!r} given but the array is {arr.dtype}")
    return np.ascontiguousarray(arr).reshape(-1), kind


def quantize_nf4(x, blocksize: int = 64, double_quant: bool = False, dtype: str | None = None,
                 threads: int | None = None) -> NF4Tensor:
    """Quantize any float array (float32, float16, or bfloat16 as uint16 with
    dtype='bfloat16'; any shape and strides) to NF4.  Raises ValueError on NaN/inf."""
    b = _check_blocksize(blocksize)
    flat, kind = _as_flat_input(x, dtype)
    shape = tuple(int(s) for s in np.shape(x))
    n = flat.shape[0]
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty((n + b - 1) // b, dtype=np.float32)
    nt = resolve_threads(threads)
    k = kernels()
    if kind == "float32":
        bad = k.nf4_quantize_f32(flat, b, packed, absmax, nt)
    else:
        # float16 travels as its uint16 bit pattern (the memoryview has no 'e' format)
        bad = k.nf4_quantize_half(flat.view(np.uint16), _DTYPE_CODES[kind], b, packed, absmax, nt)
    if bad >= 0:
        idx = np.unravel_index(int(bad), shape) if shape else ()
        value = flat[bad] if kind != "bfloat16" else "non-finite bfloat16"
        raise ValueError(f"quantize_nf4: input has a non-finite value ({value}) at index {tuple(int(i) for i in idx)}")
    if not double_quant:
        return NF4Tensor(packed=packed, shape=shape, blocksize=b, absmax_f32=absmax)
    # bitsandbytes compress_statistics: subtract the mean, 8-bit dynamic code, blocks of 256
    offset = np.float32(absmax.astype(np.float64).mean()) if absmax.size else np.float32(0)
    centred = (absmax - offset).astype(np.float32)
    q = np.empty(centred.shape[0], dtype=np.uint8)
    nested = np.empty((centred.shape[0] + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE, dtype=np.float32)
    k.blockwise8_quantize(centred, NESTED_BLOCKSIZE, dynamic_code(), q, nested)
    return NF4Tensor(packed=packed, shape=shape, blocksize=b, absmax_q=q, absmax_nested=nested,
                     absmax_offset=float(offset))


def dequantize_nf4(t: NF4Tensor, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """float32 array of t.shape.  `out`, if given, must be float32, C-contiguous, t.shape."""
    if not isinstance(t, NF4Tensor):
        raise ValueError(f"dequantize_nf4 expects an NF4Tensor, got {type(t).__name__}")
    check_tensor(t)
    if out is None:
        out = np.empty(t.shape, dtype=np.float32)
    else:
        if not isinstance(out, np.ndarray):
            raise ValueError(f"out must be a numpy array, got {type(out).__name__}")
        if out.dtype != np.float32:
            raise ValueError(f"out must be float32, got {out.dtype}")
        if tuple(out.shape) != tuple(t.shape):
            raise ValueError(f"out has shape {out.shape}, expected {t.shape}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
    absmax = np.ascontiguousarray(t.absmax, dtype=np.float32)
    kernels().nf4_dequantize(t.packed, absmax, t.blocksize, out.reshape(-1), resolve_threads(threads))
    return out


def check_tensor(t: NF4Tensor) -> None:
    """Every field's type and size against the others, in Python integers (no overflow),
    before a kernel or numpy allocation sees them: an NF4Tensor can be built by hand."""
    _check_blocksize(t.blocksize)
    if (not isinstance(t.shape, tuple)
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in t.shape)):
        raise ValueError(f"NF4Tensor.shape must be a tuple of non-negative ints, got {t.shape!r}")
    n = 1
    for s in t.shape:
        n *= int(s)
    if n > np.iinfo(np.int64).max // 8:
        raise ValueError(f"NF4Tensor.shape {t.shape} has too many elements ({n})")
    arrays = {"packed": (t.packed, np.uint8, (n + 1) // 2)}
    nblocks = -(-n // t.blocksize)
    if t.double_quant:
        arrays["absmax_q"] = (t.absmax_q, np.uint8, nblocks)
        arrays["absmax_nested"] = (t.absmax_nested, np.float32, -(-nblocks // NESTED_BLOCKSIZE))
    else:
        arrays["absmax_f32"] = (t.absmax_f32, np.float32, nblocks)
    for name, (a, dt, length) in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.shape != (length,):
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"NF4Tensor.{name} must be {np.dtype(dt)} ({length},) for shape {t.shape} and "
                             f"blocksize {t.blocksize}, got {got}")
