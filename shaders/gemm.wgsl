// gemm.wgsl: register-tiled GEMM of fp32 A and NF4 B, B dequantized while it is staged in
// workgroup memory; optional LoRA term as extra K tiles.  (fp32 B: shaders/gemm_f32.wgsl.)
//
//   C[M, N]  (= or +=)  A[M, K] · op(B)  +  T[M, R] · op(L)
//
//   A  fp32, row-major, row stride lda, first element at a_off (elements).
//   B  stored row-major: B_T = true  -> stored [N, K] (an HF weight W[out, in] in x · Wᵀ);
//                        B_T = false -> stored [K, N] (W in dy · W).   Row stride ldb.
//      The stored matrix is one or two NF4 tensors stacked by rows (gate over up):
//      stored rows < split are part 0 (words from 0, blocks from 0), the rest part 1 (words
//      from code_off1, blocks from abs_off1).  Element e of a part (row-major, row length ldb)
//      sits in word e/8, byte (e/2)%4 (little-endian), high nibble when e is even; its value is
//      NF4_CODE[nibble] * absmax[e >> bs_shift], the same float32 product as dequantize_nf4.
//   L  LORA = 1: stored [N, R];  LORA = 2: stored [R, N].  T [M, R] row stride ldt, first
//      element at t_off.  The LoRA scale is folded into T or L by the host.  The LoRA term runs
//      as ceil(R / BK) extra K tiles after the main ones (A tile from T, B tile from L), so the
//      epilogue stays a plain store: a loop over R there kept the accumulators out of registers
//      (12x slower on an H200).
//   C  row stride ldc, first element at c_off.
//
// Tiling: a workgroup of WGX × WGY threads owns a BM × BN tile of C (BM = WGY·TM, BN = WGX·TN);
// each thread holds TM × TN accumulators (TM, TN multiples of 4) whose rows are 4-row groups
// spaced WGY·4 apart and whose columns are vec4 groups spaced WGX·4 apart.  Workgroup memory
// holds the A tile transposed ([k][m]) and the B tile as [k][n], so one k step is TM/4 + TN/4
// vec4 reads per thread for TM·TN FMAs.  K advances BK at a time through two workgroup buffers:
// tile t+1 is fetched into registers (B: the raw code word and its block scale) while tile t
// is multiplied, then stored, dequantized, into the other buffer; one barrier per K tile.
// Inside a tile the reads of k step kk+1 are issued before the FMAs of step kk (two register
// sets, the k loop unrolled by two), so the shared-memory latency can hide behind arithmetic
// while the driver keeps the k loop rolled; unrolled in the source, the loop ran the NF4
// projections 10-20% slower on an H200 (bench/bench_gemm_ceiling.py, BENCHMARKS.md).
// Threads keep the row-major order of local_invocation_id: a warp spanning 8 × 4 threads
// (fewer distinct addresses per shared-memory read) ran 15-25% slower on an H200.
// Loads: A as gemm_tiles.wgsl says (a warp reads runs of BK floats along k); B stored [N, K]
// likewise (thread idx takes row idx / KW and code word idx % KW of it); B stored [K, N] is
// read with lanes along n and stored as whole vec4s.
// The *_VEC constants select vec4 (A, C) / whole-word (B) loads and stores; the host sets
// them only when strides, offsets and extents are multiples of 4 (8).

struct Params {
    M: u32, N: u32, K: u32, lda: u32,
    ldb: u32, ldc: u32, a_off: u32, c_off: u32,
    R: u32, ldt: u32, t_off: u32, split: u32,
    code_off1: u32, abs_off1: u32, bs_shift: u32, pad: u32,
}

override WGX: u32 = 8u;
override WGY: u32 = 8u;
override TM: u32 = 4u;
override TN: u32 = 4u;
override BK: u32 = 8u;
override B_T: bool = true;
override A_VEC: bool = false;
override B_VEC: bool = false;
override C_VEC: bool = false;
override LORA: u32 = 0u;
override ACCUM: bool = false;

