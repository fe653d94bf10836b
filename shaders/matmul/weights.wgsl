// Weight decoding shared by the weight kernels (matvec, matmul, embedding). One of W_F32,
// W_F16, W_BF16, W_Q8_0, W_Q4_0, W_Q4_1 is defined; the weights stay packed as
// `quant::pack_for_gpu` lays them out and are decoded here, exactly (every format's values are
// exact in f32, so no F16 arithmetic is used).
//
// The including kernel declares (the products through products.wgsl)
//   var<storage, read> W: array<vec4<u32>>;      (the buffer is padded to 16 bytes)
//   var<storage, read> U: array<vec4<u32>>;      (only with SWIGLU: the second matrix)
//   fn w_layout(m: u32) -> vec2<u32>             ((row_stride, scale_offset) of the layout)
// Every helper takes `m`, the matrix (0 = W, 1 = U); call sites pass constants, so after
// inlining the selection costs nothing.

// One u32 word of the packed matrix.
fn ww(m: u32, i: u32) -> u32 {
#if SWIGLU
    if (m == 1u) { return U[i >> 2u][i & 3u]; }
#endif
    return W[i >> 2u][i & 3u];
}

// Four words at word index 4 * i (one 16-byte load).
fn wq(m: u32, i: u32) -> vec4<u32> {
#if SWIGLU
    if (m == 1u) { return U[i]; }
#endif
    return W[i];
}

// Integers to floats without conversion instructions: those run at a fraction of the FMA
// rate on NVIDIA and made the quantized products arithmetic-bound. An integer 0 <= q < 2^23
// OR'ed into the bits of the float 2^23 is the float 2^23 + q; subtracting 2^23 + c then
// leaves q - c exactly, in one addition.
const MAGIC_BITS: u32 = 0x4B000000u;
const MAGIC: f32 = 8388608.0;

// Signed bytes of a word, low byte first: byte ^ 0x80 is the signed value + 128.
fn i8x4(w: u32) -> vec4<f32> {
    let b = (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u);
    return bitcast<vec4<f32>>(b ^ vec4<u32>(MAGIC_BITS | 0x80u)) - vec4<f32>(MAGIC + 128.0);
}

// Low / high nibbles of the four bytes of a word, low byte first, minus `off` (a small
// integer: 0 or 8).
fn lo4(w: u32, off: f32) -> vec4<f32> {
    let n = (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u);
    return bitcast<vec4<f32>>(n | vec4<u32>(MAGIC_BITS)) - vec4<f32>(MAGIC + off);
}
fn hi4(w: u32, off: f32) -> vec4<f32> {
    let n = (vec4<u32>(w) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u);
    return bitcast<vec4<f32>>(n | vec4<u32>(MAGIC_BITS)) - vec4<f32>(MAGIC + off);
}

// Scale d of quant block b (Q8_0, Q4_0: two f16 per word).
fn w_d(m: u32, b: u32) -> f32 {
    let s = ww(m, w_layout(m).y + (b >> 1u));
    return unpack2x16float(s)[b & 1u];
}

// (d, m) of Q4_1 block b (one word per block).
fn w_dm(m: u32, b: u32) -> vec2<f32> {
    return unpack2x16float(ww(m, w_layout(m).y + b));
}

// Element (r, c) of the matrix. Slow path: odd shapes, embedding rows.
fn w_elem(m: u32, r: u32, c: u32) -> f32 {
    let L = w_layout(m);
#if W_F32
    return bitcast<f32>(ww(m, r * L.x + c));
#endif
#if W_F16
    return unpack2x16float(ww(m, r * L.x + (c >> 1u)))[c & 1u];
#endif
#if W_BF16
    let w = ww(m, r * L.x + (c >> 1u));
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (c & 1u) == 1u));
#endif
#if W_Q8_0
    let b = r * L.x + (c >> 5u);
    let j = c & 31u;
    let q = extractBits(bitcast<i32>(ww(m, b * 8u + (j >> 2u))), 8u * (j & 3u), 8u);
    return w_d(m, b) * f32(q);
