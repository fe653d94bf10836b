// Rotary position embedding (rotate-half pairing: element i pairs with i + hd/2) of the new
// tokens' queries and keys, and the append of their keys and values to the cache.
// Input: one row per token of [q heads | k heads | v heads] (one fused QKV product).
// Output: rotated queries [token][head][hd]; keys and values into the cache.
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
@group(0) @binding(3) var<storage, read> qkv: array<f32>;
@group(0) @binding(4) var<storage, read_write> q: array<f32>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<KvWord>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<KvWord>;

fn rotate(x0: vec4<f32>, x1: vec4<f32>, pos: u32, i: u32) -> array<vec4<f32>, 2> {
    let cs = rope_cos_sin(pos, i, p.hd / 2u);
    return array<vec4<f32>, 2>(x0 * cs[0] - x1 * cs[1], x1 * cs[0] + x0 * cs[1]);
}

fn load4(base: u32) -> vec4<f32> {
    return vec4<f32>(qkv[base], qkv[base + 1u], qkv[base + 2u], qkv[base + 3u]);
}

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let head = wid.y;
    if (t >= state[1]) { return; }
    let pos = state[0] + t;
    if (pos >= p.max_ctx) { return; }
    let half_d = p.hd / 2u;
    let row = t * (p.n_heads + 2u * p.n_kv) * p.hd;
    // Each invocation rotates four consecutive pairs.
    if (head < p.n_heads) {
        let src = row + head * p.hd;
        let dst = (t * p.n_heads + head) * p.hd;
        for (var i = lid * 4u; i < half_d; i += 128u) {
            let r = rotate(load4(src + i), load4(src + i + half_d), pos, i);
            for (var j = 0u; j < 4u; j++) {
                q[dst + i + j] = r[0][j];
                q[dst + i + half_d + j] = r[1][j];
            }
        }
        return;
    }
    let kh = head - p.n_heads;
    let k_src = row + (p.n_heads + kh) * p.hd;
    let v_src = row + (p.n_heads + p.n_kv + kh) * p.hd;
    let dst = (kh * p.max_ctx + pos) * p.hd;
    for (var i = lid * 4u; i < half_d; i += 128u) {
        let r = rotate(load4(k_src + i), load4(k_src + i + half_d), pos, i);
        k_cache[(dst + i) / 4u] = kv_pack(r[0]);
        k_cache[(dst + i + half_d) / 4u] = kv_pack(r[1]);
    }
    for (var i = lid * 4u; i < p.hd; i += 128u) {
        v_cache[(dst + i) / 4u] = kv_pack(load4(v_src + i));
    }
}
