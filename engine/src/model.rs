//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), written from differentiable ops.
//!
//! References: Hugging Face transformers `modeling_llama.py`, `modeling_mistral.py`,
//! `modeling_qwen2.py`, `modeling_qwen3.py`; candle-transformers `models/llama.rs`. Unlike
//! candle-transformers, nothing here uses candle's fused softmax / rms_norm / rope kernels (their
//! backward is missing and gradients vanish silently), and logits come back for every position.
//! On the CPU in f32/f64 the hand-written kernels of [`crate::kernels`] (each with its own
//! backward) stand in for the composed norm, rotary, attention, SwiGLU, projections and loss;
//! the composed forms below run everywhere else and are those kernels' reference.
//!
//! Legend: B batch, T time (padded length), C hidden_size, H query heads, K key/value heads,
//! D head_dim, F intermediate_size, V vocab_size, r LoRA rank.
//!
//! Batches are right-padded: with causal attention a real position never attends to the padding
//! after it, so padding only has to be masked out of the loss, not out of attention.

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::kernels::{add_const, mul_const};
use crate::linear::{Linear, Lora, RmsNorm, Weight};
use candle_core::{DType, Device, Tensor, D};

mod build;
mod decode;

pub use build::NamedParams;

/// Rotary tables, (P, D) each, computed lazily for the positions used so far (P grows by
/// doubling up to `max_position_embeddings`): a 128k-context model would otherwise hold hundreds
/// of MB of tables it may never use. Clones share the tables.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f64>,
    max: usize,
    dtype: DType,
    device: Device,
    tables: std::sync::Arc<std::sync::RwLock<Option<(Tensor, Tensor)>>>,
}

