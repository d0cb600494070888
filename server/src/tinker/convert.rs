//! Tinker's protobuf bodies to hearth's types and back: datums and their tensors in,
//! `forward_backward` and sample outputs out.

use super::*;

/// Tensor bytes as numbers.
pub(super) fn tensor_values(name: &str, t: &proto::Tensor) -> Result<Vec<f64>, ApiError> {
    let Some(proto::tensor::Encoding::Dense(bytes)) = &t.encoding else {
        return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: only dense tensors are taken")));
    };
    let chunks = |n: usize| -> Result<std::slice::ChunksExact<'_, u8>, ApiError> {
        if bytes.len() % n != 0 {
            return Err(ApiError::invalid(format!(
                "loss_fn_inputs.{name}: {} bytes is not a whole number of {n}-byte values",
                bytes.len()
            )));
        }
        Ok(bytes.chunks_exact(n))
    };
    let arr = |c: &[u8], n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(c);
        a
    };
    let v: Vec<f64> = match proto::DType::try_from(t.dtype) {
        Ok(proto::DType::Float32) => {
            chunks(4)?.map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        Ok(proto::DType::Int64) => chunks(8)?.map(|c| i64::from_le_bytes(arr(c, 8)) as f64).collect(),
        Ok(proto::DType::Int32) => {
            chunks(4)?.map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        Ok(proto::DType::Bfloat16) => {
            chunks(2)?.map(|c| f64::from(f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))).collect()
        }
        _ => {
            return Err(ApiError::invalid(format!(
                "loss_fn_inputs.{name}: dtype {} is not float32, int64, int32 or bfloat16",
                t.dtype
            )))
        }
    };
    let elems: i64 = t.shape.iter().product();
    if !t.shape.is_empty() && elems as usize != v.len() {
        return Err(ApiError::invalid(format!("loss_fn_inputs.{name}: shape {:?} but {} values", t.shape, v.len())));
    }
    if t.shape.len() > 1 {
        return Err(ApiError::invalid(format!(
            "loss_fn_inputs.{name}: shape {:?}; hearth takes one value per position",
            t.shape
        )));
    }
    Ok(v)
}

/// A protobuf datum as hearth's.
pub(super) fn datum_of(i: usize, d: &proto::Datum) -> Result<Datum, ApiError> {
    let mut tokens = Vec::new();
    for c in &d.model_input {
        match &c.chunk {
            Some(proto::chunk::Kind::EncodedText(t)) => {
                if t.tokens.len() % 4 != 0 {
                    return Err(ApiError::invalid(format!("data[{i}].model_input: token bytes are not int32s")));
                }
                for b in t.tokens.chunks_exact(4) {
                    let id = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    tokens.push(
                        u32::try_from(id).map_err(|_| {
                            ApiError::invalid(format!("data[{i}].model_input: token id {id} is negative"))
                        })?,
                    );
                }
            }
            None => {
                return Err(ApiError::invalid(format!(
                    "data[{i}].model_input: only encoded_text chunks are taken (images are not supported)"
                )))
            }
        }
    }
    let mut inputs = LossFnInputs::default();
    for (name, t) in &d.loss_fn_inputs {
        let v = tensor_values(name, t)?;
        let f32s = || v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        match name.as_str() {
            "target_tokens" => {
                let ids = v.iter().map(|&x| {
                    if x >= 0.0 && x <= f64::from(u32::MAX) && x.fract() == 0.0 {
                        Ok(x as u32)
                    } else {
                        Err(x)
                    }
                });
                inputs.target_tokens = Some(ids.collect::<Result<_, _>>().map_err(|x| {
                    ApiError::invalid(format!("data[{i}].loss_fn_inputs.target_tokens: {x} is not a token id"))
                })?);
            }
            "weights" => inputs.weights = Some(f32s()),
            "logprobs" => inputs.logprobs = Some(f32s()),
            "advantages" => inputs.advantages = Some(f32s()),
            other => {
                return Err(ApiError::invalid(format!(
                    "data[{i}].loss_fn_inputs.{other}: hearth takes target_tokens, weights, logprobs and advantages"
                )))
            }
        }
    }
    Ok(Datum::new(tokens, inputs))
}

/// The protobuf request as hearth's input (the loss and its config through hearth's own parser).
pub(super) fn fb_input(req: &proto::ForwardBackwardRequest) -> Result<ForwardBackwardInput, ApiError> {
    let data = req.data.iter().enumerate().map(|(i, d)| datum_of(i, d)).collect::<Result<Vec<_>, _>>()?;
    let mut config = serde_json::Map::new();
    for (k, v) in &req.loss_fn_config {
        config.insert(k.clone(), json!(v));
    }
    for (k, v) in &req.loss_fn_config_v2 {
        match &v.value {
            Some(proto::loss_config_value::Value::Number(x)) => {
                config.insert(k.clone(), json!(x));
            }
            Some(proto::loss_config_value::Value::Text(t)) => {
                return Err(ApiError::invalid(format!("loss_fn_config.{k} = {t:?}: hearth's losses take numbers")))
            }
            None => {}
        }
    }
    let loss = if config.is_empty() {
        json!({"loss_fn": req.loss_fn})
    } else {
        json!({"loss_fn": req.loss_fn, "loss_fn_config": config})
    };
    let mut wire = loss;
    wire["data"] = serde_json::to_value(&data).map_err(|e| ApiError::invalid(e.to_string()))?;
    serde_json::from_value(wire).map_err(|e| ApiError::invalid(format!("loss: {e}")))
}

