//! Fused CPU kernels with a hand-written backward: RMSNorm, rotary (with the head transpose),
//! SwiGLU and the target log-probabilities of a log-softmax over the vocabulary.
//!
//! Composed from candle ops, each of these is several passes over memory, and every
//! intermediate stays alive until the backward pass (an RMSNorm keeps five tensors the size of
//! its input; the log-softmax three (B, T, V) copies). Here each is one custom op that keeps
//! only its input, and whose backward is a second custom op (run without a graph) that computes
//! the input gradient in one pass. Rows are split over rayon's pool.
//!
//! Only CPU tensors in f32 or f64 take these paths ([`applies`]); every other device or dtype
//! (CUDA, Metal, bf16) uses the composed candle ops at the call sites, which keep working
//! everywhere. [`set_enabled`] switches the fused paths off process-wide (tests compare both,
//! `bench_train --fused off` measures the difference). Each op is checked against finite
//! differences in f64 and against its composed form in this module's tests; the golden and
//! gradient suites run the whole model through them.

use crate::error::Result;
use crate::linear::Weight;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused CPU paths on or off for the whole process (on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused CPU paths are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether a fused kernel can take `t`: on the CPU, in f32 or f64, and switched on.
pub fn applies(t: &Tensor) -> bool {
    applies_to(t.dtype(), t.device())
}

/// Whether the fused kernels take tensors of `dtype` on `device`.
pub fn applies_to(dtype: DType, device: &candle_core::Device) -> bool {
    enabled() && device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// The float types the kernels are written for.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::iter::Sum
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    /// xs[i] ← e^(xs[i] − shift) (vectorised for f32: [`math`]).
    fn exp_shifted(xs: &mut [Self], shift: Self);
    /// The largest element, −∞ for none.
    fn max_of(xs: &[Self]) -> Self;
    /// The sum, accumulated in f64.
    fn sum_f64(xs: &[Self]) -> f64;
}

macro_rules! real {
    ($t:ty, $exp:expr, $max:expr, $sum:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn exp_shifted(xs: &mut [Self], shift: Self) {
                $exp(xs, shift)
            }
            fn max_of(xs: &[Self]) -> Self {
                $max(xs)
            }
            fn sum_f64(xs: &[Self]) -> f64 {
                $sum(xs)
            }
        }
    };
}
real!(f32, math::exp_f32, math::max_f32, math::sum_f64);
real!(
    f64,
    exp_f64,
    |xs: &[f64]| xs.iter().fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m }),
    |xs: &[f64]| xs.iter().sum()
);

/// f64 (the tests' dtype) keeps libm's exponential.
fn exp_f64(xs: &mut [f64], shift: f64) {
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
    }
}

/// Rows at least this long are split one per task; shorter ones are grouped.
const MIN_TASK: usize = 1 << 14;

/// Rows of `len` values grouped so that one rayon task handles at least [`MIN_TASK`] values.
fn rows_per_task(len: usize) -> usize {
    MIN_TASK.div_ceil(len.max(1))
}

/// The contiguous slice behind a layout, or an error naming the op.
pub(crate) fn slice<'a, T>(v: &'a [T], l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

macro_rules! both {
    ($op:expr, $s:expr, $l:expr, |$v:ident, $ty:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                type $ty = f32;
                let $v = $crate::fused::slice(v, $l, $op)?;
                $body
            }
            CpuStorage::F64(v) => {
                type $ty = f64;
                let $v = $crate::fused::slice(v, $l, $op)?;
                $body
            }
            _ => candle_core::bail!("{}: only f32 and f64 are fused", $op),
        }
    };
}

/// A second operand of the same dtype as the first, as a slice.
pub(crate) fn same<'a, T: 'static>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    let any: &dyn std::any::Any = match s {
        CpuStorage::F32(v) => v,
        CpuStorage::F64(v) => v,
        _ => candle_core::bail!("{op}: only f32 and f64 are fused"),
    };
    match any.downcast_ref::<Vec<T>>() {
        Some(v) => slice(v, l, op),
        None => candle_core::bail!("{op}: operands differ in dtype"),
    }
}

/// A CPU tensor's storage as a slice of `T` (made contiguous first).
pub(crate) fn with_cpu<T: 'static, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else { candle_core::bail!("{op}: a constant is not on the cpu") };
    f(same::<T>(s, l, op)?)
}

