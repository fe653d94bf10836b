// Embedding gather for one matrix chunk: out[t, :] = E[tokens[tok_off + t], :] for t < n,
// dequantized to f32. A chunk writes the tokens whose id falls in its rows; the last chunk
// (last != 0) also writes zeros for ids past the end of the matrix. One workgroup per token.

struct Params {
    n: u32,
    tok_off: u32,
    cols: u32,
    row_start: u32,
    rows: u32,
    last: u32,
    w_stride: u32,
    w_scale: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> W: array<vec4<u32>>;

fn w_layout(m: u32) -> vec2<u32> {
    return vec2<u32>(p.w_stride, p.w_scale);
}

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * 65535u;
    if (t >= p.n) { return; }
    let id = tokens[p.tok_off + t];
    let o = t * p.cols;
    if (id >= p.row_start && id - p.row_start < p.rows) {
        let r = id - p.row_start;
        for (var c = lid; c < p.cols; c += WG) {
            out[o + c] = w_elem(0u, r, c);
        }
    } else if (p.last != 0u && id >= p.row_start) {
        for (var c = lid; c < p.cols; c += WG) {
            out[o + c] = 0.0;
        }
    }
}