override BM: u32 = WGY * TM;
override BN: u32 = WGX * TN;
override NT: u32 = WGX * WGY;
override KW: u32 = BK / 8u;     // code words (8 elements each) in a tile row of B stored [N, K]
override TM4: u32 = TM / 4u;
override TN4: u32 = TN / 4u;
// per-thread loads of one K tile: A in vec4s, B in 8-element words
override A_LOADS: u32 = (BM * BK / 4u + NT - 1u) / NT;
override B_LOADS: u32 = (BN * BK / 8u + NT - 1u) / NT;
override L_LOADS: u32 = (BN * BK / 4u + NT - 1u) / NT;   // a LoRA tile of L, in vec4s

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> codes: array<u32>;
@group(0) @binding(3) var<storage, read> absmax: array<f32>;
@group(0) @binding(4) var<storage, read> lt: array<f32>;
@group(0) @binding(5) var<storage, read> ll: array<f32>;
@group(0) @binding(6) var<storage, read_write> c: array<vec4<f32>>;

//!include gemm_tiles

var<workgroup> As: array<vec4<f32>, 2u * BK * BM / 4u>;   // [2][BK][BM]
var<workgroup> Bs: array<vec4<f32>, 2u * BK * BN / 4u>;   // [2][BK][BN]
var<workgroup> lut: array<f32, 16>;

const NF4_CODE = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0);

fn a_at(i: u32) -> f32 { return a[i >> 2u][i & 3u]; }

// NF4 element `col` of stored row `row` (both in range): the part's word and its block scale
fn nf4_elem(row: u32, col: u32) -> f32 {
    let p1 = row >= P.split;
    let e = select(row, row - P.split, p1) * P.ldb + col;
    let w = codes[select(0u, P.code_off1, p1) + (e >> 3u)];
    let sh = ((e >> 1u) & 3u) * 8u + select(0u, 4u, (e & 1u) == 0u);
    return lut[(w >> sh) & 15u] * absmax[select(0u, P.abs_off1, p1) + (e >> P.bs_shift)];
}

// The 8 elements of an NF4 word: element j in byte j/2, high nibble first
fn nf4_word(w: u32, s: f32, j: u32) -> f32 {
    return lut[(w >> ((j >> 1u) * 8u + select(0u, 4u, (j & 1u) == 0u))) & 15u] * s;
}

