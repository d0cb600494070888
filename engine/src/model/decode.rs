//! One decode step over several runs at once: the rows of every run that shares the base
//! weights go through each base product together (the weights are read once for all of them),
//! while each run's LoRA pairs, rotary positions and key/value cache stay its own.
//!
//! A run's rows come out bit for bit as they would in a step of their own: every product row
//! is computed with the same arithmetic whatever the other rows are
//! ([`Linear::forward_segments`]), and attention is per run.

use super::{DecoderLayer, KvCache, LayerCache, Model};
use crate::error::{EngineError, Result};
use crate::linear::{Linear, Lora, RmsNorm, Weight};
use candle_core::{DType, Tensor};

impl Model {
    /// Whether `other` runs on this model's base weights (the same frozen storage, not equal
    /// values), so that their rows can share the base products of a decode step.
    pub fn shares_base(&self, other: &Model) -> bool {
        fn both<T>(a: &Option<T>, b: &Option<T>, same: impl Fn(&T, &T) -> bool) -> bool {
            match (a, b) {
                (Some(x), Some(y)) => same(x, y),
                (None, None) => true,
                _ => false,
            }
        }
        let linear = |a: &Linear, b: &Linear| a.weight.same(&b.weight) && both(&a.bias, &b.bias, Weight::same);
        let norm = |a: &RmsNorm, b: &RmsNorm| a.weight.same(&b.weight);
        self.embed_tokens.same(&other.embed_tokens)
            && both(&self.lm_head, &other.lm_head, Weight::same)
            && norm(&self.norm, &other.norm)
            && self.layers.len() == other.layers.len()
            && self.layers.iter().zip(&other.layers).all(|(a, b)| {
                let (x, y) = (&a.self_attn, &b.self_attn);
                norm(&a.input_layernorm, &b.input_layernorm)
                    && norm(&a.post_attention_layernorm, &b.post_attention_layernorm)
                    && both(&x.q_norm, &y.q_norm, norm)
                    && both(&x.k_norm, &y.k_norm, norm)
                    && linear(&x.q_proj, &y.q_proj)
                    && linear(&x.k_proj, &y.k_proj)
                    && linear(&x.v_proj, &y.v_proj)
                    && linear(&x.o_proj, &y.o_proj)
                    && linear(&a.mlp.gate_proj, &b.mlp.gate_proj)
                    && linear(&a.mlp.up_proj, &b.mlp.up_proj)
                    && linear(&a.mlp.down_proj, &b.mlp.down_proj)
            })
    }

    /// One decode step of several runs' rows: `models[j]` (inference copies sharing one base,
    /// see [`Model::shares_base`]) continues `ids[j]` (n_j, 1) u32 from `caches[j]`, whose
    /// sequences all hold the same number of positions. Returns each run's logits (n_j, V) f32
    /// for its new position, and appends the position to its cache.
    pub fn decode_segments(models: &[&Model], ids: &[Tensor], caches: &mut [&mut KvCache]) -> Result<Vec<Tensor>> {
        let Some(&base) = models.first() else { return Ok(Vec::new()) };
        if ids.len() != models.len() || caches.len() != models.len() {
            return Err(EngineError::Internal("decode_segments: one model, ids and cache per segment".into()));
        }
        let counts: Vec<usize> = ids.iter().map(|t| t.dim(0)).collect::<candle_core::Result<_>>()?;
        for cache in caches.iter_mut() {
            if cache.len + 1 > base.config.max_position_embeddings {
                return Err(EngineError::InvalidParam {
                    field: "tokens",
                    value: format!("{} positions", cache.len + 1),
                    reason: "longer than the model's context (max_position_embeddings)",
                });
            }
            let capacity = cache.capacity;
            cache.layers.resize(base.layers.len(), LayerCache { kv: None, capacity });
        }
        let ids = if ids.len() == 1 { ids[0].clone() } else { Tensor::cat(ids, 0)? }; // (M,1)
        let mut x = base.embed(&ids)?; // (M,1,C)
        for (i, layer) in base.layers.iter().enumerate() {
            let segs = |pick: fn(&DecoderLayer) -> &Linear| -> Vec<(usize, Option<&Lora>)> {
                models.iter().zip(&counts).map(|(m, &n)| (n, pick(&m.layers[i]).lora.as_ref())).collect()
            };
            let att = &layer.self_attn;
            let h = layer.input_layernorm.forward(&x)?;
            let q = att.q_proj.forward_segments(&h, &segs(|l| &l.self_attn.q_proj))?; // (M,1,H·D)
            let k = att.k_proj.forward_segments(&h, &segs(|l| &l.self_attn.k_proj))?; // (M,1,K·D)
            let v = att.v_proj.forward_segments(&h, &segs(|l| &l.self_attn.v_proj))?; // (M,1,K·D)
            let mut ys = Vec::with_capacity(models.len());
            let mut first = 0;
            for ((model, &n), cache) in models.iter().zip(&counts).zip(caches.iter_mut()) {
                let start = cache.len;
                let rows = |t: &Tensor| t.narrow(0, first, n);
                let (q, k, v) = att.heads(&rows(&q)?, &rows(&k)?, &rows(&v)?, &base.rotary, start)?;
                let (k, v) = cache.layers[i].append(&k, &v, start)?; // (n,K,start+1,D) each
                ys.push(att.core(&q, &k, &v, &model.attn_spec(n, start + 1), start)?); // (n,1,H·D)
                first += n;
            }
            let y = if ys.len() == 1 { ys.remove(0) } else { Tensor::cat(&ys, 0)? }; // (M,1,H·D)
            let x1 = (&x + att.o_proj.forward_segments(&y, &segs(|l| &l.self_attn.o_proj))?)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            let mlp = &layer.mlp;
            let gate = mlp.gate_proj.forward_segments(&h, &segs(|l| &l.mlp.gate_proj))?; // (M,1,F)
            let up = mlp.up_proj.forward_segments(&h, &segs(|l| &l.mlp.up_proj))?; // (M,1,F)
            let act =
                if crate::kernels::applies(&gate) { crate::kernels::swiglu(&gate, &up)? } else { (gate.silu()? * up)? };
            x = (&x1 + mlp.down_proj.forward_segments(&act, &segs(|l| &l.mlp.down_proj))?)?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let x = base.norm.forward(&x)?;
        let head =
            Linear { weight: base.lm_head.as_ref().unwrap_or(&base.embed_tokens).clone(), bias: None, lora: None };
        let segs: Vec<(usize, Option<&Lora>)> =
            models.iter().zip(&counts).map(|(m, &n)| (n, m.head_lora.as_ref())).collect();
        let logits = head.forward_segments(&x, &segs)?.squeeze(1)?; // (M,1,V) -> (M,V)
        let mut out = Vec::with_capacity(counts.len());
        let mut first = 0;
        for n in counts {
            out.push(logits.narrow(0, first, n)?.to_dtype(DType::F32)?);
            first += n;
        }
        Ok(out)
    }
}