pub(crate) fn storage<T: 'static>(v: Vec<T>) -> CpuStorage {
    let any: Box<dyn std::any::Any> = Box::new(v);
    match any.downcast::<Vec<f32>>() {
        Ok(v) => CpuStorage::F32(*v),
        Err(any) => match any.downcast::<Vec<f64>>() {
            Ok(v) => CpuStorage::F64(*v),
            Err(_) => CpuStorage::F32(Vec::new()),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x²) + eps) * w` over the last dim, for a frozen weight `w` (C).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(RmsNorm { w: w.to_dtype(x.dtype())?.contiguous()?, eps })?)
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

fn rms<T: Real>(row: &[T], eps: f64) -> T {
    let ss: T = row.iter().map(|&v| v * v).sum();
    (ss / T::from_f64(row.len() as f64) + T::from_f64(eps)).sqrt()
}

fn rms_norm_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let c = w.len();
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(c * rows_per_task(c)).zip(x.par_chunks(c * rows_per_task(c))).for_each(|(o, x)| {
        for (o, x) in o.chunks_mut(c).zip(x.chunks(c)) {
            let r = rms(x, eps);
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x / r * w;
            }
        }
    });
    out
}

/// dx = (g·w − x̂ · mean(g·w·x̂)) / rms, x̂ = x / rms.
fn rms_norm_bwd<T: Real>(g: &[T], x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let c = w.len();
    let mut out = vec![T::ZERO; x.len()];
    let n = c * rows_per_task(c);
    out.par_chunks_mut(n).zip(g.par_chunks(n).zip(x.par_chunks(n))).for_each(|(o, (g, x))| {
        for ((o, g), x) in o.chunks_mut(c).zip(g.chunks(c)).zip(x.chunks(c)) {
            let r = rms(x, eps);
            let dot: T = g.iter().zip(x).zip(w).map(|((&g, &x), &w)| g * w * x).sum();
            let k = dot / (r * r * T::from_f64(c as f64));
            for (((o, &g), &x), &w) in o.iter_mut().zip(g).zip(x).zip(w) {
                *o = (g * w - x * k) / r;
            }
        }
    });
    out
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = self.w.elem_count();
        if l.dims().last() != Some(&c) {
            candle_core::bail!("fused-rms-norm: last dim is not {c}")
        }
        let out = both!(self.name(), s, l, |x, T| storage(with_cpu::<T, _>(&self.w, self.name(), |w| Ok(
            rms_norm_fwd(x, w, self.eps)
        ))?));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op2_no_bwd(x, &RmsNormBwd { w: self.w.clone(), eps: self.eps })?))
    }
}

struct RmsNormBwd {
    w: Tensor,
    eps: f64,
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = both!(self.name(), g, gl, |g, T| {
            let x = same::<T>(x, xl, self.name())?;
            storage(with_cpu::<T, _>(&self.w, self.name(), |w| Ok(rms_norm_bwd(g, x, w, self.eps)))?)
        });
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) * up`, both (…, F).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!("fused-swiglu: gate {:?} and up {:?} differ", gl.shape(), ul.shape())
        }
        let out = both!(self.name(), g, gl, |g, T| {
            let u = same::<T>(u, ul, self.name())?;
            let mut out = vec![T::ZERO; g.len()];
            out.par_chunks_mut(MIN_TASK).zip(g.par_chunks(MIN_TASK).zip(u.par_chunks(MIN_TASK))).for_each(
                |(o, (g, u))| {
                    for (o, &g) in o.iter_mut().zip(g) {
                        *o = -g;
                    }
                    T::exp_shifted(o, T::ZERO); // e^-g
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        // silu as candle computes it: x / (1 + e^-x)
                        *o = g / (T::ONE + *o) * u;
                    }
                },
            );
            storage(out)
        });
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // one pass writes both gradients side by side: (2, N)
        let both = g.contiguous()?.apply_op3_no_bwd(gate, up, &SwiGluBwd)?;
        let shape = gate.shape();
        Ok((Some(both.get(0)?.reshape(shape)?), Some(both.get(1)?.reshape(shape)?)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        gate: &CpuStorage,
        gatel: &Layout,
        up: &CpuStorage,
        upl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = gl.shape().elem_count();
        let out = both!(self.name(), g, gl, |g, T| {
            let (x, u) = (same::<T>(gate, gatel, self.name())?, same::<T>(up, upl, self.name())?);
            let mut out = vec![T::ZERO; 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(MIN_TASK)
                .zip(du.par_chunks_mut(MIN_TASK))
                .zip(g.par_chunks(MIN_TASK).zip(x.par_chunks(MIN_TASK).zip(u.par_chunks(MIN_TASK))))
                .for_each(|((dg, du), (g, (x, u)))| {
                    for (e, &x) in dg.iter_mut().zip(x) {
                        *e = -x;
                    }
                    T::exp_shifted(dg, T::ZERO); // e^-x, replaced by dg below
                    for i in 0..g.len() {
                        let s = T::ONE / (T::ONE + dg[i]);
                        let silu = x[i] * s;
                        dg[i] = g[i] * u[i] * s * (T::ONE + x[i] * (T::ONE - s));
                        du[i] = g[i] * silu;
                    }
                });
            storage(out)
        });
        Ok((out, Shape::from((2, n))))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary

/// Rotary embedding (`rotate_half` convention) fused with the head transpose: x (B, T, N, D)
/// → (B, N, T, D), rotated by `cos`, `sin` (T, D).
pub fn rotary_to_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    Ok(x.contiguous()?
        .apply_op1(Rotary { cos: cos.to_dtype(dtype)?.contiguous()?, sin: sin.to_dtype(dtype)?.contiguous()? })?)
}

struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

/// A rotary kernel on one row: (out, in, cos, sin).
type RowFn<T> = fn(&mut [T], &[T], &[T], &[T]);

/// y = x·cos + rotate_half(x)·sin on one (D) row, rotate_half(x) = (−x₂, x₁).
fn rotate_row<T: Real>(y: &mut [T], x: &[T], cos: &[T], sin: &[T]) {
    let h = x.len() / 2;
    for i in 0..h {
        y[i] = x[i] * cos[i] - x[i + h] * sin[i];
        y[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
    }
}

/// The transpose of [`rotate_row`]: dx = g·cos + (g₂·sin₂, −g₁·sin₁).
fn unrotate_row<T: Real>(dx: &mut [T], g: &[T], cos: &[T], sin: &[T]) {
    let h = g.len() / 2;
    for i in 0..h {
        dx[i] = g[i] * cos[i] + g[i + h] * sin[i + h];
        dx[i + h] = g[i + h] * cos[i + h] - g[i] * sin[i];
    }
}

impl Rotary {
    /// Applies `row(out_row, in_row, cos_row, sin_row)` to every (b, t, n) row of D values.
    /// `to_heads`: x is (B, T, N, D) and the output (B, N, T, D); otherwise the other way round.
    fn map<T: Real>(
        &self,
        x: &[T],
        dims: (usize, usize, usize, usize),
        to_heads: bool,
        row: RowFn<T>,
    ) -> candle_core::Result<Vec<T>> {
        let (_b, t, n, d) = dims;
        with_cpu::<T, _>(&self.cos, "fused-rotary", |cos| {
            with_cpu::<T, _>(&self.sin, "fused-rotary", |sin| {
                if cos.len() != t * d || sin.len() != t * d {
                    candle_core::bail!("fused-rotary: tables are not ({t}, {d})")
                }
                let mut out = vec![T::ZERO; x.len()];
                // one task per output block of N·D (to_heads: T·D) values, written in order
                let block = if to_heads { t * d } else { n * d };
                out.par_chunks_mut(block).enumerate().for_each(|(i, o)| {
                    let (bi, j) = if to_heads { (i / n, i % n) } else { (i / t, i % t) };
                    for (k, o) in o.chunks_mut(d).enumerate() {
                        // to_heads: j is the head, k the position; otherwise j the position, k the head
                        let (ti, ni) = if to_heads { (k, j) } else { (j, k) };
                        let src = if to_heads { ((bi * t + ti) * n + ni) * d } else { ((bi * n + ni) * t + ti) * d };
                        let tab = ti * d..(ti + 1) * d;
                        row(o, &x[src..src + d], &cos[tab.clone()], &sin[tab]);
                    }
                });
                Ok(out)
            })
        })
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "fused-rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, n, d) = l.shape().dims4()?;
        if d % 2 != 0 {
            candle_core::bail!("fused-rotary: head dim {d} is odd")
        }
        let out = both!(self.name(), s, l, |x, T| storage(self.map::<T>(x, (b, t, n, d), true, rotate_row::<T>)?));
        Ok((out, Shape::from((b, n, t, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&RotaryBwd { cos: self.cos.clone(), sin: self.sin.clone() })?))
    }
}

struct RotaryBwd {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for RotaryBwd {
    fn name(&self) -> &'static str {
        "fused-rotary-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n, t, d) = l.shape().dims4()?;
        let rot = Rotary { cos: self.cos.clone(), sin: self.sin.clone() };
        let out = both!(self.name(), s, l, |g, T| storage(rot.map::<T>(g, (b, t, n, d), false, unrotate_row::<T>)?));
        Ok((out, Shape::from((b, t, n, d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Log-softmax + gather

/// log softmax(logits)[target] for every row: logits (…, V), targets (…) u32 → (…), without
/// materialising the log-softmax. The backward writes the (…, V) gradient once.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    Ok(logits.contiguous()?.apply_op1(TargetLogprobs { targets: Arc::new(targets), lse: Arc::default() })?)
}

struct TargetLogprobs {
    targets: Arc<Vec<u32>>,
    /// Each row's log-sum-exp, kept by the forward pass for the backward one.
    lse: Arc<Mutex<Vec<f64>>>,
}

/// log Σ exp(row), the sum accumulated in f64: a vocabulary of 50k–150k terms summed in f32
/// loses about 1e-5 of a loss (measured against PyTorch on SmolLM2's 49152 tokens).
/// `scratch` receives the row's exponentials.
fn logsumexp<T: Real>(row: &[T], scratch: &mut Vec<T>) -> f64 {
    let max = T::max_of(row);
    if max == T::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    scratch.clear();
    scratch.extend_from_slice(row);
    T::exp_shifted(scratch, max);
    max.to_f64() + T::sum_f64(scratch).ln()
}

impl TargetLogprobs {
    fn check(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let dims = l.dims();
        let v = *dims.last().ok_or_else(|| candle_core::Error::Msg("fused-target-logprobs: scalar logits".into()))?;
        let rows = l.shape().elem_count() / v.max(1);
        if rows != self.targets.len() {
            candle_core::bail!("fused-target-logprobs: {rows} rows of logits, {} targets", self.targets.len())
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("fused-target-logprobs: target {t} is outside the vocabulary of {v}")
        }
        Ok((rows, v))
    }
}

impl CustomOp1 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "fused-target-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_rows, v) = self.check(l)?;
        let out = both!(self.name(), s, l, |x, T| {
            let lse: Vec<f64> = x.par_chunks(v).map_init(Vec::new, |scratch, row| logsumexp(row, scratch)).collect();
            let out: Vec<T> = x
                .par_chunks(v)
                .zip(self.targets.par_iter())
                .zip(&lse)
                .map(|((row, &t), &lse)| T::from_f64(row[t as usize].to_f64() - lse))
                .collect();
            *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = lse;
            storage(out)
        });
        let dims = l.dims();
        Ok((out, Shape::from(&dims[..dims.len() - 1])))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let lse = self.lse.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Some(g.contiguous()?.apply_op2_no_bwd(x, &TargetLogprobsBwd { targets: self.targets.clone(), lse })?))
    }
}

struct TargetLogprobsBwd {
    targets: Arc<Vec<u32>>,
    lse: Vec<f64>,
}

impl CustomOp2 for TargetLogprobsBwd {
    fn name(&self) -> &'static str {
        "fused-target-logprobs-bwd"
    }

    /// dlogits = g · (onehot(target) − softmax(logits)).
    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, v) = TargetLogprobs { targets: self.targets.clone(), lse: Arc::default() }.check(xl)?;
        if self.lse.len() != rows {
            candle_core::bail!("fused-target-logprobs: backward without the forward pass's log-sum-exp")
        }
        let out = both!(self.name(), g, gl, |g, T| {
            let x = same::<T>(x, xl, self.name())?;
            let mut out = vec![T::ZERO; x.len()];
            out.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .zip(g.par_iter().zip(self.targets.par_iter()).zip(&self.lse))
                .for_each(|((o, row), ((&g, &t), &lse))| {
                    o.copy_from_slice(row);
                    T::exp_shifted(o, T::from_f64(lse));
                    for o in o.iter_mut() {
                        *o = -g * *o;
                    }
                    o[t as usize] += g;
                });
            storage(out)
        });
        Ok((out, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear with LoRA

/// Output elements × depth below which a matmul runs on one thread: splitting it costs more
/// than it saves (measured: gemm's own splitting of a 256×576×576 product ran slower on two
/// threads and of the LoRA products 3× slower; with the split below, LoRA's rank-wide products
/// gain on two threads, and left on the calling thread they were 4% of a two-thread step while
/// the other core waited).
const PAR_MIN_WORK: usize = 1 << 19;

thread_local! {
    /// Set while this thread runs one of a kernel's parallel tasks ([`as_task`]): the products
    /// it calls then run on it alone.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one of a kernel's parallel tasks: [`mm`] inside it does not split again. (A
/// check for "on a pool thread" cannot tell these apart from the step itself, which runs on a
/// pool thread too.)
pub(crate) fn as_task<R>(f: impl FnOnce() -> R) -> R {
    let outer = IN_TASK.replace(true);
    let r = f();
    IN_TASK.set(outer);
    r
}

/// Runs `f` on a thread of rayon's pool (unless already on one), so that the parallel kernels it
/// calls share work with the pool's other threads directly: called from outside, each of the
/// step's thousands of short parallel regions would wake the pool, put the calling thread to sleep
/// and wake it again at the end.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Runs one primitive's work on `device`: on the CPU through [`in_pool`]; on a GPU on the calling
/// thread, bound to the device's context, so the buffers the work leaves behind are dropped by a
/// thread that can free them (see [`crate::device`]).
pub fn in_pool_for<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        in_pool(f)
    } else {
        crate::device::bind(device);
        f()
    }
}

/// A matrix operand of [`mm`]: its first element and its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

// SAFETY: a Mat is a read-only view of a slice that outlives every task reading it (each call
// of `mm` borrows the slices for its whole duration).
unsafe impl<T> Send for Mat<T> {}
unsafe impl<T> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// A row-major (rows, cols) slice.
    pub(crate) fn rows(v: &[T], cols: usize) -> Self {
        Mat { ptr: v.as_ptr(), rs: cols as isize, cs: 1 }
    }

    /// The transpose of a row-major (rows, cols) slice: (cols, rows).
    pub(crate) fn t(v: &[T], cols: usize) -> Self {
        Mat { ptr: v.as_ptr(), rs: 1, cs: cols as isize }
    }
}

/// The threads a product of `work` = output elements × depth is split over: rayon's, or 1 inside
/// one of a kernel's own tasks (the attention kernel's heads: the caller already runs in
/// parallel) and below [`PAR_MIN_WORK`].
fn threads_for(work: usize) -> usize {
    if !IN_TASK.get() && work >= PAR_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// dst (m, n) row-major = beta · lhs (m, k) · rhs (k, n), added to dst when `acc`. Large enough
/// products are split over rayon's threads, each running gemm on one thread (gemm's own splitting
/// of a 256-row product scales poorly): by columns, in slices the threads claim as they go
/// ([`claim_columns`]), or by rows when the output is too narrow to split (LoRA's rank-wide
/// products).
#[allow(clippy::too_many_arguments)] // gemm's own interface, reduced to what the kernels use
pub(crate) fn mm<T: Real>(m: usize, n: usize, k: usize, dst: &mut [T], lhs: Mat<T>, rhs: Mat<T>, acc: bool, beta: T) {
    debug_assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    mm_split(threads_for(m * n * k), m, n, k, dst, lhs, rhs, acc, beta);
}

/// A product that one task of a parallel region computes for all of them (LoRA's xa and dxa,
/// dB): claimed by whichever task gets to it first; a task that needs it finished waits for the
/// one computing it (a running thread, which waits on nothing).
struct OneJob(AtomicU8);

impl OneJob {
    const TODO: u8 = 0;
    const BUSY: u8 = 1;
    const DONE: u8 = 2;

    fn new() -> Self {
        OneJob(AtomicU8::new(Self::TODO))
    }

    /// Runs `f` unless a task has claimed it already; true when this call ran it.
    fn try_run(&self, f: impl FnOnce()) -> bool {
        let claimed = self.0.compare_exchange(Self::TODO, Self::BUSY, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if claimed {
            f();
            self.0.store(Self::DONE, Ordering::Release);
        }
        claimed
    }

    /// Returns once `f` has run (here, or on the task that claimed it).
    fn run_or_wait(&self, f: impl FnOnce()) {
        if !self.try_run(f) {
            while self.0.load(Ordering::Acquire) != Self::DONE {
                std::thread::yield_now();
            }
        }
    }
}

/// Guided slices of a split product are at least this many columns wide: each slice is a gemm
/// call of its own (its set-up, its pass over the whole m × k left operand). Measured on the
/// training step at 2 threads: 32, 64 and 96 within the noise of each other; 16 slower.
const MIN_COLUMNS: usize = 64;

/// A row-major (rows, n) output written by several tasks, each its own block.
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    n: usize,
}

// SAFETY: tasks write disjoint blocks of the slice an Out is made from, which outlives them (each
// caller joins its tasks before returning the slice).
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T: Real> Out<T> {
    fn new(v: &mut [T], n: usize) -> Self {
        Out { ptr: v.as_mut_ptr(), n }
    }

    /// This output as an operand, like [`Mat::rows`] (to be read only once it is written).
    fn rows(self) -> Mat<T> {
        Mat { ptr: self.ptr.cast_const(), rs: self.n as isize, cs: 1 }
    }

    /// Its transpose, like [`Mat::t`] (to be read only once it is written).
    fn t(self) -> Mat<T> {
        Mat { ptr: self.ptr.cast_const(), rs: 1, cs: self.n as isize }
    }

    /// Block rows r0..r0+nr, columns c0..c0+nc of this output = beta · lhs rows r0.. (k columns)
    /// · rhs columns c0.. (k rows), added to it when `acc`; gemm on the calling thread.
    ///
    /// # Safety
    /// The block lies inside the output and no other task touches it meanwhile; lhs rows
    /// r0..r0+nr and rhs columns c0..c0+nc lie inside the slices the views were made from.
    #[allow(clippy::too_many_arguments)] // a block and gemm's operands
    unsafe fn gemm(
        self,
        r0: usize,
        nr: usize,
        c0: usize,
        nc: usize,
        k: usize,
        lhs: Mat<T>,
        rhs: Mat<T>,
        acc: bool,
        beta: T,
    ) {
        if nr == 0 || nc == 0 {
            return;
        }
        // SAFETY: the caller's contract
        unsafe {
            gemm::gemm(
                nr,
                nc,
                k,
                self.ptr.add(r0 * self.n + c0),
                1,
                self.n as isize,
                acc,
                lhs.ptr.offset(r0 as isize * lhs.rs),
                lhs.cs,
                lhs.rs,
                rhs.ptr.offset(c0 as isize * rhs.cs),
                rhs.cs,
                rhs.rs,
                T::ONE,
                beta,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }
}

/// Runs `f(c0, nc)` over slices c0..c0+nc that together cover 0..n once, on `threads` of
/// rayon's threads that claim slices as they go (guided scheduling): a claim takes a share of
/// what is left, rem / (2 · threads) rounded up to 16 and at least `min` (or n / (2 · threads)
/// when that is less, so every thread gets two slices of a narrow output), so the slices shrink
/// toward the end and the threads finish together whatever slows one of them: a static split
/// in halves left one thread idle at the end of most regions, and the more so when another
/// process took time from one core. One thread runs all of 0..n as one slice.
fn claim_columns(threads: usize, n: usize, min: usize, f: impl Fn(usize, usize) + Sync + Send) {
    let min = min.min(n / (2 * threads).max(1)).max(16).next_multiple_of(16);
    if threads <= 1 || n <= min {
        if n > 0 {
            f(0, n);
        }
        return;
    }
    let next = AtomicUsize::new(0);
    let claim = || {
        let mut c0 = next.load(Ordering::Relaxed);
        loop {
            let rem = n.checked_sub(c0).filter(|&r| r > 0)?;
            let nc = (rem / (2 * threads)).next_multiple_of(16).max(min).min(rem);
            match next.compare_exchange_weak(c0, c0 + nc, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some((c0, nc)),
                Err(now) => c0 = now,
            }
        }
    };
    (0..threads).into_par_iter().for_each(|_| {
        while let Some((c0, nc)) = claim() {
            f(c0, nc)
        }
    });
}

/// Runs `f(task)` for every task: on rayon's pool when more than one, else on the calling thread.
fn run_tasks(tasks: usize, f: impl Fn(usize) + Sync + Send) {
    if tasks <= 1 {
        (0..tasks).for_each(f);
    } else {
        (0..tasks).into_par_iter().for_each(f);
    }
}

/// [`mm`] split for `threads` threads (tasks on rayon's pool; 1 runs on the calling thread).
#[allow(clippy::too_many_arguments)] // mm's, and the thread count
fn mm_split<T: Real>(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    lhs: Mat<T>,
    rhs: Mat<T>,
    acc: bool,
    beta: T,
) {
    // Split the output's columns, not its rows: gemm packs the operand that is not
    // column-major (for x·Wᵀ the weight), and split by rows every thread packed all of it
    // (measured: packing took as long as the products on two threads). By columns each thread
    // reads and packs only its slice of the weight. Slices are multiples of 16 columns. An output
    // narrower than 32 columns a thread (LoRA's x·Aᵀ when the backward pass computes it again:
    // r columns) is split by rows instead, when each thread gets at least 64 (gemm's AVX-512 row
    // tile): there the packed operand is the small A.
    let by_rows = threads > 1 && n < 32 * threads && m >= 64 * threads;
    let out = Out::new(dst, n);
    if by_rows {
        let step = m.div_ceil(threads).next_multiple_of(16).min(m);
        let tasks = m.div_ceil(step);
        run_tasks(tasks, |task| {
            let i0 = task * step;
            // SAFETY: this task's rows are its own; the callers check every shape first, and dst
            // outlives the tasks (joined by run_tasks)
            unsafe { out.gemm(i0, step.min(m - i0), 0, n, k, lhs, rhs, acc, beta) }
        });
    } else {
        // SAFETY: each slice's columns are claimed once; shapes and lifetime as above
        claim_columns(threads, n, MIN_COLUMNS, |c0, nc| unsafe { out.gemm(0, m, c0, nc, k, lhs, rhs, acc, beta) });
    }
}

/// `x · Wᵀ + scale · (x · Aᵀ) · Bᵀ` for a frozen weight W (out, in) and, with `lora`, a LoRA pair
/// A (r, in), B (out, r): x (…, in) → (…, out). The LoRA term is accumulated into the base
/// product (no (…, out) temporaries); on backward the input gradient `g·W + scale·(g·B)·A` is
/// accumulated the same way, and A and B get theirs (W gets none).
///
/// `w` is a frozen weight, dense or quantized; the op holds it as it is, so quantized blocks are
/// dequantized into a temporary for the forward product and again for the backward one.
pub fn linear(x: &Tensor, w: &Weight, lora: Option<(&Tensor, &Tensor, f64)>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let [out, inp] = w.dims()[..] else {
        return Err(candle_core::Error::Msg(format!("linear: weight of shape {:?}", w.dims())).into());
    };
    if x.dims().last() != Some(&inp) {
        return Err(candle_core::Error::Msg(format!(
            "linear: input has {:?} features, weight expects {inp}",
            x.dims().last()
        ))
        .into());
    }
    if !w.is_frozen() {
        return Err(candle_core::Error::Msg("linear: the fused product is for frozen weights".into()).into());
    }
    let w = match w {
        Weight::Frozen(t) => Weight::Frozen(t.contiguous()?),
        other => other.clone(),
    };
    match lora {
        None => Ok(x.apply_op1(FusedLinear { w, scale: 0.0, xa: Mutex::new(None) })?),
        Some((a, b, scale)) => {
            let r = a.dim(0)?;
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                return Err(candle_core::Error::Msg(format!(
                    "linear: LoRA A {:?} and B {:?} do not fit a ({out}, {inp}) weight",
                    a.dims(),
                    b.dims()
                ))
                .into());
            }
            Ok(x.apply_op3(&a.contiguous()?, &b.contiguous()?, FusedLinear { w, scale, xa: Mutex::new(None) })?)
        }
    }
}

struct FusedLinear {
    w: Weight,
    scale: f64,
    /// `scale · x · Aᵀ` (m, r) as a `Vec<T>`, kept by the forward pass for the backward one
    /// (r/in of x's size: 16 KB a projection at T=256, r=16).
    xa: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl FusedLinear {
    /// (rows, in, out) for an input layout.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (out, inp) = self.out_in()?;
        if l.dims().last() != Some(&inp) {
            candle_core::bail!("fused-linear: input has {:?} features, weight expects {inp}", l.dims().last())
        }
        Ok((l.shape().elem_count() / inp.max(1), inp, out))
    }

    fn out_in(&self) -> candle_core::Result<(usize, usize)> {
        match self.w.dims()[..] {
            [out, inp] => Ok((out, inp)),
            ref d => candle_core::bail!("fused-linear: weight of shape {d:?}"),
        }
    }

    /// The weight's value as T (dequantized when quantized).
    fn weight<T: Real>(&self) -> candle_core::Result<Tensor> {
        let dtype = if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f64>() { DType::F64 } else { DType::F32 };
        self.w.frozen_value(dtype).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn out_shape(l: &Layout, out: usize) -> Shape {
        let mut d = l.dims().to_vec();
        if let Some(last) = d.last_mut() {
            *last = out;
        }
        Shape::from(d)
    }

    /// y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ), in one parallel region: each slice of columns claimed (see
    /// [`claim_columns`]) gets the base product and then its slice of xa·Bᵀ while they are in
    /// cache. xa = s·x·Aᵀ is one unsplit product (split by rows, its m × r × in product gained
    /// nothing on two threads: the tasks' gemm set-up outweighed the halves), computed by the
    /// first slice claimed while the other threads run their base products.
    fn forward<T: Real>(
        &self,
        x: &[T],
        m: usize,
        inp: usize,
        out: usize,
        ab: Option<(&[T], &[T])>,
    ) -> candle_core::Result<Vec<T>> {
        with_cpu::<T, _>(&self.weight::<T>()?, "fused-linear", |w| {
            let mut y = vec![T::ZERO; m * out];
            let Some((a, b)) = ab else {
                mm(m, out, inp, &mut y, Mat::rows(x, inp), Mat::t(w, inp), false, T::ONE);
                return Ok(y);
            };
            let r = a.len() / inp;
            let mut xa = vec![T::ZERO; m * r];
            let (ys, xas) = (Out::new(&mut y, out), Out::new(&mut xa, r));
            let (xm, wm, am, bm) = (Mat::rows(x, inp), Mat::t(w, inp), Mat::t(a, inp), Mat::t(b, r));
            let xam = xas.rows();
            let scale = T::from_f64(self.scale);
            let xa_job = OneJob::new();
            // SAFETY: xa (m, r) is written by the one task that claims the job, and read by the
            // others only once it is done; x and A have the views' shapes
            let xa_compute = || unsafe { xas.gemm(0, m, 0, r, inp, xm, am, false, scale) };
            claim_columns(threads_for(m * out * inp), out, MIN_COLUMNS, |c0, nc| {
                // the first slice claimed computes xa first; the others' base products overlap it
                xa_job.try_run(xa_compute);
                // SAFETY: columns c0..c0+nc of y are this slice's; x (m, in), W (out, in), xa (m,
                // r, complete once run_or_wait returns) and B (out, r) have the shapes the views
                // say (checked by the op's callers)
                unsafe { ys.gemm(0, m, c0, nc, inp, xm, wm, false, T::ONE) };
                xa_job.run_or_wait(xa_compute);
                unsafe { ys.gemm(0, m, c0, nc, r, xam, bm, true, T::ONE) };
            });
            *self.xa.lock().map_err(|_| candle_core::Error::Msg("fused-linear: poisoned".into()))? = Some(Box::new(xa));
            Ok(y)
        })
    }

    /// (dx, dA, dB) for the upstream gradient g (m, out), in one parallel region: each slice of
    /// columns claimed writes its columns of dx = g·W + dxa·A and of dA = dxaᵀ·x; dxa = s·g·B
    /// (which they all need) and dB = gᵀ·xa are one product each, computed by the first two
    /// slices claimed before their columns. (Six regions once, each ending on its slower half,
    /// one of them recomputing xa.)
    #[allow(clippy::type_complexity)]
    fn backward<T: Real>(
        &self,
        g: &[T],
        x: &[T],
        m: usize,
        inp: usize,
        out: usize,
        ab: Option<(&[T], &[T])>,
    ) -> candle_core::Result<(Vec<T>, Option<(Vec<T>, Vec<T>)>)> {
        with_cpu::<T, _>(&self.weight::<T>()?, "fused-linear", |w| {
            let mut dx = vec![T::ZERO; m * inp];
            let Some((a, b)) = ab else {
                mm(m, inp, out, &mut dx, Mat::rows(g, out), Mat::rows(w, inp), false, T::ONE);
                return Ok((dx, None));
            };
            let r = a.len() / inp;
            let s = T::from_f64(self.scale);
            // xa = s·x·Aᵀ (m, r), from the forward pass (recomputed if it is not there)
            let kept = self.xa.lock().map_err(|_| candle_core::Error::Msg("fused-linear: poisoned".into()))?.take();
            let xa = match kept.map(|k| k.downcast::<Vec<T>>()) {
                Some(Ok(xa)) if xa.len() == m * r => *xa,
                _ => {
                    let mut xa = vec![T::ZERO; m * r];
                    mm(m, r, inp, &mut xa, Mat::rows(x, inp), Mat::t(a, inp), false, s);
                    xa
                }
            };
            let (mut dxa, mut da, mut db) = (vec![T::ZERO; m * r], vec![T::ZERO; r * inp], vec![T::ZERO; out * r]);
            let (dxs, dxas, das, dbs) =
                (Out::new(&mut dx, inp), Out::new(&mut dxa, r), Out::new(&mut da, inp), Out::new(&mut db, r));
            let (gm, wm, bm, am, xm) =
                (Mat::rows(g, out), Mat::rows(w, inp), Mat::rows(b, r), Mat::rows(a, inp), Mat::rows(x, inp));
            let (dxam, dxatm) = (dxas.rows(), dxas.t());
            let (gtm, xam) = (Mat::t(g, out), Mat::rows(&xa, r));
            let (dxa_job, db_job) = (OneJob::new(), OneJob::new());
            // SAFETY: dxa (m, r) and dB (out, r) are each written by the one task that claims
            // their job, and dxa is read only once its job is done; g (m, out), B (out, r) and xa
            // (m, r) have the shapes the views say
            let dxa_compute = || unsafe { dxas.gemm(0, m, 0, r, out, gm, bm, false, s) };
            let db_compute = || unsafe { dbs.gemm(0, out, 0, r, m, gtm, xam, false, T::ONE) };
            claim_columns(threads_for(m * inp * out), inp, MIN_COLUMNS, |c0, nc| {
                // dxa (needed by every slice) and dB (by none) go to the first slices claimed
                if !dxa_job.try_run(dxa_compute) {
                    db_job.try_run(db_compute);
                }
                // SAFETY: columns c0..c0+nc of dx and of dA are this slice's; W (out, in), A (r,
                // in) and x (m, in) have the shapes the views say, dxa is complete once
                // run_or_wait returns
                unsafe { dxs.gemm(0, m, c0, nc, out, gm, wm, false, T::ONE) };
                dxa_job.run_or_wait(dxa_compute);
                unsafe {
                    dxs.gemm(0, m, c0, nc, r, dxam, am, true, T::ONE);
                    das.gemm(0, r, c0, nc, m, dxatm, xm, false, T::ONE);
                }
            });
            db_job.try_run(db_compute);
            Ok((dx, Some((da, db))))
        })
    }
}

impl CustomOp1 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, inp, out) = self.dims(l)?;
        let y = both!(CustomOp1::name(self), s, l, |x, T| storage(self.forward::<T>(x, m, inp, out, None)?));
        Ok((y, Self::out_shape(l, out)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (dx, _) = self.grads(x, g, None)?;
        Ok(Some(dx))
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear-lora"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, inp, out) = self.dims(l)?;
        let y = both!(CustomOp3::name(self), s, l, |x, T| {
            let (a, b) = (same::<T>(a, al, "fused-linear-lora")?, same::<T>(b, bl, "fused-linear-lora")?);
            storage(self.forward::<T>(x, m, inp, out, Some((a, b)))?)
        });
        Ok((y, Self::out_shape(l, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dab) = self.grads(x, g, Some((a, b)))?;
        let (da, db) = match dab {
            Some((da, db)) => (Some(da), Some(db)),
            None => (None, None),
        };
        Ok((Some(dx), da, db))
    }
}

impl FusedLinear {
    /// The gradients as tensors: dx shaped like x, dA like A, dB like B.
    fn grads(
        &self,
        x: &Tensor,
        g: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (x, g) = (x.contiguous()?, g.contiguous()?);
        let (out, inp) = self.out_in()?;
        let m = x.elem_count() / inp.max(1);
        let dev = x.device().clone();
        macro_rules! go {
            ($t:ty) => {{
                with_cpu::<$t, _>(&g, "fused-linear", |gs| {
                    with_cpu::<$t, _>(&x, "fused-linear", |xs| {
                        let (dx, dab) = match ab {
                            None => self.backward::<$t>(gs, xs, m, inp, out, None)?,
                            Some((a, b)) => with_cpu::<$t, _>(a, "fused-linear", |a_| {
                                with_cpu::<$t, _>(b, "fused-linear", |b_| {
                                    self.backward::<$t>(gs, xs, m, inp, out, Some((a_, b_)))
                                })
                            })?,
                        };
                        let dx = Tensor::from_vec(dx, x.shape(), &dev)?;
                        let dab = match (dab, ab) {
                            (Some((da, db)), Some((a, b))) => {
                                Some((Tensor::from_vec(da, a.shape(), &dev)?, Tensor::from_vec(db, b.shape(), &dev)?))
                            }
                            _ => None,
                        };
                        Ok((dx, dab))
                    })
                })
            }};
        }
        match x.dtype() {
            DType::F32 => go!(f32),
            DType::F64 => go!(f64),
            dt => candle_core::bail!("fused-linear: {dt:?} is not fused"),
        }
    }
}

mod attention;
mod math;

pub use attention::attention;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec(rng.uniform_vec(n, -2.0, 2.0), shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
    }

    /// Checks `f`'s gradient against central finite differences in f64 at every input element,
    /// with a random linear functional of the output as the loss, and against the composed form.
    fn check(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, composed: impl Fn(&[Tensor]) -> Tensor) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = fused(&ts);
        let want = composed(&ts);
        assert_eq!(out.dims(), want.dims());
        let diff = (&out - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "fused and composed forward differ by {diff}");
        let probe = randn(out.dims(), 99);
        let loss = |ts: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor| {
            (f(ts) * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let composed_grads = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let g: Vec<f64> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let gc: Vec<f64> = composed_grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            for j in 0..base.len() {
                let at = |e: f64| {
                    let mut x = base.clone();
                    x[j] += e;
                    let mut ts = inputs.to_vec();
                    ts[i] = Tensor::from_vec(x, inputs[i].dims(), &Device::Cpu).unwrap();
                    loss(&ts, &fused)
                };
                let eps = 1e-6;
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[j]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "input {i}[{j}]: fused grad {} vs finite difference {fd}",
                    g[j]
                );
                assert!(
                    (gc[j] - g[j]).abs() <= 1e-10 * (1.0 + g[j].abs()),
                    "input {i}[{j}]: fused grad {} vs composed {}",
                    g[j],
                    gc[j]
                );
            }
        }
    }

    #[test]
    fn rms_norm_matches_finite_differences_and_the_composed_norm() {
        let w = randn(&[8], 2);
        check(
            &[randn(&[2, 3, 8], 1)],
            |t| rms_norm(&t[0], &w, 1e-5).unwrap(),
            |t| {
                let rms = (t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap();
                t[0].broadcast_div(&rms).unwrap().broadcast_mul(&w).unwrap()
            },
        );
    }

    #[test]
    fn swiglu_matches_finite_differences_and_silu_times_up() {
        check(
            &[randn(&[2, 3, 5], 3), randn(&[2, 3, 5], 4)],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn rotary_matches_finite_differences_and_rotate_half_after_the_transpose() {
        let (t, d) = (3, 6);
        let (cos, sin) = (randn(&[t, d], 5), randn(&[t, d], 6));
        check(
            &[randn(&[2, t, 2, d], 7)],
            |x| rotary_to_heads(&x[0], &cos, &sin).unwrap(),
            |x| {
                let x = x[0].transpose(1, 2).unwrap().contiguous().unwrap();
                let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
                let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
                let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
            },
        );
    }

    #[test]
    fn target_logprobs_match_finite_differences_and_log_softmax_gather() {
        let targets = Tensor::new(&[[3u32, 0, 6], [1, 6, 2]], &Device::Cpu).unwrap();
        check(
            &[randn(&[2, 3, 7], 8)],
            |x| target_logprobs(&x[0], &targets).unwrap(),
            |x| {
                let logp = candle_nn_free_log_softmax(&x[0]);
                logp.gather(&targets.unsqueeze(D::Minus1).unwrap(), D::Minus1).unwrap().squeeze(D::Minus1).unwrap()
            },
        );
    }

    fn candle_nn_free_log_softmax(x: &Tensor) -> Tensor {
        crate::model::log_softmax_last_dim(x).unwrap()
    }

    #[test]
    fn linear_with_lora_matches_finite_differences_and_the_composed_products() {
        let (m, inp, out, r) = (5, 7, 6, 3);
        let w = randn(&[out, inp], 10);
        check(
            &[randn(&[1, m, inp], 11), randn(&[r, inp], 12), randn(&[out, r], 13)],
            |t| linear(&t[0], &Weight::Frozen(w.clone()), Some((&t[1], &t[2], 0.7))).unwrap(),
            |t| {
                let base = t[0].broadcast_matmul(&w.t().unwrap()).unwrap();
                let lora =
                    t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap().broadcast_matmul(&t[2].t().unwrap()).unwrap();
                (base + (lora * 0.7).unwrap()).unwrap()
            },
        );
        check(
            &[randn(&[2, m, inp], 14)],
            |t| linear(&t[0], &Weight::Frozen(w.clone()), None).unwrap(),
            |t| t[0].broadcast_matmul(&w.t().unwrap()).unwrap(),
        );
    }

    #[test]
    fn linear_splits_large_products_over_threads_without_changing_them() {
        // 300 rows × 200 × 100: above PAR_MIN_WORK, so on more than one thread its columns go to
        // separate gemm calls (every split, at a fixed thread count: split_products_match_a_plain_product)
        let (x, w) = (
            randn(&[300, 200], 15).to_dtype(DType::F32).unwrap(),
            randn(&[100, 200], 16).to_dtype(DType::F32).unwrap(),
        );
        let got = linear(&x, &Weight::Frozen(w.clone()), None).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-3, "{diff}");
    }

    /// LoRA's products in the fused linear on pools of 1, 2 and 3 threads (shapes above
    /// PAR_MIN_WORK, so split: 4 to 6 column slices claimed for y and for dx, a short last one;
    /// xa, dxa and dB each computed by one slice, dB by the second claimed or, on one thread,
    /// after the region), against the composed products in f64; then the backward pass of an op
    /// whose forward pass never ran (x·Aᵀ recomputed instead of kept).
    #[test]
    fn linear_with_lora_splits_over_threads_without_changing_the_gradients() {
        let (m, inp, out, r, scale) = (70, 100, 90, 4, 0.7);
        let (x, a, b, w) =
            (randn(&[1, m, inp], 30), randn(&[r, inp], 31), randn(&[out, r], 32), randn(&[out, inp], 33));
        let probe = randn(&[1, m, out], 34);
        let composed = |x: &Tensor, a: &Tensor, b: &Tensor| {
            let lora = x.broadcast_matmul(&a.t().unwrap()).unwrap().broadcast_matmul(&b.t().unwrap()).unwrap();
            (x.broadcast_matmul(&w.t().unwrap()).unwrap() + (lora * scale).unwrap()).unwrap()
        };
        let grads = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            let vars: Vec<Var> = [&x, &a, &b].iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = vec![y];
            all.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
            all
        };
        let want = grads(&composed);
        let close = |got: &[Tensor], what: &str| {
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(d < 1e-10, "{what}: output {i} (y, dx, dA, dB) differs by {d}");
            }
        };
        for n in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
            let got =
                pool.install(|| grads(&|x, a, b| linear(x, &Weight::Frozen(w.clone()), Some((a, b, scale))).unwrap()));
            close(&got, &format!("{n} threads"));
        }
        let op = FusedLinear { w: Weight::Frozen(w.clone()), scale, xa: Mutex::new(None) };
        let (dx, dab) = op.grads(&x, &probe, Some((&a, &b))).unwrap();
        let (da, db) = dab.unwrap();
        close(&[want[0].clone(), dx, da, db], "backward without a forward pass");
    }

    /// The composed reference: scores, additive mask, softmax, GQA by repeating kv heads.
    fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, first: usize, window: Option<usize>) -> Tensor {
        let (_b, h, l, d) = q.dims4().unwrap();
        let (_, kh, s, _) = k.dims4().unwrap();
        let rep = |t: &Tensor| {
            let parts: Vec<Tensor> = (0..h).map(|i| t.narrow(1, i / (h / kh), 1).unwrap()).collect();
            Tensor::cat(&parts, 1).unwrap()
        };
        let (k, v) = (rep(k), rep(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let mut mask = vec![0f64; l * s];
        for i in 0..l {
            for j in 0..s {
                let p = first + i;
                if j > p || window.is_some_and(|w| p - j >= w) {
                    mask[i * s + j] = f64::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (l, s), &Device::Cpu).unwrap();
        let probs = crate::model::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        probs.matmul(&v).unwrap()
    }

    #[test]
    fn attention_matches_finite_differences_and_the_composed_softmax() {
        // the pool's size sets how the backward pass groups query blocks (1 thread: one group
        // per head; 2 threads, 4 heads and 6 blocks: 4 groups, two of them with two blocks)
        let pools: Vec<rayon::ThreadPool> =
            [1, 2].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
        let cases = [
            (5, 7, None),
            (5, 7, Some(3)),
            (70, 70, None),
            (70, 70, Some(20)),
            (330, 340, None),
            (330, 330, Some(100)),
        ];
        for (pool, (l, s, window)) in pools.iter().flat_map(|p| cases.iter().map(move |c| (p, *c))) {
            let first = s - l;
            let big = l > 64; // several query blocks; only the forward and composed gradients (FD would take long)
            let (q, k, v) = (randn(&[1, 4, l, 4], 20), randn(&[1, 2, s, 4], 21), randn(&[1, 2, s, 4], 22));
            if big {
                pool.install(|| {
                    let (vars, ts): (Vec<Var>, Vec<Tensor>) = [&q, &k, &v]
                        .iter()
                        .map(|t| {
                            let v = Var::from_tensor(t).unwrap();
                            let t = v.as_tensor().clone();
                            (v, t)
                        })
                        .unzip();
                    let got = attention(&ts[0], &ts[1], &ts[2], first, window).unwrap();
                    let want = attention_composed(&ts[0], &ts[1], &ts[2], first, window);
                    let probe = randn(got.dims(), 23);
                    let g1 = (&got * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(
                        (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12
                    );
                    for v in &vars {
                        let d = (g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap())
                            .unwrap()
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap();
                        assert!(
                            d < 1e-10,
                            "l={l} window={window:?} on {} threads: gradients differ by {d}",
                            pool.current_num_threads()
                        );
                    }
                });
                continue;
            }
            check(
                &[q, k, v],
                |t| attention(&t[0], &t[1], &t[2], first, window).unwrap(),
                |t| attention_composed(&t[0], &t[1], &t[2], first, window),
            );
        }
    }

    #[test]
    fn target_logprobs_refuse_a_target_outside_the_vocabulary() {
        let err =
            target_logprobs(&randn(&[1, 2, 4], 1), &Tensor::new(&[[1u32, 4]], &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    /// Every way `mm` splits a product (one task; by columns; by rows for a narrow output), with a
    /// short last slice (3 threads), against a plain product in f64, with a transposed operand,
    /// beta and accumulation.
    #[test]
    fn split_products_match_a_plain_product() {
        let value = |i: usize, salt: usize| ((i * 7 + salt * 13) % 23) as f64 / 23.0 - 0.5;
        // (m, n, k): LoRA's x·Aᵀ (narrow: by rows), its dA (short: by columns), a base product,
        // one too small to split
        for (m, n, k) in [(256, 16, 576), (16, 576, 256), (256, 576, 64), (96, 5, 7)] {
            let lhs_t: Vec<f64> = (0..m * k).map(|i| value(i, 1)).collect(); // stored (k, m)
            let rhs: Vec<f64> = (0..k * n).map(|i| value(i, 2)).collect(); // stored (k, n)
            let start: Vec<f64> = (0..m * n).map(|i| value(i, 3)).collect();
            let mut want = start.clone();
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] += 0.5 * (0..k).map(|p| lhs_t[p * m + i] * rhs[p * n + j]).sum::<f64>();
                }
            }
            for threads in [1, 2, 3] {
                let mut got = start.clone();
                mm_split(threads, m, n, k, &mut got, Mat::t(&lhs_t, m), Mat::rows(&rhs, n), true, 0.5);
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-9, "{m}×{n}×{k} on {threads} threads: off by {worst}");
            }
        }
    }
}