#endif
#if W_Q4_0
    let b = r * L.x + (c >> 5u);
    let j = c & 31u;
    let byte = ww(m, b * 4u + ((j & 15u) >> 2u)) >> (8u * (j & 3u));
    let q = (byte >> (4u * (j >> 4u))) & 15u;
    return w_d(m, b) * (f32(q) - 8.0);
#endif
#if W_Q4_1
    let b = r * L.x + (c >> 5u);
    let j = c & 31u;
    let byte = ww(m, b * 4u + ((j & 15u) >> 2u)) >> (8u * (j & 3u));
    let q = (byte >> (4u * (j >> 4u))) & 15u;
    let dm = w_dm(m, b);
    return dm.x * f32(q) + dm.y;
#endif
}

// Partial sums of the dot product of the 32 elements of row r starting at column 32 * kb with
// xs (elements 4i..4i+3 in xs[i]); xsum = the sum of those x. The row's dot product is
// dot(sum of these over its blocks, w_fold()). Requires cols % 32 == 0 (so float rows are
// 16-byte aligned). Each call is whole 16-byte loads of one block.
fn w_dot32v(m: u32, r: u32, kb: u32, xs: array<vec4<f32>, 8>, xsum: f32) -> vec4<f32> {
    let L = w_layout(m);
#if W_F32
    let base = (r * L.x + kb * 32u) >> 2u;
    var s = bitcast<vec4<f32>>(wq(m, base)) * xs[0];
    s += bitcast<vec4<f32>>(wq(m, base + 1u)) * xs[1];
    s += bitcast<vec4<f32>>(wq(m, base + 2u)) * xs[2];
    s += bitcast<vec4<f32>>(wq(m, base + 3u)) * xs[3];
    s += bitcast<vec4<f32>>(wq(m, base + 4u)) * xs[4];
    s += bitcast<vec4<f32>>(wq(m, base + 5u)) * xs[5];
    s += bitcast<vec4<f32>>(wq(m, base + 6u)) * xs[6];
    s += bitcast<vec4<f32>>(wq(m, base + 7u)) * xs[7];
    return s;
#endif
    // A 16-bit block is four neighbouring chunks (matvec's FCHUNK walk calls w_dot4c itself).
#if W_F16
    return w_dot4c(m, r, 4u * kb, 1u, xs);
#endif
#if W_BF16
    return w_dot4c(m, r, 4u * kb, 1u, xs);
#endif
#if W_Q8_0
    let b = r * L.x + kb;
    let q0 = wq(m, b * 2u);
    let q1 = wq(m, b * 2u + 1u);
    var s = i8x4(q0.x) * xs[0];
    s += i8x4(q0.y) * xs[1];
    s += i8x4(q0.z) * xs[2];
    s += i8x4(q0.w) * xs[3];
    s += i8x4(q1.x) * xs[4];
    s += i8x4(q1.y) * xs[5];
    s += i8x4(q1.z) * xs[6];
    s += i8x4(q1.w) * xs[7];
    return w_d(m, b) * s;
#endif
#if W_Q4_0
    let b = r * L.x + kb;
    let q = wq(m, b);
    let off = vec4<f32>(MAGIC) + 8.0 * Q4_SCALES;
    let s = (q4_word(q.x, xs[0], xs[4], off) + q4_word(q.y, xs[1], xs[5], off))
        + (q4_word(q.z, xs[2], xs[6], off) + q4_word(q.w, xs[3], xs[7], off));
    return w_d(m, b) * s;
#endif
#if W_Q4_1
    let b = r * L.x + kb;
    let q = wq(m, b);
    let off = vec4<f32>(MAGIC);
    let s = (q4_word(q.x, xs[0], xs[4], off) + q4_word(q.y, xs[1], xs[5], off))
        + (q4_word(q.z, xs[2], xs[6], off) + q4_word(q.w, xs[3], xs[7], off));
    let dm = w_dm(m, b);
    return dm.x * s + vec4<f32>(dm.y * xsum, 0.0, 0.0, 0.0);
#endif
}

