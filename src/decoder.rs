//! The LLaMA decoder on the GPU: weights, per-session buffers, and the recorded sequence of
//! kernels for one step, readable top to bottom in [`Decoder::build`].
//!
//! A step processes `n` tokens (n = 1 when decoding, up to `chunk` when prefilling) at the
//! positions the device-side step state names, appends their K/V to the cache, and ends with
//! the sampler writing the next token back into the input slot. Everything is bound once when
//! a session is created; a decode step records the same dispatches into one compute pass and
//! submits once, reading back 4 bytes.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer};
use crate::kernels::attention::{rope_table, AttendKind, AttentionKernels, AttnShape, DecodeAttention};
use crate::kernels::embedding::Embedding;
use crate::kernels::half_x::HalfX;
use crate::kernels::matmul::{
    norm_output_floats, norm_output_parts, q8_norm_words, Epilogue, GpuMatrix, MatMul, MatVec, MergeInput, OutRows,
};
use crate::kernels::quantize::{q8_words, Q8Input, QuantizeQ8};
use crate::kernels::rms_norm::RmsNorm;
use crate::kernels::sampling::SamplingKernels;
use crate::kernels::Bound;
use crate::model::{ModelConfig, ModelFiles};
use std::sync::Arc;

/// One layer's weights on the GPU.
pub struct LayerWeights {
    pub attn_norm: GpuBuffer,
    /// Q, K and V projections: one matrix of stacked rows when they share a format (one
    /// product per step), else three products filling the same output rows.
    pub qkv: Vec<GpuMatrix>,
    pub o: GpuMatrix,
    pub ffn_norm: GpuBuffer,
    pub gate: GpuMatrix,
    pub up: GpuMatrix,
    pub down: GpuMatrix,
}

/// All weights on the GPU.
pub struct Weights {
    pub embed: GpuMatrix,
    pub layers: Vec<LayerWeights>,
    pub norm: GpuBuffer,
    /// None when tied to the embedding.
    pub lm_head: Option<GpuMatrix>,
}

impl Weights {
    pub fn lm_head(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn bytes(&self) -> u64 {
        let mut b = self.embed.bytes() + self.norm.size + self.lm_head.as_ref().map_or(0, |m| m.bytes());
        for l in &self.layers {
            b += l.attn_norm.size + l.ffn_norm.size;
            b += l.qkv.iter().chain([&l.o, &l.gate, &l.up, &l.down]).map(|m| m.bytes()).sum::<u64>();
        }
        b
    }

    /// Uploads every tensor, reporting progress as (bytes done, bytes total).
    pub fn upload(gpu: &Gpu, files: &ModelFiles, progress: &mut dyn FnMut(u64, u64)) -> Result<Weights> {
        let total: u64 = files.tensors.values().map(|t| t.bytes().len() as u64).sum();
        let mut done = 0u64;
        let tensor = |name: &str| {
            files.tensors.get(name).ok_or_else(|| Error::bad_model(&files.source, format!("missing tensor {name}")))
        };
        let mut matrix = |name: &str| -> Result<GpuMatrix> {
            let t = tensor(name)?;
            let m = GpuMatrix::upload(gpu, name, t.dtype, t.rows, t.cols, t.bytes())?;
            done += t.bytes().len() as u64;
            progress(done, total);
            Ok(m)
        };
        // Q, K and V rows stacked into one matrix when they share a format.
        let qkv = |p: &str, matrix: &mut dyn FnMut(&str) -> Result<GpuMatrix>| -> Result<Vec<GpuMatrix>> {
            let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}self_attn.{n}.weight"));
            let ts = [tensor(&names[0])?, tensor(&names[1])?, tensor(&names[2])?];
            if ts.iter().all(|t| t.dtype == ts[0].dtype && t.cols == ts[0].cols) {
                let bytes: Vec<u8> = ts.iter().flat_map(|t| t.bytes().iter().copied()).collect();
                let rows = ts.iter().map(|t| t.rows).sum();
                let m = GpuMatrix::upload(gpu, &format!("{p}qkv"), ts[0].dtype, rows, ts[0].cols, &bytes)?;
                Ok(vec![m])
            } else {
                names.iter().map(|n| matrix(n)).collect()
            }
        };
        let embed = matrix("model.embed_tokens.weight")?;
        let c = &files.config;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}.");
            layers.push(LayerWeights {
                attn_norm: vector(gpu, files, &format!("{p}input_layernorm.weight"))?,
                qkv: qkv(&p, &mut matrix)?,
                o: matrix(&format!("{p}self_attn.o_proj.weight"))?,
                ffn_norm: vector(gpu, files, &format!("{p}post_attention_layernorm.weight"))?,
                gate: matrix(&format!("{p}mlp.gate_proj.weight"))?,
                up: matrix(&format!("{p}mlp.up_proj.weight"))?,
                down: matrix(&format!("{p}mlp.down_proj.weight"))?,
            });
        }
        let norm = vector(gpu, files, "model.norm.weight")?;
        let lm_head = if files.tensors.contains_key("lm_head.weight") && !c.tie_word_embeddings {
            Some(matrix("lm_head.weight")?)
        } else {
            None
        };
        progress(total, total);
        Ok(Weights { embed, layers, norm, lm_head })
    }
}

fn vector(gpu: &Gpu, files: &ModelFiles, name: &str) -> Result<GpuBuffer> {
    let t = files.tensors.get(name).ok_or_else(|| Error::bad_model(&files.source, format!("missing tensor {name}")))?;
    gpu.upload(name, &t.to_f32())
}

/// Every pipeline the decoder uses, built once per model.
pub struct Kernels {
    pub norm: RmsNorm,
    pub embed: Embedding,
    /// The gather that also writes the first layer's 8-bit norm input (decode steps whose
    /// first layer takes 8-bit vectors); None where unused.
    pub embed_q8_norm: Option<Embedding>,
    pub attn: AttentionKernels,
    pub sampling: SamplingKernels,
    /// Per weight format present in the model: the matvec and matmul variants.
    pub mat: Vec<(crate::model::quant::DType, MatKernels)>,
    /// 8-bit quantization of decode vectors (with the layer norm fused, of the last row with
    /// the final norm, and plain) for the integer-dot products; None where unused.
    pub q8: Option<[QuantizeQ8; 3]>,
    /// f32 -> f16 of the prefill products' inputs where any runs on the matrix units.
    pub half_x: Option<HalfX>,
}

