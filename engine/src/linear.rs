//! The one linear type where LoRA attaches, and the RMSNorm beside it.

use crate::error::{EngineError, Result};
use crate::kernels::{self, add_const, frozen_matmul, mul_const, Frozen};
use crate::quant::QWeight;
use candle_core::{DType, Tensor, Var, D};

/// A weight that is either frozen (no gradient) or trained.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Base weight, shared between runs; never receives a gradient.
    Frozen(Tensor),
    /// Trained weight (full fine-tuning).
    Trainable(Var),
    /// Base weight held as quantized blocks (QLoRA), dequantized into a temporary whenever a
    /// product needs it; never receives a gradient.
    Quantized(QWeight),
}

impl Weight {
    /// `x @ selfᵀ`: x (…, in), self (out, in) → (…, out); a frozen weight gets no gradient.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Frozen(w) if kernels::applies(x) && w.dtype() == x.dtype() => {
                kernels::linear(x, Frozen::Dense(w.clone()), None)
            }
            Weight::Quantized(q) if kernels::applies(x) => kernels::linear(x, Frozen::Quantized(q.clone()), None),
            Weight::Frozen(w) => frozen_matmul(x, w),
            // elsewhere than the fused CPU path the dequantized copy lives until backward
            Weight::Quantized(q) => frozen_matmul(x, &q.dequantize(x.dtype())?),
            Weight::Trainable(w) => Ok(x.broadcast_matmul(&w.as_tensor().t()?)?),
        }
    }

    /// The value of a frozen weight as `dtype`: the tensor itself (shared) or, for quantized
    /// blocks, a dequantized temporary.
    pub fn frozen_value(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Frozen(t) => Ok(t.to_dtype(dtype)?),
            Weight::Quantized(q) => q.dequantize(dtype),
            Weight::Trainable(v) => Ok(v.as_detached_tensor().to_dtype(dtype)?),
        }
    }

    /// A frozen weight as the decode kernels read it (dense or blocks); `None` for a trained one.
    fn rows(&self) -> Option<kernels::WeightRows<'_>> {
        match self {
            Weight::Frozen(w) => Some(kernels::WeightRows::Dense(w)),
            Weight::Quantized(q) => Some(kernels::WeightRows::Blocks(q)),
            Weight::Trainable(_) => None,
        }
    }

    /// Whether both are the same frozen storage (a base weight two runs share), not merely
    /// equal values; a trained weight is nobody else's.
    pub fn same(&self, other: &Weight) -> bool {
        match (self, other) {
            (Weight::Frozen(a), Weight::Frozen(b)) => a.id() == b.id(),
            (Weight::Quantized(a), Weight::Quantized(b)) => a.same(b),
            _ => false,
        }
    }

    /// Whether this weight stays fixed during training (frozen or quantized).
    pub fn is_frozen(&self) -> bool {
        !matches!(self, Weight::Trainable(_))
    }

    /// The kernels' view of a weight that stays fixed during training (sharing its storage);
    /// `None` for a trained one.
    pub fn frozen(&self) -> Option<Frozen> {
        match self {
            Weight::Frozen(t) => Some(Frozen::Dense(t.clone())),
            Weight::Quantized(q) => Some(Frozen::Quantized(q.clone())),
            Weight::Trainable(_) => None,
        }
    }

    /// Its shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Quantized(q) => vec![q.dims2().0, q.dims2().1],
            Weight::Frozen(t) => t.dims().to_vec(),
            Weight::Trainable(v) => v.dims().to_vec(),
        }
    }

    /// The same weight, frozen and untracked (shares storage, so it sees later updates).
    pub fn detached(&self) -> Weight {
        match self {
            Weight::Frozen(t) => Weight::Frozen(t.clone()),
            Weight::Trainable(v) => Weight::Frozen(v.as_detached_tensor()),
            Weight::Quantized(q) => Weight::Quantized(q.clone()),
        }
    }

    /// The current value of a dense weight; `None` for quantized blocks (see
    /// [`Weight::frozen_value`]).
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Weight::Frozen(t) => Some(t),
            Weight::Trainable(v) => Some(v.as_tensor()),
            Weight::Quantized(_) => None,
        }
    }
}

