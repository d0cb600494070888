//! A LoRA projection being trained, as one op: `y = round(x Wᵀ + bias + scale · (x Aᵀ) Bᵀ)`.
//!
//! Composed from candle ops, the projection keeps every intermediate until backward: x in f32
//! (in-wide), the base output, its f32 copy, the f32 LoRA term and their f32 sum (out-wide):
//! four f32 copies besides the base dtype's. This op keeps none of them: the graph holds only its
//! inputs (x, A, B), which exist anyway, and its output. Backward recomputes the r-wide `x Aᵀ`
//! (r/out of the base product's work) and casts x to f32 again for A's gradient.
//!
//! Numerics follow PEFT: the base output (with its bias) is rounded to the base dtype, the LoRA
//! term is computed in A's dtype (f32 for a bf16 base) from x cast to it, the two are added in
//! A's dtype and the sum is rounded once to the base dtype. The input's gradient is the sum of
//! the base product's (in the base dtype) and the LoRA term's (computed in f32, rounded), as
//! autograd gives it for PEFT's module. The frozen weight and bias are constants held by the op,
//! so they get no gradient (see [`crate::kernels::Frozen`]); a quantized weight is dequantized into a
//! temporary in the forward and again in the backward pass, never kept.

use crate::error::{EngineError, Result};
use crate::kernels::Frozen;
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, MetalStorage, Shape, Storage, Tensor};

/// `x (…, in)` through a frozen `weight (out, in)`, an optional frozen `bias (out)` and a
/// trained LoRA pair `(A (r, in), B (out, r), alpha / r)` → `(…, out)` in x's dtype, with
/// gradients for x, A and B only.
pub fn lora_linear(
    x: &Tensor,
    weight: &Frozen,
    bias: Option<&Frozen>,
    (lora_a, lora_b, scale): (&Tensor, &Tensor, f64),
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let bias = bias.map(|b| b.value(x.dtype())).transpose()?;
    let op = LoraLinear { weight: weight.clone(), bias, scale };
    Ok(x.apply_op3(lora_a, lora_b, op)?)
}

/// The op behind [`lora_linear`]: arguments x, A (r, in), B (out, r); constants the base weight
/// and bias.
struct LoraLinear {
    weight: Frozen,
    bias: Option<Tensor>,
    scale: f64,
}

/// Where the weight of a storage type lives, so one forward serves every backend.
trait Backend: BackendStorage + Sized {
    fn of(s: &Storage) -> Option<&Self>;
}

impl Backend for CpuStorage {
    fn of(s: &Storage) -> Option<&Self> {
        match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        }
    }
}

impl Backend for CudaStorage {
    fn of(s: &Storage) -> Option<&Self> {
        match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }
}

impl Backend for MetalStorage {
    fn of(s: &Storage) -> Option<&Self> {
        match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        }
    }
}

/// The layout of `t`'s transpose as a matrix operand: a (rows, cols) view read as (cols, rows).
fn transposed(l: &Layout) -> candle_core::Result<Layout> {
    let (rows, cols) = l.shape().dims2()?;
    Ok(Layout::new(Shape::from((cols, rows)), vec![l.stride()[1], l.stride()[0]], l.start_offset()))
}

