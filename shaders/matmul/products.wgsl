// The interface every weight product shares (matvec, matmul, matmul_coop): the parameter
// uniform, x, y and the weight matrices, and the layout weights.wgsl reads.
// t: vectors (matvec) or tokens (matmul); rewritten alone by set_rows, so it comes first.
// XVEC: x is read as 16-byte vectors (rows of x start at multiples of 4 floats); XH: as f16.

struct Params {
    t: u32,
    k: u32,
    rows: u32,
    n_total: u32,
    row_start: u32,
    x_off: u32,
    w_stride: u32,
    w_scale: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#if MERGE
// The attention partials the matvec merges into its vector (matvec.wgsl).
@group(0) @binding(1) var<storage, read> x: array<f32>;
#else
#if XQ8
// The vectors quantized to 8 bits (quantize_q8.wgsl's layout; matvec.wgsl).
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
#else
#if XH
// x already in f16 (half_x.wgsl; matmul_coop.wgsl).
@group(0) @binding(1) var<storage, read> x: array<vec4<f16>>;
#else
#if XVEC
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> x: array<f32>;
#endif
#endif
#endif
#endif
#if QOUT
// The product's output quantized to 8 bits (matvec.wgsl; quantize_q8.wgsl's layout).
@group(0) @binding(2) var<storage, read_write> y: array<u32>;
#else
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
#endif
@group(0) @binding(3) var<storage, read> W: array<vec4<u32>>;
#if SWIGLU
@group(0) @binding(4) var<storage, read> U: array<vec4<u32>>;
#endif

fn w_layout(m: u32) -> vec2<u32> {
    return vec2<u32>(p.w_stride, p.w_scale);
}
