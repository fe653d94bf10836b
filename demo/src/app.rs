//! The window: model picker on top, chat in the middle, session, sampling and live statistics
//! on the right. All model work happens on the worker thread (see `worker.rs`).

use crate::worker::{self, Cmd, Ev, EventSink, KvMode, ModelInfo, SessionConfig, SessionInfo};
use eframe::egui::{self, Color32, Key, KeyboardShortcut, Modifiers, RichText};
use longwave::{ChatMessage, GenerateOptions, GenerateStats, SamplingParams, StopReason};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Start-up settings (from the command line).
pub struct Settings {
    pub model: PathBuf,
    pub ctx: Option<usize>,
    pub max_tokens: usize,
    pub script: Option<Script>,
}

/// Scripted run for tests: send `prompt` once the model is ready, wait for the reply, print it,
/// save a screenshot, close.
pub struct Script {
    pub prompt: Option<String>,
    pub screenshot: Option<PathBuf>,
    pub exit_after: bool,
    /// Set when anything failed; `main` turns it into the exit status.
    pub failed: Arc<AtomicBool>,
    step: Step,
    shot: Arc<Mutex<Option<Arc<egui::ColorImage>>>>,
}

impl Script {
    pub fn new(prompt: Option<String>, screenshot: Option<PathBuf>, exit_after: bool, failed: Arc<AtomicBool>) -> Self {
        Script { prompt, screenshot, exit_after, failed, step: Step::WaitModel, shot: Default::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    WaitModel,
    WaitReply,
    /// Frames to draw before the screenshot, so the layout has settled.
    Settle(u32),
    WaitShot,
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Idle,
    Loading,
    Generating,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    User,
    Assistant,
}

struct Turn {
    role: Role,
    text: String,
    /// Why the reply ended, when it is worth saying, and its rates.
    note: Option<String>,
}

/// The turn being generated.
struct Live {
    prompt_tokens: usize,
    tokens: usize,
    started: Instant,
    first_token: Option<Instant>,
    text: String,
}

pub struct DemoApp {
    cmd: Sender<Cmd>,
    events: Receiver<Ev>,
    sink: EventSink,

    model_path: String,
    busy: Busy,
    fetching: bool,
    phase: String,
    progress: Option<(u64, u64)>,
    model: Option<ModelInfo>,
    session: Option<SessionInfo>,
    /// What the session panel shows; applied with "Apply".
    wanted: SessionConfig,
    ctx_field: usize,

    sampling: SamplingParams,
    max_tokens: usize,

    turns: Vec<Turn>,
    live: Option<Live>,
    input: String,
    stop: Arc<AtomicBool>,
    last: Option<GenerateStats>,
    error: Option<String>,
    /// The adapter the model computes on, and the one the window is drawn with.
    adapter: Option<String>,
    renderer: Option<String>,
    script: Option<Script>,
}

const USER_FILL: Color32 = Color32::from_rgb(38, 58, 92);
const ASSISTANT_FILL: Color32 = Color32::from_rgb(44, 44, 48);
const ERROR_FILL: Color32 = Color32::from_rgb(96, 32, 32);

impl DemoApp {
    pub fn new(cc: &eframe::CreationContext<'_>, settings: Settings) -> Self {
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (ev_tx, ev_rx) = std::sync::mpsc::channel();
        let sink = EventSink::new(ev_tx, cc.egui_ctx.clone());
        let mut error = None;
        if let Err(e) = worker::spawn(cmd_rx, sink.clone()) {
            error = Some(format!("could not start the model thread: {e}"));
        }
        let wanted = SessionConfig { kv: KvMode::Dense, ctx: settings.ctx };
        let mut app = DemoApp {
            cmd: cmd_tx,
            events: ev_rx,
            sink,
            model_path: settings.model.display().to_string(),
            busy: Busy::Idle,
            fetching: false,
            phase: String::new(),
            progress: None,
            model: None,
            session: None,
            wanted,
            ctx_field: settings.ctx.unwrap_or(0),
            sampling: SamplingParams::default(),
            max_tokens: settings.max_tokens,
            turns: vec![],
            live: None,
            input: String::new(),
            stop: Arc::new(AtomicBool::new(false)),
            last: None,
            error,
            adapter: None,
            renderer: None,
            script: settings.script,
        };
        let is_default = settings.model == longwave::model::default_model_path();
        if settings.model.exists() || !is_default {
            // A path given by hand that is missing fails here, in the window.
            app.load();
        } else if app.script.is_some() {
            app.fetch();
        } else {
            app.phase = "the default model is not downloaded yet: press \"Fetch default model\"".into();
        }
        app
    }

    fn send(&mut self, cmd: Cmd) {
        if self.cmd.send(cmd).is_err() {
            self.error = Some("the model thread has stopped; restart the demo".into());
            self.busy = Busy::Idle;
        }
    }

    fn load(&mut self) {
        let path = PathBuf::from(self.model_path.trim());
        self.busy = Busy::Loading;
        self.model = None;
        self.session = None;
        self.progress = None;
        self.error = None;
        self.turns.clear();
        self.last = None;
        self.phase = "starting".into();
        let session = self.wanted;
        self.send(Cmd::Load { path, session });
    }

    fn fetch(&mut self) {
        self.fetching = true;
        self.error = None;
        self.phase = "fetching the default model (about 93 MB)".into();
        worker::fetch_default(self.sink.clone());
    }

    fn ready(&self) -> bool {
        self.busy == Busy::Idle && self.session.is_some_and(|s| s.max_ctx > 0)
    }

    fn send_message(&mut self) {
        let text = self.input.trim().to_string();
        if text.is_empty() || !self.ready() {
            return;
        }
        self.input.clear();
        self.error = None;
        self.turns.push(Turn { role: Role::User, text, note: None });
        let messages = self
            .turns
            .iter()
            .map(|t| ChatMessage::new(if t.role == Role::User { "user" } else { "assistant" }, t.text.clone()))
            .collect();
        self.stop = Arc::new(AtomicBool::new(false));
        let opts = GenerateOptions {
            sampling: self.sampling,
            max_tokens: self.max_tokens,
            stop: Some(self.stop.clone()),
            ..Default::default()
        };
        self.busy = Busy::Generating;
        self.live =
            Some(Live { prompt_tokens: 0, tokens: 0, started: Instant::now(), first_token: None, text: String::new() });
        self.send(Cmd::Chat { messages, opts });
    }

    fn new_chat(&mut self) {
        self.turns.clear();
        self.error = None;
        self.last = None;
        self.send(Cmd::Reset);
    }

    fn apply_session(&mut self) {
        self.wanted.ctx = (self.ctx_field > 0).then_some(self.ctx_field);
        self.turns.clear();
        self.error = None;
        self.last = None;
        self.busy = Busy::Loading;
        self.progress = None;
        let config = self.wanted;
        self.send(Cmd::NewSession(config));
    }

    fn fail(&mut self, msg: String) {
        if self.script.is_some() {
            eprintln!("longwave-demo: {msg}");
        }
        if let Some(s) = &self.script {
            s.failed.store(true, Ordering::Relaxed);
        }
        self.error = Some(msg);
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                Ev::Phase(p) => self.phase = p,
                Ev::Adapter(a) => self.adapter = Some(a),
                Ev::Progress { done, total } => self.progress = Some((done, total)),
                Ev::Loaded(info) => {
                    self.model_path = info.path.display().to_string();
                    self.model = Some(info);
                }
                Ev::SessionReady(info) => {
                    self.wanted.kv = info.config.kv;
                    self.session = Some(info);
                    if self.busy == Busy::Loading {
                        self.busy = Busy::Idle;
                        self.phase = "ready".into();
                    }
                }
                Ev::Prefill { prompt_tokens } => {
                    if let Some(l) = self.live.as_mut() {
                        l.prompt_tokens = prompt_tokens;
                    }
                }
                Ev::Token(t) => {
                    if let Some(l) = self.live.as_mut() {
                        l.first_token.get_or_insert_with(Instant::now);
                        l.tokens += 1;
                        l.text.push_str(&t);
                    }
                }
                Ev::Done { reply, stats, session } => {
                    let why = match stats.stop {
                        StopReason::Eos => "",
                        StopReason::MaxTokens => "stopped at the token limit · ",
                        StopReason::ContextFull => "the context is full: start a new chat · ",
                        StopReason::Cancelled => "stopped · ",
                    };
                    let note = Some(format!(
                        "{why}{} · prefill {:.1} tok/s · decode {:.1} tok/s",
                        tokens(stats.generated_tokens),
                        stats.prefill_tok_s(),
                        stats.decode_tok_s()
                    ));
                    self.turns.push(Turn { role: Role::Assistant, text: reply, note });
                    self.last = Some(stats);
                    self.session = Some(session);
                    self.live = None;
                    self.busy = Busy::Idle;
                }
                Ev::Error(e) => {
                    if self.busy == Busy::Generating {
                        // The turn did not happen: give the message back to the input box.
                        if let Some(t) = self.turns.pop() {
                            if self.input.is_empty() {
                                self.input = t.text;
                            }
                        }
                        self.live = None;
                    }
                    if self.busy == Busy::Loading {
                        self.phase = "loading failed".into();
                        self.progress = None;
                    }
                    self.busy = Busy::Idle;
                    self.fail(e);
                }
                Ev::Fetched(r) => {
                    self.fetching = false;
                    match r {
                        Ok(p) => {
                            self.model_path = p.display().to_string();
                            self.load();
                        }
                        Err(e) => {
                            self.phase = "fetch failed".into();
                            self.fail(e);
                        }
                    }
                }
            }
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        egui::Panel::top("model").show(ui, |ui| {
            ui.add_space(4.0);
            ui.horizontal(|ui| {
                ui.label(RichText::new("Model").strong());
                let default = longwave::model::default_model_path();
                let show_fetch = !default.is_file();
                let buttons = if show_fetch { 230.0 } else { 70.0 };
                let idle = self.busy == Busy::Idle && !self.fetching;
                let edit = egui::TextEdit::singleline(&mut self.model_path)
                    .desired_width((ui.available_width() - buttons).max(100.0))
                    .hint_text("GGUF file or Hugging Face directory");
                let resp = ui.add_enabled(idle, edit);
                let enter = resp.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                if ui.add_enabled(idle, egui::Button::new("Load")).clicked() || (enter && idle) {
                    self.load();
                }
                if show_fetch && ui.add_enabled(idle, egui::Button::new("Fetch default model")).clicked() {
                    self.fetch();
                }
            });
            ui.horizontal(|ui| match (self.busy, self.fetching) {
                (Busy::Loading, _) => {
                    let (frac, text) = match self.progress {
                        Some((d, t)) if d < t => {
                            (d as f32 / t.max(1) as f32, format!("{}: {} / {}", self.phase, mib(d), mib(t)))
                        }
                        _ => (1.0, format!("{} ...", self.phase)),
                    };
                    ui.add(egui::ProgressBar::new(frac).text(text));
                }
                (_, true) => {
                    ui.spinner();
                    ui.label(&self.phase);
                }
                _ => match &self.model {
                    Some(m) => {
                        ui.label(RichText::new("Ready").color(Color32::LIGHT_GREEN));
                        ui.label(format!(
                            "{}  ·  {} layers, hidden {}, vocab {}  ·  weights {} on the GPU",
                            m.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                            m.layers,
                            m.hidden,
                            m.vocab,
                            mib(m.weight_bytes)
                        ));
                    }
                    None => {
                        ui.label(RichText::new("No model loaded").color(Color32::LIGHT_RED));
                        ui.label(&self.phase);
                    }
                },
            });
            ui.add_space(2.0);
        });
    }

    fn side_panel(&mut self, ui: &mut egui::Ui) {
        egui::Panel::right("settings").resizable(false).exact_size(330.0).show(ui, |ui| {
            egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| {
                ui.add_space(6.0);
                self.session_settings(ui);
                ui.separator();
                self.sampling_settings(ui);
                ui.separator();
                self.stats(ui);
            });
        });
    }

