// Residual add (and gradient accumulation): dst[i] += alpha * src[i] over n f32 values
// (entry `axpy`), and a bias broadcast over rows: dst[i] += alpha * src[i % c] for dst [n / c, c]
// and src [c] (entry `bias_rows`: Qwen2's q/k/v biases).  axpy: one thread per 4 values (one
// vec4 load of each, one store; the last, partial vec4 value by value, so that nothing past n
// is written: dst may be the front of a larger buffer); bias_rows: one thread per value.  Linear
// id over (wid.x + wid.y * num_workgroups.x) * WG + lane.  Buffers are whole vec4s.

struct Params {
    n: u32,
    alpha: f32,
    c: u32,      // bias_rows: the row length (bias size)
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn axpy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;   // vec4 i: values 4i .. 4i + 3
    if (4u * i + 4u <= p.n) {
        dst[i] = dst[i] + p.alpha * src[i];
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (4u * i + j < p.n) {
            dst[i][j] = dst[i][j] + p.alpha * src[i][j];
        }
    }
}

@compute @workgroup_size(WG)
fn bias_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    let b = i % p.c;
    dst[i >> 2u][i & 3u] = dst[i >> 2u][i & 3u] + p.alpha * src[b >> 2u][b & 3u];
}
