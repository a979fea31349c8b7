// fp32 GEMM of the GPU device for the products whose weight is not NF4 (the LM head's dW,
// the rank-r LoRA products):
//   C[M, N] = alpha * op(A) @ op(B) + (accumulate ? C : 0)
//   op(A) is [M, K]: A stored [M, K] (trans_a = 0) or [K, M] (trans_a = 1);
//   op(B) is [K, N]: B stored [K, N] (trans_b = 0) or [N, K] (trans_b = 1);
// all row-major f32, starting at element offsets a_off, b_off, c_off of their buffers (so a
// chunk of rows is addressed without binding a sub-range).  Out-of-range elements load as 0
// and are not stored.
//
// Entry `gemm` (shapes with both sides of C over 64): workgroup (TN/4, TM/4) threads computes
// a TM x TN block of C, 4 x 4 outputs per thread, staging TK-deep slices of op(A) and op(B)
// in workgroup memory; grid (ceil(N / TN), ceil(M / TM), splits).  The next slice is loaded
// into registers (as vec4s where aligned) while the current one is multiplied: the rank-r
// products, which read each element once for r FMAs, are bound by the loads in flight.
// Split K (splits > 1): workgroup z takes k in [z * k_chunk, (z + 1) * k_chunk) and stores its
// partial product at c_off + z * M * N (a scratch [splits, M, N], never accumulated); entry
// `reduce_splits` then sums the partials into C (+ C when accumulate), one thread per element.
//
// Entry `skinny` (one side of C short: the rank-r products; one dispatch, no scratch): a
// workgroup of 256 threads computes SKINNY_ROWS rows by 4·RC4 columns of C, grid
// (ceil(M / SKINNY_ROWS), ceil(N / (4·RC4))), as rows × lk k lanes (rows·lk = 256).  Lane ik
// of a row sums k = ik, ik + lk, ... in ascending order for all its columns at once, four k a
// round with the round's loads issued before its FMAs (these products read each element of A
// once for r FMAs: the loads in flight set their speed); the workgroup then adds its lanes'
// sums in a fixed order.  KFAST (op(A) stored [M, K]): 4 rows × 64 lanes, a warp reading 32
// consecutive k of a row; else 8 rows × 32 lanes, a warp reading 8 consecutive rows (one
// 32-byte sector) at each of 4 k.  An element's result depends on K, KFAST and its operands
// only, never on M, N or the grid: the same token row gives the same bits whatever rows share
// the call.  With c_trans = 1, element (i, j) of C is stored at c_off + j * M + i (the host
// swaps the operands to make a short M the short N).
struct Params {
    m: u32,
    n: u32,
    k: u32,
    trans_a: u32,
    trans_b: u32,
    accumulate: u32,
    alpha: f32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    k_chunk: u32,    // K per split (= K without splitting)
    splits: u32,     // reduce_splits: number of partials
    dst_off: u32,    // reduce_splits: where C starts in `dst`
    c_trans: u32,    // skinny: C stored transposed
}

override TM: u32 = 64u;
override TN: u32 = 64u;
override TK: u32 = 16u;     // a multiple of 4, at most 2 * min(TM, TN) (8 vec4 loads a thread)
override A_VEC: bool = false;   // `gemm`: read op(A) as whole vec4s along its stored rows (the
override B_VEC: bool = false;   // host sets these where that run's extent and offset are multiples of 4)
// vec4s of an A / B slice each thread stages, ceil(TK·TM/4 / threads) and ceil(TK·TN/4 /
// threads), set by the host (constant loop bounds: the driver keeps only these registers of
// the MAX_STAGED-long arrays).  Declared up here: declared after `const MAX_STAGED` and the
// functions, they made naga 29's override processing panic at pipeline creation.
override SA: u32 = 1u;
override SB: u32 = 1u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;   // read as floats or whole vec4s
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;  // reduce_splits only

override RC4: u32 = 4u;       // skinny: vec4 column groups of C per workgroup (1 to 4)
override KFAST: bool = true;  // skinny: op(A) stored [M, K] (a warp along k)
override S_VEC: bool = false; // skinny: op(B)'s column groups as vec4s (B stored [K, N], aligned)
override SKINNY_ROWS: u32 = 8u;                  // skinny: rows of C per workgroup (4 or 8)
override SKINNY_LANES: u32 = 256u / SKINNY_ROWS;  // skinny: k lanes per row

