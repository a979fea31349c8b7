// gemm_f32.wgsl: register-tiled fp32 GEMM with the k loop of a workgroup tile written out in
// the source (UNROLL); optional LoRA term as extra K tiles; optional split K.
//
//   C[M, N]  (= or +=)  A[M, K] · op(B)  +  T[M, R] · op(L)
//
//   A  row-major, row stride lda, first element at a_off (elements).
//   B  row-major from element b_off, row stride ldb: B_T = true -> stored [N, K] (an HF weight
//      W[out, in] in x · Wᵀ); B_T = false -> stored [K, N] (W in dy · W).
//   L  LORA = 1: stored [N, R];  LORA = 2: stored [R, N].  T [M, R] row stride ldt, first
//      element at t_off.  The LoRA scale is folded into T or L by the host.  The LoRA term runs
//      as ceil(R / BK) extra K tiles after the main ones (A tile from T, B tile from L), so the
//      epilogue stays a plain store.
//   C  row stride ldc, first element at c_off.
//
// Split K (entry `main`, grid z > 1): the K tiles (the LoRA tiles last) are cut into runs of
// tps tiles; workgroup z multiplies run z and stores its partial product at c_off + z * pstride
// (the host passes a scratch [splits, M, N], ldc = N, ACCUM off); entry `reduce` then sums the
// partials into C (+ C with ACCUM) in a fixed order, so results are bit-reproducible.
//
// Tiling as shaders/gemm.wgsl: a workgroup of WGX × WGY threads owns a BM × BN tile of C
// (BM = WGY·TM, BN = WGX·TN); each thread holds TM × TN accumulators whose rows are 4-row groups
// spaced WGY·4 apart and whose columns are vec4 groups spaced WGX·4 apart.  Workgroup memory
// holds the A tile transposed ([k][m]) and the B tile as [k][n] in two buffers: tile t+1 is
// fetched into registers while tile t is multiplied, then stored; one barrier per K tile.
// UNROLL: the BK k steps of a tile are written out (ksteps8, constant offsets) instead of looped
// over: the NVIDIA driver keeps a loop over an override bound rolled, and on an H200 the same
// BK 8 tiles ran 15-25 TFLOP/s rolled and 23-32 written out (BENCHMARKS.md).  BK 8 or 16 only.
// Loads: A and B stored [N, K] as gemm_tiles.wgsl says (a warp reads runs of BK floats along
// k); B stored [K, N] is copied as whole vec4s, lanes along n.  The *_VEC constants select
// vec4 loads and stores; the host sets them only when strides, offsets and extents are
// multiples of 4.

struct Params {
    M: u32, N: u32, K: u32, lda: u32,
    ldb: u32, ldc: u32, a_off: u32, c_off: u32,
    R: u32, ldt: u32, t_off: u32, b_off: u32,
    tps: u32, pstride: u32, splits: u32, pad: u32,
}

override WGX: u32 = 8u;
override WGY: u32 = 8u;
override TM: u32 = 4u;
override TN: u32 = 4u;
override BK: u32 = 8u;          // 8 or 16
override UNROLL: bool = true;
override B_T: bool = true;
override A_VEC: bool = false;
override B_VEC: bool = false;
override C_VEC: bool = false;
override LORA: u32 = 0u;
override ACCUM: bool = false;
override GROUP_M: u32 = 0u;     // 0: workgroup (x, y) takes C tile (n, m) = (x, y); else tile_of()

override BM: u32 = WGY * TM;
override BN: u32 = WGX * TN;
override NT: u32 = WGX * WGY;
override TM4: u32 = TM / 4u;
override TN4: u32 = TN / 4u;
override A_LOADS: u32 = (BM * BK / 4u + NT - 1u) / NT;   // per-thread vec4 loads of a K tile
override B_LOADS: u32 = (BN * BK / 4u + NT - 1u) / NT;
override L_LOADS: u32 = B_LOADS;   // a LoRA tile of L (gemm_tiles.wgsl)

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bf: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> lt: array<f32>;
@group(0) @binding(4) var<storage, read> ll: array<f32>;
@group(0) @binding(5) var<storage, read_write> c: array<vec4<f32>>;

//!include gemm_tiles

