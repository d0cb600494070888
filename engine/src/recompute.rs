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
use crate::kernels::mul_const;
use crate::loss::{self, LossTerms};
use crate::model::{AttnSpec, DecoderLayer, Model, NamedParams, Rotary};
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
        check_indexable(model, b, t)?;
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

/// Bytes each attention score of a chunk takes at the peak of its backward pass in the composed
/// ops (the GPU's): the scores, their scaled and masked copies in the model's dtype, the f32
/// softmax's intermediates and the gradients flowing back through them. Measured on the CPU with
/// the same ops (engine/tests/memory.rs).
const SCORE_BYTES: u64 = 54;
/// Bytes each logit of a head chunk takes while its loss is differentiated (the logits, their f32
/// log-softmax and its intermediates, their gradient).
const LOGIT_BYTES: u64 = 28;

/// Elements of one query chunk's attention scores in a pass over `b` sequences of `t` positions.
fn attention_chunk_elements(model: &Model, b: usize, t: usize) -> u64 {
    let heads = model.config().num_attention_heads;
    (b * heads * model.chunking().attention_rows(b, heads, t).min(t) * t) as u64
}

/// Elements of one chunk of the head's logits (at least one position of every sequence).
fn head_chunk_elements(model: &Model, b: usize, t: usize) -> u64 {
    let v = model.config().vocab_size;
    (b * model.chunking().head_positions(b, t, v) * v) as u64
}

/// What one step keeps for backward without recompute: every layer's graph, one chunk of the
/// head and the new gradients. Composed ops (the GPU's): per layer and token about 16 C-sized and
/// 6 F-sized values in the model's dtype and 8 f32 values per attention score (scores, their
/// scaled, masked, shifted and exponentiated copies, probabilities). The fused CPU kernels
/// (`crate::kernels`) keep about 12 C- and 4 F-sized f32 values per layer and token and nothing
/// T-sized. Both measured on the CPU against a counting allocator (engine/tests/memory.rs).
pub fn activation_bytes(model: &Model, b: usize, t: usize) -> u64 {
    let c = model.config();
    let (l, cw, fw) = (c.num_hidden_layers as u64, c.hidden_size as u64, c.intermediate_size as u64);
    let per_token = if crate::kernels::applies_to(model.dtype(), model.device()) {
        l * (12 * cw + 4 * fw) * 4
    } else {
        let dt = model.dtype().size_in_bytes() as u64;
        l * ((16 * cw + 6 * fw) * dt + 8 * 4 * c.num_attention_heads as u64 * t as u64)
    };
    (b * t) as u64 * per_token + head_chunk_elements(model, b, t) * LOGIT_BYTES + model.trained_bytes()
}

