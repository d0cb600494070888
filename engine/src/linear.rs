//! The one linear type where LoRA attaches, and the frozen-weight matmul it is built on.
//!
//! candle's `matmul` backward computes the gradient of both operands, so a frozen base weight
//! would cost a weight-sized gradient and an extra matmul per layer per step. [`frozen_matmul`]
//! is a custom op whose backward returns the input's gradient only.

use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Shape, Storage, Tensor, Var, D};

/// `x @ wᵀ` for a weight that receives no gradient: x (…, in), w (out, in) → (…, out).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(x.apply_op1(FrozenMatmul { w: w.clone() })?)
}

/// The custom op behind [`frozen_matmul`]; it holds the weight, its one argument is the input.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(&self, x: &S, x_l: &Layout, w: &S, w_l: &Layout) -> candle_core::Result<(S, Shape)> {
        let dims = x_l.dims();
        let (&k, batch) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("frozen_matmul: scalar input".into()))?;
        let (n, wk) = w_l.shape().dims2()?;
        if wk != k {
            candle_core::bail!("frozen_matmul: input has {k} features, weight expects {wk}")
        }
        let m: usize = batch.iter().product();
        // x: (M, K) contiguous; wᵀ: (K, N) as a strided view of w (N, K).
        let lhs_l = Layout::contiguous_with_offset((m, k), x_l.start_offset());
        let rhs_l = Layout::new(Shape::from((k, n)), vec![w_l.stride()[1], w_l.stride()[0]], w_l.start_offset());
        let out = x.matmul(w, (1, m, n, k), &lhs_l, &rhs_l)?;
        let mut out_dims = batch.to_vec();
        out_dims.push(n);
        Ok((out, Shape::from(out_dims)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, w_l) = self.w.storage_and_layout();
        match &*w {
            Storage::Cpu(w) => self.fwd(x, x_l, w, w_l),
            _ => candle_core::bail!("frozen_matmul: input on cpu, weight elsewhere"),
        }
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (w, w_l) = self.w.storage_and_layout();
        match &*w {
            Storage::Cuda(w) => self.fwd(x, x_l, w, w_l),
            _ => candle_core::bail!("frozen_matmul: input on cuda, weight elsewhere"),
        }
    }

    fn metal_fwd(&self, x: &MetalStorage, x_l: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        let (w, w_l) = self.w.storage_and_layout();
        match &*w {
            Storage::Metal(w) => self.fwd(x, x_l, w, w_l),
            _ => candle_core::bail!("frozen_matmul: input on metal, weight elsewhere"),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy @ w : (…, out) @ (out, in) → (…, in)
        Ok(Some(grad_res.broadcast_matmul(&self.w)?))
    }
}

/// A weight that is either frozen (no gradient) or trained.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Base weight, shared between runs; never receives a gradient.
    Frozen(Tensor),
    /// Trained weight (full fine-tuning).
    Trainable(Var),
}

impl Weight {
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
        let mut y = match &self.weight {
            Weight::Frozen(w) => frozen_matmul(x, w)?,
            Weight::Trainable(w) => x.broadcast_matmul(&w.as_tensor().t()?)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b.tensor())?;
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
        Ok(normed.broadcast_mul(self.weight.tensor())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn frozen_matmul_matches_matmul_and_gives_only_the_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 24., &dev).unwrap().reshape((2, 3, 4)).unwrap()).unwrap();
        let w = (Tensor::arange(0f32, 20., &dev).unwrap().reshape((5, 4)).unwrap() * 0.1).unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let reference = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), reference.to_vec3::<f32>().unwrap());

        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let expected = (reference * 2.).unwrap().broadcast_matmul(&w).unwrap();
        assert_eq!(gx.to_vec3::<f32>().unwrap(), expected.to_vec3::<f32>().unwrap());
        assert!(grads.get(&w).is_none(), "the frozen weight must not get a gradient");
        assert_eq!(grads.get_ids().count(), 1, "only the input keeps a gradient");
    }
}
