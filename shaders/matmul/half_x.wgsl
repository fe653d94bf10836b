// f32 activations -> f16, for the matrix-unit prefill products (matmul_coop.wgsl with XH):
// converted once per product input here instead of by every workgroup column of the product,
// which then reads half the bytes and converts nothing. Values beyond f16's range are clamped
// to its largest finite value (as the product did when it converted x itself).

struct Params {
    // vec4s to convert (the bound token capacity x columns / 4).
    count: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> xh: array<vec4<f16>>;

const F16_MAX: f32 = 65504.0;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < p.count) {
        xh[i] = vec4<f16>(clamp(x[i], vec4<f32>(-F16_MAX), vec4<f32>(F16_MAX)));
    }
}
