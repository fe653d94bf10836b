// Negative log-likelihood of each row's target token: logsumexp(logits[t]) - logits[t][y_t].
// One workgroup per row; used by perplexity so that logits never leave the GPU.

struct Params { rows: u32, vocab: u32, _pad0: u32, _pad1: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> nll: array<f32>;

const WG: u32 = 256u;

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
    let row = wid.x;
    if (row >= p.rows) { return; }
    let base = row * p.vocab;
    var m = -3.4e38;
    for (var i = lid; i < p.vocab; i += WG) { m = max(m, logits[base + i]); }
    let mx = wg_max(m, lid, WG, sgs, sgl);
    var s = 0.0;
    for (var i = lid; i < p.vocab; i += WG) { s += exp(logits[base + i] - mx); }
    let total = wg_sum(s, lid, WG, sgs, sgl);
    if (lid == 0u) {
        nll[row] = log(total) + mx - logits[base + targets[row]];
    }
}
