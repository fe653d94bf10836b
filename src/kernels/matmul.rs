//! Weight matrices on the GPU and the products with them.
//!
//! * [`GpuMatrix`]: a weight matrix `[rows, cols]` kept in its packed file format
//!   ([`quant::pack_for_gpu`]), split into row chunks that each fit one storage binding.
//! * [`MatVec`] (decode): `y[v] = W x[v]` for `n` vectors, with the residual add or SwiGLU fused.
//! * [`MatMul`] (prefill): `Y[T, N] = X[T, K] W[N, K]^T`, tiled, same epilogues.
//!
//! Both bind one dispatch per chunk. The vector / token count lives in each chunk's parameter
//! uniform: bind with an initial count, then [`MatVec::set_rows`] / [`MatMul::set_rows`]
//! rewrite it (and the workgroup counts of the returned list) without new bind groups. Like
//! any `queue.write_buffer`, the new count takes effect for the next submission as a whole.

use super::Bound;
use crate::gpu::{Caps, Gpu, GpuBuffer, PipelineKey};
use crate::kernels::quantize::q8_words;
use crate::model::quant::{self, DType, GpuLayout};
use crate::{Error, Result};
use std::sync::Arc;

pub(crate) const WEIGHTS_WGSL: &str = include_str!("../../shaders/matmul/weights.wgsl");
const PRODUCTS_WGSL: &str = include_str!("../../shaders/matmul/products.wgsl");
const MATVEC_WGSL: &str = include_str!("../../shaders/matmul/matvec.wgsl");
const MATMUL_WGSL: &str = include_str!("../../shaders/matmul/matmul.wgsl");
const MATMUL_COOP_WGSL: &str = include_str!("../../shaders/matmul/matmul_coop.wgsl");

/// The `#if` name that selects a weight format in `weights.wgsl`.
pub(crate) fn w_define(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "W_F32",
        DType::F16 => "W_F16",
        DType::BF16 => "W_BF16",
        DType::Q8_0 => "W_Q8_0",
        DType::Q4_0 => "W_Q4_0",
        DType::Q4_1 => "W_Q4_1",
    }
}

/// Rows `row_start..row_start + rows` of a matrix, in one buffer (padded to 16 bytes).
pub struct MatrixChunk {
    pub buf: GpuBuffer,
    pub row_start: usize,
    pub rows: usize,
    pub layout: GpuLayout,
}

/// A weight matrix `[rows, cols]` on the GPU in its packed format.
pub struct GpuMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub chunks: Vec<MatrixChunk>,
}

/// Bytes of a chunk's buffer: the packed words padded to a multiple of 16 bytes (the kernels
/// read 16-byte vectors).
fn chunk_bytes(dtype: DType, rows: usize, cols: usize) -> u64 {
    (GpuLayout::new(dtype, rows, cols).total_words as u64 * 4).next_multiple_of(16)
}

impl GpuMatrix {
    /// Uploads a row-major `[rows, cols]` matrix given in its file byte layout (GGUF or
    /// safetensors), split into row chunks that fit `gpu.caps.max_binding`.
    pub fn upload(
        gpu: &Gpu,
        label: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        file_bytes: &[u8],
    ) -> Result<GpuMatrix> {
        if rows == 0 || cols == 0 {
            return Err(Error::InvalidArgument(format!("{label}: empty matrix {rows}x{cols}")));
        }
        let rb = dtype.row_bytes(cols).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{label}: {cols} columns do not divide into {} blocks of {}",
                dtype.name(),
                dtype.block_elems()
            ))
        })?;
        let want = rows.checked_mul(rb).ok_or_else(|| Error::InvalidArgument(format!("{label}: too large")))?;
        if file_bytes.len() != want {
            return Err(Error::InvalidArgument(format!(
                "{label}: {rows}x{cols} {} needs {want} bytes, got {}",
                dtype.name(),
                file_bytes.len()
            )));
        }
        let limit = gpu.caps.max_binding.min(gpu.caps.max_buffer);
        if chunk_bytes(dtype, 1, cols) > limit {
            return Err(Error::OutOfMemory(format!(
                "{label}: one row of {cols} {} values does not fit a binding of {} bytes on {}",
                dtype.name(),
                limit,
                gpu.info.name
            )));
        }
        let mut per = GpuLayout::rows_per_chunk(dtype, cols, limit).clamp(1, rows);
        while per > 1 && chunk_bytes(dtype, per, cols) > limit {
            per -= 1;
        }
        // The kernels index words with u32 and spread row groups over at most 65535 workgroups.
        per = per.min(65535 * 4);
        let mut chunks = Vec::new();
        let mut row_start = 0;
        while row_start < rows {
            let n = per.min(rows - row_start);
            let bytes = &file_bytes[row_start * rb..(row_start + n) * rb];
            let mut words = quant::pack_for_gpu(dtype, n, cols, bytes);
            words.resize(words.len().next_multiple_of(4), 0);
            let name = if n == rows { label.to_string() } else { format!("{label}[{row_start}..]") };
            let buf = gpu.upload(&name, &words)?;
            chunks.push(MatrixChunk { buf, row_start, rows: n, layout: GpuLayout::new(dtype, n, cols) });
            row_start += n;
        }
        Ok(GpuMatrix { dtype, rows, cols, chunks })
    }

    /// GPU memory held, in bytes.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buf.size).sum()
    }
}

/// What a product does with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `y = W x`.
    Store,
    /// `y += W x` (fuses the residual add).
    Add,
    /// `y = silu(G x) * (U x)` over two matrices of the same shape and type
    /// (`bind_swiglu`).
    SwiGlu,
}

impl Epilogue {
    fn define(self) -> Option<&'static str> {
        match self {
            Epilogue::Store => None,
            Epilogue::Add => Some("ADD"),
            Epilogue::SwiGlu => Some("SWIGLU"),
        }
    }
}

/// Parameter uniform of matvec and matmul (`Params` in products.wgsl). `t` (vector / token
/// count) comes first: `set_rows` rewrites just that word.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub t: u32,
    pub k: u32,
    pub rows: u32,
    pub n_total: u32,
    pub row_start: u32,
    pub x_off: u32,
    pub w_stride: u32,
    pub w_scale: u32,
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} does not fit u32")))
}

/// Checks shared by every bind: types, matching gate/up shapes, buffer sizes, u32 indices.
fn check_operands(
    kind: &str,
    dtype: DType,
    mats: &[&GpuMatrix],
    x: &GpuBuffer,
    x_offset: usize,
    y: &GpuBuffer,
    y_out: OutRows,
    n: usize,
    x_words: Option<usize>,
    y_q8: bool,
) -> Result<()> {
    let w = mats[0];
    if y_out.offset + w.rows > y_out.stride {
        return Err(Error::InvalidArgument(format!(
            "{kind}: {} output rows from column {} do not fit a row stride of {}",
            w.rows, y_out.offset, y_out.stride
        )));
    }
    for m in mats {
        if m.dtype != dtype {
            return Err(Error::InvalidArgument(format!(
                "{kind} built for {} got a {} matrix",
                dtype.name(),
                m.dtype.name()
            )));
        }
        if m.rows != w.rows
            || m.cols != w.cols
            || m.chunks.len() != w.chunks.len()
            || m.chunks.iter().zip(&w.chunks).any(|(a, b)| a.layout != b.layout || a.row_start != b.row_start)
        {
            return Err(Error::InvalidArgument(format!(
                "{kind}: gate and up matrices differ in shape or chunking ({}x{} vs {}x{})",
                w.rows, w.cols, m.rows, m.cols
            )));
        }
    }
    // Floats of x, or words of its 8-bit blocks (x_words).
    let per_vector = x_words.unwrap_or(w.cols);
    let x_end = n.checked_mul(per_vector).and_then(|v| v.checked_add(x_offset));
    let y_end = if y_q8 {
        n.checked_mul(q8_words(w.rows))
    } else {
        n.checked_sub(1).and_then(|v| v.checked_mul(y_out.stride)).and_then(|v| v.checked_add(y_out.offset + w.rows))
    };
    match (x_end, y_end) {
        (Some(xe), Some(ye)) if (xe as u64) * 4 <= x.size && (ye as u64) * 4 <= y.size => {
            u32_of("x end", xe)?;
            u32_of("y end", ye)?;
            Ok(())
        }
        _ => Err(Error::InvalidArgument(format!(
            "{kind}: {n} rows of [{}x{}] need x of {} floats from {x_offset} (buffer {} bytes) and y of {} floats (buffer {} bytes)",
            w.rows,
            w.cols,
            n.saturating_mul(w.cols),
            x.size,
            n.saturating_mul(w.rows),
            y.size
        ))),
    }
}

/// Where a product's outputs go in y: row `v` of the result is written at
/// `y[v * stride + offset ..][..rows]`. `stride = rows, offset = 0` is a plain `[n, rows]`
/// output; a larger stride lets several products fill one wider row (e.g. Q, K and V).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutRows {
    pub stride: usize,
    pub offset: usize,
}

impl OutRows {
    pub fn whole(w: &GpuMatrix) -> OutRows {
        OutRows { stride: w.rows, offset: 0 }
    }
}

fn chunk_params(w: &GpuMatrix, c: &MatrixChunk, t: u32, x_off: u32, y_out: OutRows) -> Params {
    Params {
        t,
        k: w.cols as u32,
        rows: c.rows as u32,
        n_total: y_out.stride as u32,
        row_start: (y_out.offset + c.row_start) as u32,
        x_off,
        w_stride: c.layout.row_stride as u32,
        w_scale: c.layout.scale_offset as u32,
    }
}

/// The matrices a bind call names must suit the epilogue the kernel was built with.
fn check_epilogue(kind: &str, epilogue: Epilogue, swiglu_call: bool) -> Result<()> {
    match (epilogue == Epilogue::SwiGlu, swiglu_call) {
        (true, false) => Err(Error::InvalidArgument(format!("a SwiGlu {kind} binds with bind_swiglu"))),
        (false, true) => Err(Error::InvalidArgument(format!("bind_swiglu needs a {kind} built with Epilogue::SwiGlu"))),
        _ => Ok(()),
    }
}

/// One bound dispatch per chunk of the matrices; `groups(chunk rows)` sizes each.
#[allow(clippy::too_many_arguments)]
fn bind_chunks(
    gpu: &Gpu,
    label: &str,
    pipeline: &Arc<wgpu::ComputePipeline>,
    mats: &[&GpuMatrix],
    x: &GpuBuffer,
    x_offset: usize,
    tail: &[&GpuBuffer],
    y: &GpuBuffer,
    y_out: OutRows,
    n: usize,
    groups: impl Fn(usize) -> [u32; 3],
) -> Vec<(Bound, [u32; 3])> {
    let w = mats[0];
    let mut out = Vec::new();
    for (ci, c) in w.chunks.iter().enumerate() {
        let params = gpu.uniform(label, &chunk_params(w, c, n as u32, x_offset as u32, y_out));
        let mut entries = vec![params.binding(), x.binding(), y.binding()];
        for m in mats {
            entries.push(m.chunks[ci].buf.binding());
        }
        for b in tail {
            entries.push(b.binding());
        }
        let bind_group = gpu.bind_group(pipeline, &entries);
        out.push((Bound { pipeline: pipeline.clone(), bind_group, params: Some(params) }, groups(c.rows)));
    }
    out
}

fn write_t(queue: &wgpu::Queue, b: &Bound, t: u32) {
    if let Some(u) = &b.params {
        queue.write_buffer(&u.buffer, 0, bytemuck::bytes_of(&t));
    }
}

/// Rows each segment of a matvec workgroup computes: 4, so that each loaded block of x serves
/// four rows, unless a GPU would then get fewer than [`MATVEC_MIN_GROUPS`] workgroups; then 2
/// or 1, trading that reuse for parallelism. Measured on an H200 (benches/RESULTS.md): the
/// SmolLM2-135M products (36-100 workgroups at 4 rows) decode ~40% faster this way, while
/// the Llama-3-8B ones (1024 and more) lose with fewer rows. A CPU adapter runs few
/// invocations at once and keeps 4.
pub fn matvec_rows(gpu: &Gpu, rows: usize, segments: usize) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return 4;
    }
    [4, 2].into_iter().find(|&r| rows.div_ceil(r * segments) >= MATVEC_MIN_GROUPS).unwrap_or(1)
}

/// Invocations per workgroup of the matvec of 8-bit vectors with `cols` columns: 128, or
/// 256 for rows of 256 blocks and more, where the f32 path keeps 64. Its loop is short on
/// arithmetic, so what limits it is how many loads are in flight; more invocations per row
/// put more there. Measured on an H100, 8B shape Q4_0 at 1K context
/// (benches/RESULTS.md, round 7): 64 -> 128 took decode from 291 to 312 tok/s, and 256 cut
/// the down product (14336 columns) a further 8% while slowing the 4096-column ones. A CPU
/// adapter keeps 64 (one workgroup per core at a time).
pub fn matvec_q8_workgroup(gpu: &Gpu, cols: usize) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        64
    } else if cols / 32 >= 256 {
        256
    } else {
        128
    }
}

/// Invocations per workgroup of a matvec of f32 vectors with `cols` columns: 64, or 128 for
/// the gate/up (`swiglu`) product where a row has 128 blocks or more. Such products walk a
/// row with at most [`F32_ROW_THREADS`] invocations, so the 128 make two segments of four
/// rows, two blocks per invocation per row and matrix. Measured on an H100, 8B f16 decode at
/// 1K (benches/RESULTS.md, round 16), GPU ms per token, with 128 invocations per row: 6.503 /
/// 6.505 -> 6.459 / 6.455 so; Q/K/V at 128 6.532 / 6.534, the LM head 6.501 / 6.506, all
/// three at 256 6.74-6.76, and the SmolLM2 shape (18 blocks per row) with all at 128 0.937 /
/// 0.935 against 0.931 / 0.926. On an H200 (round 18) gate/up at 128 with 64 per row against
/// 128 per row: 5.492 / 5.495 against 5.542 / 5.541; Q/K/V and the LM head at 32 or 16 per
/// row lost (5.67, 6.07). A CPU adapter keeps 64.
pub fn matvec_f32_workgroup(gpu: &Gpu, cols: usize, swiglu: bool) -> usize {
    if gpu.info.device_type != wgpu::DeviceType::Cpu && swiglu && cols / 32 >= 128 {
        128
    } else {
        64
    }
}

/// Most invocations per row of a matvec of f32 vectors ([`matvec_f32_workgroup`]): larger
/// workgroups hold more segments instead of spreading a row wider.
pub const F32_ROW_THREADS: usize = 64;

/// Invocations per workgroup of [`MatVec::with_q8_output`]: eight segments of four rows make
/// its 32-row block, so this sets the invocations per row (wg / 8). Measured on an H100, 8B
/// Q4_0 decode at 1K (benches/RESULTS.md, round 9): 64 -> 249 tok/s, 128 -> 312, 256 -> 341,
/// 512 -> 330, against 333 with the quantize dispatch.
pub fn q8_output_workgroup(gpu: &Gpu) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return 64;
    }
    256
}

/// Invocations per workgroup of [`MatVec::with_q8_norm_output`]: 8 x 128 where the rows are
/// long enough, as the adapter allows (64 on CPU adapters). Measured on an H100
/// (benches/RESULTS.md, round 9): with 512 or 256 invocations Llama-3-8B's down product at
/// 32 rows per workgroup ran 20-80% slower than with 1024.
pub fn q8_norm_workgroup(gpu: &Gpu, cols: usize) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return 64;
    }
    let tpr = threads_per_row_of(cols, true, 128) as usize;
    8 * tpr.min(gpu.caps.max_invocations as usize / 8).max(8)
}