/// A LoRA pair on one projection: `y += (x Aᵀ) Bᵀ · alpha/r`.
///
/// `a` and `b` are the run's variables (tracked for gradients), or detached views of them in an
/// inference copy of the model ([`Linear::detached`]).
#[derive(Debug, Clone)]
pub struct Lora {
    /// A: (r, in), initialised as PEFT does (Kaiming-uniform, a = √5).
    pub a: Tensor,
    /// B: (out, r), zero at creation.
    pub b: Tensor,
    /// alpha / r.
    pub scale: f64,
    /// Bᵀ (r, out) copied when an inference copy is made: the decode kernel adds `xa_j · Bᵀ_j`
    /// row by row instead of taking r-long dot products. `None` in the training model.
    pub bt: Option<Tensor>,
}

impl Lora {
    /// `y + scale · (x Aᵀ) Bᵀ` with nothing tracked (an inference copy): PEFT adds the f32 LoRA
    /// term to the base output in f32, then rounds once.
    fn add_untracked(&self, y: &Tensor, x: &Tensor) -> Result<Tensor> {
        let dt = self.a.dtype();
        let x = x.to_dtype(dt)?;
        let xab = frozen_matmul(&(frozen_matmul(&x, &self.a)? * self.scale)?, &self.b)?; // (…, in) -> (…, r) -> (…, out)
        Ok((y.to_dtype(dt)? + xab)?.to_dtype(y.dtype())?)
    }

    /// The pair as the decode kernels take it (A, Bᵀ, scale): an inference copy's; `None` for
    /// the training model's, which has no Bᵀ.
    fn kernel_pair(&self) -> Option<kernels::LoraRows<'_>> {
        self.bt.as_ref().map(|bt| (&self.a, bt, self.scale))
    }

    /// The same pair with nothing tracked for gradients, and Bᵀ for the decode kernel.
    pub fn detached(&self) -> Lora {
        Lora {
            a: self.a.detach(),
            b: self.b.detach(),
            scale: self.scale,
            bt: self.b.detach().t().and_then(|t| t.contiguous()).ok(),
        }
    }
}

/// A projection `y = x Wᵀ (+ b) (+ LoRA)`, with field names equal to the checkpoint's.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `….weight`: (out, in).
    pub weight: Weight,
    /// `….bias`: (out).
    pub bias: Option<Weight>,
    /// The adapter, if this projection is a LoRA target.
    pub lora: Option<Lora>,
}