    fn session_settings(&mut self, ui: &mut egui::Ui) {
        ui.heading("Session");
        let idle = self.busy == Busy::Idle;
        egui::Grid::new("session").num_columns(2).spacing([12.0, 6.0]).show(ui, |ui| {
            ui.label("KV cache");
            ui.add_enabled_ui(idle, |ui| {
                egui::ComboBox::from_id_salt("kv-mode").width(170.0).selected_text(self.wanted.kv.label()).show_ui(
                    ui,
                    |ui| {
                        for &m in KvMode::ALL {
                            ui.selectable_value(&mut self.wanted.kv, m, m.label());
                        }
                    },
                );
            });
            ui.end_row();
            ui.label("Context");
            let max = self.model.as_ref().map_or(1 << 20, |m| m.max_positions);
            ui.add_enabled(
                idle,
                egui::DragValue::new(&mut self.ctx_field).range(0..=max).speed(64).custom_formatter(|v, _| {
                    if v == 0.0 {
                        "model's (≤ 8192)".into()
                    } else {
                        format!("{v}")
                    }
                }),
            );
            ui.end_row();
        });
        let wanted = SessionConfig { kv: self.wanted.kv, ctx: (self.ctx_field > 0).then_some(self.ctx_field) };
        let current = self.session.map(|s| s.config);
        if self.model.is_some() && current.is_some_and(|c| c != wanted) {
            ui.horizontal(|ui| {
                if ui.add_enabled(idle, egui::Button::new("Apply")).clicked() {
                    self.apply_session();
                }
                ui.label(RichText::new("starts a new chat").weak());
            });
        }
    }

