//! One view of a model's files, whatever format they came in: weights in Hugging Face naming
//! and orientation (row-major `[out, in]`, rotate-half RoPE convention), the configuration, the
//! tokenizer and the chat template.
//!
//! GGUF and safetensors tensors stay in their memory mappings; only GGUF's attn_q / attn_k are
//! copied, because llama.cpp's converter reorders their rows (see [`unpermute_rows`]).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::chat::ChatTemplate;
use super::config::ModelConfig;
use super::gguf::Gguf;
use super::quant::{dequantize_vec, DType};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Where a tensor's bytes are.
#[derive(Debug, Clone)]
pub enum TensorData {
    /// A range of a mapped model file.
    Mapped(Arc<Mmap>, Range<usize>),
    Owned(Vec<u8>),
}

/// A weight matrix (or vector) in host memory, in its file's dtype, row-major `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight".
    pub name: String,
    pub dtype: DType,
    /// 1 for vectors.
    pub rows: usize,
    pub cols: usize,
    /// True for 1-D tensors (norm weights), so converters can write the shape `[cols]`.
    pub is_vector: bool,
    pub data: TensorData,
}

impl HostTensor {
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::Mapped(m, r) => &m[r.clone()],
            TensorData::Owned(v) => v,
        }
    }

    /// Hugging Face shape: `[cols]` for vectors, else `[rows, cols]`.
    pub fn shape(&self) -> Vec<usize> {
        if self.is_vector {
            vec![self.cols]
        } else {
            vec![self.rows, self.cols]
        }
    }

    /// All values, dequantized, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        dequantize_vec(self.dtype, self.bytes(), self.rows * self.cols)
    }
}

/// Everything needed to run a model.
#[derive(Debug)]
pub struct ModelFiles {
    pub config: ModelConfig,
    /// Keyed by Hugging Face name; `lm_head.weight` is absent when embeddings are tied.
    pub tensors: HashMap<String, HostTensor>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// The file or directory it was opened from.
    pub source: PathBuf,
}

/// One tensor the model needs: its Hugging Face name, its GGUF name, its Hugging Face shape,
/// and for GGUF attn_q/attn_k the number of heads whose rows llama.cpp permuted.
pub(crate) struct Expected {
    pub hf: String,
    pub gguf: String,
    pub shape: Vec<usize>,
    pub permuted_heads: Option<usize>,
}

pub(crate) fn expected_tensors(c: &ModelConfig) -> Vec<Expected> {
    let e = |hf: String, gguf: String, shape: Vec<usize>, permuted_heads: Option<usize>| Expected {
        hf,
        gguf,
        shape,
        permuted_heads,
    };
    let (h, q, kv, ff) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let mut v = vec![e("model.embed_tokens.weight".into(), "token_embd.weight".into(), vec![c.vocab_size, h], None)];
    for i in 0..c.num_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}.weight");
        let gg = |s: &str| format!("blk.{i}.{s}.weight");
        v.extend([
            e(hf("input_layernorm"), gg("attn_norm"), vec![h], None),
            e(hf("self_attn.q_proj"), gg("attn_q"), vec![q, h], Some(c.num_heads)),
            e(hf("self_attn.k_proj"), gg("attn_k"), vec![kv, h], Some(c.num_kv_heads)),
            e(hf("self_attn.v_proj"), gg("attn_v"), vec![kv, h], None),
            e(hf("self_attn.o_proj"), gg("attn_output"), vec![h, q], None),
            e(hf("post_attention_layernorm"), gg("ffn_norm"), vec![h], None),
            e(hf("mlp.gate_proj"), gg("ffn_gate"), vec![ff, h], None),
            e(hf("mlp.up_proj"), gg("ffn_up"), vec![ff, h], None),
            e(hf("mlp.down_proj"), gg("ffn_down"), vec![h, ff], None),
        ]);
    }
    v.push(e("model.norm.weight".into(), "output_norm.weight".into(), vec![h], None));
    if !c.tie_word_embeddings {
        v.push(e("lm_head.weight".into(), "output.weight".into(), vec![c.vocab_size, h], None));
    }
    v
}

