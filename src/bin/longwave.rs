//! The `longwave` command line: generate, chat, ppl, info, synth, convert, bench.

use clap::{Args, Parser, Subcommand};
use longwave::bench::decode::DecodeBenchOptions;
use longwave::bench::kernels::{shape_by_name, KernelBenchOptions};
use longwave::bench::Row;
use longwave::model::quant::DType;
use longwave::model::{default_model_path, ChatMessage, ModelFiles};
use longwave::{GenerateOptions, GenerateStats, Gpu, GpuOptions, Model, SamplingParams, Session, SessionOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "longwave", version, about = "LLaMA-family inference on any GPU wgpu reaches")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt: the text on stdout, statistics on stderr.
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as one user message.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        #[command(flatten)]
        s: SamplingArgs,
    },
    /// Interactive multi-turn chat with streamed replies (empty line or Ctrl-D ends it).
    Chat {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// System message (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        s: SamplingArgs,
    },
    /// Perplexity of a text file's tokens (no BOS unless the model asks for one). Texts longer
    /// than the context are cut into disjoint context-sized windows.
    Ppl {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        file: PathBuf,
    },
    /// Adapter, features, limits, and (with a model) its summary and memory needs.
    Info {
        #[command(flatten)]
        m: ModelArgs,
        /// Only the adapters; don't load a model.
        #[arg(long)]
        adapters_only: bool,
    },
    /// Write a random-weight model of a real shape, for benchmarks without a download.
    Synth {
        /// llama3-8b or smollm2-135m.
        #[arg(long, default_value = "llama3-8b")]
        shape: String,
        /// gguf (one file) or hf (a Hugging Face directory of safetensors).
        #[arg(long, default_value = "gguf")]
        format: String,
        /// Matrix weights: f16, q8_0, q4_0 (also f32, bf16, q4_1; hf takes f32, f16, bf16).
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// The GGUF file, or the directory for hf.
        #[arg(long)]
        out: PathBuf,
        /// Layer count (default: the shape's).
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// max_position_embeddings (default: the original model's).
        #[arg(long)]
        max_ctx: Option<usize>,
    },
    /// Write a Hugging Face directory (config.json, f16 safetensors, tokenizer) from a model.
    Convert {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks: `bench decode` (a model's prefill/decode rates) and `bench kernels`
    /// (every kernel at real model shapes).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode tokens/s at context lengths from 512 to the model's limit, with the
    /// host's and the GPU's time per decoded token.
    Decode {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt lengths to measure at (default: 512, 1024, ... up to the model's limit).
        #[arg(long, value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Tokens generated per measurement.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Extra steps run back to back to time the host's and the GPU's share.
        #[arg(long, default_value_t = 32)]
        profile_steps: u32,
        /// One JSON object per line and context.
        #[arg(long)]
        json: bool,
        /// Also time each dispatch of one decode step on its own and sum by kernel.
        #[arg(long)]
        breakdown: bool,
        /// Also time decode steps that leave out one kernel kind at a time (their outputs
        /// are meaningless): what each kind adds to a step.
        #[arg(long)]
        marginal: bool,
    },
    /// Every kernel at SmolLM2-135M and Llama-3-8B shapes with GPU timestamps, against the
    /// adapter's copy bandwidth and f32 peak.
    Kernels {
        /// Adapter name substring or index; also LONGWAVE_ADAPTER.
        #[arg(long)]
        adapter: Option<String>,
        /// Model shapes (default: both on a GPU, smollm2-135m on a CPU adapter).
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
        /// Weight formats (default: f16,q8_0,q4_0,q4_1).
        #[arg(long, value_delimiter = ',')]
        dtypes: Vec<String>,
        /// Only kernels whose name contains this (e.g. matvec, attend).
        #[arg(long)]
        filter: Option<String>,
        /// Tokens of the prefill products and prefill attention.
        #[arg(long, default_value_t = 256)]
        prefill_tokens: u32,
        #[arg(long)]
        no_f16: bool,
        #[arg(long)]
        no_subgroups: bool,
        /// One JSON object per line and kernel.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct Q4_1, fetched if
    /// missing).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter name substring or index (see `longwave info --adapters-only`); also
    /// LONGWAVE_ADAPTER.
    #[arg(long)]
    adapter: Option<String>,
    /// Context length (default: the model's, at most 8192).
    #[arg(long)]
    ctx: Option<usize>,
    /// Don't use shader-f16 even if the adapter has it.
    #[arg(long)]
    no_f16: bool,
    /// Don't use subgroup operations even if the adapter has them.
    #[arg(long)]
    no_subgroups: bool,
    /// Don't use matrix units (cooperative matrices) even if the adapter has them; also
    /// LONGWAVE_NO_COOP_MATRIX.
    #[arg(long)]
    no_coop_matrix: bool,
    /// Decode products of 8- and 4-bit weights round their vectors to 8 bits for integer dot
    /// products: on (faster) or off (closer to the reference). Default: on for GPUs, off for
    /// CPU adapters; also LONGWAVE_Q8_ACTIVATIONS.
    #[arg(long, value_parser = ["on", "off"])]
    q8_activations: Option<String>,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

impl ModelArgs {
    fn gpu_options(&self) -> GpuOptions {
        GpuOptions {
            adapter: self.adapter.clone(),
            no_f16: self.no_f16,
            no_subgroups: self.no_subgroups,
            no_coop_matrix: self.no_coop_matrix,
            q8_activations: self.q8_activations.as_deref().map(|v| v == "on"),
            ..Default::default()
        }
    }

    fn load(&self) -> longwave::Result<Arc<Model>> {
        let path = resolve_model(self.model.as_deref())?;
        let gpu = Gpu::new(&self.gpu_options())?;
        eprintln!("adapter: {}", gpu.describe());
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let model = Model::load_on(gpu, &path, &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        model
    }

    fn session(&self, model: &Arc<Model>) -> longwave::Result<Session> {
        Session::new(model, &SessionOptions { max_ctx: self.ctx })
    }
}

/// The model to use: the given path, or the default model, fetched first if missing.
fn resolve_model(path: Option<&Path>) -> longwave::Result<PathBuf> {
    if let Some(p) = path {
        return Ok(p.to_path_buf());
    }
    let p = default_model_path();
    if p.is_file() {
        return Ok(p);
    }
    let dir = p.parent().unwrap_or(Path::new(".")).to_path_buf();
    eprintln!("default model not found at {}; fetching it (about 93 MB) ...", p.display());
    // The fetch script is compiled in, so an installed binary can fetch without the source tree.
    let script = include_str!("../../models/fetch_default.sh");
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("fetch_default.sh")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| longwave::Error::Other(format!("could not run bash to fetch the default model: {e}")))?;
    if !status.success() || !p.is_file() {
        return Err(longwave::Error::Other(format!(
            "fetching the default model into {} failed (see the messages above); \
             run models/fetch_default.sh by hand or pass --model",
            dir.display()
        )));
    }
    Ok(p)
}

fn print_stats(s: &GenerateStats) {
    eprintln!(
        "prompt {} tokens ({} computed) in {:.2} s ({:.1} tok/s); generated {} tokens in {:.2} s ({:.1} tok/s); stop: {:?}",
        s.prompt_tokens,
        s.prefilled_tokens,
        s.prefill_time.as_secs_f64(),
        s.prefill_tok_s(),
        s.generated_tokens,
        s.decode_time.as_secs_f64(),
        s.decode_tok_s(),
        s.stop
    );
}

fn run(cli: Cli) -> longwave::Result<()> {
    match cli.cmd {
        Cmd::Generate { m, prompt, chat, max_tokens, s } => {
            let model = m.load()?;
            let mut session = m.session(&model)?;
            let ids = if chat {
                model.chat_prompt(&[ChatMessage::new("user", prompt)])?
            } else {
                model.tokenizer.encode(&prompt, true)?
            };
            let opts = GenerateOptions { sampling: s.params(), max_tokens, ..Default::default() };
            let mut out = std::io::stdout().lock();
            let (_, stats) = session.generate(&ids, &opts, |_, text| {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                true
            })?;
            let _ = writeln!(out);
            print_stats(&stats);
        }
        Cmd::Chat { m, max_tokens, system, s } => {
            let model = m.load()?;
            let mut session = m.session(&model)?;
            let mut messages = vec![];
            if let Some(sys) = system {
                messages.push(ChatMessage::new("system", sys));
            }
            let opts = GenerateOptions { sampling: s.params(), max_tokens, ..Default::default() };
            eprintln!("chat with {} (empty line or Ctrl-D to quit)", model.source.display());
            let stdin = std::io::stdin();
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                messages.push(ChatMessage::new("user", line.trim_end()));
                let mut out = std::io::stdout().lock();
                let (reply, stats) = session.chat(&messages, &opts, |t| {
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                    true
                })?;
                let _ = writeln!(out);
                print_stats(&stats);
                messages.push(ChatMessage::new("assistant", reply));
            }
        }
        Cmd::Ppl { m, file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| longwave::Error::Io { path: file.clone(), source: e })?;
            let model = m.load()?;
            let mut session = m.session(&model)?;
            let ids = model.tokenizer.encode(&text, true)?;
            let t = Instant::now();
            let p = session.perplexity(&ids)?;
            eprintln!(
                "{} tokens in {:.2} s; window {} tokens",
                ids.len(),
                t.elapsed().as_secs_f64(),
                session.max_ctx()
            );
            println!("perplexity: {:.4}", p.value());
            println!("tokens: {}", ids.len());
        }
        Cmd::Info { m, adapters_only } => {
            for (i, a) in longwave::gpu::list_adapters().iter().enumerate() {
                let info = a.get_info();
                println!(
                    "adapter {i}: {} ({:?}, {:?}, driver {} {})",
                    info.name, info.backend, info.device_type, info.driver, info.driver_info
                );
            }
            let gpu = Gpu::new(&m.gpu_options())?;
            println!("using: {}", gpu.describe());
            let c = &gpu.caps;
            println!(
                "features: shader-f16 {}, subgroups {} (size {}..{}), timestamps {}, matrix units (cooperative matrix f16 16x16x16) {}, 8-bit activations {}",
                c.f16, c.subgroups, c.subgroup_min, c.subgroup_max, c.timestamps, c.coop_matrix, c.q8_activations
            );
            println!(
                "limits: max storage binding {:.0} MiB, max buffer {:.0} MiB, workgroup storage {} KiB, invocations {}, storage buffers per stage {}",
                c.max_binding as f64 / 1048576.0,
                c.max_buffer as f64 / 1048576.0,
                c.max_workgroup_storage / 1024,
                c.max_invocations,
                c.max_storage_buffers_per_stage
            );
            if adapters_only {
                return Ok(());
            }
            let path = resolve_model(m.model.as_deref())?;
            let files = ModelFiles::open(&path)?;
            let cfg = &files.config;
            let file_bytes: u64 = files.tensors.values().map(|t| t.bytes().len() as u64).sum();
            let mut dtypes: Vec<&str> = files.tensors.values().map(|t| t.dtype.name()).collect();
            dtypes.sort();
            dtypes.dedup();
            println!("model: {} ({})", path.display(), cfg.arch);
            println!(
                "  layers {}, hidden {}, ffn {}, heads {} (kv {}), head dim {}, vocab {}, context {}, rope theta {}{}",
                cfg.num_layers,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.vocab_size,
                cfg.max_position_embeddings,
                cfg.rope_theta,
                if cfg.rope_scaling.is_some() { " (llama3 scaling)" } else { "" }
            );
            let ctx = m.ctx.unwrap_or(cfg.max_position_embeddings.min(8192));
            let kv = 2 * cfg.num_layers as u64 * cfg.num_kv_heads as u64 * cfg.head_dim as u64 * 2 * ctx as u64;
            println!(
                "  weights {:.1} MiB ({}); KV cache at {ctx} tokens {:.1} MiB (f16)",
                file_bytes as f64 / 1048576.0,
                dtypes.join(", "),
                kv as f64 / 1048576.0
            );
        }
        Cmd::Synth { shape, format, dtype, out, layers, seed, max_ctx } => {
            use longwave::model::{write_synth, SynthFormat, SynthShape, SynthSpec};
            let spec = SynthSpec { shape: SynthShape::parse(&shape)?, layers, seed, max_ctx };
            let format = SynthFormat::parse(&format, &dtype)?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("writing [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let t = Instant::now();
            write_synth(&spec, format, &out, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            eprintln!("wrote {} in {:.1} s", out.display(), t.elapsed().as_secs_f64());
        }
        Cmd::Convert { model, out } => {
            let path = resolve_model(model.as_deref())?;
            let files = ModelFiles::open(&path)?;
            longwave::model::convert::convert_to_hf(&files, &out)?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Bench {
            what: BenchCmd::Decode { m, contexts, decode_tokens, profile_steps, json, breakdown, marginal },
        } => {
            let model = m.load()?;
            let contexts = if contexts.is_empty() {
                let cap = m.ctx.unwrap_or(usize::MAX);
                DecodeBenchOptions::default_contexts(&model, cap, decode_tokens, profile_steps)
            } else {
                contexts
            };
            let opts = DecodeBenchOptions { contexts, decode_tokens, profile_steps, breakdown, marginal };
            if !json {
                println!(
                    "{:>8} {:>12} {:>12} {:>10} {:>10} {:>10}",
                    "context", "prefill t/s", "decode t/s", "ms/token", "host ms", "gpu ms"
                );
            }
            longwave::bench::decode::run(&model, &opts, &mut |r| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    let gpu = r.gpu_ms_per_token.map_or("-".to_string(), |g| format!("{g:.3}"));
                    println!(
                        "{:>8} {:>12.1} {:>12.1} {:>10.3} {:>10.3} {:>10}",
                        r.context, r.prefill_tok_s, r.decode_tok_s, r.ms_per_token, r.host_ms_per_token, gpu
                    );
                    let print_shares = |shares: &[longwave::bench::decode::KernelShare]| {
                        let total: f64 = shares.iter().map(|k| k.us).sum();
                        for k in shares {
                            println!(
                                "{:>12} {:>5} x {:>10.1} us {:>5.1}%",
                                k.kernel,
                                k.dispatches,
                                k.us,
                                100.0 * k.us / total.max(1e-9)
                            );
                        }
                    };
                    if let Some(b) = &r.breakdown {
                        println!("decode step:");
                        print_shares(b);
                    }
                    if let (Some(b), Some(n)) = (&r.prefill_breakdown, r.prefill_chunk) {
                        println!("prefill chunk of {n} tokens (layers):");
                        print_shares(b);
                    }
                    if let (Some(m), Some(step_ms)) = (&r.marginal, r.gpu_ms_per_token) {
                        println!("decode step without each kind (us saved, share of the {step_ms:.3} ms step):");
                        for k in m {
                            let pct = 100.0 * k.us / (step_ms * 1e3);
                            println!("{:>12} {:>5} x {:>10.1} us {:>5.1}%", k.kernel, k.dispatches, k.us, pct);
                        }
                    }
                }
            })?;
            if !json {
                println!("model {} on {}", model.source.display(), model.gpu.describe());
            }
        }
        Cmd::Bench {
            what: BenchCmd::Kernels { adapter, shapes, dtypes, filter, prefill_tokens, no_f16, no_subgroups, json },
        } => {
            let gpu = Gpu::new(&GpuOptions { adapter, no_f16, no_subgroups, ..Default::default() })?;
            let mut opts = KernelBenchOptions::for_adapter(&gpu);
            opts.prefill_tokens = prefill_tokens.max(1);
            if !shapes.is_empty() {
                opts.shapes = shapes.iter().map(|s| shape_by_name(s)).collect::<longwave::Result<_>>()?;
            }
            if !dtypes.is_empty() {
                opts.dtypes = dtypes
                    .iter()
                    .map(|d| {
                        DType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(d)).ok_or_else(|| {
                            longwave::Error::InvalidArgument(format!(
                                "unknown weight format {d:?}; known: f32, f16, bf16, q8_0, q4_0, q4_1"
                            ))
                        })
                    })
                    .collect::<longwave::Result<_>>()?;
            }
            opts.filter = filter;
            let timer = longwave::bench::GpuTimer::new(&gpu, 1);
            eprintln!("adapter: {} (caps {:?}); timing by {}", gpu.describe(), gpu.flags(), timer.source());
            if !json {
                println!("{}", Row::table_header());
            }
            let peaks = longwave::bench::kernels::run(&gpu, &opts, &mut |r| r.print(json))?;
            if !json {
                println!(
                    "copy bandwidth {:.1} GB/s, f32 fma peak {:.1} GFLOP/s on {}",
                    peaks.copy_gb_s,
                    peaks.fma_gflop_s,
                    gpu.describe()
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // lavapipe complains on stderr when this is unset; give it a private writable folder.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let d = std::env::temp_dir().join(format!("longwave-xdg-{}", std::process::id()));
        if std::fs::create_dir_all(&d).is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", &d);
        }
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
