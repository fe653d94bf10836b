// What a dependent dispatch boundary costs, against handing the dependency over inside one
// dispatch. Stage A: each of a_groups workgroups sums its slice of src and publishes the sum.
// Stage B: each of b_groups workgroups sums its own slice and adds every A sum, so it needs
// all of stage A (as a product needs the whole vector the one before it wrote).
//
// mode 0: stage A alone. mode 1: stage B alone, reading sums a dispatch before wrote.
// mode 2 and 3: both stages in one dispatch, A's workgroups first (lower indices, so they are
// started no later than any B workgroup that waits for them). A workgroup publishes its sum,
// then a device-scope release (storageBarrier) and a count; each B workgroup waits until the
// count is a_groups, then acquires. Mode 2 reads B's own slice before waiting (as a product
// could load its weights, which do not depend on the vector); mode 3 after.
// The last B workgroup resets the counts for the next dispatch.

struct Params {
    a_groups: u32,
    b_groups: u32,
    // vec4s per workgroup slice of each stage.
    a_words: u32,
    b_words: u32,
    mode: u32,
    // First vec4 of src the stages read (A's slices, then B's).
    src_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// A's slices, then B's.
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
// A's sums (f32 bits), then the A count and the B count. Atomic words: a B workgroup reads
// sums other workgroups of the same dispatch wrote.
@group(0) @binding(2) var<storage, read_write> sums: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
var<workgroup> red: array<f32, WG>;
var<workgroup> ready: u32;

fn wg_total(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
}

fn slice_sum(first: u32, words: u32, lid: u32) -> f32 {
    var acc = vec4<f32>(0.0);
    for (var i = lid; i < words; i += WG) {
        acc += src[first + i];
    }
    return (acc.x + acc.y) + (acc.z + acc.w);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let fused = p.mode >= 2u;
    let first_b = select(0u, p.a_groups, fused);
    if (p.mode == 0u || (fused && wid.x < p.a_groups)) {
        if (wid.x >= p.a_groups) { return; }
        let total = wg_total(slice_sum(p.src_off + wid.x * p.a_words, p.a_words, lid), lid);
        if (lid == 0u) { atomicStore(&sums[wid.x], bitcast<u32>(total)); }
        if (fused) {
            storageBarrier();
            if (lid == 0u) { atomicAdd(&sums[p.a_groups], 1u); }
        }
        return;
    }
    let g = wid.x - first_b;
    if (g >= p.b_groups) { return; }
    let b_first = p.src_off + p.a_groups * p.a_words + g * p.b_words;
    var own = 0.0;
    if (p.mode != 3u) { own = slice_sum(b_first, p.b_words, lid); }
    if (fused) {
        // One invocation polls and the workgroup waits with it, in uniform control flow
        // (lavapipe lost workgroup-memory writes when one invocation spun alone while the
        // others waited at a barrier).
        loop {
            if (lid == 0u) { ready = atomicLoad(&sums[p.a_groups]); }
            if (workgroupUniformLoad(&ready) >= p.a_groups) { break; }
        }
        storageBarrier();
    }
    if (p.mode == 3u) { own = slice_sum(b_first, p.b_words, lid); }
    var a = 0.0;
    for (var i = lid; i < p.a_groups; i += WG) {
        a += bitcast<f32>(atomicLoad(&sums[i]));
    }
    let total = wg_total(own, lid) + wg_total(a, lid);
    if (lid == 0u) {
        out[g] = total;
        if (fused && atomicAdd(&sums[p.a_groups + 1u], 1u) + 1u == p.b_groups) {
            // Every B workgroup is past its wait: the counts can start over.
            atomicStore(&sums[p.a_groups], 0u);
            atomicStore(&sums[p.a_groups + 1u], 0u);
        }
    }
}
