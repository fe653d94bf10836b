//! Writes a loaded model as a Hugging Face directory (config.json, model.safetensors in f16,
//! tokenizer.json, tokenizer_config.json, generation_config.json), so GGUF models can be checked
//! against, or run by, Hugging Face tools.

use std::path::Path;

use half::f16;
use serde_json::{json, Value};

use super::weights::ModelFiles;
use crate::error::{Error, Result};

/// Converts `model` into `out_dir` (created if needed). Weights are dequantized to f16 in
/// Hugging Face orientation (GGUF's Q/K row permutation already undone by the loader).
pub fn convert_to_hf(model: &ModelFiles, out_dir: impl AsRef<Path>) -> Result<()> {
    let out = out_dir.as_ref();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = json!("float16");
    write_json(&out.join("config.json"), &config)?;

    // Sorted for a deterministic file.
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort();
    let halves: Vec<(&String, Vec<usize>, Vec<u8>)> = names
        .into_iter()
        .map(|n| {
            let t = &model.tensors[n];
            let bytes = t.to_f32().into_iter().flat_map(|x| f16::from_f32(x).to_le_bytes()).collect();
            (n, t.shape(), bytes)
        })
        .collect();
    let st_path = out.join("model.safetensors");
    let views = halves
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, shape.clone(), b)
                .map(|v| (n.as_str(), v))
                .map_err(|e| Error::Other(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    safetensors::serialize_to_file(views, Some(meta), &st_path)
        .map_err(|e| Error::io(&st_path, std::io::Error::other(e.to_string())))?;

    model.tokenizer.save(out.join("tokenizer.json"))?;

    let tok = &model.tokenizer;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).map_or(Value::Null, Value::from);
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id()),
        "eos_token": name(tok.eos_ids().first().copied()),
        "add_bos_token": tok.add_bos(),
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model.config.max_position_embeddings,
    });
    if let Some(t) = &model.chat_template {
        tc["chat_template"] = json!(t.source());
    }
    write_json(&out.join("tokenizer_config.json"), &tc)?;

    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": model.config.eos_token_ids,
        }),
    )
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chat::ChatMessage;
    use crate::model::quant::DType;
    use crate::model::test_util::{real_model_path, test_dir};
    use crate::model::tokenizer::tests::HF_CASES;

    #[test]
    fn real_gguf_to_hf_and_back() {
        let src = ModelFiles::open(real_model_path()).unwrap();
        let dir = test_dir("convert");
        convert_to_hf(&src, &dir).unwrap();
        let hf = ModelFiles::open(&dir).unwrap();

        assert_eq!(hf.config, src.config);
        for (text, want) in HF_CASES {
            assert_eq!(hf.tokenizer.encode(text, true).unwrap(), *want, "{text:?}");
        }
        assert_eq!(hf.tokenizer.encode("x  1", true).unwrap(), vec![104, 256, 33]);
        assert_eq!(hf.tokenizer.eos_ids(), src.tokenizer.eos_ids());
        let msgs = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            hf.chat_template.as_ref().unwrap().render(&msgs, true).unwrap(),
            src.chat_template.as_ref().unwrap().render(&msgs, true).unwrap()
        );

        assert_eq!(hf.tensors.len(), src.tensors.len());
        for name in [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.self_attn.k_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
        ] {
            let (a, b) = (&src.tensors[name], &hf.tensors[name]);
            assert_eq!((b.dtype, b.shape()), (DType::F16, a.shape()), "{name}");
            let want: Vec<f32> = a.to_f32().iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            assert!(want == b.to_f32(), "{name} differs beyond f16 rounding");
        }
    }
}
