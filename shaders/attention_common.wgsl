// Helpers of the GPU attention kernels, included by attention_fwd.wgsl and
// attention_bwd.wgsl (an include line naming this file): the shared bindings 0-5, staging,
// scores and accumulation.  They use names each including shader defines: the consts and
// workgroup arrays declared above the include line, and the shader's own bindings from 6 on.

// Module-scope declarations may come in any order in WGSL: the shaders' code above the
// include line uses these.
struct Params {
    batch: u32,
    t: u32,
    hq: u32,
    hkv: u32,
    has_mask: u32,
    scale: f32,
    head_split: u32,   // backward dkdv: 1 = one query head per workgroup (GQA partials), 0 = all G
}

const DP4: u32 = (HEAD_DIM + 3u) / 4u;   // vec4s per head row (zero-padded past D)
const NX: u32 = BC / TN;                 // threads across a key block (and across O's vec4s)
const NY: u32 = BR / TM;
const NT: u32 = NX * NY;
const DV4: u32 = (DP4 + NX - 1u) / NX;   // O vec4 columns per thread
const DV_EXACT: bool = DP4 % NX == 0u;   // every thread's DV4 columns lie inside the row
const CS: u32 = DK4 + 1u;                // staged chunk row stride (vec4s)
const PS: u32 = BC / 4u + 1u;            // P row stride (vec4s)

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;   // key padding (p.has_mask)
@group(0) @binding(5) var<storage, read> starts: array<i32>; // document starts (SEGMENTS)

// The first key row t may see: its document's start (SEGMENTS), else 0; t past T: 0.
fn row_start(b: u32, t: u32) -> u32 {
    if (SEGMENTS == 0u || t >= p.t) {
        return 0u;
    }
    return u32(starts[b * p.t + t]);
}

// The first key block (multiple of BC) that row block r0's queries see: the one holding the
// document start of its first row; r0 < T.  Uniform across the workgroup: b, r0 and the
// read-only starts are.
fn block_start(b: u32, r0: u32) -> u32 {
    return row_start(b, r0) / BC * BC;
}

// vec4 c4 of row t of q / dO (head h of Hq) or k / v (head h of Hkv), zero past D; the
// caller checks t < T and c4 < DP4.  The tensors are bound as vec4 arrays (buffers are whole
// vec4s): with D % 4 == 0 a row is whole vec4s and one load brings four dims; otherwise the
// four dims are picked out one by one.  The including shader defines load4(src, i).
fn fetch4(src: u32, b: u32, t: u32, h: u32, c4: u32) -> vec4<f32> {
    var nh = p.hkv;
    if (src == SRC_Q || src == SRC_DO) {
        nh = p.hq;
    }
    let row = (b * p.t + t) * nh + h;
    if (HEAD_DIM % 4u == 0u) {
        return load4(src, row * DP4 + c4);
    }
    var x = vec4<f32>(0.0);
    for (var u = 0u; u < 4u; u = u + 1u) {
        let d = c4 * 4u + u;
        if (d < HEAD_DIM) {
            let e = row * HEAD_DIM + d;
            x[u] = load4(src, e / 4u)[e % 4u];
        }
    }
    return x;
}

// ---- staging: each thread fetches its share of the next staged piece into registers
// before the current piece's arithmetic (the loads' latency hides behind it), then stores
// it to workgroup memory between two barriers.
// vec4s of one D chunk (both sides) and of one stage of VK full rows; per-thread shares.
const NCH: u32 = (BR + BC) * DK4;
const NPRE: u32 = (NCH + NT - 1u) / NT;
const NROW: u32 = VK * DP4;
const NPRE_V: u32 = (NROW + NT - 1u) / NT;
alias Chunk = array<vec4<f32>, NPRE>;
alias Rows = array<vec4<f32>, NPRE_V>;
alias Tile = array<array<f32, TN>, TM>;
alias Acc = array<array<vec4<f32>, DV4>, TM>;

// D chunk [dc, dc + DK4) (vec4s) of rows r0 .. r0 + BR of rsrc (head rh) times rmul, then
// of rows c0 .. c0 + BC of csrc (head ch) times cmul; zero past T and D.  Element e of the
// chunk is row e / DK4, vec4 e % DK4: consecutive threads read consecutive vec4s.
fn fetch_chunk(b: u32, rsrc: u32, rh: u32, r0: u32, rmul: f32, csrc: u32, ch: u32, c0: u32,
               cmul: f32, dc: u32, li: u32) -> Chunk {
    var x: Chunk;
    for (var u = 0u; u < NPRE; u = u + 1u) {
        let e = li + u * NT;
        let r = e / DK4;
        let c = dc + e % DK4;
        var val = vec4<f32>(0.0);
        // (if, not select: select reads both operands, and trusted modules have no bounds checks)
        if (r < BR) {
            if (r0 + r < p.t && c < DP4) {
                val = fetch4(rsrc, b, r0 + r, rh, c) * rmul;
            }
        } else if (r < BR + BC) {
            if (c0 + r - BR < p.t && c < DP4) {
                val = fetch4(csrc, b, c0 + r - BR, ch, c) * cmul;
            }
        }
        x[u] = val;
    }
    return x;
}

// tile_s = [BR + BC][CS]: row side, then column side; rows padded by one vec4 so that the
// column side's reads (16 consecutive rows per half warp) fall in distinct banks.
fn store_chunk(x: Chunk, li: u32) {
    for (var u = 0u; u < NPRE; u = u + 1u) {
        let e = li + u * NT;
        if (e < NCH) {
            tile_s[(e / DK4) * CS + e % DK4] = x[u];
        }
    }
}