/// An estimate of a step's memory beyond the weights, which the step's measured peak on the CPU
/// matches within 15 % (engine/tests/memory.rs). Without recompute, [`activation_bytes`]. With
/// it: the kept layer inputs and attention outputs (2L + 1 tensors (B, T, C)) and the gradient
/// of the hidden states, the new gradients, and the largest of the three phases that follow:
///
/// - a layer's `o_proj` and MLP differentiated, with its q/k/v graph held: per token about
///   16 C-, 12 Q-, 13 K- and 12 F-sized values in the model's dtype (the graph's tensors and
///   their gradients) and 5 C- and 2 F-sized in f32 (the norms', the LoRA terms');
/// - attention differentiated one query chunk at a time: the q/k/v graph, f32 key and value
///   gradients, the query gradients (6 C-, 14 Q- and 14 K-sized in the dtype, 2 C-sized in f32),
///   and one chunk's scores at [`SCORE_BYTES`] each (none on the fused CPU path);
/// - one chunk of the head at [`LOGIT_BYTES`] a logit.
///
/// Q and K are the query and key widths (heads × head_dim); the fused CPU path's layer phase is
/// about 16 C- and 6 F-sized f32 values per token.
pub fn step_bytes(model: &Model, b: usize, t: usize, recompute: bool) -> u64 {
    if !recompute {
        return activation_bytes(model, b, t);
    }
    let c = model.config();
    let dt = model.dtype().size_in_bytes() as u64;
    let tokens = (b * t) as u64;
    let (cw, fw) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (qw, kw) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let kept = (2 * c.num_hidden_layers as u64 + 2) * tokens * cw * dt;
    let head = head_chunk_elements(model, b, t) * LOGIT_BYTES;
    let phase = if crate::kernels::applies_to(model.dtype(), model.device()) {
        (tokens * (16 * cw + 6 * fw) * 4).max(head)
    } else {
        let layer = tokens * (dt * (16 * cw + 12 * qw + 13 * kw + 12 * fw) + 4 * (5 * cw + 2 * fw));
        let attention = tokens * (dt * (6 * cw + 14 * qw + 14 * kw) + 4 * 2 * cw)
            + attention_chunk_elements(model, b, t) * SCORE_BYTES;
        layer.max(attention).max(head)
    };
    kept + model.trained_bytes() + phase
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
    let hint = if recompute {
        "send fewer or shorter sequences per call"
    } else {
        "turn on recompute (--recompute on), or send fewer or shorter sequences per call"
    };
    Err(EngineError::OutOfMemory(format!(
        "a step over {b} sequence(s) of {t} positions needs about {:.1} GB (recompute {}) and {:.1} GB is free; {hint}; nothing changed",
        need as f64 / 1e9,
        if recompute { "on" } else { "off" },
        free as f64 / 1e9
    )))
}

/// The most elements one tensor may hold on a GPU: candle's CUDA kernels index elements with
/// 32-bit integers, so past this a result is silently wrong.
pub const MAX_GPU_TENSOR_ELEMENTS: u64 = u32::MAX as u64;

/// The largest tensor a pass over `b` sequences of `t` positions makes that chunking does not
/// split: the layers' activations (B, T, widest projection), one query chunk's attention scores
/// (at least one row: B·H·T) and one chunk of the head's logits (at least one position: B·V).
pub fn largest_tensor_elements(
    config: &crate::config::ModelConfig,
    chunking: crate::model::Chunking,
    b: usize,
    t: usize,
) -> u64 {
    let c = config;
    let widest =
        [c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim]
            .into_iter()
            .max()
            .unwrap_or(0);
    let scores_row = (b * c.num_attention_heads * t) as u64;
    let scores = chunking.attention_rows(b, c.num_attention_heads, t).min(t.max(1)) as u64 * scores_row;
    let head = (b * c.vocab_size * chunking.head_positions(b, t, c.vocab_size)) as u64;
    ((b * t * widest) as u64).max(scores).max(head)
}

/// Refuses, before anything runs, a pass on a GPU whose largest unsplit tensor would pass
/// [`MAX_GPU_TENSOR_ELEMENTS`] (the CPU indexes with 64 bits and takes any size).
pub fn check_indexable(model: &Model, b: usize, t: usize) -> Result<()> {
    if model.device().is_cpu() {
        return Ok(());
    }
    check_elements(largest_tensor_elements(model.config(), model.chunking(), b, t), b, t)
}

fn check_elements(largest: u64, b: usize, t: usize) -> Result<()> {
    if largest <= MAX_GPU_TENSOR_ELEMENTS {
        return Ok(());
    }
    Err(EngineError::InvalidParam {
        field: "data",
        value: format!("{b} sequence(s) of {t} positions"),
        reason: "a pass this size makes a tensor of more than 2^32 - 1 elements, past what the GPU kernels can index; send fewer or shorter sequences per call",
    })
}

