"""Tuning: every knob of the GPU code (tiles, splits, chunk sizes, trusted shader modules, the
shader folder), read from the environment in ONE place and validated there, then passed in
(GpuContext(tuning=...)).  A field left at None means "the per-adapter default" of the code
that reads it; the checks that need the device (workgroup memory, threads) run where the
value is used, and their messages name the variable too.

    QLORA_EXT_GEMM_TILES=wgx,wgy,tm,tn,bk     gemm.wgsl / gemm_f32.wgsl tiles of the large GEMMs (benchmarks)
    QLORA_EXT_GEMM_TILES_SMALL=wgx,wgy,tm,tn,bk   their tiles of GEMMs with small grids
    QLORA_EXT_GEMM_MIN_GROUPS=n               grids below n workgroups take the small tiles
    QLORA_EXT_SMALL_GEMM_TILES=tm,tn,tk    small_gemm.wgsl `gemm` tiles (fp32 products with both sides > 64)
    QLORA_EXT_ATTN_TILES=br,bc,tm,tn[,dk4]    the attention kernels' register tiling
    QLORA_EXT_ATTN_HEAD_SPLIT=0|1             GQA dk/dv: per-kv-head loop (0) or per query head (1)
    QLORA_EXT_ATTN_STORED_DS=0|1              attention backward: dq recomputes P (0) or reads the dS
                                              that dk/dv stored (1; default: where it fits 2 GiB)
    QLORA_EXT_WGSL_TRUSTED=0|1                shader modules without naga's runtime bounds checks
                                              (default: on for hardware GPUs, off for CPU adapters)
    QLORA_EXT_REPLAY=0|1                      replay each layer's captured dispatches on later steps of the
                                              same shape (default 1; 0: record every op every step)
    QLORA_EXT_NATIVE_RECORDING=0|1           record dispatches through wgpu-native directly (default 1;
                                              0: through wgpu-py's public methods, recording.py)
    QLORA_EXT_WGSL_DEBUG=1                    on a shader compile error, print the WGSL with line
                                              numbers to stderr
    QLORA_EXT_SHADERS=DIR                     load shaders/<name>.wgsl from DIR first
    QLORA_EXT_GPU_MEMORY_GIB=x                the GPU's free memory for the placement choice
                                              (wgpu does not report it)
    QLORA_EXT_COPY_THREADS=n                  threads of a host copy into or out of staging
                                              (default: up to 8, transfer.py)"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Transfers of at least STAGING_MIN_BYTES go through pooled mapped staging buffers in pieces of
# at most STAGING_BYTES.  queue.write_buffer makes a staging buffer per call and keeps it until
# the next submit; the construction-time uploads (GiBs, before any submit) piled up as ~4 GiB
# of extra GPU memory for a 4B model on an H200, and a reused mapped buffer moves data about
# twice as fast (GPU.md).  Smaller transfers (ids, labels) stay on write_buffer / read_buffer.
STAGING_MIN_BYTES = 1 << 20
STAGING_BYTES = 64 << 20


@dataclass(frozen=True)
class Tuning:
    gemm_tiles: tuple | None = None          # (wgx, wgy, tm, tn, bk)
    gemm_tiles_small: tuple | None = None    # (wgx, wgy, tm, tn, bk)
    gemm_min_groups: int | None = None
    fp32_gemm_tiles: tuple | None = None     # (tm, tn, tk)
    attn_tiles: tuple | None = None          # (br, bc, tm, tn) or (br, bc, tm, tn, dk4)
    attn_head_split: bool | None = None
    attn_stored_ds: bool | None = None
    trusted: bool | None = None
    native_recording: bool = True
    replay: bool = True
    wgsl_debug: bool = False
    shader_dir: str | None = None
    gpu_memory_gib: float | None = None
    staging_bytes: int = STAGING_BYTES
    staging_min_bytes: int = STAGING_MIN_BYTES
    copy_threads: int | None = None

    @property
    def gemm_overridden(self) -> bool:
        """True when any gemm.wgsl / gemm_f32.wgsl tile knob is set (the per-shape tables then step aside)."""
        return any(v is not None for v in (self.gemm_tiles, self.gemm_tiles_small, self.gemm_min_groups))

    @classmethod
    def from_env(cls, environ=None) -> "Tuning":
        """The knobs set in `environ` (default os.environ); a malformed value is a ValueError
        naming the variable."""
        env = os.environ if environ is None else environ

        def get(var):
            v = env.get(var)
            return v.strip() if v is not None and v.strip() else None

        kw = {}
        for var, field, n in (("QLORA_EXT_GEMM_TILES", "gemm_tiles", (5,)),
                              ("QLORA_EXT_GEMM_TILES_SMALL", "gemm_tiles_small", (5,)),
                              ("QLORA_EXT_SMALL_GEMM_TILES", "fp32_gemm_tiles", (3,)),
                              ("QLORA_EXT_ATTN_TILES", "attn_tiles", (4, 5))):
            v = get(var)
            if v is not None:
                kw[field] = _ints(var, v, n)
        v = get("QLORA_EXT_ATTN_TILES")
        if v is not None:
            br, bc, tm, tn = kw["attn_tiles"][:4]
            if br % tm or bc % tn or bc % 4:
                raise ValueError(f"QLORA_EXT_ATTN_TILES={v!r}: tm must divide br, tn must divide bc, "
                                 "and bc must be a multiple of 4")
        for var, field in (("QLORA_EXT_GEMM_MIN_GROUPS", "gemm_min_groups"), ("QLORA_EXT_COPY_THREADS", "copy_threads")):
            v = get(var)
            if v is not None:
                kw[field] = _ints(var, v, (1,))[0]
        for var, field in (("QLORA_EXT_ATTN_HEAD_SPLIT", "attn_head_split"),
                           ("QLORA_EXT_ATTN_STORED_DS", "attn_stored_ds"), ("QLORA_EXT_WGSL_TRUSTED", "trusted"),
                           ("QLORA_EXT_NATIVE_RECORDING", "native_recording"), ("QLORA_EXT_REPLAY", "replay")):
            v = get(var)
            if v is not None:
                if v not in ("0", "1"):
                    raise ValueError(f"{var}={v!r}: expected 0 or 1")
                kw[field] = v == "1"
        v = get("QLORA_EXT_WGSL_DEBUG")
        kw["wgsl_debug"] = v is not None and v != "0"
        v = get("QLORA_EXT_SHADERS")
        if v is not None:
            if not os.path.isdir(v):
                raise ValueError(f"QLORA_EXT_SHADERS={v!r}: not a directory")
            kw["shader_dir"] = v
        v = get("QLORA_EXT_GPU_MEMORY_GIB")
        if v is not None:
            try:
                gib = float(v)
            except ValueError:
                gib = -1.0
            if not gib >= 0.0 or gib == float("inf"):
                raise ValueError(f"QLORA_EXT_GPU_MEMORY_GIB={v!r}: expected a number of GiB")
            kw["gpu_memory_gib"] = gib
        return cls(**kw)


def _ints(var: str, text: str, counts: tuple) -> tuple:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in counts or min(vals) < 1:
        want = " or ".join(str(c) for c in counts)
        raise ValueError(f"{var}={text!r}: expected {want} positive integers separated by commas")
    return vals