/// Whether a [`MatVec::with_q8_norm_output`] product of `cols` columns in workgroups of `wg`
/// invocations, `tpr` per row, stages its 8-bit vector in workgroup memory (matvec.wgsl's
/// XSTAGE, two blocks per pass): on GPUs, where an invocation walks 8 blocks of its row or
/// more and the vector fits ([`staged_fits`]). Measured on H100s, 8B Q4_0 decode at 1K
/// (benches/RESULTS.md, round 14), GPU ms per token: 2.540-2.551 -> 2.508-2.525 with
/// Llama-3-8B's down product so (14 blocks per invocation); Wo (4 blocks) gained nothing,
/// and two blocks per pass with x in registers lost (2.603). Since products take four rows
/// per segment where their rows are long ([`MatVec::with_q8_norm_output`]), that down
/// product walks 3.5 blocks per invocation and is not staged: staged there it measured
/// 2.189 / 2.191 against 2.158-2.161 (H200, benches/RESULTS.md, round 18).
pub fn q8_norm_staged(gpu: &Gpu, cols: usize, wg: usize, tpr: u32) -> bool {
    gpu.info.device_type != wgpu::DeviceType::Cpu && cols / 32 >= 8 * tpr as usize && staged_fits(gpu, cols, wg)
}

/// Whether matvec.wgsl's staged vector (XSTAGE_VEC4 vec4s) holds an 8-bit vector of `cols`
/// columns and, with the workgroup's other arrays at `wg` invocations (a vec4 per
/// invocation, two 32-float blocks), fits the adapter's workgroup storage.
pub fn staged_fits(gpu: &Gpu, cols: usize, wg: usize) -> bool {
    const XSTAGE_VEC4: usize = 1152;
    let bytes = XSTAGE_VEC4 * 16 + wg * 16 + 256;
    cols.is_multiple_of(32)
        && q8_words(cols).div_ceil(4) <= XSTAGE_VEC4
        && bytes <= gpu.caps.max_workgroup_storage as usize
}

/// Words per vector of an 8-bit vector with its blocks' sums of squares
/// ([`MatVec::with_q8_norm_output`]): [`q8_words`], then one word per 32-value block, padded
/// to whole vec4s (matvec.wgsl's q8_norm_stride).
pub fn q8_norm_words(k: usize) -> usize {
    q8_words(k) + (k / 32).next_multiple_of(4)
}

/// Workgroup layout of [`MatVec::with_norm_output`] as (invocations, invocations per row,
/// rows per segment): fixed per adapter, so that the number of sums of squares it writes
/// (one per workgroup) depends on the row count alone ([`norm_output_parts`]). On GPUs two
/// segments of 64 invocations and four rows: 8 rows and one sum per workgroup. Measured on
/// an H100, 8B f16 decode (benches/RESULTS.md, round 10), GPU ms per token at 1K / 16K:
/// 6.90 / 7.94 with the norm dispatches; 6.62 / 7.65 at (256, 64, 4); 6.72-6.76 / 7.75-7.78
/// at 8 rows or 32 (more sums for the products to add up, or fewer workgroups); 6.79 / 7.82
/// at 4 rows (the plain product's layout); 7.96 / 8.94 at 32 rows of one segment each. On an
/// H200 (round 20), with the f16 products' chunked walk, two segments beat four (4.993 ->
/// 4.976 ms; 4.928 with one chunk pass per iteration, [`MatVec::chunk_passes`]): Llama-3-8B's
/// Wo and down become 512 workgroups instead of 256, i.e. ~3.9 instead of ~1.9 per SM.
pub fn norm_output_layout(gpu: &Gpu) -> (usize, u32, usize) {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        (64, 16, 4)
    } else {
        (128, 64, 4)
    }
}

/// Rows per segment (4, 2 or 1) of a 32-row block kernel in `wg` invocations whose rows have
/// `units` loop units (blocks, or pairs of blocks): the most at which each of a segment's
/// wg * R / 32 invocations still has a unit ([`MatVec::with_q8_norm_output`] on GPUs).
fn block_rows_filling(wg: usize, units: usize) -> usize {
    [4, 2].into_iter().find(|&r| wg * r / 32 <= units).unwrap_or(1)
}

/// Sums of squares per vector that [`MatVec::with_norm_output`] writes for `rows` rows in the
/// adapter's layout: one per workgroup.
pub fn norm_output_parts(gpu: &Gpu, rows: usize) -> usize {
    rows.div_ceil(layout_rows(norm_output_layout(gpu)))
}

/// Rows one workgroup of a (invocations, invocations per row, rows per segment) layout covers.
fn layout_rows((wg, tpr, r): (usize, u32, usize)) -> usize {
    wg / tpr as usize * r
}

/// Floats per vector of [`MatVec::with_norm_output`]'s output for `k` rows and `parts` sums
/// of squares: x * g, then the sums padded to whole vec4s (matvec.wgsl's f32_norm_stride).
pub fn norm_output_floats(k: usize, parts: usize) -> usize {
    k + parts.next_multiple_of(4)
}

/// The matvec key for workgroups of `wg` invocations (64 unless defined otherwise).
fn with_wg(key: PipelineKey, wg: usize) -> PipelineKey {
    match wg {
        1024 => key.define("WG1024"),
        512 => key.define("WG512"),
        256 => key.define("WG256"),
        128 => key.define("WG128"),
        _ => key,
    }
}

/// Workgroups below which a matvec takes fewer rows per segment (see [`matvec_rows`]).
pub const MATVEC_MIN_GROUPS: usize = 1024;

/// The attention partials a matvec merges into its vector ([`MatVec::with_merge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeInput {
    pub n_heads: u32,
    pub head_dim: u32,
    /// Splits the partials buffer is laid out for.
    pub splits: u32,
}

/// Invocations that share one row in the matvec: about one 32-element block (fast path) or
/// 32 elements (element-wise path) each, a power of two from 4 to 64. Short rows thus get
/// more rows per workgroup instead of idle invocations.
pub fn threads_per_row(cols: usize, fast: bool) -> u32 {
    threads_per_row_of(cols, fast, 64)
}

/// [`threads_per_row`] in workgroups of `wg` invocations: up to `wg`.
fn threads_per_row_of(cols: usize, fast: bool, wg: usize) -> u32 {
    let units = if fast { cols / 32 } else { cols.div_ceil(32) };
    let p = if units <= 1 { 1 } else { 1usize << (usize::BITS - 1 - units.leading_zeros()) };
    p.clamp(4, wg) as u32
}

/// Decode product `y[v, :] = W x[v, :]` for `v < n` (x `[n, K]` from `x_offset` elements, y
/// `[n, N]`), f32 vectors, weights in any [`DType`].
pub struct MatVec {
    dtype: DType,
    epilogue: Epilogue,
    /// RMSNorm of x (with this epsilon and a weight given at bind time) fused in front.
    norm_eps: Option<f32>,
    /// The attention merge fused in front: x is the partials of this shape.
    merge: Option<MergeInput>,
    /// Rows per segment instead of [`matvec_rows`]'s choice (tests of every variant).
    rows_per_segment: Option<usize>,
    /// x is 8-bit blocks ([`MatVec::with_q8_input`]).
    q8_input: bool,
    /// Invocations per workgroup instead of [`matvec_q8_workgroup`]'s choice (tests).
    workgroup: Option<usize>,
    /// The SwiGLU output is written as 8-bit blocks ([`MatVec::with_q8_output`]).
    q8_output: bool,
    /// x carries its blocks' sums of squares, and the products are scaled by the 1 / rms
    /// they give with this epsilon ([`MatVec::with_norm_scale`]).
    norm_scale: Option<f32>,
    /// The Add product also writes the new vector for the next norm
    /// ([`MatVec::with_q8_norm_output`]).
    q8_norm_output: bool,
    /// The same for f32 vectors, in this layout ([`MatVec::with_norm_output`]).
    norm_output: Option<(usize, u32, usize)>,
    /// Whether the 8-bit norm-output product stages its vector in workgroup memory, instead
    /// of [`q8_norm_staged`]'s choice (tests of both paths).
    staged: Option<bool>,
    /// Sums of squares the f32 vector of a norm-scaled product carries, instead of
    /// [`norm_output_parts`] (tests of other producer layouts).
    norm_parts: Option<usize>,
}

impl MatVec {
    pub fn new(gpu: &Gpu, dtype: DType, epilogue: Epilogue) -> Result<MatVec> {
        Self::build(gpu, dtype, epilogue, None)
    }

    /// Widest vector a fused norm takes: x * g lives in workgroup memory (8 KiB). Wider
    /// models keep the norm as its own dispatch, which costs them relatively little.
    pub const NORM_MAX_COLS: usize = 2048;

    /// A product of the RMS-normalised vector: `W (x * g / sqrt(mean(x^2) + eps))`, the norm
    /// weight `g` given to [`MatVec::bind_norm_into`] / [`MatVec::bind_norm_swiglu`].
    pub fn with_norm(gpu: &Gpu, dtype: DType, epilogue: Epilogue, eps: f32) -> Result<MatVec> {
        Self::build(gpu, dtype, epilogue, Some(eps))
    }

    /// The plain product's settings, which the constructors change.
    fn plain(dtype: DType, epilogue: Epilogue) -> MatVec {
        MatVec {
            dtype,
            epilogue,
            norm_eps: None,
            merge: None,
            rows_per_segment: None,
            q8_input: false,
            workgroup: None,
            q8_output: false,
            norm_scale: None,
            q8_norm_output: false,
            norm_output: None,
            norm_parts: None,
            staged: None,
        }
    }

    fn build(gpu: &Gpu, dtype: DType, epilogue: Epilogue, norm_eps: Option<f32>) -> Result<MatVec> {
        let k = MatVec { norm_eps, ..Self::plain(dtype, epilogue) };
        // The fast path is what real models use; compile it now. The element-wise path (odd
        // shapes) compiles on first bind.
        gpu.pipeline(&k.key(gpu, true, 64).constant("R", 4))?;
        Ok(k)
    }

    /// Forces 1, 2 or 4 rows per segment (tests; normally chosen per matrix and device).
    pub fn with_rows_per_segment(mut self, rows: usize) -> Result<MatVec> {
        if ![1, 2, 4].contains(&rows) {
            return Err(Error::InvalidArgument(format!("{rows} rows per matvec segment (1, 2 or 4)")));
        }
        self.rows_per_segment = Some(rows);
        Ok(self)
    }

    /// Forces the staged vector of [`MatVec::with_q8_norm_output`] on or off (tests;
    /// normally [`q8_norm_staged`] decides). Binding fails where it is on and does not fit.
    pub fn with_staged_vector(mut self, on: bool) -> Result<MatVec> {
        if !self.q8_norm_output {
            return Err(Error::InvalidArgument("only a product with_q8_norm_output stages its vector".into()));
        }
        self.staged = Some(on);
        Ok(self)
    }

    /// Forces 64, 128, 256, 512 or 1024 invocations per workgroup (tests; normally
    /// [`matvec_q8_workgroup`] for 8-bit vectors, [`matvec_f32_workgroup`] for f32 ones, and
    /// for the kernels writing 8-bit blocks [`q8_output_workgroup`] and [`q8_norm_workgroup`]).
    /// Products built [`MatVec::with_norm_output`] ignore it: their layout is
    /// [`norm_output_layout`] or [`MatVec::with_norm_layout`]'s.
    pub fn with_workgroup(mut self, wg: usize) -> Result<MatVec> {
        if ![64, 128, 256, 512, 1024].contains(&wg) {
            return Err(Error::InvalidArgument(format!("{wg} invocations per workgroup (64 to 1024)")));
        }
        self.workgroup = Some(wg);
        Ok(self)
    }

    /// `y += W merge(partials)`: the attention merge (attn_merge.wgsl's result) computed by
    /// every workgroup in front of the product, for decode steps that use at most
    /// [`MatVec::MERGE_SPLITS`] splits ([`MatVec::bind_merge_add`]). Needs the fast path
    /// (`n_heads * head_dim` a multiple of 32) and at most [`MatVec::NORM_MAX_COLS`] columns.
    pub fn with_merge(gpu: &Gpu, dtype: DType, input: MergeInput) -> Result<MatVec> {
        let cols = (input.n_heads * input.head_dim) as usize;
        if !MatVec::merge_fits(input) {
            return Err(Error::InvalidArgument(format!(
                "a fused merge takes a multiple of 32 columns up to {}, not {cols}",
                Self::NORM_MAX_COLS
            )));
        }
        let k = MatVec { merge: Some(input), ..Self::plain(dtype, Epilogue::Add) };
        gpu.pipeline(&k.key(gpu, true, threads_per_row(cols, true)).constant("R", 4))?;
        Ok(k)
    }

    /// A product of vectors quantized to 8 bits per 32-element block
    /// ([`crate::kernels::quantize::QuantizeQ8`]'s output, bound as x), in integer dot
    /// products; for the formats [`MatVec::takes_q8_input`] names. Binds like the plain
    /// kernel (bind, bind_into, bind_swiglu), with offset 0.
    pub fn with_q8_input(gpu: &Gpu, dtype: DType, epilogue: Epilogue) -> Result<MatVec> {
        if !Self::takes_q8_input(dtype) {
            return Err(Error::InvalidArgument(format!("{} weights take f32 vectors, not 8-bit ones", dtype.name())));
        }
        let k = MatVec { q8_input: true, ..Self::plain(dtype, epilogue) };
        gpu.pipeline(&k.key(gpu, true, 64).constant("R", 4))?;
        Ok(k)
    }

    /// `y = q8(silu(G x) * (U x))` of an 8-bit vector x: the SwiGLU product of
    /// [`MatVec::with_q8_input`] writing its output quantized to 8 bits per 32-element block,
    /// as [`crate::kernels::quantize::QuantizeQ8`] would (the down product's input), so that
    /// no quantize dispatch follows. Each workgroup computes one block, 32 rows; matrices
    /// take a multiple of 32 rows ([`MatVec::q8_output_fits`]) and `y` holds
    /// [`crate::kernels::quantize::q8_words`] of the row count per vector.
    pub fn with_q8_output(gpu: &Gpu, dtype: DType) -> Result<MatVec> {
        let mut k = Self::with_q8_input(gpu, dtype, Epilogue::SwiGlu)?;
        k.q8_output = true;
        let wg = q8_output_workgroup(gpu);
        gpu.pipeline(&with_wg(k.key(gpu, true, (wg / 8) as u32).constant("R", 4), wg))?;
        Ok(k)
    }

    /// A product of a vector that [`MatVec::with_q8_norm_output`] (8-bit vectors) or
    /// [`MatVec::with_norm_output`] (f32 vectors, Store or SwiGLU) wrote: x carries sums of
    /// squares after it ([`q8_norm_words`], [`norm_output_floats`]), and the products are
    /// scaled by `1 / sqrt(mean(x^2) + eps)`, which makes them products of the RMS-normalised
    /// vector. Its workgroups take at most 256 invocations; f32 vectors take the fast path
    /// (a multiple of 32 columns from offset 0).
    pub fn with_norm_scale(mut self, eps: f32) -> Result<MatVec> {
        let plain_f32 = self.norm_eps.is_none() && self.merge.is_none() && self.epilogue != Epilogue::Add;
        if !(self.q8_input || plain_f32) || self.workgroup.is_some_and(|w| w > 256) {
            return Err(Error::InvalidArgument(
                "a norm scale needs 8-bit vectors or a plain f32 Store/SwiGLU product, at most 256 invocations".into(),
            ));
        }
        self.norm_scale = Some(eps);
        Ok(self)
    }

