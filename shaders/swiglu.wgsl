// swiglu.wgsl: the SwiGLU of the Llama/Qwen MLP and its backward, elementwise.
//
//   g, u [M, I]: gate and up, row stride ld_in, from elements g_off / u_off of their buffers
//   (the split backend binds its gu [M, 2I] twice: u_off = g_off + I, ld_in = 2I).
//   sig = 1 / (1 + exp(-g))   (exp(-g) overflows to inf for g < -88: 1 / inf = 0, the right limit)
//   forward:  h  = g · sig · u                                 -> out0 from o0_off
//   backward: dg = dh · u · sig · (1 + g · (1 - sig))          -> out0 from o0_off
//             du = dh · g · sig                                -> out1 from o1_off, or out0 with
//                                                                 ONE_OUT (dg and du interleaved
//                                                                 in one buffer, as dgu [M, 2I])
//   outputs row stride ld_out; dh [M, I] contiguous from dh_off.
// Grid: x over columns (WG threads each), y over rows (the host dispatches at most 65535 rows
// at a time, with the offsets advanced).

struct Params {
    M: u32, I: u32, ld_in: u32, g_off: u32,
    u_off: u32, ld_out: u32, o0_off: u32, o1_off: u32,
    dh_off: u32,
}

override WG: u32 = 256u;
override ONE_OUT: bool = false;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> out0: array<f32>;
@group(0) @binding(4) var<storage, read_write> out1: array<f32>;
@group(0) @binding(5) var<storage, read> dh: array<f32>;

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if (col >= P.I || row >= P.M) { return; }
    let gv = g[P.g_off + row * P.ld_in + col];
    let uv = u[P.u_off + row * P.ld_in + col];
    let sig = 1.0 / (1.0 + exp(-gv));
    out0[P.o0_off + row * P.ld_out + col] = gv * sig * uv;
}

@compute @workgroup_size(WG)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if (col >= P.I || row >= P.M) { return; }
    let gv = g[P.g_off + row * P.ld_in + col];
    let uv = u[P.u_off + row * P.ld_in + col];
    let d = dh[P.dh_off + row * P.I + col];
    let sig = 1.0 / (1.0 + exp(-gv));
    out0[P.o0_off + row * P.ld_out + col] = d * uv * sig * (1.0 + gv * (1.0 - sig));
    let du = d * gv * sig;
    if (ONE_OUT) {
        out0[P.o1_off + row * P.ld_out + col] = du;
    } else {
        out1[P.o1_off + row * P.ld_out + col] = du;
    }
}
