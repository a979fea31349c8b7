// Squared L2 norm of the flat LoRA gradient, for global-norm clipping on the GPU:
//   partial[w] = sum over this workgroup's elements of (g[i] * scale)^2
// g: [n] f32; partial: [num_workgroups] f32.  Workgroup w takes the contiguous slice
// [w * per, (w + 1) * per), per = ceil(n / num_workgroups); each thread sums every WG-th
// element of it, then a tree in workgroup memory.  The order is fixed, so the result is the
// same on every run (the host adds the partials in float64).

struct Params {
    n: u32,
    scale: f32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;

var<workgroup> acc: array<f32, WG>;

@compute @workgroup_size(WG)
fn sq_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let per = (p.n + nwg.x - 1u) / nwg.x;
    let lo = wid.x * per;
    let hi = min(lo + per, p.n);
    var s = 0.0;
    for (var i = lo + li; i < hi; i = i + WG) {
        let x = g[i] * p.scale;
        s = s + x * x;
    }
    acc[li] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (li < stride) {
            acc[li] = acc[li] + acc[li + stride];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        partial[wid.x] = acc[0];
    }
}