impl Rotary {
    /// Inverse frequencies as transformers computes them, with the configured scaling.
    fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
        let d = cfg.head_dim;
        let base: Vec<f64> =
            (0..d).step_by(2).map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / d as f32) as f64).collect();
        match cfg.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Tables for `cfg`'s frequencies; nothing is computed until a position is used.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            inv_freq: Self::inv_freq(cfg),
            max: cfg.max_position_embeddings,
            dtype,
            device: device.clone(),
            tables: Default::default(),
        })
    }

    /// cos and sin for positions 0..len.
    fn build(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let inv = &self.inv_freq;
        let half = inv.len();
        let mut cos = Vec::with_capacity(len * 2 * half);
        let mut sin = Vec::with_capacity(len * 2 * half);
        for pos in 0..len {
            // transformers multiplies in f32; so do we, then widen.
            for _ in 0..2 {
                for &f in inv {
                    let angle = (pos as f32 * f as f32) as f64;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (len, 2 * half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (len, 2 * half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// cos, sin (T, D) for positions start..start+T, growing the tables when needed.
    fn rows(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let need = start + t;
        let held = |g: &Option<(Tensor, Tensor)>| g.as_ref().and_then(|(c, _)| c.dim(0).ok()).unwrap_or(0);
        {
            let guard = self.tables.read().map_err(|_| EngineError::Internal("rotary tables poisoned".into()))?;
            if let Some((cos, sin)) = guard.as_ref().filter(|_| held(&guard) >= need) {
                return Ok((cos.narrow(0, start, t)?, sin.narrow(0, start, t)?));
            }
        }
        let mut guard = self.tables.write().map_err(|_| EngineError::Internal("rotary tables poisoned".into()))?;
        if held(&guard) < need {
            let len = need.next_power_of_two().max(256).min(self.max.max(need));
            *guard = Some(self.build(len)?);
        }
        let (cos, sin) = guard.as_ref().ok_or_else(|| EngineError::Internal("rotary tables missing".into()))?;
        Ok((cos.narrow(0, start, t)?, sin.narrow(0, start, t)?))
    }

    /// Moves x (B, T, N, D) to heads, (B, N, T, D), rotated for positions start..start+T: one
    /// fused pass on the CPU ([`crate::kernels::rotary_to_heads`]), a transpose and
    /// [`Rotary::apply`] elsewhere.
    pub fn apply_to_heads(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        if crate::kernels::applies(x) {
            let (_b, t, _n, _d) = x.dims4()?;
            let (cos, sin) = self.rows(start, t)?;
            return crate::kernels::rotary_to_heads(x, &cos, &sin);
        }
        self.apply(&x.transpose(1, 2)?.contiguous()?, start)
    }

    /// Rotates x (B, N, T, D) for positions start..start+T (`rotate_half` convention).
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _n, t, d) = x.dims4()?;
        let (cos, sin) = self.rows(start, t)?; // (T, D) each
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // (B, N, T, D)
        Ok((mul_const(x, &cos)? + mul_const(&rotated, &sin)?)?)
    }
}

/// The gated MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// (F, C)
    pub gate_proj: Linear,
    /// (F, C)
    pub up_proj: Linear,
    /// (C, F)
    pub down_proj: Linear,
}

impl Mlp {
    /// x (B, T, C) → (B, T, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?; // (B, T, F)
        let up = self.up_proj.forward(x)?; // (B, T, F)
        let act =
            if crate::kernels::applies(&gate) { crate::kernels::swiglu(&gate, &up)? } else { (gate.silu()? * up)? };
        self.down_proj.forward(&act)
    }
}

/// Grouped-query self-attention with optional q/k norm and sliding window.
#[derive(Debug, Clone)]
pub struct Attention {
    /// (H·D, C)
    pub q_proj: Linear,
    /// (K·D, C)
    pub k_proj: Linear,
    /// (K·D, C)
    pub v_proj: Linear,
    /// (C, H·D)
    pub o_proj: Linear,
    /// (D), Qwen3 only.
    pub q_norm: Option<RmsNorm>,
    /// (D), Qwen3 only.
    pub k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// How attention is evaluated in one forward call: the sliding window (if any), the query chunk,
/// and the causal mask, built once for the call (see [`AttnSpec::mask`]).
#[derive(Debug, Clone)]
pub struct AttnSpec {
    /// A query sees at most this many keys (itself included); `None`: all earlier ones.
    pub window: Option<usize>,
    /// Query rows per chunk (at least 1).
    pub chunk: usize,
    /// Positions the call's queries end at: no chunk's first query lies past `keys − 1`.
    keys: usize,
    /// (X, L, mask): the mask (L, X+L) of L queries at positions X..X+L, X the call's last
    /// chunk start; every chunk's mask is a view of it.
    masks: std::sync::OnceLock<(usize, usize, Tensor)>,
}

impl AttnSpec {
    /// (start, len) of each chunk of `t` query rows.
    pub fn chunks(&self, t: usize) -> impl Iterator<Item = (usize, usize)> {
        let chunk = self.chunk.max(1);
        (0..t).step_by(chunk).map(move |s| (s, chunk.min(t - s)))
    }

    /// The additive mask (L, S) of queries at positions first..first+L over keys 0..S (see
    /// [`causal_mask`]), or `None` when no key needs masking: a single query that sees every key
    /// (a decode step, unless the sliding window cuts the history).
    ///
    /// Whether query p sees key j depends on p − j only, so the mask (L, X+L) of the call's first
    /// chunk, shifted to the last chunk start X, holds every chunk's mask as a view: chunk
    /// `first` reads rows 0..L, columns X−first..X+L. It is built at the first call (every layer
    /// and the backward pass reuse it); a chunk it does not cover gets a mask of its own.
    pub fn mask(&self, len: usize, first: usize, keys: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        if keys == first + len && len == 1 && self.window.is_none_or(|w| first < w) {
            return Ok(None);
        }
        if self.masks.get().is_none() && keys == first + len {
            // chunks start at first, first + chunk, …, each before `self.keys`
            let last = first + (self.keys.max(keys) - 1 - first) / self.chunk.max(1) * self.chunk.max(1);
            let _ = self.masks.set((last, len, causal_mask(len, last, last + len, self.window, dtype, device)?));
        }
        match self.masks.get() {
            Some((last, rows, m))
                if keys == first + len
                    && first <= *last
                    && len <= *rows
                    && m.dtype() == dtype
                    && m.device().same_device(device) =>
            {
                Ok(Some(m.narrow(0, 0, len)?.narrow(1, last - first, keys)?)) // (L,X+L) -> (len,keys)
            }
            _ => Ok(Some(causal_mask(len, first, keys, self.window, dtype, device)?)),
        }
    }
}

impl Attention {
    /// x (B, T, C) at positions start..start+T → y (B, T, C). With a cache, keys and values of
    /// earlier positions (S of them) are read from it and this call's are written into it
    /// (detached: the cache is for sampling only, never for training). Attention runs in query
    /// chunks of `chunk` rows (see [`Attention::core`]).
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        attn: &AttnSpec,
        start: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (q, kk, v) = self.qkv(x, rotary, start)?;
        let (kk, v) = match cache {
            None => (kk, v),
            Some(slot) => slot.append(&kk, &v, start)?, // (B,K,S+T,D) each
        };
        let y = self.core(&q, &kk, &v, attn, start)?;
        self.o_proj.forward(&y)
    }

    /// Projections, q/k norm and rotary: x (B, T, C) → q (B, H, T, D), k and v (B, K, T, D).
    pub fn qkv(&self, x: &Tensor, rotary: &Rotary, start: usize) -> Result<(Tensor, Tensor, Tensor)> {
        self.heads(&self.q_proj.forward(x)?, &self.k_proj.forward(x)?, &self.v_proj.forward(x)?, rotary, start)
    }

    /// The projections' outputs q (B, T, H·D), k and v (B, T, K·D) as heads, with q/k norm and
    /// rotary: → q (B, H, T, D), k and v (B, K, T, D).
    pub fn heads(
        &self,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        start: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = q.dims3()?;
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = q.reshape((b, t, h, d))?; // (B,T,H·D) -> (B,T,H,D)
        let kk = kk.reshape((b, t, k, d))?; // (B,T,K·D) -> (B,T,K,D)
        let v = v.reshape((b, t, k, d))?; // (B,T,K·D) -> (B,T,K,D)
        let (q, kk) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&kk)?),
            _ => (q, kk),
        };
        let q = rotary.apply_to_heads(&q, start)?; // (B,T,H,D) -> (B,H,T,D)
        let kk = rotary.apply_to_heads(&kk, start)?; // (B,T,K,D) -> (B,K,T,D)
        let v = v.transpose(1, 2)?.contiguous()?; // (B,T,K,D) -> (B,K,T,D)
        Ok((q, kk, v))
    }

    /// Causal attention of q (B, H, T, D) at positions start..start+T over k, v (B, K, S+T, D)
    /// → y (B, T, H·D), in chunks of `attn.chunk` query rows: a chunk only reads the keys it may
    /// see, and never more than (B, H, chunk, S+T) scores exist at once.
    pub fn core(&self, q: &Tensor, kk: &Tensor, v: &Tensor, attn: &AttnSpec, start: usize) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let mut ys = Vec::with_capacity(t.div_ceil(attn.chunk.max(1)));
        for (s, len) in attn.chunks(t) {
            let keys = start + s + len;
            ys.push(self.attend(
                &q.narrow(2, s, len)?,
                &kk.narrow(2, 0, keys)?,
                &v.narrow(2, 0, keys)?,
                attn,
                start + s,
            )?);
        }
        let y = if ys.len() == 1 { ys.remove(0) } else { Tensor::cat(&ys, 2)? }; // (B,H,T,D)
        Ok(y.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?) // (B,H,T,D) -> (B,T,H·D)
    }

    /// One chunk: q (B, H, L, D) at positions first..first+L, k and v (B, K, first+L, D) →
    /// (B, H, L, D).
    pub fn attend(&self, q: &Tensor, kk: &Tensor, v: &Tensor, attn: &AttnSpec, first: usize) -> Result<Tensor> {
        if crate::kernels::applies(q) && kk.dtype() == q.dtype() {
            // one op, softmax in place, only the output and a log-sum-exp per row kept
            return crate::kernels::attention(q, kk, v, first, attn.window);
        }
        let (b, h, len, d) = q.dims4()?;
        let (k, keys) = (self.num_kv_heads, kk.dim(2)?);
        // Grouped-query attention without copying keys: heads are ordered kv-head-major, so the
        // n = H/K query heads sharing a kv head are adjacent and fold into the query axis.
        let n = h / k;
        let q = q.contiguous()?.reshape((b, k, n * len, d))?; // (B,H,L,D) -> (B,K,n·L,D)
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&kk.t()?)? * scale)?; // (B,K,n·L,D) @ (B,K,D,S) -> (B,K,n·L,S)
        let scores = scores.reshape((b, k, n, len, keys))?; // the (L,S) mask broadcasts over n
        let scores = match attn.mask(len, first, keys, scores.dtype(), scores.device())? {
            Some(mask) => add_const(&scores, &mask)?, // the (L,S) mask broadcasts
            None => scores,
        };
        // softmax in f32 (transformers' eager attention does the same for bf16/f16)
        let probs = softmax_last_dim(&scores.to_dtype(wide(scores.dtype()))?)?.to_dtype(v.dtype())?;
        let probs = probs.reshape((b, k, n * len, keys))?;
        Ok(probs.matmul(v)?.reshape((b, h, len, d))?) // (B,K,n·L,S) @ (B,K,S,D) -> (B,K,n·L,D) -> (B,H,L,D)
    }

    /// The same attention with nothing tracked for gradients.
    fn detached(&self) -> Attention {
        Attention {
            q_proj: self.q_proj.detached(),
            k_proj: self.k_proj.detached(),
            v_proj: self.v_proj.detached(),
            o_proj: self.o_proj.detached(),
            q_norm: self.q_norm.as_ref().map(RmsNorm::detached),
            k_norm: self.k_norm.as_ref().map(RmsNorm::detached),
            ..*self
        }
    }
}

