//! Text <-> token ids, through the `tokenizers` crate so behaviour matches Hugging Face.
//!
//! A Hugging Face model ships `tokenizer.json`, which we load as is. A GGUF file carries the
//! vocabulary, merges and token types as metadata, plus a `tokenizer.ggml.pre` name that tells
//! llama.cpp which pre-tokenizer regex the original tokenizer used; we rebuild the equivalent
//! `tokenizers` pipeline from those.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::gguf::Gguf;
use crate::error::{Error, Result};

/// The pre-tokenizer regex of Llama 3 (llama.cpp's "llama-bpe"), as in Meta's tokenizer.json.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. BOS/EOS are unknown until [`Self::with_specials`]
    /// (they live in other files), except that a post-processor adding a token first is taken
    /// as "add BOS".
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::bad_model(path, "tokenizer.json is missing"));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::bad_model(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Tokenizer { inner, bos_id: None, eos_ids: vec![], add_bos: false })
    }

    /// Sets the BOS id, the ids that end generation, and whether encoding prepends BOS.
    pub fn with_specials(mut self, bos_id: Option<u32>, eos_ids: Vec<u32>, add_bos: bool) -> Self {
        self.bos_id = bos_id;
        self.eos_ids = eos_ids;
        self.add_bos = add_bos && bos_id.is_some();
        self
    }

    /// Rebuilds the tokenizer from GGUF metadata. Only byte-level BPE ("gpt2") is supported.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let path = g.path();
        let bad = |msg: &str| Error::bad_model(path, msg.to_string());
        match g.get_str("tokenizer.ggml.model") {
            Some("gpt2") => {}
            Some(m) => {
                return Err(Error::Unsupported(format!(
                    "{}: tokenizer model {m:?} (only byte-level BPE \"gpt2\" is supported)",
                    path.display()
                )))
            }
            None => return Err(bad("tokenizer.ggml.model is missing")),
        }
        let tokens = g
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| bad("tokenizer.ggml.tokens is missing or not a string array"))?;
        let merges = g
            .get_str_array("tokenizer.ggml.merges")
            .ok_or_else(|| bad("tokenizer.ggml.merges is missing or not a string array"))?;
        let types = match g.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => g
                .get_int_array("tokenizer.ggml.token_type")
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| bad("tokenizer.ggml.token_type does not match the tokens"))?,
        };
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: pre-tokenizer {pre:?} (supported: gpt2/default, smollm/starcoder family, \
                 llama-bpe)",
                path.display()
            ))
        })?;

        // The first occurrence of a duplicated token string keeps its id, as in llama.cpp.
        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(id as u32);
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(&format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(&format!("bad BPE vocabulary: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (<|im_start|>...) are special: one id each, skipped when decoding with
        // skip_special. User-defined tokens are still matched whole but are ordinary text, so
        // decoding never drops them.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let id = |key: &str| g.get_u32(key).filter(|&i| (i as usize) < tokens.len());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let mut eos_ids = vec![];
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(i) = id(key).filter(|i| !eos_ids.contains(i)) {
                eos_ids.push(i);
            }
        }
        let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        // Put BOS in the post-processor too, so a saved tokenizer.json behaves the same in
        // Hugging Face tools.
        if let (true, Some(b)) = (add_bos, bos_id) {
            let bos = tokens[b as usize].to_string();
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|t| t.try_pair(format!("{bos} $A {bos}:1 $B:1")))
                .map_err(|e| bad(&format!("BOS template: {e}")))?
                .special_tokens(vec![(bos, b)])
                .build()
                .map_err(|e| bad(&format!("BOS template: {e}")))?;
            inner.with_post_processor(Some(post));
        }
        Ok(Tokenizer { inner, bos_id, eos_ids, add_bos })
    }

    /// Encodes text. `add_special`: add BOS if the model asks for it. Special-token text in
    /// `text` (e.g. "<|im_start|>") always becomes the special token's id.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        // tokenizer.json files do not always add BOS themselves (transformers adds it in Python
        // for some tokenizer classes), so make sure of it here.
        if let (true, true, Some(b)) = (add_special, self.add_bos, self.bos_id) {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    /// The token's string in the vocabulary (byte-level form, e.g. "Ġthe").
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    /// Ids of special (control) tokens.
    pub fn special_ids(&self) -> HashSet<u32> {
        self.inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect()
    }
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| Error::io(path, std::io::Error::other(format!("cannot save tokenizer: {e}"))))
    }

    /// A decoder for streaming generated ids out as text.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special)
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, mirroring llama.cpp's table, and whether
/// BPE should take whole words found in the vocabulary without merging (Llama 3 does).
fn pre_tokenizer_for(pre: &str) -> Option<(PreTokenizerWrapper, bool)> {
    let byte_level = ByteLevel::new(false, true, true);
    Some(match pre {
        // GPT-2's regex, which ByteLevel applies itself.
        "default" | "gpt2" | "mpt" | "olmo" | "jais" => (byte_level.into(), false),
        // llama.cpp splits every digit off first ("\p{N}"), as the original tokenizer.json of
        // these models does with Digits(individual_digits).
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => {
            (Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(), false)
        }
        "llama-bpe" | "llama3" => {
            let split =
                Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false).ok()?;
            (Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into(), true)
        }
        _ => return None,
    })
}

