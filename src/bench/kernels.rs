//! Every kernel at the shapes of real models, timed on the GPU and reported against the
//! adapter's copy bandwidth and f32 peak measured in the same run.
//!
//! Weights are random (their values don't change the work). Small matrices are repeated in
//! several buffers that the timed dispatches cycle through, so a matrix is not served from a
//! cache that a real model (hundreds of such matrices) would have long evicted.

use super::{GpuTimer, Peaks, Row};
use crate::decoder::Plan;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::attention::{rope_table, AttendKind, AttentionKernels, AttnShape, DecodeAttention};
use crate::kernels::embedding::Embedding;
use crate::kernels::half_x::HalfX;
use crate::kernels::matmul::{norm_output_floats, norm_output_parts, q8_norm_words};
use crate::kernels::matmul::{Epilogue, GpuMatrix, MatMul, MatVec, OutRows};
use crate::kernels::probe::{fma_flops, HandoffMode, HandoffShape, Probes, COPY_GROUPS};
use crate::kernels::quantize::{q8_words, Q8Input, QuantizeQ8};
use crate::kernels::rms_norm::RmsNorm;
use crate::kernels::sampling::{SampleParams, SamplingKernels, SamplingParams};
use crate::kernels::Bound;
use crate::model::quant::{quantize, DType};

/// The layer shapes of a model family, enough to size every kernel.
#[derive(Debug, Clone, Copy)]
pub struct BenchShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Context lengths the attention kernels are timed at.
    pub contexts: &'static [u32],
}

pub const SHAPES: [BenchShape; 2] = [
    BenchShape {
        name: "smollm2-135m",
        hidden: 576,
        intermediate: 1536,
        n_heads: 9,
        n_kv: 3,
        head_dim: 64,
        vocab: 49152,
        contexts: &[1024, 8192],
    },
    BenchShape {
        name: "llama3-8b",
        hidden: 4096,
        intermediate: 14336,
        n_heads: 32,
        n_kv: 8,
        head_dim: 128,
        vocab: 128256,
        contexts: &[1024, 16384],
    },
];

pub fn shape_by_name(name: &str) -> Result<BenchShape> {
    SHAPES.iter().find(|s| s.name == name).copied().ok_or_else(|| {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        Error::InvalidArgument(format!("unknown shape {name:?}; known: {names:?}"))
    })
}

pub struct KernelBenchOptions {
    pub shapes: Vec<BenchShape>,
    pub dtypes: Vec<DType>,
    /// Only kernels whose name contains this.
    pub filter: Option<String>,
    /// Tokens per prefill product (the session's chunk).
    pub prefill_tokens: u32,
    /// Timed passes per kernel; the best counts.
    pub trials: u32,
    /// Context lengths for the attention kernels instead of each shape's own.
    pub contexts: Option<Vec<u32>>,
}

impl KernelBenchOptions {
    /// Both shapes and the formats models ship in, on a GPU; only the small shape on a CPU
    /// adapter, where the large one takes minutes.
    pub fn for_adapter(gpu: &Gpu) -> KernelBenchOptions {
        let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
        KernelBenchOptions {
            shapes: if cpu { SHAPES[..1].to_vec() } else { SHAPES.to_vec() },
            dtypes: vec![DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1],
            filter: None,
            prefill_tokens: 256,
            trials: if cpu { 2 } else { 5 },
            contexts: None,
        }
    }
}

/// Runs the probes and every kernel, calling `on_row` as each is measured.
pub fn run(gpu: &Gpu, opts: &KernelBenchOptions, on_row: &mut dyn FnMut(&Row)) -> Result<Peaks> {
    let b = Bench::new(gpu, opts)?;
    let peaks = b.probes(on_row)?;
    for sh in &opts.shapes {
        b.products(sh, &peaks, on_row)?;
        b.attention(sh, &peaks, on_row)?;
        b.others(sh, &peaks, on_row)?;
    }
    Ok(peaks)
}

/// Makes a probe row from (kernel, size, seconds, bytes, flops).
type ProbeRow<'r> = &'r dyn Fn(&str, String, f64, f64, f64) -> Row;

struct Bench<'a> {
    gpu: &'a Gpu,
    opts: &'a KernelBenchOptions,
    timer: GpuTimer,
    cpu: bool,
}

