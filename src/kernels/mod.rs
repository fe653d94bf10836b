//! One Rust file per shader family: shapes, dispatch, CPU reference and parity tests.
//!
//! A kernel is built once (`new`: pipelines from the cache) and bound once per set of buffers
//! (`bind`: bind group + parameter uniform). The decoder records the bound kernels into one
//! compute pass per token; nothing here allocates on that path.

pub mod attention;
pub mod embedding;
pub mod half_x;
pub mod matmul;
pub mod probe;
pub mod quantize;
pub mod rms_norm;
pub mod sampling;

#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;

/// A pipeline with its bind group: one dispatch ready to record.
pub struct Bound {
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    /// Parameter uniform, kept alive with the bind group and rewritten where shapes change.
    pub params: Option<crate::gpu::Uniform>,
}

impl Bound {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>, groups: [u32; 3]) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    pub fn set_params<T: bytemuck::Pod>(&self, queue: &wgpu::Queue, value: &T) {
        if let Some(u) = &self.params {
            queue.write_buffer(&u.buffer, 0, bytemuck::bytes_of(value));
        }
    }
}

/// Spreads `n` workgroups over x and y so that neither passes the 65535 limit; shaders
/// recover the index as `wid.x + wid.y * 65535`.
pub fn groups_1d(n: u32) -> [u32; 3] {
    if n <= 65535 {
        [n.max(1), 1, 1]
    } else {
        [65535, n.div_ceil(65535), 1]
    }
}

/// Runs `f` in one compute pass and submits it (tests, tools, prefill helpers).
pub fn run_pass(gpu: &crate::gpu::Gpu, f: impl FnOnce(&mut wgpu::ComputePass<'_>)) -> crate::Result<()> {
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        f(&mut pass);
    }
    gpu.queue.submit([enc.finish()]);
    gpu.wait()
}

pub(crate) const REDUCE_WGSL: &str = include_str!("../../shaders/common/reduce.wgsl");
