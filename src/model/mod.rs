//! Everything about model files: formats (GGUF, safetensors), configuration, weights in one
//! naming and orientation, the tokenizer, the chat template, and conversion to Hugging Face
//! layout.

pub mod chat;
pub mod config;
pub mod convert;
pub mod gguf;
pub mod quant;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{ModelConfig, RopeScaling};
pub use gguf::{Gguf, MetaValue};
pub use synth::{write_synth, SynthFormat, SynthShape, SynthSpec};
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use weights::{HostTensor, ModelFiles};

use std::path::PathBuf;

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the default model is expected: `$LONGWAVE_MODEL` if set (a path to the model itself),
/// else [`DEFAULT_MODEL_FILE`] in `$LONGWAVE_CACHE`, else in `models/cache` of this crate's
/// source tree (where `models/fetch_default.sh` puts it). The file may not exist.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LONGWAVE_MODEL") {
        return PathBuf::from(p);
    }
    let dir = match std::env::var_os("LONGWAVE_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/cache"),
    };
    dir.join(DEFAULT_MODEL_FILE)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The real model for tests: `$LONGWAVE_TEST_MODEL`, else [`super::default_model_path`].
    /// Missing is a failure, not a skip: these tests are what proves the loader works.
    pub fn real_model_path() -> PathBuf {
        let p = match std::env::var_os("LONGWAVE_TEST_MODEL") {
            Some(p) => PathBuf::from(p),
            None => super::default_model_path(),
        };
        assert!(
            p.is_file(),
            "test model not found at {}: run models/fetch_default.sh (or set \
             LONGWAVE_TEST_MODEL to a copy of {})",
            p.display(),
            super::DEFAULT_MODEL_FILE
        );
        p
    }

    /// A fresh empty directory under the system temp dir, unique per call, removed on drop.
    pub fn test_dir(tag: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("longwave-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }

    pub struct TestDir(PathBuf);

    impl std::ops::Deref for TestDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TestDir {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
