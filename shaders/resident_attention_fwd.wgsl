// Causal GQA flash attention, forward (GPU-resident mode), register-tiled.
//   q, o: [B, T, Hq, D] f32; k, v: [B, T, Hkv, D] f32; lse: [B, Hq, T] f32;
//   mask: [B, T] u32 key padding mask (1 = attend, 0 = padding), read only when has_mask = 1.
// Query head h reads kv head h / (Hq / Hkv); scores are (q . k) * scale (scale = 1/sqrt(D));
// key j is visible to query i when j <= i and mask[b, j] != 0.
//
// Prepended consts (attention.py picks them to fit workgroup memory):
//   HEAD_DIM = D; BR query rows per workgroup; BC keys per key block; TM x TN the register
//   tile of scores each thread owns; DK4 vec4s of D per staged chunk; VK rows of V per
//   staged chunk; TILE_V4 vec4s of the staging area (max of both uses).
// Grid (ceil(T / BR), Hq, B); NT = (BR / TM) * (BC / TN) threads.  Thread (ty, tx) owns
// query rows ty*TM + i (i < TM) and, per key block, keys tx + NX*j (j < TN): S = Q K^T is
// a GEMM whose operands come in chunks of DK4 vec4s through workgroup memory (rows padded
// by one vec4 so that the column side's reads do not collide in banks); each thread does
// TM*TN independent dot products per vec4 pair.  The online softmax keeps a per-row max
// shared by all threads of the row (max of their partials through workgroup memory, which
// is exact) and a per-thread partial row sum, summed in tx order at the end (deterministic).
// P goes to workgroup memory; O += P V is a second GEMM where the thread owns rows ty*TM + i
// and vec4 columns tx + NX*j4 of the output, with V in chunks of VK keys.
// Each thread fetches the next staged piece into registers before the arithmetic on the
// current one, so that global-load latency hides behind it.
// Key blocks wholly above the diagonal are never visited; the T x T matrix never exists.
// Output o = acc / l, lse = m + log(l); a row without any visible key gets o = 0 and
// lse = -inf (backward then gives it zero gradients).

struct Params {
    batch: u32,
    t: u32,
    hq: u32,
    hkv: u32,
    has_mask: u32,
    scale: f32,
    head_split: u32,   // (backward only)
}

const DP4: u32 = (HEAD_DIM + 3u) / 4u;   // vec4s per head row (zero-padded past D)
const NX: u32 = BC / TN;                 // threads across a key block (and across O's vec4s)
const NY: u32 = BR / TM;
const NT: u32 = NX * NY;
const DV4: u32 = (DP4 + NX - 1u) / NX;   // O vec4 columns per thread
const CS: u32 = DK4 + 1u;                // staged chunk row stride (vec4s)
const PS: u32 = BC / 4u + 1u;            // P row stride (vec4s)

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;

// Q chunk [BR][CS] then K chunk [BC][CS]; or V chunk [VK][DP4].
var<workgroup> tile_s: array<vec4<f32>, TILE_V4>;
var<workgroup> p_s: array<vec4<f32>, BR * PS>;   // P [BR][BC] (+ pad)
var<workgroup> red_s: array<f32, BR * NX>;       // per-row partials [row][tx]

// tensors named by the fetch helpers
const SRC_Q: u32 = 0u;
const SRC_K: u32 = 1u;
const SRC_V: u32 = 2u;

// Below any finite score; exp(NEG_BIG - s) is 0 without inf - inf arithmetic.
const NEG_BIG: f32 = -3.0e38;

