// Decode matrix-vector product: for each vector v < n,
//   y[v, row_start + r] = W[r, :] . x[x_off + v * k ..]        (Store)
//   y[v, row_start + r] += W[r, :] . x[...]                    (ADD)
//   y[v, row_start + r] = silu(W[r, :] . x) * (U[r, :] . x)    (SWIGLU)
// for the rows r of one matrix chunk. Workgroup (v, g) computes rows 4g..4g+3 for vector v:
// its 64 invocations each walk whole 32-element blocks (block kb = lid, lid + 64, ...), load the
// x block once into registers and use it for all four rows, accumulate in f32, and the
// workgroup reduces the four partial sums at the end (subgroups when available).
// XVEC (cols % 32 == 0 and x_off % 4 == 0): the fast block path with 16-byte loads of x and W.
// Without it, an element-wise path for any shape.

struct Params {
    n: u32,
    k: u32,
    rows: u32,
    n_total: u32,
    row_start: u32,
    x_off: u32,
    w_stride: u32,
    w_scale: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#if XVEC
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> x: array<f32>;
#endif
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> W: array<vec4<u32>>;
#if SWIGLU
@group(0) @binding(4) var<storage, read> U: array<vec4<u32>>;
#endif

fn w_layout(m: u32) -> vec2<u32> {
    return vec2<u32>(p.w_stride, p.w_scale);
}

const WG: u32 = 64u;
const R: u32 = 4u;

var<workgroup> red: array<vec4<f32>, 64>;

// Sum of v over the workgroup, returned to every invocation.
fn reduce4(v: vec4<f32>, lid: u32, sgs: u32, sgl: u32) -> vec4<f32> {
#if SUBGROUPS
    let s = subgroupAdd(v);
    if (sgl == 0u) { red[lid / sgs] = s; }
    workgroupBarrier();
    var t = vec4<f32>(0.0);
    let nsg = (WG + sgs - 1u) / sgs;
    for (var i = 0u; i < nsg; i++) { t += red[i]; }
    workgroupBarrier();
    return t;
#else
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
#endif
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUPS
    @builtin(subgroup_size) sgs: u32,
    @builtin(subgroup_invocation_id) sgl: u32,
#endif
) {
#if !SUBGROUPS
    let sgs = 1u;
    let sgl = 0u;
#endif
    let v = wid.x;
    let row0 = wid.y * R;
    var acc = vec4<f32>(0.0);
#if SWIGLU
    var accu = vec4<f32>(0.0);
#endif
#if XVEC
    let nb = p.k / 32u;
    let xb = (p.x_off + v * p.k) / 4u;
    for (var kb = lid; kb < nb; kb += WG) {
        let o = xb + kb * 8u;
        let xs = array<vec4<f32>, 8>(x[o], x[o + 1u], x[o + 2u], x[o + 3u], x[o + 4u], x[o + 5u], x[o + 6u], x[o + 7u]);
        let xsum = dot(((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7])), vec4<f32>(1.0));
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            if (row < p.rows) {
                acc[r] += w_dot32(0u, row, kb, xs, xsum);
#if SWIGLU
                accu[r] += w_dot32(1u, row, kb, xs, xsum);
#endif
            }
        }
    }
#else
    let xb = p.x_off + v * p.k;
    for (var c = lid; c < p.k; c += WG) {
        let xv = x[xb + c];
        for (var r = 0u; r < R; r++) {
            let row = row0 + r;
            if (row < p.rows) {
                acc[r] += w_elem(0u, row, c) * xv;
#if SWIGLU
                accu[r] += w_elem(1u, row, c) * xv;
#endif
            }
        }
    }
#endif
    let tot = reduce4(acc, lid, sgs, sgl);
#if SWIGLU
    let totu = reduce4(accu, lid, sgs, sgl);
#endif
    if (lid < R) {
        let row = row0 + lid;
        if (row < p.rows) {
            let o = v * p.n_total + p.row_start + row;
            let g = tot[lid];
#if SWIGLU
            y[o] = g / (1.0 + exp(-g)) * totu[lid];
#else
#if ADD
            y[o] = y[o] + g;
#else
            y[o] = g;
#endif
#endif
        }
    }
}
