//! The training step with activation recompute, and the forward pass that holds no graph.
//!
//! candle has no gradient checkpointing, so the backward pass is split into segments by hand,
//! each differentiated on its own with candle's autograd (which gives the gradient of a segment's
//! output against its input and parameters):
//!
//! 1. Forward through an inference copy of the model (no graph), keeping only each decoder
//!    layer's input and its attention output (before `o_proj`): 2L + 1 tensors (B, T, C).
//! 2. The head (final norm, output projection, log-softmax, loss) runs in chunks of positions, so
//!    the (B, T, V) logits never exist in full: each chunk's loss is differentiated at once and
//!    leaves the gradient of its hidden states.
//! 3. Layers in reverse: the layer is recomputed from its input with a graph and differentiated
//!    against the gradient of its output. Inside, attention is its own segment, differentiated
//!    one query chunk at a time (see [`crate::model::Attention::core`]), so no (B, H, T, T)
//!    buffer is ever held for backward: at 32k tokens that buffer alone would be tens of GB.
//! 4. The embedding last (full fine-tuning only; LoRA leaves it frozen).
//!
//! The cost is a second forward pass through the layers' projections and attention (once more
//! each: the kept attention output spares a third); the peak is one layer's graph plus the kept
//! tensors. Losses are sums over positions, so
//! chunking the head changes nothing but the order of a few additions.

use crate::batch::Batch;
use crate::error::{EngineError, Result};
use crate::loss::{self, LossTerms};
use crate::model::{AttnSpec, DecoderLayer, Model, NamedParams, Rotary};
use crate::ops::mul_const;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use hearth_api::LossFn;
use std::collections::BTreeMap;

/// When a step recomputes activations instead of keeping them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// When the kept activations would take more than half the device's free memory (more
    /// than [`AUTO_THRESHOLD_BYTES`] where that is unknown).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never: one forward pass, the whole graph kept for backward.
    Off,
}

/// [`Recompute::Auto`] turns recompute on above this estimate of a step's kept activations when
/// the device's free memory is unknown.
pub const AUTO_THRESHOLD_BYTES: u64 = 1 << 30;

impl Recompute {
    /// Parses `auto`, `on` or `off`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "on" => Some(Self::On),
            "off" => Some(Self::Off),
            _ => None,
        }
    }

    /// Whether a step over `b` sequences of `t` positions recomputes.
    pub fn applies(self, model: &Model, b: usize, t: usize) -> bool {
        self.decide(model, b, t, free_memory(model))
    }

    /// Decides for a step and refuses it, before anything runs, when it would not fit in the
    /// device's free memory (on the CPU running out of memory kills the process). Reads the
    /// free memory once for both.
    pub fn plan(self, model: &Model, b: usize, t: usize) -> Result<bool> {
        let free = free_memory(model);
        let recompute = self.decide(model, b, t, free);
        check_fits(model, b, t, recompute, free)?;
        Ok(recompute)
    }

    fn decide(self, model: &Model, b: usize, t: usize, free: Option<u64>) -> bool {
        match self {
            Self::On => true,
            Self::Off => false,
            Self::Auto => activation_bytes(model, b, t) > free.map_or(AUTO_THRESHOLD_BYTES, |f| f / 2),
        }
    }
}

/// A rough estimate of what one step keeps for backward without recompute, all 4 bytes a value.
/// Composed ops: per layer and token about 16 C-sized and 6 F-sized values and 8 attention rows
/// per head (scores, their scaled, masked, shifted and exponentiated copies, probabilities), plus
/// three (B, T, V) copies in the loss; calibrated on the CPU against peak RSS (it errs low by
/// about a quarter). The fused CPU kernels (`crate::fused`) keep about 10 C- and 3 F-sized
/// values per layer and token, nothing T-sized, and two (B, T, V) copies (logits, their
/// gradient); measured on smollm2-135m-shape: 1.3 MB a token against 1.6 estimated.
pub fn activation_bytes(model: &Model, b: usize, t: usize) -> u64 {
    let c = model.config();
    let per_token = if crate::fused::applies_to(model.dtype(), model.device()) {
        c.num_hidden_layers * (10 * c.hidden_size + 3 * c.intermediate_size) + 2 * c.vocab_size
    } else {
        c.num_hidden_layers * (16 * c.hidden_size + 6 * c.intermediate_size + 8 * c.num_attention_heads * t) + 3 * c.vocab_size
    };
    (b * t) as u64 * per_token as u64 * 4
}