    fn sampling_settings(&mut self, ui: &mut egui::Ui) {
        ui.heading("Sampling");
        let s = &mut self.sampling;
        egui::Grid::new("sampling").num_columns(2).spacing([12.0, 6.0]).show(ui, |ui| {
            ui.label("Temperature");
            ui.add(egui::Slider::new(&mut s.temperature, 0.0..=2.0).step_by(0.05))
                .on_hover_text("0 is greedy: always the most likely token");
            ui.end_row();
            ui.label("Top-k");
            ui.add(egui::DragValue::new(&mut s.top_k).range(0..=1000).speed(1)).on_hover_text("0 turns top-k off");
            ui.end_row();
            ui.label("Top-p");
            ui.add(egui::Slider::new(&mut s.top_p, 0.05..=1.0).step_by(0.01)).on_hover_text("1 turns top-p off");
            ui.end_row();
            ui.label("Repetition penalty");
            ui.add(egui::Slider::new(&mut s.repetition_penalty, 1.0..=2.0).step_by(0.01))
                .on_hover_text("1 turns the penalty off");
            ui.end_row();
            ui.label("Seed");
            ui.add(egui::DragValue::new(&mut s.seed).speed(1));
            ui.end_row();
            ui.label("Max tokens");
            ui.add(egui::DragValue::new(&mut self.max_tokens).range(1..=8192).speed(4));
            ui.end_row();
        });
    }

