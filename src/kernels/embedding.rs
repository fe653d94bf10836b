//! Embedding lookup: `out[t, :] = E[tokens[token_offset + t], :]` for `t < n`, any weight
//! format, dequantized to f32. Ids past the end of the table give zero rows (never an
//! out-of-bounds read).

use super::matmul::{w_define, GpuMatrix, WEIGHTS_WGSL};
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
}

impl Embedding {
    pub fn new(gpu: &Gpu, dtype: DType) -> Result<Embedding> {
        let key = PipelineKey::new("embedding", &[WEIGHTS_WGSL, WGSL], gpu.flags()).define(w_define(dtype));
        Ok(Embedding { dtype, pipeline: gpu.pipeline(&key)? })
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
            let bind_group =
                gpu.bind_group(&self.pipeline, &[params.binding(), tokens.binding(), out.binding(), c.buf.binding()]);
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