/// The dtype reductions run in: f64 for an f64 model, f32 for every other.
pub fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Softmax over the last dim from differentiable ops (the max is a constant shift, so detached).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let neg_max = x.max_keepdim(D::Minus1)?.detach().neg()?;
    let e = add_const(x, &neg_max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dim from differentiable ops.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let neg_max = x.max_keepdim(D::Minus1)?.detach().neg()?;
    let shifted = add_const(x, &neg_max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// One pre-norm decoder block.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// x (B, T, C) → (B, T, C); see [`Attention::forward`] for `start` and `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        attn: &AttnSpec,
        start: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, rotary, attn, start, cache)?)?;
        Ok((&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }

    /// The uncached forward pass that also returns the attention's output before `o_proj`
    /// (B, T, H·D): activation recompute keeps it, so attention runs once less on backward.
    pub fn forward_keeping_attention(&self, x: &Tensor, rotary: &Rotary, attn: &AttnSpec) -> Result<(Tensor, Tensor)> {
        let att = &self.self_attn;
        let (q, k, v) = att.qkv(&self.input_layernorm.forward(x)?, rotary, 0)?;
        let y = att.core(&q, &k, &v, attn, 0)?;
        let h = (x + att.o_proj.forward(&y)?)?;
        let out = (&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?;
        Ok((out, y))
    }

    fn detached(&self) -> DecoderLayer {
        DecoderLayer {
            input_layernorm: self.input_layernorm.detached(),
            self_attn: self.self_attn.detached(),
            post_attention_layernorm: self.post_attention_layernorm.detached(),
            mlp: Mlp {
                gate_proj: self.mlp.gate_proj.detached(),
                up_proj: self.mlp.up_proj.detached(),
                down_proj: self.mlp.down_proj.detached(),
            },
        }
    }
}

/// The whole decoder with its (shared) base weights and this run's trainable parameters, built
/// from a checkpoint's tensors by [`Model::new`] (`model/build.rs`).
#[derive(Debug, Clone)]
pub struct Model {
    /// `model.embed_tokens.weight`: (V, C).
    pub embed_tokens: Weight,
    /// `model.layers.N`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head.weight`: (V, C); `None` when tied to `embed_tokens`.
    pub lm_head: Option<Weight>,
    /// LoRA on the output projection (`lm_head` among the target modules), tied or not.
    pub head_lora: Option<Lora>,
    rotary: Rotary,
    config: ModelConfig,
    chunking: Chunking,
    /// Bytes of the trained parameters (each step's gradients take as many).
    trained_bytes: u64,
}

/// How much one chunk of attention or of the loss holds at once, whatever the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Attention scores per query chunk (default 2^26 on the CPU: 256 MB in f32; 2^28 on a GPU).
    pub attn_elements: usize,
    /// Logits per chunk of positions in the loss of a recomputed or forward-only step
    /// (default 2^24 on the CPU: 64 MB in f32; 2^26 on a GPU).
    pub head_elements: usize,
}