impl Bench<'_> {
    fn new<'a>(gpu: &'a Gpu, opts: &'a KernelBenchOptions) -> Result<Bench<'a>> {
        let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
        Ok(Bench { gpu, opts, timer: GpuTimer::new(gpu, opts.trials), cpu })
    }

    fn wanted(&self, kernel: &str) -> bool {
        self.opts.filter.as_ref().is_none_or(|f| kernel.contains(f.as_str()))
    }

    /// Dispatches per timed pass: enough to dwarf the pass's fixed cost on a GPU.
    fn reps(&self, copies: usize) -> u32 {
        (copies as u32).max(if self.cpu { 2 } else { 20 })
    }

    /// Seconds per dispatch set, cycling through `sets` (each a list of dispatches).
    fn time_sets(&self, sets: &[Vec<(Bound, [u32; 3])>]) -> Result<f64> {
        let reps = self.reps(sets.len());
        self.timer.time(self.gpu, reps, self.opts.trials, &|pass, r| {
            for (b, g) in &sets[r as usize % sets.len()] {
                b.record(pass, *g);
            }
        })
    }

    /// How many copies of a `bytes`-sized operand keep the timed loop out of the caches.
    fn copies(&self, bytes: u64) -> usize {
        let span: u64 = if self.cpu { 16 << 20 } else { 512 << 20 };
        span.div_ceil(bytes.max(1)).clamp(1, 64) as usize
    }

    fn probes(&self, on_row: &mut dyn FnMut(&Row)) -> Result<Peaks> {
        let gpu = self.gpu;
        let p = Probes::new(gpu)?;
        let bytes = (if self.cpu { 64u64 << 20 } else { 1 << 30 }).min(gpu.caps.max_binding) / 16 * 16;
        let src = gpu.storage("copy src", bytes)?;
        let dst = gpu.storage("copy dst", bytes)?;
        let copy = p.bind_copy(gpu, &src, &dst);
        let t = self.timer.time(gpu, 4, self.opts.trials, &|pass, _| copy.record(pass, [COPY_GROUPS, 1, 1]))?;
        let copy_gb_s = 2.0 * bytes as f64 / t / 1e9;
        drop((src, dst));
        let groups = if self.cpu { 16 } else { 8192 };
        let iters = if self.cpu { 256 } else { 4096 };
        let out = gpu.storage("fma out", groups as u64 * 256 * 4)?;
        let fma = p.bind_fma(gpu, &out, iters);
        let t_fma = self.timer.time(gpu, 2, self.opts.trials, &|pass, _| fma.record(pass, [groups, 1, 1]))?;
        let flops = fma_flops(groups as u64 * 256, iters);
        let peaks = Peaks { copy_gb_s, fma_gflop_s: flops / t_fma / 1e9 };
        let row = |k: &str, size: String, t: f64, bytes: f64, flops: f64| {
            Row::new(k, "probe", "-", size, t, bytes, flops, &peaks, gpu, &self.timer)
        };
        // The floor under every dependent dispatch: a one-workgroup copy of 4 KiB, repeated
        // in one pass, each waiting for the previous one's write (as a decode step's do).
        let small = 4096u64;
        let (src, dst) = (gpu.storage("dispatch src", small)?, gpu.storage("dispatch dst", small)?);
        let tiny = p.bind_copy(gpu, &src, &dst);
        let t_tiny = self.timer.time(gpu, 200, self.opts.trials, &|pass, _| tiny.record(pass, [1, 1, 1]))?;
        on_row(&row("copy", format!("{} MiB", bytes >> 20), t, 2.0 * bytes as f64, 0.0));
        on_row(&row("fma", format!("{} threads x {iters}", groups * 256), t_fma, 0.0, flops));
        on_row(&row("dispatch", "4 KiB copy, 1 workgroup".into(), t_tiny, 2.0 * small as f64, 0.0));
        if self.wanted("handoff") {
            self.handoffs(&p, &row, on_row)?;
        }
        if self.wanted("stream") {
            self.streams(&p, &row, on_row)?;
        }
        Ok(peaks)
    }

    /// Plain reads of the sizes a decode step's products read, over several workgroup counts
    /// (handoff.wgsl's stage A alone: each workgroup sums a slice): the rate at which this
    /// adapter streams a read of that size in one dispatch at all, the ceiling for a product
    /// of the same bytes. GPU sizes: the Llama-3-8B products in Q4_0 (Wo, QKV, down, gate/up)
    /// and f16 (QKV, down, gate/up).
    fn streams(&self, p: &Probes, row: ProbeRow, on_row: &mut dyn FnMut(&Row)) -> Result<()> {
        let gpu = self.gpu;
        let (sizes, groups): (&[u64], &[u32]) = if self.cpu {
            (&[1 << 20], &[16, 64])
        } else {
            let f16 = [50_331_648, 117_440_512, 234_881_024];
            let q4_0 = [9_437_184, 14_155_776, 33_030_144, 66_060_288];
            (&[f16[0], f16[1], f16[2], q4_0[0], q4_0[1], q4_0[2], q4_0[3]], &[448, 1024, 3584])
        };
        // One source for every row, allocated and filled once: copies of a size are slices
        // of it. (Rows that allocated their own copies ran at half the rate after a few
        // rows' worth of allocations on an H100; benches/RESULTS.md, round 16.)
        let span: u64 = if self.cpu { 16 << 20 } else { 768 << 20 };
        let span = span.min(gpu.caps.max_binding) / 256 * 256;
        let src = gpu.storage("stream src", span)?;
        let fill: Vec<f32> = (0..(4u32 << 20)).map(|i| 1.0 + (i % 251) as f32 * 1e-3).collect();
        for at in (0..span).step_by(16 << 20) {
            let n = ((span - at) as usize / 4).min(fill.len());
            gpu.queue.write_buffer(&src.buffer, at, bytemuck::cast_slice(&fill[..n]));
        }
        let out = gpu.storage("stream out", 4)?;
        for &bytes in sizes {
            for &g in groups {
                let words = (bytes / 16).div_ceil(g as u64) as u32;
                let sh = HandoffShape { a_groups: g, b_groups: 1, a_words: words, b_words: 0 };
                let read = sh.src_vec4s() * 16;
                let stride = read.next_multiple_of(256);
                if stride > span {
                    continue;
                }
                let copies = (span / stride).min(self.copies(read) as u64);
                let mut sets = vec![];
                for c in 0..copies {
                    let sums = gpu.storage("stream sums", sh.sum_words() * 4)?;
                    let at = (c * stride / 16) as u32;
                    let b = p.bind_handoff_at(gpu, (&src, at), &sums, &out, sh, HandoffMode::A)?;
                    sets.push(vec![(b, sh.groups(HandoffMode::A))]);
                }
                let t = self.time_sets(&sets)?;
                let size = format!("{:.1} MB over {g} workgroups", read as f64 / 1e6);
                on_row(&row("stream", size, t, read as f64, 0.0));
            }
        }
        Ok(())
    }

    /// Two dependent stages (handoff.wgsl) as two dispatches and as one that hands the
    /// dependency over inside: what fusing two of a decode step's products could save. GPU
    /// shapes: slices too small to matter (the boundary alone), Wo then gate/up (8-bit
    /// vectors, 8B shape: 9 and 66 MB), gate/up then down (66 and 33 MB).
    fn handoffs(&self, p: &Probes, row: ProbeRow, on_row: &mut dyn FnMut(&Row)) -> Result<()> {
        let gpu = self.gpu;
        let shapes: &[HandoffShape] = if self.cpu {
            &[HandoffShape { a_groups: 64, b_groups: 64, a_words: 64, b_words: 64 }]
        } else {
            &[
                HandoffShape { a_groups: 1024, b_groups: 1024, a_words: 16, b_words: 16 },
                HandoffShape { a_groups: 1024, b_groups: 3584, a_words: 576, b_words: 1152 },
                HandoffShape { a_groups: 3584, b_groups: 1024, a_words: 1152, b_words: 2016 },
            ]
        };
        let modes: [(&str, &[HandoffMode]); 4] = [
            ("A alone", &[HandoffMode::A]),
            ("A; B (two dispatches)", &[HandoffMode::A, HandoffMode::B]),
            ("one dispatch, B loads first", &[HandoffMode::FusedLoadFirst]),
            ("one dispatch, B loads after", &[HandoffMode::FusedLoadAfter]),
        ];
        for &sh in shapes {
            let bytes = sh.src_vec4s() * 16;
            // Every dispatch binds the one `out` for writing, so each waits for the one
            // before it, as a decode step's do; each copy has its own data and sums.
            let out = gpu.storage("handoff out", sh.b_groups as u64 * 4)?;
            let mut data = vec![];
            for c in 0..self.copies(bytes) {
                let src = gpu.upload("handoff src", &vec![0.5f32 + c as f32; (sh.src_vec4s() * 4) as usize])?;
                data.push((src, gpu.storage("handoff sums", sh.sum_words() * 4)?));
            }
            let mib = |words: u32, groups: u32| (words as u64 * groups as u64 * 16) as f64 / (1 << 20) as f64;
            let size = format!(
                "A {:.1} MiB / {} wg, B {:.1} MiB / {} wg",
                mib(sh.a_words, sh.a_groups),
                sh.a_groups,
                mib(sh.b_words, sh.b_groups),
                sh.b_groups
            );
            for (what, list) in modes {
                let mut sets = vec![];
                for (src, sums) in &data {
                    let mut set = vec![];
                    for &mode in list {
                        set.push((p.bind_handoff(gpu, src, sums, &out, sh, mode)?, sh.groups(mode)));
                    }
                    sets.push(set);
                }
                let t = self.time_sets(&sets)?;
                let read = if list == [HandoffMode::A] { sh.a_groups as u64 * sh.a_words as u64 * 16 } else { bytes };
                on_row(&row("handoff", format!("{size}: {what}"), t, read as f64, 0.0));
            }
        }
        Ok(())
    }

    /// A random `[rows, cols]` matrix in `dtype`: a few distinct quantized rows repeated, so
    /// large matrices are quick to make.
    fn matrix(&self, label: &str, dtype: DType, rows: usize, cols: usize, seed: u64) -> Result<GpuMatrix> {
        let distinct = rows.min(16);
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let x: Vec<f32> = (0..distinct * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        let q = quantize(dtype, &x);
        let row_bytes = q.len() / distinct;
        let mut bytes = Vec::with_capacity(rows * row_bytes);
        while bytes.len() < rows * row_bytes {
            let take = (rows * row_bytes - bytes.len()).min(q.len());
            bytes.extend_from_slice(&q[..take]);
        }
        GpuMatrix::upload(self.gpu, label, dtype, rows, cols, &bytes)
    }

    /// Matrix-vector (decode) and matrix-matrix (prefill) products of every layer matrix.
    fn products(&self, sh: &BenchShape, peaks: &Peaks, on_row: &mut dyn FnMut(&Row)) -> Result<()> {
        let gpu = self.gpu;
        let (h, f) = (sh.hidden, sh.intermediate);
        let qkv = (sh.n_heads + 2 * sh.n_kv) * sh.head_dim;
        let t = self.opts.prefill_tokens as usize;
        // (name, rows, cols, epilogue, also as a prefill product)
        let mats = [
            ("qkv", qkv, h, Epilogue::Store, true),
            ("o", h, sh.n_heads * sh.head_dim, Epilogue::Add, true),
            ("gate_up", f, h, Epilogue::SwiGlu, true),
            ("down", h, f, Epilogue::Add, true),
            ("lm_head", sh.vocab, h, Epilogue::Store, false),
        ];
        let x = gpu.storage("x", (t * f.max(h)) as u64 * 4)?;
        let y = gpu.storage("y", (t * sh.vocab.max(f)) as u64 * 4)?;
        for &dtype in &self.opts.dtypes {
            for (i, &(name, rows, cols, epi, prefill)) in mats.iter().enumerate() {
                let (mv_name, mm_name) = (format!("matvec_{name}"), format!("matmul_{name}"));
                let want_mm = prefill && (self.wanted(&mm_name) || self.wanted(&format!("matmul_coop_{name}")));
                let want_embed = name == "lm_head" && self.wanted("embedding");
                let q8_name = format!("matvec_q8_{name}");
                let want_q8 = self.wanted(&q8_name) && MatVec::takes_q8_input(dtype) && cols.is_multiple_of(32);
                let split_name = match name {
                    "o" | "down" => format!("matvec_add_norm_{name}"),
                    _ => format!("matvec_scaled_{name}"),
                };
                let want_split = name != "lm_head" && self.wanted(&split_name) && cols.is_multiple_of(32);
                if !self.wanted(&mv_name)
                    && !want_mm
                    && !want_embed
                    && !self.wanted("matvec_norm")
                    && !want_q8
                    && !want_split
                {
                    continue;
                }
                let n_mats = if epi == Epilogue::SwiGlu { 2 } else { 1 };
                let w_bytes = (dtype.row_bytes(cols).unwrap_or(0) * rows * n_mats) as u64;
                let copies = self.copies(w_bytes);
                let mut ws = vec![];
                for c in 0..copies * n_mats {
                    ws.push(self.matrix(name, dtype, rows, cols, (i * 1000 + c) as u64)?);
                }
                let pairs: Vec<&[GpuMatrix]> = ws.chunks(n_mats).collect();
                let size = |n: usize| format!("{}{rows}x{cols} n={n}", if n_mats == 2 { "2x" } else { "" });
                let flops = 2.0 * (rows * cols * n_mats) as f64;
                let act = |n: usize| ((n * cols + n * rows) * 4) as f64;
                let row = |kernel: &str, size: String, s: f64, bytes: f64, flops: f64| {
                    Row::new(kernel, sh.name, dtype.name(), size, s, bytes, flops, peaks, gpu, &self.timer)
                };
                // One decode product per copy of the weights, with `k`.
                let mv_sets = |k: &MatVec| {
                    pairs
                        .iter()
                        .map(|p| match epi {
                            Epilogue::SwiGlu => k.bind_swiglu(gpu, &p[0], &p[1], &x, 0, &y, 1),
                            _ => k.bind(gpu, &p[0], &x, 0, &y, 1),
                        })
                        .collect::<Result<Vec<_>>>()
                };
                if self.wanted(&mv_name) {
                    let s = self.time_sets(&mv_sets(&MatVec::new(gpu, dtype, epi)?)?)?;
                    let bytes = w_bytes as f64 + act(1);
                    on_row(&row(&mv_name, size(1), s, bytes, flops));
                }
                // The variants that replace decode's norm dispatches where vectors stay f32: Wo and
                // down writing the next norm's input, Q/K/V and gate/up reading it.
                if want_split {
                    let sets = if matches!(name, "o" | "down") {
                        let k = MatVec::with_norm_output(gpu, dtype)?;
                        let g = gpu.upload("norm", &vec![1f32; rows])?;
                        let floats = norm_output_floats(rows, norm_output_parts(gpu, rows));
                        let xn = gpu.storage("xn_norm", floats as u64 * 4)?;
                        pairs
                            .iter()
                            .map(|p| k.bind_add_norm(gpu, &p[0], &x, &y, &g, &xn, 1))
                            .collect::<Result<Vec<_>>>()?
                    } else {
                        mv_sets(&MatVec::new(gpu, dtype, epi)?.with_norm_scale(1e-5)?)?
                    };
                    let s = self.time_sets(&sets)?;
                    let extra = if matches!(name, "o" | "down") { rows * 8 } else { norm_output_parts(gpu, cols) * 4 };
                    on_row(&row(&split_name, size(1), s, w_bytes as f64 + act(1) + extra as f64, flops));
                }
                // The decode product of the vector quantized to 8 bits (integer dot products;
                // the quantization is its own row, quantize_q8).
                if want_q8 {
                    let s = self.time_sets(&mv_sets(&MatVec::with_q8_input(gpu, dtype, epi)?)?)?;
                    let bytes = w_bytes as f64 + (q8_words(cols) * 4 + rows * 4) as f64;
                    on_row(&row(&q8_name, size(1), s, bytes, flops));
                    // The variants that replace decode's norm and quantize dispatches: gate/up
                    // writing 8-bit blocks (plain input), Wo and down writing the next norm's
                    // 8-bit input, Q/K/V reading it.
                    let blocks = rows.is_multiple_of(32);
                    if matches!(name, "o" | "down") && blocks {
                        let k = MatVec::with_q8_norm_output(gpu, dtype)?;
                        let g = gpu.upload("norm", &vec![1f32; rows])?;
                        let xq = gpu.storage("xq_norm", q8_norm_words(rows) as u64 * 4)?;
                        let sets = pairs
                            .iter()
                            .map(|p| k.bind_add_norm_q8(gpu, &p[0], &x, &y, &g, &xq, 1))
                            .collect::<Result<Vec<_>>>()?;
                        let s = self.time_sets(&sets)?;
                        let bytes = w_bytes as f64 + (q8_words(cols) * 4 + rows * 8 + q8_norm_words(rows) * 4) as f64;
                        on_row(&row(&format!("matvec_q8_norm_{name}"), size(1), s, bytes, flops));
                    }
                    let variant = match name {
                        "gate_up" if blocks => Some(("matvec_q8_out_gate_up", MatVec::with_q8_output(gpu, dtype)?)),
                        "qkv" => Some((
                            "matvec_q8_scaled_qkv",
                            MatVec::with_q8_input(gpu, dtype, epi)?.with_norm_scale(1e-5)?,
                        )),
                        _ => None,
                    };
                    if let Some((kernel, k)) = variant {
                        let s = self.time_sets(&mv_sets(&k)?)?;
                        let out = if name == "gate_up" { q8_words(rows) * 4 } else { rows * 4 };
                        let bytes = w_bytes as f64 + (q8_words(cols) * 4 + out) as f64;
                        on_row(&row(kernel, size(1), s, bytes, flops));
                    }
                }
                // The decode product with the layer's RMSNorm fused in front, where it applies.
                let norm_name = format!("matvec_norm_{name}");
                let fusable = matches!(name, "qkv" | "gate_up") && cols <= MatVec::NORM_MAX_COLS;
                if fusable && self.wanted(&norm_name) {
                    let k = MatVec::with_norm(gpu, dtype, epi, 1e-5)?;
                    let g = gpu.upload("norm", &vec![1f32; cols])?;
                    let sets = pairs
                        .iter()
                        .map(|p| match epi {
                            Epilogue::SwiGlu => k.bind_norm_swiglu(gpu, &p[0], &p[1], &x, &g, &y, 1),
                            _ => k.bind_norm_into(gpu, &p[0], &x, &g, &y, OutRows::whole(&p[0]), 1),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let s = self.time_sets(&sets)?;
                    let bytes = w_bytes as f64 + act(1) + cols as f64 * 4.0;
                    on_row(&row(&norm_name, size(1), s, bytes, flops));
                }
                // The f32 tiled kernel, and the matrix-unit one where the adapter has it.
                let mut mms = vec![];
                if prefill && self.wanted(&mm_name) {
                    mms.push((mm_name.clone(), MatMul::without_matrix_units(gpu, dtype, epi)?));
                }
                let coop_name = format!("matmul_coop_{name}");
                if prefill && self.wanted(&coop_name) && MatMul::matrix_units_suit(gpu, dtype) {
                    mms.push((coop_name, MatMul::new(gpu, dtype, epi)?));
                }
                for (kname, k) in mms {
                    let sets = pairs
                        .iter()
                        .map(|p| match epi {
                            Epilogue::SwiGlu => k.bind_swiglu(gpu, &p[0], &p[1], &x, 0, &y, t),
                            _ => k.bind(gpu, &p[0], &x, 0, &y, t),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let s = self.time_sets(&sets)?;
                    let bytes = w_bytes as f64 + act(t);
                    let fl = flops * t as f64;
                    on_row(&row(&kname, size(t), s, bytes, fl));
                }
                if want_embed {
                    let k = Embedding::new(gpu, dtype)?;
                    let ids: Vec<u32> = (0..t as u32).map(|i| i.wrapping_mul(2654435761) % rows as u32).collect();
                    let tokens = gpu.upload("tokens", &ids)?;
                    let sets = vec![k.bind(gpu, &ws[0], &tokens, 0, &x, t)?];
                    let s = self.time_sets(&sets)?;
                    let row_bytes = dtype.row_bytes(cols).unwrap_or(0) as f64;
                    let bytes = t as f64 * (row_bytes + cols as f64 * 4.0);
                    let sz = format!("{t} of {rows}x{cols}");
                    on_row(&row("embedding", sz, s, bytes, 0.0));
                    // Decode's gather with the first layer's 8-bit norm input (one token).
                    if cols.is_multiple_of(32) {
                        let k = Embedding::with_q8_norm(gpu, dtype)?;
                        let g = gpu.upload("g", &vec![1.0f32; cols])?;
                        let xq = gpu.storage("xq_norm", q8_norm_words(cols) as u64 * 4)?;
                        let sets = vec![k.bind_q8_norm(gpu, &ws[0], &tokens, 0, &x, &g, &xq, 1)?];
                        let s = self.time_sets(&sets)?;
                        let bytes = row_bytes + cols as f64 * 8.0 + q8_norm_words(cols) as f64 * 4.0;
                        on_row(&row("embedding_q8_norm", format!("1 of {rows}x{cols}"), s, bytes, 0.0));
                    }
                }
            }
        }
        Ok(())
    }

    /// RoPE + cache append, split-K decode attention with its merge, and prefill attention.
    fn attention(&self, sh: &BenchShape, peaks: &Peaks, on_row: &mut dyn FnMut(&Row)) -> Result<()> {
        let gpu = self.gpu;
        let k = AttentionKernels::new(gpu)?;
        let (nh, nkv, hd) = (sh.n_heads as u32, sh.n_kv as u32, sh.head_dim as u32);
        let t = self.opts.prefill_tokens;
        for &ctx in self.opts.contexts.as_deref().unwrap_or(sh.contexts) {
            let a = AttnShape { n_heads: nh, n_kv: nkv, head_dim: hd, max_ctx: ctx };
            if a.cache_bytes() > gpu.caps.max_binding {
                continue;
            }
            let splits = Plan::decode_splits(gpu, ctx);
            let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
            let rope = gpu.upload("rope", &rope_table(&inv_freq, ctx as usize))?;
            let qkv = gpu.storage("qkv", (t * (nh + 2 * nkv) * hd) as u64 * 4)?;
            let q = gpu.storage("q", (t * nh * hd) as u64 * 4)?;
            let kc = gpu.storage("k cache", a.cache_bytes())?;
            let vc = gpu.storage("v cache", a.cache_bytes())?;
            let part = gpu.storage("partials", a.partial_floats(t.max(1), splits.max(1)) * 4)?;
            let out = gpu.storage("attn", (t * nh * hd) as u64 * 4)?;
            let decode_state = gpu.upload("state", &[ctx - 1, 1, 0, 0])?;
            let cache_read = 2.0 * (ctx * nkv * hd) as f64 * 2.0;
            let row = |kernel: &str, size: String, s: f64, bytes: f64, flops: f64| {
                Row::new(kernel, sh.name, "f16kv", size, s, bytes, flops, peaks, gpu, &self.timer)
            };
            if self.wanted("rope_kv") {
                let b = k.bind_rope_kv(gpu, a, &decode_state, &rope, &qkv, &q, &kc, &vc);
                let s = self.time_sets(&[vec![(b, AttentionKernels::rope_groups(a, 1))]])?;
                let bytes = ((nh + 2 * nkv) * hd * 4 + nh * hd * 4 + 2 * nkv * hd * 2 + hd * 4) as f64;
                on_row(&row("rope_kv", format!("pos={}", ctx - 1), s, bytes, 0.0));
            }
            // The attention kernels (per query head, per head group, head groups over short
            // splits where the head size suits it); decode picks one by the keys per split
            // (AttentionKernels::decode_kind), prefill by the group size. Decode times the
            // variant it runs: rotary embedding and cache append included. The decode kernels
            // also merging their splits themselves (all but the wide one): attend_merged (no
            // attn_merge dispatch after them).
            let mut kinds = vec![(AttendKind::PerHead, ""), (AttendKind::Grouped, "_group")];
            if AttentionKernels::wide_supports(a) {
                kinds.push((AttendKind::Wide, "_wide"));
            }
            let arrivals = gpu.storage("arrivals", a.arrival_words() * 4)?;
            for &(kind, suffix) in &kinds {
                let (state, rope, qkv, part) = (&decode_state, &rope, &qkv, &part);
                let d = DecodeAttention { sh: a, splits, kind, state, rope, qkv, k_cache: &kc, v_cache: &vc, part };
                let used = if AttentionKernels::decode_kind(a, splits, ctx) == kind { " (used)" } else { "" };
                for merged in [false, true] {
                    let name = format!("{}{suffix}", if merged { "attend_merged" } else { "attend_decode" });
                    let merges = AttentionKernels::merged_fits(gpu) && kind != AttendKind::Wide;
                    if !self.wanted(&name) || (merged && !merges) {
                        continue;
                    }
                    let b = if merged {
                        k.bind_attend_merged(gpu, &d, &arrivals, &out, false)?
                    } else {
                        k.bind_attend_new_kv(gpu, &d)?
                    };
                    let s = self.time_sets(&[vec![(b, AttentionKernels::attend_groups(a, splits, 1, kind))]])?;
                    let flops = 4.0 * (nh * hd * ctx) as f64;
                    on_row(&row(&name, format!("ctx={ctx} splits={splits}{used}"), s, cache_read, flops));
                }
            }
            if self.wanted("attn_merge") {
                let b = k.bind_merge(gpu, a, splits, &decode_state, &part, &out);
                let s = self.time_sets(&[vec![(b, AttentionKernels::merge_groups(a, 1))]])?;
                let bytes = (a.partial_floats(1, splits) * 4 + (nh * hd * 4) as u64) as f64;
                on_row(&row("attn_merge", format!("splits={splits}"), s, bytes, 0.0));
            }
            for &(kind, suffix) in &kinds[..2] {
                let name = format!("attend_prefill{suffix}");
                if !self.wanted(&name) || ctx < t {
                    continue;
                }
                // The last chunk of a prompt of `ctx` tokens: t queries over up to ctx keys.
                let state = gpu.upload("state", &[ctx - t, t, 0, 0])?;
                let b = k.bind_attend(gpu, a, 1, &state, &q, &kc, &vc, &part, kind)?;
                let s = self.time_sets(&[vec![(b, AttentionKernels::attend_groups(a, 1, t, kind))]])?;
                let keys = (ctx - t) as f64 * t as f64 + (t as f64 * (t as f64 + 1.0)) / 2.0;
                let flops = 4.0 * (nh * hd) as f64 * keys;
                let used = if AttentionKernels::prefill_kind(a) == kind { " (used)" } else { "" };
                on_row(&row(&name, format!("ctx={ctx} n={t}{used}"), s, cache_read, flops));
            }
        }
        Ok(())
    }

    /// Norms and the sampler.
    fn others(&self, sh: &BenchShape, peaks: &Peaks, on_row: &mut dyn FnMut(&Row)) -> Result<()> {
        let gpu = self.gpu;
        let t = self.opts.prefill_tokens;
        let h = sh.hidden as u32;
        if self.wanted("quantize_q8") {
            // The RMSNorm + 8-bit quantization in front of a layer's integer-dot products, at
            // the widths they take (hidden, and the intermediate one plain).
            for (input, cols) in [(Q8Input::Norm { eps: 1e-5 }, sh.hidden), (Q8Input::Plain, sh.intermediate)] {
                let k = QuantizeQ8::new(gpu, input)?;
                let x = gpu.storage("x", cols as u64 * 4)?;
                let g = gpu.upload("g", &vec![1f32; cols])?;
                let xq = gpu.storage("xq", q8_words(cols) as u64 * 4)?;
                let norm = matches!(input, Q8Input::Norm { .. }).then_some(&g);
                let sets = vec![vec![k.bind(gpu, &x, norm, None, &xq, 1, cols)?]];
                let s = self.time_sets(&sets)?;
                let bytes = (cols * 4 * if norm.is_some() { 2 } else { 1 } + q8_words(cols) * 4) as f64;
                let what = if norm.is_some() { "norm" } else { "plain" };
                on_row(&Row::new(
                    "quantize_q8",
                    sh.name,
                    "-",
                    format!("1x{cols} {what}"),
                    s,
                    bytes,
                    0.0,
                    peaks,
                    gpu,
                    &self.timer,
                ));
            }
        }
        if self.wanted("rms_norm") {
            let k = RmsNorm::new(gpu)?;
            let x = gpu.storage("x", (t * h) as u64 * 4)?;
            let w = gpu.upload("w", &vec![1f32; h as usize])?;
            let y = gpu.storage("y", (t * h) as u64 * 4)?;
            for rows in [1, t] {
                let b = k.bind(gpu, &x, &w, &y, rows, h, 1e-5)?;
                let s = self.time_sets(&[vec![(b, crate::kernels::rms_norm::groups(rows))]])?;
                let bytes = (2 * rows * h * 4 + h * 4) as f64;
                let r =
                    Row::new("rms_norm", sh.name, "-", format!("{rows}x{h}"), s, bytes, 0.0, peaks, gpu, &self.timer);
                on_row(&r);
            }
        }
        if self.wanted("half_x") && gpu.caps.f16 {
            // The f16 copy of a prefill product's input (matrix units), at its two widths.
            let k = HalfX::new(gpu)?;
            for cols in [sh.hidden, sh.intermediate] {
                let rows = t as usize;
                let x = gpu.storage("x", (rows * cols) as u64 * 4)?;
                let xh = gpu.storage("xh", (rows * cols) as u64 * 2)?;
                let b = k.bind(gpu, &x, &xh, rows, cols)?;
                let s = self.time_sets(&[vec![(b, HalfX::groups(rows, cols))]])?;
                let bytes = (rows * cols * 6) as f64;
                on_row(&Row::new(
                    "half_x",
                    sh.name,
                    "-",
                    format!("{rows}x{cols}"),
                    s,
                    bytes,
                    0.0,
                    peaks,
                    gpu,
                    &self.timer,
                ));
            }
        }
        if self.wanted("sample") {
            let k = SamplingKernels::new(gpu)?;
            let v = sh.vocab as u32;
            let logits: Vec<f32> =
                (0..v).map(|i| ((i.wrapping_mul(2654435761) >> 8) as f32 / 16777216.0) * 20.0).collect();
            let logits = gpu.upload("logits", &logits)?;
            let seen = gpu.storage("seen", v.div_ceil(32) as u64 * 4)?;
            let tokens = gpu.storage("tokens", 16)?;
            let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
            let nucleus = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, ..Default::default() };
            for (label, sp) in [("greedy", greedy), ("t=0.8 k=40 p=0.95", nucleus)] {
                let state = gpu.storage("state", 16)?;
                let b = k.bind_sample(gpu, v, &logits, &seen, &state, &tokens)?;
                b.0.set_params(&gpu.queue, &SampleParams::new(v, &sp));
                let s = self.time_sets(&[vec![b]])?;
                let bytes = v as f64 * 4.0;
                let r =
                    Row::new("sample", sh.name, "-", format!("{label} v={v}"), s, bytes, 0.0, peaks, gpu, &self.timer);
                on_row(&r);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::variants;

    /// The harness runs every kernel on a small adapter without error and reports sane rates.
    #[test]
    fn harness_times_every_kernel() {
        let gpu = &variants()[0];
        let mut opts = KernelBenchOptions::for_adapter(gpu);
        opts.dtypes = vec![DType::Q4_1];
        opts.prefill_tokens = 64;
        opts.trials = 1;
        opts.contexts = Some(vec![200]);
        let mut rows = vec![];
        let peaks = run(gpu, &opts, &mut |r| rows.push(r.clone())).unwrap();
        assert!(peaks.copy_gb_s > 0.0 && peaks.fma_gflop_s > 0.0);
        let kernels: Vec<&str> = rows.iter().map(|r| r.kernel.as_str()).collect();
        for k in [
            "copy",
            "fma",
            "handoff",
            "stream",
            "matvec_qkv",
            "matvec_gate_up",
            "matvec_lm_head",
            "matmul_down",
            "embedding",
            "embedding_q8_norm",
            "rope_kv",
            "attend_decode",
            "attend_merged",
            "attn_merge",
            "attend_prefill",
            "rms_norm",
            "sample",
            "matvec_q8_qkv",
            "matvec_q8_down",
            "matvec_q8_out_gate_up",
            "matvec_q8_norm_o",
            "matvec_q8_norm_down",
            "matvec_q8_scaled_qkv",
            "matvec_add_norm_o",
            "matvec_add_norm_down",
            "matvec_scaled_qkv",
            "matvec_scaled_gate_up",
            "quantize_q8",
        ] {
            assert!(kernels.contains(&k), "{k} missing from {kernels:?}");
        }
        assert!(!gpu.caps.f16 || kernels.contains(&"half_x"), "half_x missing from {kernels:?}");
        for r in &rows {
            assert!(r.us.is_finite() && r.us > 0.0, "{r:?}");
            assert!(r.gb_s.is_finite() && r.gflop_s.is_finite(), "{r:?}");
        }
    }
}
