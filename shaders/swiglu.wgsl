// swiglu.wgsl: the SwiGLU of the Llama/Qwen MLP and its backward, elementwise.
//
//   gu [M, 2I] holds the gate and up projections side by side (g = gu[:, :I], u = gu[:, I:]),
//   row stride 2I; h, dh [M, I]; dgu [M, 2I].   sig = 1 / (1 + exp(-g))
//   forward:  h  = g · sig · u
//   backward: dg = dh · u · sig · (1 + g · (1 - sig)),   du = dh · g · sig
// Grid: x over columns (WG threads each), y over rows (the host keeps M ≤ 65535 per dispatch).

struct Params { M: u32, I: u32, _p0: u32, _p1: u32 }

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read> dh: array<f32>;
@group(0) @binding(3) var<storage, read_write> dgu: array<f32>;
@group(0) @binding(4) var<storage, read_write> h: array<f32>;

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if (col >= P.I || row >= P.M) { return; }
    let g = gu[row * 2u * P.I + col];
    let u = gu[row * 2u * P.I + P.I + col];
    let sig = 1.0 / (1.0 + exp(-g));
    h[row * P.I + col] = g * sig * u;
}

@compute @workgroup_size(WG)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if (col >= P.I || row >= P.M) { return; }
    let gi = row * 2u * P.I + col;
    let g = gu[gi];
    let u = gu[gi + P.I];
    let d = dh[row * P.I + col];
    let sig = 1.0 / (1.0 + exp(-g));
    dgu[gi] = d * u * sig * (1.0 + g * (1.0 - sig));
    dgu[gi + P.I] = d * g * sig;
}
