// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, one workgroup per row.

struct Params { rows: u32, dim: u32, eps: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;
// Elements per invocation loaded up front and kept in registers (a pipeline constant, from
// the row width): the loads are independent, so they overlap instead of each waiting for
// the last, which a loop over a 4096-wide row did (9 us for one row on an H200). Rows wider
// than HELD * WG read the rest in a loop.
override HELD: u32 = 16u;
const HELD_MAX: u32 = 16u;

// Normalises the row of x starting at `src` into y from `dst`.
fn norm_row(src: u32, dst: u32, lid: u32, sgs: u32, sgl: u32) {
    var xv: array<f32, HELD_MAX>;
    var wv: array<f32, HELD_MAX>;
    let last = p.dim - 1u;
    // Indices past the row read its last element (always valid) and count as zero.
    for (var j = 0u; j < HELD; j++) {
        let i = min(lid + j * WG, last);
        xv[j] = x[src + i];
        wv[j] = w[i];
    }
    var ss = 0.0;
    for (var j = 0u; j < HELD; j++) {
        let v = select(0.0, xv[j], lid + j * WG < p.dim);
        ss += v * v;
    }
    for (var i = lid + HELD * WG; i < p.dim; i += WG) {
        let v = x[src + i];
        ss += v * v;
    }
    let total = wg_sum(ss, lid, WG, sgs, sgl);
    let scale = inverseSqrt(total / f32(p.dim) + p.eps);
    for (var j = 0u; j < HELD; j++) {
        let i = lid + j * WG;
        if (i < p.dim) { y[dst + i] = xv[j] * scale * wv[j]; }
    }
    for (var i = lid + HELD * WG; i < p.dim; i += WG) {
        y[dst + i] = x[src + i] * scale * w[i];
    }
}

@compute @workgroup_size(256)
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
    let row = wid.x + wid.y * 65535u;
    if (row >= p.rows) { return; }
    norm_row(row * p.dim, row * p.dim, lid, sgs, sgl);
}

// The step's last row only (row state[1] - 1), written to row 0 of y: the final norm before
// the LM head, which needs just the last token's hidden state.
@group(0) @binding(4) var<storage, read> state: array<u32>;

@compute @workgroup_size(256)
fn last_row(
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
    norm_row((state[1] - 1u) * p.dim, 0u, lid, sgs, sgl);
}
