// Merges the partials of the splits in use for each (query, head) into the attention output:
// M = max m_s, L = sum l_s e^(m_s - M), out = sum o_s e^(m_s - M) / L.
//
// Decoding at a long context has one query but up to 64 splits per head; one workgroup per
// head looping over them was latency-bound (32 workgroups for 32 heads, 8 dependent rounds
// of loads per invocation: ~11.6 us per layer on an H100). So the work is spread two ways:
// - a workgroup makes a slice of LANES output values of one head (lane = value): a head of
//   128 values gets 4 workgroups (AttentionKernels::merge_groups);
// - in it, GROUPS groups of LANES invocations each merge their own splits (group g takes
//   g, g + GROUPS, ..., PER of them), then group 0 merges the GROUPS results, the same
//   way, from workgroup memory.
// With GROUPS = PER = 8, 64 splits cost each invocation one round of 8 independent loads
// of o (plus the splits' m and l, one address for the whole group: broadcasts). Partials of
// one split (decode on a one-core CPU adapter; prefill's one split is written out by attend
// itself) use GROUPS = PER = 1, so that no group idles. Both are pipeline
// constants; GROUPS * PER >= n_splits.
// Q8_OUT (hd a multiple of LANES): the output is quantized to 8 bits for the integer-dot Wo
// product, in quantize_q8.wgsl's layout (query t at word t * q8_stride); a workgroup's
// slice is exactly one 32-value block, so the quantization costs no dispatch of its own.

struct Params {
    n_heads: u32,
    hd: u32,
    n_splits: u32,
    q8_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> state: array<u32>;
@group(0) @binding(2) var<storage, read> part: array<f32>;
#if Q8_OUT
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
var<workgroup> v_sh: array<f32, LANES>;
#else
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
#endif

// Keys per attend tile: attend.wgsl uses at most one split per tile.
const TILE: u32 = 64u;
// Output values per workgroup, one per lane: a group of 32 loads 128 contiguous bytes.
const LANES: u32 = 32u;
override GROUPS: u32 = 8u;
override PER: u32 = 8u;
// Upper bounds of GROUPS and PER (sizes of the arrays below).
const MAX_GROUPS: u32 = 8u;
const MAX_PER: u32 = 8u;

var<workgroup> o_sh: array<f32, 256>; // MAX_GROUPS * LANES
var<workgroup> m_sh: array<f32, MAX_GROUPS>;
var<workgroup> l_sh: array<f32, MAX_GROUPS>;

@compute @workgroup_size(LANES * GROUPS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let t = wid.z;
    if (t >= state[1]) { return; }
    let n_keys = state[0] + t + 1u;
    let used = min(p.n_splits, (n_keys + TILE - 1u) / TILE);
    let stride = p.hd + 2u;
    let base = (t * p.n_heads + h) * p.n_splits * stride;
    let lane = lid % LANES;
    let g = lid / LANES;
    let d = wid.x * LANES + lane;
    // Lanes past hd (hd not a multiple of LANES) read a valid value and store nothing.
    let dc = min(d, p.hd - 1u);

    // All loads first, none depending on another, so that they overlap (a loop loading one
    // split at a time waits for each in turn). Splits past `used` read split used - 1
    // (finite) and weigh 0, so the loop has a fixed count and needs no branches.
    var o: array<f32, MAX_PER>;
    var m: array<f32, MAX_PER>;
    var l: array<f32, MAX_PER>;
    for (var j = 0u; j < PER; j++) {
        let at = base + min(g + j * GROUPS, used - 1u) * stride;
        o[j] = part[at + dc];
        m[j] = part[at + p.hd];
        l[j] = part[at + p.hd + 1u];
    }
    // Splits not in use or without keys (l == 0) are ignored. A group with none of either
    // leaves l = 0, and group 0 ignores it in turn.
    var mx = -3.0e38;
    for (var j = 0u; j < PER; j++) {
        if (g + j * GROUPS < used && l[j] > 0.0) { mx = max(mx, m[j]); }
    }
    var lsum = 0.0;
    var acc = 0.0;
    for (var j = 0u; j < PER; j++) {
        let w = select(0.0, exp(m[j] - mx), g + j * GROUPS < used && l[j] > 0.0);
        lsum += w * l[j];
        acc += w * o[j];
    }
    o_sh[lid] = acc;
    if (lane == 0u) {
        m_sh[g] = mx;
        l_sh[g] = lsum;
    }
    workgroupBarrier();
    if (g == 0u && d < p.hd) {
        // The groups' maxima and sums in workgroup memory: broadcast reads.
        var gmx = -3.0e38;
        for (var k = 0u; k < GROUPS; k++) {
            if (l_sh[k] > 0.0) { gmx = max(gmx, m_sh[k]); }
        }
        var gl = 0.0;
        var go = 0.0;
        for (var k = 0u; k < GROUPS; k++) {
            let w = select(0.0, exp(m_sh[k] - gmx), l_sh[k] > 0.0);
            gl += w * l_sh[k];
            go += w * o_sh[k * LANES + lane];
        }
#if Q8_OUT
        v_sh[lane] = go / gl;
#else
        out[(t * p.n_heads + h) * p.hd + d] = go / gl;
#endif
    }
#if Q8_OUT
    workgroupBarrier();
    // Invocation i < 8 packs values 4i .. 4i + 3; each finds the block's maximum itself
    // (32 broadcast reads), invocation 0 also the sum of the bytes.
    if (lid < 8u) {
        var amax = 0.0;
        for (var j = 0u; j < LANES; j++) { amax = max(amax, abs(v_sh[j])); }
        let inv = select(0.0, 127.0 / amax, amax > 0.0);
        let q = vec4<i32>(round(vec4<f32>(v_sh[4u * lid], v_sh[4u * lid + 1u], v_sh[4u * lid + 2u], v_sh[4u * lid + 3u]) * inv));
        let k = p.n_heads * p.hd;
        let blk = (h * p.hd) / LANES + wid.x;
        let dst = t * p.q8_stride;
        out[dst + blk * 8u + lid] = pack4xI8(q);
        if (lid == 0u) {
            var qsum = 0;
            for (var j = 0u; j < LANES; j++) { qsum += i32(round(v_sh[j] * inv)); }
            let d = amax / 127.0;
            out[dst + k / 4u + blk * 2u] = bitcast<u32>(d);
            out[dst + k / 4u + blk * 2u + 1u] = bitcast<u32>(d * f32(qsum));
        }
    }
#endif
}
