// gemm_tiles.wgsl: the tile loads and the store of the register-tiled GEMMs (gemm.wgsl, NF4
// B; gemm_f32.wgsl, fp32 B), included by both (an include line naming this file).  They use
// names each including shader defines: P (Params with M, N, K, lda, ldc, a_off, R, ldt,
// t_off), the bindings a, lt, ll, c, the workgroup array As, a_at(), and the overrides BM, BN,
// BK, NT, WGX, WGY, TM4, TN4, A_LOADS, L_LOADS, LORA, A_VEC, C_VEC, ACCUM.  ra / rb are the
// thread's prefetch registers of one K tile (at most 8 vec4s each).
//
// Loads of a row-major operand with k along its rows (A, and B stored [N, K]): thread idx takes
// tile row idx / KQ and k group idx % KQ, so the lanes of a warp read whole runs of BK
// consecutive floats of each row.  (Lanes along the rows, one vec4 per row, touched 32 cache
// lines per warp load: on an H200 the L1 traffic, not the FMAs, then bounded the GEMM.)

override KQ: u32 = BK / 4u;   // vec4 k groups in a tile row

// LoRA K tile from k = kl0 of the rank: A from T [M, R], B from L (LORA 1: [N, R]; 2: [R, N])
fn fetch_lora(ra: ptr<function, array<vec4<f32>, 8>>, rb: ptr<function, array<vec4<f32>, 8>>,
              kl0: u32, m0: u32, n0: u32, li: u32) {
    for (var i = 0u; i < A_LOADS; i++) {
        let idx = li + i * NT;
        let k = kl0 + (idx % KQ) * 4u;
        let row = m0 + idx / KQ;
        var v = vec4<f32>(0.0);
        if (idx < BM * BK / 4u && row < P.M) {
            for (var j = 0u; j < 4u; j++) {
                if (k + j < P.R) { v[j] = lt[P.t_off + row * P.ldt + k + j]; }
            }
        }
        (*ra)[i] = v;
    }
    for (var i = 0u; i < L_LOADS; i++) {
        let idx = li + i * NT;
        let row = kl0 + idx / (BN / 4u);
        let n = n0 + (idx % (BN / 4u)) * 4u;
        var v = vec4<f32>(0.0);
        if (idx < BN * BK / 4u && row < P.R) {
            for (var j = 0u; j < 4u; j++) {
                if (n + j < P.N) {
                    if (LORA == 1u) { v[j] = ll[(n + j) * P.R + row]; } else { v[j] = ll[row * P.N + n + j]; }
                }
            }
        }
        (*rb)[i] = v;
    }
}

// A's K tile from k = kf: thread idx takes row idx / KQ, k group idx % KQ
fn fetch_a(ra: ptr<function, array<vec4<f32>, 8>>, kf: u32, m0: u32, li: u32) {
    for (var i = 0u; i < A_LOADS; i++) {
        let idx = li + i * NT;
        let row = m0 + idx / KQ;
        let k = kf + (idx % KQ) * 4u;
        var v = vec4<f32>(0.0);
        if (idx < BM * BK / 4u && row < P.M) {
            let base = P.a_off + row * P.lda + k;
            if (A_VEC) {
                if (k < P.K) { v = a[base >> 2u]; }
            } else {
                for (var j = 0u; j < 4u; j++) {
                    if (k + j < P.K) { v[j] = a_at(base + j); }
                }
            }
        }
        (*ra)[i] = v;
    }
}

// the fetched A tile, transposed ([k][m]), into workgroup buffer nxt
fn store_a_tile(ra: ptr<function, array<vec4<f32>, 8>>, nxt: u32, li: u32) {
    for (var i = 0u; i < A_LOADS; i++) {
        let idx = li + i * NT;
        if (idx < BM * BK / 4u) {
            let m = idx / KQ;
            let kq = idx % KQ;
            for (var j = 0u; j < 4u; j++) {
                let e = (nxt * BK + kq * 4u + j) * BM + m;
                As[e >> 2u][e & 3u] = (*ra)[i][j];
            }
        }
    }
}

// the thread's accumulators into C from element coff (+ C with ACCUM); static indices only
fn store_c(acc: ptr<function, array<vec4<f32>, 32>>, m0: u32, n0: u32, tx: u32, ty: u32, coff: u32) {
    for (var r = 0u; r < TM4; r++) {
        for (var i = 0u; i < 4u; i++) {
            let row = m0 + r * WGY * 4u + ty * 4u + i;
            for (var q = 0u; q < TN4; q++) {
                let col = n0 + q * WGX * 4u + tx * 4u;
                if (row < P.M && col < P.N) {
                    var v = (*acc)[(r * 4u + i) * TN4 + q];
                    let base = coff + row * P.ldc + col;
                    if (C_VEC) {
                        if (ACCUM) { v += c[base >> 2u]; }
                        c[base >> 2u] = v;
                    } else {
                        for (var e = 0u; e < 4u; e++) {
                            if (col + e < P.N) {
                                let ci = base + e;
                                var o = v[e];
                                if (ACCUM) { o += c[ci >> 2u][ci & 3u]; }
                                c[ci >> 2u][ci & 3u] = o;
                            }
                        }
                    }
                }
            }
        }
    }
}
