// Picks the next token from the logits on the GPU, so a step reads back 4 bytes, not the
// logits, and the token feeds the next step's embedding without a CPU round trip.
//
// Order as in HF transformers: repetition penalty, temperature, top-k, top-p, then a draw with
// a counter-based random number (seed, step). temperature 0 means greedy (lowest id on ties).
// top-k and top-p thresholds are found by radix selection on order-preserving integer keys of
// the logits: 32 counting passes each, no sort and no scratch memory beyond the workgroup.
// One dispatch of ceil(vocab / PART) workgroups: workgroup i finds the best score of logits
// [i * PART, (i + 1) * PART), and the last workgroup to finish (an arrival count, as
// attend_merge.wgsl merges attention splits) reduces those to the argmax and samples. The
// argmax over a 128K vocabulary in one workgroup took ~100 us on an H100; spread over 32
// workgroups it is one round of loads each. A second dispatch for the reduction cost a
// dispatch and a barrier per token.

struct Params {
    vocab: u32,
    top_k: u32,
    top_p: f32,
    temperature: f32,
    rep_penalty: f32,
    seed: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
// Bit i set when token i is in the context (for the repetition penalty).
@group(0) @binding(2) var<storage, read_write> seen: array<u32>;
// Per workgroup: the bits of its best score and that token id (words 2i, 2i + 1); then the
// arrival count (word 2 * parts), zero between dispatches. Atomic words: the last workgroup
// reads what the others wrote in the same dispatch (see attend_merge.wgsl).
@group(0) @binding(3) var<storage, read_write> parts: array<atomic<u32>>;
// [0] position of the step's first token, [1] tokens in the step, [2] draws so far.
@group(0) @binding(4) var<storage, read_write> state: array<u32>;
// tokens[0] receives the sampled token: the next step's input.
@group(0) @binding(5) var<storage, read_write> tokens: array<u32>;

const WG: u32 = 256u;
// Logits each invocation of argmax_parts loads, all at once, and per workgroup.
const LOADS: u32 = 16u;
const PART: u32 = LOADS * WG;
var<workgroup> red_f: array<f32, 256>;
var<workgroup> red_u: array<u32, 256>;
var<workgroup> pick: u32;
var<workgroup> last_sh: u32;

fn score(i: u32) -> f32 {
    var z = logits[i];
    if (p.rep_penalty != 1.0 && ((seen[i / 32u] >> (i % 32u)) & 1u) == 1u) {
        z = select(z * p.rep_penalty, z / p.rep_penalty, z > 0.0);
    }
    if (p.temperature > 0.0) { z = z / p.temperature; }
    return z;
}

// Larger float -> larger key.
fn key(z: f32) -> u32 {
    let u = bitcast<u32>(z);
    return select(u | 0x80000000u, ~u, (u >> 31u) == 1u);
}

fn sum_f(v: f32, lid: u32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red_f[lid] += red_f[lid + s]; }
        workgroupBarrier();
    }
    let t = red_f[0];
    workgroupBarrier();
    return t;
}

fn sum_u(v: u32, lid: u32) -> u32 {
    red_u[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { red_u[lid] += red_u[lid + s]; }
        workgroupBarrier();
    }
    let t = red_u[0];
    workgroupBarrier();
    return t;
}

fn pcg(v: u32) -> u32 {
    let s = v * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

struct Best { z: f32, i: u32 }

// The best (score, id) over the workgroup: larger score, then lower id.
fn reduce_best(best: f32, best_i: u32, lid: u32) -> Best {
    red_f[lid] = best;
    red_u[lid] = best_i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let o = lid + s;
            if (red_f[o] > red_f[lid] || (red_f[o] == red_f[lid] && red_u[o] < red_u[lid])) {
                red_f[lid] = red_f[o];
                red_u[lid] = red_u[o];
            }
        }
        workgroupBarrier();
    }
    let r = Best(red_f[0], red_u[0]);
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = p.vocab;
    let last = n - 1u;
    let i0 = wid.x * PART + lid;
    // Neighbouring invocations read neighbouring logits; all loads before any comparison.
    var z: array<f32, LOADS>;
    for (var j = 0u; j < LOADS; j++) { z[j] = score(min(i0 + j * WG, last)); }
    var best = -3.4e38;
    var best_i = 0xffffffffu;
    for (var j = 0u; j < LOADS; j++) {
        // Ids are increasing here, so ">" keeps the lowest id among equals.
        let i = i0 + j * WG;
        if (i < n && z[j] > best) { best = z[j]; best_i = i; }
    }
    let r = reduce_best(best, best_i, lid);
    if (lid == 0u) {
        atomicStore(&parts[2u * wid.x], bitcast<u32>(r.z));
        atomicStore(&parts[2u * wid.x + 1u], r.i);
    }
    // Count this workgroup in; the last one picks (device-scope fences around the count).
    let n_parts = (n + PART - 1u) / PART;
    storageBarrier();
    if (lid == 0u) {
        last_sh = select(0u, 1u, atomicAdd(&parts[2u * n_parts], 1u) + 1u == n_parts);
    }
    if (workgroupUniformLoad(&last_sh) == 0u) { return; }
    storageBarrier();
    if (lid == 0u) { atomicStore(&parts[2u * n_parts], 0u); }
    pick_token(lid);
}

