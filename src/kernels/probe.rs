//! Probes of what the adapter can do at best: a copy (memory bandwidth) and a chain of
//! multiply-adds (f32 arithmetic peak). The microbenchmarks report every kernel as a share of
//! these, measured on the same device in the same run.

use crate::error::Result;
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::kernels::Bound;
use std::sync::Arc;

const COPY_WGSL: &str = include_str!("../../shaders/probe/copy.wgsl");
const FMA_WGSL: &str = include_str!("../../shaders/probe/fma.wgsl");

/// Workgroups of the copy: enough to fill any current GPU, few enough that each invocation
/// loops over several vectors.
pub const COPY_GROUPS: u32 = 4096;
/// Vec4 multiply-adds per invocation per iteration of the fma probe.
pub const FMA_CHAINS: u32 = 8;

pub struct Probes {
    copy: Arc<wgpu::ComputePipeline>,
    fma: Arc<wgpu::ComputePipeline>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FmaParams {
    iters: u32,
    _pad: [u32; 3],
}

impl Probes {
    pub fn new(gpu: &Gpu) -> Result<Probes> {
        let f = gpu.flags();
        Ok(Probes {
            copy: gpu.pipeline(&PipelineKey::new("probe_copy", &[COPY_WGSL], f))?,
            fma: gpu.pipeline(&PipelineKey::new("probe_fma", &[FMA_WGSL], f))?,
        })
    }

    /// `dst = src` (sizes in multiples of 16 bytes; dst's length decides); dispatch with
    /// `[COPY_GROUPS, 1, 1]` or fewer.
    pub fn bind_copy(&self, gpu: &Gpu, src: &GpuBuffer, dst: &GpuBuffer) -> Bound {
        let bind_group = gpu.bind_group(&self.copy, &[src.binding(), dst.binding()]);
        Bound { pipeline: self.copy.clone(), bind_group, params: None }
    }

    /// One value per invocation into `out` after `iters` iterations; dispatch
    /// `[out.len() / 256, 1, 1]` workgroups.
    pub fn bind_fma(&self, gpu: &Gpu, out: &GpuBuffer, iters: u32) -> Bound {
        let params = gpu.uniform("probe_fma", &FmaParams { iters, _pad: [0; 3] });
        let bind_group = gpu.bind_group(&self.fma, &[params.binding(), out.binding()]);
        Bound { pipeline: self.fma.clone(), bind_group, params: Some(params) }
    }
}

/// Floating-point operations of the fma probe over `invocations` threads.
pub fn fma_flops(invocations: u64, iters: u32) -> f64 {
    invocations as f64 * iters as f64 * FMA_CHAINS as f64 * 4.0 * 2.0
}

/// What invocation `i` of the fma probe writes, in f64.
pub fn fma_reference(i: u32, iters: u32) -> f64 {
    let s = (i % 1024) as f64 * 0.001;
    let mut total = 0.0;
    for chain in 0..FMA_CHAINS {
        for lane in 0..4 {
            let mut a = s + lane as f64 * 0.1 + chain as f64 * 0.01;
            for _ in 0..iters {
                a = a * 0.999 + 0.001;
            }
            total += a;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::run_pass;
    use crate::kernels::testing::{assert_close, variants, Rng};

    #[test]
    fn copy_moves_every_vector() {
        for gpu in variants() {
            let k = Probes::new(gpu).unwrap();
            // Odd sizes: fewer vectors than one group, and more than the grid covers at once.
            for n in [4usize, 36, 4 * 4096 * 256 + 44] {
                let x = Rng::new(n as u64).vec(n, 10.0);
                let src = gpu.upload("src", &x).unwrap();
                let dst = gpu.storage("dst", n as u64 * 4).unwrap();
                let b = k.bind_copy(gpu, &src, &dst);
                run_pass(gpu, |p| b.record(p, [COPY_GROUPS.min((n as u32 / 4).div_ceil(256)), 1, 1])).unwrap();
                let got: Vec<f32> = gpu.read(&dst, 0, n).unwrap();
                assert!(got == x, "copy of {n} floats");
            }
        }
    }

    #[test]
    fn fma_matches_reference() {
        for gpu in variants() {
            let k = Probes::new(gpu).unwrap();
            for iters in [0u32, 1, 37, 1000] {
                let n = 256 * 5;
                let out = gpu.storage("out", n as u64 * 4).unwrap();
                let b = k.bind_fma(gpu, &out, iters);
                run_pass(gpu, |p| b.record(p, [5, 1, 1])).unwrap();
                let got: Vec<f32> = gpu.read(&out, 0, n).unwrap();
                let want: Vec<f64> = (0..n as u32).map(|i| fma_reference(i, iters)).collect();
                assert_close(&format!("fma {iters} iterations"), &got, &want, 1e-3, 1e-4);
            }
        }
    }
}
