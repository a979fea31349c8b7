// Chunked cross-entropy of the LM head (the gpu placement), HF conventions: the label of
// token t is labels[t + 1] of the same sequence (the shift happens here), the last token of
// each sequence and labels equal to -100 (or outside [0, V)) are not counted.
//   logits: [R, V] f32, one chunk of rows g = row0 .. row0 + R - 1 of the [N = B*T, V] logits
//           (never whole); overwritten with dlogits = grad_scale * (softmax - onehot(target))
//           (zeros for rows not counted) when want_grad = 1;
//   labels: [N] i32 (flattened [B, T]);  losses: [N] f32, counted: [N] u32 (per-row outputs).
// Entry `rows`: one workgroup per chunk row (2-D grid), WG threads stride over V (the max and
// sum of exp in one pass, then the gradient pass).  Entry `reduce`: one workgroup sums losses and counted over
// all N rows into stats = [loss_sum, count] (as f32).

struct Params {
    row0: u32,
    n_rows: u32,     // R (rows) / N (reduce)
    vocab: u32,
    t: u32,          // tokens per sequence
    want_grad: u32,
    grad_scale: f32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> labels: array<i32>;
@group(0) @binding(2) var<storage, read_write> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> losses: array<f32>;
@group(0) @binding(4) var<storage, read_write> counted: array<u32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;

var<workgroup> red_n: array<u32, WG>;

//!include workgroup_reduce

@compute @workgroup_size(WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.n_rows) {
        return;
    }
    let g = p.row0 + r;
    var tgt_i = -1;
    if ((g % p.t) + 1u < p.t) {
        let lab = labels[g + 1u];
        if (lab >= 0 && u32(lab) < p.vocab) {
            tgt_i = lab;
        }
    }
    let base = r * p.vocab;
    if (tgt_i < 0) {
        if (p.want_grad != 0u) {
            for (var j = li; j < p.vocab; j = j + WG) {
                logits[base + j] = 0.0;
            }
        }
        if (li == 0u) {
            losses[g] = 0.0;
            counted[g] = 0u;
        }
        return;
    }
    // One pass for the max and the sum of exp (online: a thread's sum is rescaled when its
    // max grows), then the threads' sums rescaled to the row max and added.
    var m = -3.0e38;
    var s = 0.0;
    for (var j = li; j < p.vocab; j = j + WG) {
        let v = logits[base + j];
        if (v > m) {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s = s + exp(v - m);
        }
    }
    let mx = reduce_max(li, m);
    let lse = mx + log(reduce_sum(li, s * exp(m - mx)));
    let tgt = u32(tgt_i);
    if (li == 0u) {
        losses[g] = lse - logits[base + tgt];
        counted[g] = 1u;
    }
    // Every thread has read logits[base + tgt] before it is overwritten below.
    workgroupBarrier();
    if (p.want_grad != 0u) {
        for (var j = li; j < p.vocab; j = j + WG) {
            var d = exp(logits[base + j] - lse);
            if (j == tgt) {
                d = d - 1.0;
            }
            logits[base + j] = p.grad_scale * d;
        }
    }
}

@compute @workgroup_size(WG)
fn reduce(@builtin(local_invocation_index) li: u32) {
    var s = 0.0;
    var n = 0u;
    for (var i = li; i < p.n_rows; i = i + WG) {
        s = s + losses[i];
        n = n + counted[i];
    }
    red_n[li] = n;
    let total = reduce_sum(li, s);
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (li < k) {
            red_n[li] = red_n[li] + red_n[li + k];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        stats[0] = total;
        stats[1] = f32(red_n[0]);
    }
}
