// GQA: the dkdv entry of attention_bwd writes dk, dv per query head; this adds the
// G = Hq / Hkv heads of each kv head in head order (deterministic, no atomics).
//   part_k, part_v: [B, T, Hq, D] f32 -> dk, dv: [B, T, Hkv, D] f32.
// One thread per output element, grid_2d over ceil(B*T*Hkv*D / 256) workgroups.

struct Params {
    n: u32,       // B * T * Hkv * D
    hkv: u32,
    group: u32,   // Hq / Hkv
    d: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part_k: array<f32>;
@group(0) @binding(2) var<storage, read> part_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> dk: array<f32>;
@group(0) @binding(4) var<storage, read_write> dv: array<f32>;

@compute @workgroup_size(256)
fn group_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let e = (wid.x + wid.y * nwg.x) * 256u + li;   // ((b * T + t) * Hkv + hk) * D + d
    if (e >= p.n) {
        return;
    }
    let d = e % p.d;
    let bth = e / p.d;                              // (b * T + t) * Hkv + hk
    let src = (bth * p.group) * p.d + d;            // head hk * G + 0 of row (b, t)
    var sk = 0.0;
    var sv = 0.0;
    for (var g = 0u; g < p.group; g = g + 1u) {
        sk = sk + part_k[src + g * p.d];
        sv = sv + part_v[src + g * p.d];
    }
    dk[e] = sk;
    dv[e] = sv;
}
