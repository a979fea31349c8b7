// Causal GQA flash attention, forward (GPU-resident mode).
//   q, o: [B, T, Hq, D] f32; k, v: [B, T, Hkv, D] f32; lse: [B, Hq, T] f32;
//   mask: [B, T] u32 key padding mask (1 = attend, 0 = padding), read only when has_mask = 1.
// Query head h reads kv head h / (Hq / Hkv); scores are (q . k) / sqrt(D) (scale passed in);
// key j is visible to query i when j <= i and mask[b, j] != 0.
// Workgroup = ROWS query rows of one (batch, head): grid (ceil(T / ROWS), Hq, B).  Each thread
// owns one query row (q and the output accumulator in registers, HEAD_DIM prepended as a
// const by the loader) and walks the keys tile by tile: TILE keys of K and V are loaded into
// workgroup memory by all threads, then each thread runs the online softmax over them
// (running max m, running sum l; the accumulator is rescaled when m grows).  The T x T
// score matrix never exists.  Output o = acc / l, lse = m + log(l); a row without any visible
// key gets o = 0 and lse = -inf (backward then gives it zero gradients).

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
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

var<workgroup> k_s: array<f32, TILE * HEAD_DIM>;
var<workgroup> v_s: array<f32, TILE * HEAD_DIM>;
var<workgroup> m_s: array<u32, TILE>;

// Below any finite score; exp(NEG_BIG - s) is 0 without inf - inf arithmetic.
const NEG_BIG: f32 = -3.0e38;

@compute @workgroup_size(ROWS)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = wid.x * ROWS;
    let i = q0 + li;
    let hk = h / (p.hq / p.hkv);
    let row_ok = i < p.t;

    var qr: array<f32, HEAD_DIM>;
    var acc: array<f32, HEAD_DIM>;
    if (row_ok) {
        let qb = ((b * p.t + i) * p.hq + h) * HEAD_DIM;
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            qr[d] = q[qb + d] * p.scale;
            acc[d] = 0.0;
        }
    }
    var m = NEG_BIG;
    var l = 0.0;
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
            k_s[e] = kv;
            v_s[e] = vv;
        }
        for (var e = li; e < TILE; e = e + ROWS) {
            let j = k0 + e;
            var ok = 1u;
            if (j >= p.t || (p.has_mask != 0u && mask[b * p.t + j] == 0u)) {
                ok = 0u;
            }
            m_s[e] = ok;
        }
        workgroupBarrier();
        if (row_ok) {
            let jend = min(TILE, i + 1u - min(i + 1u, k0));  // keys k0 + jj <= i
            for (var jj = 0u; jj < jend; jj = jj + 1u) {
                if (m_s[jj] == 0u) {
                    continue;
                }
                var s = 0.0;
                for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                    s = s + qr[d] * k_s[jj * HEAD_DIM + d];
                }
                if (s > m) {
                    let corr = exp(m - s);
                    l = l * corr;
                    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                        acc[d] = acc[d] * corr;
                    }
                    m = s;
                }
                let pj = exp(s - m);
                l = l + pj;
                for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                    acc[d] = acc[d] + pj * v_s[jj * HEAD_DIM + d];
                }
            }
        }
        workgroupBarrier();
    }
    if (row_ok) {
        let ob = ((b * p.t + i) * p.hq + h) * HEAD_DIM;
        var inv = 0.0;
        var lv = bitcast<f32>(0xff800000u);  // -inf: no visible key
        if (l > 0.0) {
            inv = 1.0 / l;
            lv = m + log(l);
        }
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            o[ob + d] = acc[d] * inv;
        }
        lse[(b * p.hq + h) * p.t + i] = lv;
    }
}
