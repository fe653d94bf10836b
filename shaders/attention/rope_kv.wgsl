// Rotary position embedding (rotate-half pairing: element i pairs with i + hd/2) on the new
// tokens' queries (in place) and keys, and the append of their keys and values to the cache.
// One workgroup per (token, head); query heads first, then key/value heads.

struct Params {
    n_heads: u32,
    n_kv: u32,
    hd: u32,
    max_ctx: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// state[0]: position of the step's first token, state[1]: tokens in the step.
@group(0) @binding(1) var<storage, read> state: array<u32>;
// cos and sin of position * inverse frequency, [max_ctx][hd / 2], computed on the CPU in f64
// from the f32 angle, as the reference implementation rounds it; GPU sin/cos lose accuracy on
// the large angles of long contexts.
@group(0) @binding(2) var<storage, read> rope: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> q: array<f32>;
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<KvWord>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<KvWord>;

fn rotate(x0: vec4<f32>, x1: vec4<f32>, pos: u32, i: u32) -> array<vec4<f32>, 2> {
    let b = pos * (p.hd / 2u) + i;
    let cs0 = rope[b];
    let cs1 = rope[b + 1u];
    let cs2 = rope[b + 2u];
    let cs3 = rope[b + 3u];
    let c = vec4<f32>(cs0.x, cs1.x, cs2.x, cs3.x);
    let s = vec4<f32>(cs0.y, cs1.y, cs2.y, cs3.y);
    return array<vec4<f32>, 2>(x0 * c - x1 * s, x1 * c + x0 * s);
}

fn load4(buf_q: bool, base: u32) -> vec4<f32> {
    if (buf_q) {
        return vec4<f32>(q[base], q[base + 1u], q[base + 2u], q[base + 3u]);
    }
    return vec4<f32>(k[base], k[base + 1u], k[base + 2u], k[base + 3u]);
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let head = wid.y;
    if (t >= state[1]) { return; }
    let pos = state[0] + t;
    if (pos >= p.max_ctx) { return; }
    let half_d = p.hd / 2u;
    let is_q = head < p.n_heads;
    // Each invocation rotates four consecutive pairs.
    for (var i = lid * 4u; i < half_d; i += 128u) {
        if (is_q) {
            let base = (t * p.n_heads + head) * p.hd;
            let r = rotate(load4(true, base + i), load4(true, base + i + half_d), pos, i);
            for (var j = 0u; j < 4u; j++) {
                q[base + i + j] = r[0][j];
                q[base + i + half_d + j] = r[1][j];
            }
        } else {
            let kh = head - p.n_heads;
            let base = (t * p.n_kv + kh) * p.hd;
            let r = rotate(load4(false, base + i), load4(false, base + i + half_d), pos, i);
            let row = (kh * p.max_ctx + pos) * p.hd;
            k_cache[(row + i) / 4u] = kv_pack(r[0]);
            k_cache[(row + i + half_d) / 4u] = kv_pack(r[1]);
        }
    }
    if (!is_q) {
        let kh = head - p.n_heads;
        let base = (t * p.n_kv + kh) * p.hd;
        let row = (kh * p.max_ctx + pos) * p.hd;
        for (var i = lid * 4u; i < p.hd; i += 128u) {
            v_cache[(row + i) / 4u] = kv_pack(vec4<f32>(v[base + i], v[base + i + 1u], v[base + i + 2u], v[base + i + 3u]));
        }
    }
}
