// Causal attention of the step's queries over the cache as mergeable partials, as attend.wgsl
// computes them (same bindings, same partials), for whole groups of query heads.
//
// Workgroup (head group g, split s, query t): up to four query heads that share one KV head
// (grouped-query attention, one vec4 component per head), for the query at position
// pos = state[0] + t over its split of keys 0..=pos. The heads of a group read the same keys
// and values, so the cache is read once per KV head instead of once per query head: with
// per-head workgroups (attend.wgsl), 16K keys of Llama-3-8B's cache were read 4x from memory.
// With short splits the per-head kernel wins (more, smaller workgroups); attention.rs picks.
//
// 64 invocations, the same phases as attend.wgsl: scores with four invocations per key (16
// keys at a time, the four partial dots meeting in workgroup memory), then weighted values
// with the head dimension in groups of four times 64/(hd/4) groups of keys. FINAL: the
// output itself, as in attend.wgsl.

// Parameters, bindings and the shared helpers: attend_common.wgsl; workgroup max / sum of
// vec4s: reduce.wgsl.

// Query heads per workgroup, one per vec4 component.
const HPW: u32 = 4u;

// Scaled queries [head][hd / 4] (64 words per head); absent heads are zero.
var<workgroup> q_sh: array<vec4<f32>, 256>;
// Partial dots of a tile [key][quarter], one component per head; at the end, the outputs of
// the key groups [head][invocation].
var<workgroup> s_sh: array<vec4<f32>, 256>;
var<workgroup> p_sh: array<vec4<f32>, 64>;

@compute @workgroup_size(64)
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
    // This workgroup's query heads: h0 .. h0 + nh, all of KV head kh.
    let hg = head_group(wid.x);
    let kh = hg.kh;
    let h0 = hg.h0;
    let nh = hg.nh;
    let hd4 = p.hd / 4u;
    let pos = state[0] + t;
    for (var i = lid; i < HPW * 64u; i += WG) {
        let hi = i / 64u;
        let d = i % 64u;
        var v = vec4<f32>(0.0);
        if (hi < nh && d < hd4) {
            v = query4(t, h0 + hi, d, pos) * p.scale;
        }
        q_sh[i] = v;
    }
    workgroupBarrier();
#if NEW_KV
    // The cache holds keys before pos; the new one is added after the tiles.
    let kc = min(k1, pos);
#else
    let kc = k1;
#endif

    let row0 = kh * p.max_ctx;
    // Value phase layout: invocation = key group * hd4 + dim group.
    let dg = lid % hd4;
    let kg = lid / hd4;
    let n_kg = WG / hd4;
    var m = vec4<f32>(NEG);
    var l = vec4<f32>(0.0);
    var o = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var tile = k0; tile < kc; tile += WG) {
        // Keys past kc read key kc - 1 (valid) and are masked below.
        let quarter = lid % 4u;
        var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
        for (var d0 = quarter; d0 < hd4; d0 += 4u * KW) {
            let kw = key_words(row0, tile, kc, lid, d0, hd4);
            for (var g = 0u; g < 4u; g++) {
                for (var e = 0u; e < KW; e++) {
                    let d = d0 + 4u * e;
                    let k = select(vec4<f32>(0.0), kw[g * KW + e], d < hd4);
                    let dc = min(d, 63u);
                    acc[g] += vec4<f32>(dot(q_sh[dc], k), dot(q_sh[64u + dc], k), dot(q_sh[128u + dc], k), dot(q_sh[192u + dc], k));
                }
            }
        }
        for (var g = 0u; g < 4u; g++) {
            s_sh[(g * 16u + lid / 4u) * 4u + quarter] = acc[g];
        }
        workgroupBarrier();
        let j = tile + lid;
        var score = vec4<f32>(NEG);
        if (j < kc) {
            let b = lid * 4u;
            score = (s_sh[b] + s_sh[b + 1u]) + (s_sh[b + 2u] + s_sh[b + 3u]);
        }
        let m_new = max(m, wg_max4(score, lid, WG, sgs, sgl));
        let pj = select(vec4<f32>(0.0), exp(score - m_new), j < kc);
        let corr = exp(m - m_new);
        l = l * corr + wg_sum4(pj, lid, WG, sgs, sgl);
        p_sh[lid] = pj;
        workgroupBarrier();
        for (var i = 0u; i < HPW; i++) { o[i] *= corr[i]; }
        if (kg < n_kg) {
            let n = min(WG, kc - tile);
            let vb = (row0 + tile) * hd4 + dg;
            for (var j0 = kg; j0 < n; j0 += VB * n_kg) {
                let vw = value_words(vb, j0, n_kg, n, hd4);
                for (var u = 0u; u < VB; u++) {
                    let jj = j0 + u * n_kg;
                    let pw = select(vec4<f32>(0.0), p_sh[min(jj, WG - 1u)], jj < n);
                    o[0] += pw.x * vw[u];
                    o[1] += pw.y * vw[u];
                    o[2] += pw.z * vw[u];
                    o[3] += pw.w * vw[u];
                }
            }
        }
        m = m_new;
        workgroupBarrier();
    }
#if NEW_KV
    if (k1 > pos) {
        // The new key and value (this split is the last one).
        var qk = vec4<f32>(0.0);
        if (lid < hd4) {
            let k = new_key4(t, kh, lid, pos);
            qk = vec4<f32>(dot(q_sh[lid], k), dot(q_sh[64u + lid], k), dot(q_sh[128u + lid], k), dot(q_sh[192u + lid], k));
        }
        let score = wg_sum4(qk, lid, WG, sgs, sgl);
        let m_new = max(m, score);
        let corr = exp(m - m_new);
        let pj = exp(score - m_new);
        l = l * corr + pj;
        for (var i = 0u; i < HPW; i++) { o[i] *= corr[i]; }
        if (kg == 0u) {
            let v = new_value4(t, kh, dg);
            for (var i = 0u; i < HPW; i++) { o[i] += pj[i] * v; }
        }
        m = m_new;
        // The first head group of each KV head stores the new row (hd / 4 words).
        if (hg.first && lid < hd4 && pos < p.max_ctx) { store_new_kv(t, kh, lid, pos); }
    }
#endif
    for (var i = 0u; i < HPW; i++) { s_sh[i * 64u + lid] = o[i]; }
    workgroupBarrier();
    if (lid < hd4) {
        for (var i = 0u; i < nh; i++) {
            var sum = vec4<f32>(0.0);
            for (var g = 0u; g < n_kg; g++) { sum += s_sh[i * 64u + g * hd4 + lid]; }
#if FINAL
            let fo = (t * p.n_heads + h0 + i) * p.hd + lid * 4u;
            for (var e = 0u; e < 4u; e++) { attn_out[fo + e] = sum[e] / l[i]; }
#else
            let out = ((t * p.n_heads + h0 + i) * p.n_splits + s) * (p.hd + 2u);
            for (var e = 0u; e < 4u; e++) { put_part(out + lid * 4u + e, sum[e]); }
#endif
        }
    }
#if !FINAL
    if (lid == 0u) {
        for (var i = 0u; i < nh; i++) {
            let out = ((t * p.n_heads + h0 + i) * p.n_splits + s) * (p.hd + 2u);
            put_part(out + p.hd, m[i]);
            put_part(out + p.hd + 1u, l[i]);
        }
    }
#endif
#if MERGE_LAST
    merge_if_last(t, h0, nh, lid, sgs, sgl);
#endif
}
