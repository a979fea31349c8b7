// Generation's attention over a KV cache in GPU memory.
//   cache k, v: [B, S, Hkv, D] f32 (S slots per row); valid: [B, S] u32 (1 = a real token);
//   new q: [B, Tn, Hq, D], new k, v: [B, Tn, Hkv, D]; out: [B, Tn, Hq, D].
// For new token t of row b and query head h (kv head h / (Hq / Hkv)): softmax attention with
// scale 1/sqrt(D) over the slots s < length + Tn that it sees: s < length with valid[b, s] != 0
// (the cached tokens), and length <= s <= length + t (the new ones, causal: kv_store.wgsl has
// put them in the cache first).  A row that sees no slot gets 0.
// Grid (Hq, Tn, B), WG threads.  Slots go in blocks of WG: thread i scores slot s0 + i (a dot
// product over D), the block's max and sum come from tree reductions in workgroup memory, and
// the running output (online softmax: rescaled when the max grows) is held by thread i for
// dims i, i + WG, ... (D <= DPT * WG), reading V rows coalesced across threads.  The sums run
// in a fixed order: the result does not depend on timing.

struct Params {
    slots: u32,    // S
    tn: u32,       // new tokens per row
    hq: u32,
    hkv: u32,
    d: u32,
    length: u32,   // slots filled before the new tokens
    scale: f32,
}

const WG: u32 = 64u;
const DPT: u32 = 4u;         // output dims per thread: D <= DPT * WG = 256
// "no score": below every finite score (a masked slot), never exponentiated
const NEG: f32 = -3.4028234663852886e38;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read> valid: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> qs: array<f32, 256>;      // this query row
var<workgroup> ps: array<f32, WG>;       // the block's probabilities

//!include workgroup_reduce

@compute @workgroup_size(WG)
fn attend(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let t = wid.y;
    let b = wid.z;
    let D = p.d;
    let hk = h / (p.hq / p.hkv);
    let qbase = ((b * p.tn + t) * p.hq + h) * D;
    for (var d = li; d < D; d = d + WG) {
        qs[d] = q[qbase + d];
    }
    workgroupBarrier();
    let seen = p.length + t + 1u;          // slots [0, seen) may be visible
    var m = NEG;                       // running max of the visible scores
    var l = 0.0;                           // running sum of exp(score - m)
    var acc: array<f32, DPT>;
    for (var j = 0u; j < DPT; j = j + 1u) {
        acc[j] = 0.0;
    }
    for (var s0 = 0u; s0 < seen; s0 = s0 + WG) {
        let s = s0 + li;
        var score = NEG;
        if (s < seen && (s >= p.length || valid[b * p.slots + s] != 0u)) {
            let kbase = ((b * p.slots + s) * p.hkv + hk) * D;
            var dot = 0.0;
            for (var d = 0u; d < D; d = d + 1u) {
                dot = dot + qs[d] * kc[kbase + d];
            }
            score = dot * p.scale;
        }
        let mb = reduce_max(li, score);
        let mn = max(m, mb);
        // nothing visible before this block (m = NEG): no mass to rescale
        let corr = select(1.0, exp(m - mn), m > NEG);
        let e = select(0.0, exp(score - mn), score > NEG);
        ps[li] = e;
        let sb = reduce_sum(li, e);
        l = l * corr + sb;
        m = mn;
        let nb = min(WG, seen - s0);
        for (var j = 0u; j < DPT; j = j + 1u) {
            let d = li + j * WG;
            if (d < D) {
                var a = acc[j] * corr;
                for (var i = 0u; i < nb; i = i + 1u) {
                    a = a + ps[i] * vc[((b * p.slots + s0 + i) * p.hkv + hk) * D + d];
                }
                acc[j] = a;
            }
        }
        workgroupBarrier();
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var j = 0u; j < DPT; j = j + 1u) {
        let d = li + j * WG;
        if (d < D) {
            out[qbase + d] = acc[j] * inv;
        }
    }
}
