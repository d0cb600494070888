//! The byte-level tokenizer of the generated presets: one token per byte (ids 0–255, in
//! GPT-2's byte-to-unicode alphabet, no merges) plus ChatML special tokens. It is written as a
//! Hugging Face `tokenizer.json`, so Python's `tokenizers` reads the same ids.

use serde_json::{json, Value};

/// Special tokens after the 256 byte tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Id of `<|endoftext|>`.
pub const EOS_ID: u32 = 256;

/// Number of ids the byte tokenizer defines.
pub const BYTE_VOCAB_SIZE: usize = 256 + SPECIAL_TOKENS.len();

/// One token per byte, plus the special tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Text → ids (special-token strings are not parsed; use their ids directly).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Ids → text; special tokens are written out, ids beyond the tokenizer are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                _ => {
                    if let Some(s) = SPECIAL_TOKENS.get(id as usize - 256) {
                        bytes.extend_from_slice(s.as_bytes());
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The Hugging Face `tokenizer.json` for this tokenizer.
    pub fn to_hf_json(&self) -> Value {
        let alphabet = bytes_to_unicode();
        let vocab: serde_json::Map<String, Value> =
            alphabet.iter().enumerate().map(|(b, c)| (c.to_string(), json!(b))).collect();
        let added: Vec<Value> = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        })
    }
}

/// GPT-2's reversible byte → printable-character map (index = byte).
pub(crate) fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_utf8_and_maps_space_like_gpt2() {
        let t = ByteTokenizer;
        let ids = t.encode("héllo ✓");
        assert_eq!(t.decode(&ids), "héllo ✓");
        assert_eq!(bytes_to_unicode()[b' ' as usize], 'Ġ');
        let alphabet = bytes_to_unicode();
        let unique: std::collections::HashSet<_> = alphabet.iter().collect();
        assert_eq!(unique.len(), 256);
    }
}
