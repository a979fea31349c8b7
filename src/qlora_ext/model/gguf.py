"""GGUF reading (llama.cpp's single-file format): header, metadata, tensor table, and numpy
dequantizers for F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K.

Layout (version 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; metadata entries (string key, u32 type, value); tensor infos (string name,
u32 n_dims, u64 dims[n_dims] fastest first, u32 ggml type, u64 offset); padding to
`general.alignment` (default 32); the data section.  A tensor with dims (ne0, ne1) is a
row-major numpy array of shape (ne1, ne0); quantized blocks run along ne0."""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from .._native import kernels
from .mapped_file import MappedFile

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_T_BOOL, _T_STRING, _T_ARRAY = 7, 8, 9

# ggml tensor type id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 30: ("BF16", 1, 2),
}
GGML_TYPE_IDS = {v[0]: k for k, v in GGML_TYPES.items()}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
QK_K = 256
# Arrays of arrays deeper than this are refused (llama.cpp writes at most one level); the
# reader recurses per level, and a hostile file could otherwise nest until RecursionError.
MAX_ARRAY_NESTING = 8


@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple  # ggml order, fastest first
    type_id: int
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}",))[0]

    @property
    def shape(self) -> tuple:
        """numpy (row-major) shape: dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def size(self) -> int:
        return math.prod(self.dims)


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header while reading {what} "
                             f"(needs {n} bytes at offset {self.pos}, file has {len(self.buf)})")
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > len(self.buf):
            raise ValueError(f"{self.path}: {what}: string length {n} exceeds the file size (corrupt header)")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what}: string is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype == _T_STRING:
            return self.string(what)
        if vtype == _T_ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise ValueError(f"{self.path}: {what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
            etype = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if count > len(self.buf):
                raise ValueError(f"{self.path}: {what}: array length {count} exceeds the file size (corrupt header)")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype])
                arr = np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt).copy()
                return arr.astype(bool) if etype == _T_BOOL else arr
            if etype == _T_STRING:
                return [self.string(what) for _ in range(count)]
            if etype == _T_ARRAY:
                return [self.value(_T_ARRAY, what, depth + 1) for _ in range(count)]
            raise ValueError(f"{self.path}: {what}: unknown array element type {etype}")
        if vtype in _SCALARS:
            v = np.frombuffer(self.take(np.dtype(_SCALARS[vtype]).itemsize, what), dtype=_SCALARS[vtype])[0]
            return bool(v) if vtype == _T_BOOL else v.item()
        raise ValueError(f"{self.path}: {what}: unknown metadata value type {vtype}")


class GGUFFile(MappedFile):
    """A GGUF file mapped read-only: `metadata` (dict), `tensors` (name -> GGUFTensorInfo),
    `get(name)` -> float32 numpy array in row-major shape, dequantized."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise OSError(f"{self.path}: GGUF file not found") from None
        except IsADirectoryError:
            raise OSError(f"{self.path}: is a directory, expected a .gguf file") from None
        size = os.fstat(self._f.fileno()).st_size
        if size < 24:
            self._f.close()
            raise ValueError(f"{self.path}: truncated GGUF file ({size} bytes, header needs 24)")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(memoryview(self._mm), self.path)
        magic = bytes(c.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = c.unpack("<I", "version")
        if self.version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported; expected 2 or 3")
        n_tensors = c.unpack("<Q", "tensor count")
        n_kv = c.unpack("<Q", "metadata count")
        if n_tensors > size or n_kv > size:
            raise ValueError(f"{self.path}: tensor count {n_tensors} / metadata count {n_kv} exceed the file size")
        self.metadata = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            if key in self.metadata:
                raise ValueError(f"{self.path}: metadata key {key!r} appears twice")
            vtype = c.unpack("<I", f"metadata {key!r} type")
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")
        raw = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            nd = c.unpack("<I", f"tensor {name!r} n_dims")
            if nd > 4:
                raise ValueError(f"{self.path}: tensor {name!r} has {nd} dimensions, expected at most 4")
            dims = tuple(c.unpack("<Q", f"tensor {name!r} dims") for _ in range(nd))
            tid = c.unpack("<I", f"tensor {name!r} type")
            off = c.unpack("<Q", f"tensor {name!r} offset")
            raw.append((name, dims, tid, off))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            raise ValueError(f"{self.path}: general.alignment must be a power of two, got {align!r}")
        data_start = c.pos + (-c.pos % align)
        self.tensors = {}
        spans = []
        for name, dims, tid, off in raw:
            where = f"{self.path}: tensor {name!r}"
            if name in self.tensors:
                raise ValueError(f"{where}: appears twice")
            if tid not in GGML_TYPES:
                raise ValueError(f"{where}: unknown ggml type id {tid}")
            tname, bs, bb = GGML_TYPES[tid]
            n = math.prod(dims)  # Python integers: a product past int64 is seen, not wrapped
            if any(d >= 1 << 63 for d in dims) or n >= 1 << 63:
                raise ValueError(f"{where}: dims {list(dims)} overflow int64")
            if dims and dims[0] % bs:
                raise ValueError(f"{where}: row length {dims[0]} is not a multiple of the {tname} block ({bs})")
            nbytes = n // bs * bb
            begin = data_start + off
            if off % align or begin + nbytes > size:
                raise ValueError(f"{where}: data [{begin}, {begin + nbytes}) is misaligned or past the end "
                                 f"of the file ({size} bytes)")
            self.tensors[name] = GGUFTensorInfo(name, dims, tid, begin, nbytes)
            spans.append((begin, begin + nbytes, name))
        spans.sort()
        for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ValueError(f"{self.path}: tensors {k0!r} and {k1!r} overlap")
        self.data_start = data_start

    def keys(self) -> list:
        """Tensor names in file order."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].offset)

    def get_raw(self, name) -> np.ndarray:
        """The stored bytes (uint8 view)."""
        t = self.info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def get(self, name, rows_per_chunk: int | None = None) -> np.ndarray:
        """float32 array of the tensor's numpy shape, dequantized a few rows at a time."""
        t = self.info(name)
        if t.type_name not in SUPPORTED_TYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has ggml type {t.type_name}, which is not supported; "
                             f"expected one of {', '.join(SUPPORTED_TYPES)}")
        out = np.empty(t.size, dtype=np.float32)
        raw = self.get_raw(name)
        row = t.dims[0] if t.dims else 1
        _, bs, bb = GGML_TYPES[t.type_id]
        row_bytes = row // bs * bb
        nrows = t.size // row if row else 0
        # bound the dequantizers' temporaries to ~16 MB of output per chunk
        step = rows_per_chunk or max(1, (1 << 22) // max(row, 1))
        for r in range(0, nrows, step):
            r1 = min(nrows, r + step)
            dequantize(raw[r * row_bytes:r1 * row_bytes], t.type_name, out[r * row:r1 * row])
        del raw
        self._drop(t.offset, t.nbytes)
        return out.reshape(t.shape)


# ---- dequantizers: raw bytes (uint8, whole blocks) -> float32 out (n,) ----

def _f16(blocks: np.ndarray, lo: int) -> np.ndarray:
    """The little-endian f16 at byte `lo` of each block, as float32 column [nb, 1]."""
    return blocks[:, lo:lo + 2].copy().view("<f2").astype(np.float32)


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    # block: f16 d, int8 q[32]; x = d * q
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[nb, 16] bytes -> [nb, 32] codes: low nibbles give elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    # block: f16 d, 16 bytes of nibbles; x = d * (q - 8)
    return _f16(b, 0) * (_nibbles(b[:, 2:18]) - 8.0)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    # block: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
    return _f16(b, 0) * _nibbles(b[:, 4:20]) + _f16(b, 2)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[nb, 4] bytes = a little-endian u32 per block -> [nb, 32] bit j of it, as 0 or 16."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")  # bit j of the u32 at column j
    return bits.astype(np.float32) * 16.0


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:
    # block: f16 d, u32 qh (5th bits), 16 bytes of nibbles; x = d * (q - 16), element j < 16
    # from the low nibble of byte j and bit j of qh, element j + 16 from the high nibble and bit j + 16
    return _f16(b, 0) * (_nibbles(b[:, 6:22]) + _fifth_bits(b[:, 2:6]) - 16.0)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:
    # block: f16 d, f16 m, u32 qh, 16 bytes of nibbles; x = d * q + m
    return _f16(b, 0) * (_nibbles(b[:, 8:24]) + _fifth_bits(b[:, 4:8])) + _f16(b, 2)


