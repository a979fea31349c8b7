// dropout.wgsl: LoRA dropout with counter-hash masks, identical to qlora_ext.cpu.ffn.apply_dropout.
//
//   out[r, c]  (= or +=, ADD)  z[r, c] · (keep ? scale : 0)
//   keep = (hash(idx ^ keys[key_index]) >> 8) >= thr,  idx = (row0 + r) · cols + c  (row0: the
//   first row of this dispatch in the whole batch, so a chunked batch gets the same mask as an
//   unchunked one).  The key is read from a buffer so that the uniform block stays the same
//   from step to step while the keys change.
//   The same call is the backward: the gradient passes through the same mask and scale.
//   z [rows, cols] row stride ld_in from in_off; out row stride ld_out from out_off.
// Grid (ceil(cols / WG), rows), at most 65535 rows per dispatch.

struct Params {
    rows: u32, cols: u32, ld_in: u32, ld_out: u32,
    in_off: u32, out_off: u32, key_index: u32, thr: u32,
    row0: u32, scale: f32,
}

override WG: u32 = 256u;
override ADD: bool = false;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read> z: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

//!include dropout_hash

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let r = gid.y;
    if (c >= P.cols || r >= P.rows) { return; }
    let idx = (P.row0 + r) * P.cols + c;
    let keep = (hash32(idx ^ keys[P.key_index]) >> 8u) >= P.thr;
    let v = select(0.0, z[P.in_off + r * P.ld_in + c] * P.scale, keep);
    let o = P.out_off + r * P.ld_out + c;
    if (ADD) { out[o] = out[o] + v; } else { out[o] = v; }
}
