// SwiGLU of the FFN, forward and backward, elementwise over n = N * F values (f32):
//   h = silu(g) * u,  silu(g) = g * sigmoid(g)
//   dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = dh * silu(g)
// g, u, h, dh, dg, du are flat arrays of the same length; linear id over
// (wid.x + wid.y * num_workgroups.x) * WG + lane.

struct Params {
    n: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> out0: array<f32>;  // forward: h; backward: dg
@group(0) @binding(4) var<storage, read_write> out1: array<f32>;  // backward: du (forward: unused)
@group(0) @binding(5) var<storage, read> dh: array<f32>;          // backward only

fn sigmoid(v: f32) -> f32 {
    // exp(-v) overflows to inf for v < -88: 1 / inf = 0, the right limit.
    return 1.0 / (1.0 + exp(-v));
}

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    let gv = g[i];
    out0[i] = gv * sigmoid(gv) * u[i];
}

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    let gv = g[i];
    let s = sigmoid(gv);
    let d = dh[i];
    out0[i] = d * u[i] * s * (1.0 + gv * (1.0 - s));
    out1[i] = d * gv * s;
}
