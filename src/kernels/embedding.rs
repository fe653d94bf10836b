//! Embedding lookup: `out[t, :] = E[tokens[token_offset + t], :]` for `t < n`, any weight
//! format, dequantized to f32. Ids past the end of the table give zero rows (never an
//! out-of-bounds read).

use super::matmul::{q8_norm_words, w_define, GpuMatrix, WEIGHTS_WGSL};
use super::{groups_1d, Bound};
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::model::quant::DType;
use crate::{Error, Result};
use std::sync::Arc;

const WGSL: &str = include_str!("../../shaders/matmul/embedding.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Token count; first so that `set_rows` rewrites one word.
    pub n: u32,
    pub tok_off: u32,
    pub cols: u32,
    pub row_start: u32,
    pub rows: u32,
    pub last: u32,
    pub w_stride: u32,
    pub w_scale: u32,
}

pub struct Embedding {
    dtype: DType,
    pipeline: Arc<wgpu::ComputePipeline>,
    q8_norm: bool,
}

impl Embedding {
    pub fn new(gpu: &Gpu, dtype: DType) -> Result<Embedding> {
        let key = PipelineKey::new("embedding", &[WEIGHTS_WGSL, WGSL], gpu.flags()).define(w_define(dtype));
        Ok(Embedding { dtype, pipeline: gpu.pipeline(&key)?, q8_norm: false })
    }

    /// The gather that also writes each row as the first layer's norm input in
    /// [`MatVec::with_q8_norm_output`](super::matmul::MatVec::with_q8_norm_output)'s layout (bound with [`Embedding::bind_q8_norm`]),
    /// which that layer's [`MatVec::with_norm_scale`](super::matmul::MatVec::with_norm_scale) products of 8-bit vectors read: no norm
    /// dispatch in front of them (decode steps with 8-bit vectors, `Caps::q8_activations`).
    pub fn with_q8_norm(gpu: &Gpu, dtype: DType) -> Result<Embedding> {
        let key =
            PipelineKey::new("embedding", &[WEIGHTS_WGSL, WGSL], gpu.flags()).define(w_define(dtype)).define("Q8NORM");
        Ok(Embedding { dtype, pipeline: gpu.pipeline(&key)?, q8_norm: true })
    }

    /// Binds the gather of `n` tokens (`tokens` u32 from `token_offset`) into `out` `[n, cols]`:
    /// one dispatch per chunk of `e`, each writing the tokens whose ids fall in its rows.
    pub fn bind(
        &self,
        gpu: &Gpu,
        e: &GpuMatrix,
        tokens: &GpuBuffer,
        token_offset: usize,
        out: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        if self.q8_norm {
            return Err(Error::InvalidArgument("an embedding built with_q8_norm binds through bind_q8_norm".into()));
        }
        self.bind_all(gpu, e, tokens, token_offset, out, &[], n)
    }

