//! Benchmarks as a product feature: every kernel at real model shapes ([`kernels`]) and
//! prefill/decode rates of a loaded model ([`decode`]). `longwave bench` and `cargo bench`
//! both run these.
//!
//! GPU time comes from timestamp queries written at the start and end of a compute pass when
//! the adapter offers them; otherwise from the host clock around a submit and wait (which then
//! includes submission latency, and says so).

pub mod decode;
pub mod kernels;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Times compute passes.
pub struct GpuTimer {
    queries: Option<Queries>,
    capacity: u32,
}

struct Queries {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    period_ns: f64,
}

impl GpuTimer {
    /// A timer for up to `passes` passes per measurement.
    pub fn new(gpu: &Gpu, passes: u32) -> GpuTimer {
        let passes = passes.max(1);
        let queries = gpu.caps.timestamps.then(|| {
            let count = passes * 2;
            Queries {
                set: gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count,
                }),
                resolve: gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("timestamps resolve"),
                    size: count as u64 * 8,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                read: gpu.staging(count as u64 * 8),
                period_ns: gpu.queue.get_timestamp_period() as f64,
            }
        });
        GpuTimer { queries, capacity: passes }
    }

    /// "gpu timestamps" or "host clock": where the times come from.
    pub fn source(&self) -> &'static str {
        if self.queries.is_some() {
            "gpu timestamps"
        } else {
            "host clock"
        }
    }

    /// Passes one measurement can time.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn has_timestamps(&self) -> bool {
        self.queries.is_some()
    }

    /// Timestamp writes for pass `i` (None without timestamps).
    pub fn writes(&self, i: u32) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        assert!(i < self.capacity, "timer holds {} passes", self.capacity);
        self.queries.as_ref().map(|q| wgpu::ComputePassTimestampWrites {
            query_set: &q.set,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        })
    }

    /// Seconds each of passes `0..passes` took, once the GPU has run them (waits). None
    /// without timestamps.
    pub fn collect(&self, gpu: &Gpu, passes: u32) -> Result<Option<Vec<f64>>> {
        let Some(q) = &self.queries else { return Ok(None) };
        let count = passes * 2;
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.resolve_query_set(&q.set, 0..count, &q.resolve, 0);
        enc.copy_buffer_to_buffer(&q.resolve, 0, &q.read, 0, count as u64 * 8);
        gpu.queue.submit([enc.finish()]);
        let mut ticks = vec![0u64; count as usize];
        gpu.read_staging(&q.read, &mut ticks)?;
        Ok(Some(ticks.chunks(2).map(|t| t[1].saturating_sub(t[0]) as f64 * q.period_ns * 1e-9).collect()))
    }

    /// Seconds one call of `record` takes: the best of `trials` passes, each calling it
    /// `reps` times (with the repetition index), after one untimed warm-up pass.
    pub fn time(
        &self,
        gpu: &Gpu,
        reps: u32,
        trials: u32,
        record: &dyn Fn(&mut wgpu::ComputePass<'_>, u32),
    ) -> Result<f64> {
        let trials = trials.clamp(1, self.capacity);
        let reps = reps.max(1);
        let run = |timed: Option<u32>| {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let timestamp_writes = timed.and_then(|i| self.writes(i));
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
                for r in 0..reps {
                    record(&mut pass, r);
                }
            }
            gpu.queue.submit([enc.finish()]);
        };
        run(None);
        gpu.wait()?;
        let mut best = f64::INFINITY;
        if self.has_timestamps() {
            for t in 0..trials {
                run(Some(t));
            }
            let times = self.collect(gpu, trials)?.unwrap_or_default();
            best = times.into_iter().fold(best, f64::min);
        } else {
            for _ in 0..trials {
                let start = std::time::Instant::now();
                run(None);
                gpu.wait()?;
                best = best.min(start.elapsed().as_secs_f64());
            }
        }
        if !best.is_finite() || best <= 0.0 {
            return Err(Error::Gpu("the timer measured no time (timestamps unsupported inside passes?)".into()));
        }
        Ok(best / reps as f64)
    }
}

/// What the adapter achieves at best on this run: kernels are reported as shares of these.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Peaks {
    /// Bytes read plus written per second by the copy probe.
    pub copy_gb_s: f64,
    /// f32 multiply-add throughput of the fma probe (2 flops each).
    pub fma_gflop_s: f64,
}

/// One measured kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub kernel: String,
    /// Model shape name ("smollm2-135m", "llama3-8b") or "probe".
    pub shape: String,
    /// Weight format, or "-" where none applies.
    pub dtype: String,
    /// What the dispatch covers, e.g. "6144x4096 n=1" or "ctx=16384 splits=32".
    pub size: String,
    pub us: f64,
    /// Bytes a minimal implementation must move (weights, activations, cache).
    pub bytes: f64,
    pub flops: f64,
    pub gb_s: f64,
    pub gflop_s: f64,
    /// Share of the copy probe's bandwidth, in percent.
    pub pct_bandwidth: f64,
    /// Share of the fma probe's throughput, in percent.
    pub pct_peak: f64,
    pub adapter: String,
    pub timer: String,
}

impl Row {
    #[allow(clippy::too_many_arguments)]
    fn new(
        kernel: &str,
        shape: &str,
        dtype: &str,
        size: String,
        seconds: f64,
        bytes: f64,
        flops: f64,
        peaks: &Peaks,
        gpu: &Gpu,
        timer: &GpuTimer,
    ) -> Row {
        let gb_s = bytes / seconds / 1e9;
        let gflop_s = flops / seconds / 1e9;
        Row {
            kernel: kernel.into(),
            shape: shape.into(),
            dtype: dtype.into(),
            size,
            us: seconds * 1e6,
            bytes,
            flops,
            gb_s,
            gflop_s,
            pct_bandwidth: 100.0 * gb_s / peaks.copy_gb_s,
            pct_peak: 100.0 * gflop_s / peaks.fma_gflop_s,
            adapter: gpu.info.name.clone(),
            timer: timer.source().into(),
        }
    }

    /// Prints the row as one JSON object or as a table line.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).unwrap_or_default());
        } else {
            println!("{}", self.table_line());
        }
    }

    pub fn table_header() -> String {
        format!(
            "{:<14} {:<13} {:<6} {:<26} {:>10} {:>9} {:>6} {:>9} {:>6}",
            "kernel", "shape", "dtype", "size", "us", "GB/s", "%bw", "GFLOP/s", "%peak"
        )
    }

    pub fn table_line(&self) -> String {
        format!(
            "{:<14} {:<13} {:<6} {:<26} {:>10.2} {:>9.1} {:>6.1} {:>9.1} {:>6.1}",
            self.kernel,
            self.shape,
            self.dtype,
            self.size,
            self.us,
            self.gb_s,
            self.pct_bandwidth,
            self.gflop_s,
            self.pct_peak
        )
    }
}