var<workgroup> a_s: array<f32, TK * TM>;   // [TK][TM]
var<workgroup> b_s: array<f32, TK * TN>;   // [TK][TN]
// skinny: the lanes' sums, [RC4][SKINNY_LANES][SKINNY_ROWS]
var<workgroup> sk_s: array<vec4<f32>, 256u * RC4>;

// (k, index) of element e of a staged [depth][count] block: where the stored operand runs along
// k (along_k), consecutive threads take consecutive k, else consecutive indices; either way
// they read consecutive addresses (coalesced).
fn staged(e: u32, count: u32, depth: u32, along_k: bool) -> vec2<u32> {
    if (along_k) {
        return vec2<u32>(e % depth, e / depth);
    }
    return vec2<u32>(e / count, e % count);
}

// element (row, kk) of op(A): A stored [M, K] (stored_mk) or [K, M]
fn a_index_of(row: u32, kk: u32, stored_mk: bool) -> u32 {
    return p.a_off + select(kk * p.m + row, row * p.k + kk, stored_mk);
}

fn a_index(row: u32, kk: u32) -> u32 {
    return a_index_of(row, kk, p.trans_a == 0u);
}

fn b_index(kk: u32, col: u32) -> u32 {
    return select(p.b_off + kk * p.n + col, p.b_off + col * p.k + kk, p.trans_b != 0u);
}

fn load_a(row: u32, kk: u32, kend: u32) -> f32 {
    if (row >= p.m || kk >= kend) {
        return 0.0;
    }
    let i = a_index(row, kk);
    return a[i >> 2u][i & 3u];
}

// skinny: op(A)[row, kk] of a row and k inside op(A), the layout from the constant KFAST
fn a_at_row(row: u32, kk: u32) -> f32 {
    let i = a_index_of(row, kk, KFAST);
    return a[i >> 2u][i & 3u];
}

fn load_b(kk: u32, col: u32, kend: u32) -> f32 {
    if (col >= p.n || kk >= kend) {
        return 0.0;
    }
    let i = b_index(kk, col);
    return b[i >> 2u][i & 3u];
}

// `gemm` staging.  Operand side 0 is op(A), its slice [TK][TM] in a_s; side 1 is op(B), [TK][TN]
// in b_s.  Vec4 group g of a slice is elements 4g .. 4g + 3 of it in staged() order, four
// consecutive addresses of the stored operand.  They are fetched into registers (one vec4
// load with A_VEC / B_VEC, else four checked loads) a slice ahead of the arithmetic, then
// stored to workgroup memory.  Each call passes side as a literal, so the selects on it fold.
const MAX_STAGED: u32 = 8u;

// (slice columns, whether the stored operand runs along k, vec4 groups per thread) of a side
fn slice_shape(side: u32) -> vec3<u32> {
    if (side == 0u) {
        return vec3<u32>(TM, u32(p.trans_a == 0u), SA);
    }
    return vec3<u32>(TN, u32(p.trans_b != 0u), SB);
}

// (k, idx, 1 if it exists) of the thread's u-th group of a side's slice
fn slice_group(side: u32, u: u32, li: u32) -> vec3<u32> {
    let sh = slice_shape(side);
    let g = li + u * ((TN / 4u) * (TM / 4u));
    let at = staged(4u * g, sh.x, TK, sh.y != 0u);
    return vec3<u32>(at, u32(g < TK * sh.x / 4u));
}

// element (kk, idx) of a side: idx is op(A)'s row or op(B)'s column
fn load_op(side: u32, idx: u32, kk: u32, kend: u32) -> f32 {
    if (side == 0u) {
        return load_a(idx, kk, kend);
    }
    return load_b(kk, idx, kend);
}

// the vec4 of a side's stored operand holding element (kk, idx) first (the caller checks
// that its group is whole vec4s: A_VEC / B_VEC)
fn load_op4(side: u32, idx: u32, kk: u32, kend: u32) -> vec4<f32> {
    if (side == 0u) {
        if (idx < p.m && kk < kend) {
            return a[a_index(idx, kk) >> 2u];
        }
    } else if (idx < p.n && kk < kend) {
        return b[b_index(kk, idx) >> 2u];
    }
    return vec4<f32>(0.0);
}