impl Default for Chunking {
    fn default() -> Self {
        Self { attn_elements: 1 << 26, head_elements: 1 << 24 }
    }
}

impl Chunking {
    /// The default for a device: four times larger chunks on a GPU, where each chunk costs a
    /// few kernel launches and memory is plentiful (1 GB of f32 scores per attention chunk).
    pub fn for_device(device: &Device) -> Self {
        let base = Self::default();
        if device.is_cpu() {
            base
        } else {
            Self { attn_elements: base.attn_elements * 4, head_elements: base.head_elements * 4 }
        }
    }

    /// Query rows per attention chunk over `b` sequences of `heads` heads and `keys` keys: at
    /// most `attn_elements` scores, one row at least.
    pub fn attention_rows(&self, b: usize, heads: usize, keys: usize) -> usize {
        (self.attn_elements / (b * heads * keys.max(1)).max(1)).max(1)
    }

    /// Positions per chunk of the head over `b` sequences of `t` positions and a vocabulary of
    /// `vocab`: at most `head_elements` logits, one position at least (and at most `t`).
    pub fn head_positions(&self, b: usize, t: usize, vocab: usize) -> usize {
        (self.head_elements / (b * vocab).max(1)).clamp(1, t.max(1))
    }
}

impl Model {
    /// An inference copy: the same weights (storage shared, so later optimizer steps show through)
    /// with nothing tracked for gradients. Sampling uses it so no op records a backward graph.
    pub fn detached(&self) -> Model {
        Model {
            embed_tokens: self.embed_tokens.detached(),
            layers: self.layers.iter().map(DecoderLayer::detached).collect(),
            norm: self.norm.detached(),
            lm_head: self.lm_head.as_ref().map(Weight::detached),
            head_lora: self.head_lora.as_ref().map(Lora::detached),
            rotary: self.rotary.clone(),
            config: self.config.clone(),
            chunking: self.chunking,
            trained_bytes: self.trained_bytes,
        }
    }

