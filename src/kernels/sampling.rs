//! Token selection on the GPU (greedy / temperature / top-k / top-p / repetition penalty,
//! seeded) and per-row negative log-likelihood for perplexity.

use super::{Bound, REDUCE_WGSL};
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::Result;
use std::sync::Arc;

const SAMPLE_WGSL: &str = include_str!("../../shaders/sampling/sample.wgsl");
const NLL_WGSL: &str = include_str!("../../shaders/sampling/nll.wgsl");

/// Sampling parameters, in the order HF transformers applies them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 1 disables the penalty; >1 discourages tokens already in the context.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(crate::Error::InvalidArgument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature {} (must be >= 0)", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} (must be in (0, 1])", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition penalty {} (must be > 0)", self.repetition_penalty));
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SampleParams {
    vocab: u32,
    top_k: u32,
    top_p: f32,
    temperature: f32,
    rep_penalty: f32,
    seed: u32,
    _pad: [u32; 2],
}

impl SampleParams {
    pub fn new(vocab: u32, s: &SamplingParams) -> SampleParams {
        SampleParams {
            vocab,
            top_k: s.top_k,
            top_p: s.top_p,
            temperature: s.temperature,
            rep_penalty: s.repetition_penalty,
            seed: (s.seed ^ (s.seed >> 32)) as u32,
            _pad: [0; 2],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NllParams {
    rows: u32,
    vocab: u32,
    _pad: [u32; 2],
}

pub struct SamplingKernels {
    sample: Arc<wgpu::ComputePipeline>,
    nll: Arc<wgpu::ComputePipeline>,
}

impl SamplingKernels {
    pub fn new(gpu: &Gpu) -> Result<SamplingKernels> {
        let f = gpu.flags();
        Ok(SamplingKernels {
            sample: gpu.pipeline(&PipelineKey::new("sample", &[SAMPLE_WGSL], f))?,
            nll: gpu.pipeline(&PipelineKey::new("nll", &[REDUCE_WGSL, NLL_WGSL], f))?,
        })
    }

    /// Samples from logits [vocab] into tokens[0], marks it in `seen` (a bitmap of
    /// ceil(vocab / 32) words) and advances the step state: one dispatch (its workgroup
    /// count returned with it), whose parameter uniform [`Bound::set_params`] sets with
    /// [`SampleParams`].
    pub fn bind_sample(
        &self,
        gpu: &Gpu,
        vocab: u32,
        logits: &GpuBuffer,
        seen: &GpuBuffer,
        state: &GpuBuffer,
        tokens: &GpuBuffer,
    ) -> Result<(Bound, [u32; 3])> {
        let slices = vocab.div_ceil(Self::ARGMAX_SLICE).max(1);
        // Two words per slice and the arrival count (zeroed at creation; each dispatch leaves
        // it zero).
        let parts = gpu.storage("argmax parts", (2 * slices as u64 + 1) * 4)?;
        let params = gpu.uniform("sample", &SampleParams::new(vocab, &SamplingParams::default()));
        let sample = gpu.bind_group(
            &self.sample,
            &[params.binding(), logits.binding(), seen.binding(), parts.binding(), state.binding(), tokens.binding()],
        );
        Ok((Bound { pipeline: self.sample.clone(), bind_group: sample, params: Some(params) }, [slices, 1, 1]))
    }

    /// Logits per argmax workgroup (PART in sample.wgsl).
    const ARGMAX_SLICE: u32 = 16 * 256;

    /// nll[t] = logsumexp(logits[t]) - logits[t][targets[t]] for t < rows.
    pub fn bind_nll(
        &self,
        gpu: &Gpu,
        rows: u32,
        vocab: u32,
        logits: &GpuBuffer,
        targets: &GpuBuffer,
        nll: &GpuBuffer,
    ) -> Bound {
        let params = gpu.uniform("nll", &NllParams { rows, vocab, _pad: [0; 2] });
        let bind_group =
            gpu.bind_group(&self.nll, &[params.binding(), logits.binding(), targets.binding(), nll.binding()]);
        Bound { pipeline: self.nll.clone(), bind_group, params: Some(params) }
    }

    pub fn set_nll_rows(b: &Bound, queue: &wgpu::Queue, rows: u32, vocab: u32) {
        b.set_params(queue, &NllParams { rows, vocab, _pad: [0; 2] });
    }
}

/// CPU reference: the scores after penalty and temperature, and the set of tokens top-k and
/// top-p keep, with their probabilities (zero elsewhere).
pub fn reference_distribution(logits: &[f32], seen: &[bool], s: &SamplingParams) -> Vec<f64> {
    let z: Vec<f64> = logits
        .iter()
        .zip(seen)
        .map(|(&l, &seen)| {
            let mut v = l;
            if s.repetition_penalty != 1.0 && seen {
                v = if v > 0.0 { v / s.repetition_penalty } else { v * s.repetition_penalty };
            }
            (v / s.temperature) as f64
        })
        .collect();
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap());
    let k = if s.top_k == 0 { z.len() } else { (s.top_k as usize).min(z.len()) };
    let kth = z[order[k - 1]];
    let zmax = z[order[0]];
    let w: Vec<f64> = z.iter().map(|&v| if v >= kth { (v - zmax).exp() } else { 0.0 }).collect();
    let total: f64 = w.iter().sum();
    // Walk down from the top until the kept mass reaches top_p.
    let mut acc = 0.0;
    let mut cut = kth;
    for &i in &order {
        if w[i] == 0.0 {
            break;
        }
        acc += w[i];
        cut = z[i];
        if acc >= s.top_p as f64 * total {
            break;
        }
    }
    let kept: Vec<f64> = z.iter().zip(&w).map(|(&v, &wi)| if v >= cut { wi } else { 0.0 }).collect();
    let sum: f64 = kept.iter().sum();
    kept.iter().map(|x| x / sum).collect()
}

/// CPU reference of greedy choice: highest penalised score, lowest id on ties.
pub fn reference_greedy(logits: &[f32], seen: &[bool], penalty: f32) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (i, (&l, &s)) in logits.iter().zip(seen).enumerate() {
        let v = if penalty != 1.0 && s {
            if l > 0.0 {
                l / penalty
            } else {
                l * penalty
            }
        } else {
            l
        };
        if v > best.0 {
            best = (v, i);
        }
    }
    best.1 as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    struct Rig {
        k: SamplingKernels,
        logits: GpuBuffer,
        seen: GpuBuffer,
        state: GpuBuffer,
        tokens: GpuBuffer,
        bound: (Bound, [u32; 3]),
        vocab: usize,
        bits: Vec<u32>,
    }

    impl Rig {
        fn new(gpu: &Gpu, logits: &[f32], seen: &[bool]) -> Rig {
            let k = SamplingKernels::new(gpu).unwrap();
            let vocab = logits.len();
            let mut bits = vec![0u32; vocab.div_ceil(32)];
            for (i, &s) in seen.iter().enumerate() {
                if s {
                    bits[i / 32] |= 1 << (i % 32);
                }
            }
            let logits = gpu.upload("logits", logits).unwrap();
            let seen = gpu.upload("seen", &bits).unwrap();
            let bits = bits.clone();
            let state = gpu.upload("state", &[5u32, 3, 0, 0]).unwrap();
            let tokens = gpu.storage("tokens", 16).unwrap();
            let bound = k.bind_sample(gpu, vocab as u32, &logits, &seen, &state, &tokens).unwrap();
            Rig { k, logits, seen, state, tokens, bound, vocab, bits }
        }
        fn draw(&self, gpu: &Gpu, s: &SamplingParams, step: u32) -> u32 {
            self.bound.0.set_params(&gpu.queue, &SampleParams::new(self.vocab as u32, s));
            gpu.write(&self.state, 8, &[step]);
            // The sampler marks what it draws; start each draw from the same context.
            gpu.write(&self.seen, 0, &self.bits);
            crate::kernels::run_pass(gpu, |p| self.bound.0.record(p, self.bound.1)).unwrap();
            gpu.read::<u32>(&self.tokens, 0, 1).unwrap()[0]
        }
    }

    #[test]
    fn greedy_matches_argmax_and_advances_state() {
        for gpu in variants() {
            for (vocab, seed) in [(1usize, 1u64), (7, 2), (1000, 3), (49152, 4), (128256, 5)] {
                let mut rng = Rng::new(seed);
                let mut logits = rng.vec(vocab, 8.0);
                if vocab > 10 {
                    // A tie: the lower id must win.
                    let m = logits.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
                    logits[vocab / 3] = m;
                    logits[vocab / 2] = m;
                }
                let seen: Vec<bool> = (0..vocab).map(|i| i % 3 == 0).collect();
                let rig = Rig::new(gpu, &logits, &seen);
                for pen in [1.0f32, 1.3] {
                    let s = SamplingParams { repetition_penalty: pen, ..Default::default() };
                    let got = rig.draw(gpu, &s, 0);
                    assert_eq!(got, reference_greedy(&logits, &seen, pen), "vocab {vocab} pen {pen}");
                }
                let st: Vec<u32> = gpu.read(&rig.state, 0, 3).unwrap();
                // Two draws: 5 + 3 tokens, then + 1.
                assert_eq!(&st[..2], &[9, 1], "position advances by the step's token count");
                let bits: Vec<u32> = gpu.read(&rig.seen, 0, vocab.div_ceil(32)).unwrap();
                let t = reference_greedy(&logits, &seen, 1.3) as usize;
                assert_eq!(bits[t / 32] >> (t % 32) & 1, 1, "sampled token marked as seen");
                let _ = (&rig.k, &rig.logits);
            }
        }
    }

    #[test]
    fn sampling_stays_in_the_kept_set_and_follows_the_distribution() {
        let gpu = &variants()[0];
        let vocab = 50;
        let mut rng = Rng::new(9);
        let logits = rng.vec(vocab, 3.0);
        let seen: Vec<bool> = (0..vocab).map(|i| i % 4 == 0).collect();
        let rig = Rig::new(gpu, &logits, &seen);
        for s in [
            SamplingParams { temperature: 0.7, top_k: 5, seed: 1, ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 0.6, seed: 2, ..Default::default() },
            SamplingParams { temperature: 1.3, top_k: 20, top_p: 0.9, repetition_penalty: 1.5, seed: 3 },
            SamplingParams { temperature: 1.0, top_k: 1, seed: 4, ..Default::default() },
        ] {
            let want = reference_distribution(&logits, &seen, &s);
            let draws = 600;
            let mut counts = vec![0usize; vocab];
            for step in 0..draws {
                let t = rig.draw(gpu, &s, step) as usize;
                assert!(want[t] > 0.0, "{s:?}: drew token {t} outside the kept set");
                counts[t] += 1;
            }
            // Each kept token's frequency within 5 standard deviations of its probability.
            for (i, &p) in want.iter().enumerate() {
                let f = counts[i] as f64 / draws as f64;
                let sd = (p * (1.0 - p) / draws as f64).sqrt();
                assert!((f - p).abs() <= 5.0 * sd + 0.01, "{s:?}: token {i} freq {f} want {p}");
            }
            // Same seed and step, same token.
            assert_eq!(rig.draw(gpu, &s, 7), rig.draw(gpu, &s, 7));
        }
    }

    #[test]
    fn nll_matches_reference() {
        for gpu in variants() {
            let k = SamplingKernels::new(gpu).unwrap();
            for (rows, vocab) in [(1usize, 3usize), (5, 1001), (3, 49152)] {
                let mut rng = Rng::new(rows as u64 + vocab as u64);
                let logits = rng.vec(rows * vocab, 10.0);
                let targets: Vec<u32> = (0..rows).map(|_| rng.next_u32() % vocab as u32).collect();
                let lb = gpu.upload("l", &logits).unwrap();
                let tb = gpu.upload("t", &targets).unwrap();
                let nb = gpu.storage("n", rows as u64 * 4).unwrap();
                let b = k.bind_nll(gpu, rows as u32, vocab as u32, &lb, &tb, &nb);
                crate::kernels::run_pass(gpu, |p| b.record(p, [rows as u32, 1, 1])).unwrap();
                let got: Vec<f32> = gpu.read(&nb, 0, rows).unwrap();
                let want: Vec<f64> = (0..rows)
                    .map(|r| {
                        let row = &logits[r * vocab..(r + 1) * vocab];
                        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                        let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
                        lse - row[targets[r] as usize] as f64
                    })
                    .collect();
                assert_close("nll", &got, &want, 1e-4, 1e-5);
            }
        }
    }
}
