//! The generated tokenizer (byte-level BPE over the 256 GPT-2 byte symbols, a few merges,
//! Llama 3's control tokens, `<|reserved_N|>` fillers up to the vocabulary size) and the files
//! around the weights: GGUF metadata, or config.json and the tokenizer files of a Hugging Face
//! directory.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::{MetaValue, DEFAULT_ALIGNMENT};
use crate::model::quant::DType;

/// A few merges so the BPE does some merging; every part exists before it is used.
const MERGES: [(&str, &str); 10] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("Ġ", "s"),
];

/// Control tokens after the bytes and merges, Llama 3's names. Filler `<|reserved_N|>`
/// control tokens take the rest of the vocabulary.
const SPECIALS: [&str; 5] =
    ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];

/// Llama 3's chat format.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}\
<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}\
<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// BOS (`<|begin_of_text|>`) and the EOS ids (`<|end_of_text|>`, `<|eot_id|>`).
pub(super) fn special_ids() -> (u32, [u32; 2]) {
    let first = (256 + MERGES.len()) as u32;
    (first, [first + 1, first + 4])
}

/// GPT-2's byte-to-character table of byte-level BPE: printable bytes stand for themselves,
/// the rest map to code points from 256 on.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// All token strings by id, and whether each is a control token.
fn vocab(size: usize) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = byte_symbols().into_iter().map(|c| (c.to_string(), false)).collect();
    v.extend(MERGES.iter().map(|(a, b)| (format!("{a}{b}"), false)));
    v.extend(SPECIALS.iter().map(|s| (s.to_string(), true)));
    let fixed = v.len();
    v.extend((0..size.saturating_sub(fixed)).map(|i| (format!("<|reserved_{i}|>"), true)));
    v.truncate(size);
    v
}

pub(super) fn gguf_metadata(c: &ModelConfig, dtype: DType) -> Vec<(String, MetaValue)> {
    let u = |n: usize| MetaValue::U32(n as u32);
    let s = |x: &str| MetaValue::Str(x.into());
    let tokens = vocab(c.vocab_size);
    let (bos, eos) = special_ids();
    // llama.cpp's file type ids (LLAMA_FTYPE_*).
    let ftype = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::BF16 => 32,
    };
    [
        ("general.architecture", s("llama")),
        ("general.name", s(&format!("synthetic {}", dtype.name()))),
        ("general.alignment", u(DEFAULT_ALIGNMENT)),
        ("general.file_type", MetaValue::U32(ftype)),
        ("llama.vocab_size", u(c.vocab_size)),
        ("llama.context_length", u(c.max_position_embeddings)),
        ("llama.embedding_length", u(c.hidden_size)),
        ("llama.feed_forward_length", u(c.intermediate_size)),
        ("llama.block_count", u(c.num_layers)),
        ("llama.attention.head_count", u(c.num_heads)),
        ("llama.attention.head_count_kv", u(c.num_kv_heads)),
        ("llama.attention.key_length", u(c.head_dim)),
        ("llama.attention.value_length", u(c.head_dim)),
        ("llama.rope.dimension_count", u(c.head_dim)),
        ("llama.rope.freq_base", MetaValue::F32(c.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(c.rms_norm_eps)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        ("tokenizer.ggml.tokens", MetaValue::Array(tokens.iter().map(|(t, _)| s(t)).collect())),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(tokens.iter().map(|&(_, control)| MetaValue::I32(if control { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges", MetaValue::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect())),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(bos)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(eos[0])),
        ("tokenizer.ggml.eot_token_id", MetaValue::U32(eos[1])),
        ("tokenizer.ggml.add_bos_token", MetaValue::Bool(c.add_bos)),
        ("tokenizer.chat_template", s(CHAT_TEMPLATE)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The same tokenizer as the GGUF metadata describes, built the way the GGUF loader builds it.
pub(super) fn hf_tokenizer(c: &ModelConfig) -> Result<tokenizers::Tokenizer> {
    let tokens = vocab(c.vocab_size);
    let err = |e: tokenizers::Error| Error::Tokenizer(format!("building the synthetic tokenizer: {e}"));
    let mut v = Vocab::default();
    for (id, (t, _)) in tokens.iter().enumerate() {
        v.insert(t.clone(), id as u32);
    }
    let merges = MERGES.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let bpe = BPE::builder().vocab_and_merges(v, merges).build().map_err(err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> =
        tokens.iter().filter(|(_, control)| *control).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
    tok.add_special_tokens(&specials);
    if c.add_bos {
        let (bos, _) = special_ids();
        let name = SPECIALS[0];
        let post = TemplateProcessing::builder()
            .try_single(format!("{name} $A"))
            .and_then(|t| t.try_pair(format!("{name} $A {name}:1 $B:1")))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .special_tokens(vec![(name.to_string(), bos)])
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_post_processor(Some(post));
    }
    Ok(tok)
}

/// config.json, generation_config.json, tokenizer.json and tokenizer_config.json.
pub(super) fn write_hf_files(c: &ModelConfig, dtype: DType, dir: &Path) -> Result<()> {
    let write_json = |name: &str, v: &Value| {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    let mut config = c.to_hf_json();
    config["torch_dtype"] = json!(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        _ => "float16",
    });
    write_json("config.json", &config)?;
    write_json("generation_config.json", &json!({ "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids }))?;
    let path = dir.join("tokenizer.json");
    hf_tokenizer(c)?
        .save(&path, false)
        .map_err(|e| Error::io(&path, std::io::Error::other(format!("cannot save tokenizer: {e}"))))?;
    write_json(
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIALS[0],
            "eos_token": SPECIALS[1],
            "add_bos_token": c.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": c.max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
        }),
    )
}