#if XQ8
// An integer value |i| < 2^22 as f32 without a conversion instruction (see MAGIC): added to
// the bits of 1.5 * 2^23 it stays in that float's mantissa.
fn i2f(i: i32) -> f32 {
    return bitcast<f32>(i + 0x4B400000) - 12582912.0;
}

// The sum of the 32 integer weights of block b (bytes of Q8_0, nibbles of Q4_0 / Q4_1) times
// a block of x quantized to 8 bits (quantize_q8.wgsl): lo and hi hold its bytes 0..15 and
// 16..31, ds = (d, d * sum of the bytes); the weight scale is left to the caller. Four byte
// products per dot4I8Packed; the sums stay below 2^22 in magnitude (32 * 128 * 127), as i2f
// needs. Q4_0 subtracts its offset 8 (sum (q - 8) x = dx sum q xq - 8 s); Q4_1 returns dx
// sum q xq (its offset m is the caller's).
fn w_int32q(m: u32, b: u32, lo: vec4<u32>, hi: vec4<u32>, ds: vec2<f32>) -> f32 {
#if W_Q8_0
    let q0 = wq(m, b * 2u);
    let q1 = wq(m, b * 2u + 1u);
    let i = (dot4I8Packed(q0.x, lo.x) + dot4I8Packed(q0.y, lo.y)) + (dot4I8Packed(q0.z, lo.z) + dot4I8Packed(q0.w, lo.w))
        + (dot4I8Packed(q1.x, hi.x) + dot4I8Packed(q1.y, hi.y)) + (dot4I8Packed(q1.z, hi.z) + dot4I8Packed(q1.w, hi.w));
    return ds.x * i2f(i);
#else
    // Byte j of word i holds elements 4i + j (low nibble) and 16 + 4i + j (high nibble):
    // the low nibbles pair with lo, the high ones with hi, 0..15 each as signed bytes.
    let q = wq(m, b);
    let nib = vec4<u32>(0x0F0F0F0Fu);
    let l = q & nib;
    let h = (q >> vec4<u32>(4u)) & nib;
    let i = (dot4I8Packed(l.x, lo.x) + dot4I8Packed(l.y, lo.y)) + (dot4I8Packed(l.z, lo.z) + dot4I8Packed(l.w, lo.w))
        + (dot4I8Packed(h.x, hi.x) + dot4I8Packed(h.y, hi.y)) + (dot4I8Packed(h.z, hi.z) + dot4I8Packed(h.w, hi.w));
#if W_Q4_0
    return ds.x * i2f(i) - 8.0 * ds.y;
#else
    return ds.x * i2f(i);
#endif
#endif
}

// The dot product of the 32 elements of row r starting at column 32 * kb with a block of x
// quantized to 8 bits (w_int32q), the weight scales applied.
fn w_dot32q(m: u32, r: u32, kb: u32, lo: vec4<u32>, hi: vec4<u32>, ds: vec2<f32>) -> f32 {
    let L = w_layout(m);
    let b = r * L.x + kb;
#if W_Q4_1
    // sum (d q + m) x = d dx * sum q xq + m s.
    let dm = w_dm(m, b);
    return dm.x * w_int32q(m, b, lo, hi, ds) + dm.y * ds.y;
#else
    return w_d(m, b) * w_int32q(m, b, lo, hi, ds);
#endif
}

#if XPAIR
// w_dot32q of blocks 2 kp and 2 kp + 1 of row r (rows of an even block count) with the x
// blocks (lo0, hi0) and (lo1, hi1), dsv = their (d, s) pairs. The two blocks' weight scales
// (Q8_0, Q4_0) are one word of the scale array, loaded once.
fn w_dot64q(m: u32, r: u32, kp: u32, lo0: vec4<u32>, hi0: vec4<u32>, lo1: vec4<u32>, hi1: vec4<u32>, dsv: vec4<f32>) -> f32 {
#if W_Q4_1
    return w_dot32q(m, r, 2u * kp, lo0, hi0, dsv.xy) + w_dot32q(m, r, 2u * kp + 1u, lo1, hi1, dsv.zw);
#else
    let L = w_layout(m);
    let b = r * L.x + 2u * kp;
    let d = unpack2x16float(ww(m, L.y + (b >> 1u)));
    return d.x * w_int32q(m, b, lo0, hi0, dsv.xy) + d.y * w_int32q(m, b + 1u, lo1, hi1, dsv.zw);
#endif
}
#endif
#endif

