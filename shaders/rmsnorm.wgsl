// RMSNorm forward and backward for the GPU layer (HF order of operations):
//   rstd[n] = 1 / sqrt(mean_c(x[n,c]^2) + eps),  y[n,c] = w[c] * (x[n,c] * rstd[n])
// x, y, dy, dx: [N, C] row-major f32; w: [C]; rstd: [N].  Per-head q/k norm is the same
// kernel on x viewed as [N*H, D].
// forward / backward: TPR threads per row, WG / TPR rows per workgroup (row = (wid.x + wid.y *
// num_workgroups.x) * (WG / TPR) + li / TPR, so that N may exceed 65,535 workgroups' worth).
// Thread lane l of a row takes units l, l + TPR, ... (a unit is a vec4 where C % 4 == 0, VEC,
// else one element; a vec4's squares in x, y, z, w order) 8 at a time, sums each 8 as a tree,
// then the row's TPR sums are added as a tree in workgroup memory (workgroup_reduce's
// segment_sum): a fixed order, so results do not depend on N.  The host sizes TPR to the row
// (layer_ops._rms_layout), so that short rows (per-head q/k norm, D 128) share a workgroup
// and their trees stay short.
// dweight: one thread per column, summing dy * x * rstd over all rows (the norm weights are
// frozen in QLoRA; this is here for completeness of the backward).
// WG and TPR must be powers of two, TPR <= WG.  Buffers are whole vec4s (GpuContext.empty).

struct Params {
    n_rows: u32,
    c: u32,
    eps: f32,
    accumulate: u32,  // backward: 1 -> dx += result (dweight += result), 0 -> overwrite
}

override WG: u32 = 256u;
override TPR: u32 = 32u;
override VEC: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;  // forward: y; backward: dx
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;     // forward writes, backward reads
@group(0) @binding(5) var<storage, read> dy: array<vec4<f32>>;       // backward only

//!include workgroup_reduce

// Unit u of a row from element `base`: a vec4 (VEC) or one element in .x (the rest 0)
fn unit_of_x(base: u32, u: u32) -> vec4<f32> {
    if (VEC) { return x[base / 4u + u]; }
    let e = base + u;
    return vec4<f32>(x[e >> 2u][e & 3u], 0.0, 0.0, 0.0);
}

fn unit_of_dy(base: u32, u: u32) -> vec4<f32> {
    if (VEC) { return dy[base / 4u + u]; }
    let e = base + u;
    return vec4<f32>(dy[e >> 2u][e & 3u], 0.0, 0.0, 0.0);
}

fn unit_of_y(base: u32, u: u32) -> vec4<f32> {
    if (VEC) { return y[base / 4u + u]; }
    let e = base + u;
    return vec4<f32>(y[e >> 2u][e & 3u], 0.0, 0.0, 0.0);
}

fn unit_of_w(u: u32) -> vec4<f32> {
    if (VEC) { return w[u]; }
    return vec4<f32>(w[u >> 2u][u & 3u], 0.0, 0.0, 0.0);
}

fn store_y(base: u32, u: u32, v: vec4<f32>) {
    if (VEC) {
        y[base / 4u + u] = v;
        return;
    }
    let e = base + u;
    y[e >> 2u][e & 3u] = v.x;
}

fn squares(v: vec4<f32>) -> f32 {
    return ((v.x * v.x + v.y * v.y) + v.z * v.z) + v.w * v.w;
}

fn hsum(t: vec4<f32>) -> f32 {
    return ((t.x + t.y) + t.z) + t.w;
}

// Units are taken 8 at a time per thread (u, u + TPR, ..., u + 7 TPR), written out so that
// their loads are in flight together (a loop over them stays rolled in the NVIDIA driver, and
// each load then waits for the one before).  Units past the row load its last unit, and the
// select or the store's guard drops them.
fn sq_at(base: u32, u: u32, units: u32) -> f32 {
    return select(0.0, squares(unit_of_x(base, min(u, units - 1u))), u < units);
}

fn wdx_at(base: u32, u: u32, units: u32) -> f32 {
    let c = min(u, units - 1u);
    return select(0.0, hsum(unit_of_w(c) * unit_of_dy(base, c) * unit_of_x(base, c)), u < units);
}

fn y_at(base: u32, u: u32, units: u32, r: f32) -> vec4<f32> {
    let c = min(u, units - 1u);
    return unit_of_w(c) * (unit_of_x(base, c) * r);
}

fn dx_at(base: u32, u: u32, units: u32, r: f32, k: f32) -> vec4<f32> {
    let c = min(u, units - 1u);
    var g = r * unit_of_w(c) * unit_of_dy(base, c) - unit_of_x(base, c) * k;
    if (p.accumulate != 0u) {
        g = g + unit_of_y(base, c);
    }
    return g;
}

