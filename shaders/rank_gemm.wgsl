// rank_gemm.wgsl: the rank-r products of many token rows (LoRA's u, du, dA, dB over a step's
// tokens).  Each element of the big operand is read once for at most CW FMAs, so these run at
// the speed of the loads in flight; the small operand (r columns) is reused from workgroup
// memory or L1.
//
//   C[M, N] (+)= alpha · op(A)[M, K] · op(B)[K, N],   CW columns of C per workgroup (grid y)
//
// all row-major f32 from element offsets a_off, b_off, c_off; with c_trans, element (i, j) of C
// is stored at c_off + j·M + i.  Out-of-range elements load as 0 and are not stored.
// Compile-time const (the host prepends it): CW, 4 or 8.  The code
// that touches the accumulators is written out with constant indices: a loop there stays
// rolled in the NVIDIA driver, which then keeps the whole accumulator array in memory
// (BENCHMARKS.md, the fifth H200 session of 2026-12-04).
//
// Entry `rows` (A stored [M, K]: u = x Aᵀ, du = dy B): a workgroup of 8 warps owns 32 rows of
// C, 4 a warp; lane l of a warp reads k groups 4·(32·q + l) .. + 3 (q < KQ) of each K chunk of
// 128·KQ for its warp's 4 rows (each load a warp reads 512 consecutive bytes of a row), and the
// chunk of op(B), staged in workgroup memory as [column][k] vec4s (consecutive lanes read
// consecutive vec4s: no bank conflicts), serves all 4 rows.  The next chunk is loaded into
// registers while the current one is multiplied; one barrier a chunk.  Each lane sums its own
// k in ascending order; the 32 lanes' sums are then added in a fixed order (runs of 4 lanes,
// then the 8 runs), so an element's bits depend on K and its operands only, not on M, N or
// the grid.
//
// Entry `cols` (A stored [K, M]: dB = dyᵀ u; dA = (duᵀ x) as C[in, r] stored transposed; B
// stored [K, N]): a workgroup of 8 warps owns 128 columns of op(A) (M, lane l the 4 at 4·l)
// for CW columns of C and K rows k0 .. k0 + k_chunk (grid z: the split); warp w takes rows
// k ≡ w (mod 8) of them, four rows a round with the round's loads before its FMAs: a vec4 of
// its 4 columns of A and op(B)'s CW values of that row (the same for every lane: one
// broadcast load each).  The 8 warps' sums are added in warp order.  With splits > 1 each
// split stores alpha times its sum at c_off + z·M·N (the host passes a scratch and sums the
// partials with small_gemm.wgsl's reduce_splits in split order).

struct Params {
    m: u32, n: u32, k: u32, accumulate: u32,
    alpha: f32, a_off: u32, b_off: u32, c_off: u32,
    c_trans: u32, k_chunk: u32, pad0: u32, pad1: u32,
}

override A_VEC: bool = false;  // op(A)'s stored rows start and run in whole vec4s
override B_VEC: bool = false;  // op(B)'s stored rows start and run in whole vec4s
override B_T: bool = false;    // rows: B stored [N, K] (u = x Aᵀ); else [K, N]

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const KQ: u32 = 8u / CW;          // rows: 128-k groups of a K chunk (CW 4: 2)
const KC4: u32 = 32u * KQ;        // rows: vec4 k groups of a chunk
const SBUF: u32 = CW * KC4;       // rows: vec4s of one staged chunk of op(B): 256, one a thread
const RP: u32 = CW / 4u;          // rows: columns of C a pass of the lanes' sums (1 or 2)

// rows: op(B)'s chunks, two buffers of [CW][KC4] vec4s along k; reused for the lanes' sums
var<workgroup> s_s: array<vec4<f32>, 2u * SBUF>;
// cols: the warps' sums of 4 columns of C, [4][8 warps][32 lanes]
var<workgroup> w_s: array<vec4<f32>, 1024>;

fn a_at(i: u32) -> f32 { return a[i >> 2u][i & 3u]; }
fn b_at(i: u32) -> f32 { return b[i >> 2u][i & 3u]; }

// The 4 consecutive elements of a stored row from element i, the first `valid` of them (the
// rest 0); one vec4 load with `vec` (then valid is 0 or 4).  Branch-free: the loads of a round
// stay in flight together (a branch per load serializes them); an index past the binding
// reads its last element, which the select then drops.
fn a_run(i: u32, valid: u32, vec: bool) -> vec4<f32> {
    let n = 4u * arrayLength(&a);
    if (vec) {
        return select(vec4<f32>(0.0), a[min(i, n - 4u) >> 2u], valid >= 4u);
    }
    var v: vec4<f32>;
    for (var e = 0u; e < 4u; e++) {
        v[e] = select(0.0, a_at(min(i + e, n - 1u)), e < valid);
    }
    return v;
}