// vec4 c4 of row t of q (src 0, head h of Hq) or k / v (src 1 / 2, head h of Hkv),
// zero past D; the caller checks t < T and c4 < DP4.  The tensors are bound as vec4 arrays
// (buffers are whole vec4s): with D % 4 == 0 a row is whole vec4s and one load brings four
// dims; otherwise the four dims are picked out one by one.
fn fetch4(src: u32, b: u32, t: u32, h: u32, c4: u32) -> vec4<f32> {
    var nh = p.hkv;
    if (src == SRC_Q) {
        nh = p.hq;
    }
    let row = (b * p.t + t) * nh + h;
    if (HEAD_DIM % 4u == 0u) {
        let i = row * DP4 + c4;
        switch src {
            case 0u: { return q[i]; }
            case 1u: { return k[i]; }
            default: { return v[i]; }
        }
    }
    var x = vec4<f32>(0.0);
    for (var u = 0u; u < 4u; u = u + 1u) {
        let d = c4 * 4u + u;
        if (d < HEAD_DIM) {
            let e = row * HEAD_DIM + d;
            switch src {
                case 0u: { x[u] = q[e / 4u][e % 4u]; }
                case 1u: { x[u] = k[e / 4u][e % 4u]; }
                default: { x[u] = v[e / 4u][e % 4u]; }
            }
        }
    }
    return x;
}

// ---- begin: shared by resident_attention_fwd/bwd.wgsl (a test checks the copies agree)
// ---- staging: each thread fetches its share of the next staged piece into registers
// before the current piece's arithmetic (the loads' latency hides behind it), then stores
// it to workgroup memory between two barriers.

// vec4s of one D chunk (both sides) and of one stage of VK full rows; per-thread shares.
const NCH: u32 = (BR + BC) * DK4;
const NPRE: u32 = (NCH + NT - 1u) / NT;
const NROW: u32 = VK * DP4;
const NPRE_V: u32 = (NROW + NT - 1u) / NT;
alias Chunk = array<vec4<f32>, NPRE>;
alias Rows = array<vec4<f32>, NPRE_V>;
alias Tile = array<array<f32, TN>, TM>;
alias Acc = array<array<vec4<f32>, DV4>, TM>;

// D chunk [dc, dc + DK4) (vec4s) of rows r0 .. r0 + BR of rsrc (head rh) times rmul, then
// of rows c0 .. c0 + BC of csrc (head ch) times cmul; zero past T and D.  Element e of the
// chunk is row e / DK4, vec4 e % DK4: consecutive threads read consecutive vec4s.
fn fetch_chunk(b: u32, rsrc: u32, rh: u32, r0: u32, rmul: f32, csrc: u32, ch: u32, c0: u32,
               cmul: f32, dc: u32, li: u32) -> Chunk {
    var x: Chunk;
    for (var u = 0u; u < NPRE; u = u + 1u) {
        let e = li + u * NT;
        let r = e / DK4;
        let c = dc + e % DK4;
        var val = vec4<f32>(0.0);
        // (if, not select: select reads both operands, and trusted modules have no bounds checks)
        if (r < BR) {
            if (r0 + r < p.t && c < DP4) {
                val = fetch4(rsrc, b, r0 + r, rh, c) * rmul;
            }
        } else if (r < BR + BC) {
            if (c0 + r - BR < p.t && c < DP4) {
                val = fetch4(csrc, b, c0 + r - BR, ch, c) * cmul;
            }
        }
        x[u] = val;
    }
    return x;
}

// tile_s = [BR + BC][CS]: row side, then column side; rows padded by one vec4 so that the
// column side's reads (16 consecutive rows per half warp) fall in distinct banks.
fn store_chunk(x: Chunk, li: u32) {
    for (var u = 0u; u < NPRE; u = u + 1u) {
        let e = li + u * NT;
        if (e < NCH) {
            tile_s[(e / DK4) * CS + e % DK4] = x[u];
        }
    }
}

// Rows row0 .. row0 + VK of src (head h), all DP4 vec4s, zero past T; tile_s = [VK][DP4].
fn fetch_rows(b: u32, src: u32, h: u32, row0: u32, li: u32) -> Rows {
    var x: Rows;
    for (var u = 0u; u < NPRE_V; u = u + 1u) {
        let e = li + u * NT;
        let t = row0 + e / DP4;
        var val = vec4<f32>(0.0);
        if (e < NROW && t < p.t) {
            val = fetch4(src, b, t, h, e % DP4);
        }
        x[u] = val;
    }
    return x;
}

fn store_rows(x: Rows, li: u32) {
    for (var u = 0u; u < NPRE_V; u = u + 1u) {
        let e = li + u * NT;
        if (e < NROW) {
            tile_s[e] = x[u];
        }
    }
}

