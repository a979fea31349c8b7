// Causal GQA flash attention, backward (GPU-resident mode), recomputing probabilities from
// the forward's lse; the T x T matrix never exists.  Same layouts as resident_attention_fwd:
//   q, o, do, dq: [B, T, Hq, D]; k, v, dk, dv: [B, T, Hkv, D]; lse, delta: [B, Hq, T];
//   mask: [B, T] u32 (1 = attend), read only when has_mask = 1.
// With P[i,j] = exp(scale * q_i . k_j - lse_i) (0 where key j is invisible to query i):
//   delta_i = do_i . o_i                          (entry `prep`, one thread per row)
//   dS[i,j] = P[i,j] * (do_i . v_j - delta_i)
//   dq_i = scale * sum_j dS[i,j] k_j              (entry `dq`: a workgroup of ROWS query rows,
//                                                  K/V tiles of TILE keys in workgroup memory)
//   dk_j = scale * sum_{i, h in group} dS[i,j] q_i,  dv_j = sum P[i,j] do_i
//                                                 (entry `dkdv`: a workgroup of ROWS key rows
//                                                  of one kv head; Q/dO tiles of TILE queries of
//                                                  each query head of the group in workgroup memory)
// Splitting dq from dk/dv avoids float atomics at the price of computing P twice.

struct Params {
    batch: u32,
    t: u32,
    hq: u32,
    hkv: u32,
    has_mask: u32,
    scale: f32,
}

override ROWS: u32 = 64u;
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

var<workgroup> a_s: array<f32, TILE * HEAD_DIM>;   // dq: K tile;  dkdv: Q tile
var<workgroup> b_s: array<f32, TILE * HEAD_DIM>;   // dq: V tile;  dkdv: dO tile
var<workgroup> ok_s: array<u32, TILE>;             // dq: key visible (mask, j < T)
var<workgroup> lse_s: array<f32, TILE>;            // dkdv
var<workgroup> del_s: array<f32, TILE>;            // dkdv

fn key_ok(b: u32, j: u32) -> bool {
    return j < p.t && (p.has_mask == 0u || mask[b * p.t + j] != 0u);
}

// delta[b, h, t] = sum_d do[b,t,h,d] * o[b,t,h,d]; o is bound at out0.
@compute @workgroup_size(ROWS)
fn prep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let r = (wid.x + wid.y * nwg.x) * ROWS + li;   // r = (b * Hq + h) * T + t
    if (r >= p.batch * p.hq * p.t) {
        return;
    }
    let t = r % p.t;
    let bh = r / p.t;
    let h = bh % p.hq;
    let b = bh / p.hq;
    let base = ((b * p.t + t) * p.hq + h) * HEAD_DIM;
    var s = 0.0;
    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
        s = s + d_o[base + d] * out0[base + d];
    }
    delta[r] = s;
}

// Grid (ceil(T / ROWS), Hq, B); writes dq (bound at out0).
@compute @workgroup_size(ROWS)
fn dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = wid.x * ROWS;
    let i = q0 + li;
    let hk = h / (p.hq / p.hkv);
    let row_ok = i < p.t;

    var qr: array<f32, HEAD_DIM>;
    var dor: array<f32, HEAD_DIM>;
    var acc: array<f32, HEAD_DIM>;
    var li_lse = 0.0;
    var li_del = 0.0;
    let qb = ((b * p.t + i) * p.hq + h) * HEAD_DIM;
    if (row_ok) {
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            qr[d] = q[qb + d] * p.scale;
            dor[d] = d_o[qb + d];
            acc[d] = 0.0;
        }
        li_lse = lse[(b * p.hq + h) * p.t + i];
        li_del = delta[(b * p.hq + h) * p.t + i];
    }
    let kend = min(p.t, q0 + ROWS);
    for (var k0 = 0u; k0 < kend; k0 = k0 + TILE) {
        for (var e = li; e < TILE * HEAD_DIM; e = e + ROWS) {
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
        for (var e = li; e < TILE; e = e + ROWS) {
            ok_s[e] = select(0u, 1u, key_ok(b, k0 + e));
        }
        workgroupBarrier();
        if (row_ok) {
            let jend = min(TILE, i + 1u - min(i + 1u, k0));
            for (var jj = 0u; jj < jend; jj = jj + 1u) {
                if (ok_s[jj] == 0u) {
                    continue;
                }
                var s = 0.0;
                var dp = 0.0;
                for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                    s = s + qr[d] * a_s[jj * HEAD_DIM + d];
                    dp = dp + dor[d] * b_s[jj * HEAD_DIM + d];
                }
                let ds = exp(s - li_lse) * (dp - li_del);
                for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                    acc[d] = acc[d] + ds * a_s[jj * HEAD_DIM + d];
                }
            }
        }
        workgroupBarrier();
    }
    if (row_ok) {
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            out0[qb + d] = acc[d] * p.scale;
        }
    }
}

// Grid (ceil(T / ROWS), Hkv, B); writes dk (out0) and dv (out1).
@compute @workgroup_size(ROWS)
fn dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let hk = wid.y;
    let j0 = wid.x * ROWS;
    let j = j0 + li;
    let group = p.hq / p.hkv;
    let col_ok = key_ok(b, j);

    var kr: array<f32, HEAD_DIM>;
    var vr: array<f32, HEAD_DIM>;
    var dk: array<f32, HEAD_DIM>;
    var dv: array<f32, HEAD_DIM>;
    let kb = ((b * p.t + j) * p.hkv + hk) * HEAD_DIM;
    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
        if (col_ok) {
            kr[d] = k[kb + d] * p.scale;
            vr[d] = v[kb + d];
        }
        dk[d] = 0.0;
        dv[d] = 0.0;
    }
    // Queries before j0 see none of this workgroup's keys.
    let qstart = j0;
    for (var g = 0u; g < group; g = g + 1u) {
        let h = hk * group + g;
        for (var i0 = qstart; i0 < p.t; i0 = i0 + TILE) {
            for (var e = li; e < TILE * HEAD_DIM; e = e + ROWS) {
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
            for (var e = li; e < TILE; e = e + ROWS) {
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
            if (col_ok) {
                // Queries i0 + ii >= j, below T.
                let istart = j - min(j, i0);
                let iend = min(TILE, p.t - i0);
                for (var ii = istart; ii < iend; ii = ii + 1u) {
                    var s = 0.0;
                    var dp = 0.0;
                    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                        s = s + kr[d] * a_s[ii * HEAD_DIM + d];
                        dp = dp + vr[d] * b_s[ii * HEAD_DIM + d];
                    }
                    // Query rows with no visible key have lse = -inf, but key j is visible
                    // to them here only if they had one: the exp stays finite.
                    let pij = exp(s - lse_s[ii]);
                    let ds = pij * (dp - del_s[ii]);
                    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                        dv[d] = dv[d] + pij * b_s[ii * HEAD_DIM + d];
                        dk[d] = dk[d] + ds * a_s[ii * HEAD_DIM + d];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (j < p.t) {
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            out0[kb + d] = dk[d] * p.scale;
            out1[kb + d] = dv[d];
        }
    }
}