// a_run for op(B)'s binding (WGSL functions cannot take a storage binding as an argument)
fn b_run(i: u32, valid: u32, vec: bool) -> vec4<f32> {
    let n = 4u * arrayLength(&b);
    if (vec) {
        return select(vec4<f32>(0.0), b[min(i, n - 4u) >> 2u], valid >= 4u);
    }
    var v: vec4<f32>;
    for (var e = 0u; e < 4u; e++) {
        v[e] = select(0.0, b_at(min(i + e, n - 1u)), e < valid);
    }
    return v;
}

fn avail(start: u32, end: u32) -> u32 {
    return select(0u, min(end - start, 4u), start < end);
}

// C element (row, col) = alpha · v (+ C), if it lies in C; `at` is c_off plus the split's offset
fn store_c(at: u32, row: u32, col: u32, v: f32, accumulate: bool) {
    if (row >= p.m || col >= p.n) {
        return;
    }
    let idx = at + select(row * p.n + col, col * p.m + row, p.c_trans != 0u);
    var o = p.alpha * v;
    if (accumulate) {
        o += c[idx];
    }
    c[idx] = o;
}

// ---- rows -----------------------------------------------------------------------------------

// this thread's x of the chunk from k0: [q · 4 + i] = row r0 + i, k 4·(32·q + lane) + k0 .. + 3
fn rows_fetch_x(xr: ptr<function, array<vec4<f32>, 8>>, r0: u32, k0: u32, lane: u32) {
    for (var q = 0u; q < KQ; q++) {
        let k = k0 + 4u * (32u * q + lane);
        let valid = avail(k, p.k);
        for (var i = 0u; i < 4u; i++) {
            (*xr)[q * 4u + i] = a_run(p.a_off + (r0 + i) * p.k + k, select(0u, valid, r0 + i < p.m), A_VEC);
        }
    }
}

// thread li's vec4 of op(B)'s chunk from k0 for columns col0 ..: with B_T 4 k of one column
// (kq = li % KC4, column li / KC4: consecutive threads read along a stored row), else 4
// columns of one k (column group li % (CW / 4), k li / (CW / 4))
fn rows_fetch_s(col0: u32, k0: u32, li: u32) -> vec4<f32> {
    if (B_T) {
        let col = col0 + li / KC4;
        let k = k0 + 4u * (li % KC4);
        return b_run(p.b_off + col * p.k + k, select(0u, avail(k, p.k), col < p.n), B_VEC);
    }
    let col = col0 + 4u * (li % (CW / 4u));
    let k = k0 + li / (CW / 4u);
    return b_run(p.b_off + k * p.n + col, select(0u, avail(col, p.n), k < p.k), B_VEC);
}

fn rows_store_s(sv: vec4<f32>, buf: u32, li: u32) {
    if (B_T) {
        s_s[buf * SBUF + li] = sv;
        return;
    }
    let cq = li % (CW / 4u);
    let k = li / (CW / 4u);
    for (var e = 0u; e < 4u; e++) {
        s_s[buf * SBUF + (4u * cq + e) * KC4 + k / 4u][k % 4u] = sv[e];
    }
}

// acc[j] += the 4 k terms of column j's values s for the 4 rows (xt[e]: the rows at k group element e)
fn rows_fma(acc: ptr<function, array<vec4<f32>, 8>>, j: u32, s: vec4<f32>, xt: ptr<function, array<vec4<f32>, 4>>) {
    (*acc)[j] = fma((*xt)[0], vec4<f32>(s.x), (*acc)[j]);
    (*acc)[j] = fma((*xt)[1], vec4<f32>(s.y), (*acc)[j]);
    (*acc)[j] = fma((*xt)[2], vec4<f32>(s.z), (*acc)[j]);
    (*acc)[j] = fma((*xt)[3], vec4<f32>(s.w), (*acc)[j]);
}