/// A rough estimate of a step's memory beyond the weights: [`activation_bytes`] without
/// recompute; with it, the kept layer inputs and attention outputs, one layer's graph without
/// its attention, and one chunk each of attention and of the loss.
pub fn step_bytes(model: &Model, b: usize, t: usize, recompute: bool) -> u64 {
    if !recompute {
        return activation_bytes(model, b, t);
    }
    let c = model.config();
    let dt = model.dtype().size_in_bytes() as u64;
    let tokens = (b * t) as u64;
    let kept = (2 * c.num_hidden_layers as u64 + 1) * tokens * c.hidden_size as u64 * dt;
    let layer = tokens * (16 * c.hidden_size + 6 * c.intermediate_size) as u64 * 4;
    let chunks = model.chunking().attn_elements as u64 * 4 * 8 + model.chunking().head_elements as u64 * 4 * 4;
    kept + layer + chunks
}

fn free_memory(model: &Model) -> Option<u64> {
    crate::device::available_memory(model.device())
}

/// Refuses a step that would not fit in `free` bytes (when that is known).
fn check_fits(model: &Model, b: usize, t: usize, recompute: bool, free: Option<u64>) -> Result<()> {
    let Some(free) = free else { return Ok(()) };
    let need = step_bytes(model, b, t, recompute);
    if need <= free {
        return Ok(());
    }
    let hint = if recompute { "send fewer or shorter sequences per call" } else { "turn on recompute (--recompute on), or send fewer or shorter sequences per call" };
    Err(EngineError::OutOfMemory(format!(
        "a step over {b} sequence(s) of {t} positions needs about {:.1} GB (recompute {}) and {:.1} GB is free; {hint}; nothing changed",
        need as f64 / 1e9,
        if recompute { "on" } else { "off" },
        free as f64 / 1e9
    )))
}

/// Names a device's out-of-memory failure as such (candle reports it as a driver error).
pub fn classify(e: EngineError) -> EngineError {
    if let EngineError::Candle(c) = &e {
        let text = c.to_string();
        if text.contains("OUT_OF_MEMORY") || text.to_lowercase().contains("out of memory") {
            return EngineError::OutOfMemory(format!("the device ran out of memory during this step; nothing changed ({})", text.lines().next().unwrap_or("")));
        }
    }
    e
}

/// Gradients by parameter name, summed over the segments' backward passes.
struct Acc<'a> {
    params: &'a NamedParams,
    grads: BTreeMap<String, Tensor>,
}

impl Acc<'_> {
    fn add(&mut self, store: &GradStore) -> Result<()> {
        for (name, var) in self.params {
            let Some(g) = store.get(var.as_tensor()) else { continue };
            let g = match self.grads.remove(name) {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            };
            self.grads.insert(name.clone(), g);
        }
        Ok(())
    }
}

fn grad_of(store: &GradStore, v: &Var, what: &str) -> Result<Tensor> {
    store
        .get(v.as_tensor())
        .cloned()
        .ok_or_else(|| EngineError::Weights(format!("recompute: no gradient reached {what}")))
}

/// A tracked copy of `t` (contiguous), the input of one segment.
fn leaf(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.contiguous()?)?)
}

/// Loss terms over `batch` and, with `params`, the gradient of the total loss for each of them
/// (by name), computed segment by segment as the module docs say. Without `params` nothing
/// records a graph: the forward primitive.
pub fn run(model: &Model, batch: &Batch, loss_fn: &LossFn, params: Option<&NamedParams>) -> Result<(LossTerms, BTreeMap<String, Tensor>)> {
    let inference = model.detached();
    let (b, t) = batch.ids.dims2()?;
    let attn = model.attn_spec(b, t);
    let rotary = model.rotary();
    let mut xs = Vec::with_capacity(model.layers.len() + 1);
    let mut ys = Vec::with_capacity(model.layers.len());
    xs.push(inference.embed(&batch.ids)?);
    for layer in &inference.layers {
        let x = xs.last().ok_or_else(|| EngineError::Weights("recompute: no layer input".into()))?;
        let out = if params.is_some() {
            let (out, y) = layer.forward_keeping_attention(x, rotary, &attn)?;
            ys.push(y);
            out
        } else {
            layer.forward(x, rotary, &attn, 0, None)?
        };
        xs.push(out);
    }
    let Some(params) = params else {
        let h = xs.pop().ok_or_else(|| EngineError::Weights("recompute: no hidden states".into()))?;
        let (terms, _) = head(&inference, &h, batch, loss_fn, None)?;
        return Ok((terms, BTreeMap::new()));
    };
    let mut acc = Acc { params, grads: BTreeMap::new() };
    let h = xs.pop().ok_or_else(|| EngineError::Weights("recompute: no hidden states".into()))?;
    let (terms, g) = head(model, &h, batch, loss_fn, Some(&mut acc))?;
    drop(h);
    let mut g = g.ok_or_else(|| EngineError::Weights("recompute: no gradient for the hidden states".into()))?;
    for layer in model.layers.iter().rev() {
        let (x, y) = xs.pop().zip(ys.pop()).ok_or_else(|| EngineError::Weights("recompute: layer inputs out of step".into()))?;
        g = layer_backward(layer, &x, &y, &g, rotary, &attn, &mut acc)?;
    }
    if !model.embed_tokens.is_frozen() {
        let x0 = model.embed(&batch.ids)?;
        acc.add(&mul_const(&x0, &g)?.sum_all()?.backward()?)?;
    }
    Ok((terms, acc.grads))
}