/// Names a device's out-of-memory failure as such (candle reports it as a driver error).
pub fn classify(e: EngineError) -> EngineError {
    if let EngineError::Candle(c) = &e {
        let text = c.to_string();
        if text.contains("OUT_OF_MEMORY") || text.to_lowercase().contains("out of memory") {
            return EngineError::OutOfMemory(format!(
                "the device ran out of memory during this step; nothing changed ({})",
                text.lines().next().unwrap_or("")
            ));
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
        .ok_or_else(|| EngineError::Internal(format!("recompute: no gradient reached {what}")))
}

/// A tracked copy of `t` (contiguous), the input of one segment.
fn leaf(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.contiguous()?)?)
}

/// Loss terms over `batch` and, with `params`, the gradient of the total loss for each of them
/// (by name), computed segment by segment as the module docs say. Without `params` nothing
/// records a graph: the forward primitive.
pub fn run(
    model: &Model,
    batch: &Batch,
    loss_fn: &LossFn,
    params: Option<&NamedParams>,
) -> Result<(LossTerms, BTreeMap<String, Tensor>)> {
    let inference = model.detached();
    let (b, t) = batch.ids.dims2()?;
    let attn = model.attn_spec(b, t);
    let rotary = model.rotary();
    let mut xs = Vec::with_capacity(model.layers.len() + 1);
    let mut ys = Vec::with_capacity(model.layers.len());
    xs.push(inference.embed(&batch.ids)?);
    for layer in &inference.layers {
        let x = xs.last().ok_or_else(|| EngineError::Internal("recompute: no layer input".into()))?;
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
        let h = xs.pop().ok_or_else(|| EngineError::Internal("recompute: no hidden states".into()))?;
        let (terms, _) = head(&inference, &h, batch, loss_fn, None)?;
        return Ok((terms, BTreeMap::new()));
    };
    let mut acc = Acc { params, grads: BTreeMap::new() };
    let h = xs.pop().ok_or_else(|| EngineError::Internal("recompute: no hidden states".into()))?;
    let (terms, g) = head(model, &h, batch, loss_fn, Some(&mut acc))?;
    drop(h);
    let mut g = g.ok_or_else(|| EngineError::Internal("recompute: no gradient for the hidden states".into()))?;
    for layer in model.layers.iter().rev() {
        let (x, y) = xs
            .pop()
            .zip(ys.pop())
            .ok_or_else(|| EngineError::Internal("recompute: layer inputs out of step".into()))?;
        g = layer_backward(layer, &x, &y, &g, rotary, &attn, &mut acc)?;
    }
    if !model.embed_tokens.is_frozen() {
        let x0 = model.embed(&batch.ids)?;
        acc.add(&mul_const(&x0, &g)?.sum_all()?.backward()?)?;
    }
    Ok((terms, acc.grads))
}

/// The step without recompute: one forward pass through the layers with the whole graph kept,
/// then the head in chunks of positions (as [`run`] does, so no (B, T, V) logits exist at once),
/// each chunk's gradient of the hidden states gathered and sent back through the kept graph in
/// one backward pass.
pub fn run_whole_graph(
    model: &Model,
    batch: &Batch,
    loss_fn: &LossFn,
    params: &NamedParams,
) -> Result<(LossTerms, BTreeMap<String, Tensor>)> {
    let h = model.hidden(&batch.ids)?; // (B,T,C), graph kept
    let mut acc = Acc { params, grads: BTreeMap::new() };
    let (terms, g) = head(model, &h.detach(), batch, loss_fn, Some(&mut acc))?;
    let g = g.ok_or_else(|| EngineError::Internal("no gradient for the hidden states".into()))?;
    acc.add(&mul_const(&h, &g)?.sum_all()?.backward()?)?;
    Ok((terms, acc.grads))
}