@compute @workgroup_size(256)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let lane = li % 32u;
    let w = li / 32u;
    let r0 = wid.x * 32u + w * 4u;
    let col0 = wid.y * CW;
    let nch = (p.k + 128u * KQ - 1u) / (128u * KQ);
    var acc: array<vec4<f32>, 8>;   // [j]: column col0 + j, rows r0 .. r0 + 3 (zero-initialized)
    var xr: array<vec4<f32>, 8>;
    var xn: array<vec4<f32>, 8>;
    rows_fetch_x(&xr, r0, 0u, lane);
    rows_store_s(rows_fetch_s(col0, 0u, li), 0u, li);
    var sn = vec4<f32>(0.0);
    workgroupBarrier();
    for (var ch = 0u; ch < nch; ch++) {
        let more = ch + 1u < nch;
        if (more) {
            rows_fetch_x(&xn, r0, (ch + 1u) * 128u * KQ, lane);
            sn = rows_fetch_s(col0, (ch + 1u) * 128u * KQ, li);
        }
        let base = (ch & 1u) * SBUF;
        for (var q = 0u; q < KQ; q++) {
            // the 4 rows' values at each of the lane's 4 k, as vec4s over the rows
            var xt: array<vec4<f32>, 4>;
            xt[0] = vec4<f32>(xr[q * 4u].x, xr[q * 4u + 1u].x, xr[q * 4u + 2u].x, xr[q * 4u + 3u].x);
            xt[1] = vec4<f32>(xr[q * 4u].y, xr[q * 4u + 1u].y, xr[q * 4u + 2u].y, xr[q * 4u + 3u].y);
            xt[2] = vec4<f32>(xr[q * 4u].z, xr[q * 4u + 1u].z, xr[q * 4u + 2u].z, xr[q * 4u + 3u].z);
            xt[3] = vec4<f32>(xr[q * 4u].w, xr[q * 4u + 1u].w, xr[q * 4u + 2u].w, xr[q * 4u + 3u].w);
            // written out: a loop here stays rolled in the driver, and acc then lives in memory
            rows_fma(&acc, 0u, s_s[base + 0u * KC4 + 32u * q + lane], &xt);
            rows_fma(&acc, 1u, s_s[base + 1u * KC4 + 32u * q + lane], &xt);
            rows_fma(&acc, 2u, s_s[base + 2u * KC4 + 32u * q + lane], &xt);
            rows_fma(&acc, 3u, s_s[base + 3u * KC4 + 32u * q + lane], &xt);
            if (CW > 4u) { rows_fma(&acc, 4u, s_s[base + 4u * KC4 + 32u * q + lane], &xt); }
            if (CW > 4u) { rows_fma(&acc, 5u, s_s[base + 5u * KC4 + 32u * q + lane], &xt); }
            if (CW > 4u) { rows_fma(&acc, 6u, s_s[base + 6u * KC4 + 32u * q + lane], &xt); }
            if (CW > 4u) { rows_fma(&acc, 7u, s_s[base + 7u * KC4 + 32u * q + lane], &xt); }
        }
        if (more) {
            rows_store_s(sn, (ch + 1u) & 1u, li);
            xr = xn;
        }
        workgroupBarrier();
    }
    // the lanes' sums, RP columns a pass (acc read with constant indices only: one dynamic
    // index puts the whole array in memory)
    rows_sum_pass(0u, acc[0], acc[1], w, lane, li, wid.x, col0);
    rows_sum_pass(1u, acc[RP], acc[RP + 1u], w, lane, li, wid.x, col0);
    rows_sum_pass(2u, acc[2u * RP], acc[2u * RP + 1u], w, lane, li, wid.x, col0);
    rows_sum_pass(3u, acc[3u * RP], acc[3u * RP + 1u], w, lane, li, wid.x, col0);
}

// rows: pass t of the lanes' sums, columns col0 + t·RP .. (the thread's sums a0, a1) through
// s_s as [warp][column][lane]: runs of 4 lanes in lane order into the run's first lane, then
// the 8 runs in order, then the store
fn rows_sum_pass(t: u32, a0: vec4<f32>, a1: vec4<f32>, w: u32, lane: u32, li: u32, wx: u32, col0: u32) {
    let P = RP;
    s_s[w * P * 32u + lane] = a0;
    if (P > 1u) {
        s_s[(w * P + 1u) * 32u + lane] = a1;
    }
    workgroupBarrier();
    if (li < 64u * P) {
        let e = (li / 8u) * 32u + (li % 8u) * 4u;
        s_s[e] = ((s_s[e] + s_s[e + 1u]) + s_s[e + 2u]) + s_s[e + 3u];
    }
    workgroupBarrier();
    if (li < 8u * P) {
        var v = s_s[li * 32u];
        for (var run = 1u; run < 8u; run++) {
            v += s_s[li * 32u + run * 4u];
        }
        let ow = li / P;
        let col = col0 + t * P + li % P;
        for (var i = 0u; i < 4u; i++) {
            store_c(p.c_off, wx * 32u + ow * 4u + i, col, v[i], p.accumulate != 0u);
        }
    }
    workgroupBarrier();
}

// ---- cols -----------------------------------------------------------------------------------

