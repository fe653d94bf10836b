//! The public API: a loaded [`Model`] (shared, read-only) and [`Session`]s over it, each with
//! its own KV cache, that prefill prompts, stream sampled tokens and measure perplexity.

use crate::decoder::{record, record_without, Buffers, Decoder, Kernels, Plan, Step, Weights, STEPS_IN_FLIGHT};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuOptions};
use crate::kernels::sampling::{SampleParams, SamplingKernels, SamplingParams};
use crate::model::{ChatMessage, ChatTemplate, ModelConfig, ModelFiles, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seconds of each timed dispatch, by kernel kind, in recording order.
pub type DispatchTimes = Vec<(&'static str, f64)>;

/// A model on the GPU: weights, pipelines, tokenizer and chat template.
pub struct Model {
    pub gpu: Arc<Gpu>,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub source: PathBuf,
    weights: Weights,
    kernels: Kernels,
}

impl Model {
    /// Opens a GGUF file or Hugging Face directory and uploads it to a GPU chosen by `opts`.
    pub fn load(path: impl AsRef<Path>, opts: &GpuOptions) -> Result<Arc<Model>> {
        let gpu = Gpu::new(opts)?;
        Model::load_on(gpu, path, &mut |_, _| {})
    }

    /// Uploads to a given GPU (e.g. one an app already owns), reporting (bytes done, total).
    pub fn load_on(gpu: Arc<Gpu>, path: impl AsRef<Path>, progress: &mut dyn FnMut(u64, u64)) -> Result<Arc<Model>> {
        let files = ModelFiles::open(path.as_ref())?;
        let weights = Weights::upload(&gpu, &files, progress).map_err(|e| match e {
            Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                "{m}. The model's weights take {:.1} MiB in their file format; try a smaller or \
                 more quantized model",
                files.tensors.values().map(|t| t.bytes().len() as f64).sum::<f64>() / 1048576.0
            )),
            e => e,
        })?;
        gpu.wait()?;
        let kernels = Kernels::new(&gpu, &files.config, &weights)?;
        let template = files.chat_template_or_chatml();
        Ok(Arc::new(Model {
            gpu,
            config: files.config,
            tokenizer: files.tokenizer,
            template,
            source: files.source,
            weights,
            kernels,
        }))
    }

    /// Bytes the weights take on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// Renders a conversation with the model's chat template and tokenizes it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text, false)
    }
}

/// Options of a session.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Context length; default: the model's, capped at 8192.
    pub max_ctx: Option<usize>,
}

/// What generation does besides sampling.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
    /// Set from another thread to stop: checked between prefill chunks and after each token.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { sampling: SamplingParams::default(), max_tokens: 256, stop_at_eos: true, stop: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    Cancelled,
}

/// Timings and counts of one generation.
#[derive(Debug, Clone)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest were already in the cache).
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stop: StopReason,
}

