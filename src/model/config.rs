//! Model hyper-parameters, read from a Hugging Face `config.json` or a GGUF file's `llama.*`
//! metadata, validated once so the rest of the runtime can trust them.

use serde_json::{json, Value};
use std::path::Path;

use super::gguf::Gguf;
use crate::error::{Error, Result};

/// Llama 3 ("llama3" rope_type) frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Always "llama" for now; kept so messages and converted configs can name it.
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (Llama 3 instruct models have several).
    pub eos_token_ids: Vec<u32>,
    /// Whether encoding a prompt prepends BOS.
    pub add_bos: bool,
}

impl ModelConfig {
    /// Parses `config.json`. `path` only names the file in errors.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let bad = |msg: String| Error::bad_model(path, msg);
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad("config.json is not a JSON object".into()));
        }

        // Refuse other architectures by name rather than loading them wrongly.
        let archs: Vec<&str> = match v.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let model_type = v.get("model_type").and_then(Value::as_str);
        if !archs.is_empty() && !archs.contains(&"LlamaForCausalLM") {
            return Err(Error::Unsupported(format!(
                "{}: architecture {} (only LlamaForCausalLM is supported)",
                path.display(),
                archs.join(", ")
            )));
        }
        match model_type {
            Some("llama") => {}
            None if !archs.is_empty() => {}
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: model_type {} (only llama is supported)",
                    path.display(),
                    other.map_or("missing".to_string(), |s| format!("{s:?}"))
                )))
            }
        }
        // Features of LlamaForCausalLM that this runtime does not implement.
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::Unsupported(format!("{}: hidden_act {act}", path.display())));
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(Error::Unsupported(format!("{}: {flag} = true", path.display())));
            }
        }

        let usize_field = |name: &str| -> Result<Option<usize>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(format!("{name} is {x}, not a non-negative integer"))),
            }
        };
        let required =
            |name: &str| -> Result<usize> { usize_field(name)?.ok_or_else(|| bad(format!("{name} is missing"))) };
        let f32_field = |name: &str, default: f32| -> Result<f32> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().map(|f| f as f32).ok_or_else(|| bad(format!("{name} is {x}, not a number"))),
            }
        };

        let hidden_size = required("hidden_size")?;
        let num_heads = required("num_attention_heads")?;
        let head_dim = match usize_field("head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| bad("eos_token_id list holds a non-integer".into()))?,
            Some(x) => vec![x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(format!("eos_token_id is {x}")))?],
        };
        let bos_token_id = usize_field("bos_token_id")?
            .map(|b| u32::try_from(b).map_err(|_| bad(format!("bos_token_id {b}"))))
            .transpose()?;

        // transformers 5 writes `rope_parameters` (theta, type and scaling in one object)
        // instead of `rope_theta` and `rope_scaling`.
        let rope = v.get("rope_parameters").filter(|r| !r.is_null());
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(t) => t.as_f64().map(|f| f as f32).ok_or_else(|| bad(format!("rope_parameters.rope_theta is {t}")))?,
            None => f32_field("rope_theta", 10000.0)?,
        };
        let cfg = ModelConfig {
            arch: "llama".into(),
            vocab_size: required("vocab_size")?,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_layers: required("num_hidden_layers")?,
            num_heads,
            num_kv_heads: usize_field("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            // Defaults are those of transformers' LlamaConfig.
            rms_norm_eps: f32_field("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling: parse_rope_scaling(rope.or(v.get("rope_scaling")), path)?,
            max_position_embeddings: usize_field("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id,
            eos_token_ids,
            add_bos: false,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let path = g.path();
        let bad = |msg: String| Error::bad_model(path, msg);
        match g.get_str("general.architecture") {
            Some("llama") => {}
            Some(a) => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture {a:?} (only llama is supported)",
                    path.display()
                )))
            }
            None => return Err(bad("general.architecture is missing".into())),
        }
        let int = |key: &str| -> Result<Option<usize>> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(format!("{key} is {v:?}, not a non-negative integer"))),
            }
        };
        let required = |key: &str| -> Result<usize> { int(key)?.ok_or_else(|| bad(format!("{key} is missing"))) };
        let float = |key: &str, default: f32| -> Result<f32> {
            match g.get(key) {
                None => Ok(default),
                Some(v) => v.as_f64().map(|f| f as f32).ok_or_else(|| bad(format!("{key} is {v:?}"))),
            }
        };

        let hidden_size = required("llama.embedding_length")?;
        let num_heads = required("llama.attention.head_count")?;
        let head_dim = match int("llama.attention.key_length")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        // Partial rotary embeddings are not part of Llama.
        if let Some(rot) = int("llama.rope.dimension_count")? {
            if rot != head_dim {
                return Err(Error::Unsupported(format!(
                    "{}: rope over {rot} of {head_dim} head dimensions",
                    path.display()
                )));
            }
        }
        if let Some(t) = g.get_str("llama.rope.scaling.type") {
            if t != "none" {
                return Err(Error::Unsupported(format!("{}: rope scaling type {t:?}", path.display())));
            }
        }
        let vocab_size = match int("llama.vocab_size")? {
            Some(n) => n,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|a| a.len())
                .ok_or_else(|| bad("llama.vocab_size and tokenizer.ggml.tokens missing".into()))?,
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            int(key)?.map(|n| u32::try_from(n).map_err(|_| bad(format!("{key} is {n}")))).transpose()
        };
        // llama.cpp stops at EOS and also at the end-of-turn / end-of-message tokens.
        let mut eos_token_ids = vec![];
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = token_id(key)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let rope_theta = float("llama.rope.freq_base", 10000.0)?;
        let max_position_embeddings = int("llama.context_length")?.unwrap_or(2048);

        let mut cfg = ModelConfig {
            arch: "llama".into(),
            vocab_size,
            hidden_size,
            intermediate_size: required("llama.feed_forward_length")?,
            num_layers: required("llama.block_count")?,
            num_heads,
            num_kv_heads: int("llama.attention.head_count_kv")?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta,
            rope_scaling: None,
            max_position_embeddings,
            // llama.cpp's rule: no output tensor means the embedding doubles as the LM head.
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
            add_bos: g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        };
        cfg.validate(path)?;
        cfg.rope_scaling = rope_scaling_from_freqs(g, &cfg)?;
        Ok(cfg)
    }

    /// The Hugging Face `config.json` equivalent (for LlamaForCausalLM).
    pub fn to_hf_json(&self) -> Value {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(s) => json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "attention_bias": false,
            "mlp_bias": false,
        })
    }

    /// Inverse frequency of each of the `head_dim / 2` rotary pairs: `theta^(-2i/d)`, with the
    /// Llama 3 scaling applied as transformers' `_compute_llama3_parameters` does. Computed in
    /// f64 and rounded once, so it matches transformers' f32 values to about 1 ulp.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.rope_theta, self.head_dim, self.rope_scaling.as_ref())
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::bad_model(path, msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!("num_heads {} does not divide hidden_size {}", self.num_heads, self.hidden_size));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!("num_kv_heads {} does not divide num_heads {}", self.num_kv_heads, self.num_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd; rotary pairs need it even", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {} is not positive", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} is not above 1", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            if !(s.factor > 0.0 && s.high_freq_factor > s.low_freq_factor)
                || s.low_freq_factor <= 0.0
                || s.original_max_position_embeddings == 0
            {
                return bad(format!("rope_scaling {s:?} is invalid"));
            }
        }
        Ok(())
    }
}

