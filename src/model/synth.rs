//! Random-weight LLaMA models of real shapes (Llama-3-8B, SmolLM2-135M), written as a Hugging
//! Face directory (safetensors) or a GGUF file, so benchmarks at scale need no download.
//!
//! Every weight is a pure function of (seed, Hugging Face tensor name, row, column), so the
//! same seed gives the same underlying f32 values in every format and with any layer count,
//! and rows can be generated in any order and in parallel. GGUF rows of attn_q / attn_k are
//! written in llama.cpp's permuted order (the loader undoes it), so a GGUF and a safetensors
//! directory of one seed load as the same model.
//!
//! Files are streamed: headers are computed up front from the known shapes, then tensors are
//! generated a chunk of rows at a time while a second thread writes the previous chunk, so
//! memory stays near a few chunks whatever the model size.

use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use super::config::{ModelConfig, RopeScaling};
use super::gguf::{gguf_header, TensorInfo, DEFAULT_ALIGNMENT};
use super::quant::{quantize, DType};
use super::weights::expected_tensors;
use crate::error::{Error, Result};

mod vocab;
use vocab::{gguf_metadata, special_ids, write_hf_files};

/// A model shape copied from a published model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthShape {
    /// Llama 3.1 8B: untied LM head, GQA 32/8, Llama 3 RoPE scaling.
    Llama3_8b,
    /// SmolLM2-135M: tied embeddings, GQA 9/3.
    Smollm2_135m,
}

impl SynthShape {
    pub const ALL: [SynthShape; 2] = [SynthShape::Llama3_8b, SynthShape::Smollm2_135m];

    pub fn name(self) -> &'static str {
        match self {
            SynthShape::Llama3_8b => "llama3-8b",
            SynthShape::Smollm2_135m => "smollm2-135m",
        }
    }

    pub fn parse(name: &str) -> Result<SynthShape> {
        Self::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
            Error::InvalidArgument(format!("unknown shape {name:?} (known: {})", known.join(", ")))
        })
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub shape: SynthShape,
    /// Overrides the shape's layer count (small models for tests).
    pub layers: Option<usize>,
    pub seed: u64,
    /// max_position_embeddings; default: the original model's (131072 for Llama 3.1, 8192 for
    /// SmolLM2). It only bounds the context a session may ask for.
    pub max_ctx: Option<usize>,
}

impl SynthSpec {
    pub fn new(shape: SynthShape) -> SynthSpec {
        SynthSpec { shape, layers: None, seed: 0, max_ctx: None }
    }

    /// The configuration the written model loads with.
    pub fn config(&self) -> Result<ModelConfig> {
        let (bos, eos) = special_ids();
        let mut c = match self.shape {
            SynthShape::Llama3_8b => ModelConfig {
                arch: "llama".into(),
                vocab_size: 128256,
                hidden_size: 4096,
                intermediate_size: 14336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 128,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                rope_scaling: Some(RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                max_position_embeddings: 131072,
                tie_word_embeddings: false,
                bos_token_id: Some(bos),
                eos_token_ids: eos.to_vec(),
                add_bos: true,
            },
            SynthShape::Smollm2_135m => ModelConfig {
                arch: "llama".into(),
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                rope_scaling: None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                bos_token_id: Some(bos),
                eos_token_ids: eos.to_vec(),
                add_bos: false,
            },
        };
        if let Some(n) = self.layers {
            if n == 0 {
                return Err(Error::InvalidArgument("--layers must be at least 1".into()));
            }
            c.num_layers = n;
        }
        if let Some(n) = self.max_ctx {
            if n == 0 {
                return Err(Error::InvalidArgument("--max-ctx must be at least 1".into()));
            }
            c.max_position_embeddings = n;
        }
        Ok(c)
    }
}

/// File format and weight dtype. Norm weights (and GGUF's rope_freqs) are f32 in GGUF, as
/// llama.cpp writes them, and the safetensors dtype otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// A Hugging Face directory; F32, F16 or BF16.
    Safetensors(DType),
    /// One GGUF v3 file; any [`DType`] for the matrices (embedding and LM head included).
    Gguf(DType),
}