// Rows row0 .. row0 + VK of src (head h), all DP4 vec4s, zero past T; tile_s = [VK][DP4].
fn fetch_rows(b: u32, src: u32, h: u32, row0: u32, li: u32) -> Rows {
    var x: Rows;
    for (var u = 0u; u < NPRE_V; u = u + 1u) {
        let e = li + u * NT;
        let t = row0 + e / DP4;
        var val = vec4<f32>(0.0);
        if (e < NROW && t < p.t) {
            val = fetch4(src, b, t, h, e % DP4);
        }
        x[u] = val;
    }
    return x;
}

fn store_rows(x: Rows, li: u32) {
    for (var u = 0u; u < NPRE_V; u = u + 1u) {
        let e = li + u * NT;
        if (e < NROW) {
            tile_s[e] = x[u];
        }
    }
}

fn zero_tile() -> Tile {
    var t: Tile;
    for (var i = 0u; i < TM; i = i + 1u) {
        for (var j = 0u; j < TN; j = j + 1u) {
            t[i][j] = 0.0;
        }
    }
    return t;
}

fn zero_acc() -> Acc {
    var a: Acc;
    for (var i = 0u; i < TM; i = i + 1u) {
        for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
            a[i][j4] = vec4<f32>(0.0);
        }
    }
    return a;
}

// (row side rsrc rows r0.., head rh, times rmul) . (column side csrc rows c0.., head ch,
// times cmul)^T: this thread's TM x TN tile (rows ty*TM + i, columns tx + NX*j), one fma
// per dimension in order d = 0, 1, ... (dot() plus an add costs 5 instructions per 4
// products where fma costs 4): TM*TN independent chains.
fn scores(b: u32, rsrc: u32, rh: u32, r0: u32, rmul: f32, csrc: u32, ch: u32, c0: u32,
          cmul: f32, li: u32) -> Tile {
    let tx = li % NX;
    let ty = li / NX;
    var s = zero_tile();
    var pre = fetch_chunk(b, rsrc, rh, r0, rmul, csrc, ch, c0, cmul, 0u, li);
    for (var dc = 0u; dc < DP4; dc = dc + DK4) {
        workgroupBarrier();
        store_chunk(pre, li);
        workgroupBarrier();
        if (dc + DK4 < DP4) {
            pre = fetch_chunk(b, rsrc, rh, r0, rmul, csrc, ch, c0, cmul, dc + DK4, li);
        }
        for (var d4 = 0u; d4 < DK4; d4 = d4 + 1u) {
            var a: array<vec4<f32>, TM>;
            var c: array<vec4<f32>, TN>;
            for (var i = 0u; i < TM; i = i + 1u) {
                a[i] = tile_s[(ty * TM + i) * CS + d4];
            }
            for (var j = 0u; j < TN; j = j + 1u) {
                c[j] = tile_s[(BR + tx + NX * j) * CS + d4];
            }
            for (var u = 0u; u < 4u; u = u + 1u) {
                for (var i = 0u; i < TM; i = i + 1u) {
                    for (var j = 0u; j < TN; j = j + 1u) {
                        s[i][j] = fma(a[i][u], c[j][u], s[i][j]);
                    }
                }
            }
        }
    }
    return s;
}

// This thread's tile of a [BR][BC] matrix into p_s.
fn stage(t: Tile, li: u32) {
    let tx = li % NX;
    let ty = li / NX;
    for (var i = 0u; i < TM; i = i + 1u) {
        for (var j = 0u; j < TN; j = j + 1u) {
            let c = tx + NX * j;
            p_s[(ty * TM + i) * PS + c / 4u][c % 4u] = t[i][j];
        }
    }
}

// acc += p_s [BR][BC] @ (rows c0 .. c0 + BC of src, head h) [BC][D], VK rows at a time;
// `first` = fetch_rows(b, src, h, c0, li), fetched by the caller before its elementwise work.
// The thread owns rows ty*TM + i and vec4 columns tx + NX*j4 of acc.
fn accumulate(acc: ptr<function, Acc>, b: u32, src: u32, h: u32, c0: u32, first: Rows, li: u32) {
    let tx = li % NX;
    let ty = li / NX;
    var pre = first;
    for (var kc = 0u; kc < BC; kc = kc + VK) {
        workgroupBarrier();
        store_rows(pre, li);
        workgroupBarrier();
        if (kc + VK < BC) {
            pre = fetch_rows(b, src, h, c0 + kc + VK, li);
        }
        for (var kk4 = 0u; kk4 < VK / 4u; kk4 = kk4 + 1u) {
            var pv: array<vec4<f32>, TM>;
            for (var i = 0u; i < TM; i = i + 1u) {
                pv[i] = p_s[(ty * TM + i) * PS + kc / 4u + kk4];
            }
            for (var u = 0u; u < 4u; u = u + 1u) {
                for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
                    let c4 = tx + NX * j4;
                    if (DV_EXACT || c4 < DP4) {
                        let zr = tile_s[(kk4 * 4u + u) * DP4 + c4];
                        for (var i = 0u; i < TM; i = i + 1u) {
                            (*acc)[i][j4] = (*acc)[i][j4] + pv[i][u] * zr;
                        }
                    }
                }
            }
        }
    }
}
