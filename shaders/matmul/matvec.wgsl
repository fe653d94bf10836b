// Decode matrix-vector product: for each vector v < n,
//   y[v, row_start + r] = W[r, :] . x[x_off + v * k ..]        (Store)
//   y[v, row_start + r] += W[r, :] . x[...]                    (ADD)
//   y[v, row_start + r] = silu(W[r, :] . x) * (U[r, :] . x)    (SWIGLU)
// for the rows r of one matrix chunk.
//
// A workgroup of 64 invocations is split into segments of TPR invocations (a pipeline
// constant: fewer for short rows, so that no invocation idles on a 576-wide row and the
// workgroup still covers many rows); each segment computes R rows (see R below). Invocations
// walk whole 32-element blocks (kb = lane, lane + TPR, ...), load the x block once for all R
// rows and accumulate per row a vec4 of partial sums in f32 (w_dot32v, folded by w_fold at
// the end); the segment then sums its lanes (subgroup shuffles within a subgroup, then
// workgroup memory).
// XVEC (cols % 32 == 0 and x_off % 4 == 0): the fast block path with 16-byte loads of x and W.
// FCHUNK (XVEC, f16 and bf16 rows): a pass of a segment over its next blocks splits them into
// 16-byte chunks and gives neighbouring invocations neighbouring chunks (w_dot4c), so that a
// subgroup's load is one contiguous run; walking whole blocks, each lane's load fell in its
// own 64-byte block (and its x in its own 128 bytes), which cost the f16 products ~8%.
// FCHUNK2 (FCHUNK, f16 rows, not FNORM): two such passes per loop iteration, their loads in
// flight together. On an H200 that shortened the 8B f16 step a further 1.8% and lengthened
// the bf16 one 1.3% (more arithmetic per chunk), so bf16 takes one pass, as do the add-norm
// products (MatVec::chunk_passes).
// Without it, an element-wise path for any shape.
// NORM: x is first RMS-normalised with weight gn (x * gn / sqrt(mean(x^2) + eps)), fusing the
// norm that precedes a layer's first product. Each workgroup sums the squares of its vector
// itself; on the fast path it also keeps x * gn in workgroup memory (k <= 2048), so the main
// loop reads x from there, and scales the finished dot products by 1 / rms (the product is
// linear in x).
// MERGE (decode, fast path, no SWIGLU): x is the attention's split partials ([head][split]
// [hd + 2]: o, m, l; attend*.wgsl) and the vector is their merge, the attention output,
// which each workgroup computes into workgroup memory itself. That replaces a merge dispatch
// in front of Wo, on steps whose splits are few (MERGE_SPLITS; AttentionKernels::
// merge_in_product): every workgroup reads all the partials, so the work is repeated per
// workgroup and only pays where the dispatch it saves costs more.
// XQ8 (fast path, no NORM or MERGE; 8- and 4-bit weights): x is quantized to 8 bits per
// 32-element block (quantize_q8.wgsl) and each block's dot product is integer (w_dot32q):
// four byte products per dot4I8Packed where the f32 path decodes every weight, which left
// the 4-bit products arithmetic-bound on an H100.
// QOUT (SWIGLU, XQ8): the output is written quantized to 8 bits (quantize_q8.wgsl's layout),
// the down product's input, so that no quantize dispatch sits between the two; a workgroup
// computes one 32-row block.
// QNORM (ADD, XQ8; a layer's Wo or down product): besides x += W a, the workgroup's 32 rows
// of the new x are written, times the next norm's weight gq, as an 8-bit block without the
// norm's 1 / rms, which no workgroup knows yet; quantizing a block is the same with or
// without a common factor, so the bytes are the normalised vector's and only the scales miss
// it. The block's sum of squares of x follows the vector (xq_out; see q8_norm_stride).
// NSCALE (XQ8): x is such a vector; the workgroup sums the blocks' squares into 1 / rms and
// scales its dot products by it (the products are linear in the scales). The pair replaces
// the RMSNorm dispatch in front of QKV and gate/up.
// FNORM (ADD, f32 vectors): the same for products whose vectors stay f32 (f16 weights): x +=
// W a, then the new x times gq and, per workgroup, the sum of squares of its rows of x, all
// after one another in xn_out (f32_norm_stride).
// FSCALE (XVEC): x is such a vector; the workgroup sums the NORM_PARTS sums into 1 / rms and
// scales its dot products by it, as NSCALE does.
// XSTAGE (XQ8, no SWIGLU): the 8-bit vector is copied to workgroup memory first and each
// invocation takes two blocks per pass (MatVec::q8_norm_staged says where).
// XPAIR (XQ8, rows of an even block count): invocations walk neighbouring pairs of blocks
// (w_dot64q), so that one load brings both blocks' weight scales and one their x scales.
// XG: the main loop reads x from workgroup memory (xg), filled by NORM or MERGE.
// Bindings and parameters: products.wgsl; the norm weight or the merge's step state follows
// them.