// The factors that turn w_dot32v's partial sums into the dot product: see q4_word.
fn w_fold() -> vec4<f32> {
#if W_Q4_0
    return 1.0 / Q4_SCALES;
#else
#if W_Q4_1
    return 1.0 / Q4_SCALES;
#else
    return vec4<f32>(1.0);
#endif
#endif
}

// The 4-bit formats decode each nibble where it sits in its word: the field 0xF << 4k
// (k < 4; of the word, then of the word shifted right by 16) OR'ed into the float 2^23 is
// 2^23 + q * 16^k, and one subtraction of 2^23 + offset * 16^k leaves (q - offset) * 16^k
// exactly. That is one logic operation and one subtraction per value, where shifting every
// nibble down first kept the products arithmetic-bound. The 16^k stay in the four components
// of the partial sums until w_fold divides them out, once per row.
const Q4_FIELDS = vec4<u32>(0xFu, 0xF0u, 0xF00u, 0xF000u);
const Q4_SCALES = vec4<f32>(1.0, 16.0, 256.0, 4096.0);

// One 4-bit word against its x: byte i of the word holds element 4j + i (low nibble) and
// 4j + 16 + i (high nibble), whose x are lo[i] and hi[i].
fn q4_word(w: u32, lo: vec4<f32>, hi: vec4<f32>, off: vec4<f32>) -> vec4<f32> {
    let a = bitcast<vec4<f32>>((vec4<u32>(w) & Q4_FIELDS) | vec4<u32>(MAGIC_BITS)) - off;
    let b = bitcast<vec4<f32>>((vec4<u32>(w >> 16u) & Q4_FIELDS) | vec4<u32>(MAGIC_BITS)) - off;
    return a * vec4<f32>(lo.x, hi.x, lo.y, hi.y) + b * vec4<f32>(lo.z, hi.z, lo.w, hi.w);
}

