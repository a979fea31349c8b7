// Embedding gather: out[n, c] = table[ids[n], c]; ids [N] i32, table [V, C] f32, out [N, C].
// One thread per output value, linear id over (wid.x + wid.y * num_workgroups.x) * WG + lane.
// An id outside [0, V) gives a zero row (the host wrapper rejects those before upload).
// No backward: embeddings stay frozen in QLoRA.

struct Params {
    n: u32,       // N * C
    c: u32,
    vocab: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + li;
    if (i >= p.n) {
        return;
    }
    let row = i / p.c;
    let col = i % p.c;
    let id = ids[row];
    var v = 0.0;
    if (id >= 0 && u32(id) < p.vocab) {
        v = table[u32(id) * p.c + col];
    }
    out[i] = v;
}
