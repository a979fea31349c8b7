// NF4 dequantization into an fp32 scratch weight (the gpu placement, ahead of the fp32 GEMM):
//   w[e] = code[nibble(e)] * absmax[e / blocksize],  e = 0 .. n-1 (row-major over [out, in])
// packed: the NF4 bytes (element 2i in the HIGH nibble of byte i, bitsandbytes order) read as
// little-endian u32 words (the host pads to a multiple of 4 bytes); absmax: f32 per block
// (double quant already dequantized by the host); code: the 16 NF4 values, f32.
// One thread per packed word: its 8 elements (4 bytes) as two vec4 stores, all of one block
// (blocksizes are powers of two from 32, as nf4.py checks); the 16 code values from workgroup
// memory; elements at or past n are not written (the scratch may be longer than the weight).
// Linear word id over (wid.x + wid.y * num_workgroups.x) * WG + lane.
// The product is the same single f32 multiply as the CPU dequantizer, so results are bit-equal.

struct Params {
    n: u32,
    blocksize: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> packed: array<u32>;
@group(0) @binding(2) var<storage, read> absmax: array<f32>;
@group(0) @binding(3) var<storage, read> code: array<f32>;
@group(0) @binding(4) var<storage, read_write> w: array<vec4<f32>>;

var<workgroup> code_s: array<f32, 16>;

fn value(byte: u32, high: bool, scale: f32) -> f32 {
    return code_s[select(byte & 15u, byte >> 4u, high)] * scale;
}

@compute @workgroup_size(WG)
fn dequant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    if (li < 16u) {
        code_s[li] = code[li];
    }
    workgroupBarrier();
    let t = (wid.x + wid.y * nwg.x) * WG + li;
    let e0 = 8u * t;
    if (e0 >= p.n) {
        return;
    }
    let word = packed[t];
    let scale = absmax[e0 / p.blocksize];   // blocksize is a power of two >= 32: one block a word
    let b0 = word & 0xffu;
    let b1 = (word >> 8u) & 0xffu;
    let b2 = (word >> 16u) & 0xffu;
    let b3 = word >> 24u;
    let lo = vec4<f32>(value(b0, true, scale), value(b0, false, scale), value(b1, true, scale),
                       value(b1, false, scale));
    let hi = vec4<f32>(value(b2, true, scale), value(b2, false, scale), value(b3, true, scale),
                       value(b3, false, scale));
    if (e0 + 8u <= p.n) {
        w[2u * t] = lo;
        w[2u * t + 1u] = hi;
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (e0 + j < p.n) { w[2u * t][j] = lo[j]; }
        if (e0 + 4u + j < p.n) { w[2u * t + 1u][j] = hi[j]; }
    }
}
