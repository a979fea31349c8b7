// The rank-r LoRA products of the GPU-resident mode (R <= 16 per workgroup; grid z takes
// further groups of 16 rank columns).  Skinny and memory-bound: one big operand X is streamed
// once (per 16 rank columns) with vec4 loads, the small one is staged in workgroup memory.
//
// entry `rows`:  C[M, R] = alpha * X[M, K] · op(W)        (u = s·x Aᵀ, du = s·dy B)
//   X [M, K] row-major at x_off; W at w_off: w_t = 1 -> stored [R, K] (LoRA A), 0 -> [K, R]
//   (LoRA B).  C [M, R] row-major.  A workgroup of 256 threads = 16 k-lanes x 16 row slots
//   owns 16·TR rows: lane l reads X[row, k0 + 4l .. 4l+3] (a warp reads 256 contiguous bytes
//   of each of its rows); K advances 64 at a time with W's [64, 16] slice staged as vec4s over
//   rank columns; the 16 lanes' partial sums of a row are added in lane order at the end.
//   Grid (ceil(M / (16·TR)), splits, ceil(R / 16)); split z takes K in [z·chunk, (z+1)·chunk).
//
// entry `cols`:  G (+)= X[M, P]ᵀ · Y[M, R]                  (dB += dyᵀ u, dA += duᵀ x)
//   X [M, P] row-major at x_off (P in field `k`); Y [M, R] at w_off; G stored [P, R]
//   (trans_out = 0) or [R, P] (trans_out = 1).  A workgroup of 256 threads = 64 column threads
//   (4 columns each, one vec4 of X per row) x 4 row lanes owns 256 columns; rows advance 64 at
//   a time with Y's [64, 16] slice staged; the 4 row lanes are added in order at the end.
//   Grid (ceil(P / 256), splits, ceil(R / 16)); split z takes rows [z·chunk, (z+1)·chunk).
//
// With splits = 1 the result goes to dst at c_off (alpha applied; + dst when accumulate);
// otherwise split z stores its partial at part[z·n + i] (n = outputs, i = dst's layout) and
// entry `reduce` sums the partials in z order into dst: no float atomics, so results are
// bit-reproducible.  Out-of-range elements load as 0 and are not stored.

struct Params {
    m: u32,          // token rows M
    k: u32,          // rows: K (reduced);  cols: P (output columns)
    r: u32,          // rank R
    x_off: u32,
    w_off: u32,      // rows: W;  cols: Y
    c_off: u32,
    w_t: u32,        // rows: W stored [R, K] (1) or [K, R] (0)
    accumulate: u32,
    alpha: f32,
    chunk: u32,      // rows: K per split (multiple of 64);  cols: rows per split (multiple of 64)
    splits: u32,
    trans_out: u32,  // cols: G stored [R, P]
}

override TR: u32 = 4u;          // rows entry: rows per thread (1..4)
override X_VEC: bool = false;   // x_off and X's row length are multiples of 4

const KL = 16u;   // rows: k lanes
const SL = 16u;   // rows: row slots (256 / KL)
const CL = 64u;   // cols: column threads
const RL = 4u;    // cols: row lanes (256 / CL)
const RC = 16u;   // rank columns per workgroup

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> part: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

var<workgroup> ws: array<vec4<f32>, 256>;    // [64][RC / 4]: W's (rows) or Y's (cols) slice
var<workgroup> red: array<vec4<f32>, 1024>;  // lane partials for the final in-order sum