#if W_BF16
// Four words = eight bf16 values (low half first) against x elements 0..3 (a) and 4..7 (b).
fn bf16_dot8(q: vec4<u32>, a: vec4<f32>, b: vec4<f32>) -> f32 {
    let lo = bitcast<vec4<f32>>(q << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
    return dot(lo, vec4<f32>(a.x, a.z, b.x, b.z)) + dot(hi, vec4<f32>(a.y, a.w, b.y, b.w));
}
#endif

// Tile loads (matmul): part p (0..3) of the 32 elements of row r at columns 32 * kb.., as two
// runs of four values that belong at columns w_part_pos(p).x.. and w_part_pos(p).y.. of the
// block. Columns at or past `cols` read as zero (float formats; quantized rows are whole blocks).
fn w_part_pos(p: u32) -> vec2<u32> {
#if W_Q4_0
    return vec2<u32>(4u * p, 16u + 4u * p);
#else
#if W_Q4_1
    return vec2<u32>(4u * p, 16u + 4u * p);
#else
    return vec2<u32>(8u * p, 8u * p + 4u);
#endif
#endif
}

fn w_part(m: u32, r: u32, kb: u32, p: u32, cols: u32) -> array<vec4<f32>, 2> {
    let L = w_layout(m);
#if W_Q8_0
    let b = r * L.x + kb;
    let w0 = ww(m, b * 8u + 2u * p);
    let w1 = ww(m, b * 8u + 2u * p + 1u);
    let d = w_d(m, b);
    return array<vec4<f32>, 2>(d * i8x4(w0), d * i8x4(w1));
#endif
#if W_Q4_0
    let b = r * L.x + kb;
    let w = ww(m, b * 4u + p);
    let d = w_d(m, b);
    return array<vec4<f32>, 2>(d * lo4(w, 8.0), d * hi4(w, 8.0));
#endif
#if W_Q4_1
    let b = r * L.x + kb;
    let w = ww(m, b * 4u + p);
    let dm = w_dm(m, b);
    return array<vec4<f32>, 2>(dm.x * lo4(w, 0.0) + dm.y, dm.x * hi4(w, 0.0) + dm.y);
#endif
#if W_F32
    let c0 = kb * 32u + 8u * p;
    let base = r * L.x + c0;
    if (c0 + 8u <= cols) {
        return array<vec4<f32>, 2>(
            bitcast<vec4<f32>>(vec4<u32>(ww(m, base), ww(m, base + 1u), ww(m, base + 2u), ww(m, base + 3u))),
            bitcast<vec4<f32>>(vec4<u32>(ww(m, base + 4u), ww(m, base + 5u), ww(m, base + 6u), ww(m, base + 7u))));
    }
    return w_part_slow(m, r, c0, cols);
#endif
#if W_F16
    let c0 = kb * 32u + 8u * p;
    let base = r * L.x + (c0 >> 1u);
    if (c0 + 8u <= cols) {
        return array<vec4<f32>, 2>(
            vec4<f32>(unpack2x16float(ww(m, base)), unpack2x16float(ww(m, base + 1u))),
            vec4<f32>(unpack2x16float(ww(m, base + 2u)), unpack2x16float(ww(m, base + 3u))));
    }
    return w_part_slow(m, r, c0, cols);
#endif
#if W_BF16
    let c0 = kb * 32u + 8u * p;
    let base = r * L.x + (c0 >> 1u);
    if (c0 + 8u <= cols) {
        let q = vec4<u32>(ww(m, base), ww(m, base + 1u), ww(m, base + 2u), ww(m, base + 3u));
        let lo = bitcast<vec4<f32>>(q << vec4<u32>(16u));
        let hi = bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
        return array<vec4<f32>, 2>(vec4<f32>(lo.x, hi.x, lo.y, hi.y), vec4<f32>(lo.z, hi.z, lo.w, hi.w));
    }
    return w_part_slow(m, r, c0, cols);
#endif
}

// Eight elements from column c0 with those at or past `cols` zero (float formats, row ends).
fn w_part_slow(m: u32, r: u32, c0: u32, cols: u32) -> array<vec4<f32>, 2> {
    var v = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var i = 0u; i < 8u; i++) {
        if (c0 + i < cols) { v[i] = w_elem(m, r, c0 + i); }
    }
    return array<vec4<f32>, 2>(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

#if W_F16
// The partial sums of w_dot32v over four 8-column chunks of row r instead of one block:
// chunks c, c + s, c + 2s, c + 3s (16 bytes each), with their x in xs (two vec4s per chunk).
// matvec's FCHUNK walk gives neighbouring invocations neighbouring chunks, so each of the
// four loads of a subgroup reads one contiguous run of memory.
fn w_dot4c(m: u32, r: u32, c: u32, s: u32, xs: array<vec4<f32>, 8>) -> vec4<f32> {
    let base = ((r * w_layout(m).x) >> 2u) + c;
    let q0 = wq(m, base);
    let q1 = wq(m, base + s);
    let q2 = wq(m, base + 2u * s);
    let q3 = wq(m, base + 3u * s);
    var t = vec4<f32>(unpack2x16float(q0.x), unpack2x16float(q0.y)) * xs[0];
    t += vec4<f32>(unpack2x16float(q0.z), unpack2x16float(q0.w)) * xs[1];
    t += vec4<f32>(unpack2x16float(q1.x), unpack2x16float(q1.y)) * xs[2];
    t += vec4<f32>(unpack2x16float(q1.z), unpack2x16float(q1.w)) * xs[3];
    t += vec4<f32>(unpack2x16float(q2.x), unpack2x16float(q2.y)) * xs[4];
    t += vec4<f32>(unpack2x16float(q2.z), unpack2x16float(q2.w)) * xs[5];
    t += vec4<f32>(unpack2x16float(q3.x), unpack2x16float(q3.y)) * xs[6];
    t += vec4<f32>(unpack2x16float(q3.z), unpack2x16float(q3.w)) * xs[7];
    return t;
}
#endif
#if W_BF16
// As the f16 w_dot4c above, for bf16 rows.
fn w_dot4c(m: u32, r: u32, c: u32, s: u32, xs: array<vec4<f32>, 8>) -> vec4<f32> {
    let base = ((r * w_layout(m).x) >> 2u) + c;
    var t = bf16_dot8(wq(m, base), xs[0], xs[1]) + bf16_dot8(wq(m, base + s), xs[2], xs[3]);
    t += bf16_dot8(wq(m, base + 2u * s), xs[4], xs[5]) + bf16_dot8(wq(m, base + 3u * s), xs[6], xs[7]);
    return vec4<f32>(t, 0.0, 0.0, 0.0);
}
#endif

// Whole-block loads and decoding, split so that a kernel can issue the loads of its next
// tile before it computes on the current one (matmul_coop). Requires cols % 32 == 0.
// `q` holds the block's words as they lie (16 for f16 / bf16, 8 for Q8_0, 4 for the 4-bit
// formats; f32 is not supported), `s` its scale word.
struct WBlock {
    q: array<vec4<u32>, 4>,
    s: u32,
}

fn w_block(m: u32, r: u32, kb: u32) -> WBlock {
    let L = w_layout(m);
    var o: WBlock;
#if W_F16
    let base = (r * L.x + kb * 16u) >> 2u;
    o.q = array<vec4<u32>, 4>(wq(m, base), wq(m, base + 1u), wq(m, base + 2u), wq(m, base + 3u));
#endif
#if W_BF16
    let base = (r * L.x + kb * 16u) >> 2u;
    o.q = array<vec4<u32>, 4>(wq(m, base), wq(m, base + 1u), wq(m, base + 2u), wq(m, base + 3u));
#endif
#if W_Q8_0
    let b = r * L.x + kb;
    o.q[0] = wq(m, b * 2u);
    o.q[1] = wq(m, b * 2u + 1u);
    o.s = ww(m, L.y + (b >> 1u)) >> (16u * (b & 1u));
#endif
#if W_Q4_0
    let b = r * L.x + kb;
    o.q[0] = wq(m, b);
    o.s = ww(m, L.y + (b >> 1u)) >> (16u * (b & 1u));
#endif
#if W_Q4_1
    let b = r * L.x + kb;
    o.q[0] = wq(m, b);
    o.s = ww(m, L.y + b);
#endif
    return o;
}

// The 32 values of a block, elements 4j..4j+3 in entry j.
fn w_block_decode(b: WBlock) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
#if W_F16
    for (var j = 0u; j < 8u; j++) {
        let w = b.q[j / 2u];
        let i = (j % 2u) * 2u;
        o[j] = vec4<f32>(unpack2x16float(w[i]), unpack2x16float(w[i + 1u]));
    }
#endif
#if W_BF16
    for (var j = 0u; j < 8u; j++) {
        let w = b.q[j / 2u];
        let i = (j % 2u) * 2u;
        let q = vec4<u32>(w[i], w[i], w[i + 1u], w[i + 1u]);
        o[j] = bitcast<vec4<f32>>(select(q << vec4<u32>(16u), q & vec4<u32>(0xffff0000u), vec4<bool>(false, true, false, true)));
    }
#endif
#if W_Q8_0
    let d = unpack2x16float(b.s).x;
    for (var j = 0u; j < 8u; j++) {
        o[j] = d * i8x4(b.q[j / 4u][j % 4u]);
    }
#endif
#if W_Q4_0
    let d = unpack2x16float(b.s).x;
    for (var j = 0u; j < 4u; j++) {
        o[j] = d * lo4(b.q[0][j], 8.0);
        o[j + 4u] = d * hi4(b.q[0][j], 8.0);
    }
#endif
#if W_Q4_1
    let dm = unpack2x16float(b.s);
    for (var j = 0u; j < 4u; j++) {
        o[j] = dm.x * lo4(b.q[0][j], 0.0) + dm.y;
        o[j + 4u] = dm.x * hi4(b.q[0][j], 0.0) + dm.y;
    }
#endif
    return o;
}