    /// `y += W x` of f32 vectors (a layer's Wo or down product) that also writes the new y
    /// times the next RMSNorm's weight `g`, and one sum of squares of y per workgroup, for a
    /// product [`MatVec::with_norm_scale`] ([`norm_output_floats`] per vector): the norm
    /// dispatch in front of the next products goes. Binds through
    /// [`MatVec::bind_add_norm`]; workgroups as [`norm_output_layout`] says.
    pub fn with_norm_output(gpu: &Gpu, dtype: DType) -> Result<MatVec> {
        Ok(MatVec { norm_output: Some(norm_output_layout(gpu)), ..Self::plain(dtype, Epilogue::Add) })
    }

    /// Another workgroup layout for [`MatVec::with_norm_output`] (tests): `wg` invocations of
    /// 64 to 1024, `tpr` per row (a power of two from 4 to wg), `r` rows per segment.
    pub fn with_norm_layout(mut self, wg: usize, tpr: u32, r: usize) -> Result<MatVec> {
        let ok = [64, 128, 256, 512, 1024].contains(&wg)
            && tpr.is_power_of_two()
            && (4..=wg as u32).contains(&tpr)
            && [1, 2, 4].contains(&r);
        if self.norm_output.is_none() || !ok {
            return Err(Error::InvalidArgument(format!("norm output layout ({wg}, {tpr}, {r})")));
        }
        self.norm_output = Some((wg, tpr, r));
        Ok(self)
    }

    /// Sums of squares per vector this [`MatVec::with_norm_output`] kernel writes for `rows`.
    pub fn norm_output_parts(&self, rows: usize) -> Option<usize> {
        self.norm_output.map(|layout| rows.div_ceil(layout_rows(layout)))
    }

    /// The sums of squares a norm-scaled f32 product reads per vector, where its producer's
    /// layout is not the adapter's (tests).
    pub fn with_norm_parts(mut self, parts: usize) -> Result<MatVec> {
        if self.q8_input || self.norm_scale.is_none() || parts == 0 {
            return Err(Error::InvalidArgument("norm parts need an f32 product with_norm_scale".into()));
        }
        self.norm_parts = Some(parts);
        Ok(self)
    }

    /// Whether [`MatVec::with_norm_output`], in the adapter's layout, takes the rows of `w`:
    /// every chunk starts at a whole workgroup's rows.
    pub fn norm_output_fits(gpu: &Gpu, w: &GpuMatrix) -> bool {
        let rows = layout_rows(norm_output_layout(gpu));
        w.chunks.iter().all(|c| c.row_start.is_multiple_of(rows))
    }

    /// Whether f32 products of `cols` columns take a vector [`MatVec::with_norm_output`]
    /// wrote (the fast path reads it).
    pub fn norm_scale_fits(cols: usize) -> bool {
        cols.is_multiple_of(32)
    }

    /// `y += W x` of 8-bit vectors (a layer's Wo or down product) that also writes the new y,
    /// times the next RMSNorm's weight `g`, as 8-bit blocks with their sums of squares
    /// ([`q8_norm_words`] per vector) for a product [`MatVec::with_norm_scale`]: the norm
    /// dispatch in front of the next products goes. Each workgroup computes one 32-row
    /// block ([`MatVec::q8_output_fits`]; [`q8_norm_workgroup`] invocations).
    pub fn with_q8_norm_output(gpu: &Gpu, dtype: DType) -> Result<MatVec> {
        let mut k = Self::with_q8_input(gpu, dtype, Epilogue::Add)?;
        k.q8_norm_output = true;
        Ok(k)
    }

    /// Whether [`MatVec::with_q8_output`] takes these gate/up matrices: whole blocks of rows
    /// in every chunk.
    pub fn q8_output_fits(w: &GpuMatrix) -> bool {
        w.rows.is_multiple_of(32)
            && w.chunks.iter().all(|c| c.row_start.is_multiple_of(32) && c.rows.is_multiple_of(32))
    }

    /// Weight formats with an integer-dot product of 8-bit vectors: the 8- and 4-bit ones.
    pub fn takes_q8_input(dtype: DType) -> bool {
        matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }

    /// Splits a step may use for [`MatVec::with_merge`] (matvec.wgsl's MERGE_SPLITS).
    pub const MERGE_SPLITS: u32 = 8;

    /// Whether [`MatVec::with_merge`] takes partials of this shape.
    pub fn merge_fits(input: MergeInput) -> bool {
        let cols = (input.n_heads * input.head_dim) as usize;
        cols.is_multiple_of(32) && cols <= Self::NORM_MAX_COLS && input.head_dim.is_multiple_of(4)
    }

    /// Binds `y += W merge(part)` for a one-token step: `part` holds the attention partials
    /// `[n_heads][splits][head_dim + 2]`, `state` the step (attend*.wgsl's bindings).
    pub fn bind_merge_add(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        part: &GpuBuffer,
        state: &GpuBuffer,
        y: &GpuBuffer,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        let m = self
            .merge
            .ok_or_else(|| Error::InvalidArgument("bind_merge_add needs a matvec built with_merge".into()))?;
        if w.cols != (m.n_heads * m.head_dim) as usize {
            return Err(Error::InvalidArgument(format!(
                "a merge of {} heads of {} into a matrix of {} columns",
                m.n_heads, m.head_dim, w.cols
            )));
        }
        let need = (m.n_heads * m.splits * (m.head_dim + 2)) as u64 * 4;
        if part.size < need {
            return Err(Error::InvalidArgument(format!("partials of {} bytes, need {need}", part.size)));
        }
        self.bind_all(gpu, &[w], part, 0, Some(state), y, OutRows::whole(w), 1)
    }

    /// Chunk passes per loop iteration of a 16-bit product's chunked walk (matvec.wgsl's
    /// FCHUNK2): two for f16, whose loads then are in flight together, one for bf16 and for
    /// the add-norm products. Measured on an H200, 8B decode at 1K (benches/RESULTS.md rounds
    /// 19 and 20), GPU ms per token: f16 two passes 5.054 -> 4.964, bf16 5.248 -> 5.317; the
    /// f16 Wo and down add-norm products with one pass 4.993 -> 4.975 in their old layout,
    /// and with [`norm_output_layout`]'s two segments 4.976 -> 4.928.
    fn chunk_passes(&self) -> u32 {
        if self.dtype == DType::F16 && self.norm_output.is_none() {
            2
        } else {
            1
        }
    }

    fn key(&self, gpu: &Gpu, fast: bool, tpr: u32) -> PipelineKey {
        let mut key = PipelineKey::new("matvec", &[PRODUCTS_WGSL, WEIGHTS_WGSL, MATVEC_WGSL], gpu.flags())
            .define(w_define(self.dtype));
        if let Some(d) = self.epilogue.define() {
            key = key.define(d);
        }
        if self.q8_input {
            key = key.define("XQ8");
            if self.q8_output {
                key = key.define("QOUT").define("QBLOCK");
            }
            if self.q8_norm_output {
                key = key.define("QNORM").define("QBLOCK").define("Q8NORM");
            }
            if let Some(eps) = self.norm_scale {
                key = key.define("NSCALE").define("Q8NORM").constant("EPS_BITS", eps.to_bits());
                key.sources.insert(0, super::REDUCE_WGSL);
            }
        } else if fast {
            key = key.define("XVEC");
            // 16-bit rows walk chunks so that a subgroup's loads are contiguous runs
            // (w_dot4c; 8B f16 decode +8% on an H200, benches/RESULTS.md round 19).
            if matches!(self.dtype, DType::F16 | DType::BF16) {
                key = key.define("FCHUNK");
            }
            if self.chunk_passes() == 2 {
                key = key.define("FCHUNK2");
            }
            if let Some(eps) = self.norm_scale {
                key = key.define("FSCALE").define("F32NORM").constant("EPS_BITS", eps.to_bits());
                key.sources.insert(0, super::REDUCE_WGSL);
            }
        }
        if self.norm_output.is_some() {
            key = key.define("FNORM").define("F32NORM");
        }
        if let Some(eps) = self.norm_eps {
            key = key.define("NORM").define("XG").constant("EPS_BITS", eps.to_bits());
        }
        if let Some(m) = self.merge {
            key = key
                .define("MERGE")
                .define("XG")
                .constant("N_HEADS", m.n_heads)
                .constant("HD", m.head_dim)
                .constant("N_SPLITS", m.splits);
        }
        key.constant("TPR", tpr)
    }

    /// Binds `y = W x` (or `y += W x` for [`Epilogue::Add`]): one dispatch per chunk of `w`,
    /// each writing its rows of y.
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        x_offset_elems: usize,
        y: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matvec", self.epilogue, false)?;
        self.bind_all(gpu, &[w], x, x_offset_elems, None, y, OutRows::whole(w), n)
    }

    /// Binds `y = silu(G x) * (U x)`; g and u must have the same shape and type.
    pub fn bind_swiglu(
        &self,
        gpu: &Gpu,
        g: &GpuMatrix,
        u: &GpuMatrix,
        x: &GpuBuffer,
        x_offset_elems: usize,
        y: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matvec", self.epilogue, true)?;
        self.bind_all(gpu, &[g, u], x, x_offset_elems, None, y, OutRows::whole(g), n)
    }

    /// Binds `y = W x` into columns `out.offset..` of rows of `out.stride` floats.
    pub fn bind_into(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        y: &GpuBuffer,
        out: OutRows,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matvec", self.epilogue, false)?;
        self.bind_all(gpu, &[w], x, 0, None, y, out, n)
    }

    /// [`MatVec::bind_into`] of the normalised x (a kernel built [`MatVec::with_norm`]); `g`
    /// holds the norm weight, one per column.
    pub fn bind_norm_into(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        g: &GpuBuffer,
        y: &GpuBuffer,
        out: OutRows,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matvec", self.epilogue, false)?;
        self.bind_all(gpu, &[w], x, 0, Some(g), y, out, n)
    }

    /// [`MatVec::bind_swiglu`] of the normalised x; `norm` holds the norm weight.
    pub fn bind_norm_swiglu(
        &self,
        gpu: &Gpu,
        g: &GpuMatrix,
        u: &GpuMatrix,
        x: &GpuBuffer,
        norm: &GpuBuffer,
        y: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matvec", self.epilogue, true)?;
        self.bind_all(gpu, &[g, u], x, 0, Some(norm), y, OutRows::whole(g), n)
    }

    /// The norm weight a matvec built [`MatVec::with_norm`] (or not) is bound with.
    fn check_norm(has_norm: bool, norm: Option<&GpuBuffer>, cols: usize) -> Result<()> {
        match (has_norm, norm) {
            (true, None) => return Err(Error::InvalidArgument("a matvec built with_norm binds a norm weight".into())),
            (false, Some(_)) => {
                return Err(Error::InvalidArgument("a norm weight needs a matvec built with_norm".into()))
            }
            (_, Some(_)) if cols > Self::NORM_MAX_COLS => {
                return Err(Error::InvalidArgument(format!(
                    "a fused norm takes at most {} columns, not {}",
                    Self::NORM_MAX_COLS,
                    cols
                )))
            }
            (_, Some(g)) if g.size < cols as u64 * 4 => {
                return Err(Error::InvalidArgument(format!("norm weight of {} bytes for {} columns", g.size, cols)))
            }
            _ => {}
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn bind_all(
        &self,
        gpu: &Gpu,
        mats: &[&GpuMatrix],
        x: &GpuBuffer,
        x_offset: usize,
        norm: Option<&GpuBuffer>,
        y: &GpuBuffer,
        y_out: OutRows,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        let x_words = self.x_words(gpu, mats[0].cols);
        check_operands("matvec", self.dtype, mats, x, x_offset, y, y_out, n, x_words, self.q8_output)?;
        if x_words.is_some() && (!mats[0].cols.is_multiple_of(32) || x_offset != 0) {
            return Err(Error::InvalidArgument(format!(
                "a matvec of 8-bit or norm-scaled vectors takes a multiple of 32 columns from offset 0, not {} from {x_offset}",
                mats[0].cols
            )));
        }
        match (self.merge.is_some(), norm) {
            (true, None) => {
                return Err(Error::InvalidArgument("a matvec built with_merge binds through bind_merge_add".into()))
            }
            (true, Some(_)) => {}
            (false, _) => Self::check_norm(self.norm_eps.is_some(), norm, mats[0].cols)?,
        }
        let w = mats[0];
        if self.q8_norm_output || self.norm_output.is_some() {
            return Err(Error::InvalidArgument(
                "a matvec built with_q8_norm_output or with_norm_output binds through bind_add_norm_q8 / bind_add_norm"
                    .into(),
            ));
        }
        if self.q8_output {
            return self.bind_blocks(gpu, mats, x, &[], y, y_out, n);
        }
        let fast = self.q8_input || (w.cols.is_multiple_of(32) && x_offset.is_multiple_of(4));
        let pairs = self.block_pairs(w.cols);
        let wg = match (self.q8_input, self.workgroup) {
            (true, Some(wg)) => wg,
            (true, None) => matvec_q8_workgroup(gpu, w.cols),
            (false, Some(wg)) => wg,
            (false, None) => matvec_f32_workgroup(gpu, w.cols, mats.len() == 2),
        };
        // In pairs of blocks, a row has half the units to spread over its invocations.
        let row_threads = if self.q8_input { wg } else { wg.min(F32_ROW_THREADS) };
        let tpr = threads_per_row_of(if pairs { w.cols / 2 } else { w.cols }, fast, row_threads);
        let segments = wg / tpr as usize;
        let largest = w.chunks.iter().map(|c| c.rows).max().unwrap_or(0);
        let r = self.rows_per_segment.unwrap_or_else(|| matvec_rows(gpu, largest, segments));
        let mut key = self.key(gpu, fast, tpr).constant("R", r as u32);
        if pairs {
            key = key.define("XPAIR");
        }
        if let (false, Some(_)) = (self.q8_input, self.norm_scale) {
            key = key.constant("NORM_PARTS", u32_of("norm parts", self.norm_parts(gpu, w.cols))?);
        }
        let pipeline = gpu.pipeline(&with_wg(key, wg))?;
        let rows_per_group = r * segments;
        if largest.div_ceil(rows_per_group) > 65535 {
            return Err(Error::InvalidArgument(format!(
                "{largest} rows at {r} per segment need more than 65535 workgroups"
            )));
        }
        Ok(bind_chunks(gpu, "matvec", &pipeline, mats, x, x_offset, norm.as_slice(), y, y_out, n, |rows| {
            [n as u32, rows.div_ceil(rows_per_group) as u32, 1]
        }))
    }

    /// [`MatVec::bind_all`] for the kernels that write 32-row blocks (8-bit outputs): one
    /// workgroup per block; `tail` binds after the matrices.
    #[allow(clippy::too_many_arguments)]
    fn bind_blocks(
        &self,
        gpu: &Gpu,
        mats: &[&GpuMatrix],
        x: &GpuBuffer,
        tail: &[&GpuBuffer],
        y: &GpuBuffer,
        y_out: OutRows,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        let w = mats[0];
        if !Self::q8_output_fits(w) || y_out != OutRows::whole(w) {
            return Err(Error::InvalidArgument(format!(
                "an 8-bit output takes whole 32-row blocks of a whole matrix, not {} rows",
                w.rows
            )));
        }
        let (wg, r) = self.block_layout(gpu, w.cols);
        if self.norm_scale.is_some() && wg > 256 {
            return Err(Error::InvalidArgument(format!("a norm scale takes at most 256 invocations, not {wg}")));
        }
        let tpr = (wg * r / 32) as u32;
        let mut key = with_wg(self.key(gpu, true, tpr).constant("R", r as u32), wg);
        if self.block_pairs(w.cols) {
            key = key.define("XPAIR");
        }
        if self.q8_norm_output && self.staged.unwrap_or_else(|| q8_norm_staged(gpu, w.cols, wg, tpr)) {
            if !staged_fits(gpu, w.cols, wg) {
                return Err(Error::InvalidArgument(format!(
                    "a staged vector of {} columns at {wg} invocations does not fit the adapter's {} bytes of workgroup storage",
                    w.cols, gpu.caps.max_workgroup_storage
                )));
            }
            key = key.define("XSTAGE");
        }
        let pipeline = gpu.pipeline(&key)?;
        Ok(bind_chunks(gpu, "matvec", &pipeline, mats, x, 0, tail, y, y_out, n, |rows| {
            [n as u32, (rows / 32) as u32, 1]
        }))
    }

    /// Binds `y += W x` for a kernel built [`MatVec::with_q8_norm_output`]: `g` is the next
    /// RMSNorm's weight (one per row of W), `xq_out` receives [`q8_norm_words`] of W's row
    /// count per vector.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_add_norm_q8(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        y: &GpuBuffer,
        g: &GpuBuffer,
        xq_out: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        if !self.q8_norm_output {
            return Err(Error::InvalidArgument("bind_add_norm_q8 needs a matvec built with_q8_norm_output".into()));
        }
        self.check_add_norm(gpu, w, x, y, g, (xq_out, q8_norm_words(w.rows)), n)?;
        self.bind_blocks(gpu, &[w], x, &[g, xq_out], y, OutRows::whole(w), n)
    }

    /// The operands of `y += W x` that also writes the next norm's input: `g` one weight per
    /// row of W, `out` (buffer, words per vector) the output for `n` vectors.
    #[allow(clippy::too_many_arguments)]
    fn check_add_norm(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        y: &GpuBuffer,
        g: &GpuBuffer,
        out: (&GpuBuffer, usize),
        n: usize,
    ) -> Result<()> {
        check_operands("matvec", self.dtype, &[w], x, 0, y, OutRows::whole(w), n, self.x_words(gpu, w.cols), false)?;
        if g.size < w.rows as u64 * 4 {
            return Err(Error::InvalidArgument(format!("norm weight of {} bytes for {} rows", g.size, w.rows)));
        }
        let need = n as u64 * out.1 as u64 * 4;
        if out.0.size < need {
            return Err(Error::InvalidArgument(format!("norm output of {} bytes, need {need}", out.0.size)));
        }
        Ok(())
    }

    /// Invocations and rows per segment of the kernels that write 32-row blocks: 32 / R
    /// segments of wg * R / 32 invocations each. The norm output's products (Wo, down) take,
    /// on GPUs, the most rows per segment (4, 2, 1) at which every invocation of a segment
    /// still has a unit of the row (a block, or a pair of blocks) to walk: more rows share
    /// each load of x, fewer leave invocations idle. Measured on an H200 (benches/RESULTS.md,
    /// round 18), 8B Q4_0 decode at 1K, GPU ms per token: with one row each (round 9's
    /// choice, before pairs of blocks) 2.237-2.241; down at 4 rows 2.163 / 2.165, at 2 rows
    /// 2.194 / 2.198; Wo at 2 rows 2.231 / 2.228, at 4 (half its invocations idle) 2.241 / 2.239.
    fn block_layout(&self, gpu: &Gpu, cols: usize) -> (usize, usize) {
        let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
        let wg = match self.workgroup {
            Some(wg) => wg,
            None if self.q8_norm_output => q8_norm_workgroup(gpu, cols),
            None => q8_output_workgroup(gpu),
        };
        let r = if self.q8_norm_output && !cpu {
            block_rows_filling(wg, if self.block_pairs(cols) { cols / 64 } else { cols / 32 })
        } else {
            4
        };
        (wg, self.rows_per_segment.unwrap_or(r))
    }

    /// Whether this kernel's 8-bit-vector loop walks neighbouring blocks in pairs (matvec.wgsl's
    /// XPAIR): where rows have an even block count. Measured on an H100, 8B Q4_0 decode at 1K
    /// (benches/RESULTS.md, round 17), GPU ms per token: 2.554-2.561 -> 2.532-2.537; the
    /// SmolLM2 shape (Q4_1, 18 and 48 blocks per row) unchanged. A block each had loaded its
    /// weight scales and x scales apart, and those loads had cost more than their bytes.
    fn block_pairs(&self, cols: usize) -> bool {
        self.q8_input && cols.is_multiple_of(64)
    }

    /// Words per vector of this kernel's x of `cols` values where it is not plain f32: 8-bit
    /// blocks, or f32 values with sums of squares after them.
    fn x_words(&self, gpu: &Gpu, cols: usize) -> Option<usize> {
        match (self.q8_input, self.norm_scale) {
            (true, Some(_)) => Some(q8_norm_words(cols)),
            (true, None) => Some(q8_words(cols)),
            (false, Some(_)) => Some(norm_output_floats(cols, self.norm_parts(gpu, cols))),
            (false, None) => None,
        }
    }

    /// Sums of squares after a norm-scaled f32 vector of `cols` values.
    fn norm_parts(&self, gpu: &Gpu, cols: usize) -> usize {
        self.norm_parts.unwrap_or_else(|| norm_output_parts(gpu, cols))
    }

    /// Binds `y += W x` for a kernel built [`MatVec::with_norm_output`]: `g` is the next
    /// RMSNorm's weight (one per row of W), `xn_out` receives [`norm_output_floats`] of W's
    /// rows per vector.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_add_norm(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        y: &GpuBuffer,
        g: &GpuBuffer,
        xn_out: &GpuBuffer,
        n: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        let (Some((wg, tpr, r)), Some(parts)) = (self.norm_output, self.norm_output_parts(w.rows)) else {
            return Err(Error::InvalidArgument("bind_add_norm needs a matvec built with_norm_output".into()));
        };
        self.check_add_norm(gpu, w, x, y, g, (xn_out, norm_output_floats(w.rows, parts)), n)?;
        let rows_per_group = layout_rows((wg, tpr, r));
        if w.chunks.iter().any(|c| !c.row_start.is_multiple_of(rows_per_group)) || parts > 65535 {
            return Err(Error::InvalidArgument(format!(
                "a norm output of {} rows in {} chunks at {rows_per_group} rows per workgroup",
                w.rows,
                w.chunks.len()
            )));
        }
        let fast = w.cols.is_multiple_of(32);
        let key = with_wg(self.key(gpu, fast, tpr).constant("R", r as u32), wg);
        let pipeline = gpu.pipeline(&key)?;
        Ok(bind_chunks(gpu, "matvec", &pipeline, &[w], x, 0, &[g, xn_out], y, OutRows::whole(w), n, |rows| {
            [n as u32, rows.div_ceil(rows_per_group) as u32, 1]
        }))
    }

    /// Changes the vector count of bound dispatches to `n` (at most the count they were bound
    /// with: the buffers were checked for that).
    pub fn set_rows(&self, queue: &wgpu::Queue, bound: &mut [(Bound, [u32; 3])], n: u32) {
        for (b, g) in bound {
            write_t(queue, b, n);
            g[0] = n;
        }
    }
}