fn zero_tile() -> Tile {
    var t: Tile;
    for (var i = 0u; i < TM; i = i + 1u) {
        for (var j = 0u; j < TN; j = j + 1u) {
            t[i][j] = 0.0;
        }
    }
    return t;
}

fn zero_acc() -> Acc {
    var a: Acc;
    for (var i = 0u; i < TM; i = i + 1u) {
        for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
            a[i][j4] = vec4<f32>(0.0);
        }
    }
    return a;
}

// (row side rsrc rows r0.., head rh, times rmul) . (column side csrc rows c0.., head ch,
// times cmul)^T: this thread's TM x TN tile (rows ty*TM + i, columns tx + NX*j), summed
// over D in vec4 order: TM*TN independent dot products per step.
fn scores(b: u32, rsrc: u32, rh: u32, r0: u32, rmul: f32, csrc: u32, ch: u32, c0: u32,
          cmul: f32, li: u32) -> Tile {
    let tx = li % NX;
    let ty = li / NX;
    var s = zero_tile();
    var pre = fetch_chunk(b, rsrc, rh, r0, rmul, csrc, ch, c0, cmul, 0u, li);
    for (var dc = 0u; dc < DP4; dc = dc + DK4) {
        workgroupBarrier();
        store_chunk(pre, li);
        workgroupBarrier();
        if (dc + DK4 < DP4) {
            pre = fetch_chunk(b, rsrc, rh, r0, rmul, csrc, ch, c0, cmul, dc + DK4, li);
        }
        for (var d4 = 0u; d4 < DK4; d4 = d4 + 1u) {
            var a: array<vec4<f32>, TM>;
            var c: array<vec4<f32>, TN>;
            for (var i = 0u; i < TM; i = i + 1u) {
                a[i] = tile_s[(ty * TM + i) * CS + d4];
            }
            for (var j = 0u; j < TN; j = j + 1u) {
                c[j] = tile_s[(BR + tx + NX * j) * CS + d4];
            }
            for (var i = 0u; i < TM; i = i + 1u) {
                for (var j = 0u; j < TN; j = j + 1u) {
                    s[i][j] = s[i][j] + dot(a[i], c[j]);
                }
            }
        }
    }
    return s;
}

// This thread's tile of a [BR][BC] matrix into p_s.
fn stage(t: Tile, li: u32) {
    let tx = li % NX;
    let ty = li / NX;
    for (var i = 0u; i < TM; i = i + 1u) {
        for (var j = 0u; j < TN; j = j + 1u) {
            let c = tx + NX * j;
            p_s[(ty * TM + i) * PS + c / 4u][c % 4u] = t[i][j];
        }
    }
}

// acc += p_s [BR][BC] @ (rows c0 .. c0 + BC of src, head h) [BC][D], VK rows at a time;
// `first` = fetch_rows(b, src, h, c0, li), fetched by the caller before its elementwise work.
// The thread owns rows ty*TM + i and vec4 columns tx + NX*j4 of acc.
fn accumulate(acc: ptr<function, Acc>, b: u32, src: u32, h: u32, c0: u32, first: Rows, li: u32) {
    let tx = li % NX;
    let ty = li / NX;
    var pre = first;
    for (var kc = 0u; kc < BC; kc = kc + VK) {
        workgroupBarrier();
        store_rows(pre, li);
        workgroupBarrier();
        if (kc + VK < BC) {
            pre = fetch_rows(b, src, h, c0 + kc + VK, li);
        }
        for (var kk4 = 0u; kk4 < VK / 4u; kk4 = kk4 + 1u) {
            var pv: array<vec4<f32>, TM>;
            for (var i = 0u; i < TM; i = i + 1u) {
                pv[i] = p_s[(ty * TM + i) * PS + kc / 4u + kk4];
            }
            for (var u = 0u; u < 4u; u = u + 1u) {
                for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
                    let c4 = tx + NX * j4;
                    if (c4 < DP4) {
                        let zr = tile_s[(kk4 * 4u + u) * DP4 + c4];
                        for (var i = 0u; i < TM; i = i + 1u) {
                            (*acc)[i][j4] = (*acc)[i][j4] + pv[i][u] * zr;
                        }
                    }
                }
            }
        }
    }
}
// ---- end: shared