impl GenerateStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Tokens per second after the first (which comes out of the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Bytes of KV cache per memory tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvUsage {
    pub gpu_bytes: u64,
    pub host_bytes: u64,
    /// The KV policy's name.
    pub policy: &'static str,
}

/// Per-token negative log-likelihoods of a text.
#[derive(Debug, Clone)]
pub struct Perplexity {
    /// nll[i] is -log p(token i+1 | tokens 0..=i).
    pub nll: Vec<f32>,
}

impl Perplexity {
    pub fn value(&self) -> f64 {
        (self.nll.iter().map(|&x| x as f64).sum::<f64>() / self.nll.len().max(1) as f64).exp()
    }
}

/// A conversation's KV cache and the recorded kernels that extend it.
pub struct Session {
    model: Arc<Model>,
    plan: Plan,
    bufs: Buffers,
    dec: Decoder,
    /// Token ids whose keys and values are in the cache, in order.
    cached: Vec<u32>,
    /// CPU copy of the repetition-penalty bitmap.
    seen: Vec<u32>,
}

impl Session {
    pub fn new(model: &Arc<Model>, opts: &SessionOptions) -> Result<Session> {
        let c = &model.config;
        let max_ctx = opts.max_ctx.unwrap_or(c.max_position_embeddings.min(8192)).max(1);
        if max_ctx > c.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "context {max_ctx} is longer than the model's {}",
                c.max_position_embeddings
            )));
        }
        let gpu = &model.gpu;
        let plan = Plan::new(gpu, c, max_ctx as u32);
        let bufs = Buffers::new(gpu, c, &plan).map_err(|e| match e {
            Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                "{m}. A context of {max_ctx} tokens needs {:.1} MiB of KV cache; a shorter \
                 context (--ctx) needs proportionally less",
                plan.kv_bytes(c) as f64 / 1048576.0
            )),
            e => e,
        })?;
        let dec = Decoder::build(gpu, c, &model.weights, &model.kernels, &bufs, &plan)?;
        gpu.take_errors()?;
        Ok(Session { model: model.clone(), plan, bufs, dec, cached: vec![], seen: vec![0; c.vocab_size.div_ceil(32)] })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
    pub fn max_ctx(&self) -> usize {
        self.plan.max_ctx as usize
    }
    /// Tokens in the cache.
    pub fn context_len(&self) -> usize {
        self.cached.len()
    }
    /// Bytes of the KV cache (all on the GPU in the dense policy).
    pub fn kv_bytes(&self) -> u64 {
        self.plan.kv_bytes(&self.model.config)
    }

    /// Where the KV cache lives. The dense policy reserves the whole context on the GPU.
    pub fn kv_usage(&self) -> KvUsage {
        KvUsage { gpu_bytes: self.kv_bytes(), host_bytes: 0, policy: "dense f16" }
    }
    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.cached.clear();
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.model.config.vocab_size as u32;
        if let Some(&bad) = ids.iter().find(|&&t| t >= v) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary ({v})")));
        }
        if ids.len() > self.max_ctx() {
            return Err(Error::ContextFull { needed: ids.len(), limit: self.max_ctx() });
        }
        Ok(())
    }

    /// Makes the cache hold `ids`, computing only what differs from what it holds, and
    /// samples the next token. Returns it (None when `stop` was set between chunks: the cache
    /// then holds what was computed) and how many tokens were computed.
    fn prefill(
        &mut self,
        ids: &[u32],
        sampling: &SamplingParams,
        stop: Option<&AtomicBool>,
    ) -> Result<(Option<u32>, usize)> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        self.check_ids(ids)?;
        let gpu = self.model.gpu.clone();
        let common = self.cached.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // At least the last token is computed: its logits give the next token.
        let start = common.min(ids.len() - 1);
        self.cached.truncate(start);
        self.seen.iter_mut().for_each(|w| *w = 0);
        for &t in ids {
            self.seen[t as usize / 32] |= 1 << (t % 32);
        }
        gpu.write(&self.bufs.seen, 0, &self.seen);
        let sample = &self.dec.decode[self.dec.sample].bound;
        sample.set_params(&gpu.queue, &SampleParams::new(self.model.config.vocab_size as u32, sampling));
        // The sampler bound in the prefill plan shares the parameters' meaning but has its own
        // uniform.
        let prefill_sample = &self.dec.prefill[self.dec.prefill.len() - 1].bound;
        prefill_sample.set_params(&gpu.queue, &SampleParams::new(self.model.config.vocab_size as u32, sampling));
        let chunk = self.plan.chunk as usize;
        let mut pos = start;
        while pos < ids.len() {
            let n = chunk.min(ids.len() - pos);
            let last = pos + n == ids.len();
            gpu.write(&self.bufs.tokens, 0, &ids[pos..pos + n]);
            gpu.write(&self.bufs.state, 0, &[pos as u32, n as u32, 0, 0]);
            let steps = if last { &self.dec.prefill[..] } else { &self.dec.prefill[..self.dec.prefill_layers_len] };
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                record(&mut pass, steps, Step { n: n as u32, keys: (pos + n) as u32 });
            }
            if last {
                enc.copy_buffer_to_buffer(&self.bufs.tokens.buffer, 0, &self.bufs.readback[0], 0, 4);
            }
            gpu.queue.submit([enc.finish()]);
            if last {
                let mut t = [0u32];
                gpu.read_staging(&self.bufs.readback[0], &mut t)?;
                self.cached.extend_from_slice(&ids[pos..]);
                return Ok((Some(t[0]), ids.len() - start));
            }
            gpu.wait()?;
            self.cached.extend_from_slice(&ids[pos..pos + n]);
            pos += n;
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                break;
            }
        }
        Ok((None, pos - start))
    }

    /// Last-position logits after `ids` (inspection and tests; generation never reads them
    /// back).
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.prefill(ids, &SamplingParams::default(), None)?;
        self.model.gpu.read(&self.bufs.logits, 0, self.model.config.vocab_size)
    }

    /// Last-position logits of `ids` through a decode step: all but the last id are
    /// prefilled and the last one goes through the one-token kernels generation uses
    /// (inspection and tests of the decode path, e.g. tests/cuda/parity.py). Needs at least
    /// two ids.
    pub fn decode_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let Some((&last, head)) = ids.split_last().filter(|(_, h)| !h.is_empty()) else {
            return Err(Error::InvalidArgument("decode logits need at least two token ids".into()));
        };
        self.check_ids(ids)?;
        self.prefill(head, &SamplingParams::default(), None)?;
        let gpu = self.model.gpu.clone();
        // The step feeds the token in tokens[0] (where prefill left its sample).
        gpu.write(&self.bufs.tokens, 0, &[last]);
        self.submit_decode(None, None, ids.len());
        self.cached.push(last);
        gpu.read(&self.bufs.logits, 0, self.model.config.vocab_size)
    }

    /// Submits one decode step: it feeds the token the previous step sampled (already on the
    /// GPU) and, with `slot`, copies the one it samples to that readback slot. One submit;
    /// `timestamps` brackets its pass (benchmarks).
    fn submit_decode(
        &self,
        slot: Option<usize>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
        keys: usize,
    ) -> wgpu::SubmissionIndex {
        self.submit_decode_without(slot, timestamps, keys, None)
    }

    /// [`Session::submit_decode`] leaving out the dispatches of kind `skip` (benchmarks).
    fn submit_decode_without(
        &self,
        slot: Option<usize>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
        keys: usize,
        skip: Option<&str>,
    ) -> wgpu::SubmissionIndex {
        let gpu = &self.model.gpu;
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        {
            let desc = wgpu::ComputePassDescriptor { label: None, timestamp_writes: timestamps };
            let mut pass = enc.begin_compute_pass(&desc);
            record_without(&mut pass, &self.dec.decode, Step { n: 1, keys: keys as u32 }, skip);
        }
        if let Some(slot) = slot {
            enc.copy_buffer_to_buffer(&self.bufs.tokens.buffer, 0, &self.bufs.readback[slot], 0, 4);
        }
        gpu.queue.submit([enc.finish()])
    }

    /// Waits for the step that fills readback slot `slot` (submission `index`; a step
    /// submitted after it keeps running) and returns its token (4 bytes).
    fn read_token(&self, slot: usize, index: wgpu::SubmissionIndex) -> Result<u32> {
        let mut t = [0u32];
        self.model.gpu.read_staging_after(&self.bufs.readback[slot], &mut t, Some(index))?;
        Ok(t[0])
    }

    /// For benchmarks: `steps` more decode steps continuing the last generation, one submit
    /// each as in [`Session::generate`] but nothing read back, so the GPU runs them back to
    /// back. Returns the host time spent recording and submitting them, and each step's GPU
    /// time when `timer` has timestamps. Nobody reads the tokens these steps produce, so the
    /// session forgets its conversation afterwards.
    pub fn profile_decode(
        &mut self,
        steps: u32,
        timer: &crate::bench::GpuTimer,
    ) -> Result<(Duration, Option<Vec<f64>>)> {
        self.profile_decode_without(steps, timer, None)
    }

    /// [`Session::profile_decode`] with the dispatches of kind `skip` left out of every step:
    /// the difference from the full step is what that kind costs a step (its own time and its
    /// barrier), where [`Session::profile_dispatches`] times each dispatch in a pass of its
    /// own. The tokens such steps compute are meaningless.
    pub fn profile_decode_without(
        &mut self,
        steps: u32,
        timer: &crate::bench::GpuTimer,
        skip: Option<&str>,
    ) -> Result<(Duration, Option<Vec<f64>>)> {
        if self.cached.is_empty() {
            return Err(Error::InvalidArgument("profile_decode continues a generation: generate first".into()));
        }
        // The last sampled token is not in the cache yet: the first step adds it.
        let needed = self.cached.len() + 1 + steps as usize;
        if needed > self.max_ctx() {
            return Err(Error::ContextFull { needed, limit: self.max_ctx() });
        }
        if steps > timer.capacity() {
            return Err(Error::InvalidArgument(format!(
                "{steps} profiled steps need a timer for as many passes (it holds {})",
                timer.capacity()
            )));
        }
        let mut host = Duration::ZERO;
        for i in 0..steps {
            let t = Instant::now();
            self.submit_decode_without(None, timer.writes(i), self.cached.len() + 1 + i as usize, skip);
            host += t.elapsed();
        }
        let gpu = &self.model.gpu;
        let times = timer.collect(gpu, steps)?;
        gpu.wait()?;
        self.cached.clear();
        Ok((host, times))
    }

    /// For benchmarks: one more decode step, continuing the last generation, with every
    /// dispatch in its own timed pass. Returns the kind and GPU seconds of each dispatch the
    /// step runs, in step order (None without timestamps). Pass boundaries add a little to
    /// each time; the sum is a bit above a normal step's. The session forgets its
    /// conversation afterwards.
    pub fn profile_dispatches(&mut self, timer: &crate::bench::GpuTimer) -> Result<Option<Vec<(&'static str, f64)>>> {
        if self.cached.is_empty() {
            return Err(Error::InvalidArgument("profile_dispatches continues a generation: generate first".into()));
        }
        let needed = self.cached.len() + 2;
        if needed > self.max_ctx() {
            return Err(Error::ContextFull { needed, limit: self.max_ctx() });
        }
        let steps = &self.dec.decode;
        if steps.len() as u32 > timer.capacity() {
            return Err(Error::InvalidArgument(format!(
                "a decode step has {} dispatches; the timer holds {} passes",
                steps.len(),
                timer.capacity()
            )));
        }
        let times = time_each(&self.model.gpu, steps, Step { n: 1, keys: (self.cached.len() + 1) as u32 }, timer)?;
        self.cached.clear();
        Ok(times)
    }

    /// Times every dispatch of one prefill chunk (the layers; `chunk` tokens from position 0)
    /// in its own timestamped pass. Overwrites the cache: the session is empty afterwards.
    /// Returns the chunk's token count and (kind, seconds) per dispatch.
    pub fn profile_prefill_dispatches(
        &mut self,
        timer: &crate::bench::GpuTimer,
    ) -> Result<Option<(u32, DispatchTimes)>> {
        let steps = &self.dec.prefill[..self.dec.prefill_layers_len];
        if steps.len() as u32 > timer.capacity() {
            return Err(Error::InvalidArgument(format!(
                "a prefill chunk has {} dispatches; the timer holds {} passes",
                steps.len(),
                timer.capacity()
            )));
        }
        let gpu = &self.model.gpu;
        let n = self.plan.chunk;
        self.cached.clear();
        let ids: Vec<u32> = (0..n).map(|i| i % self.model.config.vocab_size as u32).collect();
        gpu.write(&self.bufs.tokens, 0, &ids);
        gpu.write(&self.bufs.state, 0, &[0u32, n, 0, 0]);
        Ok(time_each(gpu, steps, Step { n, keys: n }, timer)?.map(|t| (n, t)))
    }

    /// Number of dispatches in one prefill chunk (the layers).
    pub fn prefill_dispatches(&self) -> usize {
        self.dec.prefill_layers_len
    }

    /// Number of dispatches in one decode step.
    pub fn decode_dispatches(&self) -> usize {
        self.dec.decode.len()
    }

    /// The kinds of dispatch the next decode step runs, in step order, with how many of each.
    pub fn decode_kinds(&self) -> Vec<(&'static str, u32)> {
        let step = Step { n: 1, keys: (self.cached.len() + 1) as u32 };
        let mut kinds: Vec<(&'static str, u32)> = vec![];
        for d in self.dec.decode.iter().filter(|d| d.runs(step)) {
            match kinds.iter_mut().find(|(k, _)| *k == d.kind) {
                Some((_, n)) => *n += 1,
                None => kinds.push((d.kind, 1)),
            }
        }
        kinds
    }

    /// Continues the context `ids` (the whole conversation so far; what the cache already
    /// holds is reused), calling `on_token(id, text)` for each new token; `on_token` returns
    /// false to stop. `opts.stop` stops it from another thread.
    ///
    /// ```
    /// use longwave::{GenerateOptions, GpuOptions, Model, Session, SessionOptions, StopReason};
    /// use std::sync::{atomic::{AtomicBool, Ordering}, Arc};
    /// # let path = longwave::model::default_model_path();
    /// let model = Model::load(&path, &GpuOptions::default())?;
    /// // Two sessions share the loaded weights; each has its own KV cache.
    /// let mut a = Session::new(&model, &SessionOptions { max_ctx: Some(256) })?;
    /// let mut b = Session::new(&model, &SessionOptions { max_ctx: Some(256) })?;
    /// let stop = Arc::new(AtomicBool::new(false));
    /// let opts = GenerateOptions { max_tokens: 64, stop: Some(stop.clone()), ..Default::default() };
    /// let ids = model.tokenizer.encode("Once upon a time", true)?;
    /// let (out, stats) = a.generate(&ids, &opts, |_, _text| {
    ///     // Any thread holding `stop` can end generation; here the callback does it.
    ///     stop.store(true, Ordering::Relaxed);
    ///     true
    /// })?;
    /// assert_eq!((out.len(), stats.stop), (1, StopReason::Cancelled));
    /// let (out_b, _) = b.generate(&ids, &GenerateOptions { max_tokens: 3, ..Default::default() }, |_, _| true)?;
    /// assert_eq!(out_b[0], out[0], "greedy sessions agree");
    /// println!("{} tokens in context, {} KV bytes on the GPU", a.context_len(), a.kv_usage().gpu_bytes);
    /// # Ok::<(), longwave::Error>(())
    /// ```
    pub fn generate(
        &mut self,
        ids: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<(Vec<u32>, GenerateStats)> {
        opts.sampling.validate()?;
        let t0 = Instant::now();
        let (first, prefilled) = self.prefill(ids, &opts.sampling, opts.stop.as_deref())?;
        let prefill_time = t0.elapsed();
        let Some(mut next) = first else {
            let stats = GenerateStats {
                prompt_tokens: ids.len(),
                prefilled_tokens: prefilled,
                generated_tokens: 0,
                prefill_time,
                decode_time: Duration::ZERO,
                stop: StopReason::Cancelled,
            };
            return Ok((vec![], stats));
        };
        let t1 = Instant::now();
        let model = self.model.clone();
        let tok = &model.tokenizer;
        let mut stream = tok.stream_decoder(true);
        let mut out = vec![];
        // Steps run ahead: up to STEPS_IN_FLIGHT - 1 steps after the current one are submitted
        // before the current token is read back (the GPU feeds each step the token of the one
        // before), and the read waits only for the current step's submission, so the GPU
        // does not wait for the host. A step submitted past the end computes a token nobody
        // reads; its cache row lies beyond `cached` and is overwritten by whatever comes next.
        let mut slot = 0;
        // The submission that fills each readback slot, while it is in flight.
        let mut pending: [Option<wgpu::SubmissionIndex>; STEPS_IN_FLIGHT] = Default::default();
        let stop = loop {
            if opts.stop_at_eos && tok.is_eos(next) {
                break StopReason::Eos;
            }
            out.push(next);
            let text = stream.push(tok, next)?.unwrap_or_default();
            if !on_token(next, &text) || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                break StopReason::Cancelled;
            }
            if out.len() >= opts.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.cached.len() + 1 > self.max_ctx() {
                break StopReason::ContextFull;
            }
            // Step `ahead` after the current one feeds the token at position
            // cached.len() + ahead; the slots fill in order, so each pass adds at most one.
            for ahead in 0..STEPS_IN_FLIGHT {
                let s = (slot + ahead) % STEPS_IN_FLIGHT;
                let wanted = ahead == 0
                    || (out.len() + ahead < opts.max_tokens && self.cached.len() + 1 + ahead <= self.max_ctx());
                if !wanted {
                    break;
                }
                if pending[s].is_none() {
                    pending[s] = Some(self.submit_decode(Some(s), None, self.cached.len() + 1 + ahead));
                }
            }
            let fed = next;
            let index = pending[slot].take().ok_or_else(|| Error::Gpu("decode step not submitted".into()))?;
            next = self.read_token(slot, index)?;
            self.cached.push(fed);
            self.seen[next as usize / 32] |= 1 << (next % 32);
            slot = (slot + 1) % STEPS_IN_FLIGHT;
        };
        let rest = stream.flush(tok)?;
        if !rest.is_empty() {
            on_token(u32::MAX, &rest);
        }
        let stats = GenerateStats {
            prompt_tokens: ids.len(),
            prefilled_tokens: prefilled,
            generated_tokens: out.len(),
            prefill_time,
            decode_time: t1.elapsed(),
            stop,
        };
        Ok((out, stats))
    }

    /// One chat turn: renders `messages` with the model's template and generates the
    /// assistant's reply, streaming its text to `on_text`.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<(String, GenerateStats)> {
        let ids = self.model.chat_prompt(messages)?;
        let (out, stats) = self.generate(&ids, opts, |_, t| on_text(t))?;
        Ok((self.model.tokenizer.decode(&out, true)?, stats))
    }

    /// Per-token NLL of `ids`. A text longer than the context is cut into disjoint windows of
    /// the context length, each evaluated from a fresh cache; the first token of every window
    /// after the first is not scored (it has no prefix in its window).
    pub fn perplexity(&mut self, ids: &[u32]) -> Result<Perplexity> {
        if ids.len() < 2 {
            return Err(Error::InvalidArgument("perplexity needs at least 2 tokens".into()));
        }
        let v = self.model.config.vocab_size as u32;
        if let Some(&bad) = ids.iter().find(|&&t| t >= v) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary ({v})")));
        }
        let gpu = self.model.gpu.clone();
        let chunk = self.plan.chunk as usize;
        let window = self.max_ctx();
        let mut nll = Vec::with_capacity(ids.len() - 1);
        self.cached.clear();
        for win in ids.chunks(window) {
            let mut pos = 0;
            while pos < win.len() {
                let n = chunk.min(win.len() - pos);
                gpu.write(&self.bufs.tokens, 0, &win[pos..pos + n]);
                gpu.write(&self.bufs.state, 0, &[pos as u32, n as u32, 0, 0]);
                let targets: Vec<u32> = (0..n).map(|i| *win.get(pos + i + 1).unwrap_or(&0)).collect();
                gpu.write(&self.dec.nll_targets, 0, &targets);
                SamplingKernels::set_nll_rows(&self.dec.ppl_tail[self.dec.nll_bound].bound, &gpu.queue, n as u32, v);
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    let step = Step { n: n as u32, keys: (pos + n) as u32 };
                    record(&mut pass, &self.dec.prefill[..self.dec.prefill_layers_len], step);
                    record(&mut pass, &self.dec.ppl_tail, step);
                }
                gpu.queue.submit([enc.finish()]);
                let got: Vec<f32> = gpu.read(&self.dec.nll_out, 0, n)?;
                let keep = if pos + n == win.len() { n - 1 } else { n };
                nll.extend_from_slice(&got[..keep]);
                pos += n;
            }
        }
        self.cached.clear();
        Ok(Perplexity { nll })
    }
}

/// Messages of a one-turn chat.
pub fn user_message(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

/// Records each of `steps` for `n` tokens in its own timestamped pass, runs them and returns
/// (kind, seconds) per dispatch (None without timestamps).
fn time_each(
    gpu: &Gpu,
    steps: &[crate::decoder::Dispatch],
    step: Step,
    timer: &crate::bench::GpuTimer,
) -> Result<Option<DispatchTimes>> {
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    for (i, d) in steps.iter().enumerate() {
        let desc = wgpu::ComputePassDescriptor { label: None, timestamp_writes: timer.writes(i as u32) };
        let mut pass = enc.begin_compute_pass(&desc);
        // A dispatch this step skips (a variant it does not use) gets an empty pass, and
        // no entry in the result.
        record(&mut pass, std::slice::from_ref(d), step);
    }
    gpu.queue.submit([enc.finish()]);
    let times = timer.collect(gpu, steps.len() as u32)?;
    gpu.wait()?;
    Ok(times.map(|t| steps.iter().zip(t).filter(|(d, _)| d.runs(step)).map(|(d, t)| (d.kind, t)).collect()))
}
