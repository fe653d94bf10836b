// What the two attention kernels share (attend.wgsl: one query head per workgroup;
// attend_group.wgsl: the query heads of one KV head): parameters, bindings, the key range of
// a split and the batched cache loads.

struct Params {
    n_heads: u32,
    n_kv: u32,
    hd: u32,
    max_ctx: u32,
    n_splits: u32,
    scale: f32,
    // Words per query of the 8-bit merged output (MERGE_LAST with Q8_OUT).
    q8_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// state[0]: position of the step's first token, state[1]: tokens in the step.
@group(0) @binding(1) var<storage, read> state: array<u32>;
#if FINAL
// One split (prefill): the attention output itself, o / l as [t][h][hd], which is what
// attn_merge.wgsl makes of one split, bit for bit; so no merge dispatch follows.
@group(0) @binding(5) var<storage, read_write> attn_out: array<f32>;
#else
// [t][h][s][hd + 2]: o[0..hd], m, l
#if MERGE_LAST
// Atomic words (f32 bits), for attend_merge.wgsl: the last workgroup of a head reads partials
// that other workgroups wrote in the same dispatch, and atomic accesses are coherent across
// the device by definition, where plain ones may be served by a per-core cache.
@group(0) @binding(5) var<storage, read_write> part: array<atomic<u32>>;

fn put_part(i: u32, v: f32) {
    atomicStore(&part[i], bitcast<u32>(v));
}
#else
@group(0) @binding(5) var<storage, read_write> part: array<f32>;

fn put_part(i: u32, v: f32) {
    part[i] = v;
}
#endif
#endif
#if NEW_KV
// Decode with the rotary embedding and the cache append fused in (no rope_kv dispatch): the
// step's one token arrives as the QKV product's row [q heads | k heads | v heads]. Every
// workgroup rotates its queries itself; the new key and value are rotated and rounded where
// they are used, never read back from the cache, and one workgroup per KV head stores them,
// so no workgroup reads a cache row that another writes in the same dispatch.
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<KvWord>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<KvWord>;
// cos and sin of position * inverse frequency, [max_ctx][hd / 2] (as rope_kv.wgsl).
@group(0) @binding(6) var<storage, read> rope: array<vec2<f32>>;
#else
// Rotated queries [t][h][hd] (rope_kv.wgsl wrote them and the step's keys and values).
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<KvWord>;
@group(0) @binding(4) var<storage, read> v_cache: array<KvWord>;
#endif

const WG: u32 = 64u;
const NEG: f32 = -1e30;
// Loads issued per round before any is used: KW words of each of an invocation's four keys,
// VB keys' values. With loops over the head dimension or the tile's keys (dynamic bounds, not
// unrolled) each load waited for the one before, ~40 memory latencies per 64-key tile.
const KW: u32 = 4u;
const VB: u32 = 16u;

// Keys k0..k1 of split s for query t (k0 == k1: nothing to do). Splits in use take at least
// one tile of keys each, so short contexts spread over as many workgroups as they have tiles
// instead of leaving most splits empty (attn_merge computes the same count).
fn split_keys(s: u32, t: u32) -> vec2<u32> {
    let n_keys = state[0] + t + 1u;
    let used = min(p.n_splits, (n_keys + WG - 1u) / WG);
    if (s >= used) { return vec2<u32>(0u); }
    let chunk = (n_keys + used - 1u) / used;
    let k0 = min(s * chunk, n_keys);
    return vec2<u32>(k0, min(k0 + chunk, n_keys));
}

// Head group g (the workgroup's x index) of the kernels that take the query heads of one KV
// head four at a time, one vec4 component each (attend_group.wgsl, attend_wide.wgsl): KV
// head kh, query heads h0 .. h0 + nh (nh 1 to 4); `first` for the first group of kh.
struct HeadGroup {
    kh: u32,
    h0: u32,
    nh: u32,
    first: bool,
}

fn head_group(g: u32) -> HeadGroup {
    let group = p.n_heads / p.n_kv;
    let n_hg = (group + 3u) / 4u;
    let kh = g / n_hg;
    let h0 = kh * group + (g % n_hg) * 4u;
    return HeadGroup(kh, h0, min(4u, (kh + 1u) * group - h0), g % n_hg == 0u);
}

// Words d0, d0 + 4, .. of this invocation's four keys of the tile (key g * 16 + lid / 4, as
// entries g * KW ..): keys past k1 read key k1 - 1 and words past the row its last word, for
// the caller to mask.
fn key_words(row0: u32, tile: u32, k1: u32, lid: u32, d0: u32, hd4: u32) -> array<vec4<f32>, 4 * KW> {
    var kw: array<vec4<f32>, 4 * KW>;
    for (var g = 0u; g < 4u; g++) {
        let kb = (row0 + min(tile + g * 16u + lid / 4u, k1 - 1u)) * hd4;
        for (var e = 0u; e < KW; e++) {
            kw[g * KW + e] = kv_unpack(k_cache[kb + min(d0 + 4u * e, hd4 - 1u)]);
        }
    }
    return kw;
}

// Values (word vb of each row) of tile keys j0, j0 + stride, ..: keys at or past n read key
// n - 1, for the caller to weigh 0.
fn value_words(vb: u32, j0: u32, stride: u32, n: u32, hd4: u32) -> array<vec4<f32>, VB> {
    var vw: array<vec4<f32>, VB>;
    for (var u = 0u; u < VB; u++) {
        vw[u] = kv_unpack(v_cache[vb + min(j0 + u * stride, n - 1u) * hd4]);
    }
    return vw;
}

#if NEW_KV
fn qkv4(b: u32) -> vec4<f32> {
    return vec4<f32>(qkv[b], qkv[b + 1u], qkv[b + 2u], qkv[b + 3u]);
}

// Start of head `head` in token t's QKV row (q heads first, then k, then v).
fn qkv_head(t: u32, head: u32) -> u32 {
    return (t * (p.n_heads + 2u * p.n_kv) + head) * p.hd;
}

// Word w (< hd / 4) of head `head` of token t's QKV row, rotated rotate-half style for
// position pos: element i pairs with i + hd / 2 (hd % 8 == 0, so a word never straddles the
// halves).
fn rotated4(t: u32, head: u32, w: u32, pos: u32) -> vec4<f32> {
    let half4 = p.hd / 8u;
    let i = (w % half4) * 4u;
    let src = qkv_head(t, head);
    let x0 = qkv4(src + i);
    let x1 = qkv4(src + i + p.hd / 2u);
    let cs = rope_cos_sin(pos, i, p.hd / 2u);
    if (w < half4) { return x0 * cs[0] - x1 * cs[1]; }
    return x1 * cs[0] + x0 * cs[1];
}

// Word w of query head h of the step's token (at pos), unscaled.
fn query4(t: u32, h: u32, w: u32, pos: u32) -> vec4<f32> {
    return rotated4(t, h, w, pos);
}

// Word w of token t's new key / value of KV head kh, as the cache holds them (f16).
fn new_key4(t: u32, kh: u32, w: u32, pos: u32) -> vec4<f32> {
    return kv_unpack(kv_pack(rotated4(t, p.n_heads + kh, w, pos)));
}
fn new_value4(t: u32, kh: u32, w: u32) -> vec4<f32> {
    return kv_unpack(kv_pack(qkv4(qkv_head(t, p.n_heads + p.n_kv + kh) + w * 4u)));
}

// Writes word w of KV head kh's cache row at pos.
fn store_kv_word(kh: u32, w: u32, pos: u32, k: KvWord, v: KvWord) {
    let row = (kh * p.max_ctx + pos) * (p.hd / 4u);
    k_cache[row + w] = k;
    v_cache[row + w] = v;
}

// Appends word w of token t's new key and value of KV head kh at pos (one workgroup per KV
// head calls this).
fn store_new_kv(t: u32, kh: u32, w: u32, pos: u32) {
    store_kv_word(kh, w, pos, kv_pack(rotated4(t, p.n_heads + kh, w, pos)), kv_pack(qkv4(qkv_head(t, p.n_heads + p.n_kv + kh) + w * 4u)));
}
#else
fn query4(t: u32, h: u32, w: u32, pos: u32) -> vec4<f32> {
    let b = (t * p.n_heads + h) * p.hd + w * 4u;
    return vec4<f32>(q[b], q[b + 1u], q[b + 2u], q[b + 3u]);
}
#endif
