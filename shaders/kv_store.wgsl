// Generation's KV cache: new keys and values into their slots.
//   knew, vnew: [B, Tn, Hkv, D] f32; kc, vc: [B, S, Hkv, D] f32, the cache of one layer.
// Row b's new tokens go to slots length .. length + Tn - 1 of row b.
// One thread per value of knew (and of vnew), linear id (wid.x + wid.y * num_workgroups.x) * WG + lane.

struct Params {
    n: u32,        // B * Tn * Hkv * D
    tn: u32,
    slots: u32,    // S
    width: u32,    // Hkv * D
    length: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> knew: array<f32>;
@group(0) @binding(2) var<storage, read> vnew: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<f32>;
@group(0) @binding(4) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(WG)
fn store(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    let c = i % p.width;
    let bt = i / p.width;          // b * Tn + t
    let t = bt % p.tn;
    let b = bt / p.tn;
    let dst = (b * p.slots + p.length + t) * p.width + c;
    kc[dst] = knew[i];
    vc[dst] = vnew[i];
}