/// The matvec variants of 8-bit vectors (weights in a format that takes them).
pub struct Q8MatKernels {
    pub mv: MatVec,
    pub mv_add: MatVec,
    pub mv_swiglu: MatVec,
    /// The SwiGLU product writing 8-bit blocks for the down product (no quantize dispatch).
    pub mv_swiglu_q8: MatVec,
    /// The products of a vector that [`Q8MatKernels::mv_add_norm`] wrote, which scale by
    /// its 1 / rms themselves (Q/K/V; gate/up writing 8-bit blocks).
    pub mv_norm_scale: MatVec,
    pub mv_swiglu_q8_norm_scale: MatVec,
    /// Wo and down: x += W a, writing the new x for the next norm's products.
    pub mv_add_norm: MatVec,
}

pub struct MatKernels {
    pub mv: MatVec,
    /// Decode products with the layer's RMSNorm fused in front (Q/K/V and gate/up).
    pub mv_norm: MatVec,
    pub mv_norm_swiglu: MatVec,
    pub mv_swiglu: MatVec,
    pub mv_add: MatVec,
    /// Wo and down where the vectors stay f32: x += W a, writing the next norm's input.
    pub mv_add_norm: MatVec,
    /// The products of that input, which scale by its 1 / rms themselves (Q/K/V, gate/up).
    pub mv_norm_scale: MatVec,
    pub mv_swiglu_norm_scale: MatVec,
    pub mm: MatMul,
    pub mm_add: MatMul,
    pub mm_swiglu: MatMul,
    /// The same reading x in f16 ([`MatMul::with_half_x`]), where they run on the matrix units.
    pub mm_half: Option<[MatMul; 3]>,
    /// Where the adapter and format allow (Caps::q8_activations, MatVec::takes_q8_input).
    pub q8: Option<Q8MatKernels>,
}

impl Kernels {
    pub fn new(gpu: &Gpu, c: &ModelConfig, weights: &Weights) -> Result<Kernels> {
        let mut dtypes = vec![weights.embed.dtype, weights.lm_head().dtype];
        for l in &weights.layers {
            for m in l.qkv.iter().chain([&l.o, &l.gate, &l.up, &l.down]) {
                dtypes.push(m.dtype);
            }
        }
        dtypes.sort_by_key(|d| d.name());
        dtypes.dedup();
        let mut mat = vec![];
        for d in dtypes {
            let mm = MatMul::new(gpu, d, Epilogue::Store)?;
            let mm_add = MatMul::new(gpu, d, Epilogue::Add)?;
            let mm_swiglu = MatMul::new(gpu, d, Epilogue::SwiGlu)?;
            let mm_half = match (mm.with_half_x(gpu)?, mm_add.with_half_x(gpu)?, mm_swiglu.with_half_x(gpu)?) {
                (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                _ => None,
            };
            mat.push((
                d,
                MatKernels {
                    mv: MatVec::new(gpu, d, Epilogue::Store)?,
                    mv_norm: MatVec::with_norm(gpu, d, Epilogue::Store, c.rms_norm_eps)?,
                    mv_norm_swiglu: MatVec::with_norm(gpu, d, Epilogue::SwiGlu, c.rms_norm_eps)?,
                    mv_swiglu: MatVec::new(gpu, d, Epilogue::SwiGlu)?,
                    mv_add: MatVec::new(gpu, d, Epilogue::Add)?,
                    mv_add_norm: MatVec::with_norm_output(gpu, d)?,
                    mv_norm_scale: MatVec::new(gpu, d, Epilogue::Store)?.with_norm_scale(c.rms_norm_eps)?,
                    mv_swiglu_norm_scale: MatVec::new(gpu, d, Epilogue::SwiGlu)?.with_norm_scale(c.rms_norm_eps)?,
                    mm,
                    mm_add,
                    mm_swiglu,
                    mm_half,
                    q8: if gpu.caps.q8_activations && MatVec::takes_q8_input(d) {
                        Some(Q8MatKernels {
                            mv: MatVec::with_q8_input(gpu, d, Epilogue::Store)?,
                            mv_add: MatVec::with_q8_input(gpu, d, Epilogue::Add)?,
                            mv_swiglu: MatVec::with_q8_input(gpu, d, Epilogue::SwiGlu)?,
                            mv_swiglu_q8: MatVec::with_q8_output(gpu, d)?,
                            mv_norm_scale: MatVec::with_q8_input(gpu, d, Epilogue::Store)?
                                .with_norm_scale(c.rms_norm_eps)?,
                            mv_swiglu_q8_norm_scale: MatVec::with_q8_output(gpu, d)?.with_norm_scale(c.rms_norm_eps)?,
                            mv_add_norm: MatVec::with_q8_norm_output(gpu, d)?,
                        })
                    } else {
                        None
                    },
                },
            ));
        }
        let eps = c.rms_norm_eps;
        let q8 = if mat.iter().any(|(_, m)| m.q8.is_some()) {
            Some([
                QuantizeQ8::new(gpu, Q8Input::Norm { eps })?,
                QuantizeQ8::new(gpu, Q8Input::NormLast { eps })?,
                QuantizeQ8::new(gpu, Q8Input::Plain)?,
            ])
        } else {
            None
        };
        let embed_q8_norm = match q8 {
            Some(_) if weights.embed.cols.is_multiple_of(32) => {
                Some(Embedding::with_q8_norm(gpu, weights.embed.dtype)?)
            }
            _ => None,
        };
        let half_x = if mat.iter().any(|(_, m)| m.mm_half.is_some()) { Some(HalfX::new(gpu)?) } else { None };
        Ok(Kernels {
            q8,
            half_x,
            norm: RmsNorm::new(gpu)?,
            embed: Embedding::new(gpu, weights.embed.dtype)?,
            embed_q8_norm,
            attn: AttentionKernels::new(gpu)?,
            sampling: SamplingKernels::new(gpu)?,
            mat,
        })
    }

    fn mat(&self, m: &GpuMatrix) -> &MatKernels {
        &self.mat.iter().find(|(d, _)| *d == m.dtype).expect("kernels for every dtype").1
    }

    /// The prefill product of `m` with `epilogue` that reads x in f16, where `m` has one and
    /// its shape takes it.
    fn half_mm(&self, m: &GpuMatrix, epilogue: Epilogue) -> Option<&MatMul> {
        let i = match epilogue {
            Epilogue::Store => 0,
            Epilogue::Add => 1,
            Epilogue::SwiGlu => 2,
        };
        self.mat(m).mm_half.as_ref().map(|h| &h[i]).filter(|h| h.uses_matrix_units_for(m.cols))
    }

    /// The 8-bit-vector products for all of `mats`, if every one has them and takes vectors
    /// of its width (a multiple of 32).
    fn q8_all(&self, mats: &[&GpuMatrix]) -> bool {
        mats.iter().all(|m| self.mat(m).q8.is_some() && m.cols.is_multiple_of(32))
    }
}

/// Buffers of one session: activations for up to `chunk` tokens, the KV cache, step state.
pub struct Buffers {
    /// [0] position of the step's first token, [1] tokens in the step, [2] draws so far.
    pub state: GpuBuffer,
    /// Input token ids of the step; the sampler writes the next token to [0].
    pub tokens: GpuBuffer,
    pub x: GpuBuffer,
    pub xn: GpuBuffer,
    /// [token][q heads | k heads | v heads] before RoPE.
    pub qkv: GpuBuffer,
    /// Rotated queries [token][head][hd].
    pub q: GpuBuffer,
    pub attn: GpuBuffer,
    pub ffn: GpuBuffer,
    /// A prefill product's input in f16 (xn, attn or ffn), where products run on the matrix
    /// units (Kernels::half_x); 4 bytes elsewhere.
    pub xh: GpuBuffer,
    /// One decode vector quantized to 8 bits (the input of the product that follows).
    pub xq: GpuBuffer,
    /// The SwiGLU output quantized to 8 bits by the gate/up product (which reads xq).
    pub xq_ffn: GpuBuffer,
    /// x times the next norm's weight in 8 bits with its blocks' sums of squares, written by
    /// the Wo and down products for the products after the norm (MatVec::with_norm_scale).
    pub xq_norm: GpuBuffer,
    /// The same in f32 (x * g, then sums of squares), written by Wo and down where the
    /// vectors stay f32 (MatVec::with_norm_output).
    pub xn_norm: GpuBuffer,
    pub part: GpuBuffer,
    /// Arrival counts of decode attention that merges its own splits (zero between steps).
    pub arrivals: GpuBuffer,
    pub last: GpuBuffer,
    pub logits: GpuBuffer,
    pub seen: GpuBuffer,
    pub rope: GpuBuffer,
    pub k_cache: Vec<GpuBuffer>,
    pub v_cache: Vec<GpuBuffer>,
    /// 4 bytes the CPU maps to read a sampled token; one per decode step in flight, so that
    /// one step can be read while the next ones run.
    pub readback: [wgpu::Buffer; STEPS_IN_FLIGHT],
}

/// Decode steps submitted ahead of the one whose token is being read: the GPU feeds each
/// step the token of the one before, so the host only has to keep it fed. With two, a small
/// model on an H100 (GPU ~1.1 ms per step, recording ~0.6-0.9 ms) ran 764-900 tok/s from run
/// to run: the host's read-back and recording had too little slack.
pub const STEPS_IN_FLIGHT: usize = 3;

/// Sizes a session is built for.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub max_ctx: u32,
    /// Most tokens per prefill step.
    pub chunk: u32,
    /// Key ranges per query when decoding (flash-decoding splits).
    pub decode_splits: u32,
    /// Key ranges per query when prefilling.
    pub prefill_splits: u32,
}

