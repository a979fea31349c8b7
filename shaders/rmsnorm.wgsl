// RMSNorm forward and backward for the GPU layer (HF order of operations):
//   rstd[n] = 1 / sqrt(mean_c(x[n,c]^2) + eps),  y[n,c] = w[c] * (x[n,c] * rstd[n])
// x, y, dy, dx: [N, C] row-major f32; w: [C]; rstd: [N].  Per-head q/k norm is the same
// kernel on x viewed as [N*H, D].
// forward / backward: one workgroup per row (rows = wid.x + wid.y * num_workgroups.x so that
// N may exceed 65,535), WG threads stride over C and reduce in workgroup memory.
// dweight: one thread per column, summing dy * x * rstd over all rows (the norm weights are
// frozen in QLoRA; this is here for completeness of the backward).
// WG must be a power of two.

struct Params {
    n_rows: u32,
    c: u32,
    eps: f32,
    accumulate: u32,  // backward: 1 -> dx += result (dweight += result), 0 -> overwrite
}

override WG: u32 = 128u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;     // forward: y; backward: dx
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;  // forward writes, backward reads
@group(0) @binding(5) var<storage, read> dy: array<f32>;          // backward only

var<workgroup> red: array<f32, WG>;

fn reduce_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (li < k) {
            red[li] = red[li] + red[li + k];
        }
        workgroupBarrier();
    }
    let s = red[0];
    // Everyone has read red[0] before it is reused by the next reduction.
    workgroupBarrier();
    return s;
}

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n_rows) {
        return;
    }
    let base = row * p.c;
    var s = 0.0;
    for (var i = li; i < p.c; i = i + WG) {
        let v = x[base + i];
        s = s + v * v;
    }
    let r = 1.0 / sqrt(reduce_sum(li, s) / f32(p.c) + p.eps);
    for (var i = li; i < p.c; i = i + WG) {
        y[base + i] = w[i] * (x[base + i] * r);
    }
    if (li == 0u) {
        rstd[row] = r;
    }
}

// dx[n,c] = r*w[c]*dy[n,c] - x[n,c] * r^3 / C * sum_j w[j]*dy[n,j]*x[n,j]
@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n_rows) {
        return;
    }
    let base = row * p.c;
    let r = rstd[row];
    var s = 0.0;
    for (var i = li; i < p.c; i = i + WG) {
        s = s + w[i] * dy[base + i] * x[base + i];
    }
    let k = reduce_sum(li, s) * r * r * r / f32(p.c);
    for (var i = li; i < p.c; i = i + WG) {
        var g = r * w[i] * dy[base + i] - x[base + i] * k;
        if (p.accumulate != 0u) {
            g = g + y[base + i];
        }
        y[base + i] = g;
    }
}

// dweight[c] (+)= sum_n dy[n,c] * x[n,c] * rstd[n]; dweight is bound at binding 3.
@compute @workgroup_size(WG)
fn dweight(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    var s = 0.0;
    for (var n = 0u; n < p.n_rows; n = n + 1u) {
        s = s + dy[n * p.c + c] * x[n * p.c + c] * rstd[n];
    }
    if (p.accumulate != 0u) {
        s = s + y[c];
    }
    y[c] = s;
}
