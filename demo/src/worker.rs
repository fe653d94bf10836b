//! The model side of the demo: one thread owns the GPU, the model and the session. The UI sends
//! it [`Cmd`]s and reads [`Ev`]s back; it never waits on it. Stopping a generation goes through
//! the `AtomicBool` in [`longwave::GenerateOptions::stop`], which the UI sets directly.

use longwave::{ChatMessage, GenerateOptions, GenerateStats, Gpu, GpuOptions, Model, Session, SessionOptions};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

/// How the session keeps its KV cache. New policies add a variant here and an arm in each
/// method; the UI lists [`KvMode::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMode {
    /// Every key and value in f16 on the GPU.
    Dense,
}

impl KvMode {
    pub const ALL: &'static [KvMode] = &[KvMode::Dense];

    pub fn label(self) -> &'static str {
        match self {
            KvMode::Dense => "dense (f16, GPU)",
        }
    }

    // `..Default::default()` keeps this compiling as SessionOptions grows fields for new policies.
    #[allow(clippy::needless_update)]
    pub fn session_options(self, ctx: Option<usize>) -> SessionOptions {
        match self {
            KvMode::Dense => SessionOptions { max_ctx: ctx, ..Default::default() },
        }
    }

    /// Bytes of the KV cache per memory tier.
    pub fn tiers(self, session: &Session) -> KvTiers {
        match self {
            KvMode::Dense => KvTiers { gpu: session.kv_bytes(), host: 0 },
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvTiers {
    pub gpu: u64,
    pub host: u64,
}

/// What a session is made with; changing it starts a new session (and a new chat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    pub kv: KvMode,
    /// Context length; `None` is the model's (at most 8192).
    pub ctx: Option<usize>,
}

pub enum Cmd {
    /// Load a model (dropping the current one) and open a session on it.
    Load { path: PathBuf, session: SessionConfig },
    /// Replace the session (the model stays).
    NewSession(SessionConfig),
    /// Forget the conversation in the cache.
    Reset,
    /// Generate the assistant's reply to `messages`.
    Chat { messages: Vec<ChatMessage>, opts: GenerateOptions },
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub weight_bytes: u64,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub max_positions: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionInfo {
    pub config: SessionConfig,
    pub context_len: usize,
    pub max_ctx: usize,
    pub kv: KvTiers,
}

pub enum Ev {
    /// What a load is doing now (opening, uploading, compiling, ...).
    Phase(String),
    /// The adapter the model computes on (once the GPU is open).
    Adapter(String),
    /// Bytes of weights uploaded.
    Progress {
        done: u64,
        total: u64,
    },
    Loaded(ModelInfo),
    SessionReady(SessionInfo),
    /// A chat turn started; its prompt has this many tokens.
    Prefill {
        prompt_tokens: usize,
    },
    /// Text of one generated token (may be empty while a character is incomplete).
    Token(String),
    Done {
        reply: String,
        stats: GenerateStats,
        session: SessionInfo,
    },
    /// Anything that failed; the worker stays usable.
    Error(String),
    /// The default-model fetch finished.
    Fetched(Result<PathBuf, String>),
}

/// Sends events to the UI and wakes it up.
#[derive(Clone)]
pub struct EventSink {
    tx: Sender<Ev>,
    ctx: eframe::egui::Context,
}

impl EventSink {
    pub fn new(tx: Sender<Ev>, ctx: eframe::egui::Context) -> Self {
        EventSink { tx, ctx }
    }
    pub fn send(&self, ev: Ev) {
        // A closed channel means the window is gone; nothing left to tell.
        let _ = self.tx.send(ev);
        self.ctx.request_repaint();
    }
    /// For frequent events (tokens): at most about 30 repaints a second.
    pub fn send_soon(&self, ev: Ev) {
        let _ = self.tx.send(ev);
        self.ctx.request_repaint_after(std::time::Duration::from_millis(33));
    }
}

struct Worker {
    sink: EventSink,
    gpu: Option<Arc<Gpu>>,
    model: Option<Arc<Model>>,
    session: Option<Session>,
    config: SessionConfig,
}

/// Starts the model thread.
pub fn spawn(rx: Receiver<Cmd>, sink: EventSink) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("longwave-model".into()).spawn(move || {
        let mut w = Worker {
            sink,
            gpu: None,
            model: None,
            session: None,
            config: SessionConfig { kv: KvMode::Dense, ctx: None },
        };
        while let Ok(cmd) = rx.recv() {
            // A panic in the model code becomes a message in the window, not a dead app.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| w.handle(cmd)));
            let err = match result {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    // The state may be half-updated: start over from a clean slate.
                    w.session = None;
                    w.model = None;
                    format!("internal error (panic): {msg}. Load the model again.")
                }
            };
            w.sink.send(Ev::Error(err));
        }
    })
}

