//! The float types the kernels are written for ([`Real`]: f32 and f64) and the plumbing between
//! candle's storages and plain slices: a contiguous slice of a layout, a second operand of the
//! first one's dtype, a constant tensor's values, and a `Vec` back into a storage.

use super::math;
use candle_core::{CpuStorage, Layout, Tensor};

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
    + std::ops::MulAssign
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

/// The contiguous slice behind a layout, or an error naming the op.
pub(crate) fn slice<'a, T>(v: &'a [T], l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// Runs `$body` with `$v` the contiguous slice behind an f32 or f64 storage and `$ty` its element
/// type; any other dtype is an error naming the op.
macro_rules! both {
    ($op:expr, $s:expr, $l:expr, |$v:ident, $ty:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                type $ty = f32;
                let $v = $crate::kernels::real::slice(v, $l, $op)?;
                $body
            }
            CpuStorage::F64(v) => {
                type $ty = f64;
                let $v = $crate::kernels::real::slice(v, $l, $op)?;
                $body
            }
            _ => candle_core::bail!("{}: only f32 and f64 are fused", $op),
        }
    };
}

pub(crate) use both;

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

/// A kernel's output `Vec<T>` (f32 or f64) as a storage.
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
