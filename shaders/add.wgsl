// Residual add (and gradient accumulation): dst[i] += alpha * src[i] over n f32 values
// (entry `axpy`), and a bias broadcast over rows: dst[i] += alpha * src[i % c] for dst [n / c, c]
// and src [c] (entry `bias_rows`: Qwen2's q/k/v biases).  One thread per value, linear id over (wid.x + wid.y * num_workgroups.x) * WG + lane.

struct Params {
    n: u32,
    alpha: f32,
    c: u32,      // bias_rows: the row length (bias size)
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

@compute @workgroup_size(WG)
fn axpy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    dst[i] = dst[i] + p.alpha * src[i];
}

@compute @workgroup_size(WG)
fn bias_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    dst[i] = dst[i] + p.alpha * src[i % p.c];
}
