// Causal GQA flash attention, forward (the gpu placement), register-tiled.
//   q, o: [B, T, Hq, D] f32; k, v: [B, T, Hkv, D] f32; lse: [B, Hq, T] f32;
//   mask: [B, T] u32 key padding mask (1 = attend, 0 = padding), read only when has_mask = 1;
//   starts: [B, T] i32 packed documents: the first position of each position's document,
//   read only when SEGMENTS = 1.
// Query head h reads kv head h / (Hq / Hkv); scores are (q . k) * scale (scale = 1/sqrt(D));
// key j is visible to query i when j <= i, mask[b, j] != 0 and (SEGMENTS) j >= starts[b, i].
//
// Prepended consts (attention.py picks them to fit workgroup memory):
//   HEAD_DIM = D; BR query rows per workgroup; BC keys per key block; TM x TN the register
//   tile of scores each thread owns; DK4 vec4s of D per staged chunk; VK rows of V per
//   staged chunk; TILE_V4 vec4s of the staging area (max of both uses); SEGMENTS 1 where
//   the row holds packed documents (0 compiles the document checks out).
// Grid (ceil(T / BR), Hq, B); NT = (BR / TM) * (BC / TN) threads.  Thread (ty, tx) owns
// query rows ty*TM + i (i < TM) and, per key block, keys tx + NX*j (j < TN): S = Q K^T is
// a GEMM whose operands come in chunks of DK4 vec4s through workgroup memory (rows padded
// by one vec4 so that the column side's reads do not collide in banks); each thread does
// TM*TN independent dot products per vec4 pair.  The online softmax keeps a per-row max
// shared by all threads of the row (max of their partials through workgroup memory, which
// is exact) and a per-thread partial row sum, summed in tx order at the end (deterministic).
// P goes to workgroup memory; O += P V is a second GEMM where the thread owns rows ty*TM + i
// and vec4 columns tx + NX*j4 of the output, with V in chunks of VK keys.
// Each thread fetches the next staged piece into registers before the arithmetic on the
// current one, so that global-load latency hides behind it.
// Key blocks wholly above the diagonal are never visited, nor (SEGMENTS) those wholly before
// the document of the block's first query (starts never decrease along a row, so no query of
// the block sees them); the T x T matrix never exists.
// Output o = acc / l, lse = m + log(l); a row without any visible key gets o = 0 and
// lse = -inf (backward then gives it zero gradients).

// Params and the tile constants: attention_common.

// bindings 0-5 (p, q, k, v, mask, starts): attention_common
@group(0) @binding(6) var<storage, read_write> o: array<f32>;
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;

// Q chunk [BR][CS] then K chunk [BC][CS]; or V chunk [VK][DP4].
var<workgroup> tile_s: array<vec4<f32>, TILE_V4>;
var<workgroup> p_s: array<vec4<f32>, BR * PS>;   // P [BR][BC] (+ pad)
var<workgroup> red_s: array<f32, BR * NX>;       // per-row partials [row][tx]

// tensors named by the fetch helpers
const SRC_Q: u32 = 0u;
const SRC_K: u32 = 1u;
const SRC_V: u32 = 2u;
const SRC_DO: u32 = 3u;   // the backward's dO; never used here (fetch4 is shared)

// Below any finite score; exp(NEG_BIG - s) is 0 without inf - inf arithmetic.
const NEG_BIG: f32 = -3.0e38;

// The i-th vec4 of source src (SRC_Q, SRC_K, SRC_V): fetch4 in attention_common
// reads the tensors through it.
fn load4(src: u32, i: u32) -> vec4<f32> {
    switch src {
        case 0u: { return q[i]; }
        case 1u: { return k[i]; }
        default: { return v[i]; }
    }
}

//!include attention_common