    /// Bytes of the parameters being trained: a step's gradients take as many.
    pub fn trained_bytes(&self) -> u64 {
        self.trained_bytes
    }

    /// The dtype activations run in (the base's).
    pub fn dtype(&self) -> DType {
        self.rotary.dtype
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.rotary.device
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Attention for a batch of `b` sequences over `keys` positions: query chunks sized so that
    /// one chunk's scores hold at most `chunking.attn_elements` values.
    pub fn attn_spec(&self, b: usize, keys: usize) -> AttnSpec {
        AttnSpec {
            window: self.config.sliding_window,
            chunk: self.chunking.attention_rows(b, self.config.num_attention_heads, keys),
            keys,
            masks: Default::default(),
        }
    }

    /// How attention and the loss are split into chunks.
    pub fn chunking(&self) -> Chunking {
        self.chunking
    }

    /// Sets the chunk sizes (tests use tiny ones to exercise every path on tiny models).
    pub fn set_chunking(&mut self, chunking: Chunking) {
        self.chunking = chunking;
    }

    /// The rotary tables.
    pub fn rotary(&self) -> &Rotary {
        &self.rotary
    }

    /// Token ids (B, T) u32 → logits (B, T, V) for every position.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_from(ids, None, true)
    }

    /// Token ids (B, T) u32 → hidden states (B, T, C) after the last layer, before the final
    /// norm and head (the training path applies [`Model::head`] to chunks of positions).
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_from(ids, None)
    }

    /// Sampling path: ids (B, T) continue the sequence held in `cache` (appended to it);
    /// logits (B, T, V) for every new position, or (B, 1, V) for the last one only.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, all_positions: bool) -> Result<Tensor> {
        self.forward_from(ids, Some(cache), all_positions)
    }

    /// [`Model::forward_cached`] up to the last layer: hidden states (B, T, C) before the final
    /// norm and head, so a caller can apply [`Model::head`] to chunks of positions instead of
    /// holding (B, T, V) logits at once.
    pub fn forward_cached_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.hidden_from(ids, Some(cache))
    }

    /// Token ids (B, T) → embeddings (B, T, C).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let rows = match (&self.embed_tokens, self.embed_tokens.tensor()) {
            (_, Some(emb)) => emb.index_select(&ids.flatten_all()?, 0)?,
            (Weight::Quantized(q), None) => q.rows(&ids.flatten_all()?, self.dtype())?, // only the rows used are dequantized
            (_, None) => return Err(EngineError::Internal("embedding table missing".into())),
        };
        Ok(rows.reshape((b, t, self.config.hidden_size))?) // (B·T,C) -> (B,T,C)
    }

    /// Final norm and output projection: hidden states (B, T, C) → logits (B, T, V).
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        match &self.head_lora {
            None => w.matmul_t(&x),
            Some(l) => Linear { weight: w.clone(), bias: None, lora: Some(l.clone()) }.forward(&x),
        }
    }

    fn forward_from(&self, ids: &Tensor, cache: Option<&mut KvCache>, all_positions: bool) -> Result<Tensor> {
        let x = self.hidden_from(ids, cache)?;
        let t = x.dim(1)?;
        let x = if all_positions { x } else { x.narrow(1, t - 1, 1)? }; // (B,T,C) -> (B,1,C)
        self.head(&x) // (B,T,C) -> (B,T,V)
    }

    fn hidden_from(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.len);
        let max = self.config.max_position_embeddings;
        if start + t > max {
            return Err(EngineError::InvalidParam {
                field: "tokens",
                value: format!("{} positions", start + t),
                reason: "longer than the model's context (max_position_embeddings)",
            });
        }
        let mut x = self.embed(ids)?;
        let attn = self.attn_spec(b, start + t);
        if let Some(c) = cache.as_deref_mut() {
            let capacity = c.capacity;
            c.layers.resize(self.layers.len(), LayerCache { kv: None, capacity });
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &self.rotary, &attn, start, slot)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(x)
    }
}