    fn stats(&mut self, ui: &mut egui::Ui) {
        ui.heading("Statistics");
        let (prefill, decode, live_ctx) = match &self.live {
            Some(l) => {
                let decode = match l.first_token {
                    Some(t) if l.tokens > 1 => {
                        format!("{:.1} tok/s (live)", (l.tokens - 1) as f64 / t.elapsed().as_secs_f64().max(1e-6))
                    }
                    Some(_) => "…".into(),
                    None => {
                        format!("prefilling {} tokens ({:.1} s)", l.prompt_tokens, l.started.elapsed().as_secs_f32())
                    }
                };
                let prefill = match l.first_token {
                    Some(t) => format!("done in {:.2} s", (t - l.started).as_secs_f64()),
                    None => "…".into(),
                };
                (prefill, decode, Some(l.prompt_tokens + l.tokens.saturating_sub(1)))
            }
            None => match &self.last {
                Some(s) => (
                    format!("{:.1} tok/s ({} of {} tokens)", s.prefill_tok_s(), s.prefilled_tokens, s.prompt_tokens),
                    format!("{:.1} tok/s ({})", s.decode_tok_s(), tokens(s.generated_tokens)),
                    None,
                ),
                None => ("–".into(), "–".into(), None),
            },
        };
        egui::Grid::new("stats").num_columns(2).spacing([12.0, 6.0]).striped(true).show(ui, |ui| {
            ui.label("Compute adapter");
            ui.add(egui::Label::new(self.adapter.clone().unwrap_or_else(|| "–".into())).wrap());
            ui.end_row();
            ui.label("UI adapter");
            ui.add(egui::Label::new(self.renderer.clone().unwrap_or_else(|| "–".into())).wrap());
            ui.end_row();
            ui.label("Prefill");
            ui.label(prefill);
            ui.end_row();
            ui.label("Decode");
            ui.label(decode);
            ui.end_row();
            if let Some(s) = &self.last {
                if self.live.is_none() {
                    ui.label("Ended by");
                    ui.label(match s.stop {
                        StopReason::Eos => "end of sequence",
                        StopReason::MaxTokens => "token limit",
                        StopReason::ContextFull => "full context",
                        StopReason::Cancelled => "Stop button",
                    });
                    ui.end_row();
                }
            }
            ui.label("Context");
            match self.session {
                Some(s) if s.max_ctx > 0 => {
                    let used = live_ctx.unwrap_or(s.context_len).min(s.max_ctx);
                    let bar = egui::ProgressBar::new(used as f32 / s.max_ctx as f32)
                        .text(format!("{used} / {} tokens", s.max_ctx))
                        .desired_width(170.0);
                    ui.add(bar);
                }
                _ => {
                    ui.label("–");
                }
            }
            ui.end_row();
            let kv = self.session.map(|s| s.kv);
            ui.label("KV memory, GPU");
            ui.label(kv.map_or("–".into(), |k| mib(k.gpu)));
            ui.end_row();
            ui.label("KV memory, host");
            ui.label(kv.map_or("–".into(), |k| mib(k.host)));
            ui.end_row();
            ui.label("KV mode");
            ui.label(self.session.map_or("–", |s| s.config.kv.label()));
            ui.end_row();
        });
    }