/// Turns generated ids into text one id at a time without splitting a multi-byte character:
/// a character's bytes may be spread over several byte-level tokens, so text is only emitted
/// once the decoded window is valid UTF-8 (no U+FFFD at its end).
///
/// It decodes a short window (the ids since the last emission plus the few before them, as
/// context for tokenizers whose decoding of a token depends on its neighbour) and emits only
/// what the new id added.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the context window in `ids`.
    prefix: usize,
    /// End of what has already been emitted.
    read: usize,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder { skip_special, ..Default::default() }
    }

    /// Adds one id; returns the new text, if a complete piece is ready.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = tok.decode(&self.ids[self.prefix..], self.skip_special)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new = match now.strip_prefix(before.as_str()) {
            Some(s) => s.to_string(),
            // The context decoded differently on its own; emit everything after the longest
            // common prefix (on a character boundary).
            None => {
                let common = now
                    .char_indices()
                    .zip(before.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                now[common..].to_string()
            }
        };
        // Keep the just-emitted ids as context, drop what is older.
        self.prefix = self.read;
        self.read = self.ids.len();
        if self.prefix > 0 {
            self.ids.drain(..self.prefix);
            self.read -= self.prefix;
            self.prefix = 0;
        }
        Ok(Some(new))
    }

    /// Whatever is still pending (e.g. an incomplete character at the end of generation),
    /// decoded as is.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = tok.decode(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.strip_prefix(before.as_str()).unwrap_or(&now).to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::test_util::real_model_path;

    fn smol() -> Tokenizer {
        Tokenizer::from_gguf(&Gguf::open(real_model_path()).unwrap()).unwrap()
    }

    /// Expected ids from Hugging Face transformers 5.24.0 loading the GGUF itself:
    ///   python3 -c "from transformers import AutoTokenizer as A; t = A.from_pretrained(
    ///     'models/cache', gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf');
    ///     print(t.encode(TEXT, add_special_tokens=False))"
    pub(crate) const HF_CASES: &[(&str, &[u32])] = &[
        ("Hello, world!", &[19556, 28, 905, 17]),
        ("  leading spaces and   multiple   gaps ", &[216, 2899, 5600, 284, 256, 2701, 256, 10134, 216]),
        ("line one\nline two\n\n\ttabbed\r\n", &[1311, 582, 198, 1311, 827, 1116, 197, 15999, 5776, 2738]),
        (
            "Numbers: 1234567 3.14159 -42 1,000,000",
            &[
                39006, 42, 216, 33, 34, 35, 36, 37, 38, 39, 216, 35, 30, 33, 36, 33, 37, 41, 731, 36, 34, 216, 33, 28,
                32, 32, 32, 28, 32, 32, 32,
            ],
        ),
        (
            "Unicode: café naïve Ünïcödé 日本語テキスト Привет",
            &[
                3706, 15817, 42, 37366, 15486, 46494, 5549, 246, 94, 25972, 83, 7466, 84, 2756, 17097, 241, 115, 40993,
                179, 120, 248, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 5470, 249, 46879, 16464, 32547,
            ],
        ),
        (
            "Emoji: 😀👍🏽 🇺🇸 family 👨\u{200d}👩\u{200d}👧",
            &[
                10809, 33777, 42, 40303, 218, 10813, 235, 231, 10813, 233, 138, 15107, 225, 135, 10813, 225, 133, 1564,
                15107, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117,
            ],
        ),
        (
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            &[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
        ),
        ("don't won't I'm we'll they've", &[12420, 982, 3763, 982, 339, 5248, 392, 3060, 502, 3543]),
        ("fn main() { println!(\"hi\"); }", &[7853, 1085, 1000, 1662, 1628, 34115, 17, 1470, 6004, 21646, 4029]),
    ];

    #[test]
    fn gguf_tokenizer_matches_transformers() {
        let t = smol();
        for (text, want) in HF_CASES {
            assert_eq!(t.encode(text, true).unwrap(), *want, "{text:?}");
            assert_eq!(t.decode(want, false).unwrap(), *text);
        }
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!((t.bos_id(), t.eos_ids(), t.add_bos()), (Some(1), &[2u32][..], false));
        assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
        assert_eq!(t.id_to_token(216).as_deref(), Some("Ġ"));
        assert_eq!(t.special_ids().len(), 17);
        assert_eq!(t.decode(&[1, 4093, 198, 2], true).unwrap(), "user\n");
    }

    /// Whitespace before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own
    /// tokenizer.json, Digits(individual_digits) then ByteLevel) splits the digit off first, so
    /// "  " stays one piece and becomes "ĠĠ" (256). transformers' GGUF loader ignores
    /// tokenizer.ggml.pre and gives [104, 216, 216, 33] here; we follow the model's own
    /// tokenizer. Ids from python `tokenizers` with that pre-tokenizer sequence.
    #[test]
    fn digits_split_first_like_llama_cpp() {
        let t = smol();
        assert_eq!(t.encode("x  1", false).unwrap(), vec![104, 256, 33]);
        assert_eq!(t.encode("abc  123", false).unwrap(), vec![25276, 256, 33, 34, 35]);
    }

    #[test]
    fn stream_decoder_never_splits_characters() {
        let t = smol();
        for (text, ids) in HF_CASES {
            let mut s = t.stream_decoder(false);
            let mut out = String::new();
            for &id in *ids {
                if let Some(piece) = s.push(&t, id).unwrap() {
                    assert!(!piece.contains('\u{FFFD}'), "{text:?}: {piece:?}");
                    out.push_str(&piece);
                }
            }
            out.push_str(&s.flush(&t).unwrap());
            assert_eq!(out, *text);
        }
        // A lone first byte of a 4-byte character emits nothing until flushed.
        let mut s = t.stream_decoder(false);
        assert_eq!(s.push(&t, 10813).unwrap(), None);
        assert!(s.flush(&t).unwrap().contains('\u{FFFD}'));
    }

    #[test]
    fn save_and_reload() {
        let t = smol();
        let d = crate::model::test_util::test_dir("tok");
        let p = d.join("tokenizer.json");
        t.save(&p).unwrap();
        let back = Tokenizer::from_file(&p).unwrap().with_specials(Some(1), vec![2], false);
        for (text, want) in HF_CASES {
            assert_eq!(back.encode(text, true).unwrap(), *want, "{text:?}");
        }
        assert_eq!(back.encode("x  1", false).unwrap(), vec![104, 256, 33]);
    }

    #[test]
    fn bad_tokenizer_json() {
        let d = crate::model::test_util::test_dir("badtok");
        std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap();
        match Tokenizer::from_file(d.join("tokenizer.json")) {
            Err(Error::BadModel { msg, .. }) => assert!(msg.contains("cannot load"), "{msg}"),
            r => panic!("{r:?}"),
        }
    }
}