impl Linear {
    /// x (…, in) → (…, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // quantized blocks take the decode kernel in decode steps only (`forward_segments`);
        // everything else multiplies their dequantized values
        if let (Weight::Frozen(w), Some(bias)) = (&self.weight, self.kernel_bias()) {
            let lora = match &self.lora {
                None => Some(None),
                Some(l) => l.kernel_pair().map(Some),
            };
            if let Some(y) = lora.and_then(|lora| kernels::linear_few_rows(x, w, bias, lora)) {
                return Ok(y);
            }
        }
        // the fused CPU product takes a frozen weight of x's dtype and a LoRA pair of the same
        let dense_fits = self.weight.tensor().is_none_or(|w| w.dtype() == x.dtype());
        let fused_lora = self.lora.as_ref().filter(|l| l.a.dtype() == x.dtype()).map(|l| (&l.a, &l.b, l.scale));
        let fused_weight = self
            .weight
            .frozen()
            .filter(|_| kernels::applies(x) && dense_fits && (fused_lora.is_some() || self.lora.is_none()));
        let fused = fused_weight.is_some();
        if let (Some(lora), false) = (&self.lora, fused) {
            if lora.a.is_variable() {
                // training: one op that keeps only x, A and B for backward (see crate::lora_ops);
                // the model gives a LoRA pair only to a frozen base (full fine-tuning has none)
                let trained = || EngineError::Internal("a LoRA pair on a trained base weight or bias".into());
                let weight = self.weight.frozen().ok_or_else(trained)?;
                let bias = self.bias.as_ref().map(|b| b.frozen().ok_or_else(trained)).transpose()?;
                return crate::lora_ops::lora_linear(x, &weight, bias.as_ref(), (&lora.a, &lora.b, lora.scale));
            }
        }
        let mut y = match fused_weight {
            Some(w) => kernels::linear(x, w, fused_lora)?,
            None => self.weight.matmul_t(x)?,
        };
        match &self.bias {
            Some(Weight::Frozen(b)) => y = add_const(&y, b)?,
            Some(b @ Weight::Quantized(_)) => y = add_const(&y, &b.frozen_value(y.dtype())?)?,
            Some(Weight::Trainable(b)) => y = y.broadcast_add(b.as_tensor())?,
            None => {}
        }
        if let (Some(lora), false) = (&self.lora, fused) {
            y = lora.add_untracked(&y, x)?;
        }
        Ok(y)
    }

    /// Rows of several runs through this projection in one pass (a decode step over several
    /// requests): x (M, …, in) is split along its first axis into segments, `segs` giving each
    /// one's row count and LoRA pair (an inference copy's, this projection's counterpart in that
    /// run) in row order. The base product runs once over all rows; each segment adds its own
    /// pair. A segment's rows equal what [`Linear::forward_segments`] gives it alone.
    pub fn forward_segments(&self, x: &Tensor, segs: &[(usize, Option<&Lora>)]) -> Result<Tensor> {
        if let (Some(w), Some(bias)) = (self.weight.rows(), self.kernel_bias()) {
            let pairs: Option<Vec<(usize, Option<kernels::LoraRows<'_>>)>> = segs
                .iter()
                .map(|&(rows, lora)| match lora {
                    None => Some((rows, None)),
                    Some(l) => l.kernel_pair().map(|p| (rows, Some(p))),
                })
                .collect();
            if let Some(y) = pairs.and_then(|pairs| kernels::linear_segments(x, w, bias, &pairs)) {
                return Ok(y);
            }
        }
        let base = Linear { weight: self.weight.clone(), bias: self.bias.clone(), lora: None }.forward(x)?;
        if segs.iter().all(|s| s.1.is_none()) {
            return Ok(base);
        }
        let mut parts = Vec::with_capacity(segs.len());
        let mut first = 0;
        for &(rows, lora) in segs {
            let y = base.narrow(0, first, rows)?;
            parts.push(match lora {
                Some(l) => l.add_untracked(&y, &x.narrow(0, first, rows)?)?,
                None => y,
            });
            first += rows;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The bias as the decode kernels take it: `Some(None)` without one, `None` when it is not
    /// a dense frozen tensor (the kernels then do not apply).
    fn kernel_bias(&self) -> Option<Option<&Tensor>> {
        match &self.bias {
            None => Some(None),
            Some(Weight::Frozen(b)) => Some(Some(b)),
            Some(Weight::Trainable(_) | Weight::Quantized(_)) => None,
        }
    }

    /// The same projection with nothing tracked for gradients (storage shared, for sampling).
    pub fn detached(&self) -> Linear {
        Linear {
            weight: self.weight.detached(),
            bias: self.bias.as_ref().map(Weight::detached),
            lora: self.lora.as_ref().map(Lora::detached),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self.weight.dims()[..] {
            [out, inp] => Ok((out, inp)),
            ref d => Err(EngineError::Internal(format!("a projection weight has shape {d:?}"))),
        }
    }
}

/// Root-mean-square norm from differentiable ops (candle's fused `rms_norm` drops gradients).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `….weight`: (C).
    pub weight: Weight,
    /// Epsilon inside the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// The same norm with its weight untracked.
    pub fn detached(&self) -> RmsNorm {
        RmsNorm { weight: self.weight.detached(), eps: self.eps }
    }

    /// x (…, C) → (…, C), computed in f32 or wider.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Weight::Frozen(w) = &self.weight {
            if kernels::applies(x) {
                return kernels::rms_norm(x, w, self.eps);
            }
        }
        let dtype = x.dtype();
        let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let xf = x.to_dtype(wide)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        let normed = xf.broadcast_div(&rms)?.to_dtype(dtype)?;
        match &self.weight {
            Weight::Frozen(w) => mul_const(&normed, w),
            Weight::Trainable(w) => Ok(normed.broadcast_mul(w.as_tensor())?),
            Weight::Quantized(q) => mul_const(&normed, &q.dequantize(dtype)?),
        }
    }
}