impl SynthFormat {
    /// From command-line words: format `gguf` or `hf` (also `safetensors`), dtype a
    /// [`DType`] name (`f16`, `q8_0`, `q4_0`, ...).
    pub fn parse(format: &str, dtype: &str) -> Result<SynthFormat> {
        let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
        let d = DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(dtype))
            .ok_or_else(|| Error::InvalidArgument(format!("unknown dtype {dtype:?} (known: {})", names.join(", "))))?;
        match format.to_ascii_lowercase().as_str() {
            "gguf" => Ok(SynthFormat::Gguf(d)),
            "hf" | "safetensors" => Ok(SynthFormat::Safetensors(d)),
            _ => Err(Error::InvalidArgument(format!("unknown format {format:?} (known: gguf, hf)"))),
        }
    }
}

/// Writes the model: `out` is the directory (safetensors) or the file (GGUF). `progress` gets
/// (bytes produced, total bytes) of the weight file.
pub fn write_synth(
    spec: &SynthSpec,
    format: SynthFormat,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let cfg = spec.config()?;
    match format {
        SynthFormat::Safetensors(dtype) => {
            if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
                return Err(Error::InvalidArgument(format!(
                    "safetensors holds f32, f16 or bf16, not {}; use GGUF for quantized weights",
                    dtype.name()
                )));
            }
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
            write_hf_files(&cfg, dtype, out)?;
            let tensors = plan(&cfg, dtype, false);
            let header = safetensors_header(&tensors)?;
            stream(&out.join("model.safetensors"), header, &tensors, spec.seed, 1, progress)
        }
        SynthFormat::Gguf(dtype) => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let tensors = plan(&cfg, dtype, true);
            let infos: Vec<(&str, DType, Vec<usize>)> =
                tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.gguf_dims())).collect();
            let infos: Vec<TensorInfo<'_>> = infos.iter().map(|(n, d, dims)| (*n, *d, dims.as_slice())).collect();
            let (header, _) = gguf_header(&gguf_metadata(&cfg, dtype), &infos)?;
            stream(out, header, &tensors, spec.seed, DEFAULT_ALIGNMENT, progress)
        }
    }
}

// ---- weights ------------------------------------------------------------------------------

/// Standard deviation of every matrix (transformers' `initializer_range`): with unit norms,
/// projections of a unit-RMS input come out with RMS near 1, so activations and logits stay
/// in range through all 32 layers.
const WEIGHT_STD: f32 = 0.02;

/// How a tensor's values are made.
#[derive(Debug, Clone)]
enum Fill {
    /// Uniform with [`WEIGHT_STD`], keyed by the Hugging Face name.
    Random { key: String },
    /// Norm weights.
    Ones,
    /// Fixed values (GGUF's rope_freqs).
    Values(Vec<f32>),
}

/// One tensor of the file, in file order.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    dtype: DType,
    rows: usize,
    cols: usize,
    is_vector: bool,
    /// GGUF attn_q / attn_k: the head count whose rows are stored in llama.cpp's order.
    permuted_heads: Option<usize>,
    head_dim: usize,
    fill: Fill,
}

impl Planned {
    fn gguf_dims(&self) -> Vec<usize> {
        if self.is_vector {
            vec![self.cols]
        } else {
            vec![self.cols, self.rows]
        }
    }