fn rope_inv_freq(theta: f32, dim: usize, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base = theta as f64;
    (0..dim / 2)
        .map(|i| {
            let inv = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let Some(s) = scaling else { return inv as f32 };
            let (factor, low, high) = (s.factor as f64, s.low_freq_factor as f64, s.high_freq_factor as f64);
            let old = s.original_max_position_embeddings as f64;
            let wavelen = 2.0 * std::f64::consts::PI / inv;
            // Long wavelengths are slowed by `factor`, short ones kept, and the band between
            // interpolates smoothly.
            let scaled = if wavelen > old / low {
                inv / factor
            } else if wavelen < old / high {
                inv
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            scaled as f32
        })
        .collect()
}

fn parse_rope_scaling(v: Option<&Value>, path: &Path) -> Result<Option<RopeScaling>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str);
    match kind {
        Some("default") => return Ok(None),
        Some("llama3") => {}
        other => {
            return Err(Error::Unsupported(format!(
                "{}: rope_scaling type {} (only llama3 is supported)",
                path.display(),
                other.unwrap_or("missing")
            )))
        }
    }
    let num = |name: &str| -> Result<f64> {
        v.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::bad_model(path, format!("rope_scaling.{name} is missing or not a number")))
    };
    Ok(Some(RopeScaling {
        factor: num("factor")? as f32,
        low_freq_factor: num("low_freq_factor")? as f32,
        high_freq_factor: num("high_freq_factor")? as f32,
        original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
    }))
}

