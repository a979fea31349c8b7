// Causal GQA flash attention, forward (GPU-resident mode).
//   q, o: [B, T, Hq, D] f32; k, v: [B, T, Hkv, D] f32; lse: [B, Hq, T] f32;
//   mask: [B, T] u32 key padding mask (1 = attend, 0 = padding), read only when has_mask = 1.
// Query head h reads kv head h / (Hq / Hkv); scores are (q . k) * scale (scale = 1/sqrt(D));
// key j is visible to query i when j <= i and mask[b, j] != 0.
// Workgroup = ROWS query rows of one (batch, head) x LANES threads per row: grid
// (ceil(T / ROWS), Hq, B).  Thread (row, lane) keeps DC = D / LANES dims of the query and
// of the output accumulator in registers (HEAD_DIM and DC are prepended consts), so no thread
// holds a whole head; the dims are interleaved (lane, lane + LANES, ...) so that the lanes of
// a row read consecutive words: coalesced loads, no workgroup-memory bank conflicts.  Keys go tile by tile: TILE rows of K and V are loaded into
// workgroup memory by all threads; each thread writes its partial dot products for the
// tile's keys, the LANES partials are summed (every lane of a row sums them in the same
// order, so all lanes see identical scores), then the online softmax updates the running
// max m and sum l once per tile and the accumulator takes p_j * v_j over the lane's dims.
// The T x T score matrix never exists.  Output o = acc / l, lse = m + log(l); a row without
// any visible key gets o = 0 and lse = -inf (backward then gives it zero gradients).

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
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

var<workgroup> k_s: array<f32, TILE * HEAD_DIM>;
var<workgroup> v_s: array<f32, TILE * HEAD_DIM>;
var<workgroup> ok_s: array<u32, TILE>;
var<workgroup> part: array<f32, ROWS * LANES * TILE>;   // [row][lane][key]

// Score of key jj of the tile for the workgroup's row `row`: the LANES partial dot products
// summed in lane order (identical in every lane of the row).
fn tile_score(row: u32, jj: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < LANES; c = c + 1u) {
        s = s + part[(row * LANES + c) * TILE + jj];
    }
    return s;
}

// Below any finite score; exp(NEG_BIG - s) is 0 without inf - inf arithmetic.
const NEG_BIG: f32 = -3.0e38;

@compute @workgroup_size(ROWS * LANES)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    let row = li / LANES;
    let lane = li % LANES;
    let q0 = wid.x * ROWS;
    let i = q0 + row;
    let hk = h / (p.hq / p.hkv);
    let row_ok = i < p.t;

    var qr: array<f32, DC>;
    var acc: array<f32, DC>;
    let qb = ((b * p.t + i) * p.hq + h) * HEAD_DIM + lane;
    // (if, not select: select reads both operands, and trusted modules have no bounds checks)
    for (var d = 0u; d < DC; d = d + 1u) {
        qr[d] = 0.0;
        acc[d] = 0.0;
        if (row_ok) {
            qr[d] = q[qb + LANES * d] * p.scale;
        }
    }
    var m = NEG_BIG;
    var l = 0.0;
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
            k_s[e] = kv;
            v_s[e] = vv;
        }
        for (var e = li; e < TILE; e = e + ROWS * LANES) {
            let j = k0 + e;
            ok_s[e] = select(0u, 1u, j < p.t && (p.has_mask == 0u || mask[b * p.t + j] != 0u));
        }
        workgroupBarrier();
        let pb = (row * LANES + lane) * TILE;
        for (var jj = 0u; jj < TILE; jj = jj + 1u) {
            var s = 0.0;
            for (var d = 0u; d < DC; d = d + 1u) {
                s = s + qr[d] * k_s[jj * HEAD_DIM + lane + LANES * d];
            }
            part[pb + jj] = s;
        }
        workgroupBarrier();
        if (row_ok) {
            // keys k0 + jj <= i that the mask lets through
            let jend = min(TILE, i + 1u - min(i + 1u, k0));
            var mt = m;
            for (var jj = 0u; jj < jend; jj = jj + 1u) {
                if (ok_s[jj] != 0u) {
                    mt = max(mt, tile_score(row, jj));
                }
            }
            let corr = exp(m - mt);
            l = l * corr;
            for (var d = 0u; d < DC; d = d + 1u) {
                acc[d] = acc[d] * corr;
            }
            m = mt;
            for (var jj = 0u; jj < jend; jj = jj + 1u) {
                if (ok_s[jj] == 0u) {
                    continue;
                }
                let pj = exp(tile_score(row, jj) - m);
                l = l + pj;
                for (var d = 0u; d < DC; d = d + 1u) {
                    acc[d] = acc[d] + pj * v_s[jj * HEAD_DIM + lane + LANES * d];
                }
            }
        }
        workgroupBarrier();
    }
    if (row_ok) {
        let ob = ((b * p.t + i) * p.hq + h) * HEAD_DIM + lane;
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        for (var d = 0u; d < DC; d = d + 1u) {
            o[ob + LANES * d] = acc[d] * inv;
        }
        if (lane == 0u) {
            var lv = bitcast<f32>(0xff800000u);  // -inf: no visible key
            if (l > 0.0) {
                lv = m + log(l);
            }
            lse[(b * p.hq + h) * p.t + i] = lv;
        }
    }
}
