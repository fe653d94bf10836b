//! 8-bit quantization of activation vectors for the integer-dot products: each 32-element
//! block becomes 32 signed bytes and a scale (`d = max|x| / 127`), plus `s = d * sum(q)` for
//! weight formats with an offset. Optionally the RMSNorm in front of a layer's products is
//! fused in. The decode products of 4- and 8-bit weights then multiply bytes by bytes
//! (`dot4I8Packed`, matvec.wgsl with XQ8) instead of decoding every weight to f32.

use super::{Bound, REDUCE_WGSL};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};

const WGSL: &str = include_str!("../../shaders/matmul/quantize_q8.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    k: u32,
    stride: u32,
    eps: f32,
    _pad: u32,
}

/// Words (u32) one quantized vector of `k` elements takes: `k / 4` of bytes, two per block,
/// rounded up to a multiple of 4 so that every vector starts 16-byte aligned.
pub fn q8_words(k: usize) -> usize {
    (k / 4 + 2 * (k / 32)).next_multiple_of(4)
}

/// Words of the workgroup (quantize_q8.wgsl's WG).
const WG: usize = 256;

/// What is quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Q8Input {
    /// The vectors as they are.
    Plain,
    /// The RMS-normalised vectors (`x * g / sqrt(mean(x^2) + eps)`).
    Norm { eps: f32 },
    /// The RMS-normalised last row of the step (row `state[1] - 1`), one vector.
    NormLast { eps: f32 },
}

pub struct QuantizeQ8 {
    input: Q8Input,
}

impl QuantizeQ8 {
    pub fn new(gpu: &Gpu, input: Q8Input) -> Result<QuantizeQ8> {
        let k = QuantizeQ8 { input };
        gpu.pipeline(&k.key(gpu))?;
        Ok(k)
    }

    fn key(&self, gpu: &Gpu) -> PipelineKey {
        let key = PipelineKey::new("quantize_q8", &[REDUCE_WGSL, WGSL], gpu.flags());
        match self.input {
            Q8Input::Plain => key,
            Q8Input::Norm { .. } => key.define("NORM"),
            Q8Input::NormLast { .. } => key.define("NORM").define("LAST"),
        }
    }

    /// Binds x `[n, k]` (f32) -> xq (`n` vectors of [`q8_words`]`(k)` words); `norm` is the
    /// norm weight for [`Q8Input::Norm`] / [`Q8Input::NormLast`], `state` the step state for
    /// the latter. Returns the dispatch and its workgroups.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer,
        norm: Option<&GpuBuffer>,
        state: Option<&GpuBuffer>,
        xq: &GpuBuffer,
        n: usize,
        k: usize,
    ) -> Result<(Bound, [u32; 3])> {
        if k == 0 || !k.is_multiple_of(32) {
            return Err(Error::InvalidArgument(format!("8-bit quantization takes multiples of 32 elements, not {k}")));
        }
        let stride = q8_words(k);
        let (eps, last) = match self.input {
            Q8Input::Plain => (0.0, false),
            Q8Input::Norm { eps } => (eps, false),
            Q8Input::NormLast { eps } => (eps, true),
        };
        let vectors = if last { 1 } else { n };
        let fits = |b: &GpuBuffer, bytes: usize| b.size >= bytes as u64;
        if !fits(x, n * k * 4) || !fits(xq, vectors * stride * 4) {
            return Err(Error::InvalidArgument(format!(
                "quantize: {n} vectors of {k} need {} bytes of x (have {}) and {} of output (have {})",
                n * k * 4,
                x.size,
                vectors * stride * 4,
                xq.size
            )));
        }
        let pipeline = gpu.pipeline(&self.key(gpu))?;
        let params = gpu.uniform("quantize_q8", &Params { k: k as u32, stride: stride as u32, eps, _pad: 0 });
        let mut entries = vec![params.binding(), x.binding(), xq.binding()];
        match (self.input, norm, state) {
            (Q8Input::Plain, None, None) => {}
            (Q8Input::Norm { .. }, Some(g), None) | (Q8Input::NormLast { .. }, Some(g), Some(_)) => {
                if g.size < k as u64 * 4 {
                    return Err(Error::InvalidArgument(format!("norm weight of {} bytes for {k} columns", g.size)));
                }
                entries.push(g.binding());
                if let Some(s) = state {
                    entries.push(s.binding());
                }
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "quantize {:?} bound with{} a norm weight and with{} a step state",
                    self.input,
                    if norm.is_some() { "" } else { "out" },
                    if state.is_some() { "" } else { "out" }
                )))
            }
        }
        let bind_group = gpu.bind_group(&pipeline, &entries);
        let groups = [(k / 4).div_ceil(WG) as u32, vectors as u32, 1];
        Ok((Bound { pipeline, bind_group, params: Some(params) }, groups))
    }
}

/// One quantized block: its bytes, scale and `d * sum(q)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Q8Block {
    pub q: [i8; 32],
    pub d: f32,
    pub s: f32,
}

/// CPU reference of the quantization of one vector (f32 arithmetic, as the shader does it).
pub fn reference(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(32)
        .map(|b| {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut q = [0i8; 32];
            for (o, v) in q.iter_mut().zip(b) {
                *o = (v * inv).round_ties_even() as i8;
            }
            let d = amax / 127.0;
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            Q8Block { q, d, s: d * sum as f32 }
        })
        .collect()
}