/// llama.cpp does not store Llama 3 rope scaling as metadata: it writes a `rope_freqs.weight`
/// tensor of per-pair divisors. Recover the parameters by checking the tensor against the ones
/// Meta published (factor read from the tensor, low 1, high 4, original context 8192); anything
/// else is refused rather than approximated.
fn rope_scaling_from_freqs(g: &Gguf, cfg: &ModelConfig) -> Result<Option<RopeScaling>> {
    let Some(t) = g.tensor("rope_freqs.weight") else {
        return Ok(None);
    };
    let pairs = cfg.head_dim / 2;
    if t.dtype != super::quant::DType::F32 || t.elements() != pairs {
        return Err(Error::bad_model(
            g.path(),
            format!("rope_freqs.weight is {:?} {:?}, expected f32 [{pairs}]", t.dtype, t.dims),
        ));
    }
    let divisors = super::quant::dequantize_vec(t.dtype, g.tensor_bytes(t), pairs);
    let factor = divisors.iter().cloned().fold(1.0f32, f32::max);
    let guess =
        RopeScaling { factor, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
    let plain = rope_inv_freq(cfg.rope_theta, cfg.head_dim, None);
    let scaled = rope_inv_freq(cfg.rope_theta, cfg.head_dim, Some(&guess));
    let matches = (0..pairs).all(|i| {
        let d = plain[i] / scaled[i];
        (d - divisors[i]).abs() <= 1e-3 * divisors[i].abs().max(1.0)
    });
    if !matches {
        return Err(Error::Unsupported(format!(
            "{}: rope_freqs.weight does not match Llama 3 rope scaling",
            g.path().display()
        )));
    }
    Ok(Some(guess))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::real_model_path;

    const SMOL_JSON: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "rope_scaling": null,
        "max_position_embeddings": 8192, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    }"#;

    fn p() -> &'static Path {
        Path::new("config.json")
    }

    #[test]
    fn parses_hf_config() {
        let c = ModelConfig::from_hf_json(SMOL_JSON, p()).unwrap();
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads), (576, 30, 9, 3));
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(c.tie_word_embeddings);
        // Round trip through to_hf_json.
        let again = ModelConfig::from_hf_json(&c.to_hf_json().to_string(), p()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn eos_list_and_llama3_scaling() {
        let text = SMOL_JSON.replace(r#""eos_token_id": 2"#, r#""eos_token_id": [128001, 128009]"#).replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let c = ModelConfig::from_hf_json(&text, p()).unwrap();
        assert_eq!(c.eos_token_ids, vec![128001, 128009]);
        assert_eq!(c.rope_scaling.as_ref().unwrap().factor, 8.0);
        let again = ModelConfig::from_hf_json(&c.to_hf_json().to_string(), p()).unwrap();
        assert_eq!(again, c);
    }

    /// transformers 5 writes theta and scaling as one `rope_parameters` object.
    #[test]
    fn rope_parameters_object() {
        let text = SMOL_JSON.replace(r#""rope_theta": 100000, "rope_scaling": null,"#, "").replace(
            r#""max_position_embeddings""#,
            r#""rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               "max_position_embeddings""#,
        );
        let c = ModelConfig::from_hf_json(&text, p()).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling.as_ref().unwrap().original_max_position_embeddings, 8192);
        let plain = text.replace(r#""rope_type": "llama3""#, r#""rope_type": "default""#);
        let c = ModelConfig::from_hf_json(&plain, p()).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (500000.0, true));
    }

    #[test]
    fn rejects_unsupported() {
        let mistral = SMOL_JSON
            .replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace(r#""model_type": "llama""#, r#""model_type": "mistral""#);
        match ModelConfig::from_hf_json(&mistral, p()) {
            Err(Error::Unsupported(m)) => assert!(m.contains("MistralForCausalLM"), "{m}"),
            r => panic!("{r:?}"),
        }
        let yarn = SMOL_JSON.replace(r#""rope_scaling": null"#, r#""rope_scaling": {"type": "yarn", "factor": 4}"#);
        match ModelConfig::from_hf_json(&yarn, p()) {
            Err(Error::Unsupported(m)) => assert!(m.contains("yarn"), "{m}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn rejects_bad_dims() {
        let cases = [
            (r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 2"#, "num_kv_heads"),
            (r#""num_attention_heads": 9"#, r#""num_attention_heads": 7"#, "num_heads"),
            (r#""hidden_size": 576"#, r#""hidden_size": 0"#, "hidden_size"),
            (r#""vocab_size": 49152,"#, "", "vocab_size is missing"),
            (r#""vocab_size": 49152"#, r#""vocab_size": "many""#, "vocab_size"),
            (r#""num_attention_heads": 9"#, r#""num_attention_heads": 9, "head_dim": 63"#, "odd"),
        ];
        for (from, to, want) in cases {
            match ModelConfig::from_hf_json(&SMOL_JSON.replace(from, to), p()) {
                Err(Error::BadModel { msg, .. }) => assert!(msg.contains(want), "{msg}"),
                r => panic!("{to}: {r:?}"),
            }
        }
        assert!(matches!(ModelConfig::from_hf_json("{", p()), Err(Error::BadModel { .. })));
    }

    #[test]
    fn llama3_inv_freq_matches_transformers() {
        // Values from transformers' _compute_llama3_parameters (torch 2.15, float32) for
        // Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192.
        let text = SMOL_JSON
            .replace(r#""rope_theta": 100000"#, r#""rope_theta": 500000"#)
            .replace(r#""hidden_size": 576"#, r#""hidden_size": 1152"#)
            .replace(
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
            );
        let c = ModelConfig::from_hf_json(&text, p()).unwrap();
        assert_eq!(c.head_dim, 128);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        let expected: [(usize, f64); 9] = [
            (0, 1.0),
            (1, 8.146172166e-01),
            (28, 3.211446106e-03),
            (29, 2.166570630e-03),
            (30, 1.371893683e-03),
            (33, 3.126936499e-04),
            (35, 9.556212171e-05),
            (36, 7.784655463e-05),
            (63, 3.068925878e-07),
        ];
        for (i, want) in expected {
            let got = f[i] as f64;
            assert!((got - want).abs() <= 2e-6 * want, "pair {i}: {got} vs {want}");
        }
    }

    #[test]
    fn from_real_gguf() {
        let g = Gguf::open(real_model_path()).unwrap();
        let c = ModelConfig::from_gguf(&g).unwrap();
        assert_eq!(c.arch, "llama");
        assert_eq!(c.vocab_size, 49152);
        assert_eq!((c.hidden_size, c.intermediate_size, c.num_layers), (576, 1536, 30));
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
        assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5));
        assert_eq!(c.max_position_embeddings, 8192);
        assert!(c.tie_word_embeddings && c.rope_scaling.is_none() && !c.add_bos);
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        assert!((f[1] - 100000f32.powf(-2.0 / 64.0)).abs() < 1e-7);
    }
}