impl Plan {
    pub fn new(gpu: &Gpu, c: &ModelConfig, max_ctx: u32) -> Plan {
        let decode_splits = Plan::decode_splits(gpu, max_ctx);
        // The logits of a whole chunk must fit one binding (perplexity reads them all).
        let by_logits = (gpu.caps.max_binding / (c.vocab_size as u64 * 4)).max(1) as u32;
        // Matrix units fill a large GPU only with more token tiles: 512 tokens per step gave
        // the 8B-shaped products twice the workgroups and prefill +7% on an H100
        // (benches/RESULTS.md).
        let want = if gpu.caps.coop_matrix { 512 } else { 256 };
        let chunk = want.min(by_logits).min(max_ctx).max(1);
        Plan { max_ctx, chunk, decode_splits, prefill_splits: 1 }
    }

    /// Key ranges per query when decoding with a cache of `max_ctx` positions: enough to fill
    /// a GPU at every context length, few enough that merging stays cheap. A CPU device
    /// (lavapipe) runs one workgroup per core at a time: one split per core.
    pub fn decode_splits(gpu: &Gpu, max_ctx: u32) -> u32 {
        if gpu.info.device_type == wgpu::DeviceType::Cpu {
            std::thread::available_parallelism().map_or(2, |n| n.get() as u32).min(max_ctx.div_ceil(64)).clamp(1, 32)
        } else {
            // One split per 64-key tile up to the merge's limit; attend and merge use only
            // as many as the current context has tiles.
            max_ctx.div_ceil(64).clamp(1, AttentionKernels::MAX_SPLITS)
        }
    }

    pub fn shape(&self, c: &ModelConfig) -> AttnShape {
        AttnShape {
            n_heads: c.num_heads as u32,
            n_kv: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            max_ctx: self.max_ctx,
        }
    }

    /// Bytes of the KV cache (keys and values of every layer, f16).
    pub fn kv_bytes(&self, c: &ModelConfig) -> u64 {
        self.shape(c).cache_bytes() * 2 * c.num_layers as u64
    }
}