#if XG
var<workgroup> xg: array<vec4<f32>, 512>;
#endif
#if QBLOCK
// One output block (32 rows) before quantization.
var<workgroup> qo: array<f32, 32>;
#endif
#if QNORM
@group(0) @binding(4) var<storage, read> gq: array<f32>;
@group(0) @binding(5) var<storage, read_write> xq_out: array<u32>;
fn out_word(i: u32, w: u32) { xq_out[i] = w; }
#endif
#if QOUT
fn out_word(i: u32, w: u32) { y[i] = w; }
#endif
#if QBLOCK
var<workgroup> qb: array<f32, 32>;

// An 8-bit block: in invocation 4j, word j of its bytes; d and s (quantize_q8.wgsl); the
// sum of squares of the x that came with the values.
struct QBlock { word: u32, d: f32, s: f32, sq: f32 }

// Quantizes the 32 values qv of invocations 0..31 (0 elsewhere) as quantize_q8.wgsl does;
// xv: values whose sum of squares comes along. Every invocation calls it. With subgroups of
// 32 or more the first subgroup holds the block and it takes a few subgroup operations;
// otherwise eight invocations loop over it in workgroup memory.
fn block_q8(qv: f32, xv: f32, lid: u32, sgs: u32) -> QBlock {
    var out = QBlock(0u, 0.0, 0.0, 0.0);
#if SUBGROUPS
    let amax_sg = subgroupMax(abs(qv));
    let inv_sg = select(0.0, 127.0 / amax_sg, amax_sg > 0.0);
    let q_sg = i32(round(qv * inv_sg));
    let q1 = subgroupShuffleDown(q_sg, 1u);
    let q2 = subgroupShuffleDown(q_sg, 2u);
    let q3 = subgroupShuffleDown(q_sg, 3u);
    let qsum_sg = subgroupAdd(q_sg);
    let sq_sg = subgroupAdd(xv * xv);
    if (sgs >= 32u) {
        let d = amax_sg / 127.0;
        return QBlock(pack4xI8(vec4<i32>(q_sg, q1, q2, q3)), d, d * f32(qsum_sg), sq_sg);
    }
#endif
    if (lid < 32u) { qb[lid] = qv; }
    workgroupBarrier();
    if (lid < 32u) {
        var amax = 0.0;
        for (var j = 0u; j < 32u; j++) { amax = max(amax, abs(qb[j])); }
        let inv = select(0.0, 127.0 / amax, amax > 0.0);
        var qsum = 0;
        for (var j = 0u; j < 32u; j++) { qsum += i32(round(qb[j] * inv)); }
        let b = lid & ~3u;
        out.word = pack4xI8(vec4<i32>(round(vec4<f32>(qb[b], qb[b + 1u], qb[b + 2u], qb[b + 3u]) * inv)));
        out.d = amax / 127.0;
        out.s = out.d * f32(qsum);
    }
    workgroupBarrier();
    if (lid < 32u) { qb[lid] = xv * xv; }
    workgroupBarrier();
    if (lid == 0u) {
        for (var j = 0u; j < 32u; j++) { out.sq += qb[j]; }
    }
    return out;
}
#endif
#if XSTAGE
// The whole 8-bit vector (its bytes, then the (d, s) pairs) in workgroup memory, for up to
// XSTAGE_VEC4 * 64 / 5 columns (14,745). With x read from here, an invocation's registers
// hold little more than its weight loads, so it can keep two blocks' loads in flight: the
// long-row products with one row per segment (Llama-3-8B's down: 14 blocks per invocation)
// were bound by loads in flight, and two blocks with x in registers ran out of them.
const XSTAGE_VEC4: u32 = 1152u;
var<workgroup> xs: array<vec4<u32>, XSTAGE_VEC4>;
#endif
#if XQ8
// Words per vector of quantize_q8.wgsl's layout: k / 4 words of bytes, then (d, s) per
// block, padded to whole vec4s.
fn q8_words(k: u32) -> u32 {
    return ((k / 4u + k / 16u) + 3u) / 4u * 4u;
}
#endif
#if Q8NORM
// The norm's epsilon as f32 bits.
override EPS_BITS: u32 = 0u;