    fn input_panel(&mut self, ui: &mut egui::Ui) {
        egui::Panel::bottom("input").show(ui, |ui| {
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                let generating = self.busy == Busy::Generating;
                let edit = egui::TextEdit::multiline(&mut self.input)
                    .desired_rows(2)
                    .desired_width((ui.available_width() - 100.0).max(100.0))
                    .hint_text("Message (Enter sends, Shift+Enter starts a new line)")
                    .return_key(KeyboardShortcut::new(Modifiers::SHIFT, Key::Enter));
                let resp = ui.add(edit);
                let enter = resp.has_focus() && ui.input(|i| i.key_pressed(Key::Enter) && !i.modifiers.shift);
                ui.vertical(|ui| {
                    let wide = [90.0, 0.0];
                    if generating {
                        let stop = egui::Button::new(RichText::new("Stop").color(Color32::WHITE)).fill(ERROR_FILL);
                        if ui.add_sized(wide, stop).clicked() {
                            self.stop.store(true, Ordering::Relaxed);
                        }
                    } else if ui
                        .add_enabled_ui(self.ready(), |ui| ui.add_sized(wide, egui::Button::new("Send")))
                        .inner
                        .clicked()
                        || enter
                    {
                        self.send_message();
                    }
                    let idle = self.busy == Busy::Idle && self.session.is_some();
                    if ui.add_enabled_ui(idle, |ui| ui.add_sized(wide, egui::Button::new("New chat"))).inner.clicked() {
                        self.new_chat();
                    }
                });
            });
            ui.add_space(4.0);
        });
    }

    fn chat_panel(&mut self, ui: &mut egui::Ui) {
        egui::CentralPanel::default().show(ui, |ui| {
            if let Some(e) = self.error.clone() {
                egui::Frame::new().fill(ERROR_FILL).inner_margin(8.0).corner_radius(6.0).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.horizontal(|ui| {
                        ui.label(RichText::new("Error").strong().color(Color32::WHITE));
                        if ui.small_button("Dismiss").clicked() {
                            self.error = None;
                        }
                    });
                    ui.add(egui::Label::new(RichText::new(e).color(Color32::WHITE)).wrap());
                });
                ui.add_space(6.0);
            }
            egui::ScrollArea::vertical().auto_shrink(false).stick_to_bottom(true).show(ui, |ui| {
                if self.turns.is_empty() && self.live.is_none() {
                    ui.add_space(20.0);
                    ui.vertical_centered(|ui| {
                        ui.label(RichText::new("Type a message below to chat with the model.").weak());
                    });
                }
                for t in &self.turns {
                    bubble(ui, t.role, &t.text, t.note.as_deref(), false);
                }
                if let Some(l) = &self.live {
                    bubble(ui, Role::Assistant, &l.text, None, true);
                }
            });
        });
    }

    /// Advances the scripted run by one frame.
    fn step_script(&mut self, ctx: &egui::Context) {
        let Some(step) = self.script.as_ref().map(|s| s.step) else { return };
        let next = match step {
            Step::WaitModel if self.ready() => match self.script.as_ref().and_then(|s| s.prompt.clone()) {
                Some(p) => {
                    self.input = p;
                    self.send_message();
                    Step::WaitReply
                }
                None => Step::Settle(3),
            },
            Step::WaitModel if self.busy == Busy::Idle && !self.fetching && self.error.is_some() => Step::Settle(3),
            Step::WaitReply if self.busy == Busy::Idle => {
                match self.turns.last() {
                    Some(t) if t.role == Role::Assistant => {
                        println!("{}", t.text);
                        if t.text.trim().is_empty() {
                            self.fail("the reply is empty".into());
                        }
                    }
                    _ => self.fail("no reply".into()),
                }
                if let Some(s) = &self.last {
                    eprintln!(
                        "prefill {:.1} tok/s, decode {:.1} tok/s, {} tokens, stop {:?}",
                        s.prefill_tok_s(),
                        s.decode_tok_s(),
                        s.generated_tokens,
                        s.stop
                    );
                }
                Step::Settle(3)
            }
            Step::Settle(0) => {
                let script = self.script.as_ref().expect("script");
                if script.screenshot.is_some() {
                    let slot = script.shot.clone();
                    let ctx2 = ctx.clone();
                    ctx.request_screenshot(move |img| {
                        if let Ok(mut s) = slot.lock() {
                            *s = Some(img);
                        }
                        ctx2.request_repaint();
                    });
                    Step::WaitShot
                } else {
                    Step::Finished
                }
            }
            Step::Settle(n) => Step::Settle(n - 1),
            Step::WaitShot => {
                let script = self.script.as_ref().expect("script");
                let img = script.shot.lock().ok().and_then(|mut s| s.take());
                match (img, &script.screenshot) {
                    (Some(img), Some(path)) => {
                        let path = path.clone();
                        match save_png(&img, &path) {
                            Ok(()) => eprintln!("screenshot: {} ({}x{})", path.display(), img.size[0], img.size[1]),
                            Err(e) => self.fail(format!("could not write {}: {e}", path.display())),
                        }
                        Step::Finished
                    }
                    _ => Step::WaitShot,
                }
            }
            s => s,
        };
        let script = self.script.as_mut().expect("script");
        script.step = next;
        if next == Step::Finished {
            if script.exit_after {
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
            // Don't close twice.
            script.exit_after = false;
        } else if next != step {
            ctx.request_repaint();
        } else if matches!(next, Step::WaitShot) {
            ctx.request_repaint_after(std::time::Duration::from_millis(50));
        }
    }
}