impl Buffers {
    pub fn new(gpu: &Gpu, c: &ModelConfig, plan: &Plan) -> Result<Buffers> {
        let sh = plan.shape(c);
        sh.check()?;
        if sh.cache_bytes() > gpu.caps.max_binding {
            let fits = gpu.caps.max_binding / (sh.n_kv as u64 * sh.head_dim as u64 * 2);
            return Err(Error::OutOfMemory(format!(
                "a context of {} tokens needs {:.1} MiB of keys per layer, more than one binding \
                 of {} holds ({:.1} MiB); the largest context that fits is {fits} tokens",
                plan.max_ctx,
                sh.cache_bytes() as f64 / 1048576.0,
                gpu.info.name,
                gpu.caps.max_binding as f64 / 1048576.0
            )));
        }
        let t = plan.chunk as u64;
        let f = 4u64;
        let hidden = c.hidden_size as u64;
        let qd = (c.num_heads * c.head_dim) as u64;
        let kvd = (c.num_kv_heads * c.head_dim) as u64;
        // Partials of decode's splits; prefill in one split writes its output directly.
        let prefill_parts =
            if plan.prefill_splits > 1 { sh.partial_floats(plan.chunk, plan.prefill_splits) } else { 0 };
        let parts = prefill_parts.max(sh.partial_floats(1, plan.decode_splits));
        let mut k_cache = vec![];
        let mut v_cache = vec![];
        for i in 0..c.num_layers {
            k_cache.push(gpu.storage(&format!("k cache {i}"), sh.cache_bytes())?);
            v_cache.push(gpu.storage(&format!("v cache {i}"), sh.cache_bytes())?);
        }
        let inv_freq = c.rope_inv_freq();
        Ok(Buffers {
            state: gpu.storage("state", 16)?,
            tokens: gpu.storage("tokens", t * 4)?,
            x: gpu.storage("x", t * hidden * f)?,
            xn: gpu.storage("xn", t * hidden * f)?,
            qkv: gpu.storage("qkv", t * (qd + 2 * kvd) * f)?,
            q: gpu.storage("q", t * qd * f)?,
            attn: gpu.storage("attn", t * qd * f)?,
            ffn: gpu.storage("ffn", t * c.intermediate_size as u64 * f)?,
            xh: if gpu.caps.coop_matrix {
                gpu.storage("xh", t * hidden.max(qd).max(c.intermediate_size as u64) * 2)?
            } else {
                gpu.storage("xh", 4)?
            },
            xq: gpu.storage("xq", q8_words(c.hidden_size.max(qd as usize).max(c.intermediate_size)) as u64 * 4)?,
            xq_ffn: gpu.storage("xq_ffn", q8_words(c.intermediate_size) as u64 * 4)?,
            xq_norm: gpu.storage("xq_norm", q8_norm_words(c.hidden_size) as u64 * 4)?,
            xn_norm: gpu.storage(
                "xn_norm",
                norm_output_floats(c.hidden_size, norm_output_parts(gpu, c.hidden_size)) as u64 * 4,
            )?,
            part: gpu.storage("partials", parts * f)?,
            arrivals: gpu.storage("arrivals", sh.arrival_words() * 4)?,
            last: gpu.storage("last", hidden * f)?,
            logits: gpu.storage("logits", t * c.vocab_size as u64 * f)?,
            seen: gpu.storage("seen", (c.vocab_size as u64).div_ceil(32) * 4)?,
            rope: gpu.upload("rope", &rope_table(&inv_freq, plan.max_ctx as usize))?,
            k_cache,
            v_cache,
            readback: std::array::from_fn(|_| gpu.staging(4)),
        })
    }
}

/// What a recorded step is: `n` tokens, after which the cache holds `keys` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub n: u32,
    pub keys: u32,
}

/// How a recorded dispatch sizes itself for a step; no workgroups (a zero) skips it.
type GroupsFn = Box<dyn Fn(Step) -> [u32; 3] + Send + Sync>;

pub struct Dispatch {
    /// What it computes ("qkv", "attend", "lm_head", ...), for per-kernel profiles.
    pub kind: &'static str,
    pub bound: Bound,
    pub groups: GroupsFn,
}

impl Dispatch {
    /// Whether `step` runs it (a step skips the variants it does not use).
    pub fn runs(&self, step: Step) -> bool {
        (self.groups)(step).iter().all(|&v| v > 0)
    }
}

/// The recorded dispatches of a session.
pub struct Decoder {
    /// One decode step (n = 1): embed .. sample.
    pub decode: Vec<Dispatch>,
    /// One prefill step (n <= chunk): embed .. sample, the layers through matmul kernels.
    pub prefill: Vec<Dispatch>,
    /// Perplexity tail after the prefill layers: final norm of every row, LM head, NLL.
    pub ppl_tail: Vec<Dispatch>,
    pub prefill_layers_len: usize,
    pub sample: usize,
    pub nll_bound: usize,
    pub nll_targets: GpuBuffer,
    pub nll_out: GpuBuffer,
}

fn fixed(g: [u32; 3]) -> GroupsFn {
    Box::new(move |_| g)
}

/// Matmul dispatches are bound for a whole chunk; a step of n tokens runs the token tiles
/// that cover n (rows past n in the last tile compute values nothing reads).
fn matmul_groups(g: [u32; 3], tile_t: usize) -> GroupsFn {
    let tile = tile_t as u32;
    Box::new(move |s| [s.n.div_ceil(tile), g[1], g[2]])
}

impl Decoder {
    /// Records the whole step, top to bottom. `prefill` selects matmul (many tokens) or
    /// matvec (one token) kernels; everything else is shared.
    pub fn build(gpu: &Gpu, c: &ModelConfig, w: &Weights, k: &Kernels, b: &Buffers, plan: &Plan) -> Result<Decoder> {
        let (decode, _) = Self::step(gpu, c, w, k, b, plan, false)?;
        let (prefill, prefill_layers_len) = Self::step(gpu, c, w, k, b, plan, true)?;
        let hidden = c.hidden_size as u32;
        let vocab = c.vocab_size as u32;
        let chunk = plan.chunk;
        let nll_targets = gpu.storage("nll targets", chunk as u64 * 4)?;
        let nll_out = gpu.storage("nll", chunk as u64 * 4)?;
        let mut ppl_tail = vec![Dispatch {
            kind: "final_norm",
            bound: k.norm.bind(gpu, &b.x, &w.norm, &b.xn, chunk, hidden, c.rms_norm_eps)?,
            groups: Box::new(|s| crate::kernels::rms_norm::groups(s.n)),
        }];
        let mk = k.mat(w.lm_head());
        for (bound, g) in mk.mm.bind(gpu, w.lm_head(), &b.xn, 0, &b.logits, chunk as usize)? {
            ppl_tail.push(Dispatch {
                kind: "lm_head",
                bound,
                groups: matmul_groups(g, mk.mm.tile_t(gpu, w.lm_head(), 0, chunk as usize)),
            });
        }
        ppl_tail.push(Dispatch {
            kind: "nll",
            bound: k.sampling.bind_nll(gpu, chunk, vocab, &b.logits, &nll_targets, &nll_out),
            groups: Box::new(|s| [s.n, 1, 1]),
        });
        let nll_bound = ppl_tail.len() - 1;
        let sample = decode.len() - 1;
        Ok(Decoder { decode, prefill, ppl_tail, prefill_layers_len, sample, nll_bound, nll_targets, nll_out })
    }