fn x_at(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

// X elements base .. base+3 where index < end (zeros past it); one vec4 load when aligned
fn x4(base: u32, idx: u32, end: u32) -> vec4<f32> {
    if (X_VEC && idx + 3u < end) {
        return x[base >> 2u];
    }
    var v = vec4<f32>(0.0);
    for (var t = 0u; t < 4u; t = t + 1u) {
        if (idx + t < end) {
            v[t] = x_at(base + t);
        }
    }
    return v;
}

// Output i (dst layout) of split z: straight to dst, or to the partials
fn store(i: u32, v: f32, z: u32, n: u32) {
    if (p.splits == 1u) {
        let o = p.c_off + i;
        dst[o] = select(v, v + dst[o], p.accumulate != 0u);
    } else {
        part[z * n + i] = v;
    }
}

@compute @workgroup_size(256)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let lane = li % KL;
    let slot = li / KL;
    let m0 = wid.x * SL * TR;
    let j0 = wid.z * RC;
    let kb = wid.y * p.chunk;
    let ke = min(p.k, kb + p.chunk);
    var acc: array<vec4<f32>, 16>;   // [i * 4 + jq]: row slot + 16 i, rank columns 4 jq .. 4 jq + 3
    for (var q = 0u; q < 16u; q = q + 1u) {
        acc[q] = vec4<f32>(0.0);
    }
    for (var k0 = kb; k0 < ke; k0 = k0 + 64u) {
        // W[j0 .. j0+16, k0 .. k0+64] -> ws[kl * 4 + j / 4][j % 4]; consecutive threads take
        // consecutive addresses of W's stored layout
        for (var t = 0u; t < 4u; t = t + 1u) {
            let e = li + 256u * t;
            var kl: u32;
            var j: u32;
            if (p.w_t != 0u) {
                j = e / 64u;
                kl = e % 64u;
            } else {
                kl = e / RC;
                j = e % RC;
            }
            let kg = k0 + kl;
            let jg = j0 + j;
            var v = 0.0;
            if (kg < ke && jg < p.r) {
                if (p.w_t != 0u) {
                    v = w[p.w_off + jg * p.k + kg];
                } else {
                    v = w[p.w_off + kg * p.r + jg];
                }
            }
            ws[kl * 4u + j / 4u][j % 4u] = v;
        }
        workgroupBarrier();
        let kk = k0 + 4u * lane;
        var xv: array<vec4<f32>, 4>;
        for (var i = 0u; i < TR; i = i + 1u) {
            let row = m0 + slot + SL * i;
            xv[i] = vec4<f32>(0.0);
            if (row < p.m && kk < ke) {
                xv[i] = x4(p.x_off + row * p.k + kk, kk, ke);
            }
        }
        let b = 16u * lane;   // ws row of k = kk
        for (var jq = 0u; jq < 4u; jq = jq + 1u) {
            let w0 = ws[b + jq];
            let w1 = ws[b + 4u + jq];
            let w2 = ws[b + 8u + jq];
            let w3 = ws[b + 12u + jq];
            for (var i = 0u; i < TR; i = i + 1u) {
                acc[i * 4u + jq] = acc[i * 4u + jq] + xv[i].x * w0 + xv[i].y * w1 + xv[i].z * w2 + xv[i].w * w3;
            }
        }
        workgroupBarrier();
    }
    // the 16 lanes of each row, added in lane order, 4 rank columns at a time
    let n = p.m * p.r;
    for (var jq = 0u; jq < 4u; jq = jq + 1u) {
        for (var i = 0u; i < TR; i = i + 1u) {
            red[(lane * SL + slot) * TR + i] = acc[i * 4u + jq];
        }
        workgroupBarrier();
        if (li < SL * TR) {
            let s = li / TR;
            let i = li % TR;
            var sum = vec4<f32>(0.0);
            for (var l = 0u; l < KL; l = l + 1u) {
                sum = sum + red[(l * SL + s) * TR + i];
            }
            let row = m0 + s + SL * i;
            for (var jj = 0u; jj < 4u; jj = jj + 1u) {
                let j = j0 + jq * 4u + jj;
                if (row < p.m && j < p.r) {
                    store(row * p.r + j, p.alpha * sum[jj], wid.y, n);
                }
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let ct = li % CL;
    let rl = li / CL;
    let P = p.k;
    let pc = wid.x * CL * 4u + 4u * ct;   // the thread's first column
    let j0 = wid.z * RC;
    let mb = wid.y * p.chunk;
    let mend = min(p.m, mb + p.chunk);
    var acc: array<vec4<f32>, 16>;   // [j]: rank column j0 + j, vec4 over columns pc .. pc+3
    for (var q = 0u; q < 16u; q = q + 1u) {
        acc[q] = vec4<f32>(0.0);
    }
    for (var m0 = mb; m0 < mend; m0 = m0 + 64u) {
        // Y[m0 .. m0+64, j0 .. j0+16] -> ws[ml * 4 + j / 4][j % 4]
        for (var t = 0u; t < 4u; t = t + 1u) {
            let e = li + 256u * t;
            let ml = e / RC;
            let j = e % RC;
            var v = 0.0;
            if (m0 + ml < mend && j0 + j < p.r) {
                v = w[p.w_off + (m0 + ml) * p.r + j0 + j];
            }
            ws[ml * 4u + j / 4u][j % 4u] = v;
        }
        workgroupBarrier();
        if (pc < P) {
            for (var ml = rl; ml < 64u; ml = ml + RL) {
                let m = m0 + ml;
                if (m >= mend) {
                    break;
                }
                let xv = x4(p.x_off + m * P + pc, pc, P);
                for (var jq = 0u; jq < 4u; jq = jq + 1u) {
                    let y = ws[ml * 4u + jq];
                    acc[jq * 4u] = acc[jq * 4u] + xv * y.x;
                    acc[jq * 4u + 1u] = acc[jq * 4u + 1u] + xv * y.y;
                    acc[jq * 4u + 2u] = acc[jq * 4u + 2u] + xv * y.z;
                    acc[jq * 4u + 3u] = acc[jq * 4u + 3u] + xv * y.w;
                }
            }
        }
        workgroupBarrier();
    }
    // row lanes 1..3 hand their sums to lane 0, which adds them in lane order and stores
    let n = P * p.r;
    for (var jq = 0u; jq < 4u; jq = jq + 1u) {
        if (rl > 0u) {
            for (var jj = 0u; jj < 4u; jj = jj + 1u) {
                red[((rl - 1u) * CL + ct) * 4u + jj] = acc[jq * 4u + jj];
            }
        }
        workgroupBarrier();
        if (rl == 0u) {
            for (var jj = 0u; jj < 4u; jj = jj + 1u) {
                var sum = acc[jq * 4u + jj];
                for (var l = 0u; l < RL - 1u; l = l + 1u) {
                    sum = sum + red[(l * CL + ct) * 4u + jj];
                }
                let j = j0 + jq * 4u + jj;
                for (var t = 0u; t < 4u; t = t + 1u) {
                    let col = pc + t;
                    if (col < P && j < p.r) {
                        store(select(col * p.r + j, j * P + col, p.trans_out != 0u), p.alpha * sum[t],
                              wid.y, n);
                    }
                }
            }
        }
        workgroupBarrier();
    }
}

// dst[c_off + i] = (accumulate ? dst[c_off + i] : 0) + sum over z in order of part[z·n + i],
// n = m (the host passes the output count there); linear id (wid.x + wid.y·nwg.x)·256 + lane
@compute @workgroup_size(256)
fn reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + li;
    let n = p.m;
    if (i >= n) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < p.splits; z = z + 1u) {
        s = s + part[z * n + i];
    }
    let o = p.c_off + i;
    if (p.accumulate != 0u) {
        s = s + dst[o];
    }
    dst[o] = s;
}
