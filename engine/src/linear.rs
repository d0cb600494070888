//! The one linear type where LoRA attaches, and the RMSNorm beside it.

use crate::error::Result;
use crate::ops::{add_const, frozen_matmul, mul_const};
use candle_core::{DType, Tensor, Var, D};

/// A weight that is either frozen (no gradient) or trained.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Base weight, shared between runs; never receives a gradient.
    Frozen(Tensor),
    /// Trained weight (full fine-tuning).
    Trainable(Var),
}

impl Weight {
    /// `x @ selfᵀ`: x (…, in), self (out, in) → (…, out); a frozen weight gets no gradient.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Frozen(w) => frozen_matmul(x, w),
            Weight::Trainable(w) => Ok(x.broadcast_matmul(&w.as_tensor().t()?)?),
        }
    }

    /// The current value.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Weight::Frozen(t) => t,
            Weight::Trainable(v) => v.as_tensor(),
        }
    }
}

/// A LoRA pair on one projection: `y += (x Aᵀ) Bᵀ · alpha/r`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// A: (r, in), initialised as PEFT does (Kaiming-uniform, a = √5).
    pub a: Var,
    /// B: (out, r), zero at creation.
    pub b: Var,
    /// alpha / r.
    pub scale: f64,
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
        let mut y = self.weight.matmul_t(x)?;
        match &self.bias {
            Some(Weight::Frozen(b)) => y = add_const(&y, b)?,
            Some(Weight::Trainable(b)) => y = y.broadcast_add(b.as_tensor())?,
            None => {}
        }
        if let Some(lora) = &self.lora {
            let dt = lora.a.dtype();
            let xa = x.to_dtype(dt)?.broadcast_matmul(&lora.a.as_tensor().t()?)?; // (…, in) -> (…, r)
            let xab = xa.broadcast_matmul(&lora.b.as_tensor().t()?)?; // (…, r) -> (…, out)
            let out_dtype = y.dtype();
            y = (y + (xab * lora.scale)?.to_dtype(out_dtype)?)?;
        }
        Ok(y)
    }

    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(self.weight.tensor().dims2()?)
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
    /// x (…, C) → (…, C), computed in f32 or wider.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let xf = x.to_dtype(wide)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        let normed = xf.broadcast_div(&rms)?.to_dtype(dtype)?;
        match &self.weight {
            Weight::Frozen(w) => mul_const(&normed, w),
            Weight::Trainable(w) => Ok(normed.broadcast_mul(w.as_tensor())?),
        }
    }
}