    /// [`Embedding::bind`] for a gather built [`Embedding::with_q8_norm`]: `g` is the norm
    /// weight (`cols` floats), `xq` receives [`q8_norm_words`]`(cols)` words per token.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_q8_norm(
        &self,
        gpu: &Gpu,
        e: &GpuMatrix,
        tokens: &GpuBuffer,
        token_offset: usize,
        out: &GpuBuffer,
        g: &GpuBuffer,
        xq: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        if !self.q8_norm {
            return Err(Error::InvalidArgument("bind_q8_norm needs an embedding built with_q8_norm".into()));
        }
        let words = n.checked_mul(q8_norm_words(e.cols)).map(|w| w as u64 * 4);
        if !e.cols.is_multiple_of(32) || g.size < e.cols as u64 * 4 || words.is_none_or(|b| b > xq.size) {
            return Err(Error::InvalidArgument(format!(
                "an 8-bit norm input of {n} rows of {} columns (whole 32-column blocks) needs a norm weight of {} bytes and an output of {:?} bytes, not {} and {}",
                e.cols,
                e.cols * 4,
                words,
                g.size,
                xq.size
            )));
        }
        self.bind_all(gpu, e, tokens, token_offset, out, &[g, xq], n)
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_all(
        &self,
        gpu: &Gpu,
        e: &GpuMatrix,
        tokens: &GpuBuffer,
        token_offset: usize,
        out: &GpuBuffer,
        tail: &[&GpuBuffer],
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        if e.dtype != self.dtype {
            return Err(Error::InvalidArgument(format!(
                "embedding built for {} got a {} matrix",
                self.dtype.name(),
                e.dtype.name()
            )));
        }
        let tok_end = token_offset.checked_add(n).map(|v| v as u64 * 4);
        let out_end = n.checked_mul(e.cols).map(|v| v as u64 * 4);
        match (tok_end, out_end) {
            (Some(a), Some(b)) if a <= tokens.size && b <= out.size && b / 4 <= u32::MAX as u64 => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                "embedding of {n} tokens from {token_offset}: tokens buffer {} bytes, output {} bytes for {} columns",
                tokens.size, out.size, e.cols
            )))
            }
        }
        if e.cols.div_ceil(COLS_PER_GROUP) > 65535 {
            return Err(Error::InvalidArgument(format!("an embedding of {} columns is too wide to gather", e.cols)));
        }
        let mut v = Vec::new();
        for (i, c) in e.chunks.iter().enumerate() {
            let p = Params {
                n: n as u32,
                tok_off: token_offset as u32,
                cols: e.cols as u32,
                row_start: c.row_start as u32,
                rows: c.rows as u32,
                last: (i + 1 == e.chunks.len()) as u32,
                w_stride: c.layout.row_stride as u32,
                w_scale: c.layout.scale_offset as u32,
            };
            let params = gpu.uniform("embedding", &p);
            let mut entries = vec![params.binding(), tokens.binding(), out.binding(), c.buf.binding()];
            entries.extend(tail.iter().map(|b| b.binding()));
            let bind_group = gpu.bind_group(&self.pipeline, &entries);
            v.push((
                Bound { pipeline: self.pipeline.clone(), bind_group, params: Some(params) },
                groups(e.cols, n as u32),
            ));
        }
        Ok(v)
    }

    /// Changes the token count of bound dispatches to `n` (at most the count they were bound with).
    pub fn set_rows(&self, queue: &wgpu::Queue, bound: &mut [(Bound, [u32; 3])], n: u32) {
        for (b, g) in bound {
            if let Some(u) = &b.params {
                queue.write_buffer(&u.buffer, 0, bytemuck::bytes_of(&n));
            }
            // The column blocks stay; the tokens change.
            let t = groups_1d(n);
            *g = [g[0], t[0], t[1]];
        }
    }
}

/// Columns one workgroup gathers (embedding.wgsl's COLS).
pub const COLS_PER_GROUP: usize = 256;

/// Workgroups of a gather of `n` tokens of `cols` columns: column blocks x tokens (the
/// tokens over y and z past 65,535).
pub fn groups(cols: usize, n: u32) -> [u32; 3] {
    let t = groups_1d(n);
    [cols.div_ceil(COLS_PER_GROUP).max(1) as u32, t[0], t[1]]
}