/// hearth's output as Tinker's protobuf: one record with every datum's `logprobs`.
pub(super) fn fb_output(out: &ForwardBackwardOutput) -> Vec<u8> {
    let mut data = Vec::new();
    let mut offsets = vec![0i64];
    for o in &out.loss_fn_outputs {
        data.extend(proto::f32_bytes(&o.logprobs));
        offsets.push(data.len() as i64);
    }
    let logprobs = proto::BatchedTensor {
        data,
        offsets: offsets.iter().flat_map(|x| x.to_le_bytes()).collect(),
        dtype: proto::DType::Float32 as i32,
        trailing_shape: vec![],
    };
    let record = proto::ArrayRecord {
        type_tag: "ArrayRecord".into(),
        fields: HashMap::from([("logprobs".to_string(), logprobs)]),
        num_datums: out.loss_fn_outputs.len() as i64,
    };
    // the SDK splits every key on ':' into name and reduction
    let metrics = out.metrics.iter().filter(|(k, _)| k.split(':').count() == 2).map(|(k, v)| (k.clone(), *v)).collect();
    proto::ForwardBackwardOutput { loss_fn_output_type: "ArrayRecord".into(), loss_fn_outputs: vec![record], metrics }
        .encode_to_vec()
}

/// hearth's samples as Tinker's protobuf.
pub(super) fn sample_output(out: &SampleOutput) -> Vec<u8> {
    let sequences = out
        .sequences
        .iter()
        .map(|s| proto::SampledSequence {
            stop_reason: match s.stop_reason {
                hearth_api::StopReason::Stop => proto::StopReason::Stop as i32,
                hearth_api::StopReason::Length => proto::StopReason::Length as i32,
            },
            tokens: proto::i32_bytes(s.tokens.iter().map(|&t| t as i32)),
            logprobs: Some(proto::f32_bytes(&s.logprobs)),
            topk_sampled_logprobs: None,
        })
        .collect();
    let prompt_logprobs = out
        .prompt_logprobs
        .as_ref()
        .map(|p| proto::f32_bytes(&p.iter().map(|x| x.unwrap_or(f32::NAN)).collect::<Vec<_>>()));
    proto::SampleResponse { sequences, prompt_logprobs, topk_prompt_logprobs: None, prompt_cache_hit_tokens: 0 }
        .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_datums_become_hearths() {
        let t = |dtype: proto::DType, bytes: Vec<u8>, n: i64| proto::Tensor {
            encoding: Some(proto::tensor::Encoding::Dense(bytes)),
            dtype: dtype as i32,
            shape: vec![n],
        };
        let req = proto::ForwardBackwardRequest {
            model_id: "s1:train:0".into(),
            seq_id: 1,
            data: vec![proto::Datum {
                model_input: vec![proto::Chunk {
                    chunk: Some(proto::chunk::Kind::EncodedText(proto::EncodedTextChunk {
                        tokens: proto::i32_bytes([1, 2, 3]),
                    })),
                }],
                loss_fn_inputs: HashMap::from([
                    (
                        "target_tokens".to_string(),
                        t(proto::DType::Int64, [2i64, 3, 4].iter().flat_map(|x| x.to_le_bytes()).collect(), 3),
                    ),
                    ("weights".to_string(), t(proto::DType::Float32, proto::f32_bytes(&[0.0, 1.0, -0.5]), 3)),
                ]),
            }],
            loss_fn: "cross_entropy".into(),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = proto::ForwardBackwardRequest::decode(&bytes[..]).unwrap();
        let input = fb_input(&back).unwrap();
        assert_eq!(input.data[0].model_input, vec![1, 2, 3]);
        assert_eq!(input.data[0].loss_fn_inputs.target_tokens, Some(vec![2, 3, 4]));
        assert_eq!(input.data[0].loss_fn_inputs.weights, Some(vec![0.0, 1.0, -0.5]));
        // a config value, a foreign input, a bad shape: clear errors
        let mut ppo = back.clone();
        ppo.loss_fn = "ppo".into();
        ppo.loss_fn_config.insert("clip_low_threshold".into(), 0.7);
        assert!(
            matches!(fb_input(&ppo).unwrap().loss_fn, hearth_api::LossFn::Ppo(c) if (c.clip_low_threshold - 0.7).abs() < 1e-9)
        );
        let mut foreign = back.clone();
        foreign.data[0].loss_fn_inputs.insert("mask".into(), t(proto::DType::Float32, proto::f32_bytes(&[1.0; 3]), 3));
        assert!(fb_input(&foreign).unwrap_err().message.contains("loss_fn_inputs.mask"));
        let mut short = back;
        short.data[0].loss_fn_inputs.insert("weights".into(), t(proto::DType::Float32, proto::f32_bytes(&[1.0; 2]), 3));
        assert!(fb_input(&short).unwrap_err().message.contains("shape [3] but 2 values"));
        assert!(proto::ForwardBackwardRequest::decode(&b"\xff\xff\xff"[..]).is_err());
    }
}
