// Causal GQA flash attention, backward (the gpu placement), register-tiled like
// attention_fwd (same prepended consts: HEAD_DIM, BR, BC, TM, TN, DK4, VK, TILE_V4; PREP_LANES
// for `prep`), recomputing probabilities from the forward's lse; the T x T matrix never exists.
//   q, o, do, dq: [B, T, Hq, D]; k, v, dk, dv: [B, T, Hkv, D]; lse, delta: [B, Hq, T];
//   mask: [B, T] u32 (1 = attend), read only when has_mask = 1; starts: [B, T] i32 (packed
//   documents: each position's document start), read only when SEGMENTS = 1.
// Visibility as in the forward (j <= i, key j not padding, SEGMENTS: j >= starts[b, i]).
// With P[i,j] = exp(scale * q_i . k_j - lse_i) (0 where key j is invisible to query i):
//   delta_i = do_i . o_i                          (entry `prep`, one thread per row)
//   dS[i,j] = P[i,j] * (do_i . v_j - delta_i)
//   dq_i = scale * sum_j dS[i,j] k_j              (entry `dq`: BR query rows of one head per
//                                                  workgroup, key blocks of BC up to the diagonal,
//                                                  from the first query's document on)
//   dk_j = scale * sum_{i, h in group} dS[i,j] q_i,  dv_j = sum P[i,j] do_i
//                                                 (entry `dkdv`: BR key rows per workgroup, query
//                                                  blocks of BC from the diagonal on, up to the
//                                                  last key's document's end, for all G
//                                                  query heads of the kv head in head order; or,
//                                                  where that gives too few workgroups, for ONE
//                                                  query head, writing per-query-head partials
//                                                  [B, T, Hq, D] that
//                                                  attention_group_sum adds up in head
//                                                  order: no atomics, deterministic either way)
// Each score-like tile (S, dP; or their transposes in dkdv) is a GEMM over D with chunks of
// DK4 vec4s staged in workgroup memory, TM x TN per thread (thread (ty, tx): rows ty*TM + i,
// columns tx + NX*j); P or dS then goes to workgroup memory and the thread's register tile
// of the output (rows ty*TM + i, vec4 columns tx + NX*j4) takes P/dS times rows of the
// column side, staged VK rows at a time.
// Each thread fetches the next staged piece into registers before the arithmetic on the
// current one, so that global-load latency hides behind it.
// Splitting dq from dk/dv avoids float atomics.  STORED_DS = 1 (prepended const) pays for it
// with memory instead of arithmetic: dkdv, run first, writes every dS tile it forms to ds_t
// [B, Hq, T (keys), T (queries)], and dq reads them back (masked again by visibility: tiles
// dkdv skips are never written) instead of recomputing S and dP.  STORED_DS = 0: dq
// recomputes P (the T x T matrix never exists).

// Params and the tile constants: attention_common.

// tensors named by the fetch helpers
const SRC_Q: u32 = 0u;
const SRC_K: u32 = 1u;
const SRC_V: u32 = 2u;
const SRC_DO: u32 = 3u;

// bindings 0-5 (p, q, k, v, mask, starts): attention_common
@group(0) @binding(6) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> lse: array<f32>;
@group(0) @binding(8) var<storage, read_write> delta: array<f32>;  // prep writes; dq, dkdv read
@group(0) @binding(9) var<storage, read_write> out0: array<f32>;   // prep: o (read); dq: dq; dkdv: dk
@group(0) @binding(10) var<storage, read_write> out1: array<f32>;  // dkdv: dv
@group(0) @binding(11) var<storage, read_write> ds_t: array<f32>;  // STORED_DS: dkdv writes, dq reads

// Row-side chunk [BR][CS] then column-side chunk [BC][CS]; or VK rows [VK][DP4].
var<workgroup> tile_s: array<vec4<f32>, TILE_V4>;
var<workgroup> p_s: array<vec4<f32>, BR * PS>;   // P or dS [BR][BC] (+ pad)

fn key_ok(b: u32, j: u32) -> bool {
    return j < p.t && (p.has_mask == 0u || mask[b * p.t + j] != 0u);
}

