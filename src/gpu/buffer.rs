//! Buffers: allocation with clear out-of-memory errors, uploads and readback.

use super::Gpu;
use crate::error::{Error, Result};
use wgpu::util::DeviceExt;

/// A storage buffer and its size in bytes.
pub struct GpuBuffer {
    pub buffer: wgpu::Buffer,
    pub size: u64,
    /// The device's allocation counter, decremented on drop.
    allocated: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(a) = &self.allocated {
            a.fetch_sub(self.size, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Gpu {
    fn check_size(&self, label: &str, size: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        if let Some(budget) = self.memory_budget {
            let used = self.allocated.load(Ordering::Relaxed);
            if used + size > budget {
                return Err(Error::OutOfMemory(format!(
                    "{label} needs {:.1} MiB more with {:.1} MiB already allocated, past the \
                     memory budget of {:.1} MiB",
                    mib(size),
                    mib(used),
                    mib(budget)
                )));
            }
        }
        if size > self.caps.max_buffer {
            return Err(Error::OutOfMemory(format!(
                "{label} needs one buffer of {:.1} MiB but {} allows at most {:.1} MiB per buffer",
                mib(size),
                self.info.name,
                mib(self.caps.max_buffer)
            )));
        }
        Ok(())
    }

    fn scoped<T>(&self, label: &str, size: u64, f: impl FnOnce() -> T) -> Result<T> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let v = f();
        match pollster::block_on(scope.pop()) {
            None => Ok(v),
            Some(e) => {
                Err(Error::OutOfMemory(format!("allocating {label} ({:.1} MiB) on {}: {e}", mib(size), self.info.name)))
            }
        }
    }

    /// A zero-filled storage buffer (at least 4 bytes).
    pub fn storage(&self, label: &str, size: u64) -> Result<GpuBuffer> {
        let size = size.max(4).next_multiple_of(4);
        self.check_size(label, size)?;
        let buffer = self.scoped(label, size, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: STORAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(self.track(buffer, size))
    }

    fn track(&self, buffer: wgpu::Buffer, size: u64) -> GpuBuffer {
        self.allocated.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        GpuBuffer { buffer, size, allocated: Some(self.allocated.clone()) }
    }

    /// A storage buffer holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<GpuBuffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() < 4 || !bytes.len().is_multiple_of(4) {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().max(4).next_multiple_of(4), 0);
            return self.upload(label, &padded);
        }
        let size = bytes.len() as u64;
        self.check_size(label, size)?;
        let buffer = self.scoped(label, size, || {
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: STORAGE,
            })
        })?;
        Ok(self.track(buffer, size))
    }

    /// A uniform buffer holding `value`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> Uniform {
        let buffer = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::bytes_of(value),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });
        Uniform { buffer }
    }

    /// A staging buffer that `read_into` can map.
    pub fn staging(&self, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: size.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Maps `staging` (already filled by a submitted copy), copies it out and unmaps.
    pub fn read_staging<T: bytemuck::Pod>(&self, staging: &wgpu::Buffer, out: &mut [T]) -> Result<()> {
        self.read_staging_after(staging, out, None)
    }

    /// [`Gpu::read_staging`] waiting only for submission `after` (the one that filled
    /// `staging`), not for work submitted since: decoding reads a token while the next step
    /// runs.
    pub fn read_staging_after<T: bytemuck::Pod>(
        &self,
        staging: &wgpu::Buffer,
        out: &mut [T],
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(out) as u64;
        let slice = staging.slice(..bytes.next_multiple_of(4));
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        match after {
            Some(index) => self.wait_for(index)?,
            None => self.wait()?,
        }
        rx.recv()
            .map_err(|_| Error::Gpu("readback was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
        {
            let view = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("readback failed: {e:?}")))?;
            let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
            dst.copy_from_slice(&view[..dst.len()]);
        }
        staging.unmap();
        Ok(())
    }

    /// Reads `count` values of a storage buffer from `offset` bytes (tests and tools only;
    /// allocates a staging buffer).
    pub fn read<T: bytemuck::Pod + Default + Clone>(
        &self,
        buf: &GpuBuffer,
        offset: u64,
        count: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); count];
        let bytes = (std::mem::size_of::<T>() * count) as u64;
        let staging = self.staging(bytes);
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&buf.buffer, offset, &staging, 0, bytes.next_multiple_of(4));
        self.queue.submit([enc.finish()]);
        self.read_staging(&staging, &mut out)?;
        Ok(out)
    }

    pub fn write<T: bytemuck::Pod>(&self, buf: &GpuBuffer, offset: u64, data: &[T]) {
        self.queue.write_buffer(&buf.buffer, offset, bytemuck::cast_slice(data));
    }
}

/// A small uniform buffer of kernel parameters, written once when a kernel is bound.
pub struct Uniform {
    pub buffer: wgpu::Buffer,
}

impl GpuBuffer {
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
    /// A window of the buffer (offset and size in bytes).
    pub fn window(&self, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset,
            size: std::num::NonZeroU64::new(size),
        })
    }
}

impl Uniform {
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}
