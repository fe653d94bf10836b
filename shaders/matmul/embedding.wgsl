// Embedding gather for one matrix chunk: out[t, :] = E[tokens[tok_off + t], :] for t < n,
// dequantized to f32. A chunk writes the tokens whose id falls in its rows; the last chunk
// (last != 0) also writes zeros for ids past the end of the matrix.
// Workgroup (column block x, token y + 65535 z): COLS columns of one token, COLS / 64 per
// invocation, all loaded before any is stored. One workgroup per token walking the row took
// ~28 us for a 4096-wide row on an H100 (a memory latency per 64 columns), in a decode step
// of ~2.6 ms.
// Q8NORM (cols % 32 == 0): each row also goes out as the first layer's norm input, in the
// layout matvec.wgsl's QNORM writes (MatVec::with_q8_norm_output): the row times the norm
// weight g as 8-bit blocks, then each block's sum of squares of the row, from which layer
// 0's Q/K/V product takes the 1 / rms itself. That replaces the norm-and-quantize dispatch
// between the gather and the product. An invocation then takes four adjacent columns, so
// that eight invocations hold a 32-column block.

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

#if Q8NORM
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> xq: array<u32>;
var<workgroup> red: array<f32, 64>;

// Words per row of the output: k / 4 of bytes, (d, s) per block, padded to whole vec4s,
// then one sum of squares per block, padded the same (matvec.wgsl's q8_norm_stride).
fn q8_norm_stride(k: u32) -> u32 {
    return ((k / 4u + k / 16u) + 3u) / 4u * 4u + (k / 32u + 3u) / 4u * 4u;
}

// v over the eight invocations of this invocation's block (lanes 8b .. 8b + 7), max or sum.
fn block_reduce(v: f32, lid: u32, take_max: bool) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    let b0 = lid & ~7u;
    var r = red[b0];
    for (var j = 1u; j < 8u; j++) { r = select(r + red[b0 + j], max(r, red[b0 + j]), take_max); }
    workgroupBarrier();
    return r;
}

// Column j of this invocation: four adjacent ones.
fn column(x: u32, lid: u32, j: u32) -> u32 {
    return x * COLS + lid * PER + j;
}
#else
// Column j of this invocation: neighbouring invocations read neighbouring columns.
fn column(x: u32, lid: u32, j: u32) -> u32 {
    return x * COLS + lid + j * WG;
}
#endif

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y + wid.z * 65535u;
    if (t >= p.n) { return; }
    let id = tokens[p.tok_off + t];
    let o = t * p.cols;
    // This chunk holds the row, or (the last chunk) the id is past the table: zeros.
    let mine = id >= p.row_start && id - p.row_start < p.rows;
    let writes = mine || (p.last != 0u && id >= p.row_start);
    var v: array<f32, PER>;
    if (mine) {
        let r = id - p.row_start;
        for (var j = 0u; j < PER; j++) {
            v[j] = w_elem(0u, r, min(column(wid.x, lid, j), p.cols - 1u));
        }
    }
    if (writes) {
        for (var j = 0u; j < PER; j++) {
            let c = column(wid.x, lid, j);
            if (c < p.cols) { out[o + c] = v[j]; }
        }
    }
#if Q8NORM
    // Quantize x * g per block as quantize_q8.wgsl does. Columns past the row are whole
    // blocks (cols % 32 == 0) and take part in the reductions as zeros.
    let c = column(wid.x, lid, 0u);
    let live = c < p.cols;
    let a = vec4<f32>(v[0], v[1], v[2], v[3]);
    var gw = vec4<f32>(0.0);
    if (live) { gw = vec4<f32>(g[c], g[c + 1u], g[c + 2u], g[c + 3u]); }
    let qv = a * gw;
    let m = abs(qv);
    let amax = block_reduce(max(max(m.x, m.y), max(m.z, m.w)), lid, true);
    let inv = select(0.0, 127.0 / amax, amax > 0.0);
    let q = vec4<i32>(round(qv * inv));
    let qsum = block_reduce(f32((q.x + q.y) + (q.z + q.w)), lid, false);
    let sq = block_reduce(dot(a, a), lid, false);
    if (writes && live) {
        let base = t * q8_norm_stride(p.cols);
        xq[base + c / 4u] = pack4xI8(q);
        if ((lid & 7u) == 0u) {
            let blk = c / 32u;
            let d = amax / 127.0;
            let ds = base + p.cols / 4u + blk * 2u;
            xq[ds] = bitcast<u32>(d);
            xq[ds + 1u] = bitcast<u32>(d * qsum);
            xq[base + ((p.cols / 4u + p.cols / 16u) + 3u) / 4u * 4u + blk] = bitcast<u32>(sq);
        }
    }
#endif
}