/// llama.cpp's converter reorders the rows of each head of Q and K so that RoPE rotates adjacent
/// pairs (GPT-J style); Hugging Face rotates the two halves of a head. This undoes it:
/// `hf_row[h*d + s*d/2 + j] = gguf_row[h*d + 2*j + s]`. Rows move whole, so it works on raw
/// bytes of any dtype (quant blocks run along a row).
pub fn unpermute_rows(bytes: &[u8], row_bytes: usize, n_heads: usize, head_dim: usize) -> Vec<u8> {
    permute_impl(bytes, row_bytes, n_heads, head_dim, false)
}

/// The inverse of [`unpermute_rows`]: Hugging Face order to llama.cpp's, for writing GGUF.
pub fn permute_rows(bytes: &[u8], row_bytes: usize, n_heads: usize, head_dim: usize) -> Vec<u8> {
    permute_impl(bytes, row_bytes, n_heads, head_dim, true)
}

fn permute_impl(bytes: &[u8], rb: usize, n_heads: usize, d: usize, to_gguf: bool) -> Vec<u8> {
    debug_assert_eq!(bytes.len(), rb * n_heads * d);
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for j in 0..d / 2 {
                let hf = h * d + s * d / 2 + j;
                let gg = h * d + 2 * j + s;
                let (dst, src) = if to_gguf { (gg, hf) } else { (hf, gg) };
                out[dst * rb..(dst + 1) * rb].copy_from_slice(&bytes[src * rb..(src + 1) * rb]);
            }
        }
    }
    out
}

