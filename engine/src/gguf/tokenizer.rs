//! A GGUF's tokenizer as a Hugging Face `tokenizer.json`, and back.
//!
//! GGUF files made by llama.cpp from Hugging Face byte-level BPE tokenizers
//! (`tokenizer.ggml.model = gpt2`) keep the vocabulary (already in GPT-2's byte-to-unicode
//! alphabet), the merges, a type per token and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). The name stands for regexes that live in llama.cpp's source
//! (`llama-vocab.cpp`, `llm_tokenizer_bpe`); they are copied here for the names hearth knows, as
//! a sequence of `Split` pre-tokenizers with `Isolated` behaviour (llama.cpp's
//! `unicode_regex_split` applies each regex to the pieces of the previous one and keeps what
//! does not match as pieces too), then `ByteLevel` without its own regex. An unknown name is
//! refused rather than guessed: a wrong split gives wrong ids with no error. (candle's
//! `TokenizerFromGguf` adds a prefix space for `smollm`, which llama.cpp does not.)
//!
//! Token types (llama.cpp `llama_token_type`): 1 normal, 2 unknown, 3 control (special tokens,
//! matched in text like Hugging Face's special added tokens), 4 user-defined (added tokens that
//! are not special), 5 unused, 6 byte.

use super::file::MetaValue;
use serde_json::{json, Value};