// the thread's groups of a side's slice at k0 (idx0: the tile's first row or column)
fn fetch_slice(r: ptr<function, array<vec4<f32>, MAX_STAGED>>, side: u32, idx0: u32, k0: u32, kend: u32,
               li: u32) {
    let sh = slice_shape(side);
    let along_k = sh.y != 0u;
    for (var u = 0u; u < sh.z; u = u + 1u) {
        let at = slice_group(side, u, li);
        if (at.z == 0u) {
            continue;
        }
        let idx = idx0 + at.y;
        let kk = k0 + at.x;
        if (select(A_VEC, B_VEC, side == 1u)) {
            (*r)[u] = load_op4(side, idx, kk, kend);
        } else {
            // the four consecutive addresses: along k, or along the rows / columns
            let dk = select(0u, 1u, along_k);
            let di = 1u - dk;
            (*r)[u] = vec4<f32>(load_op(side, idx, kk, kend), load_op(side, idx + di, kk + dk, kend),
                                load_op(side, idx + 2u * di, kk + 2u * dk, kend),
                                load_op(side, idx + 3u * di, kk + 3u * dk, kend));
        }
    }
}

// the fetched groups of a side into its workgroup slice
fn store_slice(r: ptr<function, array<vec4<f32>, MAX_STAGED>>, side: u32, li: u32) {
    let sh = slice_shape(side);
    let along_k = sh.y != 0u;
    for (var u = 0u; u < sh.z; u = u + 1u) {
        let at = slice_group(side, u, li);
        if (at.z == 0u) {
            continue;
        }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let e = select(at.x * sh.x + at.y + j, (at.x + j) * sh.x + at.y, along_k);
            if (side == 0u) {
                a_s[e] = (*r)[u][j];
            } else {
                b_s[e] = (*r)[u][j];
            }
        }
    }
}

@compute @workgroup_size(TN / 4u, TM / 4u)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    var acc: array<vec4<f32>, 4>;
    for (var r = 0u; r < 4u; r = r + 1u) {
        acc[r] = vec4<f32>(0.0);
    }
    let kbeg = wid.z * p.k_chunk;
    let kend = min(p.k, kbeg + p.k_chunk);
    var ra: array<vec4<f32>, MAX_STAGED>;
    var rb: array<vec4<f32>, MAX_STAGED>;
    fetch_slice(&ra, 0u, row0, kbeg, kend, li);
    fetch_slice(&rb, 1u, col0, kbeg, kend, li);
    for (var k0 = kbeg; k0 < kend; k0 = k0 + TK) {
        store_slice(&ra, 0u, li);
        store_slice(&rb, 1u, li);
        workgroupBarrier();
        if (k0 + TK < kend) {
            // the next slice's loads are in flight during this slice's FMAs
            fetch_slice(&ra, 0u, row0, k0 + TK, kend, li);
            fetch_slice(&rb, 1u, col0, k0 + TK, kend, li);
        }
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let bv = vec4<f32>(b_s[kk * TN + lid.x * 4u], b_s[kk * TN + lid.x * 4u + 1u],
                               b_s[kk * TN + lid.x * 4u + 2u], b_s[kk * TN + lid.x * 4u + 3u]);
            for (var r = 0u; r < 4u; r = r + 1u) {
                acc[r] = acc[r] + a_s[kk * TM + lid.y * 4u + r] * bv;
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r = r + 1u) {
        let row = row0 + lid.y * 4u + r;
        if (row >= p.m) {
            continue;
        }
        for (var cc = 0u; cc < 4u; cc = cc + 1u) {
            let col = col0 + lid.x * 4u + cc;
            if (col < p.n) {
                let idx = p.c_off + wid.z * p.m * p.n + row * p.n + col;
                var val = p.alpha * acc[r][cc];
                if (p.accumulate != 0u) {
                    val = val + c[idx];
                }
                c[idx] = val;
            }
        }
    }
}

// dst[dst_off + i] = (accumulate ? dst[dst_off + i] : 0) + sum_z c[z * M * N + i], i < M * N;
// linear id over (wid.x + wid.y * num_workgroups.x) * 256 + lane.
@compute @workgroup_size(256)
fn reduce_splits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + li;
    let mn = p.m * p.n;
    if (i >= mn) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < p.splits; z = z + 1u) {
        s = s + c[z * mn + i];
    }
    if (p.accumulate != 0u) {
        s = s + dst[p.dst_off + i];
    }
    dst[p.dst_off + i] = s;
}

