//! Chat prompts rendered with the model's own Jinja template, as transformers'
//! `apply_chat_template` does: same variables (`messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, `raise_exception`), same whitespace handling (trim_blocks,
//! lstrip_blocks), and Python string methods (`.strip()`, `.startswith()`...) through
//! minijinja-contrib's pycompat.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

/// Used when a model ships no template: ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), the
/// format of SmolLM2, Qwen and many fine-tunes. Models trained on another format will answer
/// worse with it, so prefer the model's own template whenever there is one.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles a template; `bos`/`eos` are the token strings the template may insert.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // jinja2 as transformers configures it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Template(format!("cannot compile the chat template: {e:#}")))?;
        Ok(ChatTemplate { env, source: source.to_string(), bos: bos.into(), eos: eos.into() })
    }

    /// The ChatML fallback ([`CHATML_TEMPLATE`]).
    pub fn chatml(bos: &str, eos: &str) -> ChatTemplate {
        Self::new(CHATML_TEMPLATE, bos, eos).expect("the built-in template compiles")
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends with the opening of
    /// the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| Error::Template(format!("{e:#}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| {
            // raise_exception's message is the useful part; the rest says where.
            let detail = e.detail().map(str::to_string).unwrap_or_default();
            Error::Template(format!("rendering failed: {detail} ({e:#})"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::Gguf;
    use crate::model::test_util::real_model_path;

    fn smol() -> ChatTemplate {
        let g = Gguf::open(real_model_path()).unwrap();
        ChatTemplate::new(g.get_str("tokenizer.chat_template").unwrap(), "<|im_start|>", "<|im_end|>").unwrap()
    }

    /// Expected strings from transformers 5.24.0 `apply_chat_template(..., tokenize=False)` on
    /// the tokenizer loaded from the GGUF (see tokenizer.rs tests for the command).
    #[test]
    fn renders_smollm2_like_transformers() {
        let t = smol();
        let got = t.render(&[ChatMessage::new("user", "Hi there")], true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "And 3+3?"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml("", "<|im_end|>");
        let got = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(got, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_bos_and_raise_exception() {
        let src = "{{ bos_token }}{% for m in messages %}\
            {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\
            [{{ m.content.strip() | upper }}]{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi  ")], false).unwrap(), "<s>[HI]</s>");
        match t.render(&[ChatMessage::new("tool", "x")], false) {
            Err(Error::Template(m)) => assert!(m.contains("bad role tool"), "{m}"),
            r => panic!("{r:?}"),
        }
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(Error::Template(_))));
    }
}
