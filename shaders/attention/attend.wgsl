// Causal attention of the step's queries over the cache, returned as mergeable partials.
//
// Workgroup (head h, split s, query t): the query at position pos = state[0] + t attends keys
// 0..=pos; split s takes its share of them. It returns the partial (m, l, o): the running max
// of the scores, the softmax denominator relative to m, and the unnormalised output. Partials
// of disjoint key sets merge exactly (attn_merge.wgsl, or attend_merge.wgsl inside decode's
// kernel), which is what lets every KV policy be "produce partials, merge". Decode uses many
// splits (flash-decoding); prefill one, written out as the output itself (FINAL). Splits
// past the number of key tiles return at once and write nothing.
//
// 64 invocations. Scores: four invocations per key, 16 keys at a time, each invocation
// dotting every fourth 4-element word of the key: neighbouring invocations read neighbouring
// words, so a subgroup reads whole consecutive key rows (one key per invocation read a row
// per invocation, 32 strided rows per load, at ~10% of the copy bandwidth). The four
// partial dots meet in workgroup memory. Weighted values: the head dimension in groups of
// four (hd/4 invocations) times 64/(hd/4) groups of keys, summed at the end through
// workgroup memory.
// PREFETCH (head sizes 16, 32 and 64; AttentionKernels::prefetch_supports): an invocation
// loads all of a tile's keys and values it uses (hd/4 words of each, as the cache holds
// them) before it computes, and the first tile's before the query is rotated, so that the
// query, the keys and the values arrive in one memory round trip. Looping over KW and VB
// words at a time, each round waited for the one before, and a decode step's tile is
// usually its split's only one. (At hd 128, 32 words of each, it was slower.)

// FINAL (prefill, one split): the workgroup writes the output o / l instead of its partial.
// Parameters, bindings and the shared helpers: attend_common.wgsl.

var<workgroup> q_sh: array<vec4<f32>, 64>;
var<workgroup> p_sh: array<f32, 64>;
// Partial dots of a tile: [key][quarter].
var<workgroup> s_sh: array<f32, 256>;
var<workgroup> o_sh: array<vec4<f32>, 64>;

#if PREFETCH
// hd / 4, a pipeline constant (so that the loops below unroll and the words stay in registers).
override PF: u32 = 16u;

// Words quarter, quarter + 4, .. of this invocation's four keys of the tile (keys g * 16 +
// lid / 4, at g * PF / 4 ..); keys past kc read key kc - 1, for the caller to mask.
fn tile_keys(row0: u32, tile: u32, kc: u32, lid: u32) -> array<KvWord, 16> {
    var kw: array<KvWord, 16>;
    for (var g = 0u; g < 4u; g++) {
        let kb = (row0 + min(tile + g * 16u + lid / 4u, kc - 1u)) * PF + lid % 4u;
        for (var e = 0u; e < PF / 4u; e++) { kw[g * (PF / 4u) + e] = k_cache[kb + 4u * e]; }
    }
    return kw;
}

// Word lid % PF of the values of tile keys lid / PF + u * (64 / PF) (at u); keys past kc read
// key kc - 1, which weighs 0.
fn tile_values(row0: u32, tile: u32, kc: u32, lid: u32) -> array<KvWord, 16> {
    var vw: array<KvWord, 16>;
    let vb = (row0 + tile) * PF + lid % PF;
    let last = kc - 1u - tile;
    for (var u = 0u; u < PF; u++) { vw[u] = v_cache[vb + min(lid / PF + (WG / PF) * u, last) * PF]; }
    return vw;
}
#endif

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
    let h = wid.x;
    let s = wid.y;
    let t = wid.z;
    if (t >= state[1]) { return; }
    let range = split_keys(s, t);
    if (range.x >= range.y) { return; }
    let k0 = range.x;
    let k1 = range.y;
    let kh = h / (p.n_heads / p.n_kv);
    let hd4 = p.hd / 4u;
    let pos = state[0] + t;
#if NEW_KV
    // The cache holds keys before pos; the new one is added after the tiles.
    let kc = min(k1, pos);
#else
    let kc = k1;
#endif
    let row0 = kh * p.max_ctx;
#if PREFETCH
    var kw: array<KvWord, 16>;
    var vw: array<KvWord, 16>;
    if (k0 < kc) {
        kw = tile_keys(row0, k0, kc, lid);
        vw = tile_values(row0, k0, kc, lid);
    }
#endif
#if NEW_KV
    // The split that ends at pos also takes the new key and value (word lid < hd4 of each),
    // rotated and rounded as the cache will hold them; loaded with the tile.
    var new_k = vec4<f32>(0.0);
    var new_v = vec4<f32>(0.0);
    if (k1 > pos && lid < hd4) {
        new_k = new_key4(t, kh, lid, pos);
        new_v = new_value4(t, kh, lid);
    }