// skinny: C[row, col..col+3] = alpha * v (+ C), the columns and row that lie in C
fn skinny_store(row: u32, col: u32, v: vec4<f32>) {
    if (row >= p.m) {
        return;
    }
    for (var cc = 0u; cc < 4u; cc = cc + 1u) {
        if (col + cc < p.n) {
            var idx = p.c_off + row * p.n + col + cc;
            if (p.c_trans != 0u) {
                idx = p.c_off + (col + cc) * p.m + row;
            }
            var val = p.alpha * v[cc];
            if (p.accumulate != 0u) {
                val = val + c[idx];
            }
            c[idx] = val;
        }
    }
}

// skinny: op(B)[k, col .. col + 3].  Branch-free (the loads of a round stay in flight
// together): a column past N reads column N - 1, and only its own column of the sums, never
// stored, sees it.
fn skinny_b(kk: u32, col: u32) -> vec4<f32> {
    if (S_VEC) {
        return b[b_index(kk, min(col, p.n - 4u)) >> 2u];
    }
    let last = p.n - 1u;
    var v: vec4<f32>;
    for (var j = 0u; j < 4u; j = j + 1u) {
        let i = b_index(kk, min(col + j, last));
        v[j] = b[i >> 2u][i & 3u];
    }
    return v;
}

@compute @workgroup_size(256)
fn skinny(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let ik = select(li / SKINNY_ROWS, li % SKINNY_LANES, KFAST);
    let ix = select(li % SKINNY_ROWS, li / SKINNY_LANES, KFAST);
    let row = wid.x * SKINNY_ROWS + ix;
    let col0 = wid.y * RC4 * 4u;
    let lk = SKINNY_LANES;
    var acc: array<vec4<f32>, 4>;
    for (var q = 0u; q < 4u; q = q + 1u) {
        acc[q] = vec4<f32>(0.0);
    }
    if (row < p.m) {
        var kk = ik;
        for (; kk + 3u * lk < p.k; kk = kk + 4u * lk) {
            // a round: every load first, then the FMAs in k order
            let v = vec4<f32>(a_at_row(row, kk), a_at_row(row, kk + lk), a_at_row(row, kk + 2u * lk),
                              a_at_row(row, kk + 3u * lk));
            var sv: array<vec4<f32>, 16>;
            for (var j = 0u; j < 4u; j = j + 1u) {
                for (var q = 0u; q < RC4; q = q + 1u) {
                    sv[j * 4u + q] = skinny_b(kk + j * lk, col0 + 4u * q);
                }
            }
            for (var j = 0u; j < 4u; j = j + 1u) {
                for (var q = 0u; q < RC4; q = q + 1u) {
                    acc[q] = fma(vec4<f32>(v[j]), sv[j * 4u + q], acc[q]);
                }
            }
        }
        for (; kk < p.k; kk = kk + lk) {
            let v = a_at_row(row, kk);
            for (var q = 0u; q < RC4; q = q + 1u) {
                acc[q] = fma(vec4<f32>(v), skinny_b(kk, col0 + 4u * q), acc[q]);
            }
        }
    }
    // the lanes' sums at [q][ik][ix], added in a fixed order: each run of 8 lanes in lane
    // order into its first lane, then the runs' sums in run order (two short dependent chains,
    // one barrier between them)
    for (var q = 0u; q < RC4; q = q + 1u) {
        sk_s[(q * lk + ik) * SKINNY_ROWS + ix] = acc[q];
    }
    workgroupBarrier();
    let runs = lk / 8u;
    if (li < RC4 * runs * SKINNY_ROWS) {
        let e = ((li / SKINNY_ROWS) * 8u) * SKINNY_ROWS + li % SKINNY_ROWS;   // (q, run, row) -> lane 8·run
        var t = sk_s[e];
        for (var j = 1u; j < 8u; j = j + 1u) {
            t = t + sk_s[e + j * SKINNY_ROWS];
        }
        sk_s[e] = t;
    }
    workgroupBarrier();
    if (li < RC4 * SKINNY_ROWS) {
        let q = li / SKINNY_ROWS;
        let ox = li % SKINNY_ROWS;
        var t = sk_s[q * lk * SKINNY_ROWS + ox];
        for (var j = 1u; j < runs; j = j + 1u) {
            t = t + sk_s[(q * lk + 8u * j) * SKINNY_ROWS + ox];
        }
        skinny_store(wid.x * SKINNY_ROWS + ox, col0 + 4u * q, t);
    }
}
