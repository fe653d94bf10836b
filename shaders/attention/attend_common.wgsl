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
}

@group(0) @binding(0) var<uniform> p: Params;
// state[0]: position of the step's first token, state[1]: tokens in the step.
@group(0) @binding(1) var<storage, read> state: array<u32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<KvWord>;
@group(0) @binding(4) var<storage, read> v_cache: array<KvWord>;
// [t][h][s][hd + 2]: o[0..hd], m, l
@group(0) @binding(5) var<storage, read_write> part: array<f32>;

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
