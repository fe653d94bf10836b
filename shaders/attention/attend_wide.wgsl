// Decode attention over short splits: the query heads of one KV head (up to four, one vec4
// component each, as attend_group.wgsl) over a split of 64-key tiles, with 256 invocations,
// so that every key and value word of a tile is requested in one round of loads before any
// is used. With 64 invocations (attend.wgsl, attend_group.wgsl) a tile takes two rounds of
// key loads after the query and two of values after the softmax. Decode uses it where the
// splits are too many to merge inside attention (attend_merge.wgsl) and shorter than the
// head-group kernel's (AttentionKernels::decode_kind): on an H100 (benches/RESULTS.md, round
// 13), 8B at 16 splits of 64 keys 6.1 us against 7.5 per head. A version that merged its own
// splits did not beat the per-head kernel's merge in a real step.
//
// Layouts (HD4 = head_dim / 4 words; head_dim 128, or 64 with HD64):
// - scores: invocation = key * 4 + quarter; quarter q dots words q, q + 4, .. of its key
//   (HD4 / 4 of them) with the four queries; the four partial dots meet in workgroup memory.
// - values: invocation = key group * HD4 + word; key group g sums keys g, g + NKG, ..
//   (NKG = 256 / HD4 groups of HD4 / 4 keys); the groups meet in workgroup memory.
// With NEW_KV the step's own key and value (position pos, not yet in the cache) are rotated
// into workgroup memory with the queries and selected in place of the cache row where the
// tile has them; the first head group of each KV head appends them to the cache, and no
// workgroup reads a cache row at pos.
//
// Every loop over a register array has a constant bound and no barrier inside: NVIDIA's
// compiler then unrolls it and keeps the array in registers. (A first version sized them
// with an override constant and wrote the partials in a loop with barriers: 2x slower.)
//
// Parameters, bindings and helpers: attend_common.wgsl; wg_max4 / wg_sum4: reduce.wgsl.

#if HD64
const HD4: u32 = 16u;
#else
const HD4: u32 = 32u;
#endif
const WIDE: u32 = 256u;
const HPW: u32 = 4u;
// Key words per invocation and keys per value group (both HD4 / 4).
const KPI: u32 = HD4 / 4u;
const NKG: u32 = WIDE / HD4;

// Scaled queries [head][word]; absent heads are zero.
var<workgroup> q_sh: array<vec4<f32>, 128>;
// Softmax weights of the tile's keys (one component per head).
var<workgroup> p_sh: array<vec4<f32>, 64>;
// Partial dots [invocation]; key-group outputs of two heads [head % 2][invocation].
var<workgroup> x_sh: array<vec4<f32>, 512>;
#if NEW_KV
// The step's key and value of this KV head, as the cache will hold them.
var<workgroup> new_k_sh: array<vec4<f32>, HD4>;
var<workgroup> new_v_sh: array<vec4<f32>, HD4>;
#endif

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
    let s = wid.y;
    let t = wid.z;
    if (t >= state[1]) { return; }
    let range = split_keys(s, t);
    if (range.x >= range.y) { return; }
    let k0 = range.x;
    let k1 = range.y;
    let hg = head_group(wid.x);
    let kh = hg.kh;
    let h0 = hg.h0;
    let nh = hg.nh;
    let pos = state[0] + t;
    if (lid < HPW * HD4) {
        let hi = lid / HD4;
        var v = vec4<f32>(0.0);
        if (hi < nh) { v = query4(t, h0 + hi, lid % HD4, pos) * p.scale; }
        q_sh[lid] = v;
    }
#if NEW_KV
    if (lid >= HPW * HD4 && lid < (HPW + 1u) * HD4) {
        new_k_sh[lid % HD4] = new_key4(t, kh, lid % HD4, pos);
    } else if (lid >= (HPW + 1u) * HD4 && lid < (HPW + 2u) * HD4) {
        new_v_sh[lid % HD4] = new_value4(t, kh, lid % HD4);
    }
    // Keys the cache holds for this split (those before pos).
    let kcc = min(k1, pos);
#else
    let kcc = k1;