impl Worker {
    fn handle(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Load { path, session } => self.load(&path, session),
            Cmd::NewSession(config) => self.new_session(config),
            Cmd::Reset => {
                if let Some(s) = self.session.as_mut() {
                    s.reset();
                    let info = self.session_info();
                    self.sink.send(Ev::SessionReady(info));
                }
                Ok(())
            }
            Cmd::Chat { messages, opts } => self.chat(&messages, &opts),
        }
    }

    fn load(&mut self, path: &Path, config: SessionConfig) -> Result<(), String> {
        // Free the old model's GPU memory before uploading the new one.
        self.session = None;
        self.model = None;
        let gpu = match &self.gpu {
            Some(g) => g.clone(),
            None => {
                self.sink.send(Ev::Phase("opening the GPU".into()));
                let g = Gpu::new(&GpuOptions::default()).map_err(|e| e.to_string())?;
                self.sink.send(Ev::Adapter(g.describe()));
                self.gpu = Some(g.clone());
                g
            }
        };
        if !path.exists() {
            return Err(format!("{} does not exist", path.display()));
        }
        self.sink.send(Ev::Phase(format!("loading {}", file_name(path))));
        let mut last_pct = u64::MAX;
        let sink = self.sink.clone();
        let mut progress = |done: u64, total: u64| {
            let pct = done * 100 / total.max(1);
            if pct != last_pct {
                last_pct = pct;
                sink.send(Ev::Progress { done, total });
                if done >= total {
                    sink.send(Ev::Phase("compiling kernels".into()));
                }
            }
        };
        let model = Model::load_on(gpu, path, &mut progress).map_err(|e| e.to_string())?;
        let c = &model.config;
        self.sink.send(Ev::Loaded(ModelInfo {
            path: model.source.clone(),
            weight_bytes: model.weight_bytes(),
            layers: c.num_layers,
            hidden: c.hidden_size,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
        }));
        self.model = Some(model);
        self.new_session(config)
    }

    fn new_session(&mut self, config: SessionConfig) -> Result<(), String> {
        let model = self.model.clone().ok_or("no model is loaded")?;
        self.session = None;
        self.sink.send(Ev::Phase(format!("creating a session ({})", config.kv.label())));
        let session = Session::new(&model, &config.kv.session_options(config.ctx)).map_err(|e| e.to_string())?;
        self.session = Some(session);
        self.config = config;
        let info = self.session_info();
        self.sink.send(Ev::SessionReady(info));
        Ok(())
    }

    fn session_info(&self) -> SessionInfo {
        match &self.session {
            Some(s) => SessionInfo {
                config: self.config,
                context_len: s.context_len(),
                max_ctx: s.max_ctx(),
                kv: self.config.kv.tiers(s),
            },
            None => SessionInfo { config: self.config, context_len: 0, max_ctx: 0, kv: KvTiers::default() },
        }
    }

    fn chat(&mut self, messages: &[ChatMessage], opts: &GenerateOptions) -> Result<(), String> {
        let session = self.session.as_mut().ok_or("no model is loaded")?;
        let prompt_tokens = session.model().chat_prompt(messages).map_err(|e| e.to_string())?.len();
        self.sink.send(Ev::Prefill { prompt_tokens });
        let sink = self.sink.clone();
        let (reply, stats) = session
            .chat(messages, opts, |text| {
                sink.send_soon(Ev::Token(text.to_string()));
                true
            })
            .map_err(|e| e.to_string())?;
        let info = self.session_info();
        self.sink.send(Ev::Done { reply, stats, session: info });
        Ok(())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Runs `models/fetch_default.sh` (compiled in, as the CLI does) into the default model's
/// directory on a thread of its own; reports [`Ev::Fetched`].
pub fn fetch_default(sink: EventSink) {
    let target = longwave::model::default_model_path();
    let report = sink.clone();
    let spawned = std::thread::Builder::new().name("fetch-default-model".into()).spawn(move || {
        let dir = target.parent().unwrap_or(Path::new(".")).to_path_buf();
        let script = include_str!("../../models/fetch_default.sh");
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("fetch_default.sh")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .output();
        let result = match out {
            Err(e) => Err(format!("could not run bash: {e}")),
            Ok(o) if o.status.success() && target.is_file() => Ok(target),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let tail: Vec<&str> = err.lines().rev().take(4).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!("fetching the default model into {} failed: {}", dir.display(), tail.join(" / ")))
            }
        };
        sink.send(Ev::Fetched(result));
    });
    if let Err(e) = spawned {
        report.send(Ev::Fetched(Err(format!("could not start the fetch thread: {e}"))));
    }
}