impl ModelFiles {
    /// Opens a `.gguf` file, or a Hugging Face model directory (config.json, safetensors,
    /// tokenizer.json, tokenizer_config.json), or a directory holding a single `.gguf`.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFiles> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let m = if meta.is_dir() {
            if path.join("config.json").is_file() {
                Self::open_hf(path)?
            } else {
                let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| Error::io(path, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                    .collect();
                match ggufs.as_slice() {
                    [one] => Self::open_gguf(one)?,
                    [] => return Err(Error::bad_model(path, "no config.json and no .gguf file in this directory")),
                    _ => return Err(Error::bad_model(path, "several .gguf files here; name the one to load")),
                }
            }
        } else if path.file_name().is_some_and(|n| n == "config.json") {
            Self::open_hf(path.parent().unwrap_or(Path::new(".")))?
        } else {
            Self::open_gguf(path)?
        };
        m.validate()?;
        Ok(m)
    }

    fn open_gguf(path: &Path) -> Result<ModelFiles> {
        let g = Gguf::open(path)?;
        let config = ModelConfig::from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let chat_template = match g.get_str("tokenizer.chat_template") {
            Some(src) => {
                Some(ChatTemplate::new(src, &token(tokenizer.bos_id()), &token(tokenizer.eos_ids().first().copied()))?)
            }
            None => None,
        };

        let mut tensors = HashMap::new();
        for e in expected_tensors(&config) {
            let Some(t) = g.tensor(&e.gguf) else {
                return Err(Error::bad_model(path, format!("tensor {} ({}) is missing", e.gguf, e.hf)));
            };
            let (rows, cols, is_vector) = match t.dims.as_slice() {
                [c] => (1, *c, true),
                [c, r] => (*r, *c, false),
                d => return Err(Error::bad_model(path, format!("tensor {} has {} dimensions {d:?}", e.gguf, d.len()))),
            };
            let data = match e.permuted_heads {
                // Checked before permuting so a wrong shape is reported, not sliced.
                Some(heads) if rows == heads * config.head_dim && !is_vector => {
                    let rb = t.dtype.row_bytes(cols).unwrap_or(0);
                    TensorData::Owned(unpermute_rows(g.tensor_bytes(t), rb, heads, config.head_dim))
                }
                _ => TensorData::Mapped(g.mmap().clone(), t.range.clone()),
            };
            let ht = HostTensor { name: e.hf.clone(), dtype: t.dtype, rows, cols, is_vector, data };
            tensors.insert(e.hf, ht);
        }
        Ok(ModelFiles { config, tensors, tokenizer, chat_template, source: path.to_path_buf() })
    }

    fn open_hf(dir: &Path) -> Result<ModelFiles> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut config = ModelConfig::from_hf_json(&text, &config_path)?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json_opt(&tc_path)?.unwrap_or(Value::Null);
        let gen = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;

        // BOS/EOS: the ids in config.json, else the token strings of tokenizer_config.json;
        // generation stops at any EOS that config.json, generation_config.json or
        // tokenizer_config.json names.
        let bos_str = token_str(tc.get("bos_token"));
        let eos_str = token_str(tc.get("eos_token"));
        let bos_id = config.bos_token_id.or_else(|| bos_str.as_deref().and_then(|s| tokenizer.token_to_id(s)));
        let mut eos_ids = config.eos_token_ids.clone();
        let more = ids_of(gen.get("eos_token_id"))
            .into_iter()
            .chain(eos_str.as_deref().and_then(|s| tokenizer.token_to_id(s)));
        for id in more {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        // add_bos_token when given; else whatever tokenizer.json's post-processor does.
        let add_bos = match tc.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b,
            None => bos_id
                .is_some_and(|b| tokenizer.inner().encode("a", true).is_ok_and(|e| e.get_ids().first() == Some(&b))),
        };
        config.bos_token_id = bos_id;
        config.eos_token_ids = eos_ids.clone();
        config.add_bos = add_bos;
        let tokenizer = tokenizer.with_specials(bos_id, eos_ids, add_bos);

        let name_of = |id: Option<u32>, s: Option<String>| {
            s.or_else(|| id.and_then(|i| tokenizer.id_to_token(i))).unwrap_or_default()
        };
        let bos_name = name_of(bos_id, bos_str);
        let eos_name = name_of(config.eos_token_ids.first().copied(), eos_str);
        let chat_template = match chat_template_source(dir, &tc)? {
            Some(src) => Some(ChatTemplate::new(&src, &bos_name, &eos_name)?),
            None => None,
        };

        let tensors = load_safetensors(dir, &config)?;
        Ok(ModelFiles { config, tensors, tokenizer, chat_template, source: dir.to_path_buf() })
    }

    /// Checks that the architecture is supported and every tensor the model needs is present
    /// with the right shape and byte length. [`Self::open`] calls it.
    pub fn validate(&self) -> Result<()> {
        if self.config.arch != "llama" {
            return Err(Error::Unsupported(format!(
                "{}: architecture {:?} (only llama is supported)",
                self.source.display(),
                self.config.arch
            )));
        }
        let bad = |msg: String| Err(Error::bad_model(&self.source, msg));
        for e in expected_tensors(&self.config) {
            let Some(t) = self.tensors.get(&e.hf) else {
                return bad(format!("tensor {} is missing", e.hf));
            };
            if t.shape() != e.shape {
                return bad(format!("tensor {} has shape {:?}, expected {:?}", e.hf, t.shape(), e.shape));
            }
            let want = t.dtype.row_bytes(t.cols).map(|r| r * t.rows);
            if want != Some(t.bytes().len()) {
                return bad(format!(
                    "tensor {} holds {} bytes, {} [{}, {}] needs {:?}",
                    e.hf,
                    t.bytes().len(),
                    t.dtype.name(),
                    t.rows,
                    t.cols,
                    want
                ));
            }
        }
        let vocab = self.config.vocab_size as u32;
        for id in self.config.bos_token_id.iter().chain(&self.config.eos_token_ids) {
            if *id >= vocab {
                return bad(format!("special token id {id} is outside the vocabulary ({vocab})"));
            }
        }
        Ok(())
    }

    /// The model's chat template, or the ChatML fallback (see [`super::chat::CHATML_TEMPLATE`]).
    pub fn chat_template_or_chatml(&self) -> ChatTemplate {
        self.chat_template.clone().unwrap_or_else(|| {
            let tok = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default();
            ChatTemplate::chatml(&tok(self.tokenizer.bos_id()), &tok(self.tokenizer.eos_ids().first().copied()))
        })
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::bad_model(path, format!("invalid JSON: {e}")))
}

