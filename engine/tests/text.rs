//! Tokenizer (HF `tokenizers`) and chat templates (minijinja) against transformers' rendering.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use hearth_api::ChatMessage;
use hearth_engine::text::{render_template, TextModel};
use hearth_engine::tokenizer::{ByteTokenizer, EOS_ID};
use hearth_engine::EngineError;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    template: String,
    source: String,
    bos_token: String,
    eos_token: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[test]
fn chat_templates_render_as_transformers_does() {
    let text = std::fs::read_to_string(common::fixture_dir("chat").join("cases.json")).unwrap();
    let cases: Cases = serde_json::from_str(&text).unwrap();
    assert!(cases.cases.len() >= 30);
    for c in cases.cases {
        let got =
            render_template(&c.source, &c.messages, c.add_generation_prompt, Some(&c.bos_token), Some(&c.eos_token));
        let what =
            format!("{} ({} messages, generation prompt {})", c.template, c.messages.len(), c.add_generation_prompt);
        match (c.expected, c.error) {
            (Some(want), None) => assert_eq!(got.unwrap(), want, "{what}"),
            (None, Some(msg)) => {
                let err = got.unwrap_err();
                assert!(matches!(err, EngineError::ChatTemplate(_)), "{what}: {err}");
                assert!(err.to_string().contains(&msg), "{what}: `{err}` should carry `{msg}`");
                assert!(err.is_user_error());
            }
            _ => panic!("bad fixture {what}"),
        }
    }
}

#[test]
fn preset_tokenizer_loads_through_tokenizers_and_matches_the_byte_tokenizer() {
    let base = common::tiny();
    let text = TextModel::from_dir(&base.source).unwrap();
    assert_eq!(text.vocab_size(), 259);
    for s in ["hello world", "  leading spaces\nand lines", "Ünïcode ✓ 🔥", ""] {
        let ids = text.encode(s, false).unwrap();
        assert_eq!(ids, ByteTokenizer.encode(s), "{s:?}");
        assert_eq!(text.decode(&ids, false).unwrap(), s);
    }
    assert_eq!(text.token_to_id("<|endoftext|>"), Some(EOS_ID));
    assert_eq!(text.encode("<|im_start|>user", false).unwrap()[0], 257, "special tokens are parsed in text");
    let chat = text.render_chat(&[ChatMessage::new("user", "hi")], true).unwrap();
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn a_model_without_a_template_says_so() {
    let dir = common::fixture_dir("llama"); // no tokenizer files at all
    let err = TextModel::from_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
