//! longwave-demo: a desktop chat window (eframe/egui, drawn with wgpu) over longwave.
//!
//! `cargo run --release -p longwave-demo` opens it with the default model. For tests,
//! `--prompt TEXT --screenshot FILE --exit-after` drives one chat turn, prints the reply to
//! stdout, saves a screenshot of the window and closes it.

mod app;
mod worker;

use clap::Parser;
use eframe::egui;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "longwave-demo", version, about = "Desktop chat demo for longwave")]
struct Args {
    /// GGUF file or Hugging Face directory (default: the default model, fetched if missing in
    /// scripted runs; the window offers a button otherwise).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context length (default: the model's, at most 8192).
    #[arg(long)]
    ctx: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Scripted: send this message as soon as the model is ready.
    #[arg(long)]
    prompt: Option<String>,
    /// Scripted: save a PNG of the window once the reply is complete.
    #[arg(long)]
    screenshot: Option<PathBuf>,
    /// Scripted: close the window when done (exit status 1 if anything failed).
    #[arg(long)]
    exit_after: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let scripted = args.prompt.is_some() || args.screenshot.is_some() || args.exit_after;
    let failed = Arc::new(AtomicBool::new(false));
    let script = scripted
        .then(|| app::Script::new(args.prompt.clone(), args.screenshot.clone(), args.exit_after, failed.clone()));
    let settings = app::Settings {
        model: args.model.clone().unwrap_or_else(longwave::model::default_model_path),
        ctx: args.ctx,
        max_tokens: args.max_tokens,
        script,
    };
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("longwave demo")
        .with_inner_size([1100.0, 750.0])
        .with_app_id("longwave-demo");
    viewport = if scripted {
        // A fixed size, so screenshots are comparable.
        viewport.with_resizable(false)
    } else {
        viewport.with_min_inner_size([760.0, 480.0])
    };
    let options = eframe::NativeOptions { viewport, ..Default::default() };
    let run = eframe::run_native(
        "longwave-demo",
        options,
        Box::new(move |cc| {
            // The same look on every system (and in the screenshot).
            cc.egui_ctx.set_theme(egui::Theme::Dark);
            Ok(Box::new(app::DemoApp::new(cc, settings)))
        }),
    );
    if let Err(e) = run {
        eprintln!(
            "longwave-demo: could not open the window: {e}. It needs a display (X11 or Wayland on \
             Linux) and a GPU adapter wgpu can draw with (on Linux without a GPU: mesa-vulkan-drivers)."
        );
        return ExitCode::FAILURE;
    }
    if failed.load(Ordering::Relaxed) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