/// Final norm, output projection and loss over positions in chunks; with `acc`, each chunk is
/// differentiated at once and the gradient of `h` comes back.
fn head(model: &Model, h: &Tensor, batch: &Batch, loss_fn: &LossFn, mut acc: Option<&mut Acc>) -> Result<(LossTerms, Option<Tensor>)> {
    let (b, t, _c) = h.dims3()?;
    let chunk = (model.chunking().head_elements / (b * model.config().vocab_size).max(1)).clamp(1, t.max(1));
    let (mut logprobs, mut per_token, mut grads) = (Vec::new(), Vec::new(), Vec::new());
    for s in (0..t).step_by(chunk) {
        let len = chunk.min(t - s);
        let part = batch.narrow(s, len)?;
        let hc = h.narrow(1, s, len)?;
        let terms = match acc.as_deref_mut() {
            Some(acc) => {
                let hv = leaf(&hc)?;
                let terms = loss::compute(&model.head(hv.as_tensor())?, &part, loss_fn)?;
                let store = terms.total()?.backward()?;
                acc.add(&store)?;
                grads.push(grad_of(&store, &hv, "the hidden states")?);
                terms
            }
            None => loss::compute(&model.head(&hc)?, &part, loss_fn)?,
        };
        logprobs.push(terms.target_logprobs.detach());
        per_token.push(terms.per_token.detach());
    }
    let cat = |v: Vec<Tensor>| -> Result<Tensor> { Ok(if v.len() == 1 { v.into_iter().next().ok_or_else(|| EngineError::EmptyBatch)? } else { Tensor::cat(&v, 1)? }) };
    let grad = if grads.is_empty() { None } else { Some(cat(grads)?) };
    Ok((LossTerms { target_logprobs: cat(logprobs)?, per_token: cat(per_token)? }, grad))
}

/// Recomputes one decoder layer from its input `x` (and its attention output `y`, kept from the
/// forward pass) and back-propagates `g_out` (the gradient of its output) through it; returns
/// the gradient of `x`, adds the parameters' to `acc`.
fn layer_backward(
    layer: &DecoderLayer,
    x: &Tensor,
    y: &Tensor,
    g_out: &Tensor,
    rotary: &Rotary,
    attn: &AttnSpec,
    acc: &mut Acc,
) -> Result<Tensor> {
    let att = &layer.self_attn;
    let xv = leaf(x)?;
    let xt = xv.as_tensor();
    // x → q, k, v (graph kept until the end)
    let (q, k, v) = att.qkv(&layer.input_layernorm.forward(xt)?, rotary, 0)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    // (x, y) → output
    let yv = leaf(y)?;
    let h = (xt + att.o_proj.forward(yv.as_tensor())?)?;
    let out = (&h + layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?)?;
    let store = mul_const(&out, g_out)?.sum_all()?.backward()?;
    drop((h, out));
    acc.add(&store)?;
    let g_x_residual = grad_of(&store, &xv, "the layer input")?;
    let g_y = grad_of(&store, &yv, "the attention output")?;
    drop(store);
    // attention, one query chunk at a time
    let (b, heads, t, d) = qd.dims4()?;
    let g_y = g_y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?; // (B,T,H·D) -> (B,H,T,D)
    let g_k = kd.zeros_like()?;
    let g_v = vd.zeros_like()?;
    let mut g_q = Vec::new();
    for (s, len) in attn.chunks(t) {
        let keys = s + len;
        let qc = leaf(&qd.narrow(2, s, len)?)?;
        let kc = leaf(&kd.narrow(2, 0, keys)?)?;
        let vc = leaf(&vd.narrow(2, 0, keys)?)?;
        let yc = att.attend(qc.as_tensor(), kc.as_tensor(), vc.as_tensor(), attn, s)?;
        let store = mul_const(&yc, &g_y.narrow(2, s, len)?.contiguous()?)?.sum_all()?.backward()?;
        g_q.push(grad_of(&store, &qc, "the queries")?);
        g_k.slice_set(&(g_k.narrow(2, 0, keys)? + grad_of(&store, &kc, "the keys")?)?, 2, 0)?;
        g_v.slice_set(&(g_v.narrow(2, 0, keys)? + grad_of(&store, &vc, "the values")?)?, 2, 0)?;
    }
    let g_q = if g_q.len() == 1 { g_q.remove(0) } else { Tensor::cat(&g_q, 2)? };
    // back through the projections
    let total = ((mul_const(&q, &g_q)?.sum_all()? + mul_const(&k, &g_k)?.sum_all()?)? + mul_const(&v, &g_v)?.sum_all()?)?;
    let store = total.backward()?;
    acc.add(&store)?;
    Ok((g_x_residual + grad_of(&store, &xv, "the layer input")?)?)
}