// Words per vector of an 8-bit vector with its blocks' sums of squares: the q8 layout, then
// one f32 per block, padded to whole vec4s.
fn q8_norm_stride(k: u32) -> u32 {
    return q8_words(k) + (k / 32u + 3u) / 4u * 4u;
}
#endif
#if F32NORM
// Floats per vector of FNORM's output: the k values of x * g, then `parts` sums of squares,
// padded to whole vec4s.
fn f32_norm_stride(k: u32, parts: u32) -> u32 {
    return k + (parts + 3u) / 4u * 4u;
}
#endif
#if FNORM
@group(0) @binding(4) var<storage, read> gq: array<f32>;
@group(0) @binding(5) var<storage, read_write> xn_out: array<f32>;
// Each segment's sum of squares of its rows (segments have at least 4 invocations).
var<workgroup> seg_sq: array<f32, 256>;
#endif
#if FSCALE
// The norm's epsilon as f32 bits, and the sums of squares per vector (FNORM's workgroups).
override EPS_BITS: u32 = 0u;
override NORM_PARTS: u32 = 1u;
#endif
#if MERGE
@group(0) @binding(4) var<storage, read> state: array<u32>;
override N_HEADS: u32 = 1u;
override HD: u32 = 8u;
override N_SPLITS: u32 = 1u;
// Most splits a step may use for this kernel (and the keys per split: attend's tile).
const MERGE_SPLITS: u32 = 8u;
const TILE: u32 = 64u;
#endif
#if NORM
#if XVEC
alias NormWord = vec4<f32>;
#else
alias NormWord = f32;
#endif
#if SWIGLU
@group(0) @binding(5) var<storage, read> gn: array<NormWord>;
#else
@group(0) @binding(4) var<storage, read> gn: array<NormWord>;
#endif
// The norm's epsilon as f32 bits (pipeline constants are numbers; this keeps it exact).
override EPS_BITS: u32 = 0u;
#endif

#if WG1024
const WG: u32 = 1024u;
#else
#if WG512
const WG: u32 = 512u;
#else
#if WG256
const WG: u32 = 256u;
#else
#if WG128
const WG: u32 = 128u;
#else
const WG: u32 = 64u;
#endif
#endif
#endif
#endif
// Rows per segment, a pipeline constant: 4, or 2 or 1 where a matrix is too small to give a
// GPU enough workgroups at 4 (matvec_rows in matmul.rs). At most 4: one vec4 of sums.
override R: u32 = 4u;
// Invocations per row segment: a power of two, at most WG.
override TPR: u32 = 64u;

var<workgroup> red: array<vec4<f32>, WG>;

#if XVEC
// The 32 x of block kb of the vector starting at vec4 xb (normalised, from workgroup memory,
// under NORM).
fn x_block(xb: u32, kb: u32) -> array<vec4<f32>, 8> {
#if XG
    let g = kb * 8u;
    return array<vec4<f32>, 8>(xg[g], xg[g + 1u], xg[g + 2u], xg[g + 3u], xg[g + 4u], xg[g + 5u], xg[g + 6u], xg[g + 7u]);
#else
    let o = xb + kb * 8u;
    return array<vec4<f32>, 8>(x[o], x[o + 1u], x[o + 2u], x[o + 3u], x[o + 4u], x[o + 5u], x[o + 6u], x[o + 7u]);
#endif
}

#if FCHUNK
// The x of the four 8-column chunks c, c + s, c + 2s, c + 3s (w_dot4c).
fn x_chunks(xb: u32, c: u32, s: u32) -> array<vec4<f32>, 8> {
    let o = 2u * c;
    let d = 2u * s;
#if XG
    return array<vec4<f32>, 8>(xg[o], xg[o + 1u], xg[o + d], xg[o + d + 1u], xg[o + 2u * d], xg[o + 2u * d + 1u], xg[o + 3u * d], xg[o + 3u * d + 1u]);
#else
    let b = xb + o;
    return array<vec4<f32>, 8>(x[b], x[b + 1u], x[b + d], x[b + d + 1u], x[b + 2u * d], x[b + 2u * d + 1u], x[b + 3u * d], x[b + 3u * d + 1u]);
#endif
}
#endif