@compute @workgroup_size(NT)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let b = wid.z;
    let h = wid.y;
    // Last query blocks (the most key blocks) first: the long workgroups start early.
    let q0 = (nwg.x - 1u - wid.x) * BR;
    let hk = h / (p.hq / p.hkv);
    let tx = li % NX;
    let ty = li / NX;

    var m: array<f32, TM>;
    var lp: array<f32, TM>;   // this thread's share of the row sums
    for (var i = 0u; i < TM; i = i + 1u) {
        m[i] = NEG_BIG;
        lp[i] = 0.0;
    }
    var acc = zero_acc();
    let kend = min(p.t, q0 + BR);
    for (var k0 = 0u; k0 < kend; k0 = k0 + BC) {
        let s = scores(b, SRC_Q, h, q0, p.scale, SRC_K, hk, k0, 1.0, li);
        let first = fetch_rows(b, SRC_V, hk, k0, li);
        // visibility; row max (exact, so every thread of a row gets the same)
        var vis: array<array<bool, TN>, TM>;
        for (var j = 0u; j < TN; j = j + 1u) {
            let kj = k0 + tx + NX * j;
            var ok = kj < p.t;
            if (ok && p.has_mask != 0u) {
                ok = mask[b * p.t + kj] != 0u;
            }
            for (var i = 0u; i < TM; i = i + 1u) {
                vis[i][j] = ok && kj <= q0 + ty * TM + i;
            }
        }
        for (var i = 0u; i < TM; i = i + 1u) {
            var mx = NEG_BIG;
            for (var j = 0u; j < TN; j = j + 1u) {
                if (vis[i][j]) {
                    mx = max(mx, s[i][j]);
                }
            }
            red_s[(ty * TM + i) * NX + tx] = mx;
        }
        workgroupBarrier();
        var pt = zero_tile();   // (naga does not re-zero loop-body vars per iteration)
        for (var i = 0u; i < TM; i = i + 1u) {
            let r = ty * TM + i;
            var mt = m[i];
            for (var t = 0u; t < NX; t = t + 1u) {
                mt = max(mt, red_s[r * NX + t]);
            }
            let corr = exp(m[i] - mt);
            m[i] = mt;
            var ls = 0.0;
            for (var j = 0u; j < TN; j = j + 1u) {
                if (vis[i][j]) {
                    pt[i][j] = exp(s[i][j] - mt);
                    ls = ls + pt[i][j];
                }
            }
            lp[i] = lp[i] * corr + ls;
            for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
                acc[i][j4] = acc[i][j4] * corr;
            }
        }
        // p_s was last read before the barriers inside scores()
        stage(pt, li);
        accumulate(&acc, b, SRC_V, hk, k0, first, li);
    }
    // ---- row sums (tx order), write
    for (var i = 0u; i < TM; i = i + 1u) {
        red_s[(ty * TM + i) * NX + tx] = lp[i];
    }
    workgroupBarrier();
    for (var i = 0u; i < TM; i = i + 1u) {
        let r = ty * TM + i;
        let qi = q0 + r;
        if (qi >= p.t) {
            continue;
        }
        var l = 0.0;
        for (var t = 0u; t < NX; t = t + 1u) {
            l = l + red_s[r * NX + t];
        }
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        let ob = ((b * p.t + qi) * p.hq + h) * HEAD_DIM;
        for (var j4 = 0u; j4 < DV4; j4 = j4 + 1u) {
            let c4 = tx + NX * j4;
            for (var u = 0u; u < 4u; u = u + 1u) {
                let d = c4 * 4u + u;
                if (c4 < DP4 && d < HEAD_DIM) {
                    o[ob + d] = acc[i][j4][u] * inv;
                }
            }
        }
        if (tx == 0u) {
            var lv = bitcast<f32>(0xff800000u);  // -inf: no visible key
            if (l > 0.0) {
                lv = m[i] + log(l);
            }
            lse[(b * p.hq + h) * p.t + qi] = lv;
        }
    }
}
