// RoPE (HF rotate_half) in place on x [B, T, H, D] f32, forward or backward:
//   x1' = x1 cos - sign * x2 sin,  x2' = x2 cos + sign * x1 sin
// with x1 = x[..., :D/2], x2 = x[..., D/2:], cos/sin = tables[pos, i] ([P, D/2] f32),
// pos = positions[b*T + t] (i32).  sign = +1 forward, -1 backward (the transpose rotation).
// One thread per 4 rotated pairs (pairs i .. i + 3 of one head, i a multiple of 4) where
// D / 2 % 4 == 0 (VEC: x1, x2, cos and sin move as vec4s), else per pair; linear id over
// (wid.x + wid.y * num_workgroups.x) * WG + lane.  Buffers are whole vec4s (GpuContext.empty).
// A position outside [0, P) leaves its pairs untouched (the host wrapper rejects those).

struct Params {
    n_pairs: u32,   // B * T * H * (D / 2)
    n_heads: u32,   // H
    half: u32,      // D / 2
    n_pos: u32,     // P
    sign: f32,
}

override WG: u32 = 64u;
override VEC: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read> cos_t: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> sin_t: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let per = select(1u, 4u, VEC);                       // pairs a thread
    let idx = ((wid.x + wid.y * nwg.x) * WG + li) * per;  // its first pair
    if (idx >= p.n_pairs) {
        return;
    }
    let i = idx % p.half;
    let rest = idx / p.half;         // (b*T + t) * H + h
    let bt = rest / p.n_heads;
    let pos = positions[bt];
    if (pos < 0 || u32(pos) >= p.n_pos) {
        return;
    }
    let t = u32(pos) * p.half + i;   // element of the tables
    let e1 = rest * 2u * p.half + i; // element of x1; x2 at e1 + half
    let e2 = e1 + p.half;
    if (VEC) {
        let c = cos_t[t / 4u];
        let s = p.sign * sin_t[t / 4u];
        let x1 = x[e1 / 4u];
        let x2 = x[e2 / 4u];
        x[e1 / 4u] = x1 * c - x2 * s;
        x[e2 / 4u] = x2 * c + x1 * s;
        return;
    }
    let c = cos_t[t >> 2u][t & 3u];
    let s = p.sign * sin_t[t >> 2u][t & 3u];
    let x1 = x[e1 >> 2u][e1 & 3u];
    let x2 = x[e2 >> 2u][e2 & 3u];
    x[e1 >> 2u][e1 & 3u] = x1 * c - x2 * s;
    x[e2 >> 2u][e2 & 3u] = x2 * c + x1 * s;
}
