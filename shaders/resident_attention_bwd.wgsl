// Causal GQA flash attention, backward (GPU-resident mode), recomputing probabilities from
// the forward's lse; the T x T matrix never exists.  Same layouts as resident_attention_fwd:
//   q, o, do, dq: [B, T, Hq, D]; k, v, dk, dv: [B, T, Hkv, D]; lse, delta: [B, Hq, T];
//   mask: [B, T] u32 (1 = attend), read only when has_mask = 1.
// With P[i,j] = exp(scale * q_i . k_j - lse_i) (0 where key j is invisible to query i):
//   delta_i = do_i . o_i                          (entry `prep`, one thread per row)
//   dS[i,j] = P[i,j] * (do_i . v_j - delta_i)
//   dq_i = scale * sum_j dS[i,j] k_j              (entry `dq`: ROWS query rows per workgroup,
//                                                  K/V tiles of TILE keys in workgroup memory)
//   dk_j = scale * sum_{i, h in group} dS[i,j] q_i,  dv_j = sum P[i,j] do_i
//                                                 (entry `dkdv`: ROWS key rows of one kv head
//                                                  per workgroup; Q/dO tiles of TILE queries of
//                                                  each query head of the group)
// As in the forward, each row has LANES threads, each holding DC = D / LANES dims (lane,
// lane + LANES, ...) of the row's vectors in registers; the two dot products per (row, tile entry) are summed from
// the lanes' partials in workgroup memory, in lane order.
// Splitting dq from dk/dv avoids float atomics at the price of computing P twice.

struct Params {
    batch: u32,
    t: u32,
    hq: u32,
    hkv: u32,
    has_mask: u32,
    scale: f32,
}

override ROWS: u32 = 32u;
override LANES: u32 = 4u;
override TILE: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read> d_o: array<f32>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> delta: array<f32>;  // prep writes; dq, dkdv read
@group(0) @binding(8) var<storage, read_write> out0: array<f32>;   // prep: o (read); dq: dq; dkdv: dk
@group(0) @binding(9) var<storage, read_write> out1: array<f32>;   // dkdv: dv

var<workgroup> a_s: array<f32, TILE * HEAD_DIM>;        // dq: K tile;  dkdv: Q tile
var<workgroup> b_s: array<f32, TILE * HEAD_DIM>;        // dq: V tile;  dkdv: dO tile
var<workgroup> part_s: array<f32, ROWS * LANES * TILE>; // partial scores [row][lane][entry]
var<workgroup> part_p: array<f32, ROWS * LANES * TILE>; // partial do . v  [row][lane][entry]
var<workgroup> ok_s: array<u32, TILE>;                  // dq: key visible (mask, j < T)
var<workgroup> lse_s: array<f32, TILE>;                 // dkdv
var<workgroup> del_s: array<f32, TILE>;                 // dkdv

fn key_ok(b: u32, j: u32) -> bool {
    return j < p.t && (p.has_mask == 0u || mask[b * p.t + j] != 0u);
}

// (score, do . v) of tile entry e for workgroup row `row`, summed over lanes in lane order.
fn sums(row: u32, e: u32) -> vec2<f32> {
    var s = 0.0;
    var dp = 0.0;
    for (var c = 0u; c < LANES; c = c + 1u) {
        s = s + part_s[(row * LANES + c) * TILE + e];
        dp = dp + part_p[(row * LANES + c) * TILE + e];
    }
    return vec2<f32>(s, dp);
}

// delta[b, h, t] = sum_d do[b,t,h,d] * o[b,t,h,d]; o is bound at out0.
@compute @workgroup_size(ROWS * LANES)
fn prep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let r = (wid.x + wid.y * nwg.x) * ROWS * LANES + li;   // r = (b * Hq + h) * T + t
    if (r >= p.batch * p.hq * p.t) {
        return;
    }
    let t = r % p.t;
    let bh = r / p.t;
    let h = bh % p.hq;
    let b = bh / p.hq;
    let base = ((b * p.t + t) * p.hq + h) * HEAD_DIM;
    // Summed lane chunk by lane chunk, in the order dq/dkdv sum do . v: where o equals a
    // single v exactly (one visible key), dp - delta is exactly 0, as it is mathematically.
    var s = 0.0;
    for (var c = 0u; c < LANES; c = c + 1u) {
        var sc = 0.0;
        for (var d = 0u; d < DC; d = d + 1u) {
            sc = sc + d_o[base + c + LANES * d] * out0[base + c + LANES * d];
        }
        s = s + sc;
    }
    delta[r] = s;
}