/// The GPT-2 regex, shared by several pre-tokenizers.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3 (`llama-bpe`), as adapted in llama.cpp (case-insensitive contractions spelt out).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer names hearth maps, as (names, regexes in order).
pub const PRE_TOKENIZERS: &[(&[&str], &[&str])] = &[
    (&["default"], &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
    (&["gpt-2", "gpt2", "mpt", "olmo", "jais"], &[GPT2]),
    (&["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], &[r"\p{N}", GPT2]),
    (&["llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"], &[LLAMA3]),
    (&["qwen2", "stablelm2", "deepseek-r1-qwen"], &[QWEN2]),
];

/// The regexes of a pre-tokenizer name, or `None` when hearth does not know it.
pub fn pre_regexes(pre: &str) -> Option<&'static [&'static str]> {
    PRE_TOKENIZERS.iter().find(|(names, _)| names.contains(&pre)).map(|(_, r)| *r)
}

/// Everything of a GGUF's `tokenizer.ggml.*` that the tokenizer needs.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// Tokens by id (byte-to-unicode alphabet).
    pub tokens: Vec<String>,
    /// Type per token (1 normal, 3 control, 4 user-defined, …).
    pub token_types: Vec<i32>,
    /// BPE merges, "left right".
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Whether encoding adds BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

impl GgufVocab {
    /// Reads the tokenizer metadata; `Err` says what is missing or unsupported.
    pub fn from_metadata<'a>(get: impl Fn(&str) -> Option<&'a MetaValue>) -> std::result::Result<Self, String> {
        let model = get("tokenizer.ggml.model").and_then(|v| v.as_str().map(str::to_string));
        match model.as_deref() {
            Some("gpt2") => {}
            Some(other) => {
                return Err(format!(
                    "tokenizer.ggml.model = {other:?} is not supported (hearth reads byte-level BPE, \"gpt2\"; SentencePiece \"llama\" vocabularies are not mapped yet)"
                ))
            }
            None => return Err("it has no tokenizer (tokenizer.ggml.model is missing)".into()),
        }
        let strings = |key: &str| -> std::result::Result<Vec<String>, String> {
            let v = get(key).ok_or_else(|| format!("{key} is missing"))?;
            let items = v.as_array().ok_or_else(|| format!("{key} is not an array"))?;
            items
                .iter()
                .map(|s| s.as_str().map(str::to_string).ok_or_else(|| format!("{key} holds a non-string")))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges =
            if get("tokenizer.ggml.merges").is_some() { strings("tokenizer.ggml.merges")? } else { Vec::new() };
        let token_types = match get("tokenizer.ggml.token_type") {
            Some(v) => {
                let items = v.as_array().ok_or("tokenizer.ggml.token_type is not an array")?;
                items
                    .iter()
                    .map(|t| t.as_f64().map(|x| x as i32).ok_or("tokenizer.ggml.token_type holds a non-integer"))
                    .collect::<std::result::Result<Vec<_>, _>>()?
            }
            None => vec![1; tokens.len()],
        };
        if token_types.len() != tokens.len() {
            return Err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            ));
        }
        let pre =
            get("tokenizer.ggml.pre").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "default".into());
        if pre_regexes(&pre).is_none() {
            let known: Vec<&str> = PRE_TOKENIZERS.iter().flat_map(|(n, _)| n.iter().copied()).collect();
            return Err(format!(
                "tokenizer.ggml.pre = {pre:?} is not a pre-tokenizer hearth knows (known: {})",
                known.join(", ")
            ));
        }
        let id =
            |key: &str| get(key).and_then(|v| v.as_u64()).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        Ok(Self {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
            tokens,
            token_types,
            merges,
            pre,
        })
    }

    /// The Hugging Face `tokenizer.json` for this vocabulary.
    pub fn to_hf_json(&self) -> std::result::Result<Value, String> {
        let regexes = pre_regexes(&self.pre).ok_or_else(|| format!("unknown pre-tokenizer {:?}", self.pre))?;
        let mut vocab = serde_json::Map::with_capacity(self.tokens.len());
        for (id, tok) in self.tokens.iter().enumerate() {
            // a duplicated string keeps its first id, as llama.cpp's text-to-token map does
            vocab.entry(tok.clone()).or_insert(json!(id));
        }
        let added: Vec<Value> = self
            .tokens
            .iter()
            .zip(&self.token_types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
            .map(|(id, (tok, &ty))| {
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": ty == 3})
            })
            .collect();
        let mut pre: Vec<Value> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pre.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
        let post = match (self.add_bos, self.bos) {
            (true, Some(bos)) => {
                let tok = &self.tokens[bos as usize];
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {tok.clone(): {"id": tok, "ids": [bos], "tokens": [tok]}}})
            }
            _ => Value::Null,
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": pre_regexes(&self.pre) == pre_regexes("llama-bpe"),
                      "vocab": vocab, "merges": self.merges}
        }))
    }

    /// A vocabulary from a Hugging Face byte-level BPE `tokenizer.json` (for exporting a model
    /// that came from a safetensors folder). `pre` is the llama.cpp name whose regexes the
    /// tokenizer's pre-tokenizer uses; `None` when it matches none hearth knows.
    /// The vocabulary is padded to `vocab_size` with unused tokens, as llama.cpp's converter does.
    pub fn from_hf_json(tok: &Value, vocab_size: usize) -> std::result::Result<Self, String> {
        let model = &tok["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(format!("only BPE tokenizers can go into a GGUF (this one is {})", model["type"]));
        }
        let vocab = model["vocab"].as_object().ok_or("tokenizer.json has no model.vocab")?;
        let mut pairs: Vec<(u64, &str)> =
            vocab.iter().filter_map(|(t, id)| id.as_u64().map(|id| (id, t.as_str()))).collect();
        let added = tok["added_tokens"].as_array().cloned().unwrap_or_default();
        for a in &added {
            if let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) {
                if !pairs.iter().any(|(i, _)| *i == id) {
                    pairs.push((id, content));
                }
            }
        }
        pairs.sort();
        let n = pairs.last().map_or(0, |(id, _)| *id as usize + 1).max(vocab_size);
        let mut tokens = vec![String::new(); n];
        let mut token_types = vec![1; n];
        for (id, t) in pairs {
            tokens[id as usize] = t.to_string();
        }
        for (id, slot) in tokens.iter_mut().enumerate() {
            if slot.is_empty() {
                *slot = format!("[PAD{id}]");
                token_types[id] = 5;
            }
        }
        for a in &added {
            if let Some(id) = a["id"].as_u64() {
                token_types[id as usize] = if a["special"].as_bool() == Some(true) { 3 } else { 4 };
            }
        }
        let merges = match &model["merges"] {
            Value::Array(m) => m
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(p) if p.len() == 2 => {
                        Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
                    }
                    _ => Err("tokenizer.json has a malformed merge".to_string()),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        let pre = detect_pre(&tok["pre_tokenizer"], merges.is_empty()).ok_or(
            "its pre-tokenizer is not one whose llama.cpp name hearth knows (smollm, llama-bpe, qwen2, gpt-2, default)",
        )?;
        Ok(Self { tokens, token_types, merges, pre: pre.into(), bos: None, eos: None, add_bos: false })
    }

    /// The `tokenizer.ggml.*` metadata of this vocabulary.
    pub fn to_metadata(&self) -> Vec<(String, MetaValue)> {
        let mut out = vec![
            ("tokenizer.ggml.model".to_string(), MetaValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), MetaValue::Str(self.pre.clone())),
            ("tokenizer.ggml.tokens".to_string(), MetaValue::strings(self.tokens.iter().cloned())),
            (
                "tokenizer.ggml.token_type".to_string(),
                MetaValue::Array(5, self.token_types.iter().map(|&t| MetaValue::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges".to_string(), MetaValue::strings(self.merges.iter().cloned())),
            ("tokenizer.ggml.add_bos_token".to_string(), MetaValue::Bool(self.add_bos)),
        ];
        if let Some(b) = self.bos {
            out.push(("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(b)));
        }
        if let Some(e) = self.eos {
            out.push(("tokenizer.ggml.eos_token_id".to_string(), MetaValue::U32(e)));
        }
        out
    }
}

/// The llama.cpp pre-tokenizer name of a Hugging Face `pre_tokenizer`, by its regexes.
fn detect_pre(pre: &Value, no_merges: bool) -> Option<&'static str> {
    let mut regexes = Vec::new();
    let mut plain_byte_level = false;
    let mut visit = |p: &Value| match p["type"].as_str() {
        Some("Split") => {
            if let Some(r) = p["pattern"]["Regex"].as_str() {
                regexes.push(r.to_string());
            }
        }
        Some("ByteLevel") => {
            if p["use_regex"].as_bool() != Some(false) {
                regexes.push(format!("{GPT2}|\\s+"));
            } else {
                plain_byte_level = true;
            }
        }
        Some("Digits") => regexes.push(if p["individual_digits"].as_bool() == Some(true) {
            r"\p{N}".into()
        } else {
            r"\p{N}+".into()
        }),
        _ => {}
    };
    match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"].as_array().into_iter().flatten().for_each(&mut visit),
        _ => visit(pre),
    }
    // Without merges every byte is its own token, so any split gives the same ids.
    if no_merges && (plain_byte_level || !regexes.is_empty()) {
        return Some("default");
    }
    let norm = |r: &str| {
        r.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")
    };
    let got: Vec<String> = regexes.iter().map(|r| norm(r).trim_end_matches("|\\s+").to_string()).collect();
    let trimmed = |rs: &[&str]| -> Vec<String> { rs.iter().map(|r| r.trim_end_matches("|\\s+").to_string()).collect() };
    ["smollm", "llama-bpe", "qwen2", "gpt-2"]
        .into_iter()
        .find(|name| pre_regexes(name).is_some_and(|rs| trimmed(rs) == got))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pre_tokenizers_are_refused_by_name() {
        let (model, tokens, pre) = (
            MetaValue::Str("gpt2".into()),
            MetaValue::strings(["a".to_string(), "b".to_string()]),
            MetaValue::Str("tekken".into()),
        );
        let meta = |key: &str| match key {
            "tokenizer.ggml.model" => Some(&model),
            "tokenizer.ggml.tokens" => Some(&tokens),
            "tokenizer.ggml.pre" => Some(&pre),
            _ => None,
        };
        let err = GgufVocab::from_metadata(meta).unwrap_err();
        assert!(err.contains("\"tekken\"") && err.contains("smollm"), "{err}");
    }

    #[test]
    fn every_known_regex_compiles_in_the_tokenizers_crate() {
        for (names, _) in PRE_TOKENIZERS {
            let v = GgufVocab {
                tokens: vec!["a".into(), "b".into(), "ab".into()],
                token_types: vec![1; 3],
                merges: vec!["a b".into()],
                pre: names[0].into(),
                bos: None,
                eos: None,
                add_bos: false,
            };
            let json = v.to_hf_json().unwrap().to_string();
            let t = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&json).unwrap();
            assert_eq!(t.encode("ab", false).unwrap().get_ids(), &[2], "{}", names[0]);
        }
    }
}