/// Final norm, output projection and loss over positions in chunks; with `acc`, each chunk is
/// differentiated at once and the gradient of `h` comes back.
fn head(
    model: &Model,
    h: &Tensor,
    batch: &Batch,
    loss_fn: &LossFn,
    mut acc: Option<&mut Acc>,
) -> Result<(LossTerms, Option<Tensor>)> {
    let (b, t, _c) = h.dims3()?;
    let chunk = model.chunking().head_positions(b, t, model.config().vocab_size);
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
    let cat = |v: Vec<Tensor>| -> Result<Tensor> {
        Ok(if v.len() == 1 {
            v.into_iter().next().ok_or_else(|| EngineError::EmptyBatch)?
        } else {
            Tensor::cat(&v, 1)?
        })
    };
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
                                                                             // A key's gradient is a sum of one partial per chunk of later queries: summed in f32 (or
                                                                             // wider) and rounded to the model's dtype once, not at every chunk (a bf16 running sum over
                                                                             // hundreds of chunks loses several percent).
    let wide = crate::model::wide(kd.dtype());
    let g_k = Tensor::zeros(kd.shape(), wide, kd.device())?;
    let g_v = Tensor::zeros(vd.shape(), wide, vd.device())?;
    let mut g_q = Vec::new();
    for (s, len) in attn.chunks(t) {
        let keys = s + len;
        let qc = leaf(&qd.narrow(2, s, len)?)?;
        let kc = leaf(&kd.narrow(2, 0, keys)?)?;
        let vc = leaf(&vd.narrow(2, 0, keys)?)?;
        let yc = att.attend(qc.as_tensor(), kc.as_tensor(), vc.as_tensor(), attn, s)?;
        let store = mul_const(&yc, &g_y.narrow(2, s, len)?.contiguous()?)?.sum_all()?.backward()?;
        g_q.push(grad_of(&store, &qc, "the queries")?);
        g_k.slice_set(&(g_k.narrow(2, 0, keys)? + grad_of(&store, &kc, "the keys")?.to_dtype(wide)?)?, 2, 0)?;
        g_v.slice_set(&(g_v.narrow(2, 0, keys)? + grad_of(&store, &vc, "the values")?.to_dtype(wide)?)?, 2, 0)?;
    }
    let (g_k, g_v) = (g_k.to_dtype(kd.dtype())?, g_v.to_dtype(vd.dtype())?);
    let g_q = if g_q.len() == 1 { g_q.remove(0) } else { Tensor::cat(&g_q, 2)? };
    // back through the projections
    let total =
        ((mul_const(&q, &g_q)?.sum_all()? + mul_const(&k, &g_k)?.sum_all()?)? + mul_const(&v, &g_v)?.sum_all()?)?;
    let store = total.backward()?;
    acc.add(&store)?;
    Ok((g_x_residual + grad_of(&store, &xv, "the layer input")?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Chunking;

    /// The llama-3.1-8b shape: eight sequences of 32k positions fit in a call, sixteen do not
    /// (their MLP activations alone are 16·32768·14336 > 2³² elements); refused with a 4xx that
    /// says why.
    #[test]
    fn passes_past_32_bit_indexing_are_refused_on_a_gpu() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}"#;
        let config = crate::config::ModelConfig::from_json(json, "llama-3.1-8b").unwrap();
        let chunking = Chunking { attn_elements: 1 << 28, head_elements: 1 << 26 };
        let one = largest_tensor_elements(&config, chunking, 1, 32768);
        assert_eq!(one, 32768 * 14336);
        assert!(check_elements(one, 1, 32768).is_ok());
        assert!(check_elements(largest_tensor_elements(&config, chunking, 8, 32768), 8, 32768).is_ok());
        let sixteen = largest_tensor_elements(&config, chunking, 16, 32768);
        let e = check_elements(sixteen, 16, 32768).unwrap_err();
        assert!(e.is_user_error() && e.to_string().contains("2^32"), "{e}");
        // a head chunk is at least one position of every sequence: B·V
        let wide = largest_tensor_elements(&config, Chunking { attn_elements: 1, head_elements: 1 }, 40_000, 1);
        assert!(wide >= 40_000 * 128_256);
    }
}