// The reduction of the parts to the argmax, and the draw (the last workgroup).
fn pick_token(lid: u32) {
    let n = p.vocab;
    let chunk = (n + WG - 1u) / WG;
    let lo = min(lid * chunk, n);
    let hi = min(lo + chunk, n);

    // The best of the argmax workgroups' results (ordered by id, so ties keep the lowest).
    var best = -3.4e38;
    var best_i = 0xffffffffu;
    for (var k = lid; k < (n + PART - 1u) / PART; k += WG) {
        let z = bitcast<f32>(atomicLoad(&parts[2u * k]));
        let i = atomicLoad(&parts[2u * k + 1u]);
        if (z > best || (z == best && i < best_i)) { best = z; best_i = i; }
    }
    let am = reduce_best(best, best_i, lid);
    let zmax = am.z;
    let argmax = am.i;

    var chosen = argmax;
    if (p.temperature > 0.0) {
        // top-k: the k-th largest key, built bit by bit from the top.
        var tk = 0u;
        if (p.top_k > 0u && p.top_k < n) {
            for (var b = 31; b >= 0; b--) {
                let cand = tk | (1u << u32(b));
                var c = 0u;
                for (var i = lo; i < hi; i++) { c += u32(key(score(i)) >= cand); }
                if (sum_u(c, lid) >= p.top_k) { tk = cand; }
            }
        }
        // Mass of everything at or above the top-k threshold.
        var w = 0.0;
        for (var i = lo; i < hi; i++) {
            let z = score(i);
            if (key(z) >= tk) { w += exp(z - zmax); }
        }
        let total = sum_f(w, lid);
        // top-p: the largest threshold whose mass still reaches top_p of the total.
        var tp = tk;
        if (p.top_p < 1.0) {
            var pre = 0u;
            let goal = p.top_p * total;
            for (var b = 31; b >= 0; b--) {
                let cand = pre | (1u << u32(b));
                var m = 0.0;
                for (var i = lo; i < hi; i++) {
                    let z = score(i);
                    let kz = key(z);
                    if (kz >= cand && kz >= tk) { m += exp(z - zmax); }
                }
                if (sum_f(m, lid) >= goal) { pre = cand; }
            }
            tp = max(tp, pre);
        }
        // Draw: each invocation's kept mass, then a scan by one invocation.
        var mine = 0.0;
        for (var i = lo; i < hi; i++) {
            let z = score(i);
            if (key(z) >= tp) { mine += exp(z - zmax); }
        }
        red_f[lid] = mine;
        workgroupBarrier();
        if (lid == 0u) {
            var kept = 0.0;
            for (var j = 0u; j < WG; j++) { kept += red_f[j]; }
            let r = f32(pcg(p.seed ^ pcg(state[2])) >> 8u) / 16777216.0 * kept;
            var acc = 0.0;
            var owner = WG;
            for (var j = 0u; j < WG; j++) {
                if (red_f[j] > 0.0) {
                    owner = j;
                    if (acc + red_f[j] > r) { break; }
                    acc += red_f[j];
                }
            }
            var tok = argmax;
            if (owner < WG) {
                let olo = min(owner * chunk, n);
                let ohi = min(olo + chunk, n);
                for (var i = olo; i < ohi; i++) {
                    let z = score(i);
                    if (key(z) >= tp) {
                        tok = i;
                        acc += exp(z - zmax);
                        if (acc > r) { break; }
                    }
                }
            }
            pick = tok;
        }
        workgroupBarrier();
        chosen = pick;
    }
    if (lid == 0u) {
        tokens[0] = chosen;
        seen[chosen / 32u] |= 1u << (chosen % 32u);
        state[0] = state[0] + state[1];
        state[1] = 1u;
        state[2] = state[2] + 1u;
    }
}