// Grid (ceil(T / ROWS), Hq, B); writes dq (bound at out0).
@compute @workgroup_size(ROWS * LANES)
fn dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    let row = li / LANES;
    let lane = li % LANES;
    let q0 = wid.x * ROWS;
    let i = q0 + row;
    let hk = h / (p.hq / p.hkv);
    let row_ok = i < p.t;

    var qr: array<f32, DC>;
    var dor: array<f32, DC>;
    var acc: array<f32, DC>;
    let qb = ((b * p.t + i) * p.hq + h) * HEAD_DIM + lane;
    // (if, not select: select reads both operands, and trusted modules have no bounds checks)
    for (var d = 0u; d < DC; d = d + 1u) {
        qr[d] = 0.0;
        dor[d] = 0.0;
        acc[d] = 0.0;
        if (row_ok) {
            qr[d] = q[qb + LANES * d] * p.scale;
            dor[d] = d_o[qb + LANES * d];
        }
    }
    var li_lse = 0.0;
    var li_del = 0.0;
    if (row_ok) {
        li_lse = lse[(b * p.hq + h) * p.t + i];
        li_del = delta[(b * p.hq + h) * p.t + i];
    }
    let pb = (row * LANES + lane) * TILE;
    let kend = min(p.t, q0 + ROWS);
    for (var k0 = 0u; k0 < kend; k0 = k0 + TILE) {
        for (var e = li; e < TILE * HEAD_DIM; e = e + ROWS * LANES) {
            let j = k0 + e / HEAD_DIM;
            var kv = 0.0;
            var vv = 0.0;
            if (j < p.t) {
                let src = ((b * p.t + j) * p.hkv + hk) * HEAD_DIM + e % HEAD_DIM;
                kv = k[src];
                vv = v[src];
            }
            a_s[e] = kv;
            b_s[e] = vv;
        }
        for (var e = li; e < TILE; e = e + ROWS * LANES) {
            ok_s[e] = select(0u, 1u, key_ok(b, k0 + e));
        }
        workgroupBarrier();
        for (var jj = 0u; jj < TILE; jj = jj + 1u) {
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < DC; d = d + 1u) {
                s = s + qr[d] * a_s[jj * HEAD_DIM + lane + LANES * d];
                dp = dp + dor[d] * b_s[jj * HEAD_DIM + lane + LANES * d];
            }
            part_s[pb + jj] = s;
            part_p[pb + jj] = dp;
        }
        workgroupBarrier();
        if (row_ok) {
            let jend = min(TILE, i + 1u - min(i + 1u, k0));
            for (var jj = 0u; jj < jend; jj = jj + 1u) {
                if (ok_s[jj] == 0u) {
                    continue;
                }
                let sd = sums(row, jj);
                let ds = exp(sd.x - li_lse) * (sd.y - li_del);
                for (var d = 0u; d < DC; d = d + 1u) {
                    acc[d] = acc[d] + ds * a_s[jj * HEAD_DIM + lane + LANES * d];
                }
            }
        }
        workgroupBarrier();
    }
    if (row_ok) {
        for (var d = 0u; d < DC; d = d + 1u) {
            out0[qb + LANES * d] = acc[d] * p.scale;
        }
    }
}

// Grid (ceil(T / ROWS), Hkv, B); writes dk (out0) and dv (out1).
@compute @workgroup_size(ROWS * LANES)
fn dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let hk = wid.y;
    let row = li / LANES;
    let lane = li % LANES;
    let j0 = wid.x * ROWS;
    let j = j0 + row;
    let group = p.hq / p.hkv;
    let col_ok = key_ok(b, j);

    var kr: array<f32, DC>;
    var vr: array<f32, DC>;
    var dk: array<f32, DC>;
    var dv: array<f32, DC>;
    let kb = ((b * p.t + j) * p.hkv + hk) * HEAD_DIM + lane;
    for (var d = 0u; d < DC; d = d + 1u) {
        kr[d] = 0.0;
        vr[d] = 0.0;
        dk[d] = 0.0;
        dv[d] = 0.0;
        if (col_ok) {
            kr[d] = k[kb + LANES * d] * p.scale;
            vr[d] = v[kb + LANES * d];
        }
    }
    let pb = (row * LANES + lane) * TILE;
    for (var g = 0u; g < group; g = g + 1u) {
        let h = hk * group + g;
        // Queries before j0 see none of this workgroup's keys.
        for (var i0 = j0; i0 < p.t; i0 = i0 + TILE) {
            for (var e = li; e < TILE * HEAD_DIM; e = e + ROWS * LANES) {
                let i = i0 + e / HEAD_DIM;
                var qv = 0.0;
                var dov = 0.0;
                if (i < p.t) {
                    let src = ((b * p.t + i) * p.hq + h) * HEAD_DIM + e % HEAD_DIM;
                    qv = q[src];
                    dov = d_o[src];
                }
                a_s[e] = qv;
                b_s[e] = dov;
            }
            for (var e = li; e < TILE; e = e + ROWS * LANES) {
                let i = i0 + e;
                var lv = 0.0;
                var dl = 0.0;
                if (i < p.t) {
                    lv = lse[(b * p.hq + h) * p.t + i];
                    dl = delta[(b * p.hq + h) * p.t + i];
                }
                lse_s[e] = lv;
                del_s[e] = dl;
            }
            workgroupBarrier();
            for (var ii = 0u; ii < TILE; ii = ii + 1u) {
                var s = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < DC; d = d + 1u) {
                    s = s + kr[d] * a_s[ii * HEAD_DIM + lane + LANES * d];
                    dp = dp + vr[d] * b_s[ii * HEAD_DIM + lane + LANES * d];
                }
                part_s[pb + ii] = s;
                part_p[pb + ii] = dp;
            }
            workgroupBarrier();
            if (col_ok) {
                // Queries i0 + ii >= j, below T.  A query that sees key j has a finite lse.
                let istart = j - min(j, i0);
                let iend = min(TILE, p.t - i0);
                for (var ii = istart; ii < iend; ii = ii + 1u) {
                    let sd = sums(row, ii);
                    let pij = exp(sd.x - lse_s[ii]);
                    let ds = pij * (sd.y - del_s[ii]);
                    for (var d = 0u; d < DC; d = d + 1u) {
                        dv[d] = dv[d] + pij * b_s[ii * HEAD_DIM + lane + LANES * d];
                        dk[d] = dk[d] + ds * a_s[ii * HEAD_DIM + lane + LANES * d];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (j < p.t) {
        for (var d = 0u; d < DC; d = d + 1u) {
            out0[kb + LANES * d] = dk[d] * p.scale;
            out1[kb + LANES * d] = dv[d];
        }
    }
}