    fn bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).map_or(0, |r| r * self.rows)
    }

    /// The Hugging Face row whose values go in file row `row`. llama.cpp stores row
    /// `h*d + 2*j + s` of a head where Hugging Face has `h*d + s*d/2 + j`.
    fn source_row(&self, row: usize) -> usize {
        match self.permuted_heads {
            None => row,
            Some(_) => {
                let d = self.head_dim;
                let (h, i) = (row / d, row % d);
                h * d + (i % 2) * d / 2 + i / 2
            }
        }
    }

    /// Fills `out` (whole rows of this tensor's file layout, starting at `first_row`).
    fn fill_rows(&self, seed: u64, first_row: usize, out: &mut [u8]) {
        let rb = self.dtype.row_bytes(self.cols).expect("shapes divide into blocks");
        let key = match &self.fill {
            Fill::Random { key } => tensor_key(seed, key),
            _ => 0,
        };
        out.par_chunks_mut(rb).enumerate().for_each_init(
            || vec![0f32; self.cols],
            |vals, (i, dst)| {
                match &self.fill {
                    Fill::Random { .. } => random_row(key, self.source_row(first_row + i), vals),
                    Fill::Ones => vals.fill(1.0),
                    Fill::Values(v) => vals.copy_from_slice(v),
                }
                dst.copy_from_slice(&quantize(self.dtype, vals));
            },
        );
    }
}

/// The tensors of the file in order, with GGUF names for GGUF.
fn plan(c: &ModelConfig, dtype: DType, gguf: bool) -> Vec<Planned> {
    let mut v = vec![];
    if let (true, Some(_)) = (gguf, &c.rope_scaling) {
        // llama.cpp keeps Llama 3 RoPE scaling as per-pair frequency divisors.
        let plain = ModelConfig { rope_scaling: None, ..c.clone() }.rope_inv_freq();
        let divisors: Vec<f32> = plain.iter().zip(c.rope_inv_freq()).map(|(p, s)| p / s).collect();
        v.push(Planned {
            name: "rope_freqs.weight".into(),
            dtype: DType::F32,
            rows: 1,
            cols: divisors.len(),
            is_vector: true,
            permuted_heads: None,
            head_dim: c.head_dim,
            fill: Fill::Values(divisors),
        });
    }
    for e in expected_tensors(c) {
        let is_vector = e.shape.len() == 1;
        let (rows, cols) = if is_vector { (1, e.shape[0]) } else { (e.shape[0], e.shape[1]) };
        v.push(Planned {
            name: if gguf { e.gguf } else { e.hf.clone() },
            dtype: if gguf && is_vector { DType::F32 } else { dtype },
            rows,
            cols,
            is_vector,
            permuted_heads: e.permuted_heads.filter(|_| gguf),
            head_dim: c.head_dim,
            fill: if is_vector { Fill::Ones } else { Fill::Random { key: e.hf } },
        });
    }
    v
}

/// splitmix64's output function: a cheap, well-mixed hash of a counter.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E3779B97F4A7C15;

/// Per-tensor stream key from the seed and the Hugging Face name, so a tensor's values do not
/// depend on which other tensors exist (a 2-layer model shares layers 0-1 with the full one).
fn tensor_key(seed: u64, name: &str) -> u64 {
    name.bytes().fold(mix(seed.wrapping_add(GOLDEN)), |h, b| mix(h ^ b as u64).wrapping_add(GOLDEN))
}

/// Row `row` of a tensor: uniform in [-a, a] with std [`WEIGHT_STD`]. Four 16-bit values per
/// hash: finer steps would vanish in f16 storage anyway, and hashing is most of the cost.
fn random_row(key: u64, row: usize, out: &mut [f32]) {
    let a = WEIGHT_STD * 3f32.sqrt();
    let step = 2.0 * a / 65536.0;
    let to_val = |bits: u64| (bits & 0xffff) as f32 * step - a + step / 2.0;
    let n = out.len();
    let first = (row * n).div_ceil(4) as u64;
    let mut quads = out.chunks_exact_mut(4);
    for (q, quad) in (&mut quads).enumerate() {
        let h = mix(key.wrapping_add((first + q as u64).wrapping_mul(GOLDEN)));
        for (k, x) in quad.iter_mut().enumerate() {
            *x = to_val(h >> (16 * k));
        }
    }
    let tail = quads.into_remainder();
    let h = mix(key.wrapping_add((first + (n / 4) as u64).wrapping_mul(GOLDEN)));
    for (k, x) in tail.iter_mut().enumerate() {
        *x = to_val(h >> (16 * k));
    }
}

