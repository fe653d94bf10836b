// Decode attention that merges its own partials (MERGE_LAST): the workgroup that writes the
// last partial of its heads merges the splits of those heads, as attn_merge.wgsl does, so a
// decode step needs no merge dispatch (and no barrier before one). Each workgroup writes its
// partial, then counts itself in arrivals[t * n_heads + first head]; the one that brings the
// count to the number of splits in use is last, reads every partial and resets the count for
// the next step. The storage barriers around the count are device-scope release / acquire
// fences (naga: a control barrier with Device memory scope on uniform memory), and partials
// are written and read as atomic words, so the last workgroup sees every partial written
// before the counts it saw. (Plain loads measured the same on an H100.)
// The merging workgroup reads splits x heads x hd values alone, after every split is done:
// cheaper than a merge dispatch only while they are few (AttentionKernels::MERGED_MAX_VALUES).
// Q8_OUT: the output is quantized to 8 bits per 32 values in quantize_q8.wgsl's layout (as
// attn_merge.wgsl writes it), for the integer-dot Wo product; hd is then a multiple of 32.

// Parameters, bindings, NEG and WG: attend_common.wgsl; wg_max4 / wg_sum4: reduce.wgsl.

@group(0) @binding(7) var<storage, read_write> arrivals: array<atomic<u32>>;
#if Q8_OUT
@group(0) @binding(8) var<storage, read_write> merged: array<u32>;
#else
@group(0) @binding(8) var<storage, read_write> merged: array<f32>;
#endif

var<workgroup> last_sh: u32;
// Weight of each split (one component per head of the workgroup), normalised by the sum.
var<workgroup> w_sh: array<vec4<f32>, 64>;
// Key-group sums of one head's output words, then the head's output.
var<workgroup> mo_sh: array<vec4<f32>, 64>;

// Splits per round of loads in the merge (independent loads in flight per invocation): 12
// is every split an invocation merges wherever AttentionKernels::merges_in_attention holds
// for one head a workgroup (at most 3072 / hd splits over 256 / hd split groups).
const MB: u32 = 12u;

fn get_part(i: u32) -> f32 {
    return bitcast<f32>(atomicLoad(&part[i]));
}

fn part_word(i: u32) -> vec4<f32> {
    return vec4<f32>(get_part(i), get_part(i + 1u), get_part(i + 2u), get_part(i + 3u));
}

// Splits of query t that hold keys (split_keys gives each of them a non-empty range).
fn splits_with_keys(t: u32) -> u32 {
    let n_keys = state[0] + t + 1u;
    let used = min(p.n_splits, (n_keys + WG - 1u) / WG);
    let chunk = (n_keys + used - 1u) / used;
    return min(used, (n_keys + chunk - 1u) / chunk);
}

// Called by every invocation after the workgroup's partials of heads h0 .. h0 + nh (nh <= 4)
// are written.
fn merge_if_last(t: u32, h0: u32, nh: u32, lid: u32, sgs: u32, sgl: u32) {
    let used = splits_with_keys(t);
    let c = t * p.n_heads + h0;
    storageBarrier();
    if (lid == 0u) {
        last_sh = select(0u, 1u, atomicAdd(&arrivals[c], 1u) + 1u == used);
    }
    if (workgroupUniformLoad(&last_sh) == 0u) { return; }
    storageBarrier();
    if (lid == 0u) { atomicStore(&arrivals[c], 0u); }

    let stride = p.hd + 2u;
    let head_stride = p.n_splits * stride;
    let base = (t * p.n_heads + h0) * head_stride;
    // Output words: invocation = split group * hd4 + word, as attend's value phase.
    let hd4 = p.hd / 4u;
    let dg = lid % hd4;
    let sg = lid / hd4;
    let n_sg = WG / hd4;
    // The first round of the first head's output words, loaded with the m and l that weigh
    // them (they do not depend on the weights): one memory round trip fewer for the merging
    // workgroup, on which the step waits.
    var ow0: array<vec4<f32>, MB>;
    if (sg < n_sg) {
        for (var u = 0u; u < MB; u++) {
            ow0[u] = part_word(base + dg * 4u + min(sg + u * n_sg, used - 1u) * stride);
        }
    }
    // Invocation s < used: split s's m and l of each head; its weight e^(m - M) / L.
    var m = vec4<f32>(NEG);
    var l = vec4<f32>(0.0);
    if (lid < used) {
        for (var i = 0u; i < nh; i++) {
            let at = base + i * head_stride + lid * stride + p.hd;
            m[i] = get_part(at);
            l[i] = get_part(at + 1u);
        }
    }
    let live = l > vec4<f32>(0.0);
    let mx = wg_max4(select(vec4<f32>(NEG), m, live), lid, WG, sgs, sgl);
    let w = select(vec4<f32>(0.0), exp(m - mx), live);
    let lsum = wg_sum4(w * l, lid, WG, sgs, sgl);
    // Heads past nh have no splits: a sum of 0 weighs 0, not NaN.
    w_sh[lid] = w / select(vec4<f32>(1.0), lsum, lsum > vec4<f32>(0.0));
    workgroupBarrier();

    for (var i = 0u; i < nh; i++) {
        var acc = vec4<f32>(0.0);
        if (sg < n_sg) {
            let hb = base + i * head_stride + dg * 4u;
            for (var s0 = sg; s0 < used; s0 += MB * n_sg) {
                // All MB loads first (splits past `used` read the last one and weigh 0).
                var ow = ow0;
                if (i != 0u || s0 != sg) {
                    for (var u = 0u; u < MB; u++) {
                        ow[u] = part_word(hb + min(s0 + u * n_sg, used - 1u) * stride);
                    }
                }
                for (var u = 0u; u < MB; u++) {
                    let s = s0 + u * n_sg;
                    acc += select(0.0, w_sh[min(s, WG - 1u)][i], s < used) * ow[u];
                }
            }
        }
        mo_sh[lid] = acc;
        workgroupBarrier();
        var sum = vec4<f32>(0.0);
        if (lid < hd4) {
            for (var g = 0u; g < n_sg; g++) { sum += mo_sh[g * hd4 + lid]; }
        }
        let h = h0 + i;
#if Q8_OUT
        workgroupBarrier();
        if (lid < hd4) { mo_sh[lid] = sum; }
        workgroupBarrier();
        // Invocation b < hd / 32 quantizes the head's block b (8 words of mo_sh).
        if (lid < p.hd / 32u) {
            var amax = 0.0;
            for (var j = 0u; j < 8u; j++) {
                let v = abs(mo_sh[lid * 8u + j]);
                amax = max(amax, max(max(v.x, v.y), max(v.z, v.w)));
            }
            let inv = select(0.0, 127.0 / amax, amax > 0.0);
            let blk = (h * p.hd) / 32u + lid;
            let dst = t * p.q8_stride;
            var qsum = 0;
            for (var j = 0u; j < 8u; j++) {
                let q = vec4<i32>(round(mo_sh[lid * 8u + j] * inv));
                qsum += q.x + q.y + q.z + q.w;
                merged[dst + blk * 8u + j] = pack4xI8(q);
            }
            let d = amax / 127.0;
            let k = p.n_heads * p.hd;
            merged[dst + k / 4u + blk * 2u] = bitcast<u32>(d);
            merged[dst + k / 4u + blk * 2u + 1u] = bitcast<u32>(d * f32(qsum));
        }
#else
        if (lid < hd4) {
            let o = (t * p.n_heads + h) * p.hd + lid * 4u;
            for (var e = 0u; e < 4u; e++) { merged[o + e] = sum[e]; }
        }
#endif
        workgroupBarrier();
    }
}
