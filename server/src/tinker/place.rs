//! A training request's place in its model's order (`model_id`, `seq_id`) and what it asked (a
//! key), read from its body before anything else is checked, so that a request refused for its
//! content still uses up its `seq_id` (`sequencer.rs`).

use super::proto;
use crate::error::ApiError;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use futures_util::StreamExt;
use prost::Message;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// How much of a body over `--max-body-bytes` is kept: enough for its `model_id` and `seq_id`.
const PREFIX: usize = 4096;
/// How much of a body past `--max-body-bytes` is read (and dropped) before the 413.
const DRAIN: usize = 8 << 20;

/// A training request's place in its model's order, read before anything else is checked.
pub(super) struct Place {
    pub model_id: String,
    pub seq_id: i64,
}

/// What a request asked, as a key: a retry under the same `seq_id` must ask the same.
pub(super) fn body_key(route: &str, body: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    route.hash(&mut h);
    body.hash(&mut h);
    h.finish()
}

/// What a `forward_backward` asked, as a key: its fields, map entries in key order (a retry
/// whose maps were encoded in another order asks the same).
pub(super) fn fb_key(req: &proto::ForwardBackwardRequest) -> u64 {
    fn sorted<K: Ord + Hash, V>(map: &HashMap<K, V>, bytes: impl Fn(&V) -> Vec<u8>) -> Vec<(&K, Vec<u8>)> {
        let mut entries: Vec<_> = map.iter().map(|(k, v)| (k, bytes(v))).collect();
        entries.sort();
        entries
    }
    let mut h = std::hash::DefaultHasher::new();
    ("forward_backward", &req.model_id, req.seq_id, &req.loss_fn, req.forward_only).hash(&mut h);
    sorted(&req.loss_fn_config, |v| v.to_le_bytes().to_vec()).hash(&mut h);
    sorted(&req.loss_fn_config_v2, Message::encode_to_vec).hash(&mut h);
    req.data.len().hash(&mut h);
    for d in &req.data {
        d.model_input.iter().map(Message::encode_to_vec).collect::<Vec<_>>().hash(&mut h);
        sorted(&d.loss_fn_inputs, Message::encode_to_vec).hash(&mut h);
    }
    h.finish()
}

/// A JSON training request: its body as a value, the body's key (of its canonical text, so
/// spacing does not matter), and its place if it names a `model_id` and an integer `seq_id`.
pub(super) fn json_request(
    route: &str,
    b: Result<Bytes, BytesRejection>,
) -> Result<(Value, u64, Option<Place>), ApiError> {
    let v: Value = crate::http::parse_body(b)?;
    let key = body_key(route, v.to_string().as_bytes());
    let place = match (v.get("model_id").and_then(Value::as_str), v.get("seq_id").and_then(Value::as_i64)) {
        (Some(m), Some(seq_id)) => Some(Place { model_id: m.to_string(), seq_id }),
        _ => None,
    };
    Ok((v, key, place))
}

/// A JSON value as a typed request; an error names the field, as a body parsed at once does.
pub(super) fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(crate::http::field_error)
}

/// A body of at most `limit` bytes, and `true`; or, over the limit, its first [`PREFIX`] bytes
/// and `false`. The rest of a body over the limit is read and dropped, up to [`DRAIN`] bytes
/// more, so that a client still sending it gets the 413 rather than a reset connection.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<(Vec<u8>, bool), ApiError> {
    let declared = HttpBody::size_hint(&body).lower();
    let mut over = declared > limit as u64;
    // too much to drain: stop once the prefix is in
    let hopeless = declared > limit.saturating_add(DRAIN) as u64;
    let mut stream = body.into_data_stream();
    let (mut kept, mut read) = (Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
        read = read.saturating_add(chunk.len());
        over |= read > limit;
        let room = if over { PREFIX.saturating_sub(kept.len()) } else { chunk.len() };
        kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
        if over && (read > limit.saturating_add(DRAIN) || hopeless && kept.len() >= PREFIX) {
            break;
        }
    }
    if over {
        kept.truncate(PREFIX);
    }
    Ok((kept, !over))
}

/// `model_id` (field 1) and `seq_id` (field 2) of a `ForwardBackwardRequest` from its first
/// bytes, where the SDK writes them (protobuf serialisers write fields in number order): found
/// even when the rest does not decode or was not read. No `seq_id` reads as 0, as in protobuf.
pub(super) fn proto_place(mut buf: &[u8]) -> Option<Place> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let (mut model_id, mut seq_id) = (None, 0);
    while let Ok(field) = decode_key(&mut buf) {
        match field {
            (1, WireType::LengthDelimited) => {
                let Some(n) = decode_varint(&mut buf).ok().and_then(|n| usize::try_from(n).ok()) else { break };
                let Some(text) = buf.get(..n).and_then(|b| std::str::from_utf8(b).ok()) else { break };
                model_id = Some(text.to_string());
                buf = &buf[n..];
            }
            // an int32 travels as a 64-bit varint: its low 32 bits are the value
            (2, WireType::Varint) => match decode_varint(&mut buf) {
                Ok(v) => seq_id = i64::from(v as i32),
                Err(_) => break,
            },
            _ => break,
        }
    }
    model_id.filter(|m| !m.is_empty()).map(|model_id| Place { model_id, seq_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_backward_names_its_place_in_its_first_bytes() {
        let req = proto::ForwardBackwardRequest {
            model_id: "s1:train:0".into(),
            seq_id: 7,
            loss_fn: "cross_entropy".into(),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let place = |b: &[u8]| proto_place(b).map(|p| (p.model_id, p.seq_id));
        let want = Some(("s1:train:0".to_string(), 7));
        // whole, cut short after the two fields, followed by garbage
        assert_eq!(place(&bytes), want);
        assert_eq!(place(&bytes[..14]), want);
        assert_eq!(place(&[&bytes[..14], &b"\xff\xff\xff\x01"[..]].concat()), want);
        // a negative int32 is a ten-byte varint
        let neg = proto::ForwardBackwardRequest { seq_id: -3, ..req.clone() }.encode_to_vec();
        assert_eq!(place(&neg).map(|p| p.1), Some(-3));
        // the key: what was asked, whatever order the maps were encoded in
        let with = |pairs: &[(&str, f64)]| proto::ForwardBackwardRequest {
            loss_fn_config: pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            ..req.clone()
        };
        let (ab, ba) = (with(&[("a", 1.0), ("b", 2.0), ("c", 3.0)]), with(&[("c", 3.0), ("b", 2.0), ("a", 1.0)]));
        assert_eq!(fb_key(&ab), fb_key(&ba));
        assert_ne!(fb_key(&ab), fb_key(&with(&[("a", 1.0), ("b", 2.5), ("c", 3.0)])));
        assert_ne!(fb_key(&req), fb_key(&proto::ForwardBackwardRequest { forward_only: true, ..req.clone() }));
        // no model_id, a cut model_id, zeros: no place
        assert_eq!(place(&proto::ForwardBackwardRequest { seq_id: 2, ..Default::default() }.encode_to_vec()), None);
        assert_eq!(place(&bytes[..5]), None);
        assert_eq!(place(&[0u8; 64]), None);
    }
}