/// One layer's cached keys and values: buffers (B, K, capacity, D) written in place, so a decode
/// step copies only its own new position instead of re-concatenating the whole history.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    capacity: usize,
}

impl LayerCache {
    /// Writes k, v (B, K, T, D) at positions start..start+T and returns the filled part,
    /// (B, K, start+T, D) each. Grows (doubling) when the buffers are too short.
    fn append(&mut self, k: &Tensor, v: &Tensor, start: usize) -> Result<(Tensor, Tensor)> {
        let (b, heads, t, d) = k.dims4()?;
        let need = start + t;
        let held = match &self.kv {
            Some((bk, _)) => bk.dim(2)?,
            None => 0,
        };
        if held < need {
            let cap = need.max(self.capacity).max(2 * held);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, heads, cap, d), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| start > 0) {
                    buf.slice_set(&old.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = self.kv.take();
            self.kv = Some((grow(old.as_ref().map(|o| &o.0))?, grow(old.as_ref().map(|o| &o.1))?));
        }
        let Some((bk, bv)) = self.kv.as_ref() else {
            return Err(EngineError::Internal("kv cache buffer missing".into()));
        };
        bk.slice_set(&k.detach().contiguous()?, 2, start)?;
        bv.slice_set(&v.detach().contiguous()?, 2, start)?;
        Ok((bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?))
    }
}

/// Keys and values of the positions seen so far, per layer, for sampling.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache whose buffers are sized for `capacity` positions up front.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { layers: Vec::new(), len: 0, capacity }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first call.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Repeats a batch-1 cache `n` times along the batch (one prefill shared by `n` samples).
    pub fn expand(&self, n: usize) -> Result<Self> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            let (_b, k, s, d) = t.dims4()?;
            Ok(t.broadcast_as((n, k, s, d))?.contiguous()?) // (1,K,S,D) -> (n,K,S,D)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let kv = l.kv.as_ref().map(|(k, v)| Ok::<_, EngineError>((rep(k)?, rep(v)?))).transpose()?;
                Ok(LayerCache { kv, capacity: l.capacity })
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, len: self.len, capacity: self.capacity })
    }
}