/// Elements generated per chunk: big enough to keep every core busy, small enough that the
/// chunks in flight take a few tens of MB.
const CHUNK_ELEMS: usize = 8 << 20;

/// Writes `header`, then each tensor padded to `align`, generating chunks on this thread while
/// another writes them.
fn stream(
    path: &Path,
    header: Vec<u8>,
    tensors: &[Planned],
    seed: u64,
    align: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let total = header.len() as u64 + tensors.iter().map(|t| t.bytes().next_multiple_of(align) as u64).sum::<u64>();
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    let written = std::thread::scope(|s| {
        let writer = s.spawn(move || -> std::io::Result<()> {
            let mut f = file;
            for chunk in rx {
                f.write_all(&chunk)?;
            }
            f.sync_all()
        });
        let mut done = header.len() as u64;
        // A failed send means the writer stopped on an error, which its join reports.
        let send = |chunk: Vec<u8>| tx.send(chunk).is_ok();
        let mut ok = send(header);
        for t in tensors {
            let rows_per_chunk = (CHUNK_ELEMS / t.cols).max(1);
            let rb = t.dtype.row_bytes(t.cols).unwrap_or(0);
            let mut row = 0;
            while ok && row < t.rows {
                let n = rows_per_chunk.min(t.rows - row);
                let mut chunk = vec![0u8; n * rb];
                t.fill_rows(seed, row, &mut chunk);
                row += n;
                if row == t.rows {
                    chunk.resize(t.bytes().next_multiple_of(align) - (row - n) * rb, 0);
                }
                done += chunk.len() as u64;
                ok = send(chunk);
                progress(done, total);
            }
        }
        drop(tx);
        writer.join().unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")))
    });
    written.map_err(|e| Error::io(path, e))?;
    progress(total, total);
    Ok(())
}

