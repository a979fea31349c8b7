// lora_grad.wgsl: the LoRA weight gradients, reductions over the token rows.
//
//   G[p, q]  (= or +=, ACCUM)  Σ_m X[m, p] · Y[m, q]        p < P (the rank side, small), q < Q
//   X [M, P] row stride ldx from x_off;  Y [M, Q] row stride ldy from y_off.
//   G stored [P, Q] (dA = dtᵀ z) or, with TRANS_OUT, [Q, P] (dB = dyᵀ t); from g_off.
//   ACCUM adds to G: the host splits very long batches into row chunks.
// Tiling: a 16 × 16 workgroup owns 16 p × 64 q; thread (tx, ty) owns p = p0 + ty and
// q = q0 + 4 tx .. + 3; the rows advance 16 at a time through workgroup tiles of X and Y.

struct Params {
    M: u32, P: u32, Q: u32, ldx: u32,
    ldy: u32, x_off: u32, y_off: u32, g_off: u32,
}

override TRANS_OUT: bool = false;
override ACCUM: bool = false;

@group(0) @binding(0) var<uniform> U: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> g: array<f32>;

var<workgroup> Xs: array<f32, 256>;   // [16 m][16 p]
var<workgroup> Ys: array<f32, 1024>;  // [16 m][64 q]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let p0 = wid.y * 16u;
    let q0 = wid.x * 64u;
    var acc = vec4<f32>(0.0);
    for (var m0 = 0u; m0 < U.M; m0 += 16u) {
        // X tile: 256 elements, one per thread
        let xm = li / 16u;
        let xp = li % 16u;
        var xv = 0.0;
        if (m0 + xm < U.M && p0 + xp < U.P) { xv = x[U.x_off + (m0 + xm) * U.ldx + p0 + xp]; }
        Xs[li] = xv;
        // Y tile: 1024 elements, four per thread
        for (var i = 0u; i < 4u; i++) {
            let e = li + i * 256u;
            let ym = e / 64u;
            let yq = e % 64u;
            var yv = 0.0;
            if (m0 + ym < U.M && q0 + yq < U.Q) { yv = y[U.y_off + (m0 + ym) * U.ldy + q0 + yq]; }
            Ys[e] = yv;
        }
        workgroupBarrier();
        for (var m = 0u; m < 16u; m++) {
            let xs = Xs[m * 16u + lid.y];
            let yb = m * 64u + lid.x * 4u;
            acc = fma(vec4<f32>(xs), vec4<f32>(Ys[yb], Ys[yb + 1u], Ys[yb + 2u], Ys[yb + 3u]), acc);
        }
        workgroupBarrier();
    }
    let p = p0 + lid.y;
    if (p >= U.P) { return; }
    for (var e = 0u; e < 4u; e++) {
        let q = q0 + lid.x * 4u + e;
        if (q < U.Q) {
            var gi: u32;
            if (TRANS_OUT) { gi = U.g_off + q * U.P + p; } else { gi = U.g_off + p * U.Q + q; }
            var v = acc[e];
            if (ACCUM) { v += g[gi]; }
            g[gi] = v;
        }
    }
}