var<workgroup> As: array<vec4<f32>, 2u * BK * BM / 4u>;   // [2][BK][BM]
var<workgroup> Bs: array<vec4<f32>, 2u * BK * BN / 4u>;   // [2][BK][BN]

fn a_at(i: u32) -> f32 { return a[i >> 2u][i & 3u]; }
fn bf_at(i: u32) -> f32 { return bf[i >> 2u][i & 3u]; }

// The thread's TM A values and TN B values of one k step (vec4 indices ai, bi of the tiles)
fn frag(fa: ptr<function, array<vec4<f32>, 4>>, fb: ptr<function, array<vec4<f32>, 4>>, ai: u32, bi: u32) {
    for (var r = 0u; r < TM4; r++) { (*fa)[r] = As[ai + r * WGY]; }
    for (var q = 0u; q < TN4; q++) { (*fb)[q] = Bs[bi + q * WGX]; }
}

// TM·TN FMAs of one k step into acc
fn outer(acc: ptr<function, array<vec4<f32>, 32>>, fa: ptr<function, array<vec4<f32>, 4>>,
         fb: ptr<function, array<vec4<f32>, 4>>) {
    for (var r = 0u; r < TM4; r++) {
        for (var i = 0u; i < 4u; i++) {
            let s = vec4<f32>((*fa)[r][i]);
            for (var q = 0u; q < TN4; q++) {
                let o = (r * 4u + i) * TN4 + q;
                (*acc)[o] = fma(s, (*fb)[q], (*acc)[o]);
            }
        }
    }
}

// k steps k0 .. k0 + 7 of the tile (vec4 indices ai, bi at k = 0; sa, sb per k step), written
// out; the order of reads and FMAs is left to the driver (reading step k + 1's fragments ahead
// of step k's FMAs in the source made no difference on an H200).
fn ksteps8(acc: ptr<function, array<vec4<f32>, 32>>, ai: u32, bi: u32, sa: u32, sb: u32, k0: u32) {
    var fa: array<vec4<f32>, 4>;
    var fb: array<vec4<f32>, 4>;
    let a0 = ai + k0 * sa;
    let b0 = bi + k0 * sb;
    frag(&fa, &fb, a0, b0);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + sa, b0 + sb);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + 2u * sa, b0 + 2u * sb);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + 3u * sa, b0 + 3u * sb);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + 4u * sa, b0 + 4u * sb);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + 5u * sa, b0 + 5u * sb);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + 6u * sa, b0 + 6u * sb);
    outer(acc, &fa, &fb);
    frag(&fa, &fb, a0 + 7u * sa, b0 + 7u * sb);
    outer(acc, &fa, &fb);
}

// The C tile of workgroup wid: (M tile, N tile) = (wid.y, wid.x); with GROUP_M > 0 the
// workgroups in launch order (x fastest) walk runs of GROUP_M M tiles down each N tile
// column, so that the workgroups in flight share the B tiles they read (a grid many N tiles
// wide, the LM head's logits, otherwise streams all of B once per M tile).
fn tile_of(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    if (GROUP_M == 0u) {
        return vec2<u32>(wid.y, wid.x);
    }
    let lin = wid.y * nwg.x + wid.x;
    let span = GROUP_M * nwg.x;
    let first = (lin / span) * GROUP_M;
    let gm = min(nwg.y - first, GROUP_M);
    return vec2<u32>(first + (lin % span) % gm, (lin % span) / gm);
}

