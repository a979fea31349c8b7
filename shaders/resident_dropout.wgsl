// LoRA dropout of the resident mode: the counter-hash masks of shaders/dropout.wgsl and
// qlora_ext.cpu.ffn.apply_dropout (the same bits), with the key read from a per-step buffer
// so that the uniform block stays the same from step to step.
//   out[r, c]  (= or +=, ADD)  z[r, c] * (keep ? scale : 0)
//   keep = (hash(idx ^ keys[key_index]) >> 8) >= thr,  idx = (row0 + r) * cols + c
// z, out: [N, cols] contiguous, this dispatch covering rows row0 .. row0 + rows (at most
// 65535 rows per dispatch); keys: u32 [n_keys].  Grid (ceil(cols / WG), rows).
// Forward applies it to the adapter input; backward passes the LoRA branch's input gradient
// through the same mask and scale.

struct Params {
    rows: u32,
    cols: u32,
    key_index: u32,
    thr: u32,
    row0: u32,
    scale: f32,
}

override WG: u32 = 256u;
override ADD: bool = false;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read> z: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

//!include dropout_hash

@compute @workgroup_size(WG)
fn apply(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let r = gid.y;
    if (c >= P.cols || r >= P.rows) {
        return;
    }
    let idx = (P.row0 + r) * P.cols + c;
    let keep = (hash32(idx ^ keys[P.key_index]) >> 8u) >= P.thr;
    let o = idx;   // z and out are bound whole; a dispatch covers rows row0 .. row0 + rows
    let v = select(0.0, z[o] * P.scale, keep);
    if (ADD) {
        out[o] = out[o] + v;
    } else {
        out[o] = v;
    }
}