/// Additive mask (L, S) for queries at positions first..first+L over keys 0..S: 0 where query p
/// may see key j (j ≤ p, and p − j < window), −∞ elsewhere. Built on the device.
fn causal_mask(
    len: usize,
    first: usize,
    keys: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let p = Tensor::arange(first as u32, (first + len) as u32, device)?.reshape((len, 1))?;
    let j = Tensor::arange(0u32, keys as u32, device)?.reshape((1, keys))?;
    let mut visible = j.broadcast_le(&p)?; // (L,S) u8
    if let Some(w) = window {
        // p − j < w  ⇔  j + w > p
        let jw = Tensor::arange(w as u32, (keys + w) as u32, device)?.reshape((1, keys))?;
        visible = (visible * jw.broadcast_gt(&p)?)?;
    }
    let zero = Tensor::zeros((len, keys), dtype, device)?;
    let neg = Tensor::full(f32::NEG_INFINITY, (len, keys), device)?.to_dtype(dtype)?;
    Ok(visible.where_cond(&zero, &neg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_tables_grow_lazily_and_agree_with_a_full_build() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type":"llama","hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,
                "num_attention_heads":2,"num_key_value_heads":1,"vocab_size":10,"max_position_embeddings":4096,
                "rope_theta":10000.0,"rms_norm_eps":1e-5}"#,
            "test",
        )
        .unwrap();
        let rot = Rotary::new(&cfg, DType::F32, &Device::Cpu).unwrap();
        let (c0, _) = rot.rows(0, 5).unwrap();
        assert_eq!(
            rot.tables.read().unwrap().as_ref().unwrap().0.dim(0).unwrap(),
            256,
            "first use builds a small table"
        );
        let (c1, s1) = rot.rows(3000, 3).unwrap();
        assert_eq!(rot.tables.read().unwrap().as_ref().unwrap().0.dim(0).unwrap(), 4096);
        let (full_c, full_s) = rot.build(4096).unwrap();
        assert_eq!(c1.to_vec2::<f32>().unwrap(), full_c.narrow(0, 3000, 3).unwrap().to_vec2::<f32>().unwrap());
        assert_eq!(s1.to_vec2::<f32>().unwrap(), full_s.narrow(0, 3000, 3).unwrap().to_vec2::<f32>().unwrap());
        assert_eq!(c0.to_vec2::<f32>().unwrap(), full_c.narrow(0, 0, 5).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn masks_built_once_per_call_equal_each_chunks_own() {
        let dev = Device::Cpu;
        let dense = |m: &Tensor| m.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        // (queries after `start` cached positions, chunk, window), every layer asking in turn
        for (start, t, chunk, window) in [
            (0, 7, 3, None),
            (5, 9, 4, Some(3)),
            (0, 6, 6, Some(4)),
            (11, 1, 8, None),
            (11, 1, 8, Some(4)),
            (2, 1, 8, Some(4)),
        ] {
            let spec = AttnSpec { window, chunk, keys: start + t, masks: Default::default() };
            for _layer in 0..2 {
                for (s, len) in spec.chunks(t) {
                    let (first, keys) = (start + s, start + s + len);
                    let want = causal_mask(len, first, keys, window, DType::BF16, &dev).unwrap();
                    match spec.mask(len, first, keys, DType::BF16, &dev).unwrap() {
                        Some(got) => {
                            assert_eq!(dense(&got), dense(&want), "start {start} chunk {s}+{len} window {window:?}")
                        }
                        None => assert!(dense(&want).iter().flatten().all(|&x| x == 0.0), "a skipped mask hides keys"),
                    }
                }
            }
            assert!(
                spec.masks.get().is_none() == (t == 1 && window.is_none_or(|w| start < w)),
                "built once, or not at all"
            );
        }
    }
}
