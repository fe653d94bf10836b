// Workgroup-wide reductions. With subgroups, each subgroup reduces in registers and one value
// per subgroup goes through workgroup memory; without, a tree in workgroup memory.
// Subgroups are assumed to be laid out along local_invocation_index (true of the drivers we
// test on); callers pass the subgroup builtins, or sgs = 1, sgl = 0 without subgroups.
// Every invocation of the workgroup must call these (they contain barriers), with wg a power
// of two no larger than 256 (64 for the vec4 ones).

var<workgroup> red_buf: array<f32, 256>;

fn wg_sum(v: f32, lid: u32, wg: u32, sgs: u32, sgl: u32) -> f32 {
#if SUBGROUPS
    let s = subgroupAdd(v);
    if (sgl == 0u) { red_buf[lid / sgs] = s; }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < wg / sgs; i++) { t += red_buf[i]; }
    workgroupBarrier();
    return t;
#else
    red_buf[lid] = v;
    workgroupBarrier();
    for (var s = wg / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red_buf[lid] += red_buf[lid + s]; }
        workgroupBarrier();
    }
    let t = red_buf[0];
    workgroupBarrier();
    return t;
#endif
}

fn wg_max(v: f32, lid: u32, wg: u32, sgs: u32, sgl: u32) -> f32 {
#if SUBGROUPS
    let s = subgroupMax(v);
    if (sgl == 0u) { red_buf[lid / sgs] = s; }
    workgroupBarrier();
    var t = red_buf[0];
    for (var i = 1u; i < wg / sgs; i++) { t = max(t, red_buf[i]); }
    workgroupBarrier();
    return t;
#else
    red_buf[lid] = v;
    workgroupBarrier();
    for (var s = wg / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red_buf[lid] = max(red_buf[lid], red_buf[lid + s]); }
        workgroupBarrier();
    }
    let t = red_buf[0];
    workgroupBarrier();
    return t;
#endif
}

// The same for one vec4 per invocation (four reductions at once), over invocations 0..wg;
// a larger workgroup's other invocations only take part in the barriers.
var<workgroup> red_buf4: array<vec4<f32>, 64>;

fn wg_sum4(v: vec4<f32>, lid: u32, wg: u32, sgs: u32, sgl: u32) -> vec4<f32> {
#if SUBGROUPS
    let s = subgroupAdd(v);
    if (sgl == 0u && lid < wg) { red_buf4[lid / sgs] = s; }
    workgroupBarrier();
    var t = vec4<f32>(0.0);
    for (var i = 0u; i < wg / sgs; i++) { t += red_buf4[i]; }
    workgroupBarrier();
    return t;
#else
    if (lid < wg) { red_buf4[lid] = v; }
    workgroupBarrier();
    for (var s = wg / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red_buf4[lid] += red_buf4[lid + s]; }
        workgroupBarrier();
    }
    let t = red_buf4[0];
    workgroupBarrier();
    return t;
#endif
}

fn wg_max4(v: vec4<f32>, lid: u32, wg: u32, sgs: u32, sgl: u32) -> vec4<f32> {
#if SUBGROUPS
    let s = subgroupMax(v);
    if (sgl == 0u && lid < wg) { red_buf4[lid / sgs] = s; }
    workgroupBarrier();
    var t = red_buf4[0];
    for (var i = 1u; i < wg / sgs; i++) { t = max(t, red_buf4[i]); }
    workgroupBarrier();
    return t;
#else
    if (lid < wg) { red_buf4[lid] = v; }
    workgroupBarrier();
    for (var s = wg / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red_buf4[lid] = max(red_buf4[lid], red_buf4[lid + s]); }
        workgroupBarrier();
    }
    let t = red_buf4[0];
    workgroupBarrier();
    return t;
#endif
}
