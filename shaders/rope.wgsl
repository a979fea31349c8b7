// RoPE (HF rotate_half) in place on x [B, T, H, D] f32, forward or backward:
//   x1' = x1 cos - sign * x2 sin,  x2' = x2 cos + sign * x1 sin
// with x1 = x[..., :D/2], x2 = x[..., D/2:], cos/sin = tables[pos, i] ([P, D/2] f32),
// pos = positions[b*T + t] (i32).  sign = +1 forward, -1 backward (the transpose rotation).
// One thread per rotated pair; linear id over (wid.x + wid.y * num_workgroups.x) * WG + lane.
// A position outside [0, P) leaves its pairs untouched (the host wrapper rejects those).

struct Params {
    n_pairs: u32,   // B * T * H * (D / 2)
    n_heads: u32,   // H
    half: u32,      // D / 2
    n_pos: u32,     // P
    sign: f32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;

@compute @workgroup_size(WG)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let idx = (wid.x + wid.y * nwg.x) * WG + li;
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
    let c = cos_t[u32(pos) * p.half + i];
    let s = p.sign * sin_t[u32(pos) * p.half + i];
    let base = rest * 2u * p.half;
    let x1 = x[base + i];
    let x2 = x[base + i + p.half];
    x[base + i] = x1 * c - x2 * s;
    x[base + i + p.half] = x2 * c + x1 * s;
}