    fn step(
        gpu: &Gpu,
        c: &ModelConfig,
        w: &Weights,
        k: &Kernels,
        b: &Buffers,
        plan: &Plan,
        prefill: bool,
    ) -> Result<(Vec<Dispatch>, usize)> {
        let sh = plan.shape(c);
        let hidden = c.hidden_size as u32;
        let rows = if prefill { plan.chunk } else { 1 };
        let splits = if prefill { plan.prefill_splits } else { plan.decode_splits };
        let mut steps: Vec<Dispatch> = vec![];
        let push = |steps: &mut Vec<Dispatch>, kind: &'static str, bound: Bound, groups: GroupsFn| {
            steps.push(Dispatch { kind, bound, groups })
        };
        // Prefill products on the matrix units read their input in f16, converted once here
        // into b.xh (Kernels::half_mm); the others read the f32 input.
        let to_half = |steps: &mut Vec<Dispatch>, x: &GpuBuffer, cols: usize| -> Result<()> {
            let h = k.half_x.as_ref().ok_or_else(|| Error::InvalidArgument("no f16 conversion kernel".into()))?;
            let bound = h.bind(gpu, x, &b.xh, rows as usize, cols)?;
            push(steps, "half_x", bound, Box::new(move |s| HalfX::groups(s.n as usize, cols)));
            Ok(())
        };
        // Matrix products: matmul kernels for many tokens, matvec for one.
        let matmul = |steps: &mut Vec<Dispatch>,
                      kind: &'static str,
                      m: &GpuMatrix,
                      x: &GpuBuffer,
                      y: &GpuBuffer,
                      add: bool|
         -> Result<()> {
            let mk = k.mat(m);
            let half = k.half_mm(m, if add { Epilogue::Add } else { Epilogue::Store }).filter(|_| prefill);
            let list = match (prefill, add) {
                _ if half.is_some() => {
                    to_half(steps, x, m.cols)?;
                    half.unwrap().bind(gpu, m, &b.xh, 0, y, rows as usize)?
                }
                (true, false) => mk.mm.bind(gpu, m, x, 0, y, rows as usize)?,
                (true, true) => mk.mm_add.bind(gpu, m, x, 0, y, rows as usize)?,
                (false, false) => mk.mv.bind(gpu, m, x, 0, y, 1)?,
                (false, true) => mk.mv_add.bind(gpu, m, x, 0, y, 1)?,
            };
            for (bound, g) in list {
                push(
                    steps,
                    kind,
                    bound,
                    if prefill { matmul_groups(g, mk.mm.tile_t(gpu, m, 0, rows as usize)) } else { fixed(g) },
                );
            }
            Ok(())
        };

        // Decode steps quantize the vectors of 8- and 4-bit products to 8 bits (integer dot
        // products) where the adapter allows; each quantization replaces the norm in front of
        // the product or is a dispatch of its own.
        let q8k = if prefill { None } else { k.q8.as_ref() };

