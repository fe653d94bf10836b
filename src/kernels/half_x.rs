//! f32 activations to f16 for the matrix-unit prefill products (`half_x.wgsl`).
//!
//! The cooperative-matrix kernel multiplies f16 operands. Fed f32 activations, every one of
//! a product's workgroup columns read and converted the same rows of x again; converted once
//! here, the product reads half the bytes and converts nothing (`MatMul::with_half_x`).

use super::Bound;
use crate::gpu::{Gpu, GpuBuffer, PipelineKey};
use crate::{Error, Result};
use std::sync::Arc;

const WGSL: &str = include_str!("../../shaders/matmul/half_x.wgsl");
/// Invocations per workgroup (half_x.wgsl); each converts 4 values.
const WG: usize = 256;
/// Largest finite f16: values beyond it are clamped to it.
pub const F16_MAX: f32 = 65504.0;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    _pad: [u32; 3],
}

pub struct HalfX {
    pipeline: Arc<wgpu::ComputePipeline>,
}

impl HalfX {
    /// Needs f16 in shaders ([`crate::gpu::Caps::f16`]).
    pub fn new(gpu: &Gpu) -> Result<HalfX> {
        if !gpu.caps.f16 {
            return Err(Error::InvalidArgument("f16 activations need an adapter with shader f16".into()));
        }
        Ok(HalfX { pipeline: gpu.pipeline(&PipelineKey::new("half_x", &[WGSL], gpu.flags()))? })
    }

    /// Binds x `[t, cols]` (f32, from element 0) -> xh `[t, cols]` (f16).
    pub fn bind(&self, gpu: &Gpu, x: &GpuBuffer, xh: &GpuBuffer, t: usize, cols: usize) -> Result<Bound> {
        let n = t.checked_mul(cols).filter(|n| n.is_multiple_of(4));
        let Some(n) = n.filter(|&n| n as u64 * 4 <= x.size && n as u64 * 2 <= xh.size) else {
            return Err(Error::InvalidArgument(format!(
                "half_x: {t} rows of {cols} need a multiple of 4 values, x of {} bytes (has {}) and xh of {} (has {})",
                t * cols * 4,
                x.size,
                t * cols * 2,
                xh.size
            )));
        };
        if Self::groups(t, cols)[0] > 65535 {
            return Err(Error::InvalidArgument(format!("half_x: {t} rows of {cols} need more than 65535 workgroups")));
        }
        let params = gpu.uniform("half_x", &Params { count: (n / 4) as u32, _pad: [0; 3] });
        let bind_group = gpu.bind_group(&self.pipeline, &[params.binding(), x.binding(), xh.binding()]);
        Ok(Bound { pipeline: self.pipeline.clone(), bind_group, params: Some(params) })
    }

    /// Workgroups converting the first `t` rows of `cols` values.
    pub fn groups(t: usize, cols: usize) -> [u32; 3] {
        [(t * cols).div_ceil(4 * WG).max(1) as u32, 1, 1]
    }
}

/// CPU reference: the f16 bits of each value, clamped to f16's finite range.
pub fn reference(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| half::f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_bits()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{run_pass, testing::*};

    #[test]
    fn matches_reference() {
        for gpu in variants().iter().filter(|g| g.caps.f16) {
            let k = HalfX::new(gpu).unwrap();
            // Odd token counts, SmolLM2-135M's (576) and Llama-3-8B's (4096, 14336) widths.
            for (t, cols) in [(1, 4), (3, 36), (7, 576), (5, 4096), (3, 14336)] {
                let mut rng = Rng::new((t * 100_000 + cols) as u64);
                let mut x = rng.vec(t * cols, 4.0);
                // Beyond f16's range, its edge, and its subnormals.
                x[0] = 1.0e6;
                x[t * cols - 1] = -7.0e4;
                if t * cols > 3 {
                    x[1] = 65504.0;
                    x[2] = 3.0e-6;
                }
                let xb = gpu.upload("x", &x).unwrap();
                // One row more than bound: it must stay as it was.
                let xh = gpu.upload("xh", &vec![0x5555u16; (t + 1) * cols]).unwrap();
                let b = k.bind(gpu, &xb, &xh, t, cols).unwrap();
                run_pass(gpu, |p| b.record(p, HalfX::groups(t, cols))).unwrap();
                let got: Vec<u16> = gpu.read(&xh, 0, (t + 1) * cols).unwrap();
                let mut want = reference(&x);
                want.resize((t + 1) * cols, 0x5555);
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                assert!(bad.is_none(), "half_x {t}x{cols} {:?}: first difference at {bad:?}", gpu.flags());
            }
        }
    }

    #[test]
    fn rejects_short_buffers() {
        let Some(gpu) = variants().iter().find(|g| g.caps.f16) else { return };
        let k = HalfX::new(gpu).unwrap();
        let x = gpu.storage("x", 64 * 4).unwrap();
        let xh = gpu.storage("xh", 64 * 2).unwrap();
        assert!(k.bind(gpu, &x, &xh, 2, 32).is_ok());
        assert!(k.bind(gpu, &x, &xh, 3, 32).is_err());
        assert!(k.bind(gpu, &x, &xh, 1, 6).is_err());
    }
}
