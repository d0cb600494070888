//! Frozen operands: the [`Frozen`] base weight the kernels take, and the ops with a constant
//! operand whose backward returns the input's gradient only.
//!
//! candle's backward computes the gradient of *both* operands of a matmul or a binary op and
//! keeps the one for an untracked operand until the end of `backward`. For a frozen base weight
//! that is a weight-sized buffer and an extra matmul per layer per step; for norm weights, rotary
//! tables and masks it is an activation-sized buffer per layer. These custom ops hold the
//! constant inside the op, so the graph only sees the input. They run on every backend.

use crate::error::Result;
use crate::quant::QWeight;
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Shape, Storage, Tensor};

/// A frozen base weight as the kernels read it: dense values or quantized blocks, sharing the
/// layer's storage (a clone copies a handle, not the weight). There is no trained variant: a
/// trained weight needs candle's graph for its gradient, which the ops holding a `Frozen` (the
/// fused linear, the training LoRA op) never give it, so they take frozen weights by type. An op
/// keeps its `Frozen` until its backward pass, hence a shared handle rather than a borrow.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// Dense values, held as they are.
    Dense(Tensor),
    /// Quantized blocks (QLoRA), dequantized into a temporary whenever a product needs them.
    Quantized(QWeight),
}

impl Frozen {
    /// Its shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Frozen::Dense(t) => t.dims().to_vec(),
            Frozen::Quantized(q) => vec![q.dims2().0, q.dims2().1],
        }
    }

    /// Its value as `dtype`: the tensor itself (shared when already `dtype`) or, for quantized
    /// blocks, a dequantized temporary.
    pub fn value(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => Ok(t.to_dtype(dtype)?),
            Frozen::Quantized(q) => q.dequantize(dtype),
        }
    }
}

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
        let (&k, batch) =
            dims.split_last().ok_or_else(|| candle_core::Error::Msg("frozen_matmul: scalar input".into()))?;
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
        let Storage::Cpu(w) = &*w else { candle_core::bail!("frozen_matmul: input on cpu, weight elsewhere") };
        if let Some(done) = super::gemv::frozen_matmul_few_rows(x, x_l, w, w_l)? {
            return Ok(done);
        }
        self.fwd(x, x_l, w, w_l)
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

/// `x * c` with `c` broadcast to `x`'s shape (right-aligned); only `x` gets a gradient.
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op1(ConstBinary { c: c.clone(), op: ConstOp::Mul })?)
}

/// `x + c` with `c` broadcast to `x`'s shape (right-aligned); only `x` gets a gradient.
pub fn add_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op1(ConstBinary { c: c.clone(), op: ConstOp::Add })?)
}

#[derive(Debug, Clone, Copy)]
enum ConstOp {
    Mul,
    Add,
}

struct ConstBinary {
    c: Tensor,
    op: ConstOp,
}

impl ConstBinary {
    fn fwd<S: BackendStorage>(&self, x: &S, x_l: &Layout, c: &S, c_l: &Layout) -> candle_core::Result<(S, Shape)> {
        let c_l = c_l.broadcast_as(x_l.shape().clone())?;
        let out = match self.op {
            ConstOp::Mul => x.binary_impl::<Mul>(c, x_l, &c_l)?,
            ConstOp::Add => x.binary_impl::<Add>(c, x_l, &c_l)?,
        };
        Ok((out, x_l.shape().clone()))
    }
}

impl CustomOp1 for ConstBinary {
    fn name(&self) -> &'static str {
        match self.op {
            ConstOp::Mul => "mul-const",
            ConstOp::Add => "add-const",
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, c_l) = self.c.storage_and_layout();
        match &*c {
            Storage::Cpu(c) => self.fwd(x, x_l, c, c_l),
            _ => candle_core::bail!("{}: input on cpu, constant elsewhere", self.name()),
        }
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (c, c_l) = self.c.storage_and_layout();
        match &*c {
            Storage::Cuda(c) => self.fwd(x, x_l, c, c_l),
            _ => candle_core::bail!("{}: input on cuda, constant elsewhere", self.name()),
        }
    }

    fn metal_fwd(&self, x: &MetalStorage, x_l: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        let (c, c_l) = self.c.storage_and_layout();
        match &*c {
            Storage::Metal(c) => self.fwd(x, x_l, c, c_l),
            _ => candle_core::bail!("{}: input on metal, constant elsewhere", self.name()),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.op {
            ConstOp::Mul => Ok(Some(grad_res.broadcast_mul(&self.c)?)),
            ConstOp::Add => Ok(Some(grad_res.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn const_ops_match_broadcast_ops_and_leave_no_constant_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 12., &dev).unwrap().reshape((2, 2, 3)).unwrap()).unwrap();
        let c = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
        let m = mul_const(x.as_tensor(), &c).unwrap();
        let a = add_const(x.as_tensor(), &c).unwrap();
        assert_eq!(m.to_vec3::<f32>().unwrap(), x.as_tensor().broadcast_mul(&c).unwrap().to_vec3::<f32>().unwrap());
        assert_eq!(a.to_vec3::<f32>().unwrap(), x.as_tensor().broadcast_add(&c).unwrap().to_vec3::<f32>().unwrap());
        let grads = (m.sum_all().unwrap() + a.sum_all().unwrap()).unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(gx[1][0], vec![1.5, 0.0, 3.0]);
        assert_eq!(grads.get_ids().count(), 1);
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_gives_only_the_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 24., &dev).unwrap().reshape((2, 3, 4)).unwrap()).unwrap();
        let w = (Tensor::arange(0f32, 20., &dev).unwrap().reshape((5, 4)).unwrap() * 0.1).unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let reference = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        // 6 rows take the few-rows kernel, which sums in another order than gemm
        let diff = (&y - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max |frozen_matmul - matmul| = {diff}");
        let big = Tensor::arange(0f32, 96., &dev).unwrap().reshape((24, 4)).unwrap(); // 24 rows: gemm path
        let want = big.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(frozen_matmul(&big, &w).unwrap().to_vec2::<f32>().unwrap(), want);

        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let expected = (reference * 2.).unwrap().broadcast_matmul(&w).unwrap();
        assert_eq!(gx.to_vec3::<f32>().unwrap(), expected.to_vec3::<f32>().unwrap());
        assert!(grads.get(&w).is_none(), "the frozen weight must not get a gradient");
        assert_eq!(grads.get_ids().count(), 1, "only the input keeps a gradient");
    }
}