#endif
    let row0 = kh * p.max_ctx;
    let kj = lid / 4u;
    let quarter = lid % 4u;
    let dg = lid % HD4;
    let kg = lid / HD4;
    var m = vec4<f32>(NEG);
    var l = vec4<f32>(0.0);
    var o = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var tile = k0; tile < k1; tile += WG) {
        // Every load of the tile first: keys and values past the cached ones read the last
        // cached row (masked or replaced below).
        // Held as stored, half the registers of f32 words: a version that also merged its
        // splits took 11.5 us alone with f32 words and 9.8 with these (8B, 16 splits).
        var kw: array<KvWord, KPI>;
        var vw: array<KvWord, KPI>;
        if (tile < kcc) {
            let kb = (row0 + min(tile + kj, kcc - 1u)) * HD4 + quarter;
            let vb = (row0 + tile) * HD4 + dg;
            let vlast = kcc - 1u - tile;
            for (var e = 0u; e < KPI; e++) {
                kw[e] = k_cache[kb + 4u * e];
                vw[e] = v_cache[vb + min(kg + NKG * e, vlast) * HD4];
            }
        }
        workgroupBarrier();
        var acc = vec4<f32>(0.0);
        for (var e = 0u; e < KPI; e++) {
            let d = quarter + 4u * e;
#if NEW_KV
            let k = select(kv_unpack(kw[e]), new_k_sh[d], tile + kj == pos);
#else
            let k = kv_unpack(kw[e]);
#endif
            acc += vec4<f32>(dot(q_sh[d], k), dot(q_sh[HD4 + d], k), dot(q_sh[2u * HD4 + d], k), dot(q_sh[3u * HD4 + d], k));
        }
        x_sh[lid] = acc;
        workgroupBarrier();
        let j = tile + lid;
        var score = vec4<f32>(NEG);
        if (lid < WG && j < k1) {
            let b = lid * 4u;
            score = (x_sh[b] + x_sh[b + 1u]) + (x_sh[b + 2u] + x_sh[b + 3u]);
        }
        let m_new = max(m, wg_max4(score, lid, WG, sgs, sgl));
        let pj = select(vec4<f32>(0.0), exp(score - m_new), lid < WG && j < k1);
        let corr = exp(m - m_new);
        l = l * corr + wg_sum4(pj, lid, WG, sgs, sgl);
        if (lid < WG) { p_sh[lid] = pj; }
        workgroupBarrier();
        for (var i = 0u; i < HPW; i++) { o[i] *= corr[i]; }
        for (var e = 0u; e < KPI; e++) {
            // Keys past the split weigh 0 (p_sh is 0 there).
            let pw = p_sh[kg + NKG * e];
#if NEW_KV
            let v = select(kv_unpack(vw[e]), new_v_sh[dg], tile + kg + NKG * e == pos);
#else
            let v = kv_unpack(vw[e]);
#endif
            o[0] += pw.x * v;
            o[1] += pw.y * v;
            o[2] += pw.z * v;
            o[3] += pw.w * v;
        }
        m = m_new;
    }
#if NEW_KV
    // The first head group of each KV head appends the step's key and value (hd / 4 words).
    if (k1 > pos && hg.first && lid < HD4 && pos < p.max_ctx) { store_new_kv(t, kh, lid, pos); }
#endif
    put_pair(o[0], o[1], 0u, t, h0, nh, s, lid);
    put_pair(o[2], o[3], 2u, t, h0, nh, s, lid);
    if (lid < nh) {
        let out = ((t * p.n_heads + h0 + lid) * p.n_splits + s) * (p.hd + 2u);
        put_part(out + p.hd, m[lid]);
        put_part(out + p.hd + 1u, l[lid]);
    }
}

// Partial outputs of heads i0 and i0 + 1 (this invocation's key-group sums o0, o1): the key
// groups meet in x_sh.
fn put_pair(o0: vec4<f32>, o1: vec4<f32>, i0: u32, t: u32, h0: u32, nh: u32, s: u32, lid: u32) {
    workgroupBarrier();
    x_sh[lid] = o0;
    x_sh[WIDE + lid] = o1;
    workgroupBarrier();
    let i = i0 + lid / HD4;
    let dg = lid % HD4;
    if (lid < 2u * HD4 && i < nh) {
        var sum = vec4<f32>(0.0);
        let b = (lid / HD4) * WIDE + dg;
        for (var g = 0u; g < NKG; g++) { sum += x_sh[b + g * HD4]; }
        let out = ((t * p.n_heads + h0 + i) * p.n_splits + s) * (p.hd + 2u);
        for (var c = 0u; c < 4u; c++) { put_part(out + dg * 4u + c, sum[c]); }
    }
}
