//! RMSNorm over rows: `y = x / sqrt(mean(x^2) + eps) * w`.

use super::{groups_1d, Bound, REDUCE_WGSL};
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::Result;
use std::sync::Arc;

const WGSL: &str = include_str!("../../shaders/norm/rms_norm.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    pub _pad: u32,
}

pub struct RmsNorm {
    key: PipelineKey,
}

/// Threads of the kernel's workgroup (rms_norm.wgsl).
const WG: u32 = 256;
/// Most elements per thread the kernel keeps in registers.
const HELD_MAX: u32 = 16;

impl RmsNorm {
    pub fn new(gpu: &Gpu) -> Result<RmsNorm> {
        let k = RmsNorm { key: PipelineKey::new("rms_norm", &[REDUCE_WGSL, WGSL], gpu.flags()) };
        // Compile the common widths now (SmolLM2's and Llama-3-8B's), the rest on first bind.
        for dim in [576, 4096] {
            k.pipelines(gpu, dim)?;
        }
        Ok(k)
    }

    /// The row and last-row pipelines for rows of `dim` elements: each thread holds
    /// ceil(dim / WG) of them (at most HELD_MAX) in registers.
    fn pipelines(&self, gpu: &Gpu, dim: u32) -> Result<(Arc<wgpu::ComputePipeline>, Arc<wgpu::ComputePipeline>)> {
        let held = dim.div_ceil(WG).clamp(1, HELD_MAX);
        let key = self.key.clone().constant("HELD", held);
        Ok((gpu.pipeline(&key)?, gpu.pipeline(&key.entry("last_row"))?))
    }

    /// Binds x [rows, dim] -> y [rows, dim] with weight w [dim].
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer,
        w: &GpuBuffer,
        y: &GpuBuffer,
        rows: u32,
        dim: u32,
        eps: f32,
    ) -> Result<Bound> {
        let (pipeline, _) = self.pipelines(gpu, dim)?;
        let params = gpu.uniform("rms_norm", &Params { rows, dim, eps, _pad: 0 });
        let bind_group = gpu.bind_group(&pipeline, &[params.binding(), x.binding(), w.binding(), y.binding()]);
        Ok(Bound { pipeline, bind_group, params: Some(params) })
    }

    /// Binds the norm of the step's last row (row `state[1] - 1` of x) into y [dim]; one
    /// workgroup.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_last(
        &self,
        gpu: &Gpu,
        state: &GpuBuffer,
        x: &GpuBuffer,
        w: &GpuBuffer,
        y: &GpuBuffer,
        dim: u32,
        eps: f32,
    ) -> Result<Bound> {
        let (_, pipeline) = self.pipelines(gpu, dim)?;
        let params = gpu.uniform("rms_norm_last", &Params { rows: 1, dim, eps, _pad: 0 });
        let bind_group =
            gpu.bind_group(&pipeline, &[params.binding(), x.binding(), w.binding(), y.binding(), state.binding()]);
        Ok(Bound { pipeline, bind_group, params: Some(params) })
    }
}

/// Workgroups for `rows` rows: one each.
pub fn groups(rows: u32) -> [u32; 3] {
    groups_1d(rows)
}

/// CPU reference in f64.
pub fn reference(x: &[f32], w: &[f32], dim: usize, eps: f32) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| v as f64 * s * g as f64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{run_pass, testing::*};

    #[test]
    fn matches_reference() {
        for gpu in variants() {
            let k = RmsNorm::new(gpu).unwrap();
            // Odd sizes and the real sizes of SmolLM2-135M (576) and Llama-3-8B (4096).
            for (rows, dim) in [(1, 1), (3, 7), (5, 333), (7, 576), (2, 4096), (1, 4097), (2, 5000)] {
                let mut rng = Rng::new(rows as u64 * 1000 + dim as u64);
                let x = rng.vec(rows * dim, 3.0);
                let w = rng.vec(dim, 1.5);
                let (xb, wb) = (gpu.upload("x", &x).unwrap(), gpu.upload("w", &w).unwrap());
                let yb = gpu.storage("y", (rows * dim * 4) as u64).unwrap();
                let b = k.bind(gpu, &xb, &wb, &yb, rows as u32, dim as u32, 1e-5).unwrap();
                run_pass(gpu, |p| b.record(p, groups(rows as u32))).unwrap();
                let got: Vec<f32> = gpu.read(&yb, 0, rows * dim).unwrap();
                let want = reference(&x, &w, dim, 1e-5);
                assert_close(&format!("rms_norm {rows}x{dim} {:?}", gpu.flags()), &got, &want, 1e-5, 1e-5);
                // The last-row entry: the step has `rows` tokens, the output is the last one.
                let state = gpu.upload("state", &[0u32, rows as u32, 0, 0]).unwrap();
                let last = gpu.storage("last", dim as u64 * 4).unwrap();
                let b = k.bind_last(gpu, &state, &xb, &wb, &last, dim as u32, 1e-5).unwrap();
                run_pass(gpu, |p| b.record(p, [1, 1, 1])).unwrap();
                let got: Vec<f32> = gpu.read(&last, 0, dim).unwrap();
                assert_close("rms_norm last row", &got, &want[(rows - 1) * dim..], 1e-5, 1e-5);
            }
        }
    }
}