/// Token rows per tile of the f32 matmul kernel, and of the cooperative-matrix kernel on
/// small products ([`MatMul::tile_t`]).
pub const MATMUL_TILE_T: usize = 64;
/// Token rows per tile of the cooperative-matrix kernel on large products (`TILE128`).
const COOP_LARGE_TILE_T: usize = 128;
/// Workgroups a cooperative-matrix product must still have with those tiles to take them.
const COOP_TILE128_MIN_GROUPS: usize = 128;

/// Prefill product `Y[t, :] = W X[t, :]` for `t < T` (X `[T, K]` from `x_offset` elements, Y
/// `[T, N]`). Two kernels: on adapters with cooperative matrices ([`crate::gpu::Caps`]) and
/// 16-bit or narrower weights, `matmul_coop.wgsl` runs the products on the matrix units with
/// both operands rounded to f16 (128 or 64 tokens x 128 rows per workgroup, x 64 outputs for
/// SwiGLU); elsewhere `matmul.wgsl` computes in f32 (64 x 64, 64 x 32 for SwiGLU).
pub struct MatMul {
    dtype: DType,
    epilogue: Epilogue,
    pipeline: Arc<wgpu::ComputePipeline>,
    coop: bool,
    /// x is bound in f16 ([`MatMul::with_half_x`]).
    half_x: bool,
}

impl MatMul {
    pub fn new(gpu: &Gpu, dtype: DType, epilogue: Epilogue) -> Result<MatMul> {
        Self::build(gpu, dtype, epilogue, Self::matrix_units_suit(gpu, dtype))
    }

    /// The f32 kernel whatever the adapter offers (tests; benchmarks against the matrix units).
    pub fn without_matrix_units(gpu: &Gpu, dtype: DType, epilogue: Epilogue) -> Result<MatMul> {
        Self::build(gpu, dtype, epilogue, false)
    }

    /// Whether [`MatMul::new`] picks the cooperative-matrix kernel for this format: f32
    /// weights keep the exact kernel (whoever stores f32 asks for it, and f16 would round
    /// them); bf16 converts to f16 exactly within f16's range.
    pub fn matrix_units_suit(gpu: &Gpu, dtype: DType) -> bool {
        gpu.caps.coop_matrix && dtype != DType::F32
    }

    fn build(gpu: &Gpu, dtype: DType, epilogue: Epilogue, coop: bool) -> Result<MatMul> {
        let pipeline = gpu.pipeline(&Self::key(gpu, dtype, epilogue, coop, false, MATMUL_TILE_T))?;
        Ok(MatMul { dtype, epilogue, pipeline, coop, half_x: false })
    }

    /// The same product reading x in f16 (converted once by [`crate::kernels::half_x`]):
    /// on the matrix units each of a product's workgroup columns otherwise reads the f32 rows
    /// and converts them again (+21% pp512 for Llama-3-8B Q4_0 on an H200, benches/RESULTS.md).
    /// None where this product does not run on the matrix units.
    pub fn with_half_x(&self, gpu: &Gpu) -> Result<Option<MatMul>> {
        if !self.coop {
            return Ok(None);
        }
        let pipeline = gpu.pipeline(&Self::key(gpu, self.dtype, self.epilogue, true, true, MATMUL_TILE_T))?;
        Ok(Some(MatMul { dtype: self.dtype, epilogue: self.epilogue, pipeline, coop: true, half_x: true }))
    }

    fn key(gpu: &Gpu, dtype: DType, epilogue: Epilogue, coop: bool, half_x: bool, tile_t: usize) -> PipelineKey {
        let mut key = if coop {
            let key = PipelineKey::new("matmul_coop", &[PRODUCTS_WGSL, WEIGHTS_WGSL, MATMUL_COOP_WGSL], gpu.flags())
                .define("COOP")
                .define(if half_x { "XH" } else { "XVEC" });
            if tile_t == COOP_LARGE_TILE_T {
                key.define("TILE128")
            } else {
                key
            }
        } else {
            PipelineKey::new("matmul", &[PRODUCTS_WGSL, WEIGHTS_WGSL, MATMUL_WGSL], gpu.flags())
        };
        key = key.define(w_define(dtype));
        if let Some(d) = epilogue.define() {
            key = key.define(d);
        }
        key
    }

    /// Whether this product runs on the matrix units (where the shapes allow: rows of whole
    /// 32-element blocks, x rows 16-byte aligned; other shapes take the f32 kernel).
    pub fn uses_matrix_units(&self) -> bool {
        self.coop
    }

    /// Whether a product of `cols` columns (x from element 0) runs on the matrix units.
    pub fn uses_matrix_units_for(&self, cols: usize) -> bool {
        self.coop_for(cols, 0)
    }

    /// Whether a product of `cols` columns with x from element `x_offset` runs on the matrix
    /// units (their kernel needs whole blocks and 16-byte aligned x rows).
    fn coop_for(&self, cols: usize, x_offset: usize) -> bool {
        self.coop && cols.is_multiple_of(32) && x_offset.is_multiple_of(4)
    }

    /// Token rows per workgroup of the product of `w` with x from `x_offset`, bound for `t`
    /// tokens: a dispatch of n tokens has n / this (rounded up) workgroups along x.
    ///
    /// The matrix-unit kernel takes 128-token tiles (each subgroup 2 x 4 fragments, six
    /// fragment loads per eight products, where 64-token tiles have 2 x 2, four per four)
    /// where the product then still has [`COOP_TILE128_MIN_GROUPS`] workgroups and the adapter has the
    /// workgroup memory ([`Caps::COOP_TILE128_WORKGROUP_BYTES`]). Measured on an H200, pp512
    /// (benches/RESULTS.md, round 22): Llama-3-8B f16 prefill 5,330 -> 6,118 tok/s, Q4_0
    /// 5,726 -> 5,905, while SmolLM2-135M (36-96 workgroups a product at 128 tokens) lost
    /// 11%, so small products keep 64.
    pub fn tile_t(&self, gpu: &Gpu, w: &GpuMatrix, x_offset: usize, t: usize) -> usize {
        if self.coop_for(w.cols, x_offset) {
            Self::coop_tile_t(gpu, self.epilogue, w.rows, t)
        } else {
            MATMUL_TILE_T
        }
    }

    /// [`MatMul::tile_t`] of the matrix-unit kernel for `rows` rows and `t` tokens.
    fn coop_tile_t(gpu: &Gpu, epilogue: Epilogue, rows: usize, t: usize) -> usize {
        let groups = t.div_ceil(COOP_LARGE_TILE_T) * rows.div_ceil(Self::tile_n(true, epilogue));
        if gpu.caps.max_workgroup_storage >= Caps::COOP_TILE128_WORKGROUP_BYTES && groups >= COOP_TILE128_MIN_GROUPS {
            COOP_LARGE_TILE_T
        } else {
            MATMUL_TILE_T
        }
    }

    fn tile_n(coop: bool, epilogue: Epilogue) -> usize {
        match (coop, epilogue == Epilogue::SwiGlu) {
            (true, false) => 128,
            (true, true) | (false, false) => 64,
            (false, true) => 32,
        }
    }

    /// Binds `Y = X W^T` (or `Y += X W^T`) for `t` tokens: one dispatch per chunk of `w`.
    /// Bind with the largest token count the buffers hold; [`MatMul::set_rows`] lowers it.
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        x_offset_elems: usize,
        y: &GpuBuffer,
        t: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matmul", self.epilogue, false)?;
        self.bind_all(gpu, &[w], x, x_offset_elems, y, OutRows::whole(w), t)
    }

    /// Binds `Y = silu(X G^T) * (X U^T)`.
    pub fn bind_swiglu(
        &self,
        gpu: &Gpu,
        g: &GpuMatrix,
        u: &GpuMatrix,
        x: &GpuBuffer,
        x_offset_elems: usize,
        y: &GpuBuffer,
        t: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matmul", self.epilogue, true)?;
        self.bind_all(gpu, &[g, u], x, x_offset_elems, y, OutRows::whole(g), t)
    }

    /// Binds `Y = X W^T` into columns `out.offset..` of rows of `out.stride` floats.
    pub fn bind_into(
        &self,
        gpu: &Gpu,
        w: &GpuMatrix,
        x: &GpuBuffer,
        y: &GpuBuffer,
        out: OutRows,
        t: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        check_epilogue("matmul", self.epilogue, false)?;
        self.bind_all(gpu, &[w], x, 0, y, out, t)
    }

    fn bind_all(
        &self,
        gpu: &Gpu,
        mats: &[&GpuMatrix],
        x: &GpuBuffer,
        x_offset: usize,
        y: &GpuBuffer,
        y_out: OutRows,
        t: usize,
    ) -> Result<Vec<(Bound, [u32; 3])>> {
        let coop = self.coop_for(mats[0].cols, x_offset);
        if self.half_x && !coop {
            return Err(Error::InvalidArgument(format!(
                "matmul: f16 x needs the matrix units' shapes (columns a multiple of 32, offset a multiple of 4), not {} from {x_offset}",
                mats[0].cols
            )));
        }
        // f16 x is checked in 4-byte words: two values each.
        let (x_words, x_word_offset) =
            if self.half_x { (Some(mats[0].cols / 2), x_offset / 2) } else { (None, x_offset) };
        check_operands("matmul", self.dtype, mats, x, x_word_offset, y, y_out, t, x_words, false)?;
        let tile_t = self.tile_t(gpu, mats[0], x_offset, t);
        let pipeline = if coop == self.coop && tile_t == MATMUL_TILE_T {
            self.pipeline.clone()
        } else {
            gpu.pipeline(&Self::key(gpu, self.dtype, self.epilogue, coop, self.half_x, tile_t))?
        };
        let tile_n = Self::tile_n(coop, self.epilogue);
        Ok(bind_chunks(gpu, "matmul", &pipeline, mats, x, x_offset, &[], y, y_out, t, |rows| {
            [t.div_ceil(tile_t) as u32, rows.div_ceil(tile_n) as u32, 1]
        }))
    }

    /// Changes the token count of dispatches to `t` (at most the count they were bound
    /// with); `tile_t` is [`MatMul::tile_t`] of their binding.
    pub fn set_rows(&self, queue: &wgpu::Queue, bound: &mut [(Bound, [u32; 3])], tile_t: usize, t: u32) {
        for (b, g) in bound {
            write_t(queue, b, t);
            g[0] = t.div_ceil(tile_t as u32);
        }
    }
}

