// AdamW (torch.optim.AdamW semantics) on flat f32 buffers holding every LoRA parameter:
//   g = (grad * gscale) * clip                       (1/tokens, then the clip coefficient: the
//                                                      CPU Trainer's two in-place f32 scalings)
//   p *= 1 - lr * weight_decay                       (decoupled decay, before the update)
//   m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g^2
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with 1 - b1, 1 - b2, step_size = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t) computed on the host in float64
// (as torch does) and passed per step.  p, g, m, v: [n]; one thread per element, linear id over
// (wid.x + wid.y * num_workgroups.x) * WG + lane.

struct Params {
    n: u32,
    b1: f32,
    b2: f32,
    b1c: f32,         // 1 - b1 and 1 - b2 rounded once from float64 (as torch's scalars): in
    b2c: f32,         // f32, 1 - 0.999 would be off by 1.3e-5 relative
    eps: f32,
    decay: f32,       // 1 - lr * weight_decay
    step_size: f32,
    bc2_sqrt: f32,
    gscale: f32,
    clip: f32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(WG)
fn step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    let g = (grad[i] * p.gscale) * p.clip;
    let mi = p.b1 * m[i] + p.b1c * g;
    let vi = p.b2 * v[i] + p.b2c * (g * g);
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    param[i] = param[i] * p.decay - p.step_size * (mi / denom);
}