#endif
    if (lid < hd4) {
        q_sh[lid] = query4(t, h, lid, pos) * p.scale;
    }
    workgroupBarrier();

    // Value phase layout: invocation = key group * hd4 + dim group.
    let dg = lid % hd4;
    let kg = lid / hd4;
    let n_kg = WG / hd4;
    var m = NEG;
    var l = 0.0;
    var o = vec4<f32>(0.0);
    for (var tile = k0; tile < kc; tile += WG) {
        // Keys past kc read key kc - 1 (valid) and are masked below.
        let quarter = lid % 4u;
        // The invocation's four keys (one per 16-key pass), KW words of each per round.
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
#if PREFETCH
        if (tile != k0) {
            kw = tile_keys(row0, tile, kc, lid);
            vw = tile_values(row0, tile, kc, lid);
        }
        for (var g = 0u; g < 4u; g++) {
            for (var e = 0u; e < PF / 4u; e++) {
                acc[g] += dot(q_sh[quarter + 4u * e], kv_unpack(kw[g * (PF / 4u) + e]));
            }
        }
#else
        for (var d0 = quarter; d0 < hd4; d0 += 4u * KW) {
            let kw = key_words(row0, tile, kc, lid, d0, hd4);
            for (var g = 0u; g < 4u; g++) {
                for (var e = 0u; e < KW; e++) {
                    let d = d0 + 4u * e;
                    acc[g] += select(0.0, dot(q_sh[min(d, 63u)], kw[g * KW + e]), d < hd4);
                }
            }
        }
#endif
        for (var g = 0u; g < 4u; g++) {
            s_sh[(g * 16u + lid / 4u) * 4u + quarter] = acc[g];
        }
        workgroupBarrier();
        let j = tile + lid;
        var score = NEG;
        if (j < kc) {
            let b = lid * 4u;
            score = (s_sh[b] + s_sh[b + 1u]) + (s_sh[b + 2u] + s_sh[b + 3u]);
        }
        let m_new = max(m, wg_max(score, lid, WG, sgs, sgl));
        var pj = 0.0;
        if (j < kc) { pj = exp(score - m_new); }
        let corr = exp(m - m_new);
        l = l * corr + wg_sum(pj, lid, WG, sgs, sgl);
        p_sh[lid] = pj;
        workgroupBarrier();
        o = o * corr;
#if PREFETCH
        let n = min(WG, kc - tile);
        for (var u = 0u; u < PF; u++) {
            let jj = kg + n_kg * u;
            o += select(0.0, p_sh[min(jj, WG - 1u)], jj < n) * kv_unpack(vw[u]);
        }
#else
        if (kg < n_kg) {
            let n = min(WG, kc - tile);
            let vb = (row0 + tile) * hd4 + dg;
            // VB keys' values per round (those past n weigh 0).
            for (var j0 = kg; j0 < n; j0 += VB * n_kg) {
                let vw = value_words(vb, j0, n_kg, n, hd4);
                for (var u = 0u; u < VB; u++) {
                    let jj = j0 + u * n_kg;
                    o += select(0.0, p_sh[min(jj, WG - 1u)], jj < n) * vw[u];
                }
            }
        }
#endif
        m = m_new;
        workgroupBarrier();
    }
#if NEW_KV
    if (k1 > pos) {
        // The new key and value (this split is the last one).
        var qk = 0.0;
        if (lid < hd4) { qk = dot(q_sh[lid], new_k); }
        let score = wg_sum(qk, lid, WG, sgs, sgl);
        let m_new = max(m, score);
        let corr = exp(m - m_new);
        let pj = exp(score - m_new);
        l = l * corr + pj;
        o = o * corr;
        if (kg == 0u) { o += pj * new_v; }
        m = m_new;
        // One query head per KV head stores the new row (hd / 4 words; packing the rounded
        // words again gives the same bits).
        if (h % (p.n_heads / p.n_kv) == 0u && lid < hd4 && pos < p.max_ctx) {
            store_kv_word(kh, lid, pos, kv_pack(new_k), kv_pack(new_v));
        }
    }
#endif
    o_sh[lid] = o;
    workgroupBarrier();
#if FINAL
    if (lid < hd4) {
        var sum = vec4<f32>(0.0);
        for (var g = 0u; g < n_kg; g++) { sum += o_sh[g * hd4 + lid]; }
        let fo = (t * p.n_heads + h) * p.hd + lid * 4u;
        for (var e = 0u; e < 4u; e++) { attn_out[fo + e] = sum[e] / l; }
    }
#else
    let out = ((t * p.n_heads + h) * p.n_splits + s) * (p.hd + 2u);
    if (lid < hd4) {
        var sum = vec4<f32>(0.0);
        for (var g = 0u; g < n_kg; g++) { sum += o_sh[g * hd4 + lid]; }
        for (var e = 0u; e < 4u; e++) { put_part(out + lid * 4u + e, sum[e]); }
    }
    if (lid == 0u) {
        put_part(out + p.hd, m);
        put_part(out + p.hd + 1u, l);
    }
#endif
#if MERGE_LAST
    merge_if_last(t, h, 1u, lid, sgs, sgl);
#endif
}