        let embed_cols = w.embed.cols;
        // Whether layer i's products take 8-bit vectors (see q8 below).
        let fuse_norm =
            !prefill && c.hidden_size <= MatVec::NORM_MAX_COLS && gpu.info.device_type != wgpu::DeviceType::Cpu;
        let layer_q8: Vec<bool> = w
            .layers
            .iter()
            .map(|l| {
                let mats: Vec<&GpuMatrix> = l.qkv.iter().chain([&l.o, &l.gate, &l.up, &l.down]).collect();
                q8k.is_some() && !fuse_norm && k.q8_all(&mats)
            })
            .collect();
        // Whether layer i's decode products take f32 vectors with the norms outside them: its
        // Wo and down products can then write the next norm's input (MatVec::with_norm_output)
        // and the products after them scale by the 1 / rms, so that no norm dispatch remains.
        let layer_f32_norm: Vec<bool> = (0..w.layers.len())
            .map(|i| !prefill && !fuse_norm && !layer_q8[i] && MatVec::norm_scale_fits(c.hidden_size))
            .collect();
        // The attention kernels the steps of this graph use, the same in every layer.
        let attend_kinds = if prefill {
            vec![AttentionKernels::prefill_kind(sh)]
        } else {
            AttentionKernels::decode_kinds(sh, splits, plan.max_ctx)
        };
        // The LM head takes 8-bit vectors (the final norm is then a quantization in front of
        // it, or the last down product's output).
        let lm = w.lm_head();
        let lm_q8 = q8k.is_some() && k.q8_all(&[lm]) && k.mat(lm).q8.is_some();
        // Whether the products after layer i take the normalised input its down product can
        // write: the next layer's, or after the last layer the LM head's (the final norm).
        let next_q8 = |i: usize| layer_q8.get(i + 1).copied().unwrap_or(lm_q8);
        let next_f32_norm = |i: usize| layer_f32_norm.get(i + 1).copied().unwrap_or(!prefill);
        // Token ids -> hidden states. Where the first layer takes 8-bit vectors, the gather
        // also writes its normalised input (no norm dispatch in front of its products).
        let embed_q8 = match (&k.embed_q8_norm, w.layers.first()) {
            (Some(e), Some(l0)) if layer_q8[0] => Some((e, &l0.attn_norm)),
            _ => None,
        };
        let gather = match embed_q8 {
            Some((e, g)) => e.bind_q8_norm(gpu, &w.embed, &b.tokens, 0, &b.x, g, &b.xq_norm, rows as usize)?,
            None => k.embed.bind(gpu, &w.embed, &b.tokens, 0, &b.x, rows as usize)?,
        };
        for (bound, _) in gather {
            push(&mut steps, "embed", bound, Box::new(move |s| crate::kernels::embedding::groups(embed_cols, s.n)));
        }
        // The previous layer's down product (or the gather) wrote this layer's normalised
        // input (8-bit or f32).
        let mut norm_in = embed_q8.is_some();
        for (i, l) in w.layers.iter().enumerate() {
            // Attention block: x += Wo · attention(rope(Wq·n(x)), cache + rope(Wk·n(x)), Wv·n(x)),
            // with Wq, Wk, Wv one stacked product. Decoding fuses the norm n into the product
            // where the vector fits the fused kernel, on GPUs: a CPU adapter (lavapipe) pays
            // more for the per-workgroup reduction and barriers than for a dispatch.
            // 8-bit vectors where every product of the layer takes them, and not where the
            // norm is fused into f32 products (small models, whose products are too short
            // for the saving to pay for the dispatches).
            let q8 = q8k.filter(|_| layer_q8[i]);
            let merge_input = MergeInput { n_heads: sh.n_heads, head_dim: sh.head_dim, splits };
            let merge_in_o = !prefill && MatVec::merge_fits(merge_input) && l.o.cols == hidden_attn(sh);
            // With 8-bit vectors the Wo and down products write the normalised input of the
            // products after them (MatVec::with_q8_norm_output) where those take it: no norm
            // dispatches. Wo only where gate/up writes 8-bit blocks and no step merges the
            // attention inside Wo; down only into a next layer of 8-bit vectors.
            let ffn_q8 = q8.is_some() && k.mat(&l.down).q8.is_some() && MatVec::q8_output_fits(&l.gate);
            let o_norm = ffn_q8 && !merge_in_o && MatVec::q8_output_fits(&l.o);
            let down_norm = q8.is_some() && next_q8(i) && MatVec::q8_output_fits(&l.down);
            // The norm whose input the down product writes: the next layer's or the final one.
            let next_norm = w.layers.get(i + 1).map_or(&w.norm, |n| &n.attn_norm);
            // The same for f32 vectors: Wo where no step merges the attention inside it.
            let o_norm_f32 = layer_f32_norm[i] && !merge_in_o && MatVec::norm_output_fits(gpu, &l.o);
            let down_norm_f32 = layer_f32_norm[i] && next_f32_norm(i) && MatVec::norm_output_fits(gpu, &l.down);
            if let Some([quant_norm, _, _]) = q8 {
                if !norm_in {
                    let (bound, g) = quant_norm.bind(gpu, &b.x, Some(&l.attn_norm), None, &b.xq, 1, c.hidden_size)?;
                    push(&mut steps, "attn_norm", bound, fixed(g));
                }
            } else if !fuse_norm && !norm_in {
                push(
                    &mut steps,
                    "attn_norm",
                    k.norm.bind(gpu, &b.x, &l.attn_norm, &b.xn, rows, hidden, c.rms_norm_eps)?,
                    Box::new(|s| crate::kernels::rms_norm::groups(s.n)),
                );
            }
            let stride = l.qkv.iter().map(|m| m.rows).sum();
            let mut offset = 0;
            let qkv_half = |m: &GpuMatrix| k.half_mm(m, Epilogue::Store).filter(|_| prefill);
            if l.qkv.iter().any(|m| qkv_half(m).is_some()) {
                to_half(&mut steps, &b.xn, c.hidden_size)?;
            }
            for m in &l.qkv {
                let mk = k.mat(m);
                let out = OutRows { stride, offset };
                let list = if let Some(h) = qkv_half(m) {
                    h.bind_into(gpu, m, &b.xh, &b.qkv, out, rows as usize)?
                } else if prefill {
                    mk.mm.bind_into(gpu, m, &b.xn, &b.qkv, out, rows as usize)?
                } else if let (Some(_), Some(mq), true) = (q8, &mk.q8, norm_in) {
                    mq.mv_norm_scale.bind_into(gpu, m, &b.xq_norm, &b.qkv, out, 1)?
                } else if let (Some(_), Some(mq)) = (q8, &mk.q8) {
                    mq.mv.bind_into(gpu, m, &b.xq, &b.qkv, out, 1)?
                } else if norm_in {
                    mk.mv_norm_scale.bind_into(gpu, m, &b.xn_norm, &b.qkv, out, 1)?
                } else if fuse_norm {
                    mk.mv_norm.bind_norm_into(gpu, m, &b.x, &l.attn_norm, &b.qkv, out, 1)?
                } else {
                    mk.mv.bind_into(gpu, m, &b.xn, &b.qkv, out, 1)?
                };
                for (bound, g) in list {
                    push(
                        &mut steps,
                        "qkv",
                        bound,
                        if prefill { matmul_groups(g, mk.mm.tile_t(gpu, m, 0, rows as usize)) } else { fixed(g) },
                    );
                }
                offset += m.rows;
            }
            // Prefill rotates the chunk's queries and keys and appends its keys and values in
            // a dispatch of its own; decode steps (one token) do that inside attention.
            if prefill {
                push(
                    &mut steps,
                    "rope_kv",
                    k.attn.bind_rope_kv(gpu, sh, &b.state, &b.rope, &b.qkv, &b.q, &b.k_cache[i], &b.v_cache[i]),
                    Box::new(move |s| AttentionKernels::rope_groups(sh, s.n)),
                );
            }
            // Decode steps over few splits merge them inside the Wo product instead (each of
            // its workgroups merges all the partials: cheaper than a dispatch only while they
            // are few); the merge dispatch and the plain product skip those steps.
            let in_o =
                move |s: Step| merge_in_o && AttentionKernels::used_splits(splits, s.keys) <= MatVec::MERGE_SPLITS;
            // Other decode steps over few splits merge inside attention: the last workgroup
            // of each head merges its splits (AttentionKernels::merges_in_attention).
            let merged_attn = !prefill && AttentionKernels::merged_fits(gpu);
            let merged =
                move |s: Step| merged_attn && !in_o(s) && AttentionKernels::merges_in_attention(sh, splits, s.keys);
            // With 8-bit vectors the merge writes its output quantized for the integer-dot Wo
            // product (heads of a multiple of 32 values; else a quantize dispatch follows).
            let o_q8 = q8.and_then(|[_, _, quant]| k.mat(&l.o).q8.as_ref().map(|mq| (quant, mq)));
            let merge_q8 = o_q8.is_some() && sh.head_dim.is_multiple_of(32);
            let merge_out = if merge_q8 { &b.xq } else { &b.attn };
            // Prefill uses one attention kernel; decode each kernel some key count up to the
            // context calls for (attend_kinds), recorded only for the steps it suits
            // (AttentionKernels::decode_kind). The wide kernel never merges its own splits.
            for &kind in &attend_kinds {
                let (kc, vc) = (&b.k_cache[i], &b.v_cache[i]);
                if prefill {
                    // One split: the kernel writes the output itself, no merge follows.
                    let bound = if splits == 1 {
                        k.attn.bind_attend_output(gpu, sh, &b.state, &b.q, kc, vc, &b.attn, kind)?
                    } else {
                        k.attn.bind_attend(gpu, sh, splits, &b.state, &b.q, kc, vc, &b.part, kind)?
                    };
                    push(
                        &mut steps,
                        "attend",
                        bound,
                        Box::new(move |s| AttentionKernels::attend_groups(sh, splits, s.n, kind)),
                    );
                    continue;
                }
                let when = move |s: Step, merging: bool| {
                    if AttentionKernels::decode_kind(sh, splits, s.keys) == kind && merged(s) == merging {
                        AttentionKernels::attend_groups(sh, splits, s.n, kind)
                    } else {
                        [0, 0, 0]
                    }
                };
                let (state, rope, qkv, part) = (&b.state, &b.rope, &b.qkv, &b.part);
                let decode = DecodeAttention { sh, splits, kind, state, rope, qkv, k_cache: kc, v_cache: vc, part };
                push(&mut steps, "attend", k.attn.bind_attend_new_kv(gpu, &decode)?, Box::new(move |s| when(s, false)));
                if merged_attn && kind != AttendKind::Wide {
                    let bound = k.attn.bind_attend_merged(gpu, &decode, &b.arrivals, merge_out, merge_q8)?;
                    push(&mut steps, "attend", bound, Box::new(move |s| when(s, true)));
                }
            }
            let unless_in_o = move |g: [u32; 3]| -> GroupsFn { Box::new(move |s| if in_o(s) { [0, 0, 0] } else { g }) };
            if !(prefill && splits == 1) {
                let merge = if merge_q8 {
                    k.attn.bind_merge_q8(gpu, sh, splits, 1, &b.state, &b.part, &b.xq)?
                } else {
                    k.attn.bind_merge(gpu, sh, splits, &b.state, &b.part, &b.attn)
                };
                push(
                    &mut steps,
                    "merge",
                    merge,
                    Box::new(
                        move |s| if in_o(s) || merged(s) { [0, 0, 0] } else { AttentionKernels::merge_groups(sh, s.n) },
                    ),
                );
            }
            if merge_in_o {
                let mv = MatVec::with_merge(gpu, l.o.dtype, merge_input)?;
                for (bound, g) in mv.bind_merge_add(gpu, &l.o, &b.part, &b.state, &b.x)? {
                    push(&mut steps, "merge_o", bound, Box::new(move |s| if in_o(s) { g } else { [0, 0, 0] }));
                }
            }
            match o_q8 {
                Some((quant, mq)) => {
                    if !merge_q8 {
                        let (bound, g) = quant.bind(gpu, &b.attn, None, None, &b.xq, 1, l.o.cols)?;
                        push(&mut steps, "quantize", bound, unless_in_o(g));
                    }
                    let list = if o_norm {
                        mq.mv_add_norm.bind_add_norm_q8(gpu, &l.o, &b.xq, &b.x, &l.ffn_norm, &b.xq_norm, 1)?
                    } else {
                        mq.mv_add.bind(gpu, &l.o, &b.xq, 0, &b.x, 1)?
                    };
                    for (bound, g) in list {
                        push(&mut steps, "o", bound, unless_in_o(g));
                    }
                }
                None if o_norm_f32 => {
                    let list =
                        k.mat(&l.o).mv_add_norm.bind_add_norm(gpu, &l.o, &b.attn, &b.x, &l.ffn_norm, &b.xn_norm, 1)?;
                    for (bound, g) in list {
                        push(&mut steps, "o", bound, fixed(g));
                    }
                }
                None if merge_in_o => {
                    for (bound, g) in k.mat(&l.o).mv_add.bind(gpu, &l.o, &b.attn, 0, &b.x, 1)? {
                        push(&mut steps, "o", bound, unless_in_o(g));
                    }
                }
                None => matmul(&mut steps, "o", &l.o, &b.attn, &b.x, true)?,
            }
            // Feed-forward block: x += Wdown · (silu(Wgate·n(x)) * Wup·n(x)), the norm fused
            // into the gate/up product when decoding.
            let mk = k.mat(&l.gate);
            let o_norm = o_norm && o_q8.is_some();
            if let Some([quant_norm, _, _]) = q8 {
                if !o_norm {
                    let (bound, g) = quant_norm.bind(gpu, &b.x, Some(&l.ffn_norm), None, &b.xq, 1, c.hidden_size)?;
                    push(&mut steps, "ffn_norm", bound, fixed(g));
                }
            } else if !fuse_norm && !o_norm_f32 {
                push(
                    &mut steps,
                    "ffn_norm",
                    k.norm.bind(gpu, &b.x, &l.ffn_norm, &b.xn, rows, hidden, c.rms_norm_eps)?,
                    Box::new(|s| crate::kernels::rms_norm::groups(s.n)),
                );
            }
            // With 8-bit vectors gate/up writes its output quantized where the down product
            // takes it so (whole 32-row blocks); else a quantize dispatch follows. (A layer of
            // 8-bit vectors has the 8-bit kernels of every matrix: Kernels::q8_all.)
            let list = match (prefill, fuse_norm) {
                _ if ffn_q8 && o_norm => mk
                    .q8
                    .as_ref()
                    .unwrap()
                    .mv_swiglu_q8_norm_scale
                    .bind_swiglu(gpu, &l.gate, &l.up, &b.xq_norm, 0, &b.xq_ffn, 1)?,
                _ if ffn_q8 => {
                    mk.q8.as_ref().unwrap().mv_swiglu_q8.bind_swiglu(gpu, &l.gate, &l.up, &b.xq, 0, &b.xq_ffn, 1)?
                }
                _ if q8.is_some() && mk.q8.is_some() => {
                    mk.q8.as_ref().unwrap().mv_swiglu.bind_swiglu(gpu, &l.gate, &l.up, &b.xq, 0, &b.ffn, 1)?
                }
                (true, _) => match k.half_mm(&l.gate, Epilogue::SwiGlu) {
                    Some(h) => {
                        to_half(&mut steps, &b.xn, c.hidden_size)?;
                        h.bind_swiglu(gpu, &l.gate, &l.up, &b.xh, 0, &b.ffn, rows as usize)?
                    }
                    None => mk.mm_swiglu.bind_swiglu(gpu, &l.gate, &l.up, &b.xn, 0, &b.ffn, rows as usize)?,
                },
                _ if o_norm_f32 => {
                    mk.mv_swiglu_norm_scale.bind_swiglu(gpu, &l.gate, &l.up, &b.xn_norm, 0, &b.ffn, 1)?
                }
                (false, true) => {
                    mk.mv_norm_swiglu.bind_norm_swiglu(gpu, &l.gate, &l.up, &b.x, &l.ffn_norm, &b.ffn, 1)?
                }
                (false, false) => mk.mv_swiglu.bind_swiglu(gpu, &l.gate, &l.up, &b.xn, 0, &b.ffn, 1)?,
            };
            for (bound, g) in list {
                push(
                    &mut steps,
                    "gate_up",
                    bound,
                    if prefill {
                        matmul_groups(g, mk.mm_swiglu.tile_t(gpu, &l.gate, 0, rows as usize))
                    } else {
                        fixed(g)
                    },
                );
            }
            norm_in = false;
            if let (Some([_, _, quant]), Some(mq)) = (q8, &k.mat(&l.down).q8) {
                let xq = if ffn_q8 {
                    &b.xq_ffn
                } else {
                    let (bound, g) = quant.bind(gpu, &b.ffn, None, None, &b.xq, 1, l.down.cols)?;
                    push(&mut steps, "quantize", bound, fixed(g));
                    &b.xq
                };
                let list = if down_norm {
                    mq.mv_add_norm.bind_add_norm_q8(gpu, &l.down, xq, &b.x, next_norm, &b.xq_norm, 1)?
                } else {
                    mq.mv_add.bind(gpu, &l.down, xq, 0, &b.x, 1)?
                };
                for (bound, g) in list {
                    push(&mut steps, "down", bound, fixed(g));
                }
                norm_in = down_norm;
            } else if down_norm_f32 {
                for (bound, g) in
                    k.mat(&l.down).mv_add_norm.bind_add_norm(gpu, &l.down, &b.ffn, &b.x, next_norm, &b.xn_norm, 1)?
                {
                    push(&mut steps, "down", bound, fixed(g));
                }
                norm_in = true;
            } else {
                matmul(&mut steps, "down", &l.down, &b.ffn, &b.x, true)?;
            }
        }
        // The last token's hidden state -> logits -> next token.
        let layers_len = steps.len();
        let mk = k.mat(lm);
        // Where the last down product wrote the final norm's input (8-bit where the last
        // layer's vectors are, else f32), the LM head scales by its 1 / rms itself: no
        // final_norm dispatch.
        let last_q8 = layer_q8.last() == Some(&true);
        match (q8k, &mk.q8) {
            (_, Some(mq)) if norm_in && last_q8 => {
                for (bound, g) in mq.mv_norm_scale.bind(gpu, lm, &b.xq_norm, 0, &b.logits, 1)? {
                    push(&mut steps, "lm_head", bound, fixed(g));
                }
            }
            _ if norm_in && !last_q8 => {
                for (bound, g) in mk.mv_norm_scale.bind(gpu, lm, &b.xn_norm, 0, &b.logits, 1)? {
                    push(&mut steps, "lm_head", bound, fixed(g));
                }
            }
            (Some([_, quant_last, _]), Some(mq)) if k.q8_all(&[lm]) => {
                let (bound, g) = quant_last.bind(gpu, &b.x, Some(&w.norm), Some(&b.state), &b.xq, 1, c.hidden_size)?;
                push(&mut steps, "final_norm", bound, fixed(g));
                for (bound, g) in mq.mv.bind(gpu, lm, &b.xq, 0, &b.logits, 1)? {
                    push(&mut steps, "lm_head", bound, fixed(g));
                }
            }
            _ => {
                push(
                    &mut steps,
                    "final_norm",
                    k.norm.bind_last(gpu, &b.state, &b.x, &w.norm, &b.last, hidden, c.rms_norm_eps)?,
                    fixed([1, 1, 1]),
                );
                for (bound, g) in mk.mv.bind(gpu, lm, &b.last, 0, &b.logits, 1)? {
                    push(&mut steps, "lm_head", bound, fixed(g));
                }
            }
        }
        let (sample, gs) = k.sampling.bind_sample(gpu, c.vocab_size as u32, &b.logits, &b.seen, &b.state, &b.tokens)?;
        // Last: Session sets the sampling parameters through it.
        push(&mut steps, "sample", sample, fixed(gs));
        Ok((steps, layers_len))
    }
}

/// Columns of the attention output (Wo's input).
fn hidden_attn(sh: AttnShape) -> usize {
    (sh.n_heads * sh.head_dim) as usize
}

/// Records `dispatches` for `step` into one compute pass.
pub fn record(pass: &mut wgpu::ComputePass<'_>, dispatches: &[Dispatch], step: Step) {
    record_without(pass, dispatches, step, None);
}

/// [`record`] leaving out every dispatch of kind `skip` (benchmarks: what a step costs
/// without it; the step's results are then meaningless).
pub fn record_without(pass: &mut wgpu::ComputePass<'_>, dispatches: &[Dispatch], step: Step, skip: Option<&str>) {
    for d in dispatches.iter().filter(|d| d.runs(step) && Some(d.kind) != skip) {
        d.bound.record(pass, (d.groups)(step));
    }
}

pub type SharedGpu = Arc<Gpu>;
