//! Prefill and decode rates of a loaded model at several context lengths
//! (`longwave bench decode`).
//!
//! Each context: a pseudo-random prompt of that many tokens is prefilled, then
//! `decode_tokens` tokens are generated exactly as `generate` does (wall clock, one submit and
//! a 4-byte readback per token, pipelined one step ahead). Then `profile_steps` more steps run
//! back to back to separate the host's share (recording and submitting a step) from the GPU's
//! (timestamps around each step's pass). Optionally, two views of where a step's GPU time
//! goes: each dispatch timed in a pass of its own (`breakdown`), and the time a step saves
//! without each kind of dispatch (`marginal`).

use super::GpuTimer;
use crate::error::{Error, Result};
use crate::session::{GenerateOptions, Model, Session, SessionOptions};
use std::sync::Arc;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeRow {
    pub model: String,
    pub adapter: String,
    /// Prompt tokens before decoding starts.
    pub context: usize,
    pub prefill_tok_s: f64,
    /// Wall-clock rate of `generate`, host overhead and readback included.
    pub decode_tok_s: f64,
    /// Wall-clock milliseconds per generated token.
    pub ms_per_token: f64,
    /// Host time to record and submit one step.
    pub host_ms_per_token: f64,
    /// GPU time of one step (median over the profiled steps); None without timestamps.
    pub gpu_ms_per_token: Option<f64>,
    pub decode_tokens: usize,
    pub weight_bytes: u64,
    /// With `breakdown`: GPU microseconds per decode step by kernel kind, each dispatch in
    /// its own timed pass, largest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<Vec<KernelShare>>,
    /// With `breakdown`: the same for one prefill chunk of `prefill_chunk` tokens from an
    /// empty cache (the layers; the last token's LM head and sampling are left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_breakdown: Option<Vec<KernelShare>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_chunk: Option<u32>,
    /// With `marginal`: per kernel kind, the GPU microseconds a decode step saves without
    /// it (median step time of the whole step minus that of steps that leave the kind out),
    /// in step order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marginal: Option<Vec<KernelShare>>,
}

/// One kernel kind's share of a decode step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelShare {
    pub kernel: &'static str,
    pub dispatches: u32,
    pub us: f64,
}

pub struct DecodeBenchOptions {
    pub contexts: Vec<usize>,
    pub decode_tokens: usize,
    pub profile_steps: u32,
    /// Also time each dispatch of one step on its own.
    pub breakdown: bool,
    /// Also time steps that leave out one kernel kind at a time.
    pub marginal: bool,
}

impl DecodeBenchOptions {
    /// Powers of two from 512 up to the model's limit (capped at `max_ctx`), and the limit.
    pub fn default_contexts(model: &Model, max_ctx: usize, decode_tokens: usize, profile_steps: u32) -> Vec<usize> {
        let limit = model.config.max_position_embeddings.min(max_ctx);
        let last = limit.saturating_sub(decode_tokens + profile_steps as usize + 1);
        let mut v: Vec<usize> = (9..30).map(|p| 1usize << p).take_while(|&c| c < last).collect();
        if last > 0 {
            v.push(last);
        }
        v
    }
}

/// Context a session needs for `opts`.
pub fn needed_ctx(opts: &DecodeBenchOptions) -> usize {
    opts.contexts.iter().max().copied().unwrap_or(0) + opts.decode_tokens + opts.profile_steps as usize + 1
}