def _k4_scales_mins(s: np.ndarray) -> tuple:
    """12 packed bytes [nb, 12] -> 8 six-bit scales and 8 six-bit mins, each [nb, 8].
    Sub-blocks 0..3: low 6 bits of bytes 0..3 (scale) and 4..7 (min); sub-blocks 4..7: low
    nibble / high nibble of bytes 8..11, topped up with the high 2 bits of bytes 0..3 / 4..7."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    # super-block of 256 = 8 sub-blocks of 32: f16 d, f16 dmin, 12 bytes scales/mins,
    # 128 bytes qs.  Each 32 bytes of qs hold two sub-blocks: low nibbles then high.
    # x = d * sc[j] * q - dmin * mn[j]
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k4_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(nb, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(nb, QK_K)


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:
    # as Q4_K plus qh[32] (after the scales) holding each element's 5th bit: sub-block j
    # takes bit j of qh[l] for its element l; x = d * sc[j] * q - dmin * mn[j]
    nb = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k4_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(nb, 4, 32)
    lo = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
    hi = np.stack([(qh >> j) & 1 for j in range(8)], axis=1)  # [nb, 8, 32]
    q = (lo | (hi << 4)).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(nb, QK_K)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    # super-block of 256 = 16 sub-blocks of 16: ql[128] (low 4 bits), qh[64] (high 2 bits),
    # int8 scales[16], f16 d; x = d * scale[sub] * (q - 32).  Per half of 128 outputs
    # (ql 64 bytes, qh 32 bytes): out[l + 32 k] for k = 0..3 takes the low/high nibble of
    # ql[l] / ql[l + 32] and bits 2k..2k+1 of qh[l].
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 64)
    qh = b[:, 128:192].reshape(nb, 2, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    lo = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    hi = np.stack([(qh >> (2 * k)) & 3 for k in range(4)], axis=2)
    q = (lo | (hi << 4)).astype(np.float32) - 32.0  # [nb, 2 halves, 4, 32]
    sub = np.arange(QK_K) // 16  # scale index of each output element
    return (d * scales[:, sub]) * q.reshape(nb, QK_K)


_BLOCK_DEQUANT = {"Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q5_0": _dequant_q5_0,
                  "Q5_1": _dequant_q5_1, "Q4_K": _dequant_q4_k, "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k}


def dequantize(raw: np.ndarray, type_name: str, out: np.ndarray | None = None) -> np.ndarray:
    """Whole blocks of a ggml type (uint8 bytes) -> float32 (n,)."""
    if type_name not in GGML_TYPE_IDS:
        raise ValueError(f"unknown ggml type {type_name!r}")
    _, bs, bb = GGML_TYPES[GGML_TYPE_IDS[type_name]]
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.shape[0] % bb:
        raise ValueError(f"{type_name}: {raw.shape[0]} bytes is not a whole number of {bb}-byte blocks")
    n = raw.shape[0] // bb * bs
    if out is None:
        out = np.empty(n, dtype=np.float32)
    elif out.shape != (n,) or out.dtype != np.float32:
        raise ValueError(f"{type_name}: out must be float32 ({n},), got {out.dtype} {out.shape}")
    if type_name == "F32":
        out[:] = raw.view("<f4")
    elif type_name in ("F16", "BF16"):
        # the C kernel wants an aligned uint16 buffer; the mmap slice may be odd-aligned
        src = raw.view("<u2") if raw.ctypes.data % 2 == 0 else raw.copy().view("<u2")
        kernels().half_to_f32(src, 1 if type_name == "F16" else 2, out, 0)
    elif type_name in _BLOCK_DEQUANT:
        out[:] = _BLOCK_DEQUANT[type_name](raw.reshape(-1, bb)).reshape(-1)
    else:
        raise ValueError(f"ggml type {type_name} is not supported; expected one of {', '.join(SUPPORTED_TYPES)}")
    return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's conversion permute of Q/K rows for the llama architecture.

    llama.cpp stores each head's rows interleaved (pairs of RoPE dimensions adjacent, the
    GPT-J convention); HF keeps the first half and second half of a head apart (rotate_half).
    w: [n_head * head_dim, ...] in GGUF order -> same shape in HF order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"unpermute_qk: {rows} rows do not split into {n_head} heads of even size")
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF order -> llama.cpp's GGUF order of Q/K rows for the llama architecture (the inverse
    of unpermute_qk): each head's two halves interleaved row by row."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"permute_qk: {rows} rows do not split into {n_head} heads of even size")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))