// element (k, n) of B buffer `buf` ([k][n] layout)
fn store_b(buf: u32, k: u32, n: u32, v: f32) {
    let i = (buf * BK + k) * BN + n;
    Bs[i >> 2u][i & 3u] = v;
}

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let tx = lid.x;
    let ty = lid.y;
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let M = P.M;
    let N = P.N;
    let K = P.K;
    let ntm = (K + BK - 1u) / BK;                                   // tiles of A · op(B)
    let ntiles = ntm + select(0u, (P.R + BK - 1u) / BK, LORA != 0u); // + tiles of T · op(L)

    if (li < 16u) {
        lut[li] = NF4_CODE[li];
    }
    workgroupBarrier();

    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < TM4 * 4u * TN4; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    // prefetch registers: A (vec4), B (NF4 word bits + scale in .x/.y)
    var ra: array<vec4<f32>, 8>;
    var rb: array<vec4<f32>, 8>;

    for (var t = 0u; t <= ntiles; t++) {
        // -- fetch K tile t into registers (t == ntiles: nothing left to fetch) ---------------
        if (t >= ntm && t < ntiles) {
            fetch_lora(&ra, &rb, (t - ntm) * BK, m0, n0, li);   // LoRA tile: A from T, B from L
        } else if (t < ntiles) {
            let kf = t * BK;   // first k of the fetched tile
            fetch_a(&ra, kf, m0, li);
            for (var i = 0u; i < B_LOADS; i++) {
                let idx = li + i * NT;
                var v = vec4<f32>(0.0);
                // one word = 8 elements along the stored row
                var row: u32; var col: u32; var ok: bool;
                if (B_T) {
                    row = n0 + idx / KW; col = kf + (idx % KW) * 8u;
                    ok = idx < BN * BK / 8u && row < N;
                } else {
                    row = kf + idx / (BN / 8u); col = n0 + (idx % (BN / 8u)) * 8u;
                    ok = idx < BN * BK / 8u && row < K;
                }
                if (ok && B_VEC && col < P.ldb) {
                    let p1 = row >= P.split;
                    let e = select(row, row - P.split, p1) * P.ldb + col;
                    v.x = bitcast<f32>(codes[select(0u, P.code_off1, p1) + (e >> 3u)]);
                    v.y = absmax[select(0u, P.abs_off1, p1) + (e >> P.bs_shift)];
                }
                // !B_VEC: elements are read one by one at store time (below)
                rb[i] = v;
            }
        }

        // -- multiply K tile t - 1 (in buffer (t - 1) & 1) ------------------------------------
        if (t > 0u) {
            // vec4 index of this thread's first A / B group at k = 0 of the buffer
            let ab = ((t - 1u) & 1u) * BK * BM / 4u + ty;
            let bb = ((t - 1u) & 1u) * BK * BN / 4u + tx;
            var fa0: array<vec4<f32>, 4>;
            var fb0: array<vec4<f32>, 4>;
            var fa1: array<vec4<f32>, 4>;
            var fb1: array<vec4<f32>, 4>;
            for (var r = 0u; r < TM4; r++) { fa0[r] = As[ab + r * WGY]; }
            for (var q = 0u; q < TN4; q++) { fb0[q] = Bs[bb + q * WGX]; }
            for (var kk = 0u; kk < BK; kk += 2u) {
                let k1 = kk + 1u;
                for (var r = 0u; r < TM4; r++) { fa1[r] = As[ab + k1 * (BM / 4u) + r * WGY]; }
                for (var q = 0u; q < TN4; q++) { fb1[q] = Bs[bb + k1 * (BN / 4u) + q * WGX]; }
                for (var r = 0u; r < TM4; r++) {
                    for (var i = 0u; i < 4u; i++) {
                        let s = vec4<f32>(fa0[r][i]);
                        for (var q = 0u; q < TN4; q++) {
                            let o = (r * 4u + i) * TN4 + q;
                            acc[o] = fma(s, fb0[q], acc[o]);
                        }
                    }
                }
                // step kk + 2 of this tile (the last pair re-reads step BK - 1, unused)
                let k2 = min(kk + 2u, BK - 1u);
                for (var r = 0u; r < TM4; r++) { fa0[r] = As[ab + k2 * (BM / 4u) + r * WGY]; }
                for (var q = 0u; q < TN4; q++) { fb0[q] = Bs[bb + k2 * (BN / 4u) + q * WGX]; }
                for (var r = 0u; r < TM4; r++) {
                    for (var i = 0u; i < 4u; i++) {
                        let s = vec4<f32>(fa1[r][i]);
                        for (var q = 0u; q < TN4; q++) {
                            let o = (r * 4u + i) * TN4 + q;
                            acc[o] = fma(s, fb1[q], acc[o]);
                        }
                    }
                }
            }
        }

        // -- store the fetched tile t into buffer t & 1 ---------------------------------------
        if (t < ntiles) {
            let k0 = t * BK;
            let nxt = t & 1u;
            store_a_tile(&ra, nxt, li);
            if (t >= ntm) {
                for (var i = 0u; i < L_LOADS; i++) {
                    let idx = li + i * NT;
                    if (idx < BN * BK / 4u) {
                        Bs[(nxt * BK * BN + (idx / (BN / 4u)) * BN) / 4u + idx % (BN / 4u)] = rb[i];
                    }
                }
            } else {
            for (var i = 0u; i < B_LOADS; i++) {
                let idx = li + i * NT;
                if (idx < BN * BK / 8u) {
                    let w = bitcast<u32>(rb[i].x);
                    let s = rb[i].y;
                    if (B_T) {
                        // word of stored row n0 + nb, k from k0 + kb: eight rows of Bs
                        let nb = idx / KW;
                        let kb = (idx % KW) * 8u;
                        let ok = n0 + nb < N;
                        for (var j = 0u; j < 8u; j++) {
                            var v = 0.0;
                            if (ok && k0 + kb + j < P.ldb) {
                                if (B_VEC) { v = nf4_word(w, s, j); } else { v = nf4_elem(n0 + nb, k0 + kb + j); }
                            }
                            store_b(nxt, kb + j, nb, v);
                        }
                    } else {
                        // word of stored row k0 + kb, n from n0 + nb: two vec4s of one Bs row
                        let kb = idx / (BN / 8u);
                        let nb = (idx % (BN / 8u)) * 8u;
                        let ok = k0 + kb < K;
                        var h: array<vec4<f32>, 2>;
                        for (var j = 0u; j < 8u; j++) {
                            var v = 0.0;
                            if (ok && n0 + nb + j < P.ldb) {
                                if (B_VEC) { v = nf4_word(w, s, j); } else { v = nf4_elem(k0 + kb, n0 + nb + j); }
                            }
                            h[j >> 2u][j & 3u] = v;
                        }
                        let o = ((nxt * BK + kb) * BN + nb) / 4u;
                        Bs[o] = h[0];
                        Bs[o + 1u] = h[1];
                    }
                }
            }
            }
        }
        workgroupBarrier();
    }

    store_c(&acc, m0, n0, tx, ty, P.c_off);
}