impl eframe::App for DemoApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        self.drain_events();
        if self.renderer.is_none() {
            self.renderer = frame.wgpu_render_state().map(|rs| {
                let i = rs.adapter.get_info();
                format!("{} ({:?})", i.name, i.backend)
            });
        }
        self.top_bar(ui);
        self.side_panel(ui);
        self.input_panel(ui);
        self.chat_panel(ui);
        if self.busy == Busy::Generating {
            // Keep the live rate ticking during a long prefill.
            ui.ctx().request_repaint_after(std::time::Duration::from_millis(250));
        }
        let ctx = ui.ctx().clone();
        self.step_script(&ctx);
    }
}

fn bubble(ui: &mut egui::Ui, role: Role, text: &str, note: Option<&str>, streaming: bool) {
    let (who, fill) = match role {
        Role::User => ("You", USER_FILL),
        Role::Assistant => ("Assistant", ASSISTANT_FILL),
    };
    egui::Frame::new().fill(fill).inner_margin(10.0).corner_radius(8.0).show(ui, |ui| {
        ui.set_width(ui.available_width());
        ui.horizontal(|ui| {
            ui.label(RichText::new(who).strong().color(Color32::from_rgb(170, 200, 255)));
            // Text rather than a spinner: a spinner repaints every frame, and on a software
            // renderer that takes CPU time from the model.
            if streaming {
                ui.label(RichText::new(if text.is_empty() { "reading the prompt …" } else { "writing …" }).weak());
            }
        });
        if !text.is_empty() {
            ui.add(egui::Label::new(RichText::new(text).color(Color32::from_gray(235)).size(15.0)).wrap());
        }
        if let Some(n) = note {
            ui.add_space(2.0);
            ui.label(RichText::new(n).size(12.0).weak());
        }
    });
    ui.add_space(8.0);
}

fn tokens(n: usize) -> String {
    if n == 1 {
        "1 token".into()
    } else {
        format!("{n} tokens")
    }
}

fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "0 B".into()
    } else if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / 1048576.0)
    }
}

fn save_png(img: &egui::ColorImage, path: &std::path::Path) -> Result<(), String> {
    let [w, h] = img.size;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for p in &img.pixels {
        let [r, g, b, _] = p.to_srgba_unmultiplied();
        rgb.extend_from_slice(&[r, g, b]);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}