/// CPU reference in f64: `y[t, n] = sum_k x[t, k] w[n, k]` with w `[n, k]` (already
/// dequantized) and x `[t, k]`.
pub fn reference(w: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f64> {
    let t = x.len() / k;
    let mut out = Vec::with_capacity(t * n);
    for xr in x.chunks_exact(k) {
        for wr in w[..n * k].chunks_exact(k) {
            out.push(wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum());
        }
    }
    out
}

/// CPU reference of the residual form: `y0 + x w^T`.
pub fn reference_add(y0: &[f32], w: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f64> {
    reference(w, x, n, k).iter().zip(y0).map(|(a, &b)| a + b as f64).collect()
}

pub fn silu(a: f64) -> f64 {
    a / (1.0 + (-a).exp())
}

/// CPU reference of the SwiGLU form: `silu(x g^T) * (x u^T)`.
pub fn reference_swiglu(g: &[f32], u: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f64> {
    let a = reference(g, x, n, k);
    let b = reference(u, x, n, k);
    a.iter().zip(&b).map(|(&a, &b)| silu(a) * b).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::half_x::HalfX;
    use crate::kernels::{run_pass, testing::*};
    use std::time::Instant;

    /// Random weights with real quant structure: (file bytes, dequantized values).
    pub(crate) fn weights(dtype: DType, rows: usize, cols: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
        let x = rng.vec(rows * cols, 1.0);
        let q = quant::quantize(dtype, &x);
        let d = quant::dequantize_vec(dtype, &q, rows * cols);
        (q, d)
    }

    /// `sum |w| |x|` per output: the scale f32 rounding errors are relative to.
    fn abs_scale(w: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f64> {
        let wa: Vec<f32> = w[..n * k].iter().map(|v| v.abs()).collect();
        let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        reference(&wa, &xa, n, k)
    }

    fn check(what: &str, got: &[f32], want: &[f64], scale: &[f64]) {
        check_rel(what, got, want, scale, F32_REL)
    }

    /// Error bound relative to `sum |w x|` of products computed in f32.
    const F32_REL: f64 = 2e-6;
    /// The same with both operands rounded to f16 first: each rounding is off by at most
    /// 2^-11 (2^-10 if a driver truncates), so each product by at most ~2^-9.
    const F16_REL: f64 = 2.5e-3;

    /// The error bound of a matmul kernel's products.
    fn mm_rel(m: &MatMul) -> f64 {
        if m.uses_matrix_units() {
            F16_REL
        } else {
            F32_REL
        }
    }

    fn check_rel(what: &str, got: &[f32], want: &[f64], scale: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for i in 0..got.len() {
            let err = (got[i] as f64 - want[i]).abs();
            let tol = rel * scale[i] + rel / 2.0 * want[i].abs() + 1e-30;
            assert!(
                err <= tol,
                "{what}: element {i} of {}: got {} want {} (err {err:e}, tol {tol:e})",
                got.len(),
                got[i],
                want[i]
            );
        }
    }

    /// Runs one product (matvec when `mm` is false, matmul when true) on `gpu` and compares
    /// with the f64 reference.
    pub(crate) fn run_case(
        gpu: &Gpu,
        mm: bool,
        dtype: DType,
        epi: Epilogue,
        n: usize,
        k: usize,
        t: usize,
        x_off: usize,
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let (gq, gd) = weights(dtype, n, k, &mut rng);
        let (uq, ud) = if epi == Epilogue::SwiGlu { weights(dtype, n, k, &mut rng) } else { (vec![], vec![]) };
        let xall = rng.vec(x_off + t * k, 1.0);
        let x = &xall[x_off..];
        let y0 = rng.vec(t * n, 2.0);
        let gm = GpuMatrix::upload(gpu, "g", dtype, n, k, &gq).unwrap();
        let xb = gpu.upload("x", &xall).unwrap();
        let what = format!(
            "{} {} {epi:?} N={n} K={k} T={t} x_off={x_off} chunks={} {:?}",
            if mm {
                "matmul".to_string()
            } else {
                format!("matvec rows {} wg {}", [4, 2, 1][(seed % 3) as usize], [64, 128, 256][(seed / 3 % 3) as usize])
            },
            dtype.name(),
            gm.chunks.len(),
            gpu.flags()
        );
        let mmk = mm.then(|| MatMul::new(gpu, dtype, epi).unwrap());
        let rel = mmk.as_ref().map_or(F32_REL, mm_rel);
        let um = (epi == Epilogue::SwiGlu).then(|| GpuMatrix::upload(gpu, "u", dtype, n, k, &uq).unwrap());
        // Runs the product (a matmul `m`, else a matvec) of x in `xb` and checks it.
        let check = |m: Option<&MatMul>, xb: &GpuBuffer, what: &str| {
            let yb = gpu.upload("y", &y0).unwrap();
            let bound = match (&um, m) {
                (Some(um), Some(m)) => m.bind_swiglu(gpu, &gm, um, xb, x_off, &yb, t).unwrap(),
                (Some(um), None) => {
                    matvec_for_test(gpu, dtype, epi, seed).bind_swiglu(gpu, &gm, um, xb, x_off, &yb, t).unwrap()
                }
                (None, Some(m)) => m.bind(gpu, &gm, xb, x_off, &yb, t).unwrap(),
                (None, None) => matvec_for_test(gpu, dtype, epi, seed).bind(gpu, &gm, xb, x_off, &yb, t).unwrap(),
            };
            run_pass(gpu, |p| {
                for (b, g) in &bound {
                    b.record(p, *g);
                }
            })
            .unwrap();
            let got: Vec<f32> = gpu.read(&yb, 0, t * n).unwrap();
            let sg = abs_scale(&gd, x, n, k);
            match epi {
                Epilogue::Store => check_rel(what, &got, &reference(&gd, x, n, k), &sg, rel),
                Epilogue::Add => {
                    let s: Vec<f64> = sg.iter().zip(&y0).map(|(s, y)| s + y.abs() as f64).collect();
                    check_rel(what, &got, &reference_add(&y0, &gd, x, n, k), &s, rel)
                }
                Epilogue::SwiGlu => {
                    check_rel(what, &got, &reference_swiglu(&gd, &ud, x, n, k), &swiglu_scale(&gd, &ud, x, n, k), rel)
                }
            }
        };
        check(mmk.as_ref(), &xb, &format!("{what} coop={}", mmk.as_ref().is_some_and(|m| m.uses_matrix_units())));
        // On the matrix units, the same product of x converted to f16 by half_x.wgsl; shapes
        // that those do not take refuse f16 x.
        if let Some(h) = mmk.as_ref().and_then(|m| m.with_half_x(gpu).unwrap()) {
            let xh = gpu.storage("xh", (xall.len() * 2).next_multiple_of(4) as u64).unwrap();
            if h.coop_for(k, x_off) {
                let conv = HalfX::new(gpu).unwrap();
                let b = conv.bind(gpu, &xb, &xh, 1, xall.len()).unwrap();
                run_pass(gpu, |p| b.record(p, HalfX::groups(1, xall.len()))).unwrap();
                check(Some(&h), &xh, &format!("{what} coop=true half_x"));
            } else {
                let yb = gpu.storage("y", (t * n * 4) as u64).unwrap();
                assert!(h.bind(gpu, &gm, &xh, x_off, &yb, t).is_err(), "{what}: f16 x bound off the matrix units");
            }
        }
    }

    const EPIS: [Epilogue; 3] = [Epilogue::Store, Epilogue::Add, Epilogue::SwiGlu];

    /// A matvec with 4, 2 or 1 rows per segment and 64, 128 or 256 invocations by `seed`, so
    /// the cases cover every variant whatever the adapter would choose.
    fn matvec_for_test(gpu: &Gpu, dtype: DType, epi: Epilogue, seed: u64) -> MatVec {
        let rows = [4, 2, 1][(seed % 3) as usize];
        let wg = [64, 128, 256][(seed / 3 % 3) as usize];
        MatVec::new(gpu, dtype, epi).unwrap().with_rows_per_segment(rows).unwrap().with_workgroup(wg).unwrap()
    }

    /// RMSNorm fused in front of a decode product (store or SwiGLU), against norm-then-product
    /// in f64.
    fn norm_case(gpu: &Gpu, dtype: DType, epi: Epilogue, n: usize, k: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let (gq, gd) = weights(dtype, n, k, &mut rng);
        let (uq, ud) = weights(dtype, n, k, &mut rng);
        let x = rng.vec(k, 3.0);
        let g = rng.vec(k, 1.5);
        let eps = 1e-5f32;
        let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        let xn: Vec<f32> = x.iter().zip(&g).map(|(&v, &w)| (v as f64 * r * w as f64) as f32).collect();
        let gm = GpuMatrix::upload(gpu, "g", dtype, n, k, &gq).unwrap();
        let um = GpuMatrix::upload(gpu, "u", dtype, n, k, &uq).unwrap();
        let (xb, gb) = (gpu.upload("x", &x).unwrap(), gpu.upload("norm", &g).unwrap());
        let yb = gpu.storage("y", n as u64 * 4).unwrap();
        let rows = [4, 2, 1][(seed % 3) as usize];
        let kern = MatVec::with_norm(gpu, dtype, epi, eps).unwrap().with_rows_per_segment(rows).unwrap();
        let bound = match epi {
            Epilogue::SwiGlu => kern.bind_norm_swiglu(gpu, &gm, &um, &xb, &gb, &yb, 1),
            _ => kern.bind_norm_into(gpu, &gm, &xb, &gb, &yb, OutRows::whole(&gm), 1),
        }
        .unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got: Vec<f32> = gpu.read(&yb, 0, n).unwrap();
        let what = format!("norm+matvec {} {epi:?} N={n} K={k} rows {rows} {:?}", dtype.name(), gpu.flags());
        let sg = abs_scale(&gd, &xn, n, k);
        if epi == Epilogue::SwiGlu {
            check(&what, &got, &reference_swiglu(&gd, &ud, &xn, n, k), &swiglu_scale(&gd, &ud, &xn, n, k));
        } else {
            check(&what, &got, &reference(&gd, &xn, n, k), &sg);
        }
    }

    #[test]
    fn matvec_fused_norm() {
        for gpu in variants() {
            for dtype in DType::ALL {
                let ks: &[usize] = if dtype.is_quantized() { &[96, 576] } else { &[7, 96, 333, 576] };
                for (i, &k) in ks.iter().enumerate() {
                    for epi in [Epilogue::Store, Epilogue::SwiGlu] {
                        norm_case(gpu, dtype, epi, 37, k, i as u64 + 3);
                    }
                }
            }
        }
        // The widest vector a fused norm takes, once per path.
        norm_case(&variants()[0], DType::Q4_0, Epilogue::SwiGlu, 70, 2048, 5);
        norm_case(&variants()[0], DType::F16, Epilogue::Store, 70, 2048, 6);
    }

    /// Error scale of silu(G x) * (U x) per row: d(silu(g) u) <= 1.1 |u| dg + |g| du, with
    /// dg and du bounded by sum |w x|.
    fn swiglu_scale(gd: &[f32], ud: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f64> {
        let (g, u) = (reference(gd, x, n, k), reference(ud, x, n, k));
        let (sg, su) = (abs_scale(gd, x, n, k), abs_scale(ud, x, n, k));
        (0..g.len()).map(|i| 1.1 * sg[i] * (u[i].abs() + su[i]) + (g[i].abs() + sg[i]) * su[i]).collect()
    }

    /// `t` random vectors of `k` values quantized to 8 bits on the CPU: the values they stand
    /// for and the words of quantize_q8.wgsl's layout.
    fn q8_vectors(rng: &mut Rng, t: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        use crate::kernels::quantize;
        let x = rng.vec(t * k, 2.0);
        let blocks: Vec<Vec<quantize::Q8Block>> = x.chunks_exact(k).map(quantize::reference).collect();
        (
            blocks.iter().flat_map(|b| quantize::dequantize(b)).collect(),
            blocks.iter().flat_map(|b| quantize::pack(b)).collect(),
        )
    }

    /// A product of 8-bit vectors (`t` of them, quantized on the CPU) against the f64
    /// product of the dequantized weights and the dequantized vectors: the integer dot
    /// products are exact, so only f32 rounding of the scales and sums remains.
    fn q8_case(gpu: &Gpu, dtype: DType, epi: Epilogue, n: usize, k: usize, t: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let (gq, gd) = weights(dtype, n, k, &mut rng);
        let (uq, ud) = weights(dtype, n, k, &mut rng);
        let (xd, words) = q8_vectors(&mut rng, t, k);
        let y0 = rng.vec(t * n, 2.0);
        let gm = GpuMatrix::upload(gpu, "g", dtype, n, k, &gq).unwrap();
        let um = GpuMatrix::upload(gpu, "u", dtype, n, k, &uq).unwrap();
        let (xb, yb) = (gpu.upload("xq", &words).unwrap(), gpu.upload("y", &y0).unwrap());
        let rows = [4, 2, 1][(seed % 3) as usize];
        let wg = [64, 128, 256][(seed / 3 % 3) as usize];
        let kern = MatVec::with_q8_input(gpu, dtype, epi)
            .unwrap()
            .with_rows_per_segment(rows)
            .unwrap()
            .with_workgroup(wg)
            .unwrap();
        let bound = match epi {
            Epilogue::SwiGlu => kern.bind_swiglu(gpu, &gm, &um, &xb, 0, &yb, t),
            _ => kern.bind(gpu, &gm, &xb, 0, &yb, t),
        }
        .unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got: Vec<f32> = gpu.read(&yb, 0, t * n).unwrap();
        let what =
            format!("q8 matvec {} {epi:?} N={n} K={k} T={t} rows {rows} wg {wg} {:?}", dtype.name(), gpu.flags());
        let sg = abs_scale(&gd, &xd, n, k);
        match epi {
            Epilogue::Store => check(&what, &got, &reference(&gd, &xd, n, k), &sg),
            Epilogue::Add => {
                let s: Vec<f64> = sg.iter().zip(&y0).map(|(s, y)| s + y.abs() as f64).collect();
                check(&what, &got, &reference_add(&y0, &gd, &xd, n, k), &s)
            }
            Epilogue::SwiGlu => {
                check(&what, &got, &reference_swiglu(&gd, &ud, &xd, n, k), &swiglu_scale(&gd, &ud, &xd, n, k))
            }
        }
    }

    /// [`MatVec::with_q8_output`] against the CPU SwiGLU product: the blocks it writes stand
    /// for the product's values to within half a quantization step (plus the product's own
    /// rounding), their scales follow the block maxima and `s` their bytes.
    fn q8_out_case(gpu: &Gpu, dtype: DType, n: usize, k: usize, t: usize, wg: usize, seed: u64) {
        use crate::kernels::quantize;
        let mut rng = Rng::new(seed);
        let (gq, gd) = weights(dtype, n, k, &mut rng);
        let (uq, ud) = weights(dtype, n, k, &mut rng);
        let (xd, words) = q8_vectors(&mut rng, t, k);
        let gm = GpuMatrix::upload(gpu, "g", dtype, n, k, &gq).unwrap();
        let um = GpuMatrix::upload(gpu, "u", dtype, n, k, &uq).unwrap();
        let xb = gpu.upload("xq", &words).unwrap();
        let yw = quantize::q8_words(n);
        let yb = gpu.upload("y", &vec![u32::MAX; t * yw]).unwrap();
        let kern = MatVec::with_q8_output(gpu, dtype).unwrap().with_workgroup(wg).unwrap();
        let bound = kern.bind_swiglu(gpu, &gm, &um, &xb, 0, &yb, t).unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got: Vec<u32> = gpu.read(&yb, 0, t * yw).unwrap();
        let what = format!("q8-out matvec {} N={n} K={k} T={t} wg {wg} {:?}", dtype.name(), gpu.flags());
        let want = reference_swiglu(&gd, &ud, &xd, n, k);
        let scale = swiglu_scale(&gd, &ud, &xd, n, k);
        for v in 0..t {
            let b = quantize::unpack(&got[v * yw..(v + 1) * yw], n);
            let deq = quantize::dequantize(&b);
            for (bi, blk) in b.iter().enumerate() {
                let rows = v * n + bi * 32..v * n + bi * 32 + 32;
                // The product's own error bound per value, as q8_case checks SwiGLU.
                let tol: Vec<f64> = rows.clone().map(|i| 10.0 * F32_REL * scale[i]).collect();
                let tmax = tol.iter().cloned().fold(0.0, f64::max);
                let amax = want[rows.clone()].iter().fold(0.0f64, |m, w| m.max(w.abs()));
                assert!(
                    (blk.d as f64 * 127.0 - amax).abs() <= tmax + 1e-6 * amax,
                    "{what}: block {bi} of vector {v}: scale {} for a maximum of {amax}",
                    blk.d
                );
                let sum: i32 = blk.q.iter().map(|&q| q as i32).sum();
                assert_eq!(blk.s, blk.d * sum as f32, "{what}: block {bi}: s");
                for (j, i) in rows.enumerate() {
                    let err = (deq[bi * 32 + j] as f64 - want[i]).abs();
                    assert!(
                        err <= 0.5 * blk.d as f64 * 1.0001 + tol[j] + tmax / 127.0 * 0.5,
                        "{what}: value {i}: {} for {}",
                        deq[bi * 32 + j],
                        want[i]
                    );
                }
            }
        }
    }

    #[test]
    fn matvec_q8_output() {
        for gpu in variants() {
            for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
                for (i, &(n, k, t)) in
                    [(32, 32, 1), (96, 96, 3), (64, 576, 1), (1536, 576, 1), (96, 4096, 2)].iter().enumerate()
                {
                    q8_out_case(gpu, dtype, n, k, t, [64, 128, 256][i % 3], i as u64 + 40);
                }
            }
        }
        // Llama-3-8B's gate/up (14336 x 4096), once.
        q8_out_case(&variants()[0], DType::Q4_0, 14336, 4096, 1, 128, 47);
        let gpu = &variants()[0];
        let k = MatVec::with_q8_output(gpu, DType::Q4_0).unwrap();
        let mut rng = Rng::new(2);
        let (q, _) = weights(DType::Q4_0, 40, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::Q4_0, 40, 64, &q).unwrap();
        let x = gpu.storage("x", 1024).unwrap();
        // 40 rows are not whole blocks; a 32-row output needs 12 words (48 bytes).
        assert!(k.bind_swiglu(gpu, &m, &m, &x, 0, &gpu.storage("y", 1024).unwrap(), 1).is_err());
        let (q, _) = weights(DType::Q4_0, 32, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::Q4_0, 32, 64, &q).unwrap();
        assert!(k.bind_swiglu(gpu, &m, &m, &x, 0, &gpu.storage("y", 44).unwrap(), 1).is_err());
        assert!(k.bind_swiglu(gpu, &m, &m, &x, 0, &gpu.storage("y", 48).unwrap(), 1).is_ok());
        assert!(MatVec::with_q8_output(gpu, DType::F16).is_err());
    }

    /// The Add product that writes the next norm's 8-bit input
    /// ([`MatVec::with_q8_norm_output`]) and the products that read it
    /// ([`MatVec::with_norm_scale`]) against the CPU: y += W x as the plain Add product; the
    /// blocks are the quantization of the new y times g (bytes within one, as
    /// quantize_q8.wgsl's own test allows) with each block's sum of squares of y; the reading
    /// products equal the CPU products of the dequantized blocks divided by the rms of y, and
    /// the SwiGLU one's 8-bit output stands for them within half a step.
    #[allow(clippy::too_many_arguments)]
    fn q8_norm_case(
        gpu: &Gpu,
        dtype: DType,
        n: usize,
        k: usize,
        n2: usize,
        t: usize,
        layout: Option<(usize, usize)>,
        staged: Option<bool>,
        seed: u64,
    ) {
        use crate::kernels::quantize;
        let eps = 1e-5f32;
        let mut rng = Rng::new(seed);
        let (wq, wd) = weights(dtype, n, k, &mut rng);
        let (xd, words) = q8_vectors(&mut rng, t, k);
        let y0 = rng.vec(t * n, 2.0);
        let g: Vec<f32> = rng.vec(n, 1.0).iter().map(|v| 0.5 + v.abs()).collect();
        let wm = GpuMatrix::upload(gpu, "w", dtype, n, k, &wq).unwrap();
        let (xb, yb, gb) =
            (gpu.upload("xq", &words).unwrap(), gpu.upload("y", &y0).unwrap(), gpu.upload("g", &g).unwrap());
        let qw = q8_norm_words(n);
        let qb = gpu.upload("xq_out", &vec![u32::MAX; t * qw]).unwrap();
        let mut kern = MatVec::with_q8_norm_output(gpu, dtype).unwrap();
        if let Some((wg, r)) = layout {
            kern = kern.with_workgroup(wg).unwrap().with_rows_per_segment(r).unwrap();
        }
        if let Some(on) = staged {
            kern = kern.with_staged_vector(on).unwrap();
        }
        let bound = kern.bind_add_norm_q8(gpu, &wm, &xb, &yb, &gb, &qb, t).unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let what = format!(
            "q8-norm matvec {} N={n} K={k} T={t} (wg, R) {layout:?} staged {staged:?} {:?}",
            dtype.name(),
            gpu.flags()
        );
        let y: Vec<f32> = gpu.read(&yb, 0, t * n).unwrap();
        let s: Vec<f64> = abs_scale(&wd, &xd, n, k).iter().zip(&y0).map(|(s, y)| s + y.abs() as f64).collect();
        check(&what, &y, &reference_add(&y0, &wd, &xd, n, k), &s);
        let got: Vec<u32> = gpu.read(&qb, 0, t * qw).unwrap();
        // The normalised vectors the blocks stand for, and their rms.
        let mut xn = vec![];
        for v in 0..t {
            let yv = &y[v * n..(v + 1) * n];
            let yg: Vec<f32> = yv.iter().zip(&g).map(|(a, b)| a * b).collect();
            let gotb = quantize::unpack(&got[v * qw..], n);
            quantize::tests::check(&what, &gotb, &quantize::reference(&yg));
            for (bi, c) in yv.chunks_exact(32).enumerate() {
                let want: f64 = c.iter().map(|&a| a as f64 * a as f64).sum();
                let sq = f32::from_bits(got[v * qw + quantize::q8_words(n) + bi]) as f64;
                assert!((sq - want).abs() <= 1e-5 * want, "{what}: block {bi} sum of squares {sq} vs {want}");
            }
            let ms = yv.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / n as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            xn.extend(quantize::dequantize(&gotb).iter().map(|&a| (a as f64 * r) as f32));
        }
        // A product of it (Q/K/V's kernel).
        let (w2q, w2d) = weights(dtype, n2, n, &mut rng);
        let w2 = GpuMatrix::upload(gpu, "w2", dtype, n2, n, &w2q).unwrap();
        let out = gpu.storage("out", (t * n2 * 4) as u64).unwrap();
        let k2 = MatVec::with_q8_input(gpu, dtype, Epilogue::Store).unwrap().with_norm_scale(eps).unwrap();
        let b2 = k2.bind(gpu, &w2, &qb, 0, &out, t).unwrap();
        run_pass(gpu, |p| b2.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got2: Vec<f32> = gpu.read(&out, 0, t * n2).unwrap();
        check(&format!("{what} -> N={n2}"), &got2, &reference(&w2d, &xn, n2, n), &abs_scale(&w2d, &xn, n2, n));
        // The SwiGLU product with 8-bit output (gate/up's kernel), where the rows allow.
        if n2.is_multiple_of(32) {
            let (u2q, u2d) = weights(dtype, n2, n, &mut rng);
            let u2 = GpuMatrix::upload(gpu, "u2", dtype, n2, n, &u2q).unwrap();
            let yw = quantize::q8_words(n2);
            let out = gpu.upload("out", &vec![u32::MAX; t * yw]).unwrap();
            let k3 = MatVec::with_q8_output(gpu, dtype).unwrap().with_norm_scale(eps).unwrap();
            let b3 = k3.bind_swiglu(gpu, &w2, &u2, &qb, 0, &out, t).unwrap();
            run_pass(gpu, |p| b3.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
            let got3: Vec<u32> = gpu.read(&out, 0, t * yw).unwrap();
            let want = reference_swiglu(&w2d, &u2d, &xn, n2, n);
            let scale = swiglu_scale(&w2d, &u2d, &xn, n2, n);
            for v in 0..t {
                let b = quantize::unpack(&got3[v * yw..], n2);
                for (i, (&a, blk)) in quantize::dequantize(&b).iter().zip(b.iter().flat_map(|b| [b; 32])).enumerate() {
                    let j = v * n2 + i;
                    let tol = 10.0 * F32_REL * scale[j];
                    assert!(
                        (a as f64 - want[j]).abs() <= 0.5001 * blk.d as f64 + 2.0 * tol,
                        "{what} -> swiglu N={n2}: value {i} of vector {v}: {a} for {}",
                        want[j]
                    );
                }
            }
        }
    }

    #[test]
    fn matvec_q8_norm_output() {
        for gpu in variants() {
            for (i, dtype) in [DType::Q8_0, DType::Q4_0, DType::Q4_1].into_iter().enumerate() {
                q8_norm_case(gpu, dtype, 64, 96, 37, 2, None, None, 60 + i as u64);
                q8_norm_case(gpu, dtype, 576, 576, 96, 1, Some(([64, 128, 256][i], [1, 2, 4][i])), None, 63 + i as u64);
                // The staged vector: a row shorter than one pass (3 blocks, one at a time),
                // and 18 blocks in 9 pairs over 2 invocations per row (the last pass one pair
                // of two).
                q8_norm_case(gpu, dtype, 64, 96, 37, 2, None, Some(true), 70 + i as u64);
                q8_norm_case(gpu, dtype, 96, 576, 64, 1, Some((64, 1)), Some(true), 73 + i as u64);
            }
        }
        // Llama-3-8B's Wo (4096 x 4096) into gate/up-sized rows, in this adapter's layout and
        // in the one GPUs use for it (1,024 invocations, 2 rows per segment); its down product
        // (4096 x 14336) in GPUs' layout (4 rows), and staged (in 512 invocations, which fit
        // lavapipe's 32 KiB of workgroup storage).
        q8_norm_case(&variants()[0], DType::Q4_0, 4096, 4096, 256, 1, None, Some(false), 66);
        q8_norm_case(&variants()[0], DType::Q4_0, 4096, 4096, 64, 1, Some((1024, 2)), Some(false), 69);
        q8_norm_case(&variants()[0], DType::Q4_0, 4096, 14336, 64, 1, Some((1024, 4)), Some(false), 67);
        q8_norm_case(&variants()[0], DType::Q4_0, 4096, 14336, 64, 1, Some((512, 1)), Some(true), 68);
        // GPUs' rows per segment: Llama-3-8B's Wo (64 pairs of blocks per row) 2 at 1024
        // invocations, its down (224 pairs) 4; a row with fewer units than a segment of one
        // row has invocations takes 1.
        assert_eq!((block_rows_filling(1024, 64), block_rows_filling(1024, 224)), (2, 4));
        assert_eq!((block_rows_filling(1024, 31), block_rows_filling(256, 9), block_rows_filling(64, 8)), (1, 1, 4));
        let gpu = &variants()[0];
        // The staging rule: GPUs only, 8 blocks per invocation and more, within the storage.
        let gpu_adapter = gpu.info.device_type != wgpu::DeviceType::Cpu;
        assert_eq!(q8_norm_staged(gpu, 14336, 512, 32), gpu_adapter && staged_fits(gpu, 14336, 512));
        assert!(!q8_norm_staged(gpu, 4096, 1024, 32));
        assert!(!staged_fits(gpu, 15040, 64) && staged_fits(gpu, 14720, 64));
        // Forced on where the vector does not fit: refused at bind time.
        let (q, _) = weights(DType::Q4_0, 32, 15040, &mut Rng::new(4));
        let m = GpuMatrix::upload(gpu, "w", DType::Q4_0, 32, 15040, &q).unwrap();
        let big = |n: usize| gpu.storage("b", 4 * n as u64).unwrap();
        let staged = MatVec::with_q8_norm_output(gpu, DType::Q4_0).unwrap().with_staged_vector(true).unwrap();
        let (xs, ys, gs, outs) = (big(q8_words(15040)), big(32), big(32), big(q8_norm_words(32)));
        assert!(staged.bind_add_norm_q8(gpu, &m, &xs, &ys, &gs, &outs, 1).is_err());
        assert!(MatVec::with_q8_input(gpu, DType::Q4_0, Epilogue::Add).unwrap().with_staged_vector(true).is_err());
        let k = MatVec::with_q8_norm_output(gpu, DType::Q4_0).unwrap();
        let mut rng = Rng::new(3);
        let (q, _) = weights(DType::Q4_0, 40, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::Q4_0, 40, 64, &q).unwrap();
        let buf = |n| gpu.storage("b", n).unwrap();
        // 40 rows are not whole blocks; plain bind is refused; a short norm weight or output.
        assert!(k.bind_add_norm_q8(gpu, &m, &buf(1024), &buf(1024), &buf(1024), &buf(1024), 1).is_err());
        let (q, _) = weights(DType::Q4_0, 32, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::Q4_0, 32, 64, &q).unwrap();
        assert!(k.bind(gpu, &m, &buf(1024), 0, &buf(1024), 1).is_err());
        assert!(k.bind_add_norm_q8(gpu, &m, &buf(1024), &buf(1024), &buf(64), &buf(1024), 1).is_err());
        // q8_norm_words(32) = 12 + 4 words.
        assert!(k.bind_add_norm_q8(gpu, &m, &buf(1024), &buf(1024), &buf(128), &buf(60), 1).is_err());
        assert!(k.bind_add_norm_q8(gpu, &m, &buf(1024), &buf(1024), &buf(128), &buf(64), 1).is_ok());
        let s = MatVec::with_q8_input(gpu, DType::Q4_0, Epilogue::Store).unwrap().with_norm_scale(1e-5).unwrap();
        // The reading product needs the sums of squares after the 8-bit vector.
        let x = gpu.storage("x", 4 * quantize_words(64) as u64).unwrap();
        assert!(s.bind(gpu, &m, &x, 0, &buf(1024), 1).is_err());
        assert!(MatVec::with_q8_input(gpu, DType::F16, Epilogue::Store).is_err());
    }

    /// The f32 Add product that writes the next norm's input ([`MatVec::with_norm_output`])
    /// and the products that read it ([`MatVec::with_norm_scale`]) against the CPU: y += W x
    /// as the plain Add product; then y * g and one sum of squares of y per workgroup; the
    /// reading products (Store, SwiGLU) equal the CPU products of y * g / rms(y).
    #[allow(clippy::too_many_arguments)]
    fn norm_output_case(
        gpu: &Gpu,
        dtype: DType,
        n: usize,
        k: usize,
        n2: usize,
        t: usize,
        layout: Option<(usize, u32, usize)>,
        seed: u64,
    ) {
        let eps = 1e-5f32;
        let mut rng = Rng::new(seed);
        let (wq, wd) = weights(dtype, n, k, &mut rng);
        let x = rng.vec(t * k, 1.0);
        let y0 = rng.vec(t * n, 2.0);
        let g: Vec<f32> = rng.vec(n, 1.0).iter().map(|v| 0.5 + v.abs()).collect();
        let wm = GpuMatrix::upload(gpu, "w", dtype, n, k, &wq).unwrap();
        let (xb, yb, gb) = (gpu.upload("x", &x).unwrap(), gpu.upload("y", &y0).unwrap(), gpu.upload("g", &g).unwrap());
        let mut kern = MatVec::with_norm_output(gpu, dtype).unwrap();
        if let Some((wg, tpr, r)) = layout {
            kern = kern.with_norm_layout(wg, tpr, r).unwrap();
        }
        let parts = kern.norm_output_parts(n).unwrap();
        let (wg, tpr, r) = layout.unwrap_or_else(|| norm_output_layout(gpu));
        let rows_per_part = layout_rows((wg, tpr, r));
        let stride = norm_output_floats(n, parts);
        let nb = gpu.upload("xn_out", &vec![f32::NAN; t * stride]).unwrap();
        let bound = kern.bind_add_norm(gpu, &wm, &xb, &yb, &gb, &nb, t).unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let what = format!(
            "norm-output matvec {} N={n} K={k} T={t} layout {:?} {:?}",
            dtype.name(),
            (wg, tpr, r),
            gpu.flags()
        );
        let y: Vec<f32> = gpu.read(&yb, 0, t * n).unwrap();
        let s: Vec<f64> = abs_scale(&wd, &x, n, k).iter().zip(&y0).map(|(s, y)| s + y.abs() as f64).collect();
        check(&what, &y, &reference_add(&y0, &wd, &x, n, k), &s);
        let got: Vec<f32> = gpu.read(&nb, 0, t * stride).unwrap();
        let mut xn = vec![];
        for v in 0..t {
            let (yv, gv) = (&y[v * n..(v + 1) * n], &got[v * stride..]);
            for i in 0..n {
                assert_eq!(gv[i], yv[i] * g[i], "{what}: x * g at {i} of vector {v}");
            }
            for (pi, c) in yv.chunks(rows_per_part).enumerate() {
                let want: f64 = c.iter().map(|&a| a as f64 * a as f64).sum();
                let sq = gv[n + pi] as f64;
                assert!((sq - want).abs() <= 1e-5 * want, "{what}: sum of squares {pi} {sq} vs {want}");
            }
            let ms = yv.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / n as f64;
            let rms = 1.0 / (ms + eps as f64).sqrt();
            xn.extend(gv[..n].iter().map(|&a| (a as f64 * rms) as f32));
        }
        // The products of it: Q/K/V's kernel (Store) and gate/up's (SwiGLU).
        let (w2q, w2d) = weights(dtype, n2, n, &mut rng);
        let (u2q, u2d) = weights(dtype, n2, n, &mut rng);
        let w2 = GpuMatrix::upload(gpu, "w2", dtype, n2, n, &w2q).unwrap();
        let u2 = GpuMatrix::upload(gpu, "u2", dtype, n2, n, &u2q).unwrap();
        let reader = |epi| {
            let m = MatVec::new(gpu, dtype, epi).unwrap().with_norm_scale(eps).unwrap();
            if layout.is_some() {
                m.with_norm_parts(parts).unwrap()
            } else {
                m
            }
        };
        let out = gpu.storage("out", (t * n2 * 4) as u64).unwrap();
        let b2 = reader(Epilogue::Store).bind(gpu, &w2, &nb, 0, &out, t).unwrap();
        run_pass(gpu, |p| b2.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got2: Vec<f32> = gpu.read(&out, 0, t * n2).unwrap();
        check(&format!("{what} -> N={n2}"), &got2, &reference(&w2d, &xn, n2, n), &abs_scale(&w2d, &xn, n2, n));
        let b3 = reader(Epilogue::SwiGlu).bind_swiglu(gpu, &w2, &u2, &nb, 0, &out, t).unwrap();
        run_pass(gpu, |p| b3.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got3: Vec<f32> = gpu.read(&out, 0, t * n2).unwrap();
        let (want, scale) = (reference_swiglu(&w2d, &u2d, &xn, n2, n), swiglu_scale(&w2d, &u2d, &xn, n2, n));
        check(&format!("{what} -> swiglu N={n2}"), &got3, &want, &scale);
    }

    #[test]
    fn matvec_norm_output() {
        for gpu in variants() {
            for (i, dtype) in DType::ALL.into_iter().enumerate() {
                // A partial last workgroup (96 rows at 64 per workgroup), and columns for the
                // element-wise path.
                let k = if dtype.is_quantized() { 96 } else { 100 };
                norm_output_case(gpu, dtype, 96, k, 33, 2, Some((64, 4, 4)), 70 + i as u64);
                let layout = [None, Some((128, 32, 2)), Some((256, 16, 1)), Some((1024, 32, 1))][i % 4];
                norm_output_case(gpu, dtype, 576, 576, 96, 1, layout, 80 + i as u64);
            }
        }
        // Llama-3-8B's down product (4096 x 14336) into its Q/K/V rows, f16, once, in the
        // layout GPUs take.
        norm_output_case(&variants()[0], DType::F16, 4096, 14336, 6144, 1, Some((128, 64, 4)), 88);
        let gpu = &variants()[0];
        let k = MatVec::with_norm_output(gpu, DType::F16).unwrap();
        let mut rng = Rng::new(3);
        let (q, _) = weights(DType::F16, 40, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::F16, 40, 64, &q).unwrap();
        let buf = |n| gpu.storage("b", n).unwrap();
        let need = 4 * norm_output_floats(40, k.norm_output_parts(40).unwrap()) as u64;
        // Plain bind is refused; a short norm weight or output.
        assert!(k.bind(gpu, &m, &buf(1024), 0, &buf(1024), 1).is_err());
        assert!(k.bind_add_norm(gpu, &m, &buf(1024), &buf(1024), &buf(156), &buf(need), 1).is_err());
        assert!(k.bind_add_norm(gpu, &m, &buf(1024), &buf(1024), &buf(160), &buf(need - 4), 1).is_err());
        assert!(k.bind_add_norm(gpu, &m, &buf(1024), &buf(1024), &buf(160), &buf(need), 1).is_ok());
        // The reading product: its vector with the sums after it, the fast path only, and
        // not for Add products or with a fused norm.
        let s = MatVec::new(gpu, DType::F16, Epilogue::Store).unwrap().with_norm_scale(1e-5).unwrap();
        let (q, _) = weights(DType::F16, 8, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::F16, 8, 64, &q).unwrap();
        assert!(s.bind(gpu, &m, &buf(256), 0, &buf(1024), 1).is_err());
        assert!(s.bind(gpu, &m, &buf(1024), 0, &buf(1024), 1).is_ok());
        assert!(s.bind(gpu, &m, &buf(1024), 4, &buf(1024), 1).is_err());
        assert!(MatVec::new(gpu, DType::F16, Epilogue::Add).unwrap().with_norm_scale(1e-5).is_err());
        assert!(MatVec::with_norm(gpu, DType::F16, Epilogue::Store, 1e-5).unwrap().with_norm_scale(1e-5).is_err());
    }

    fn quantize_words(k: usize) -> usize {
        crate::kernels::quantize::q8_words(k)
    }

    #[test]
    fn matvec_q8_input() {
        for gpu in variants() {
            for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
                for (i, &(n, k, t)) in
                    [(37, 32, 1), (5, 96, 3), (70, 576, 1), (1536, 576, 1), (33, 4096, 2)].iter().enumerate()
                {
                    for epi in EPIS {
                        q8_case(gpu, dtype, epi, n, k, t, i as u64 * 3 + epi as u64);
                    }
                }
            }
        }
        // Llama-3-8B's widest input (down: 14336 columns), once.
        q8_case(&variants()[0], DType::Q4_0, Epilogue::Add, 130, 14336, 1, 7);
        let gpu = &variants()[0];
        assert!(MatVec::with_q8_input(gpu, DType::F16, Epilogue::Store).is_err());
        let k = MatVec::with_q8_input(gpu, DType::Q4_0, Epilogue::Store).unwrap();
        let mut rng = Rng::new(1);
        let (q, _) = weights(DType::Q4_0, 8, 64, &mut rng);
        let m = GpuMatrix::upload(gpu, "w", DType::Q4_0, 8, 64, &q).unwrap();
        let y = gpu.storage("y", 64).unwrap();
        // A buffer too small for one 8-bit vector of 64 (20 words), and a nonzero offset.
        assert!(k.bind(gpu, &m, &gpu.storage("x", 64).unwrap(), 0, &y, 1).is_err());
        assert!(k.bind(gpu, &m, &gpu.storage("x", 1024).unwrap(), 4, &y, 1).is_err());
    }

    /// `y += W merge(partials)` for a decode step at `pos` against the CPU merge
    /// ([`Partial::merge`]) and product; every fourth split of the step has no keys (l = 0).
    fn merge_case(gpu: &Gpu, dtype: DType, n: usize, input: MergeInput, pos: u32, seed: u64) {
        use crate::kernels::attention::Partial;
        let mut rng = Rng::new(seed);
        let (nh, hd, splits) = (input.n_heads as usize, input.head_dim as usize, input.splits as usize);
        let k = nh * hd;
        let used = (input.splits).min((pos + 64) / 64) as usize;
        let (wq, wd) = weights(dtype, n, k, &mut rng);
        // Partials [head][split][hd + 2]; splits past `used` hold NaN, which must not be read.
        let mut part = vec![f32::NAN; nh * splits * (hd + 2)];
        let mut x = vec![0f32; k];
        for h in 0..nh {
            let mut merged = Partial::empty(hd);
            for s in 0..used {
                let o = rng.vec(hd, 4.0);
                let m = rng.vec(1, 6.0)[0];
                let l = if s % 4 == 3 { 0.0 } else { 0.5 + rng.vec(1, 0.4)[0].abs() };
                let at = (h * splits + s) * (hd + 2);
                part[at..at + hd].copy_from_slice(&o);
                part[at + hd] = m;
                part[at + hd + 1] = l;
                let p = Partial { m: m as f64, l: l as f64, o: o.iter().map(|&v| v as f64).collect() };
                merged = merged.merge(&p);
            }
            for (d, v) in merged.output().into_iter().enumerate() {
                x[h * hd + d] = v as f32;
            }
        }
        let y0 = rng.vec(n, 1.0);
        let wm = GpuMatrix::upload(gpu, "w", dtype, n, k, &wq).unwrap();
        let (pb, yb) = (gpu.upload("part", &part).unwrap(), gpu.upload("y", &y0).unwrap());
        let state = gpu.upload("state", &[pos, 1, 0, 0]).unwrap();
        let rows = [4, 2, 1][(seed % 3) as usize];
        let kern = MatVec::with_merge(gpu, dtype, input).unwrap().with_rows_per_segment(rows).unwrap();
        let bound = kern.bind_merge_add(gpu, &wm, &pb, &state, &yb).unwrap();
        run_pass(gpu, |p| bound.iter().for_each(|(b, gr)| b.record(p, *gr))).unwrap();
        let got: Vec<f32> = gpu.read(&yb, 0, n).unwrap();
        let what = format!("merge+matvec {} {input:?} pos {pos} N={n} rows {rows} {:?}", dtype.name(), gpu.flags());
        let scale: Vec<f64> = abs_scale(&wd, &x, n, k).iter().zip(&y0).map(|(a, b)| a + b.abs() as f64).collect();
        check(&what, &got, &reference_add(&y0, &wd, &x, n, k), &scale);
    }

    #[test]
    fn matvec_fused_merge() {
        let mi = |n_heads, head_dim, splits| MergeInput { n_heads, head_dim, splits };
        for gpu in variants() {
            for dtype in DType::ALL {
                // SmolLM2-135M's attention (9 heads of 64) at 1, 3 and 8 splits in use.
                for (i, pos) in [5u32, 150, 511].into_iter().enumerate() {
                    merge_case(gpu, dtype, 37, mi(9, 64, 16), pos, i as u64 + 1);
                }
                // Odd shapes: 3 heads of 32 with 5 splits, 2 heads of 16 with one.
                merge_case(gpu, dtype, 70, mi(3, 32, 5), 300, 7);
                merge_case(gpu, dtype, 5, mi(2, 16, 1), 40, 8);
            }
        }
        // The widest vector it takes (16 heads of 128).
        merge_case(&variants()[0], DType::Q4_0, 64, mi(16, 128, 8), 450, 9);
        assert!(!MatVec::merge_fits(mi(32, 128, 16)), "Llama-3-8B's 4096 columns keep the merge dispatch");
    }

    /// (N, K, vectors / tokens, x offset) at odd sizes; K odd for float types and 32 * odd
    /// for quantized ones; offsets that are not multiples of 4 take the element-wise matvec.
    fn odd_shapes(dtype: DType, mm: bool) -> Vec<(usize, usize, usize, usize)> {
        let t = |a: usize, b: usize| if mm { b } else { a };
        if dtype.is_quantized() {
            vec![
                (1, 96, t(1, 1), 0),
                (3, 416, t(2, 5), 4),
                (37, 96, t(1, 67), 0),
                (333, 416, t(1, 67), 8),
                (37, 96, t(3, 5), 3),
            ]
        } else {
            vec![
                (1, 7, t(1, 1), 0),
                (3, 333, t(2, 5), 5),
                (37, 96, t(1, 67), 0),
                (333, 7, t(3, 67), 0),
                (333, 416, t(1, 5), 4),
                (37, 96, t(2, 5), 1),
            ]
        }
    }

    #[test]
    fn matvec_odd_sizes() {
        let start = Instant::now();
        for gpu in variants() {
            for dtype in DType::ALL {
                for epi in EPIS {
                    for (i, (n, k, t, off)) in odd_shapes(dtype, false).into_iter().enumerate() {
                        run_case(gpu, false, dtype, epi, n, k, t, off, i as u64 * 31 + n as u64);
                    }
                }
            }
        }
        eprintln!("matvec_odd_sizes: {:?}", start.elapsed());
    }

    #[test]
    fn matmul_odd_sizes() {
        let start = Instant::now();
        for gpu in variants() {
            for dtype in DType::ALL {
                for epi in EPIS {
                    for (i, (n, k, t, off)) in odd_shapes(dtype, true).into_iter().enumerate() {
                        run_case(gpu, true, dtype, epi, n, k, t, off, i as u64 * 17 + k as u64);
                    }
                }
            }
        }
        eprintln!("matmul_odd_sizes: {:?}", start.elapsed());
    }

    /// SmolLM2-135M shapes, every dtype, variants and epilogues rotated.
    #[test]
    fn smollm_sizes() {
        let start = Instant::now();
        let vs = variants();
        let mut i = 0;
        for dtype in DType::ALL {
            for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
                let gpu = &vs[i % vs.len()];
                run_case(gpu, false, dtype, EPIS[i % 3], n, k, 1, 0, i as u64);
                run_case(gpu, true, dtype, EPIS[(i + 1) % 3], n, k, 7, 0, i as u64 + 100);
                i += 1;
            }
        }
        eprintln!("smollm_sizes: {:?}", start.elapsed());
    }

    /// The SmolLM2 LM head (49152 x 576) for every dtype.
    #[test]
    fn smollm_lm_head() {
        let start = Instant::now();
        let vs = variants();
        for (i, dtype) in DType::ALL.into_iter().enumerate() {
            run_case(&vs[i % vs.len()], false, dtype, Epilogue::Store, 49152, 576, 1, 0, 7 + i as u64);
        }
        eprintln!("smollm_lm_head: {:?}", start.elapsed());
    }

    /// Llama-3-8B MLP shapes at decode (q4_0, f16), and one prefill matmul.
    #[test]
    fn llama8b_sizes() {
        let start = Instant::now();
        let vs = variants();
        let mut i = 0;
        for dtype in [DType::Q4_0, DType::F16] {
            for (n, k, epi) in [(14336, 4096, Epilogue::Store), (4096, 14336, Epilogue::Add)] {
                run_case(&vs[i % vs.len()], false, dtype, epi, n, k, 1, 0, 50 + i as u64);
                i += 1;
            }
        }
        // f16 gate/up as 8B decode runs it on GPUs: 4 rows per segment, 128 invocations, 64
        // per row.
        run_case(&vs[0], false, DType::F16, Epilogue::SwiGlu, 14336, 4096, 1, 0, 57);
        run_case(&vs[0], true, DType::Q4_0, Epilogue::Store, 4096, 4096, 3, 0, 99);
        eprintln!("llama8b_sizes: {:?}", start.elapsed());
    }

    /// Prefill products at a real chunk: SmolLM2 MLP shapes, 200 tokens (three whole 64-token
    /// tiles and a partial one), on the first variant (the matrix units where the adapter has
    /// them, so that the device runs of this suite check them at size); then products with
    /// enough rows for the matrix units' 128-token tiles (one whole and a partial one).
    #[test]
    fn matmul_chunk_sizes() {
        let gpu = &variants()[0];
        for (i, dtype) in [DType::Q4_0, DType::F16].into_iter().enumerate() {
            run_case(gpu, true, dtype, Epilogue::SwiGlu, 1536, 576, 200, 0, 70 + i as u64);
            run_case(gpu, true, dtype, Epilogue::Add, 576, 1536, 200, 0, 80 + i as u64);
        }
        for (i, dtype) in [DType::Q4_0, DType::F16].into_iter().enumerate() {
            for (n, epi) in [(8320, Epilogue::Store), (4160, Epilogue::SwiGlu)] {
                // Where the matrix units and their memory are there, these take 128 tokens.
                if MatMul::matrix_units_suit(gpu, dtype)
                    && gpu.caps.max_workgroup_storage >= Caps::COOP_TILE128_WORKGROUP_BYTES
                {
                    assert_eq!(MatMul::coop_tile_t(gpu, epi, n, 200), COOP_LARGE_TILE_T, "{n} rows");
                    assert_eq!(MatMul::coop_tile_t(gpu, epi, 1536, 200), 64, "1536 rows");
                }
                run_case(gpu, true, dtype, epi, n, 576, 200, 0, 90 + i as u64);
            }
        }
    }

    /// Where the matrix-unit kernel goes wrong, if it does: max error / tolerance per
    /// (16-token, 16-row) fragment. `cargo test --release --lib coop_diagnose -- --ignored`.
    #[test]
    #[ignore]
    fn coop_diagnose() {
        let gpu = crate::gpu::Gpu::new(&Default::default()).unwrap();
        for (n, k, t) in [(128, 64, 128), (128, 128, 128), (256, 576, 256)] {
            let mut rng = Rng::new(5);
            let (q, d) = weights(DType::Q4_0, n, k, &mut rng);
            let x = rng.vec(t * k, 1.0);
            let w = GpuMatrix::upload(&gpu, "w", DType::Q4_0, n, k, &q).unwrap();
            let xb = gpu.upload("x", &x).unwrap();
            let yb = gpu.storage("y", (t * n * 4) as u64).unwrap();
            let m = MatMul::new(&gpu, DType::Q4_0, Epilogue::Store).unwrap();
            let b = m.bind(&gpu, &w, &xb, 0, &yb, t).unwrap();
            run_pass(&gpu, |p| b.iter().for_each(|(b, g)| b.record(p, *g))).unwrap();
            let got: Vec<f32> = gpu.read(&yb, 0, t * n).unwrap();
            let want = reference(&d, &x, n, k);
            let sc = abs_scale(&d, &x, n, k);
            eprintln!("N={n} K={k} T={t} coop={} groups {:?}", m.uses_matrix_units(), b[0].1);
            for tf in 0..t / 16 {
                let mut line = format!("tokens {:3}: ", tf * 16);
                for nf in 0..n / 16 {
                    let mut worst = 0f64;
                    for tt in tf * 16..tf * 16 + 16 {
                        for nn in nf * 16..nf * 16 + 16 {
                            let i = tt * n + nn;
                            worst = worst.max((got[i] as f64 - want[i]).abs() / (F16_REL * sc[i]));
                        }
                    }
                    line += &format!("{:6.2}", worst);
                }
                eprintln!("{line}");
            }
        }
    }

    /// A matrix split over several bindings gives the same products.
    #[test]
    fn split_matrix() {
        let gpu = small_binding_gpu(16 * 1024);
        for dtype in DType::ALL {
            for (n, k) in [(333, 96), (77, 416)] {
                let chunks = GpuMatrix::upload(&gpu, "w", dtype, n, k, &vec![0u8; dtype.row_bytes(k).unwrap() * n])
                    .unwrap()
                    .chunks
                    .len();
                assert!(chunks >= 2, "{dtype:?} {n}x{k} should split, got {chunks} chunk");
                for (i, epi) in EPIS.into_iter().enumerate() {
                    run_case(&gpu, false, dtype, epi, n, k, 2, 0, i as u64);
                    run_case(&gpu, true, dtype, epi, n, k, 5, 0, i as u64 + 9);
                }
            }
        }
        // The norm output over chunks that start at whole workgroups (f16 rows of 168: 48 per
        // 16 KiB), and refused where one starts inside a workgroup's rows (f32 rows of 96).
        let w = GpuMatrix::upload(&gpu, "w", DType::F16, 96, 168, &vec![0u8; 336 * 96]).unwrap();
        let starts: Vec<usize> = w.chunks.iter().map(|c| c.row_start).collect();
        assert!(starts.len() >= 2 && MatVec::norm_output_fits(&gpu, &w), "{starts:?}");
        norm_output_case(&gpu, DType::F16, 96, 168, 64, 1, None, 90);
        let w = GpuMatrix::upload(&gpu, "w", DType::F32, 333, 96, &vec![0u8; 384 * 333]).unwrap();
        assert!(!MatVec::norm_output_fits(&gpu, &w));
        let buf = |n| gpu.storage("b", n).unwrap();
        let k = MatVec::with_norm_output(&gpu, DType::F32).unwrap();
        assert!(k.bind_add_norm(&gpu, &w, &buf(1 << 14), &buf(1 << 14), &buf(1 << 14), &buf(1 << 14), 1).is_err());
    }

    /// `set_rows` changes the token / vector count without rebinding.
    #[test]
    fn set_rows_changes_count() {
        let gpu = &variants()[0];
        let (n, k, tmax, t) = (70, 96, 67, 5);
        let mut rng = Rng::new(3);
        let (wq, wd) = weights(DType::Q8_0, n, k, &mut rng);
        let x = rng.vec(tmax * k, 1.0);
        let w = GpuMatrix::upload(gpu, "w", DType::Q8_0, n, k, &wq).unwrap();
        let xb = gpu.upload("x", &x).unwrap();
        let want = reference(&wd, &x[..t * k], n, k);
        let scale = abs_scale(&wd, &x[..t * k], n, k);
        for mm in [false, true] {
            let yb = gpu.upload("y", &vec![-7.0f32; tmax * n]).unwrap();
            let mut rel = F32_REL;
            let mut bound = if mm {
                let m = MatMul::new(gpu, DType::Q8_0, Epilogue::Store).unwrap();
                rel = mm_rel(&m);
                let mut b = m.bind(gpu, &w, &xb, 0, &yb, tmax).unwrap();
                m.set_rows(&gpu.queue, &mut b, m.tile_t(gpu, &w, 0, tmax), t as u32);
                b
            } else {
                let m = MatVec::new(gpu, DType::Q8_0, Epilogue::Store).unwrap();
                let mut b = m.bind(gpu, &w, &xb, 0, &yb, tmax).unwrap();
                m.set_rows(&gpu.queue, &mut b, t as u32);
                b
            };
            run_pass(gpu, |p| bound.iter_mut().for_each(|(b, g)| b.record(p, *g))).unwrap();
            let got: Vec<f32> = gpu.read(&yb, 0, tmax * n).unwrap();
            check_rel(&format!("set_rows mm={mm}"), &got[..t * n], &want, &scale, rel);
            assert!(got[t * n..].iter().all(|&v| v == -7.0), "rows past t were written");
        }
    }

    /// Three products of different formats fill one wider output row each (how Q, K and V
    /// share one buffer), leaving nothing else written.
    #[test]
    fn bind_into_fills_column_ranges() {
        for gpu in variants() {
            let (k, t) = (96, 3);
            let parts = [(DType::Q4_1, 37), (DType::Q8_0, 5), (DType::F16, 11)];
            let stride = 60;
            let mut rng = Rng::new(21);
            let x = rng.vec(t * k, 1.0);
            let xb = gpu.upload("x", &x).unwrap();
            for mm in [false, true] {
                let yb = gpu.upload("y", &vec![-7.0f32; t * stride]).unwrap();
                let mut want = vec![-7.0f64; t * stride];
                let mut scale = vec![0.0f64; t * stride];
                let mut offset = 0;
                let mut bound = vec![];
                let mut rel = F32_REL;
                for &(dt, rows) in &parts {
                    let (wq, wd) = weights(dt, rows, k, &mut rng);
                    let w = GpuMatrix::upload(gpu, "w", dt, rows, k, &wq).unwrap();
                    let out = OutRows { stride, offset };
                    bound.extend(if mm {
                        let m = MatMul::new(gpu, dt, Epilogue::Store).unwrap();
                        rel = rel.max(mm_rel(&m));
                        m.bind_into(gpu, &w, &xb, &yb, out, t).unwrap()
                    } else {
                        MatVec::new(gpu, dt, Epilogue::Store).unwrap().bind_into(gpu, &w, &xb, &yb, out, t).unwrap()
                    });
                    let r = reference(&wd, &x, rows, k);
                    let sc = abs_scale(&wd, &x, rows, k);
                    for v in 0..t {
                        for j in 0..rows {
                            want[v * stride + offset + j] = r[v * rows + j];
                            scale[v * stride + offset + j] = sc[v * rows + j];
                        }
                    }
                    offset += rows;
                }
                run_pass(gpu, |p| bound.iter().for_each(|(b, g)| b.record(p, *g))).unwrap();
                let got: Vec<f32> = gpu.read(&yb, 0, t * stride).unwrap();
                check_rel(&format!("bind_into mm={mm} {:?}", gpu.flags()), &got, &want, &scale, rel);
            }
            // An output range past the row stride is refused.
            let (wq, _) = weights(DType::F32, 8, k, &mut rng);
            let w = GpuMatrix::upload(gpu, "w", DType::F32, 8, k, &wq).unwrap();
            let yb = gpu.storage("y", 4096).unwrap();
            let mv = MatVec::new(gpu, DType::F32, Epilogue::Store).unwrap();
            assert!(mv.bind_into(gpu, &w, &xb, &yb, OutRows { stride: 10, offset: 3 }, 1).is_err());
        }
    }

    /// Throughput on the real adapter (not lavapipe): `cargo test --release --lib
    /// kernels::matmul::tests::bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench() {
        let gpu = crate::gpu::Gpu::new(&Default::default()).unwrap();
        eprintln!("{} {:?}", gpu.describe(), gpu.caps);
        let time = |bound: &[(Bound, [u32; 3])], reps: usize| {
            run_pass(&gpu, |p| bound.iter().for_each(|(b, g)| b.record(p, *g))).unwrap();
            let start = Instant::now();
            run_pass(&gpu, |p| {
                for _ in 0..reps {
                    bound.iter().for_each(|(b, g)| b.record(p, *g));
                }
            })
            .unwrap();
            start.elapsed().as_secs_f64() / reps as f64
        };
        let mut rng = Rng::new(1);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::F16, DType::BF16, DType::F32] {
            for (n, k) in [(14336, 4096), (4096, 14336), (4096, 4096), (128256, 4096), (576, 576)] {
                let (q, _) = weights(dtype, n, k, &mut rng);
                let w = GpuMatrix::upload(&gpu, "w", dtype, n, k, &q).unwrap();
                let tmax = 512;
                let x = gpu.upload("x", &rng.vec(tmax * k, 1.0)).unwrap();
                let y = gpu.storage("y", (tmax * n * 4) as u64).unwrap();
                let mv = MatVec::new(&gpu, dtype, Epilogue::Store).unwrap();
                let b = mv.bind(&gpu, &w, &x, 0, &y, 1).unwrap();
                let s = time(&b, 200);
                let mut line = format!(
                    "{:5} {n:6}x{k:5}: matvec {:7.1} us {:6.0} GB/s",
                    dtype.name(),
                    s * 1e6,
                    w.bytes() as f64 / s / 1e9
                );
                if n * k <= 4096 * 14336 && n >= 4096 {
                    let mm = MatMul::new(&gpu, dtype, Epilogue::Store).unwrap();
                    let b = mm.bind(&gpu, &w, &x, 0, &y, tmax).unwrap();
                    let s = time(&b, 10);
                    line += &format!(
                        " | matmul T={tmax} {:7.1} us {:5.1} TFLOP/s",
                        s * 1e6,
                        2.0 * (tmax * n * k) as f64 / s / 1e12
                    );
                }
                eprintln!("{line}");
            }
        }
    }

    #[test]
    fn upload_rejects_bad_shapes() {
        let gpu = &variants()[0];
        let bad = |r: Result<GpuMatrix>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(bad(GpuMatrix::upload(gpu, "w", DType::Q4_0, 2, 33, &[0; 100])));
        assert!(bad(GpuMatrix::upload(gpu, "w", DType::Q4_0, 2, 32, &[0; 35])));
        assert!(bad(GpuMatrix::upload(gpu, "w", DType::F16, 0, 32, &[])));
        let w = GpuMatrix::upload(gpu, "w", DType::F16, 3, 5, &[0; 30]).unwrap();
        assert_eq!(w.bytes(), 48); // 3 rows of 3 words, padded to 16 bytes
        let x = gpu.storage("x", 4 * 5).unwrap();
        let y = gpu.storage("y", 4 * 3).unwrap();
        let mv = MatVec::new(gpu, DType::F16, Epilogue::Store).unwrap();
        assert!(mv.bind(gpu, &w, &x, 0, &y, 1).is_ok());
        assert!(mv.bind(gpu, &w, &x, 1, &y, 1).is_err());
        assert!(mv.bind(gpu, &w, &x, 0, &y, 2).is_err());
        assert!(MatVec::new(gpu, DType::Q4_0, Epilogue::Store).unwrap().bind(gpu, &w, &x, 0, &y, 1).is_err());
        let tiny = small_binding_gpu(64);
        assert!(matches!(GpuMatrix::upload(&tiny, "w", DType::F32, 1, 64, &[0; 256]), Err(Error::OutOfMemory(_))));
    }
}
