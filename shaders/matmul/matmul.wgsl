// Prefill matrix product for one matrix chunk: Y[t, row_start + n] (=|+=) X[t, :] . W[n, :]
// for t < p.t, n < p.rows; with SWIGLU, Y[t, row_start + n] = silu(X[t] . G[n]) * (X[t] . U[n]).
// Tiles: 64 tokens x 64 weight rows per workgroup of 256 invocations (4 x 4 outputs each); with
// SWIGLU, 64 tokens x 32 output rows (the 64 tile columns are 32 rows of G and the same 32 of
// U, interleaved so that each invocation holds 2 outputs' g and u). K advances 32 at a time
// (one quant block): each invocation loads 8 x values and decodes a quarter block of one weight
// row into workgroup memory (2 x 8 KiB, k-major so the inner loop reads vec4s).

// Bindings and parameters: products.wgsl.

#if SWIGLU
const BN: u32 = 32u;
#else
const BN: u32 = 64u;
#endif

// [k][token / 4] and [k][tile column / 4].
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> ws: array<vec4<f32>, 512>;

fn emit(t: u32, n0: u32, tx: u32, a: vec4<f32>) {
    if (t >= p.t) { return; }
    let o = t * p.n_total + p.row_start;
#if SWIGLU
    for (var j = 0u; j < 2u; j++) {
        let n = n0 + tx * 2u + j;
        if (n < p.rows) {
            let g = a[j];
            y[o + n] = g / (1.0 + exp(-g)) * a[j + 2u];
        }
    }
#else
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + tx * 4u + j;
        if (n < p.rows) {
#if ADD
            y[o + n] = y[o + n] + a[j];
#else
            y[o + n] = a[j];
#endif
        }
    }
#endif
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t0 = wid.x * 64u;
    let n0 = wid.y * BN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    // Loading roles: tile row/column lr, quarter lp.
    let lr = lid / 4u;
    let lp = lid % 4u;
    let xt = t0 + lr;
#if SWIGLU
    let wm = lr / 32u;
    let cr = lr % 32u;
    let wrow = n0 + cr;
    let wcol = (cr / 2u) * 4u + wm * 2u + (cr % 2u);
#else
    let wm = 0u;
    let wrow = n0 + lr;
    let wcol = lr;
#endif
    let pos = w_part_pos(lp);
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    let nkb = (p.k + 31u) / 32u;
    for (var kb = 0u; kb < nkb; kb++) {
        // X: 8 consecutive k of token xt.
        let k0 = kb * 32u + lp * 8u;
        let xrow = p.x_off + xt * p.k;
        for (var i = 0u; i < 8u; i++) {
            var v = 0.0;
            if (xt < p.t && k0 + i < p.k) { v = x[xrow + k0 + i]; }
            xs[(lp * 8u + i) * 16u + lr / 4u][lr % 4u] = v;
        }
        // W: a quarter block of weight row wrow.
        var part = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (wrow < p.rows) { part = w_part(wm, wrow, kb, lp, p.k); }
        let c4 = wcol / 4u;
        let cj = wcol % 4u;
        for (var i = 0u; i < 4u; i++) {
            ws[(pos.x + i) * 16u + c4][cj] = part[0][i];
            ws[(pos.y + i) * 16u + c4][cj] = part[1][i];
        }
        workgroupBarrier();
        for (var k = 0u; k < 32u; k++) {
            let a = xs[k * 16u + ty];
            let b = ws[k * 16u + tx];
            a0 += a.x * b;
            a1 += a.y * b;
            a2 += a.z * b;
            a3 += a.w * b;
        }
        workgroupBarrier();
    }
    emit(t0 + ty * 4u, n0, tx, a0);
    emit(t0 + ty * 4u + 1u, n0, tx, a1);
    emit(t0 + ty * 4u + 2u, n0, tx, a2);
    emit(t0 + ty * 4u + 3u, n0, tx, a3);
}