fn x_sum(xs: array<vec4<f32>, 8>) -> f32 {
    return dot(((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7])), vec4<f32>(1.0));
}
#endif

// Sum of v over the TPR lanes of this invocation's segment; valid in lane 0.
fn segment_sum(v: vec4<f32>, lid: u32, sgs: u32) -> vec4<f32> {
    let base = lid - lid % TPR;
#if SUBGROUPS
    // Lanes of one segment that share a subgroup first (segments are aligned powers of two,
    // and so are subgroups), then one value per subgroup through workgroup memory.
    let g = min(TPR, sgs);
    var t = v;
    for (var o = 1u; o < g; o <<= 1u) { t += subgroupShuffleXor(t, o); }
    red[lid] = t;
    workgroupBarrier();
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < TPR; j += g) { s += red[base + j]; }
    return s;
#else
    red[lid] = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s >>= 1u) {
        if (lid % TPR < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    return red[base];
#endif
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUPS
    @builtin(subgroup_size) sgs: u32,
    @builtin(subgroup_invocation_id) sgl: u32,
#endif
) {
#if !SUBGROUPS
    let sgs = 1u;
    let sgl = 0u;
#endif
    let v = wid.x;
    let lane = lid % TPR;
    let row0 = (wid.y * (WG / TPR) + lid / TPR) * R;
#if QNORM
    // This invocation's weight of the next norm (its row in the block), loaded early.
    let g_row = gq[p.row_start + wid.y * 32u + lid % 32u];
#endif
#if FNORM
    // The next norm's weights of this segment's rows, loaded early.
    var g_rows = vec4<f32>(0.0);
    for (var r = 0u; r < R; r++) { g_rows[r] = gq[p.row_start + min(row0 + r, p.rows - 1u)]; }
#endif
#if NORM
    // 1 / rms of this vector; every invocation sums the 64 partial sums (broadcast reads).
    var ss = 0.0;
#if XVEC
    let x4 = (p.x_off + v * p.k) / 4u;
    for (var i = lid; i < p.k / 4u; i += WG) {
        let a = x[x4 + i];
        ss += dot(a, a);
        xg[i] = a * gn[i];
    }
#else
    for (var i = lid; i < p.k; i += WG) { let a = x[p.x_off + v * p.k + i]; ss += a * a; }
#endif
    red[lid] = vec4<f32>(ss, 0.0, 0.0, 0.0);
    workgroupBarrier();
    var sum_sq = 0.0;
    for (var i = 0u; i < WG; i++) { sum_sq += red[i].x; }
    let inv_rms = inverseSqrt(sum_sq / f32(p.k) + bitcast<f32>(EPS_BITS));
    workgroupBarrier();
#endif
#if MERGE
    // The attention output of the step's token (one query; decode), merged from the used
    // splits' partials: lane i makes word i % hd4 of head i / hd4. Each loads every split's
    // o, m and l at once (splits past `used` repeat the last one and weigh 0), so the loads
    // overlap instead of waiting on one another.
    let used = min(N_SPLITS, (state[0] + TILE) / TILE);
    let hd4 = HD / 4u;
    for (var i = lid; i < N_HEADS * hd4; i += WG) {
        let base = (i / hd4) * N_SPLITS * (HD + 2u);
        let d = (i % hd4) * 4u;
        var o: array<vec4<f32>, MERGE_SPLITS>;
        var m: array<f32, MERGE_SPLITS>;
        var l: array<f32, MERGE_SPLITS>;
        for (var s = 0u; s < MERGE_SPLITS; s++) {
            let at = base + min(s, used - 1u) * (HD + 2u);
            o[s] = vec4<f32>(x[at + d], x[at + d + 1u], x[at + d + 2u], x[at + d + 3u]);
            m[s] = x[at + HD];
            l[s] = x[at + HD + 1u];
        }
        var mx = -3.0e38;
        for (var s = 0u; s < MERGE_SPLITS; s++) {
            if (s < used && l[s] > 0.0) { mx = max(mx, m[s]); }
        }
        var lsum = 0.0;
        var acc = vec4<f32>(0.0);
        for (var s = 0u; s < MERGE_SPLITS; s++) {
            let w = select(0.0, exp(m[s] - mx), s < used && l[s] > 0.0);
            lsum += w * l[s];
            acc += w * o[s];
        }
        xg[i] = acc / lsum;
    }
    workgroupBarrier();
#endif
#if XQ8
    // x is 8-bit blocks (quantize_q8.wgsl): per vector, k / 4 words of bytes and a (d, s)
    // pair per block, padded to whole vec4s.
    var acc_rows = vec4<f32>(0.0);
#if SWIGLU
    var accu_rows = vec4<f32>(0.0);
#endif
#if NSCALE
    let xb = v * q8_norm_stride(p.k) / 4u;
#else
    let xb = v * q8_words(p.k) / 4u;
#endif
    let xds = xb + p.k / 16u;
    let nb = p.k / 32u;
#if NSCALE
    // The blocks' sums of squares, loaded before the products so that they arrive meanwhile.
    let sq0 = xb * 4u + q8_words(p.k);
    var ss = 0.0;
    for (var i = lid; i < nb; i += WG) { ss += bitcast<f32>(x[(sq0 + i) / 4u][(sq0 + i) % 4u]); }
#endif
    let last_row = p.rows - 1u;
#if XSTAGE
    // The vector into workgroup memory once; then two blocks per pass, whose weight loads
    // the unrolled inner loop puts in flight together (a block past the row is the row's
    // last one again, weighed 0).
    for (var i = lid; i < q8_words(p.k) / 4u; i += WG) { xs[i] = x[xb + i]; }
    workgroupBarrier();
    let xsd = p.k / 16u;
#if XPAIR
    // Two neighbouring blocks per pass (see XPAIR below).
    for (var kp = lane; kp < nb / 2u; kp += TPR) {
        let dsv = bitcast<vec4<f32>>(xs[xsd + kp]);
        let o = 4u * kp;
        for (var r = 0u; r < R; r++) {
            acc_rows[r] += w_dot64q(0u, min(row0 + r, last_row), kp, xs[o], xs[o + 1u], xs[o + 2u], xs[o + 3u], dsv);
        }
    }
#else
    for (var kb0 = lane; kb0 < nb; kb0 += 2u * TPR) {
        for (var u = 0u; u < 2u; u++) {
            let live = kb0 + u * TPR < nb;
            let kb = min(kb0 + u * TPR, nb - 1u);
            let dsv = xs[xsd + (kb >> 1u)];
            let ds = bitcast<vec2<f32>>(select(dsv.xy, dsv.zw, (kb & 1u) == 1u)) * select(0.0, 1.0, live);
            for (var r = 0u; r < R; r++) {
                acc_rows[r] += w_dot32q(0u, min(row0 + r, last_row), kb, xs[2u * kb], xs[2u * kb + 1u], ds);
            }
        }
    }
#endif
#else
#if XPAIR
    // Neighbouring blocks in pairs (rows of an even block count): the pair's weight scales
    // are one word and its x scales one vec4, where a block each loaded them apart (and
    // used half of each). The scale loads had cost the 4-bit products more than their bytes.
    for (var kp = lane; kp < nb / 2u; kp += TPR) {
        let lo0 = x[xb + 4u * kp];
        let hi0 = x[xb + 4u * kp + 1u];
        let lo1 = x[xb + 4u * kp + 2u];
        let hi1 = x[xb + 4u * kp + 3u];
        let dsv = bitcast<vec4<f32>>(x[xds + kp]);
        for (var r = 0u; r < R; r++) {
            let row = min(row0 + r, last_row);
            acc_rows[r] += w_dot64q(0u, row, kp, lo0, hi0, lo1, hi1, dsv);
#if SWIGLU
            accu_rows[r] += w_dot64q(1u, row, kp, lo0, hi0, lo1, hi1, dsv);
#endif
        }
    }
#else
    for (var kb = lane; kb < nb; kb += TPR) {
        let lo = x[xb + 2u * kb];
        let hi = x[xb + 2u * kb + 1u];
        let dsv = x[xds + (kb >> 1u)];
        let ds = bitcast<vec2<f32>>(select(dsv.xy, dsv.zw, (kb & 1u) == 1u));
        for (var r = 0u; r < R; r++) {
            let row = min(row0 + r, last_row);
            acc_rows[r] += w_dot32q(0u, row, kb, lo, hi, ds);
#if SWIGLU
            accu_rows[r] += w_dot32q(1u, row, kb, lo, hi, ds);
#endif
        }
    }
#endif
#endif
#else
#if XVEC
    // Per row, partial sums that w_fold turns into the dot product.
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
#if SWIGLU
    var accu = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
#endif
#if FSCALE
    let xb = v * f32_norm_stride(p.k, NORM_PARTS) / 4u;
    // The sums of squares, loaded before the products so that they arrive meanwhile.
    var ss = 0.0;
    for (var i = lid; i * 4u < NORM_PARTS; i += WG) {
        let j = vec4<u32>(0u, 1u, 2u, 3u) + i * 4u;
        ss += dot(select(vec4<f32>(0.0), x[xb + p.k / 4u + i], j < vec4<u32>(NORM_PARTS)), vec4<f32>(1.0));
    }
#else
    let xb = (p.x_off + v * p.k) / 4u;
#endif
    let nb = p.k / 32u;
    let fold = w_fold();
    // Rows past the matrix (in the last workgroup) repeat its last row, and their sums are
    // not written: with the loads unconditional the compiler issues all R rows' loads
    // together, where a bounds test around each row had kept them one at a time (8B Q4_0
    // decode +12% on an H100, benches/RESULTS.md).
    let last_row = p.rows - 1u;
#if FCHUNK
    // A pass over the segment's next `span` blocks (TPR, or what is left) is 4 * span chunks
    // of 8 columns, lane i taking chunks i, i + span, i + 2 span, i + 3 span: each load of a
    // subgroup then reads one contiguous run, where walking whole blocks spread it over every
    // lane's block.
#if FCHUNK2
    // An iteration runs two passes so that both passes' loads are in flight together; a lane
    // with no second pass repeats its first pass's chunks and drops them.
    for (var kb = lane; kb < nb; kb += 2u * TPR) {
        let start = kb - lane;
        let span = min(TPR, nb - start);
        let c = 4u * start + lane;
        let more = kb + TPR < nb;
        let start2 = select(start, start + TPR, more);
        let span2 = min(TPR, nb - start2);
        let c2 = 4u * start2 + lane;
        let xs = x_chunks(xb, c, span);
        let xs2 = x_chunks(xb, c2, span2);
        for (var r = 0u; r < R; r++) {
            let row = min(row0 + r, last_row);
            acc[r] += w_dot4c(0u, row, c, span, xs) + select(vec4<f32>(0.0), w_dot4c(0u, row, c2, span2, xs2), more);
#if SWIGLU
            accu[r] += w_dot4c(1u, row, c, span, xs) + select(vec4<f32>(0.0), w_dot4c(1u, row, c2, span2, xs2), more);
#endif
        }
    }
#else
    for (var kb = lane; kb < nb; kb += TPR) {
        let span = min(TPR, nb - (kb - lane));
        let c = 4u * (kb - lane) + lane;
        let xs = x_chunks(xb, c, span);
        for (var r = 0u; r < R; r++) {
            let row = min(row0 + r, last_row);
            acc[r] += w_dot4c(0u, row, c, span, xs);
#if SWIGLU
            accu[r] += w_dot4c(1u, row, c, span, xs);
#endif
        }
    }
#endif
#else
    for (var kb = lane; kb < nb; kb += TPR) {
        let xs = x_block(xb, kb);
        let xsum = x_sum(xs);
        for (var r = 0u; r < R; r++) {
            let row = min(row0 + r, last_row);
            acc[r] += w_dot32v(0u, row, kb, xs, xsum);
#if SWIGLU
            accu[r] += w_dot32v(1u, row, kb, xs, xsum);
#endif
        }
    }
#endif
    // Each row's partial sums, folded once (folding every block measured no faster).
    let acc_rows = vec4<f32>(dot(acc[0], fold), dot(acc[1], fold), dot(acc[2], fold), dot(acc[3], fold));
#if SWIGLU
    let accu_rows = vec4<f32>(dot(accu[0], fold), dot(accu[1], fold), dot(accu[2], fold), dot(accu[3], fold));
#endif
#else
    var acc_rows = vec4<f32>(0.0);
#if SWIGLU
    var accu_rows = vec4<f32>(0.0);
#endif
    let xb = p.x_off + v * p.k;
    for (var c = lane; c < p.k; c += TPR) {
#if NORM
        let xv = x[xb + c] * gn[c];
#else
        let xv = x[xb + c];
#endif
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            if (row < p.rows) {
                acc_rows[r] += w_elem(0u, row, c) * xv;
#if SWIGLU
                accu_rows[r] += w_elem(1u, row, c) * xv;
#endif
            }
        }
    }
#endif
#endif
#if NORM
    let scale = inv_rms;
#else
#if NSCALE
    let scale = inverseSqrt(wg_sum(ss, lid, WG, sgs, sgl) / f32(p.k) + bitcast<f32>(EPS_BITS));
#else
#if FSCALE
    let scale = inverseSqrt(wg_sum(ss, lid, WG, sgs, sgl) / f32(p.k) + bitcast<f32>(EPS_BITS));
#else
    let scale = 1.0;
#endif
#endif
#endif
    let tot = segment_sum(acc_rows, lid, sgs) * scale;
#if SWIGLU
    workgroupBarrier();
    let totu = segment_sum(accu_rows, lid, sgs) * scale;
#endif
    // QOUT, QNORM: the workgroup's 32 rows are one 8-bit block. Each segment's lane 0 leaves
    // its R results in workgroup memory, the block is quantized as quantize_q8.wgsl does (same
    // formulas, so the same bytes from the same f32 values) and written.
#if QOUT
    if (lane == 0u) {
        for (var r = 0u; r < R; r++) {
            let g = tot[r];
            qo[(lid / TPR) * R + r] = g / (1.0 + exp(-g)) * totu[r];
        }
    }
    workgroupBarrier();
    let xv = select(0.0, qo[lid % 32u], lid < 32u);
    let qv = xv;
    // Vector v of the 8-bit layout: n_total / 4 words of bytes, then (d, s) per block.
    let base = v * q8_words(p.n_total);
#endif
#if QNORM
    // x += W a for the block's rows, then x * gq.
    if (lane == 0u) {
        for (var r = 0u; r < R; r++) {
            let o = v * p.n_total + p.row_start + row0 + r;
            let nx = y[o] + tot[r];
            y[o] = nx;
            qo[(lid / TPR) * R + r] = nx;
        }
    }
    workgroupBarrier();
    let xv = select(0.0, qo[lid % 32u], lid < 32u);
    let qv = xv * g_row;
    let base = v * q8_norm_stride(p.n_total);
#endif
#if QBLOCK
    let blk = (p.row_start + wid.y * 32u) / 32u;
    let blk_q = block_q8(qv, xv, lid, sgs);
    if (lid < 32u && lid % 4u == 0u) { out_word(base + blk * 8u + lid / 4u, blk_q.word); }
    if (lid == 0u) {
        let ds = base + p.n_total / 4u + blk * 2u;
        out_word(ds, bitcast<u32>(blk_q.d));
        out_word(ds + 1u, bitcast<u32>(blk_q.s));
#if QNORM
        out_word(base + q8_words(p.n_total) + blk, bitcast<u32>(blk_q.sq));
#endif
    }
#else
#if FNORM
    // x += W a for the workgroup's rows, x * gq, and their sum of squares after the vector
    // (one per workgroup: chunks start at whole workgroups).
    let rpg = (WG / TPR) * R;
    let base = v * f32_norm_stride(p.n_total, (p.n_total + rpg - 1u) / rpg);
    if (lane == 0u) {
        var sq = 0.0;
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            if (row < p.rows) {
                let o = v * p.n_total + p.row_start + row;
                let nx = y[o] + tot[r];
                y[o] = nx;
                xn_out[base + p.row_start + row] = nx * g_rows[r];
                sq += nx * nx;
            }
        }
        seg_sq[lid / TPR] = sq;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var t = 0.0;
        for (var s = 0u; s < WG / TPR; s++) { t += seg_sq[s]; }
        xn_out[base + p.n_total + p.row_start / rpg + wid.y] = t;
    }
#else
    if (lane == 0u) {
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            if (row < p.rows) {
                let o = v * p.n_total + p.row_start + row;
                let g = tot[r];
#if SWIGLU
                y[o] = g / (1.0 + exp(-g)) * totu[r];
#else
#if ADD
                y[o] = y[o] + g;
#else
                y[o] = g;
#endif
#endif
            }
        }
    }
#endif
#endif
}
