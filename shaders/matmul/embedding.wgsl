// Embedding gather for one matrix chunk: out[t, :] = E[tokens[tok_off + t], :] for t < n,
// dequantized to f32. A chunk writes the tokens whose id falls in its rows; the last chunk
// (last != 0) also writes zeros for ids past the end of the matrix.
// Workgroup (column block x, token y + 65535 z): COLS columns of one token, COLS / 64 per
// invocation, all loaded before any is stored. One workgroup per token walking the row took
// ~28 us for a 4096-wide row on an H100 (a memory latency per 64 columns), in a decode step
// of ~2.6 ms.

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
const PER: u32 = 4u;
const COLS: u32 = WG * PER;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y + wid.z * 65535u;
    if (t >= p.n) { return; }
    let id = tokens[p.tok_off + t];
    let o = t * p.cols;
    let c0 = wid.x * COLS + lid;
    if (id >= p.row_start && id - p.row_start < p.rows) {
        let r = id - p.row_start;
        var v: array<f32, PER>;
        for (var j = 0u; j < PER; j++) {
            v[j] = w_elem(0u, r, min(c0 + j * WG, p.cols - 1u));
        }
        for (var j = 0u; j < PER; j++) {
            let c = c0 + j * WG;
            if (c < p.cols) { out[o + c] = v[j]; }
        }
    } else if (p.last != 0u && id >= p.row_start) {
        for (var j = 0u; j < PER; j++) {
            let c = c0 + j * WG;
            if (c < p.cols) { out[o + c] = 0.0; }
        }
    }
}
