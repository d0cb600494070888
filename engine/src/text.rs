//! A model folder's text side: `tokenizer.json` through Hugging Face `tokenizers`, and the chat
//! template of `tokenizer_config.json` rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (Jinja with `trim_blocks` and `lstrip_blocks`, Python string
//! methods, `raise_exception`, `tojson`, `strftime_now`).

use crate::error::{EngineError, Result};
use hearth_api::ChatMessage;
use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind, Value as MjValue};
use serde_json::Value;
use std::path::Path;

/// The tokenizer and chat template of one model.
pub struct TextModel {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn text_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Config { path: path.display().to_string(), reason: e.to_string() }
}

/// A special token given as a string or as `{"content": "..."}` (AddedToken).
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl TextModel {
    /// Reads `tokenizer.json` and (if present) `tokenizer_config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| text_err(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| text_err(&cfg_path, e))?,
            Err(_) => Value::Null,
        };
        let fallback = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        Ok(Self::with_config(tokenizer, &cfg, fallback))
    }

    /// From the contents of a `tokenizer.json` and a `tokenizer_config.json` (e.g. built from a
    /// GGUF file's metadata); `origin` names them in errors.
    pub fn from_json(tokenizer: &Value, config: &Value, origin: &Path) -> Result<Self> {
        let tokenizer = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&tokenizer.to_string())
            .map_err(|e| text_err(origin, e))?;
        Ok(Self::with_config(tokenizer, config, None))
    }

    fn with_config(tokenizer: tokenizers::Tokenizer, cfg: &Value, template_file: Option<String>) -> Self {
        // `chat_template` is a string, or a list of {name, template} (the one named "default");
        // newer folders keep it in chat_template.jinja.
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(str::to_string)),
            _ => template_file,
        };
        Self {
            tokenizer,
            chat_template,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
        }
    }

    /// The special-token strings (`bos_token`, `eos_token`) the chat template sees.
    pub fn special_tokens(&self) -> (Option<&str>, Option<&str>) {
        (self.bos_token.as_deref(), self.eos_token.as_deref())
    }

    /// The tokenizer's `tokenizer.json`, as `tokenizers` writes it.
    pub fn tokenizer_json(&self) -> Result<Value> {
        // a loaded tokenizer serializes, and its own output parses: a failure here is a bug
        let text = self.tokenizer.to_string(false).map_err(|e| EngineError::Internal(format!("tokenizer: {e}")))?;
        serde_json::from_str(&text).map_err(|e| EngineError::Internal(format!("tokenizer: {e}")))
    }

    /// Text → ids; `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Weights(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids → text (special tokens kept unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| EngineError::Weights(format!("tokenizer: {e}")))
    }

    /// The bytes one token stands for. A token can hold part of a character (byte-level BPE
    /// splits an emoji over several tokens), which its decoded text shows only as U+FFFD: those
    /// come from the token's own string, GPT-2's byte-level alphabet or a `<0xHH>` byte fallback.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let text = self.decode(&[id], false).ok()?;
        if !text.contains('\u{FFFD}') {
            return Some(text.into_bytes());
        }
        let piece = self.tokenizer.id_to_token(id)?;
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
            return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
        }
        let alphabet = crate::tokenizer::bytes_to_unicode();
        piece.chars().map(|c| alphabet.iter().position(|&a| a == c).and_then(|b| u8::try_from(b).ok())).collect()
    }

    /// Ids the tokenizer knows (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token string (e.g. `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)` does.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| EngineError::InvalidParam {
            field: "messages",
            value: format!("{} messages", messages.len()),
            reason: "this model has no chat template (tokenizer_config.json has no `chat_template`)",
        })?;
        render_template(template, messages, add_generation_prompt, self.bos_token.as_deref(), self.eos_token.as_deref())
    }
}

/// Renders a Hugging Face chat template.
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Python's rendering of values: True/False/None, and transformers' `tojson`
    // (json.dumps: ", " and ": " separators, keys in insertion order, non-ASCII kept).
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Bool => {
            write!(out, "{}", if value.is_true() { "True" } else { "False" }).map_err(minijinja::Error::from)
        }
        ValueKind::None => write!(out, "None").map_err(minijinja::Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("tojson", |value: MjValue| -> std::result::Result<MjValue, minijinja::Error> {
        let mut s = String::new();
        python_json(&value, &mut s)?;
        Ok(MjValue::from_safe_string(s))
    });
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String {
        // UTC; enough for templates that print today's date.
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        strftime_utc(&fmt, secs)
    });
    let bad = |e: minijinja::Error| {
        let mut msg = e.to_string();
        if let Some(detail) = e.detail() {
            msg = format!("{msg}: {detail}");
        }
        EngineError::ChatTemplate(msg)
    };
    env.add_template("chat", template).map_err(bad)?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    env.get_template("chat").and_then(|t| t.render(ctx)).map_err(bad)
}

/// `json.dumps(value)` as Python writes it.
fn python_json(value: &MjValue, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    let json_err = |e: serde_json::Error| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string());
    match value.kind() {
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(&key.to_string()).map_err(json_err)?);
                out.push_str(": ");
                python_json(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_json(&item, out)?;
            }
            out.push(']');
        }
        _ => out.push_str(&serde_json::to_string(value).map_err(json_err)?),
    }
    Ok(())
}

/// The date (year, month 1-12, day 1-31) of a day counted from 1970-01-01 (Howard Hinnant's
/// civil-from-days).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The few `strftime` codes chat templates use (%Y %m %d %B %b %H %M), in UTC.
fn strftime_utc(fmt: &str, secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let (h, min) = ((secs / 3600) % 24, (secs / 60) % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('B') => out += month,
            Some('b') => out += &month[..3],
            Some('H') => out += &format!("{h:02}"),
            Some('M') => out += &format!("{min:02}"),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_knows_the_calendar() {
        // 2026-11-23 09:05 UTC
        assert_eq!(strftime_utc("%d %B %Y %H:%M (%b/%m)", 1_795_424_700), "23 November 2026 09:05 (Nov/11)");
        assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    /// A token holding part of a character gives its own byte, not U+FFFD's three; whole
    /// characters and special tokens give their UTF-8.
    #[test]
    fn token_bytes_of_a_partial_character_are_its_own() {
        let t = TextModel::from_json(
            &crate::tokenizer::ByteTokenizer.to_hf_json(),
            &Value::Null,
            Path::new("byte tokenizer"),
        )
        .unwrap();
        let ids = t.encode("é!", false).unwrap();
        assert_eq!(ids, vec![0xC3, 0xA9, u32::from(b'!')]);
        assert_eq!(t.decode(&ids[..1], false).unwrap(), "\u{FFFD}");
        assert_eq!(t.token_bytes(0xC3), Some(vec![0xC3]));
        assert_eq!(t.token_bytes(0xA9), Some(vec![0xA9]));
        assert_eq!(t.token_bytes(u32::from(b' ')), Some(vec![b' ']));
        assert_eq!(t.token_bytes(256), Some(t.decode(&[256], false).unwrap().into_bytes()));
    }
}