fn wrap(e: EngineError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl LoraLinear {
    #[allow(clippy::too_many_arguments)]
    fn fwd<S: Backend>(
        &self,
        x: &S,
        x_l: &Layout,
        a: &S,
        a_l: &Layout,
        b: &S,
        b_l: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let dims = x_l.dims();
        let (&k, batch) =
            dims.split_last().ok_or_else(|| candle_core::Error::Msg("lora_linear: scalar input".into()))?;
        let m: usize = batch.iter().product();
        let (r, ak) = a_l.shape().dims2()?;
        let (n, br) = b_l.shape().dims2()?;
        let w_t = self.weight.value(x.dtype()).map_err(wrap)?; // a temporary only when quantized
        let (w, w_l) = w_t.storage_and_layout();
        let w =
            S::of(&w).ok_or_else(|| candle_core::Error::Msg("lora_linear: the weight is on another device".into()))?;
        if w_l.shape().dims2()? != (n, k) || ak != k || br != r {
            candle_core::bail!(
                "lora_linear: input has {k} features, weight is {:?}, A {:?}, B {:?}",
                w_l.dims(),
                a_l.dims(),
                b_l.dims()
            )
        }
        let x_l = Layout::contiguous_with_offset((m, k), x_l.start_offset());
        let out_l = Layout::contiguous((m, n));
        // base: x Wᵀ (+ bias), in x's dtype, rounded there as the base layer's output is
        let mut y = x.matmul(w, (1, m, n, k), &x_l, &transposed(w_l)?)?;
        if let Some(bias) = &self.bias {
            let (c, c_l) = bias.storage_and_layout();
            let c = S::of(&c)
                .ok_or_else(|| candle_core::Error::Msg("lora_linear: the bias is on another device".into()))?;
            y = y.binary_impl::<Add>(c, &out_l, &c_l.broadcast_as((m, n))?)?;
        }
        // LoRA term in A's dtype: scale · (x Aᵀ) Bᵀ, the scale on the r-wide product
        let dt = a.dtype();
        let xa = if x.dtype() == dt {
            x.matmul(a, (1, m, r, k), &x_l, &transposed(a_l)?)?
        } else {
            x.to_dtype(&x_l, dt)?.matmul(a, (1, m, r, k), &Layout::contiguous((m, k)), &transposed(a_l)?)?
        };
        let xa = xa.affine(&Layout::contiguous((m, r)), self.scale, 0.)?;
        let xab = xa.matmul(b, (1, m, n, r), &Layout::contiguous((m, r)), &transposed(b_l)?)?;
        drop(xa);
        // added in A's dtype, rounded once
        let out = if y.dtype() == dt {
            y.binary_impl::<Add>(&xab, &out_l, &out_l)?
        } else {
            let sum = y.to_dtype(&out_l, dt)?.binary_impl::<Add>(&xab, &out_l, &out_l)?;
            drop((y, xab));
            sum.to_dtype(&out_l, x.dtype())?
        };
        let mut out_dims = batch.to_vec();
        out_dims.push(n);
        Ok((out, Shape::from(out_dims)))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(x, x_l, a, a_l, b, b_l)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        a: &CudaStorage,
        a_l: &Layout,
        b: &CudaStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd(x, x_l, a, a_l, b, b_l)
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        x_l: &Layout,
        a: &MetalStorage,
        a_l: &Layout,
        b: &MetalStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.fwd(x, x_l, a, a_l, b, b_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // detached: a result built from tracked inputs would record a graph that holds every
        // temporary below for as long as the gradient lives
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let dt = a.dtype();
        let (in_dims, out_dims) = (x.dims(), g.dims());
        let (k, n) = (in_dims[in_dims.len() - 1], out_dims[out_dims.len() - 1]);
        let m = x.elem_count() / k.max(1);
        let x2 = x.reshape((m, k))?; // (…, in) -> (M, in)
        let g2 = g.reshape((m, n))?; // (…, out) -> (M, out)
        let g32 = g2.to_dtype(dt)?;
        // through the LoRA term: d(xa) = scale · g B, with xa = scale · x Aᵀ recomputed
        let x32 = x2.to_dtype(dt)?;
        let xa = (x32.matmul(&a.t()?)? * self.scale)?; // (M, in) @ (in, r) -> (M, r)
        let g_b = g32.t()?.matmul(&xa)?; // (out, M) @ (M, r) -> (out, r)
        drop(xa);
        let g_xa = (g32.matmul(&b)? * self.scale)?; // (M, out) @ (out, r) -> (M, r)
        drop(g32);
        let g_a = g_xa.t()?.matmul(&x32)?; // (r, M) @ (M, in) -> (r, in)
        drop(x32);
        let g_x_lora = g_xa.matmul(&a)?.to_dtype(x.dtype())?; // (M, r) @ (r, in) -> (M, in)
                                                              // through the frozen base
        let w = self.weight.value(x.dtype()).map_err(wrap)?;
        let g_x = (g2.matmul(&w)? + g_x_lora)?.reshape(in_dims)?; // (M, out) @ (out, in) -> (M, in)
        Ok((Some(g_x), Some(g_a), Some(g_b)))
    }
}
