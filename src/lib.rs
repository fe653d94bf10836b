//! longwave: a LLaMA-family decoder running as WGSL compute shaders on any GPU wgpu reaches.
//!
//! Load a model (GGUF file or Hugging Face directory), open a session, stream a reply:
//!
//! ```
//! use longwave::{GenerateOptions, GpuOptions, Model, SamplingParams, Session, SessionOptions};
//! let path = longwave::model::default_model_path(); // models/fetch_default.sh puts it there
//! let model = Model::load(&path, &GpuOptions::default())?;
//! let mut session = Session::new(&model, &SessionOptions::default())?;
//! let messages = longwave::user_message("What is the capital of France?");
//! let opts = GenerateOptions {
//!     sampling: SamplingParams { temperature: 0.0, ..Default::default() }, // greedy
//!     max_tokens: 16,
//!     ..Default::default()
//! };
//! let (reply, stats) = session.chat(&messages, &opts, |text| {
//!     print!("{text}"); // streamed as it is generated
//!     true // false stops
//! })?;
//! assert!(reply.contains("Paris"));
//! println!("\n{:.1} tok/s on {}", stats.decode_tok_s(), model.gpu.describe());
//! # Ok::<(), longwave::Error>(())
//! ```
//!
//! Errors are [`Error`] values; nothing panics on user input. An app that already owns a wgpu
//! device hands it in with [`Gpu::from_device`] and [`Model::load_on`].

pub mod bench;
pub mod decoder;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod session;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
pub use kernels::sampling::SamplingParams;
pub use model::{ChatMessage, ModelConfig};
pub use session::{
    user_message, GenerateOptions, GenerateStats, KvUsage, Model, Perplexity, Session, SessionOptions, StopReason,
};