// The i-th vec4 of source src (SRC_Q, SRC_K, SRC_V, SRC_DO): fetch4 in
// attention_common reads the tensors through it.
fn load4(src: u32, i: u32) -> vec4<f32> {
    switch src {
        case 0u: { return q[i]; }
        case 1u: { return k[i]; }
        case 2u: { return v[i]; }
        default: { return d_o[i]; }
    }
}

//!include attention_common

// Rows r0 + ty*TM + i (< T) of out (head h of H heads) = acc * mul.
fn write_rows(acc: ptr<function, Acc>, which: u32, b: u32, h: u32, nh: u32, r0: u32, mul: f32,
              li: u32) {
    let tx = li % NX;
    let ty = li / NX;
    for (var i = 0u; i < TM; i = i + 1u) {
        let t = r0 + ty * TM + i;
        if (t >= p.t) {
            continue;
        }
        let base = ((b * p.t + t) * nh + h) * HEAD_DIM;
        for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
            let c4 = tx + NX * j4;
            for (var u = 0u; u < 4u; u = u + 1u) {
                let d = c4 * 4u + u;
                if (c4 < DP4 && d < HEAD_DIM) {
                    if (which == 0u) {
                        out0[base + d] = (*acc)[i][j4][u] * mul;
                    } else {
                        out1[base + d] = (*acc)[i][j4][u] * mul;
                    }
                }
            }
        }
    }
}

// delta[b, h, t] = sum_d do[b,t,h,d] * o[b,t,h,d]; o is bound at out0.  PREP_ROWS rows per
// workgroup, PL lanes a row: the lanes stage the row's do and o vec4s (consecutive lanes read
// consecutive vec4s), then lane 0 sums them with one fma per dimension in order d = 0, 1, ...,
// as scores() sums do . v: where o equals a single v (one visible key), dP - delta is
// exactly 0, as it is mathematically.  grid_2d over ceil(B*Hq*T / PREP_ROWS) workgroups;
// r = (b * Hq + h) * T + t.  PL = PREP_LANES, prepended by the host (attention.py's
// _prep_lanes: 16 rows a workgroup at D 128).
const PL: u32 = PREP_LANES;
const PREP_ROWS: u32 = NT / PL;
var<workgroup> do_s: array<vec4<f32>, PREP_ROWS * DP4>;
var<workgroup> o_s: array<vec4<f32>, PREP_ROWS * DP4>;

@compute @workgroup_size(NT)
fn prep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let lane = li % PL;
    let slot = li / PL;
    let r = (wid.x + wid.y * nwg.x) * PREP_ROWS + slot;
    let ok = slot < PREP_ROWS && r < p.batch * p.hq * p.t;
    let t = r % p.t;
    let bh = r / p.t;
    let h = bh % p.hq;
    let b = bh / p.hq;
    let base = ((b * p.t + t) * p.hq + h) * HEAD_DIM;
    if (ok) {
        for (var c4 = lane; c4 < DP4; c4 = c4 + PL) {
            var y = vec4<f32>(0.0);
            for (var u = 0u; u < 4u; u = u + 1u) {
                let d = c4 * 4u + u;
                if (d < HEAD_DIM) {
                    y[u] = out0[base + d];
                }
            }
            do_s[slot * DP4 + c4] = fetch4(SRC_DO, b, t, h, c4);
            o_s[slot * DP4 + c4] = y;
        }
    }
    workgroupBarrier();
    if (ok && lane == 0u) {
        var s = 0.0;
        for (var c4 = 0u; c4 < DP4; c4 = c4 + 1u) {
            let x = do_s[slot * DP4 + c4];
            let y = o_s[slot * DP4 + c4];
            for (var u = 0u; u < 4u; u = u + 1u) {
                s = fma(x[u], y[u], s);
            }
        }
        delta[r] = s;
    }
}