/// Reads the blocks of one vector from the words of [`QuantizeQ8::bind`]'s layout.
pub fn unpack(words: &[u32], k: usize) -> Vec<Q8Block> {
    (0..k / 32)
        .map(|b| {
            let mut q = [0i8; 32];
            for (j, o) in q.iter_mut().enumerate() {
                *o = (words[b * 8 + j / 4] >> (8 * (j % 4))) as u8 as i8;
            }
            let at = k / 4 + 2 * b;
            Q8Block { q, d: f32::from_bits(words[at]), s: f32::from_bits(words[at + 1]) }
        })
        .collect()
}

/// The inverse: words of one vector in the shader's layout (tests of the products).
pub fn pack(blocks: &[Q8Block]) -> Vec<u32> {
    let k = blocks.len() * 32;
    let mut words = vec![0u32; q8_words(k)];
    for (b, blk) in blocks.iter().enumerate() {
        for (j, &v) in blk.q.iter().enumerate() {
            words[b * 8 + j / 4] |= (v as u8 as u32) << (8 * (j % 4));
        }
        words[k / 4 + 2 * b] = blk.d.to_bits();
        words[k / 4 + 2 * b + 1] = blk.s.to_bits();
    }
    words
}

/// The values a block stands for (`d * q`).
pub fn dequantize(blocks: &[Q8Block]) -> Vec<f32> {
    blocks.iter().flat_map(|b| b.q.map(|v| b.d * v as f32)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::{rms_norm, run_pass, testing::*};

    /// GPU and CPU blocks agree: scales to rounding, bytes within one (a value on a rounding
    /// boundary may round either way after the GPU's division), s consistent with the bytes.
    pub(crate) fn check(what: &str, got: &[Q8Block], want: &[Q8Block]) {
        assert_eq!(got.len(), want.len());
        let mut off_by_one = 0;
        for (b, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g.d - w.d).abs() <= 1e-6 * w.d.abs() + 1e-30, "{what}: block {b} d {} vs {}", g.d, w.d);
            for (j, (&a, &c)) in g.q.iter().zip(&w.q).enumerate() {
                assert!((a as i32 - c as i32).abs() <= 1, "{what}: block {b} byte {j}: {a} vs {c}");
                off_by_one += (a != c) as usize;
            }
            let sum: i32 = g.q.iter().map(|&v| v as i32).sum();
            let s = g.d * sum as f32;
            assert!((g.s - s).abs() <= 1e-5 * (g.d * 32.0 * 127.0), "{what}: block {b} s {} vs {s}", g.s);
        }
        assert!(off_by_one * 100 <= got.len() * 32, "{what}: {off_by_one} bytes differ by one");
    }

    #[test]
    fn matches_reference() {
        for gpu in variants() {
            // Odd counts of blocks and workgroups, and the real widths of SmolLM2-135M (576,
            // 1536) and Llama-3-8B (4096, 14336).
            for (n, k) in [(1, 32), (3, 96), (2, 576), (1, 1536), (2, 4096), (1, 14336), (1, 8224)] {
                let mut rng = Rng::new(k as u64 * 7 + n as u64);
                let mut x = rng.vec(n * k, 2.0);
                // A zero block and one with a single large value.
                x[..32].fill(0.0);
                if k > 64 {
                    x[40] = 50.0;
                }
                let g = rng.vec(k, 1.5);
                let xb = gpu.upload("x", &x).unwrap();
                let gb = gpu.upload("g", &g).unwrap();
                let stride = q8_words(k);
                let out = gpu.storage("xq", (n * stride * 4) as u64).unwrap();
                let state = gpu.upload("state", &[0u32, n as u32, 0, 0]).unwrap();
                for input in [Q8Input::Plain, Q8Input::Norm { eps: 1e-5 }, Q8Input::NormLast { eps: 1e-5 }] {
                    let kq = QuantizeQ8::new(gpu, input).unwrap();
                    let (norm, st) = match input {
                        Q8Input::Plain => (None, None),
                        Q8Input::Norm { .. } => (Some(&gb), None),
                        Q8Input::NormLast { .. } => (Some(&gb), Some(&state)),
                    };
                    let (b, groups) = kq.bind(gpu, &xb, norm, st, &out, n, k).unwrap();
                    run_pass(gpu, |p| b.record(p, groups)).unwrap();
                    let words: Vec<u32> = gpu.read(&out, 0, n * stride).unwrap();
                    let src: Vec<f32> = match input {
                        Q8Input::Plain => x.clone(),
                        _ => rms_norm::reference(&x, &g, k, 1e-5).iter().map(|&v| v as f32).collect(),
                    };
                    let rows: Vec<usize> =
                        if matches!(input, Q8Input::NormLast { .. }) { vec![n - 1] } else { (0..n).collect() };
                    for (slot, &row) in rows.iter().enumerate() {
                        let got = unpack(&words[slot * stride..], k);
                        let want = reference(&src[row * k..(row + 1) * k]);
                        check(&format!("quantize {input:?} {n}x{k} row {row} {:?}", gpu.flags()), &got, &want);
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let gpu = &variants()[0];
        let kq = QuantizeQ8::new(gpu, Q8Input::Plain).unwrap();
        let x = gpu.storage("x", 4096).unwrap();
        let xq = gpu.storage("xq", 4096).unwrap();
        assert!(kq.bind(gpu, &x, None, None, &xq, 1, 33).is_err());
        assert!(kq.bind(gpu, &x, None, None, &xq, 2, 1024).is_err());
        assert!(kq.bind(gpu, &x, Some(&x), None, &xq, 1, 32).is_err());
    }
}
