// The k largest values of each row, with their indices, in descending order (equal values:
// the lower index first, as a stable sort): generation's greedy pick (k = 1) and its sampling
// candidates, so that only k ids and values per row leave the GPU.
//   vals: [R, n] f32; idx: [R, n] u32 (read when has_idx = 1, else the index is the column);
//   out_v: [R, C, k] f32, out_i: [R, C, k] u32, C = ceil(n / CHUNK).
// Workgroup (c, r) takes chunk c of row r into workgroup memory and repeats k times: each
// thread finds the best of its CHUNK / WG entries, a tree reduction finds the chunk's best,
// which is written out and removed.  A row goes through as many passes as it takes to leave
// one chunk (the host loops: each pass shrinks n to C * k).  Entries past the row's end, or
// removed, carry the index NONE and lose to every other; a chunk with fewer than k entries
// writes NONE for the rest.  NaN compares as smaller than every number.

struct Params {
    n: u32,        // entries per row
    chunks: u32,   // C
    k: u32,
    has_idx: u32,
}

const WG: u32 = 256u;
const CHUNK: u32 = 1024u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> vals: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_i: array<u32>;

var<workgroup> cv: array<f32, CHUNK>;
var<workgroup> ci: array<u32, CHUNK>;
var<workgroup> rv: array<f32, WG>;
var<workgroup> ri: array<u32, WG>;
var<workgroup> rp: array<u32, WG>;   // position of the candidate in the chunk

// (v1, i1) before (v2, i2): a real entry before NONE, a larger value first (a number before
// NaN), then the lower index
fn before(v1: f32, i1: u32, v2: f32, i2: u32) -> bool {
    if (i1 == NONE) {
        return false;
    }
    if (i2 == NONE) {
        return true;
    }
    let n1 = v1 == v1;
    let n2 = v2 == v2;
    if (n1 != n2) {
        return n1;
    }
    return v1 > v2 || (!(v1 < v2) && i1 < i2);
}

@compute @workgroup_size(WG)
fn chunk_topk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let c = wid.x;
    let r = wid.y;
    let start = c * CHUNK;
    for (var j = li; j < CHUNK; j = j + WG) {
        let col = start + j;
        var v = 0.0;
        var i = NONE;
        if (col < p.n) {
            v = vals[r * p.n + col];
            i = select(col, idx[r * p.n + col], p.has_idx == 1u);
        }
        cv[j] = v;
        ci[j] = i;
    }
    workgroupBarrier();
    let obase = (r * p.chunks + c) * p.k;
    for (var round = 0u; round < p.k; round = round + 1u) {
        var bv = 0.0;
        var bi = NONE;
        var bp = 0u;
        for (var j = li; j < CHUNK; j = j + WG) {
            if (before(cv[j], ci[j], bv, bi)) {
                bv = cv[j];
                bi = ci[j];
                bp = j;
            }
        }
        rv[li] = bv;
        ri[li] = bi;
        rp[li] = bp;
        workgroupBarrier();
        for (var w = WG / 2u; w > 0u; w = w / 2u) {
            if (li < w && before(rv[li + w], ri[li + w], rv[li], ri[li])) {
                rv[li] = rv[li + w];
                ri[li] = ri[li + w];
                rp[li] = rp[li + w];
            }
            workgroupBarrier();
        }
        if (li == 0u) {
            out_v[obase + round] = rv[0];
            out_i[obase + round] = ri[0];
            if (ri[0] != NONE) {
                ci[rp[0]] = NONE;
            }
        }
        workgroupBarrier();
    }
}