// acc[4·jq + e] += xv · s[e]: one row's terms for columns 4·jq .. 4·jq + 3 of C
fn cols_fma(acc: ptr<function, array<vec4<f32>, 8>>, jq: u32, xv: vec4<f32>, s: vec4<f32>) {
    (*acc)[4u * jq] = fma(xv, vec4<f32>(s.x), (*acc)[4u * jq]);
    (*acc)[4u * jq + 1u] = fma(xv, vec4<f32>(s.y), (*acc)[4u * jq + 1u]);
    (*acc)[4u * jq + 2u] = fma(xv, vec4<f32>(s.z), (*acc)[4u * jq + 2u]);
    (*acc)[4u * jq + 3u] = fma(xv, vec4<f32>(s.w), (*acc)[4u * jq + 3u]);
}

// op(B)'s CW values of row k from column col0, as vec4s
fn cols_s(k: u32, col0: u32) -> array<vec4<f32>, 2> {
    var sv: array<vec4<f32>, 2>;
    let i = p.b_off + k * p.n + col0;
    sv[0] = b_run(i, avail(col0, p.n), B_VEC);
    if (CW > 4u) {
        sv[1] = b_run(i + 4u, avail(col0 + 4u, p.n), B_VEC);
    }
    return sv;
}

// one row's terms: acc[j] += xv · op(B)[k, col0 + j]
fn cols_row(acc: ptr<function, array<vec4<f32>, 8>>, xv: vec4<f32>, sv: array<vec4<f32>, 2>) {
    cols_fma(acc, 0u, xv, sv[0]);
    if (CW > 4u) {
        cols_fma(acc, 1u, xv, sv[1]);
    }
}

@compute @workgroup_size(256)
fn cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let lane = li % 32u;
    let w = li / 32u;
    let m = wid.x * 128u + 4u * lane;         // this thread's 4 columns of op(A) = rows of C
    let col0 = wid.y * CW;
    let k0 = wid.z * p.k_chunk;
    let k1 = min(k0 + p.k_chunk, p.k);
    let valid_m = avail(m, p.m);
    var acc: array<vec4<f32>, 8>;   // [j]: column col0 + j of C, rows m .. m + 3 (zero-initialized)
    // rounds of 4 of the warp's rows k0 + w, k0 + w + 8, ...: every load first, then the FMAs
    // (written out: loops here stay rolled in the driver, and acc then lives in memory)
    var k = k0 + w;
    for (; k + 24u < k1; k += 32u) {
        let x0 = a_run(p.a_off + k * p.m + m, valid_m, A_VEC);
        let x1 = a_run(p.a_off + (k + 8u) * p.m + m, valid_m, A_VEC);
        let x2 = a_run(p.a_off + (k + 16u) * p.m + m, valid_m, A_VEC);
        let x3 = a_run(p.a_off + (k + 24u) * p.m + m, valid_m, A_VEC);
        let s0 = cols_s(k, col0);
        let s1 = cols_s(k + 8u, col0);
        let s2 = cols_s(k + 16u, col0);
        let s3 = cols_s(k + 24u, col0);
        cols_row(&acc, x0, s0);
        cols_row(&acc, x1, s1);
        cols_row(&acc, x2, s2);
        cols_row(&acc, x3, s3);
    }
    for (; k < k1; k += 8u) {
        cols_row(&acc, a_run(p.a_off + k * p.m + m, valid_m, A_VEC), cols_s(k, col0));
    }
    // the warps' sums in warp order, 4 columns of C a pass (constant acc indices only); one
    // split: into C (+ C), several: alpha times the split's sum into its partial
    let split = wid.z > 0u || p.k_chunk < p.k;
    let at = p.c_off + select(0u, wid.z * p.m * p.n, split);
    let acc_c = !split && p.accumulate != 0u;
    cols_sum_pass(col0, acc[0], acc[1], acc[2], acc[3], w, lane, li, wid.x, at, acc_c);
    if (CW > 4u) {
        cols_sum_pass(col0 + 4u, acc[4], acc[5], acc[6], acc[7], w, lane, li, wid.x, at, acc_c);
    }
}

// cols: columns c .. c + 3 of C (the thread's sums a0 .. a3): the 8 warps' sums in warp order
fn cols_sum_pass(c: u32, a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>, w: u32, lane: u32,
                 li: u32, wx: u32, at: u32, accumulate: bool) {
    w_s[w * 32u + lane] = a0;
    w_s[(8u + w) * 32u + lane] = a1;
    w_s[(16u + w) * 32u + lane] = a2;
    w_s[(24u + w) * 32u + lane] = a3;
    workgroupBarrier();
    if (li < 128u) {
        let e = li / 32u;
        let ln = li % 32u;
        var v = w_s[e * 256u + ln];
        for (var ww = 1u; ww < 8u; ww++) {
            v += w_s[(e * 8u + ww) * 32u + ln];
        }
        let mm = wx * 128u + 4u * ln;
        for (var i = 0u; i < 4u; i++) {
            store_c(at, mm + i, c + e, v[i], accumulate);
        }
    }
    workgroupBarrier();
}
