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
// products, which read each element once for r FMAs, are bound by the loads in flight.  Split K (splits > 1):
// workgroup z takes k in [z * k_chunk, (z + 1) * k_chunk) and stores its partial product at
// c_off + z * M * N (a scratch [splits, M, N], never accumulated); entry `reduce_splits` then
// sums the partials into C (+ C when accumulate), one thread per element.
//
// Entry `skinny` (one side of C short: the rank-r products; one dispatch, no scratch):
// workgroup ((SL/4) * (SS/4) * SP) threads computes an SL x SS block of C, grid
// (ceil(M / SL), ceil(N / SS)).  Each 4 x 4 micro-tile of the block has SP threads ("slices")
// that split K among themselves: slice s sums k = s, s + SP, s + 2 SP, ... in ascending
// order (SK-deep steps staged in workgroup memory), then the slices' sums are added in a
// fixed tree (s + SP/2 into s, then SP/4, ...).  An element's result thus depends on K, SP
// and its operands only, never on M, N or the tile sizes: the same token row gives the same
// bits whatever rows share the call.  With c_trans = 1, element (i, j) of C is stored at
// c_off + j * M + i (the host swaps the operands to make a short M the short N).
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

override SL: u32 = 16u;     // skinny: rows of C per workgroup, a multiple of 4
override SS: u32 = 16u;     // skinny: columns of C per workgroup, a multiple of 4
override SP: u32 = 16u;     // skinny: K slices per micro-tile, a power of two
override SK: u32 = 32u;     // skinny: k staged per step, a multiple of SP
override SMEM: u32 = 512u;  // skinny: vec4s of workgroup memory, >= SK (SL + SS) / 4 and >= SP/2 (SL/4) (SS/4) 4

var<workgroup> a_s: array<f32, TK * TM>;   // [TK][TM]
var<workgroup> b_s: array<f32, TK * TN>;   // [TK][TN]
// skinny: the staged op(A) [SK][SL/4] then op(B) [SK][SS/4] (vec4 over rows / columns); after
// the k loop the slices' partial micro-tiles
var<workgroup> sk_s: array<vec4<f32>, SMEM>;

// (k, index) of element e of a staged [depth][count] block: where the stored operand runs along
// k (along_k), consecutive threads take consecutive k, else consecutive indices; either way
// they read consecutive addresses (coalesced).
fn staged(e: u32, count: u32, depth: u32, along_k: bool) -> vec2<u32> {
    if (along_k) {
        return vec2<u32>(e % depth, e / depth);
    }
    return vec2<u32>(e / count, e % count);
}

fn a_index(row: u32, kk: u32) -> u32 {
    return select(p.a_off + row * p.k + kk, p.a_off + kk * p.m + row, p.trans_a != 0u);
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

@compute @workgroup_size((SL / 4u) * (SS / 4u) * SP)
fn skinny(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let rq = SL / 4u;             // row quads of the block
    let cq = SS / 4u;             // column quads
    let tiles = rq * cq;          // micro-tiles
    let nthreads = tiles * SP;
    let g = li % tiles;           // consecutive threads: micro-tiles of one slice
    let slice = li / tiles;
    let gr = g / cq;
    let gc = g % cq;
    let row0 = wid.x * SL;
    let col0 = wid.y * SS;
    let b_base = SK * rq;
    // rows 0..3 of the thread's micro-tile, named (not an indexed array) so they stay in registers
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 = k0 + SK) {
        for (var e = li; e < SK * rq; e = e + nthreads) {
            let at = staged(e, rq, SK, p.trans_a == 0u);
            let kk = k0 + at.x;
            let row = row0 + 4u * at.y;
            sk_s[at.x * rq + at.y] = vec4<f32>(load_a(row, kk, p.k), load_a(row + 1u, kk, p.k),
                                               load_a(row + 2u, kk, p.k), load_a(row + 3u, kk, p.k));
        }
        for (var e = li; e < SK * cq; e = e + nthreads) {
            let at = staged(e, cq, SK, p.trans_b != 0u);
            let kk = k0 + at.x;
            let col = col0 + 4u * at.y;
            sk_s[b_base + at.x * cq + at.y] = vec4<f32>(load_b(kk, col, p.k), load_b(kk, col + 1u, p.k),
                                                        load_b(kk, col + 2u, p.k), load_b(kk, col + 3u, p.k));
        }
        workgroupBarrier();
        // only k < K: a padded step adds no (+0) terms, so the sum does not depend on SK
        let kn = min(SK, p.k - k0);
        for (var kk = slice; kk < kn; kk = kk + SP) {
            let av = sk_s[kk * rq + gr];
            let bv = sk_s[b_base + kk * cq + gc];
            acc0 = acc0 + av.x * bv;
            acc1 = acc1 + av.y * bv;
            acc2 = acc2 + av.z * bv;
            acc3 = acc3 + av.w * bv;
        }
        workgroupBarrier();
    }
    // slices [h, 2h) hand their sums to [0, h), h = SP/2, SP/4, ..., 1
    for (var h = SP / 2u; h > 0u; h = h / 2u) {
        if (slice >= h && slice < 2u * h) {
            let base = ((slice - h) * tiles + g) * 4u;
            sk_s[base] = acc0;
            sk_s[base + 1u] = acc1;
            sk_s[base + 2u] = acc2;
            sk_s[base + 3u] = acc3;
        }
        workgroupBarrier();
        if (slice < h) {
            let base = (slice * tiles + g) * 4u;
            acc0 = acc0 + sk_s[base];
            acc1 = acc1 + sk_s[base + 1u];
            acc2 = acc2 + sk_s[base + 2u];
            acc3 = acc3 + sk_s[base + 3u];
        }
        workgroupBarrier();
    }
    if (slice != 0u) {
        return;
    }
    let row = row0 + gr * 4u;
    let col = col0 + gc * 4u;
    skinny_store(row, col, acc0);
    skinny_store(row + 1u, col, acc1);
    skinny_store(row + 2u, col, acc2);
    skinny_store(row + 3u, col, acc3);
}
