// Merges the partials of all splits of each (query, head) into the attention output:
// M = max m_s, L = sum l_s e^(m_s - M), out = sum o_s e^(m_s - M) / L.

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

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t = wid.y;
    if (t >= state[1]) { return; }
    let stride = p.hd + 2u;
    let base = (t * p.n_heads + h) * p.n_splits * stride;
    var mx = -3.0e38;
    for (var s = 0u; s < p.n_splits; s++) {
        if (part[base + s * stride + p.hd + 1u] > 0.0) {
            mx = max(mx, part[base + s * stride + p.hd]);
        }
    }
    var l = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        let ls = part[base + s * stride + p.hd + 1u];
        if (ls > 0.0) { l += ls * exp(part[base + s * stride + p.hd] - mx); }
    }
    let inv = 1.0 / l;
    for (var d = lid; d < p.hd; d += 64u) {
        var acc = 0.0;
        for (var s = 0u; s < p.n_splits; s++) {
            let b = base + s * stride;
            if (part[b + p.hd + 1u] > 0.0) { acc += part[b + d] * exp(part[b + p.hd] - mx); }
        }
        out[(t * p.n_heads + h) * p.hd + d] = acc * inv;
    }
}
