// Merges the partials of the splits in use for each (query, head) into the attention output:
// M = max m_s, L = sum l_s e^(m_s - M), out = sum o_s e^(m_s - M) / L.
// The per-split weights e^(m_s - M) / L go to workgroup memory first, so the output loop is
// branch-free and its loads independent of one another (no load waits on a loaded test).

struct Params {
    n_heads: u32,
    hd: u32,
    n_splits: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> state: array<u32>;
@group(0) @binding(2) var<storage, read> part: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// Keys per attend tile: attend.wgsl uses at most one split per tile.
const TILE: u32 = 64u;
// At most this many splits (AttentionKernels::MAX_SPLITS).
var<workgroup> m_sh: array<f32, 64>;
var<workgroup> l_sh: array<f32, 64>;
var<workgroup> w_sh: array<f32, 64>;

// Splits whose output values each invocation loads at once: independent loads overlap
// instead of each waiting for the last (a plain loop over 16 splits cost ~10 us on an H200).
const BATCH: u32 = 8u;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t = wid.y;
    if (t >= state[1]) { return; }
    let n_keys = state[0] + t + 1u;
    let used = min(p.n_splits, (n_keys + TILE - 1u) / TILE);
    let stride = p.hd + 2u;
    let base = (t * p.n_heads + h) * p.n_splits * stride;
    if (lid < used) {
        m_sh[lid] = part[base + lid * stride + p.hd];
        l_sh[lid] = part[base + lid * stride + p.hd + 1u];
    }
    workgroupBarrier();
    // Every invocation reduces the (at most 64) values itself: broadcast reads, no barriers.
    var mx = -3.0e38;
    for (var s = 0u; s < used; s++) {
        if (l_sh[s] > 0.0) { mx = max(mx, m_sh[s]); }
    }
    var l = 0.0;
    for (var s = 0u; s < used; s++) {
        if (l_sh[s] > 0.0) { l += l_sh[s] * exp(m_sh[s] - mx); }
    }
    // Weights of unused splits are 0, so the batched loop below needs no tests.
    if (lid < 64u) {
        w_sh[lid] = select(0.0, exp(m_sh[lid] - mx) / l, lid < used && l_sh[lid] > 0.0);
    }
    workgroupBarrier();
    for (var d = lid; d < p.hd; d += 128u) {
        var acc = 0.0;
        for (var s0 = 0u; s0 < used; s0 += BATCH) {
            // Splits past `used` read split used - 1 (finite) and weigh 0.
            var v: array<f32, BATCH>;
            for (var j = 0u; j < BATCH; j++) {
                v[j] = part[base + min(s0 + j, used - 1u) * stride + d];
            }
            for (var j = 0u; j < BATCH; j++) {
                acc += w_sh[min(s0 + j, 63u)] * v[j];
            }
        }
        out[(t * p.n_heads + h) * p.hd + d] = acc;
    }
}
