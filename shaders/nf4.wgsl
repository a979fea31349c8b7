// NF4 dequantization into an fp32 scratch weight (the gpu placement, ahead of the fp32 GEMM):
//   w[e] = code[nibble(e)] * absmax[e / blocksize],  e = 0 .. n-1 (row-major over [out, in])
// packed: the NF4 bytes (element 2i in the HIGH nibble of byte i, bitsandbytes order) read as
// little-endian u32 words (the host pads to a multiple of 4 bytes); absmax: f32 per block
// (double quant already dequantized by the host); code: the 16 NF4 values, f32.
// One thread per element, linear id over (wid.x + wid.y * num_workgroups.x) * WG + lane.
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
@group(0) @binding(4) var<storage, read_write> w: array<f32>;

@compute @workgroup_size(WG)
fn dequant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let e = (wid.x + wid.y * nwg.x) * WG + li;
    if (e >= p.n) {
        return;
    }
    let byte_i = e / 2u;
    let byte = (packed[byte_i / 4u] >> (8u * (byte_i % 4u))) & 0xffu;
    var nib = byte & 15u;
    if (e % 2u == 0u) {
        nib = byte >> 4u;
    }
    w[e] = code[nib] * absmax[e / p.blocksize];
}
