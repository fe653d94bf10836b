//! Probes of what the adapter can do at best: a copy (memory bandwidth) and a chain of
//! multiply-adds (f32 arithmetic peak). The microbenchmarks report every kernel as a share of
//! these, measured on the same device in the same run. A third probe measures what a
//! dependent dispatch boundary costs against handing the dependency over inside one dispatch
//! (handoff.wgsl), the question behind fusing a decode step's products.

use crate::error::Result;
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::kernels::Bound;
use std::sync::Arc;

const COPY_WGSL: &str = include_str!("../../shaders/probe/copy.wgsl");
const FMA_WGSL: &str = include_str!("../../shaders/probe/fma.wgsl");
const HANDOFF_WGSL: &str = include_str!("../../shaders/probe/handoff.wgsl");

/// Workgroups of the copy: enough to fill any current GPU, few enough that each invocation
/// loops over several vectors.
pub const COPY_GROUPS: u32 = 4096;
/// Vec4 multiply-adds per invocation per iteration of the fma probe.
pub const FMA_CHAINS: u32 = 8;

pub struct Probes {
    copy: Arc<wgpu::ComputePipeline>,
    fma: Arc<wgpu::ComputePipeline>,
    handoff: Arc<wgpu::ComputePipeline>,
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
            handoff: gpu.pipeline(&PipelineKey::new("probe_handoff", &[HANDOFF_WGSL], f))?,
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

/// Workgroups and slice sizes (vec4s per workgroup) of the handoff probe's two stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffShape {
    pub a_groups: u32,
    pub b_groups: u32,
    pub a_words: u32,
    pub b_words: u32,
}

/// How the handoff probe runs its stages (handoff.wgsl's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffMode {
    /// Stage A alone (the first of two dependent dispatches).
    A = 0,
    /// Stage B alone, reading what an earlier dispatch of stage A wrote.
    B = 1,
    /// Both in one dispatch; B reads its own slice, then waits for A.
    FusedLoadFirst = 2,
    /// Both in one dispatch; B waits for A, then reads its own slice.
    FusedLoadAfter = 3,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct HandoffParams {
    a_groups: u32,
    b_groups: u32,
    a_words: u32,
    b_words: u32,
    mode: u32,
    src_off: u32,
    _pad: [u32; 2],
}

impl HandoffShape {
    /// vec4s of `src` the probe reads: A's slices, then B's.
    pub fn src_vec4s(&self) -> u64 {
        self.a_groups as u64 * self.a_words as u64 + self.b_groups as u64 * self.b_words as u64
    }

    /// Words of the `sums` buffer: A's sums and two counts (zero before the first dispatch;
    /// the fused modes leave them zero).
    pub fn sum_words(&self) -> u64 {
        self.a_groups as u64 + 2
    }

    /// The workgroup grid of `mode`.
    pub fn groups(&self, mode: HandoffMode) -> [u32; 3] {
        match mode {
            HandoffMode::A => [self.a_groups, 1, 1],
            HandoffMode::B => [self.b_groups, 1, 1],
            HandoffMode::FusedLoadFirst | HandoffMode::FusedLoadAfter => [self.a_groups + self.b_groups, 1, 1],
        }
    }
}

impl Probes {
    /// Stage(s) `mode` of the handoff probe over `src` ([`HandoffShape::src_vec4s`] vec4s),
    /// `sums` ([`HandoffShape::sum_words`] words) and `out` (`b_groups` floats): `out[g]` is
    /// the sum of B's slice g plus the sums of all of A's slices ([`handoff_reference`]).
    pub fn bind_handoff(
        &self,
        gpu: &Gpu,
        src: &GpuBuffer,
        sums: &GpuBuffer,
        out: &GpuBuffer,
        sh: HandoffShape,
        mode: HandoffMode,
    ) -> Result<Bound> {
        self.bind_handoff_at(gpu, (src, 0), sums, out, sh, mode)
    }

