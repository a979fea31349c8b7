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
// Grid: x over column groups (WG threads each), y over rows (the host dispatches at most 65535
// rows at a time, with the offsets advanced).  A thread takes 4 columns as one vec4 where VEC
// (the host sets it when I, the strides and the offsets are multiples of 4), else one column.
// The vec4 arithmetic is the scalar one per lane: both give the same bits.  Buffers are whole
// vec4s.

struct Params {
    M: u32, I: u32, ld_in: u32, g_off: u32,
    u_off: u32, ld_out: u32, o0_off: u32, o1_off: u32,
    dh_off: u32,
}

override WG: u32 = 256u;
override ONE_OUT: bool = false;
override VEC: bool = false;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> u: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out0: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out1: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> dh: array<vec4<f32>>;

fn silu_mul(gv: vec4<f32>, uv: vec4<f32>) -> vec4<f32> {
    let sig = 1.0 / (1.0 + exp(-gv));
    return gv * sig * uv;
}

// (dg, du) of gate gv, up uv, output gradient d
fn silu_mul_grad(gv: vec4<f32>, uv: vec4<f32>, d: vec4<f32>) -> array<vec4<f32>, 2> {
    let sig = 1.0 / (1.0 + exp(-gv));
    return array<vec4<f32>, 2>(d * uv * sig * (1.0 + gv * (1.0 - sig)), d * gv * sig);
}

// Element indices of (row, col) in g, u, dh and the two outputs
struct At { g: u32, u: u32, dh: u32, o0: u32, o1: u32 }

fn at(row: u32, col: u32) -> At {
    return At(P.g_off + row * P.ld_in + col, P.u_off + row * P.ld_in + col, P.dh_off + row * P.I + col,
              P.o0_off + row * P.ld_out + col, P.o1_off + row * P.ld_out + col);
}

// The value(s) at element i: with VEC the vec4 from i (a multiple of 4), else element i in
// every lane (the arithmetic runs on lane x only).  WGSL cannot pass a binding to a function,
// hence one reader per binding.
fn g4(i: u32) -> vec4<f32> {
    if (VEC) { return g[i >> 2u]; }
    return vec4<f32>(g[i >> 2u][i & 3u]);
}

fn u4(i: u32) -> vec4<f32> {
    if (VEC) { return u[i >> 2u]; }
    return vec4<f32>(u[i >> 2u][i & 3u]);
}

fn dh4(i: u32) -> vec4<f32> {
    if (VEC) { return dh[i >> 2u]; }
    return vec4<f32>(dh[i >> 2u][i & 3u]);
}

fn put0(i: u32, v: vec4<f32>) {
    if (VEC) { out0[i >> 2u] = v; } else { out0[i >> 2u][i & 3u] = v.x; }
}

fn put1(i: u32, v: vec4<f32>) {
    if (ONE_OUT) {
        put0(i, v);
    } else if (VEC) {
        out1[i >> 2u] = v;
    } else {
        out1[i >> 2u][i & 3u] = v.x;
    }
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.y;
    let col = select(gid.x, gid.x * 4u, VEC);
    if (col >= P.I || row >= P.M) { return; }
    let e = at(row, col);
    put0(e.o0, silu_mul(g4(e.g), u4(e.u)));
}

@compute @workgroup_size(WG)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.y;
    let col = select(gid.x, gid.x * 4u, VEC);
    if (col >= P.I || row >= P.M) { return; }
    let e = at(row, col);
    let r = silu_mul_grad(g4(e.g), u4(e.u), dh4(e.dh));
    put0(e.o0, r[0]);
    put1(e.o1, r[1]);
}