fn safetensors_header(tensors: &[Planned]) -> Result<Vec<u8>> {
    let dtype_name = |d: DType| match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        _ => "F16",
    };
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0;
    for t in tensors {
        let shape = if t.is_vector { vec![t.cols] } else { vec![t.rows, t.cols] };
        let end = offset + t.bytes();
        map.insert(
            t.name.clone(),
            json!({ "dtype": dtype_name(t.dtype), "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&map).map_err(|e| Error::Other(e.to_string()))?;
    // Pad so the data starts 8-byte aligned, as the safetensors writer does.
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::vocab::hf_tokenizer;
    use super::*;
    use crate::model::gguf::{write_gguf, Gguf};
    use crate::model::test_util::test_dir;
    use crate::model::weights::ModelFiles;
    use crate::model::Tokenizer;

    const TEXT: &str = "<|begin_of_text|>Hello there, the weather is 23.5 degrees\n\tand ünïcödé 日本<|eot_id|>";

    fn small() -> SynthSpec {
        SynthSpec { layers: Some(2), seed: 7, ..SynthSpec::new(SynthShape::Smollm2_135m) }
    }

    fn write(spec: &SynthSpec, format: SynthFormat, out: &Path) -> ModelFiles {
        let mut last = (0, 1);
        write_synth(spec, format, out, &mut |d, t| last = (d, t)).unwrap();
        assert_eq!(last.0, last.1, "progress ends at the total");
        ModelFiles::open(out).unwrap()
    }

    /// Safetensors f16 and GGUF f16 / q8_0 / q4_0 of one seed are one model: same config,
    /// same tokenizer, f16 tensors identical (so the GGUF Q/K permutation round-trips), and
    /// quantized ones within the block format's rounding of the same values.
    #[test]
    fn formats_agree() {
        let dir = test_dir("synth");
        let spec = small();
        let hf = write(&spec, SynthFormat::Safetensors(DType::F16), &dir.join("hf"));
        let c = &hf.config;
        assert_eq!(c, &spec.config().unwrap());
        assert_eq!((c.vocab_size, c.hidden_size, c.num_layers, c.num_kv_heads), (49152, 576, 2, 3));
        assert!(c.tie_word_embeddings && !c.add_bos);
        assert_eq!(hf.tensors.len(), 1 + 2 * 9 + 1);
        let ids = hf.tokenizer.encode(TEXT, true).unwrap();
        assert_eq!(ids[0], 266, "<|begin_of_text|> is one token");
        assert_eq!(*ids.last().unwrap(), 270);
        assert!(ids.contains(&(256 + 2)), "the merges apply: {ids:?}");
        assert_eq!(hf.tokenizer.decode(&ids, false).unwrap(), TEXT);

        // Norms are ones; matrices have the intended spread and differ between tensors.
        assert!(hf.tensors["model.norm.weight"].to_f32().iter().all(|&x| x == 1.0));
        let q = hf.tensors["model.layers.1.self_attn.q_proj.weight"].to_f32();
        let std = (q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32).sqrt();
        assert!((std - WEIGHT_STD).abs() < 1e-3, "std {std}");
        assert_ne!(&q[..64], &hf.tensors["model.layers.0.self_attn.q_proj.weight"].to_f32()[..64]);

        for (dtype, tol) in [(DType::F16, 0.0), (DType::Q8_0, 0.51 / 127.0), (DType::Q4_0, 1.01 / 8.0)] {
            let g = write(&spec, SynthFormat::Gguf(dtype), &dir.join(format!("m-{}.gguf", dtype.name())));
            assert_eq!(&g.config, c, "{dtype:?}");
            assert_eq!(g.tokenizer.encode(TEXT, true).unwrap(), ids);
            assert_eq!(g.tokenizer.eos_ids(), hf.tokenizer.eos_ids());
            for (name, want) in &hf.tensors {
                let got = &g.tensors[name];
                assert_eq!(got.shape(), want.shape(), "{name}");
                let (a, b) = (want.to_f32(), got.to_f32());
                if want.is_vector || tol == 0.0 {
                    assert!(a == b, "{name} {dtype:?} differs");
                    continue;
                }
                assert_eq!(got.dtype, dtype);
                // Per block: |error| <= tol * amax, plus the f16 rounding of the block scale
                // (up to 2^-11 of amax) and of the f16 reference itself.
                for (x, y) in a.chunks(32).zip(b.chunks(32)) {
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (u, v) in x.iter().zip(y) {
                        assert!((u - v).abs() <= tol * amax + amax / 2048.0 + 2e-5, "{name} {dtype:?}: {u} vs {v}");
                    }
                }
            }
        }
    }

    /// A layer-count override keeps the shared layers' values: weights depend on names only.
    #[test]
    fn values_do_not_depend_on_layer_count_or_chunking() {
        let t = plan(&small().config().unwrap(), DType::F32, false);
        let up = t.iter().find(|t| t.name == "model.layers.1.mlp.up_proj.weight").unwrap();
        let rb = up.cols * 4;
        let mut whole = vec![0u8; 10 * rb];
        up.fill_rows(7, 0, &mut whole);
        let mut tail = vec![0u8; 3 * rb];
        up.fill_rows(7, 7, &mut tail);
        assert_eq!(&whole[7 * rb..], &tail[..]);
        let mut other_seed = vec![0u8; 3 * rb];
        up.fill_rows(8, 7, &mut other_seed);
        assert_ne!(tail, other_seed);
    }

    /// The Llama-3-8B shape's GGUF metadata and rope_freqs load back as its configuration
    /// (rope scaling included) and its 128256-token vocabulary loads, without writing 5 GB.
    #[test]
    fn llama3_metadata_loads() {
        let spec = SynthSpec { max_ctx: Some(32768), ..SynthSpec::new(SynthShape::Llama3_8b) };
        let c = spec.config().unwrap();
        assert_eq!((c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim), (32, 32, 8, 128));
        assert_eq!((c.vocab_size, c.intermediate_size, c.max_position_embeddings), (128256, 14336, 32768));
        let freqs = &plan(&c, DType::Q4_0, true)[0];
        let Fill::Values(v) = &freqs.fill else { panic!("rope_freqs first") };
        let bytes = quantize(DType::F32, v);
        let dir = test_dir("synth-l3");
        let path = dir.join("meta.gguf");
        write_gguf(&path, &gguf_metadata(&c, DType::Q4_0), &[("rope_freqs.weight", DType::F32, &[64], &bytes)])
            .unwrap();
        let g = Gguf::open(&path).unwrap();
        let back = ModelConfig::from_gguf(&g).unwrap();
        // No output.weight in this header-only file reads as tied.
        assert_eq!(back, ModelConfig { tie_word_embeddings: true, ..c.clone() });
        let tok = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(tok.vocab_size(), 128256);
        assert_eq!(tok.encode("hi", true).unwrap(), vec![266, 104, 105]);
        assert_eq!(tok.id_to_token(128255).as_deref(), Some("<|reserved_127984|>"));
        let hf = hf_tokenizer(&c).unwrap();
        assert_eq!(hf.encode(TEXT, true).unwrap().get_ids(), tok.encode(TEXT, true).unwrap());
    }

    #[test]
    fn bad_arguments() {
        let err = |r: Result<_>| match r {
            Err(Error::InvalidArgument(m)) => m,
            r => panic!("{r:?}"),
        };
        assert!(err(SynthShape::parse("llama-9000").map(|_| ())).contains("llama3-8b"));
        assert_eq!(SynthShape::parse("smollm2-135m").unwrap(), SynthShape::Smollm2_135m);
        assert_eq!(SynthFormat::parse("gguf", "Q4_0").unwrap(), SynthFormat::Gguf(DType::Q4_0));
        assert_eq!(SynthFormat::parse("hf", "f16").unwrap(), SynthFormat::Safetensors(DType::F16));
        assert!(err(SynthFormat::parse("onnx", "f16").map(|_| ())).contains("gguf, hf"));
        assert!(err(SynthFormat::parse("gguf", "q3_k").map(|_| ())).contains("q4_0"));
        let zero = SynthSpec { layers: Some(0), ..small() };
        assert!(err(zero.config().map(|_| ())).contains("--layers"));
        let dir = test_dir("synth-bad");
        let r = write_synth(&small(), SynthFormat::Safetensors(DType::Q4_0), &dir.join("x"), &mut |_, _| {});
        assert!(err(r).contains("q4_0"));
    }

    /// The written model runs: finite, non-constant logits, and GGUF f16 gives the logits of
    /// the safetensors f16 directory.
    #[test]
    fn runs_on_the_gpu() {
        use crate::{Gpu, GpuOptions, Model, Session, SessionOptions};
        let dir = test_dir("synth-run");
        let spec = small();
        write_synth(&spec, SynthFormat::Safetensors(DType::F16), &dir.join("hf"), &mut |_, _| {}).unwrap();
        write_synth(&spec, SynthFormat::Gguf(DType::F16), &dir.join("m.gguf"), &mut |_, _| {}).unwrap();
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let mut logits = vec![];
        for p in [dir.join("hf"), dir.join("m.gguf")] {
            let model = Model::load_on(gpu.clone(), &p, &mut |_, _| {}).unwrap();
            let mut s = Session::new(&model, &SessionOptions { max_ctx: Some(64) }).unwrap();
            let ids = model.tokenizer.encode("the weather in there", true).unwrap();
            let l = s.logits(&ids).unwrap();
            assert!(l.iter().all(|x| x.is_finite()));
            let (lo, hi) = l.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            assert!(hi - lo > 0.1 && hi < 100.0, "logits {lo}..{hi}");
            logits.push(l);
        }
        let diff = logits[0].iter().zip(&logits[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-3, "safetensors and GGUF logits differ by {diff}");
    }
}