// Grid (ceil(T / BR), Hq, B); writes dq (bound at out0).
@compute @workgroup_size(NT)
fn dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
      @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    let q0 = (nwg.x - 1u - wid.x) * BR;   // most key blocks first
    let hk = h / (p.hq / p.hkv);
    let tx = li % NX;
    let ty = li / NX;

    var l_r: array<f32, TM>;
    var d_r: array<f32, TM>;
    var first_key: array<u32, TM>;
    for (var i = 0u; i < TM; i = i + 1u) {
        let qi = q0 + ty * TM + i;
        l_r[i] = 0.0;
        d_r[i] = 0.0;
        first_key[i] = row_start(b, qi);
        if (qi < p.t) {
            l_r[i] = lse[(b * p.hq + h) * p.t + qi];
            d_r[i] = delta[(b * p.hq + h) * p.t + qi];
        }
    }
    var acc = zero_acc();
    let kend = min(p.t, q0 + BR);
    let kbeg = block_start(b, q0);
    var dsr: DsBlock;
    if (STORED_DS != 0u) {
        dsr = fetch_ds(b, h, q0, kbeg, li);
    }
    for (var k0 = kbeg; k0 < kend; k0 = k0 + BC) {
        if (STORED_DS != 0u) {
            let first = fetch_rows(b, SRC_K, hk, k0, li);
            workgroupBarrier();   // every thread done reading the last block's dS
            stage_ds(dsr, li);
            if (k0 + BC < kend) {
                dsr = fetch_ds(b, h, q0, k0 + BC, li);   // in flight during this block's products
            }
            accumulate(&acc, b, SRC_K, hk, k0, first, li);
            continue;
        }
        let s = scores(b, SRC_Q, h, q0, p.scale, SRC_K, hk, k0, 1.0, li);
        let dp = scores(b, SRC_DO, h, q0, 1.0, SRC_V, hk, k0, 1.0, li);
        let first = fetch_rows(b, SRC_K, hk, k0, li);
        // dS, 0 where the key is invisible to the query (selected, not branched on)
        var ds: Tile;
        for (var j = 0u; j < TN; j = j + 1u) {
            let kj = k0 + tx + NX * j;
            let ok = key_ok(b, kj);
            for (var i = 0u; i < TM; i = i + 1u) {
                let qi = q0 + ty * TM + i;
                let vis = ok && kj <= qi && kj >= first_key[i] && qi < p.t;
                ds[i][j] = select(0.0, exp(s[i][j] - l_r[i]) * (dp[i][j] - d_r[i]), vis);
            }
        }
        // p_s was last read before the barriers inside scores()
        stage(ds, li);
        accumulate(&acc, b, SRC_K, hk, k0, first, li);
    }
    write_rows(&acc, 0u, b, h, p.hq, q0, p.scale, li);
}

// The thread's share of the dS block of queries q0.., keys k0.. of head h, read from ds_t
// (element e = li + NT·u: query q0 + e % BR, key k0 + e / BR; consecutive threads read
// consecutive queries of one key row) and zero where the key is invisible to the query: dkdv
// wrote every visible entry, and tiles it skipped hold whatever the buffer held.  The ds_t
// load is unconditional (an invisible element reads element 0) so that all of a block's loads
// are in flight at once.
const NDS: u32 = BR * BC / NT;   // = TM * TN
alias DsBlock = array<f32, NDS>;

fn fetch_ds(b: u32, h: u32, q0: u32, k0: u32, li: u32) -> DsBlock {
    var r: DsBlock;
    for (var u = 0u; u < NDS; u = u + 1u) {
        let e = li + u * NT;
        let qi = q0 + e % BR;
        let kj = k0 + e / BR;
        let vis = qi < p.t && key_ok(b, kj) && kj <= qi && kj >= row_start(b, qi);
        let at = select(0u, ((b * p.hq + h) * p.t + kj) * p.t + qi, vis);
        r[u] = select(0.0, ds_t[at], vis);
    }
    return r;
}

// a fetched dS block into p_s [BR queries][BC keys]
fn stage_ds(r: DsBlock, li: u32) {
    for (var u = 0u; u < NDS; u = u + 1u) {
        let e = li + u * NT;
        let c = e / BR;
        p_s[(e % BR) * PS + c / 4u][c % 4u] = r[u];
    }
}

// dkdv's dS^T tile (keys j0 + ty*TM + i, queries i0 + tx + NX*j) into ds_t.
fn store_ds(t: Tile, b: u32, h: u32, j0: u32, i0: u32, li: u32) {
    let tx = li % NX;
    let ty = li / NX;
    for (var i = 0u; i < TM; i = i + 1u) {
        let kj = j0 + ty * TM + i;
        for (var j = 0u; j < TN; j = j + 1u) {
            let qi = i0 + tx + NX * j;
            if (kj < p.t && qi < p.t) {
                ds_t[((b * p.hq + h) * p.t + kj) * p.t + qi] = t[i][j];
            }
        }
    }
}

