//! longwave: a LLaMA-family decoder running as WGSL compute shaders on any GPU wgpu reaches.
//!
//! ```no_run
//! use longwave::{GenerateOptions, GpuOptions, Model, Session, SessionOptions};
//! let model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf", &GpuOptions::default())?;
//! let mut session = Session::new(&model, &SessionOptions::default())?;
//! let messages = longwave::user_message("What is the capital of France?");
//! let (reply, stats) = session.chat(&messages, &GenerateOptions::default(), |text| {
//!     print!("{text}");
//!     true
//! })?;
//! # Ok::<(), longwave::Error>(())
//! ```

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
    user_message, GenerateOptions, GenerateStats, Model, Perplexity, Session, SessionOptions, StopReason,
};