/// A token in tokenizer_config.json: a string, or an AddedToken object with "content".
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => vec![],
    }
}

/// tokenizer_config.json's chat_template (a string, or a list of named templates of which we
/// take "default", else the first), else a chat_template.jinja file (newer transformers).
fn chat_template_source(dir: &Path, tc: &Value) -> Result<Option<String>> {
    match tc.get("chat_template") {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |n: &str| list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(n));
            let t = named("default").or_else(|| list.first());
            if let Some(s) = t.and_then(|t| t.get("template")).and_then(Value::as_str) {
                return Ok(Some(s.to_string()));
            }
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(&jinja, e));
    }
    Ok(None)
}

/// Maps model.safetensors or the shards named in model.safetensors.index.json, and returns
/// the tensors the model needs (others, like rotary inv_freq buffers, are ignored).
fn load_safetensors(dir: &Path, config: &ModelConfig) -> Result<HashMap<String, HostTensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if let Some(v) = read_json_opt(&index)? {
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::bad_model(&index, "weight_map is missing or not an object"))?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        return Err(Error::bad_model(dir, "no model.safetensors or model.safetensors.index.json"));
    };

    let wanted: HashSet<String> = expected_tensors(config).into_iter().map(|e| e.hf).collect();
    let mut out = HashMap::new();
    for file in files {
        let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        // SAFETY: read-only mapping; see Gguf::open.
        let mmap = Arc::new(unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&file, e))?);
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::bad_model(&file, format!("invalid safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            if !wanted.contains(&name) {
                continue;
            }
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => {
                    return Err(Error::Unsupported(format!(
                        "{}: tensor {name} has dtype {other:?} (supported: F32, F16, BF16)",
                        file.display()
                    )))
                }
            };
            let (rows, cols, is_vector) = match view.shape() {
                [c] => (1, *c, true),
                [r, c] => (*r, *c, false),
                s => {
                    return Err(Error::bad_model(
                        &file,
                        format!("tensor {name} has shape {s:?}; expected 1 or 2 dimensions"),
                    ))
                }
            };
            // The view borrows the mapping; keep its range instead so the tensor can own an Arc.
            let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
            let range = start..start + view.data().len();
            let data = TensorData::Mapped(mmap.clone(), range);
            out.insert(name.clone(), HostTensor { name, dtype, rows, cols, is_vector, data });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{write_gguf, MetaValue};
    use crate::model::quant::quantize;
    use crate::model::test_util::{real_model_path, test_dir, TestDir};

    #[test]
    fn permute_round_trip() {
        let (heads, d, rb) = (3, 8, 5);
        let bytes: Vec<u8> = (0..heads * d * rb).map(|i| (i * 7 % 251) as u8).collect();
        let there = permute_rows(&bytes, rb, heads, d);
        assert_ne!(there, bytes);
        assert_eq!(unpermute_rows(&there, rb, heads, d), bytes);
        assert_eq!(permute_rows(&unpermute_rows(&bytes, rb, heads, d), rb, heads, d), bytes);
        // Row 1 of the HF layout (first half, j=1) comes from GGUF row 2 (pair 1, s=0).
        let un = unpermute_rows(&bytes, rb, heads, d);
        assert_eq!(&un[rb..2 * rb], &bytes[2 * rb..3 * rb]);
        // Row d/2 (second half, j=0) comes from GGUF row 1.
        assert_eq!(&un[(d / 2) * rb..(d / 2 + 1) * rb], &bytes[rb..2 * rb]);
    }

    fn assert_row(m: &ModelFiles, name: &str, row: usize, want: [f64; 3]) {
        let t = &m.tensors[name];
        let v = t.to_f32();
        let got: Vec<f64> = v[row * t.cols..row * t.cols + 3].iter().map(|&x| x as f64).collect();
        assert_eq!(got, want, "{name} row {row}");
    }

    /// Values from transformers 5.24.0, which un-permutes Q/K when loading a GGUF:
    /// `AutoModelForCausalLM.from_pretrained('models/cache', gguf_file=..., dtype=float32)
    /// .state_dict()[name][row, :3]`.
    #[test]
    fn real_gguf_matches_transformers() {
        let m = ModelFiles::open(real_model_path()).unwrap();
        assert_eq!(m.tensors.len(), 1 + 30 * 9 + 1);
        assert!(!m.tensors.contains_key("lm_head.weight"));
        let q = &m.tensors["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!((q.dtype, q.rows, q.cols), (DType::Q4_1, 576, 576));
        let emb = &m.tensors["model.embed_tokens.weight"];
        assert_eq!((emb.dtype, emb.rows, emb.cols), (DType::Q8_0, 49152, 576));
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_row(&m, q, 0, [-0.0963134765625, 0.1573486328125, -0.0963134765625]);
        assert_row(&m, q, 1, [-0.1591796875, 0.39794921875, -0.0198974609375]);
        assert_row(&m, q, 33, [-0.06280517578125, 0.1446533203125, 0.00634765625]);
        assert_row(&m, q, 575, [-0.15679931640625, 0.154327392578125, 0.34100341796875]);
        let k = "model.layers.7.self_attn.k_proj.weight";
        assert_row(&m, k, 1, [-0.027984619140625, -0.193878173828125, 0.01348876953125]);
        assert_row(&m, k, 32, [-0.073486328125, 0.0205078125, -0.0264892578125]);
        assert_row(&m, k, 191, [0.5936279296875, 0.2103271484375, 0.114501953125]);
        let v = "model.layers.0.self_attn.v_proj.weight";
        assert_row(&m, v, 5, [0.02459716796875, -0.080078125, 0.01151275634765625]);
        let e = "model.embed_tokens.weight";
        assert_row(&m, e, 1000, [-0.1119384765625, -0.0739593505859375, 0.0379791259765625]);
        assert_row(&m, "model.norm.weight", 0, [1.7578125, 1.8203125, 1.78125]);
        assert!(m.chat_template.is_some());
    }

    // ---- tiny synthetic models -------------------------------------------------------------

    /// vocab 4, hidden 64, ffn 96, 1 layer, 2 heads of 32, 1 kv head.
    const TINY_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 4, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}"#;

    const TINY_TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel",
        "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, "unk_token": "<unk>"}}"#;

    fn tiny_config() -> ModelConfig {
        ModelConfig::from_hf_json(TINY_CONFIG, Path::new("config.json")).unwrap()
    }

    /// Deterministic values for a tensor, different per name.
    fn values(name: &str, n: usize) -> Vec<f32> {
        let seed = name.bytes().fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
        (0..n).map(|i| ((seed.wrapping_add(i as u32 * 2654435761) >> 8) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    /// Writes a tiny HF model directory; `edit` may change the tensor list before writing.
    fn write_tiny_hf(edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> TestDir {
        let dir = test_dir("hf");
        std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
        std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true,
                "chat_template": [{"name": "default", "template": "{{ bos_token }}x"}]}"#,
        )
        .unwrap();
        let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = expected_tensors(&tiny_config())
            .into_iter()
            .map(|e| {
                let n = e.shape.iter().product();
                let v = values(&e.hf, n);
                (e.hf, e.shape, v)
            })
            .collect();
        edit(&mut ts);
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
            ts.into_iter().map(|(n, s, v)| (n, s, bytemuck::cast_slice::<f32, u8>(&v).to_vec())).collect();
        let views = bytes.iter().map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        });
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        dir
    }

    fn bad(r: Result<ModelFiles>) -> String {
        match r {
            Err(Error::BadModel { msg, .. }) => msg,
            Err(e) => panic!("expected BadModel, got {e}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn tiny_hf_model_loads() {
        let dir = write_tiny_hf(|_| {});
        let m = ModelFiles::open(&dir).unwrap();
        assert_eq!(m.tensors.len(), 1 + 9 + 2);
        let q = &m.tensors["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!((q.dtype, q.rows, q.cols), (DType::F32, 64, 64));
        assert_eq!(q.to_f32(), values(&q.name, 64 * 64));
        assert_eq!(m.tensors["model.norm.weight"].shape(), vec![64]);
        assert_eq!((m.config.bos_token_id, m.config.add_bos), (Some(1), true));
        assert_eq!(m.tokenizer.encode("a", true).unwrap(), vec![1, 3]);
        assert_eq!(m.tokenizer.eos_ids(), &[2]);
        assert_eq!(m.chat_template.unwrap().render(&[], false).unwrap(), "<s>x");
    }

    #[test]
    fn safetensors_errors() {
        // Missing tensor.
        let dir = write_tiny_hf(|ts| ts.retain(|t| t.0 != "model.layers.0.mlp.up_proj.weight"));
        let m = bad(ModelFiles::open(&dir));
        assert!(m.contains("model.layers.0.mlp.up_proj.weight is missing"), "{m}");

        // Wrong shape.
        let dir = write_tiny_hf(|ts| {
            let t = ts.iter_mut().find(|t| t.0.ends_with("k_proj.weight")).unwrap();
            t.1 = vec![64, 32];
            t.2.truncate(64 * 32);
        });
        let m = bad(ModelFiles::open(&dir));
        assert!(m.contains("k_proj.weight has shape [64, 32], expected [32, 64]"), "{m}");

        // Truncated data.
        let dir = write_tiny_hf(|_| {});
        let f = dir.join("model.safetensors");
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, &b[..b.len() - 100]).unwrap();
        assert!(bad(ModelFiles::open(&dir)).contains("invalid safetensors"));

        // Bad header: a length past the end, then garbage JSON.
        let mut h = b.clone();
        h[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&f, &h).unwrap();
        assert!(bad(ModelFiles::open(&dir)).contains("invalid safetensors"));
        let mut h = b.clone();
        h[8] = b'x';
        std::fs::write(&f, &h).unwrap();
        assert!(bad(ModelFiles::open(&dir)).contains("invalid safetensors"));
        std::fs::write(&f, b"").unwrap();
        assert!(bad(ModelFiles::open(&dir)).contains("invalid safetensors"));
    }

    #[test]
    fn unsupported_dtype_and_arch() {
        let dir = write_tiny_hf(|_| {});
        let f = dir.join("model.safetensors");
        let data = vec![0u8; 4 * 64];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![64], &data).unwrap();
        safetensors::serialize_to_file([("model.norm.weight", view)], None, &f).unwrap();
        match ModelFiles::open(&dir) {
            Err(Error::Unsupported(m)) => {
                assert!(m.contains("model.norm.weight") && m.contains("I32"), "{m}")
            }
            r => panic!("{r:?}"),
        }

        let dir = write_tiny_hf(|_| {});
        let cfg = TINY_CONFIG.replace("LlamaForCausalLM", "Qwen2ForCausalLM").replace("\"llama\"", "\"qwen2\"");
        std::fs::write(dir.join("config.json"), cfg).unwrap();
        match ModelFiles::open(&dir) {
            Err(Error::Unsupported(m)) => assert!(m.contains("Qwen2ForCausalLM"), "{m}"),
            r => panic!("{r:?}"),
        }
        // validate() on its own refuses another architecture too.
        let mut m = ModelFiles::open(write_tiny_hf(|_| {})).unwrap();
        m.config.arch = "qwen2".into();
        assert!(matches!(m.validate(), Err(Error::Unsupported(m)) if m.contains("qwen2")));
    }

    /// Writes the tiny model as a GGUF the way llama.cpp would (Q/K rows permuted, Q8_0 for
    /// matrices) and checks the loader gives back the HF layout.
    #[test]
    fn tiny_gguf_unpermutes() {
        let cfg = tiny_config();
        let mut owned = vec![];
        for e in expected_tensors(&cfg) {
            let n: usize = e.shape.iter().product();
            let v = values(&e.hf, n);
            let (dtype, mut bytes) = if e.shape.len() == 2 {
                (DType::Q8_0, quantize(DType::Q8_0, &v))
            } else {
                (DType::F32, quantize(DType::F32, &v))
            };
            if let Some(heads) = e.permuted_heads {
                let rb = dtype.row_bytes(e.shape[1]).unwrap();
                bytes = permute_rows(&bytes, rb, heads, cfg.head_dim);
            }
            let dims: Vec<usize> = e.shape.iter().rev().copied().collect();
            owned.push((e.gguf, dtype, dims, bytes, e.hf));
        }
        let s = |x: &str| MetaValue::Str(x.into());
        let meta = vec![
            ("general.architecture".to_string(), s("llama")),
            ("llama.vocab_size".to_string(), MetaValue::U32(4)),
            ("llama.embedding_length".to_string(), MetaValue::U32(64)),
            ("llama.feed_forward_length".to_string(), MetaValue::U32(96)),
            ("llama.block_count".to_string(), MetaValue::U32(1)),
            ("llama.attention.head_count".to_string(), MetaValue::U32(2)),
            ("llama.attention.head_count_kv".to_string(), MetaValue::U32(1)),
            ("tokenizer.ggml.model".to_string(), s("gpt2")),
            ("tokenizer.ggml.tokens".to_string(), MetaValue::Array(vec![s("a"), s("b"), s("<s>"), s("</s>")])),
            ("tokenizer.ggml.merges".to_string(), MetaValue::Array(vec![])),
            ("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(2)),
            ("tokenizer.ggml.eos_token_id".to_string(), MetaValue::U32(3)),
        ];
        let list: Vec<_> =
            owned.iter().map(|(n, d, dims, b, _)| (n.as_str(), *d, dims.as_slice(), b.as_slice())).collect();
        let dir = test_dir("gguf-model");
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &meta, &list).unwrap();
        let m = ModelFiles::open(&path).unwrap();
        assert_eq!(m.config.eos_token_ids, vec![3]);
        assert!(!m.config.tie_word_embeddings);
        for (_, dtype, _, _, hf) in &owned {
            let t = &m.tensors[hf];
            assert_eq!(t.dtype, *dtype);
            let want = quant_round_trip(*dtype, &values(hf, t.rows * t.cols));
            assert_eq!(t.to_f32(), want, "{hf}");
        }

        // A missing tensor and another architecture.
        let short: Vec<_> = list.iter().filter(|t| t.0 != "blk.0.ffn_up.weight").cloned().collect();
        write_gguf(&path, &meta, &short).unwrap();
        let msg = bad(ModelFiles::open(&path));
        assert!(msg.contains("blk.0.ffn_up.weight") && msg.contains("missing"), "{msg}");
        let mut meta2 = meta.clone();
        meta2[0].1 = s("qwen2");
        write_gguf(&path, &meta2, &list).unwrap();
        assert!(matches!(ModelFiles::open(&path), Err(Error::Unsupported(m)) if m.contains("qwen2")));
    }

    fn quant_round_trip(dtype: DType, v: &[f32]) -> Vec<f32> {
        dequantize_vec(dtype, &quantize(dtype, v), v.len())
    }
}