/// Measures every context of `opts`, calling `on_row` after each.
pub fn run(model: &Arc<Model>, opts: &DecodeBenchOptions, on_row: &mut dyn FnMut(&DecodeRow)) -> Result<()> {
    if opts.decode_tokens < 2 || opts.profile_steps == 0 {
        return Err(Error::InvalidArgument(
            "decode benchmarks need at least 2 decode tokens and 1 profiled step".into(),
        ));
    }
    let max_ctx = needed_ctx(opts);
    let mut session = Session::new(model, &SessionOptions { max_ctx: Some(max_ctx) })?;
    let timer = GpuTimer::new(&model.gpu, opts.profile_steps);
    let vocab = model.config.vocab_size as u32;
    // One untimed generation first: the first submissions of a process pay the driver's
    // first-use costs (an 8B-shaped prefill of 512 tokens ran at a quarter of its later rate
    // on an H100), which are not the rate of the kernels.
    let warm = opts.contexts.iter().min().copied().unwrap_or(1).max(1);
    let ids: Vec<u32> = (0..warm as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
    session
        .generate(&ids, &GenerateOptions { max_tokens: 2, stop_at_eos: false, ..Default::default() }, |_, _| true)?;
    for &ctx in &opts.contexts {
        if ctx == 0 {
            return Err(Error::InvalidArgument("context lengths must be positive".into()));
        }
        // A deterministic pseudo-random prompt: every position costs the same.
        let ids: Vec<u32> = (0..ctx as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
        session.reset();
        let gen = GenerateOptions { max_tokens: opts.decode_tokens, stop_at_eos: false, ..Default::default() };
        let (_, st) = session.generate(&ids, &gen, |_, _| true)?;
        // The first token comes from the prefill; decode time covers the rest.
        let ms = st.decode_time.as_secs_f64() * 1e3 / (st.generated_tokens.max(2) - 1) as f64;
        let (host, gpu_times) = session.profile_decode(opts.profile_steps, &timer)?;
        let breakdown = if opts.breakdown { by_kernel(&mut session, &ids, &gen)? } else { None };
        let (prefill_chunk, prefill_breakdown) =
            if opts.breakdown { prefill_by_kernel(&mut session)?.unzip() } else { (None, None) };
        let gpu_ms = gpu_times.map(median_ms);
        let marginal = match gpu_ms {
            Some(full) if opts.marginal => Some(marginal(&mut session, &ids, &gen, opts.profile_steps, &timer, full)?),
            _ => None,
        };
        on_row(&DecodeRow {
            model: model.source.display().to_string(),
            adapter: model.gpu.describe(),
            context: ctx,
            prefill_tok_s: st.prefill_tok_s(),
            decode_tok_s: st.decode_tok_s(),
            ms_per_token: ms,
            host_ms_per_token: host.as_secs_f64() * 1e3 / opts.profile_steps.max(1) as f64,
            gpu_ms_per_token: gpu_ms,
            decode_tokens: opts.decode_tokens,
            weight_bytes: model.weight_bytes(),
            breakdown,
            prefill_breakdown,
            prefill_chunk,
            marginal,
        });
    }
    Ok(())
}

/// Median of step times in seconds, in milliseconds.
fn median_ms(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2] * 1e3
}

/// For each kind of dispatch in a decode step after `ids`: generates `gen` again, times
/// `steps` steps without that kind and returns `full_ms` minus their median, in us. Unlike
/// the breakdown's own passes, this counts what the kind adds to a real step: its time, its
/// barrier, and none of what overlaps it.
fn marginal(
    session: &mut Session,
    ids: &[u32],
    gen: &GenerateOptions,
    steps: u32,
    timer: &GpuTimer,
    full_ms: f64,
) -> Result<Vec<KernelShare>> {
    let mut out = vec![];
    for (kind, dispatches) in session.decode_kinds() {
        session.reset();
        session.generate(ids, &GenerateOptions { max_tokens: 2, ..gen.clone() }, |_, _| true)?;
        let (_, times) = session.profile_decode_without(steps, timer, Some(kind))?;
        let Some(times) = times else { continue };
        out.push(KernelShare { kernel: kind, dispatches, us: (full_ms - median_ms(times)) * 1e3 });
    }
    Ok(out)
}

/// Generates `gen` after `ids` again, then times one step dispatch by dispatch and sums the
/// times by kernel kind.
fn by_kernel(session: &mut Session, ids: &[u32], gen: &GenerateOptions) -> Result<Option<Vec<KernelShare>>> {
    session.reset();
    session.generate(ids, &GenerateOptions { max_tokens: 2, ..gen.clone() }, |_, _| true)?;
    // Two timestamps per pass; wgpu caps a query set at 4096.
    let n = session.decode_dispatches() as u32;
    if n > 2048 {
        return Err(Error::InvalidArgument(format!("{n} dispatches per step are too many to time one by one")));
    }
    let timer = GpuTimer::new(&session.model().gpu, n);
    let Some(times) = session.profile_dispatches(&timer)? else { return Ok(None) };
    Ok(Some(shares(times)))
}

/// One prefill chunk timed dispatch by dispatch, summed by kernel kind.
fn prefill_by_kernel(session: &mut Session) -> Result<Option<(u32, Vec<KernelShare>)>> {
    session.reset();
    let n = session.prefill_dispatches() as u32;
    if n > 2048 {
        return Err(Error::InvalidArgument(format!("{n} dispatches per chunk are too many to time one by one")));
    }
    let timer = GpuTimer::new(&session.model().gpu, n);
    let Some((chunk, times)) = session.profile_prefill_dispatches(&timer)? else { return Ok(None) };
    session.reset();
    Ok(Some((chunk, shares(times))))
}

fn shares(times: Vec<(&'static str, f64)>) -> Vec<KernelShare> {
    let mut shares: Vec<KernelShare> = vec![];
    for (kind, t) in times {
        match shares.iter_mut().find(|s| s.kernel == kind) {
            Some(s) => {
                s.dispatches += 1;
                s.us += t * 1e6;
            }
            None => shares.push(KernelShare { kernel: kind, dispatches: 1, us: t * 1e6 }),
        }
    }
    shares.sort_by(|a, b| b.us.total_cmp(&a.us));
    shares
}