fn store_at(base: u32, u: u32, units: u32, v: vec4<f32>) {
    if (u < units) {
        store_y(base, u, v);
    }
}

// Stores the outputs v of units u, u + TPR, ..., u + 7 TPR.  The callers form all 8 first
// (their loads in flight together), then store.  forward and backward spell out their own
// 8-unit sums and outputs: a helper shared by both would use dy (binding 5) statically, and
// the forward's pipeline has no dy.
fn store8(base: u32, u: u32, units: u32, v: array<vec4<f32>, 8>) {
    let T = TPR;
    store_at(base, u, units, v[0]);
    store_at(base, u + T, units, v[1]);
    store_at(base, u + 2u * T, units, v[2]);
    store_at(base, u + 3u * T, units, v[3]);
    store_at(base, u + 4u * T, units, v[4]);
    store_at(base, u + 5u * T, units, v[5]);
    store_at(base, u + 6u * T, units, v[6]);
    store_at(base, u + 7u * T, units, v[7]);
}

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let row = (wid.x + wid.y * nwg.x) * (WG / TPR) + li / TPR;
    let lane = li % TPR;
    let ok = row < p.n_rows;
    let units = select(p.c, p.c / 4u, VEC);
    let base = row * p.c;
    let T = TPR;
    var s = 0.0;
    if (ok) {
        for (var u = lane; u < units; u = u + 8u * T) {
            s = s + (((sq_at(base, u, units) + sq_at(base, u + T, units))
                      + (sq_at(base, u + 2u * T, units) + sq_at(base, u + 3u * T, units)))
                     + ((sq_at(base, u + 4u * T, units) + sq_at(base, u + 5u * T, units))
                        + (sq_at(base, u + 6u * T, units) + sq_at(base, u + 7u * T, units))));
        }
    }
    let r = 1.0 / sqrt(segment_sum(li, s, TPR) / f32(p.c) + p.eps);
    if (!ok) {
        return;
    }
    for (var u = lane; u < units; u = u + 8u * T) {
        store8(base, u, units, array<vec4<f32>, 8>(
            y_at(base, u, units, r), y_at(base, u + T, units, r), y_at(base, u + 2u * T, units, r),
            y_at(base, u + 3u * T, units, r), y_at(base, u + 4u * T, units, r),
            y_at(base, u + 5u * T, units, r), y_at(base, u + 6u * T, units, r), y_at(base, u + 7u * T, units, r)));
    }
    if (lane == 0u) {
        rstd[row] = r;
    }
}

// dx[n,c] = r*w[c]*dy[n,c] - x[n,c] * r^3 / C * sum_j w[j]*dy[n,j]*x[n,j]
@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let row = (wid.x + wid.y * nwg.x) * (WG / TPR) + li / TPR;
    let lane = li % TPR;
    let ok = row < p.n_rows;
    let units = select(p.c, p.c / 4u, VEC);
    let base = row * p.c;
    let T = TPR;
    var r = 0.0;
    var s = 0.0;
    if (ok) {
        r = rstd[row];
        for (var u = lane; u < units; u = u + 8u * T) {
            s = s + (((wdx_at(base, u, units) + wdx_at(base, u + T, units))
                      + (wdx_at(base, u + 2u * T, units) + wdx_at(base, u + 3u * T, units)))
                     + ((wdx_at(base, u + 4u * T, units) + wdx_at(base, u + 5u * T, units))
                        + (wdx_at(base, u + 6u * T, units) + wdx_at(base, u + 7u * T, units))));
        }
    }
    let k = segment_sum(li, s, TPR) * r * r * r / f32(p.c);
    if (!ok) {
        return;
    }
    for (var u = lane; u < units; u = u + 8u * T) {
        store8(base, u, units, array<vec4<f32>, 8>(
            dx_at(base, u, units, r, k), dx_at(base, u + T, units, r, k), dx_at(base, u + 2u * T, units, r, k),
            dx_at(base, u + 3u * T, units, r, k), dx_at(base, u + 4u * T, units, r, k),
            dx_at(base, u + 5u * T, units, r, k), dx_at(base, u + 6u * T, units, r, k),
            dx_at(base, u + 7u * T, units, r, k)));
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
        let e = n * p.c + c;
        s = s + dy[e >> 2u][e & 3u] * x[e >> 2u][e & 3u] * rstd[n];
    }
    if (p.accumulate != 0u) {
        s = s + y[c >> 2u][c & 3u];
    }
    y[c >> 2u][c & 3u] = s;
}
