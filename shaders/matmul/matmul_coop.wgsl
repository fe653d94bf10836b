// Prefill matrix product on the GPU's matrix units (cooperative matrices, 16x16x16 f16 with
// f32 accumulators): same operation, operands and epilogues as matmul.wgsl.
//
// Tile: BT tokens x 128 weight rows per workgroup of 8 subgroups of 32; BT is 128 with TILE128
// (large products: MatMul::tile_t), else 64. With SWIGLU the 128 rows are 64 rows of G
// followed by the same 64 rows of U, so the tile has 64 outputs per token. K advances 64 per
// step (two quant blocks): every invocation decodes one block of one weight row and converts
// BT / 4 x values, both to f16 in workgroup memory; then each subgroup multiplies its 32
// tokens x 128 / SG_N rows (SWIGLU: 64 / SG_N rows of G and the same rows of U, so that every
// output's two products meet in one subgroup) as 2 x FN fragments: with TILE128 2 x 4 (six
// fragment loads from workgroup memory per eight products), else 2 x 2. The loads of the
// next step are issued before the products of the current one. Results leave through
// workgroup memory one fragment per subgroup at a time.
//
// Needs K % 32 == 0 and x rows starting at multiples of 4 floats (MatMul takes matmul.wgsl
// otherwise). Both operands are rounded to f16 on the way in (the weights after
// dequantisation), which makes this kernel less exact than matmul.wgsl: relative error ~1e-3
// of sum |w x|.

// Bindings and parameters: products.wgsl, with XVEC (x in f32, rounded to f16 here by every
// workgroup column) or XH (x already in f16: half_x.wgsl converted it once; half the bytes
// read, no conversion here).

// Tokens per tile.
#if TILE128
const BT: u32 = 128u;
#else
const BT: u32 = 64u;
#endif
// Subgroups along the weight rows (those along the tokens take 32 tokens each), and row
// fragments per subgroup (SWIGLU: FG of G's, each with its U fragment).
const SG_N: u32 = 256u / BT;
const FN: u32 = 8u / SG_N;
const FG: u32 = FN / 2u;
const BR: u32 = 128u;
// Row pitch of the operand tiles in units of 4 f16: 64 values + 8 of padding, so that the
// rows of a fragment start in different banks.
const LD: u32 = 18u;
// x values per invocation and step, and invocations per token row of the x tile.
const XPI: u32 = BT / 4u;
const XIT: u32 = 64u / XPI;
// Largest finite f16: x beyond it would become infinite.
const F16_MAX: f32 = 65504.0;

var<workgroup> xs: array<vec4<f16>, BT * LD>; // x[t0 + t, k0 + 4i..] at [t * LD + i]
var<workgroup> ws: array<vec4<f16>, BR * LD>; // W[row of tile row r, k0 + 4i..] at [r * LD + i]
var<workgroup> cs: array<f32, 2048>; // one 16 x 16 result fragment per subgroup, row-major

// Weight row of tile row r, and its matrix (0 = W, 1 = U).
fn tile_row(r: u32, wy: u32) -> vec2<u32> {
#if SWIGLU
    return vec2<u32>(wy * 64u + (r % 64u), r / 64u);
#else
    return vec2<u32>(wy * BR + r, 0u);
#endif
}

// First tile row of fragment j (< FN) of subgroup column sn (< SG_N); with SWIGLU fragments
// FG.. are U's rows of fragments 0.. of G.
fn frag_row(sn: u32, j: u32) -> u32 {
#if SWIGLU
    return sn * 16u * FG + (j % FG) * 16u + (j / FG) * 64u;
#else
    return sn * 16u * FN + j * 16u;
#endif
}

// Fragment of x tile rows r.. at column word c.
fn ld_a(r: u32, c: u32) -> coop_mat16x16<f16, A> {
    return coopLoadT<coop_mat16x16<f16, A>>(&xs[r * LD + c], LD);
}

// B[k][n] = W[n][k]: the tile rows read column-major.
fn ld_b(i: u32) -> coop_mat16x16<f16, B> {
    return coopLoad<coop_mat16x16<f16, B>>(&ws[i], LD);
}

// Token and output row of element e (< 2048) of the staged fragments, for token fragment i
// and row fragment j (SWIGLU: G's, j < FG): subgroup e / 256, row-major within.
fn out_pos(e: u32, t0: u32, wy: u32, i: u32, j: u32) -> vec2<u32> {
    let sg = e / 256u;
    let rc = e % 256u;
    let t = t0 + (sg / SG_N) * 32u + i * 16u + rc / 16u;
#if SWIGLU
    let n = wy * 64u + (sg % SG_N) * 16u * FG + j * 16u + rc % 16u;
#else
    let n = wy * BR + (sg % SG_N) * 16u * FN + j * 16u + rc % 16u;
#endif
    return vec2<u32>(t, n);
}

