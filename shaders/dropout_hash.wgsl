// The 32-bit mixer of the LoRA dropout masks (xorshift-multiply, 2 rounds): the same function
// as qlora_ext.cpu.ffn._hash32, so that every placement drops the same inputs.  Included by
// dropout.wgsl.
fn hash32(v: u32) -> u32 {
    var x = v;
    x = x ^ (x >> 16u);
    x = x * 0x7feb352du;
    x = x ^ (x >> 15u);
    x = x * 0x846ca68bu;
    x = x ^ (x >> 16u);
    return x;
}