@compute @workgroup_size(NT)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    // Last query blocks (the most key blocks) first: the long workgroups start early.
    let q0 = (nwg.x - 1u - wid.x) * BR;
    let hk = h / (p.hq / p.hkv);
    let tx = li % NX;
    let ty = li / NX;

    var m: array<f32, TM>;
    var lp: array<f32, TM>;   // this thread's share of the row sums
    for (var i = 0u; i < TM; i = i + 1u) {
        m[i] = NEG_BIG;
        lp[i] = 0.0;
    }
    var first_key: array<u32, TM>;   // of each of the thread's rows (its document's start)
    for (var i = 0u; i < TM; i = i + 1u) {
        first_key[i] = row_start(b, q0 + ty * TM + i);
    }
    var acc = zero_acc();
    let kend = min(p.t, q0 + BR);
    for (var k0 = block_start(b, q0); k0 < kend; k0 = k0 + BC) {
        let s = scores(b, SRC_Q, h, q0, p.scale, SRC_K, hk, k0, 1.0, li);
        let first = fetch_rows(b, SRC_V, hk, k0, li);
        // visibility; row max (exact, so every thread of a row gets the same)
        var vis: array<array<bool, TN>, TM>;
        for (var j = 0u; j < TN; j = j + 1u) {
            let kj = k0 + tx + NX * j;
            var ok = kj < p.t;
            if (ok && p.has_mask != 0u) {
                ok = mask[b * p.t + kj] != 0u;
            }
            for (var i = 0u; i < TM; i = i + 1u) {
                vis[i][j] = ok && kj <= q0 + ty * TM + i && kj >= first_key[i];
            }
        }
        for (var i = 0u; i < TM; i = i + 1u) {
            var mx = NEG_BIG;
            for (var j = 0u; j < TN; j = j + 1u) {
                if (vis[i][j]) {
                    mx = max(mx, s[i][j]);
                }
            }
            red_s[(ty * TM + i) * NX + tx] = mx;
        }
        workgroupBarrier();
        var pt = zero_tile();   // (naga does not re-zero loop-body vars per iteration)
        for (var i = 0u; i < TM; i = i + 1u) {
            let r = ty * TM + i;
            var mt = m[i];
            for (var t = 0u; t < NX; t = t + 1u) {
                mt = max(mt, red_s[r * NX + t]);
            }
            let corr = exp(m[i] - mt);
            m[i] = mt;
            var ls = 0.0;
            for (var j = 0u; j < TN; j = j + 1u) {
                if (vis[i][j]) {
                    pt[i][j] = exp(s[i][j] - mt);
                    ls = ls + pt[i][j];
                }
            }
            lp[i] = lp[i] * corr + ls;
            for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
                acc[i][j4] = acc[i][j4] * corr;
            }
        }
        // p_s was last read before the barriers inside scores()
        stage(pt, li);
        accumulate(&acc, b, SRC_V, hk, k0, first, li);
    }
    // ---- row sums (tx order), write
    for (var i = 0u; i < TM; i = i + 1u) {
        red_s[(ty * TM + i) * NX + tx] = lp[i];
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i = i + 1u) {
        let r = ty * TM + i;
        let qi = q0 + r;
        if (qi >= p.t) {
            continue;
        }
        var l = 0.0;
        for (var t = 0u; t < NX; t = t + 1u) {
            l = l + red_s[r * NX + t];
        }
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        let ob = ((b * p.t + qi) * p.hq + h) * HEAD_DIM;
        for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
            let c4 = tx + NX * j4;
            for (var u = 0u; u < 4u; u = u + 1u) {
                let d = c4 * 4u + u;
                if (c4 < DP4 && d < HEAD_DIM) {
                    o[ob + d] = acc[i][j4][u] * inv;
                }
            }
        }
        if (tx == 0u) {
            var lv = bitcast<f32>(0xff800000u);  // -inf: no visible key
            if (l > 0.0) {
                lv = m[i] + log(l);
            }
            lse[(b * p.hq + h) * p.t + qi] = lv;
        }
    }
}