/// CPU reference: rows of the dequantized table `e` `[rows, cols]`, zeros for ids past the end.
pub fn reference(e: &[f32], cols: usize, tokens: &[u32]) -> Vec<f32> {
    let rows = e.len() / cols;
    let mut out = Vec::with_capacity(tokens.len() * cols);
    for &t in tokens {
        if (t as usize) < rows {
            out.extend_from_slice(&e[t as usize * cols..(t as usize + 1) * cols]);
        } else {
            out.extend(std::iter::repeat_n(0.0, cols));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::tests::weights;
    use crate::kernels::{run_pass, testing::*};

    fn run(gpu: &Gpu, dtype: DType, rows: usize, cols: usize, ntok: usize, seed: u64) -> usize {
        let mut rng = Rng::new(seed);
        let (q, d) = weights(dtype, rows, cols, &mut rng);
        let e = GpuMatrix::upload(gpu, "e", dtype, rows, cols, &q).unwrap();
        // Two leading ids that are skipped, then ids in range, the last row, and past the end.
        let mut toks: Vec<u32> = (0..ntok).map(|_| rng.next_u32() % rows as u32).collect();
        toks.extend([rows as u32 - 1, 0, rows as u32, u32::MAX]);
        let all: Vec<u32> = [7, 9].into_iter().chain(toks.iter().copied()).collect();
        let tb = gpu.upload("tokens", &all).unwrap();
        let ob = gpu.upload("out", &vec![5.0f32; toks.len() * cols]).unwrap();
        let k = Embedding::new(gpu, dtype).unwrap();
        let bound = k.bind(gpu, &e, &tb, 2, &ob, toks.len()).unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, g)| b.record(p, *g))).unwrap();
        let got: Vec<f32> = gpu.read(&ob, 0, toks.len() * cols).unwrap();
        let want = reference(&d, cols, &toks);
        assert!(
            got == want,
            "embedding {} {rows}x{cols} chunks={} {:?}: first difference at {:?}",
            dtype.name(),
            e.chunks.len(),
            gpu.flags(),
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        e.chunks.len()
    }

    /// The gather with the first layer's 8-bit norm input: x as the plain gather, the blocks
    /// as quantize_q8 makes them from x * g, the sums of squares of x per block; and a
    /// product that scales by 1 / rms (layer 0's Q/K/V) equals the CPU product of the
    /// normalised row. Ids past the table give zero blocks.
    fn run_q8_norm(gpu: &Gpu, dtype: DType, rows: usize, cols: usize, ntok: usize, seed: u64) -> usize {
        use crate::kernels::matmul::{Epilogue, MatVec};
        use crate::kernels::quantize;
        let mut rng = Rng::new(seed);
        let (q, d) = weights(dtype, rows, cols, &mut rng);
        let e = GpuMatrix::upload(gpu, "e", dtype, rows, cols, &q).unwrap();
        let mut toks: Vec<u32> = (0..ntok).map(|_| rng.next_u32() % rows as u32).collect();
        toks.extend([rows as u32 - 1, rows as u32]);
        let g: Vec<f32> = rng.vec(cols, 1.0).iter().map(|v| 0.5 + v.abs()).collect();
        let (tb, gb) = (gpu.upload("tokens", &toks).unwrap(), gpu.upload("g", &g).unwrap());
        let ob = gpu.upload("out", &vec![5.0f32; toks.len() * cols]).unwrap();
        let qw = q8_norm_words(cols);
        let xq = gpu.upload("xq", &vec![u32::MAX; toks.len() * qw]).unwrap();
        let k = Embedding::with_q8_norm(gpu, dtype).unwrap();
        assert!(k.bind(gpu, &e, &tb, 0, &ob, toks.len()).is_err());
        assert!(k.bind_q8_norm(gpu, &e, &tb, 0, &ob, &gb, &xq, toks.len() + 1).is_err(), "output too short");
        let bound = k.bind_q8_norm(gpu, &e, &tb, 0, &ob, &gb, &xq, toks.len()).unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, g)| b.record(p, *g))).unwrap();
        let what =
            format!("q8-norm embedding {} {rows}x{cols} chunks={} {:?}", dtype.name(), e.chunks.len(), gpu.flags());
        let x: Vec<f32> = gpu.read(&ob, 0, toks.len() * cols).unwrap();
        assert!(x == reference(&d, cols, &toks), "{what}: rows");
        let words: Vec<u32> = gpu.read(&xq, 0, toks.len() * qw).unwrap();
        let mut xn = vec![];
        for (t, row) in x.chunks_exact(cols).enumerate() {
            let xg: Vec<f32> = row.iter().zip(&g).map(|(a, b)| a * b).collect();
            let got = quantize::unpack(&words[t * qw..], cols);
            quantize::tests::check(&what, &got, &quantize::reference(&xg));
            for (bi, c) in row.chunks_exact(32).enumerate() {
                let want: f64 = c.iter().map(|&a| a as f64 * a as f64).sum();
                let sq = f32::from_bits(words[t * qw + quantize::q8_words(cols) + bi]) as f64;
                assert!((sq - want).abs() <= 1e-5 * want, "{what}: token {t} block {bi} sum of squares {sq} vs {want}");
            }
            let ms = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / cols as f64;
            let r = 1.0 / (ms + 1e-5).sqrt();
            xn.extend(quantize::dequantize(&got).iter().map(|&a| (a as f64 * r) as f32));
        }
        // Layer 0's Q/K/V kernel reads it.
        let n2 = 40;
        let (wq, wd) = weights(DType::Q4_0, n2, cols, &mut rng);
        let w2 = GpuMatrix::upload(gpu, "w2", DType::Q4_0, n2, cols, &wq).unwrap();
        let y = gpu.storage("y", (toks.len() * n2 * 4) as u64).unwrap();
        let kv = MatVec::with_q8_input(gpu, DType::Q4_0, Epilogue::Store).unwrap().with_norm_scale(1e-5).unwrap();
        let b2 = kv.bind(gpu, &w2, &xq, 0, &y, toks.len()).unwrap();
        run_pass(gpu, |p| b2.iter().for_each(|(b, g)| b.record(p, *g))).unwrap();
        let got: Vec<f32> = gpu.read(&y, 0, toks.len() * n2).unwrap();
        for (t, xr) in xn.chunks_exact(cols).enumerate() {
            for r in 0..n2 {
                let want: f64 = (0..cols).map(|c| wd[r * cols + c] as f64 * xr[c] as f64).sum();
                let scale: f64 = (0..cols).map(|c| (wd[r * cols + c] as f64 * xr[c] as f64).abs()).sum();
                let e = (got[t * n2 + r] as f64 - want).abs();
                assert!(e <= 1e-4 * scale + 1e-6, "{what}: product token {t} row {r}: {} vs {want}", got[t * n2 + r]);
            }
        }
        e.chunks.len()
    }

    #[test]
    fn q8_norm_input_matches_reference() {
        for gpu in variants() {
            for dtype in DType::ALL {
                // Three blocks in one workgroup; 13 blocks over two workgroups, the second
                // partly past the row.
                run_q8_norm(gpu, dtype, 37, 96, 3, 11);
                run_q8_norm(gpu, dtype, 3, 416, 1, 12);
            }
        }
        // The SmolLM2 table and a Llama-3-8B-wide one.
        run_q8_norm(&variants()[0], DType::Q4_1, 49152, 576, 2, 13);
        run_q8_norm(&variants()[0], DType::Q4_0, 300, 4096, 1, 14);
        assert!(run_q8_norm(&small_binding_gpu(4096), DType::Q8_0, 333, 96, 20, 15) >= 2, "split table");
    }

    #[test]
    fn matches_reference() {
        for gpu in variants() {
            for dtype in DType::ALL {
                let cols = if dtype.is_quantized() { 96 } else { 7 };
                run(gpu, dtype, 37, cols, 5, 1);
                run(gpu, dtype, 3, 416, 1, 2);
            }
        }
        // The SmolLM2 table.
        run(&variants()[0], DType::Q4_1, 49152, 576, 9, 3);
    }

    #[test]
    fn split_table() {
        let gpu = small_binding_gpu(4096);
        for dtype in DType::ALL {
            let chunks = run(&gpu, dtype, 333, 96, 40, 4);
            assert!(chunks >= 2, "{dtype:?}: {chunks} chunk");
        }
    }
}