#if SWIGLU
// Outputs of fragment (i, j) of G's rows from its G and U fragments.
fn emit(lid: u32, sg: u32, t0: u32, wy: u32, i: u32, j: u32, g: coop_mat16x16<f32, C>, u: coop_mat16x16<f32, C>) {
    coopStoreT(g, &cs[sg * 256u], 16u);
    workgroupBarrier();
    var gv: array<f32, 8>;
    for (var e = 0u; e < 8u; e++) {
        gv[e] = cs[lid + e * 256u];
    }
    workgroupBarrier();
    coopStoreT(u, &cs[sg * 256u], 16u);
    workgroupBarrier();
    for (var e = 0u; e < 8u; e++) {
        let q = out_pos(lid + e * 256u, t0, wy, i, j);
        if (q.x < p.t && q.y < p.rows) {
            let gx = gv[e];
            y[q.x * p.n_total + p.row_start + q.y] = gx / (1.0 + exp(-gx)) * cs[lid + e * 256u];
        }
    }
    workgroupBarrier();
}
#else
// Outputs of fragment (i, j).
fn emit(lid: u32, sg: u32, t0: u32, wy: u32, i: u32, j: u32, c: coop_mat16x16<f32, C>) {
    coopStoreT(c, &cs[sg * 256u], 16u);
    workgroupBarrier();
    for (var e = 0u; e < 8u; e++) {
        let q = out_pos(lid + e * 256u, t0, wy, i, j);
        if (q.x < p.t && q.y < p.rows) {
            let o = q.x * p.n_total + p.row_start + q.y;
#if ADD
            y[o] = y[o] + cs[lid + e * 256u];
#else
            y[o] = cs[lid + e * 256u];
#endif
        }
    }
    workgroupBarrier();
}
#endif

// This invocation's share of one step: XPI x values and one weight block, loaded a step
// ahead so that their latency hides behind the previous step's products.
struct StepLoads {
#if XH
    x: array<vec4<f16>, XPI / 4u>,
#else
    x: array<vec4<f32>, XPI / 4u>,
#endif
    w: WBlock,
}

fn load_step(kb: u32, xt: u32, lk: u32, wrow: vec2<u32>, lb: u32) -> StepLoads {
    var o: StepLoads;
    let k0 = kb * 32u + lk;
    if (xt < p.t && k0 < p.k) {
        let base = (p.x_off + xt * p.k + k0) / 4u;
        for (var i = 0u; i < XPI / 4u; i++) {
            o.x[i] = x[base + i];
        }
    }
    let b = kb + lb;
    if (wrow.x < p.rows && b < p.k / 32u) {
        o.w = w_block(wrow.y, wrow.x, b);
    }
    return o;
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let t0 = wid.x * BT;
    let wy = wid.y;
    let st = sg / SG_N;
    let sn = sg % SG_N;
    // Loading roles: x token lt, k range lk..lk+XPI; weight tile row lr, block lb of the step.
    let lt = lid / XIT;
    let lk = (lid % XIT) * XPI;
    let lr = lid / 2u;
    let lb = lid % 2u;
    let wrow = tile_row(lr, wy);
    let xt = t0 + lt;
    // First tile row of this subgroup's token fragments (ar and ar + 16).
    let ar = st * 32u;

    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
#if TILE128
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();
#endif
    let nkb = p.k / 32u;
    var next = load_step(0u, xt, lk, wrow, lb);
    for (var kb = 0u; kb < nkb; kb += 2u) {
        // Operands of this step into workgroup memory, as f16.
        for (var i = 0u; i < XPI / 4u; i++) {
#if XH
            xs[lt * LD + lk / 4u + i] = next.x[i];
#else
            xs[lt * LD + lk / 4u + i] = vec4<f16>(clamp(next.x[i], vec4<f32>(-F16_MAX), vec4<f32>(F16_MAX)));
#endif
        }
        let wv = w_block_decode(next.w);
        for (var i = 0u; i < 8u; i++) {
            ws[lr * LD + lb * 8u + i] = vec4<f16>(wv[i]);
        }
        workgroupBarrier();
        // The next step's loads are in flight during this step's products.
        next = load_step(kb + 2u, xt, lk, wrow, lb);
        for (var kk = 0u; kk < 16u; kk += 4u) {
            let b0 = ld_b(frag_row(sn, 0u) * LD + kk);
            let b1 = ld_b(frag_row(sn, 1u) * LD + kk);
            let a0 = ld_a(ar, kk);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            let a1 = ld_a(ar + 16u, kk);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
#if TILE128
            let b2 = ld_b(frag_row(sn, 2u) * LD + kk);
            let b3 = ld_b(frag_row(sn, 3u) * LD + kk);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c13 = coopMultiplyAdd(a1, b3, c13);
#endif
        }
        workgroupBarrier();
    }
#if SWIGLU
#if TILE128
    emit(lid, sg, t0, wy, 0u, 0u, c00, c02);
    emit(lid, sg, t0, wy, 0u, 1u, c01, c03);
    emit(lid, sg, t0, wy, 1u, 0u, c10, c12);
    emit(lid, sg, t0, wy, 1u, 1u, c11, c13);
#else
    emit(lid, sg, t0, wy, 0u, 0u, c00, c01);
    emit(lid, sg, t0, wy, 1u, 0u, c10, c11);
#endif
#else
    emit(lid, sg, t0, wy, 0u, 0u, c00);
    emit(lid, sg, t0, wy, 0u, 1u, c01);
    emit(lid, sg, t0, wy, 1u, 0u, c10);
    emit(lid, sg, t0, wy, 1u, 1u, c11);
#if TILE128
    emit(lid, sg, t0, wy, 0u, 2u, c02);
    emit(lid, sg, t0, wy, 0u, 3u, c03);
    emit(lid, sg, t0, wy, 1u, 2u, c12);
    emit(lid, sg, t0, wy, 1u, 3u, c13);
#endif
#endif
}