    /// [`Probes::bind_handoff`] over `src` from its `src.1`-th vec4.
    pub fn bind_handoff_at(
        &self,
        gpu: &Gpu,
        src: (&GpuBuffer, u32),
        sums: &GpuBuffer,
        out: &GpuBuffer,
        sh: HandoffShape,
        mode: HandoffMode,
    ) -> Result<Bound> {
        let (src, src_off) = src;
        let (a, b) = (sh.a_groups, sh.b_groups);
        if a == 0 || b == 0 || a.checked_add(b).is_none_or(|n| n > 65535) {
            return Err(crate::Error::Unsupported(format!("handoff probe of {a} + {b} workgroups")));
        }
        let fits = |buf: &GpuBuffer, bytes: u64| buf.size >= bytes;
        if !fits(src, (src_off as u64 + sh.src_vec4s()) * 16)
            || !fits(sums, sh.sum_words() * 4)
            || !fits(out, b as u64 * 4)
        {
            return Err(crate::Error::Unsupported("handoff probe buffers smaller than its shape".into()));
        }
        let params = HandoffParams {
            a_groups: a,
            b_groups: b,
            a_words: sh.a_words,
            b_words: sh.b_words,
            mode: mode as u32,
            src_off,
            _pad: [0; 2],
        };
        let params = gpu.uniform("probe_handoff", &params);
        let bind_group =
            gpu.bind_group(&self.handoff, &[params.binding(), src.binding(), sums.binding(), out.binding()]);
        Ok(Bound { pipeline: self.handoff.clone(), bind_group, params: Some(params) })
    }
}

/// What the handoff probe writes for `src` (in f64).
pub fn handoff_reference(src: &[f32], sh: HandoffShape) -> Vec<f64> {
    let slice =
        |first: usize, words: u32| src[first * 4..(first + words as usize) * 4].iter().map(|&v| v as f64).sum::<f64>();
    let a_total: f64 = (0..sh.a_groups as usize).map(|g| slice(g * sh.a_words as usize, sh.a_words)).sum();
    let b0 = sh.a_groups as usize * sh.a_words as usize;
    (0..sh.b_groups as usize).map(|g| slice(b0 + g * sh.b_words as usize, sh.b_words) + a_total).collect()
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
    fn handoff_modes_match_reference() {
        for gpu in variants() {
            let k = Probes::new(gpu).unwrap();
            // Odd sizes (slices shorter and longer than a workgroup, more A sums than
            // invocations) and the benchmark's GPU shape.
            let shapes = [
                HandoffShape { a_groups: 3, b_groups: 5, a_words: 7, b_words: 301 },
                HandoffShape { a_groups: 300, b_groups: 2, a_words: 513, b_words: 1 },
                HandoffShape { a_groups: 1024, b_groups: 1024, a_words: 64, b_words: 64 },
            ];
            for sh in shapes {
                let x = Rng::new(sh.a_groups as u64).vec(sh.src_vec4s() as usize * 4, 1.0);
                let src = gpu.upload("src", &x).unwrap();
                let sums = gpu.storage("sums", sh.sum_words() * 4).unwrap();
                let want = handoff_reference(&x, sh);
                // f32 sums in another order: the error scales with the sum of magnitudes.
                let atol = 1e-6 * x.iter().map(|v| v.abs() as f64).sum::<f64>();
                let out = gpu.storage("out", sh.b_groups as u64 * 4).unwrap();
                let a = k.bind_handoff(gpu, &src, &sums, &out, sh, HandoffMode::A).unwrap();
                let b = k.bind_handoff(gpu, &src, &sums, &out, sh, HandoffMode::B).unwrap();
                run_pass(gpu, |p| {
                    a.record(p, sh.groups(HandoffMode::A));
                    b.record(p, sh.groups(HandoffMode::B));
                })
                .unwrap();
                let got: Vec<f32> = gpu.read(&out, 0, sh.b_groups as usize).unwrap();
                assert_close(&format!("{sh:?} in two dispatches"), &got, &want, atol, 1e-5);
                for mode in [HandoffMode::FusedLoadFirst, HandoffMode::FusedLoadAfter] {
                    // Twice in one pass: the counts must be back at zero after the first.
                    let out = gpu.storage("out", sh.b_groups as u64 * 4).unwrap();
                    let f = k.bind_handoff(gpu, &src, &sums, &out, sh, mode).unwrap();
                    run_pass(gpu, |p| {
                        f.record(p, sh.groups(mode));
                        f.record(p, sh.groups(mode));
                    })
                    .unwrap();
                    let got: Vec<f32> = gpu.read(&out, 0, sh.b_groups as usize).unwrap();
                    assert_close(&format!("{sh:?} {mode:?}"), &got, &want, atol, 1e-5);
                    let counts: Vec<u32> = gpu.read(&sums, sh.a_groups as u64 * 4, 2).unwrap();
                    assert_eq!(counts, [0, 0], "{sh:?} {mode:?}: counts reset");
                }
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
