//! The fused LoRA linear: `x · Wᵀ + scale · (x · Aᵀ) · Bᵀ` for a frozen base weight, forward and
//! backward each one parallel region.

use super::frozen::Frozen;
use super::matmul::{mm, Mat, Out, MIN_COLUMNS};
use super::pool::{claim_columns, threads_for, OneJob};
use super::real::{both, same, storage, with_cpu, Real};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::Mutex;

/// `x · Wᵀ + scale · (x · Aᵀ) · Bᵀ` for a frozen weight W (out, in) and, with `lora`, a LoRA pair
/// A (r, in), B (out, r): x (…, in) → (…, out). The LoRA term is accumulated into the base
/// product (no (…, out) temporaries); on backward the input gradient `g·W + scale·(g·B)·A` is
/// accumulated the same way, and A and B get theirs (W gets none).
///
/// The op holds `w` as it is, so quantized blocks are dequantized into a temporary for the forward
/// product and again for the backward one. Only a frozen weight fits: a trained one needs
/// candle's graph for its gradient.
pub fn linear(x: &Tensor, w: Frozen, lora: Option<(&Tensor, &Tensor, f64)>) -> Result<Tensor> {
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
    let w = match w {
        Frozen::Dense(t) => Frozen::Dense(t.contiguous()?),
        quantized => quantized,
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
    w: Frozen,
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
        self.w.value(dtype).map_err(|e| candle_core::Error::Msg(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use super::*;
    use candle_core::Var;

    #[test]
    fn linear_with_lora_matches_finite_differences_and_the_composed_products() {
        let (m, inp, out, r) = (5, 7, 6, 3);
        let w = randn(&[out, inp], 10);
        check(
            &[randn(&[1, m, inp], 11), randn(&[r, inp], 12), randn(&[out, r], 13)],
            |t| linear(&t[0], Frozen::Dense(w.clone()), Some((&t[1], &t[2], 0.7))).unwrap(),
            |t| {
                let base = t[0].broadcast_matmul(&w.t().unwrap()).unwrap();
                let lora =
                    t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap().broadcast_matmul(&t[2].t().unwrap()).unwrap();
                (base + (lora * 0.7).unwrap()).unwrap()
            },
        );
        check(
            &[randn(&[2, m, inp], 14)],
            |t| linear(&t[0], Frozen::Dense(w.clone()), None).unwrap(),
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
        let got = linear(&x, Frozen::Dense(w.clone()), None).unwrap();
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
                pool.install(|| grads(&|x, a, b| linear(x, Frozen::Dense(w.clone()), Some((a, b, scale))).unwrap()));
            close(&got, &format!("{n} threads"));
        }
        let op = FusedLinear { w: Frozen::Dense(w.clone()), scale, xa: Mutex::new(None) };
        let (dx, dab) = op.grads(&x, &probe, Some((&a, &b))).unwrap();
        let (da, db) = dab.unwrap();
        close(&[want[0].clone(), dx, da, db], "backward without a forward pass");
    }
}