// Key rows j0 .. j0 + BR of kv head hk against the queries of its query heads.
// head_split = 1: grid (ceil(T / BR), Hq, B), the queries of head h = wid.y only, hk = h / G;
// writes per-query-head partials dk, dv [B, T, Hq, D] (or dk, dv themselves when G = 1).
// head_split = 0: grid (ceil(T / BR), Hkv, B), hk = wid.y, all G query heads of hk in head
// order; writes dk, dv [B, T, Hkv, D].
@compute @workgroup_size(NT)
fn dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let j0 = wid.x * BR;
    let group = p.hq / p.hkv;
    var hk = wid.y;
    var h_first = wid.y * group;
    var h_end = h_first + group;
    if (p.head_split != 0u) {
        hk = wid.y / group;
        h_first = wid.y;
        h_end = wid.y + 1u;
    }
    let tx = li % NX;
    let ty = li / NX;

    var rok: array<bool, TM>;
    for (var i = 0u; i < TM; i = i + 1u) {
        rok[i] = key_ok(b, j0 + ty * TM + i);
    }
    // The block's last key: query blocks whose first query's document starts after it (and
    // all later ones: starts never decrease along a row) see none of the block's keys.
    let jlast = min(p.t, j0 + BR) - 1u;
    var dk = zero_acc();
    var dv = zero_acc();
    for (var h = h_first; h < h_end; h = h + 1u) {
        // Queries before j0 see none of this workgroup's keys.
        for (var i0 = j0 / BC * BC; i0 < p.t; i0 = i0 + BC) {
            if (row_start(b, i0) > jlast) {
                break;
            }
            // The thread's queries' lse, delta and first visible key, loaded before the scores
            // so that their latency hides behind them; unconditional (a query past T reads row
            // T - 1, and no entry of it is visible).
            var lq: array<f32, TN>;
            var dl: array<f32, TN>;
            var fk: array<u32, TN>;
            for (var j = 0u; j < TN; j = j + 1u) {
                let qc = min(i0 + tx + NX * j, p.t - 1u);
                lq[j] = lse[(b * p.hq + h) * p.t + qc];
                dl[j] = delta[(b * p.hq + h) * p.t + qc];
                fk[j] = row_start(b, qc);
            }
            let st = scores(b, SRC_K, hk, j0, 1.0, SRC_Q, h, i0, p.scale, li);   // S^T: [keys][queries]
            let dpt = scores(b, SRC_V, hk, j0, 1.0, SRC_DO, h, i0, 1.0, li);    // dP^T
            let first_do = fetch_rows(b, SRC_DO, h, i0, li);
            // P^T and dS^T, 0 where the key is invisible to the query (selected, not branched
            // on; a query that sees any key has a finite lse)
            var pt: Tile;
            var dst: Tile;
            for (var j = 0u; j < TN; j = j + 1u) {
                let qi = i0 + tx + NX * j;
                for (var i = 0u; i < TM; i = i + 1u) {
                    let kj = j0 + ty * TM + i;
                    let vis = qi < p.t && rok[i] && kj <= qi && kj >= fk[j];
                    let pij = select(0.0, exp(st[i][j] - lq[j]), vis);
                    pt[i][j] = pij;
                    dst[i][j] = select(0.0, pij * (dpt[i][j] - dl[j]), vis);
                }
            }
            stage(pt, li);
            accumulate(&dv, b, SRC_DO, h, i0, first_do, li);
            let first_q = fetch_rows(b, SRC_Q, h, i0, li);
            workgroupBarrier();   // every thread done reading P before dS replaces it
            stage(dst, li);
            if (STORED_DS != 0u) {
                store_ds(dst, b, h, j0, i0, li);
            }
            accumulate(&dk, b, SRC_Q, h, i0, first_q, li);
        }
    }
    var nh = p.hkv;
    var hw = hk;
    if (p.head_split != 0u && group > 1u) {
        nh = p.hq;
        hw = h_first;
    }
    write_rows(&dk, 0u, b, hw, nh, j0, p.scale, li);
    write_rows(&dv, 1u, b, hw, nh, j0, 1.0, li);
}
