// Quantizes f32 vectors to 8 bits per 32-element block for the integer-dot products
// (matvec.wgsl with XQ8):
//   d = max |x_i| / 127 over the block, q_i = round(x_i / d), s = d * sum q_i.
// Vector v is written at word v * p.stride of xq: k / 4 words of q (four per word, element
// 4j + i in byte i of word j, as pack4xI8 packs them), then per block the bits of d and s
// (two f32 words). s lets a product with an offset weight format (Q4_0's -8, Q4_1's m) apply
// the offset once per block.
// NORM: the vector is first RMS-normalised with weight g (the norm in front of a layer's
// products, fused here so that it costs no dispatch of its own). Every workgroup sums the
// squares of the whole vector itself; vectors are short (<= 16K) and the sums are cheap next
// to a dispatch.
// LAST: one vector, the step's last row of x (row state[1] - 1): the final norm before the
// LM head.
// One workgroup quantizes WG words (WG / 8 blocks) of one vector: workgroup (i, v).

struct Params { k: u32, stride: u32, eps: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> xq: array<u32>;
#if NORM
@group(0) @binding(3) var<storage, read> g: array<vec4<f32>>;
#endif
#if LAST
@group(0) @binding(4) var<storage, read> state: array<u32>;
#endif

const WG: u32 = 256u;
var<workgroup> blk: array<f32, 256>;

@compute @workgroup_size(256)
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
    let words = p.k / 4u;
#if LAST
    let row = state[1] - 1u;
#else
    let row = wid.y;
#endif
    let src = row * words;
    let dst = wid.y * p.stride;
    let i = wid.x * WG + lid;
    let valid = i < words;
    var a = vec4<f32>(0.0);
    if (valid) { a = x[src + i]; }
#if NORM
    var ss = 0.0;
    for (var j = lid; j < words; j += WG) {
        let b = x[src + j];
        ss += dot(b, b);
    }
    let total = wg_sum(ss, lid, WG, sgs, sgl);
    let scale = inverseSqrt(total / f32(p.k) + p.eps);
    if (valid) { a = a * scale * g[i]; }
#endif
    // The 8 invocations of a block are lanes 8b .. 8b + 7 (k is a multiple of 32, so a block
    // is wholly inside or wholly past the vector).
    let b0 = lid & ~7u;
    let m = abs(a);
    blk[lid] = max(max(m.x, m.y), max(m.z, m.w));
    workgroupBarrier();
    var amax = 0.0;
    for (var j = 0u; j < 8u; j++) { amax = max(amax, blk[b0 + j]); }
    let inv = select(0.0, 127.0 / amax, amax > 0.0);
    let q = vec4<i32>(round(a * inv));
    workgroupBarrier();
    blk[lid] = f32((q.x + q.y) + (q.z + q.w));
    workgroupBarrier();
    var qsum = 0.0;
    for (var j = 0u; j < 8u; j++) { qsum += blk[b0 + j]; }
    if (valid) {
        xq[dst + i] = pack4xI8(q);
        if ((lid & 7u) == 0u) {
            let d = amax / 127.0;
            let at = dst + words + (i / 8u) * 2u;
            xq[at] = bitcast<u32>(d);
            xq[at + 1u] = bitcast<u32>(d * qsum);
        }
    }
}