@compute @workgroup_size(WGX, WGY)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let tx = lid.x;
    let ty = lid.y;
    let tile = tile_of(wid, nwg);
    let m0 = tile.x * BM;
    let n0 = tile.y * BN;
    let M = P.M;
    let N = P.N;
    let K = P.K;
    let ntm = (K + BK - 1u) / BK;                                    // tiles of A · op(B)
    let ntiles = ntm + select(0u, (P.R + BK - 1u) / BK, LORA != 0u); // + tiles of T · op(L)
    let t0 = wid.z * P.tps;                                          // this split's tiles
    let t1 = min(t0 + P.tps, ntiles);

    var acc: array<vec4<f32>, 32>;
    for (var i = 0u; i < TM4 * 4u * TN4; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    var ra: array<vec4<f32>, 8>;
    var rb: array<vec4<f32>, 8>;

    for (var t = t0; t <= t1; t++) {
        // -- fetch K tile t into registers (t == t1: nothing left to fetch) -------------------
        if (t >= ntm && t < t1) {
            fetch_lora(&ra, &rb, (t - ntm) * BK, m0, n0, li);   // LoRA tile: A from T, B from L
        } else if (t < t1) {
            let kf = t * BK;
            fetch_a(&ra, kf, m0, li);
            for (var i = 0u; i < B_LOADS; i++) {
                let idx = li + i * NT;
                var v = vec4<f32>(0.0);
                if (B_T) {
                    let row = n0 + idx / KQ;
                    let k = kf + (idx % KQ) * 4u;
                    if (idx < BN * BK / 4u && row < N) {
                        let base = P.b_off + row * P.ldb + k;
                        if (B_VEC) {
                            if (k < K) { v = bf[base >> 2u]; }
                        } else {
                            for (var j = 0u; j < 4u; j++) {
                                if (k + j < K) { v[j] = bf_at(base + j); }
                            }
                        }
                    }
                } else {
                    let row = kf + idx / (BN / 4u);
                    let n = n0 + (idx % (BN / 4u)) * 4u;
                    if (idx < BN * BK / 4u && row < K) {
                        let base = P.b_off + row * P.ldb + n;
                        if (B_VEC) {
                            if (n < N) { v = bf[base >> 2u]; }
                        } else {
                            for (var j = 0u; j < 4u; j++) {
                                if (n + j < N) { v[j] = bf_at(base + j); }
                            }
                        }
                    }
                }
                rb[i] = v;
            }
        }

        // -- multiply K tile t - 1 (in buffer (t - 1) & 1) ------------------------------------
        if (t > t0) {
            let ab = ((t - 1u) & 1u) * BK * BM / 4u + ty;   // vec4 index at k = 0 of the buffer
            let bb = ((t - 1u) & 1u) * BK * BN / 4u + tx;
            let sa = BM / 4u;                               // vec4s per k step
            let sb = BN / 4u;
            if (UNROLL) {
                ksteps8(&acc, ab, bb, sa, sb, 0u);
                if (BK == 16u) {
                    ksteps8(&acc, ab, bb, sa, sb, 8u);
                }
            } else {
                var fa: array<vec4<f32>, 4>;
                var fb: array<vec4<f32>, 4>;
                for (var kk = 0u; kk < BK; kk++) {
                    frag(&fa, &fb, ab + kk * sa, bb + kk * sb);
                    outer(&acc, &fa, &fb);
                }
            }
        }

        // -- store the fetched tile t into buffer t & 1 ---------------------------------------
        if (t < t1) {
            let nxt = t & 1u;
            store_a_tile(&ra, nxt, li);
            for (var i = 0u; i < B_LOADS; i++) {
                let idx = li + i * NT;
                if (idx < BN * BK / 4u) {
                    if (B_T && t < ntm) {
                        let n = idx / KQ;
                        let kq = idx % KQ;
                        for (var j = 0u; j < 4u; j++) {
                            let e = (nxt * BK + kq * 4u + j) * BN + n;
                            Bs[e >> 2u][e & 3u] = rb[i][j];
                        }
                    } else {
                        Bs[(nxt * BK * BN + (idx / (BN / 4u)) * BN) / 4u + idx % (BN / 4u)] = rb[i];
                    }
                }
            }
        }
        workgroupBarrier();
    }

    // -- epilogue: accumulate, store (static accumulator indices only) ---------------------------
    store_c(&acc, m0, n0, tx, ty, P.c_off + wid.z * P.pstride);
}

// C[row, col] (+)= sum over z of part[z * pstride + row * N + col] (part bound as `a`), one
// thread per element of C; linear id over (wid.x + wid.y * num_workgroups.x) * 256 + lane.
@compute @workgroup_size(256)
fn reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + li;
    if (i >= P.M * P.N) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < P.splits; z++) {
        s += a_at(z * P.pstride + i);
    }
    let ci = P.c_off + (i / P.N) * P.ldc + i % P.N;
    if (ACCUM) { s += c[ci >> 2u][ci & 3u]; }
    c[ci >> 2u][ci & 3u] = s;
}
