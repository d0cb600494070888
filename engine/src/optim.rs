//! AdamW with `torch.optim.AdamW` semantics, moments in f32 keyed by parameter name, and
//! `torch.nn.utils.clip_grad_norm_`'s global-norm clipping.
//!
//! candle-nn's AdamW keeps its moments private (no exact resume) and has no clipping.

use crate::error::{EngineError, Result};
use candle_core::{DType, Tensor, Var};
use hearth_api::{AdamParams, OptimStepOutput};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// First and second moments of one parameter, and its f32 master copy when it is held in a
/// narrower dtype.
#[derive(Debug, Clone)]
pub struct Moments {
    /// Exponential average of gradients.
    pub m: Tensor,
    /// Exponential average of squared gradients.
    pub v: Tensor,
    /// The parameter in f32 when the model holds it in bf16 or f16 (full fine-tuning on a GPU):
    /// each step updates this copy and rounds it into the parameter, so updates smaller than
    /// the parameter's precision add up instead of vanishing. `None` for f32 (and f64)
    /// parameters, whose own value is the master.
    pub master: Option<Tensor>,
}

/// Whether a parameter of `dtype` is stepped through an f32 master copy.
fn needs_master(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The optimizer state: moments by parameter name and the step counter.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Moments by parameter name (created on a parameter's first step).
    pub moments: BTreeMap<String, Moments>,
    /// Steps taken.
    pub step: u64,
}

/// The largest learning rate taken: AdamW moves each weight by about the learning rate a step,
/// so far beyond this the weights overflow the forward pass (1e30 makes every output NaN).
pub const MAX_LEARNING_RATE: f64 = 10.0;

/// Checks every field of `p` before anything is touched.
pub fn validate(p: &AdamParams) -> Result<()> {
    let bad = |field: &'static str, value: f64, reason: &'static str| {
        Err(EngineError::InvalidParam { field, value: value.to_string(), reason })
    };
    if !(p.learning_rate.is_finite() && (0.0..=MAX_LEARNING_RATE).contains(&p.learning_rate)) {
        return bad(
            "learning_rate",
            p.learning_rate,
            "must be between 0 and 10 (an AdamW step moves each weight by about the learning rate)",
        );
    }
    for (field, beta) in [("beta1", p.beta1), ("beta2", p.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return bad(field, beta, "must be in [0, 1)");
        }
    }
    for (field, value) in [("eps", p.eps), ("weight_decay", p.weight_decay), ("grad_clip_norm", p.grad_clip_norm)] {
        if !(value.is_finite() && value >= 0.0) {
            return bad(field, value, "must be finite and non-negative");
        }
    }
    Ok(())
}

/// Global L2 norm of all gradients, accumulated in f64.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    global_norm_with(grads, grads.values().all(fusable))
}

/// Whether the fused passes below take `t`: f32 on the CPU, fused kernels on.
fn fusable(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && crate::kernels::applies(t)
}

/// [`global_norm`], `fused`: each gradient's squares summed in one pass (f32 on the CPU).
fn global_norm_with(grads: &BTreeMap<String, Tensor>, fused: bool) -> Result<f64> {
    if fused {
        // one pass per gradient, the gradients split over the pool (each a short serial op
        // composed: a conversion, a square and a sum, on the thread that runs the step)
        let squares: Vec<f64> = grads
            .values()
            .collect::<Vec<_>>()
            .par_iter()
            .map(|g| {
                crate::kernels::with_cpu::<f32, _>(g, "global-norm", |g| {
                    Ok(g.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
                })
            })
            .collect::<candle_core::Result<_>>()?;
        return Ok(squares.iter().sum::<f64>().sqrt());
    }
    Ok(norm_on_device(grads)?.to_scalar::<f64>()?)
}

/// The global norm as a scalar f64 tensor on the gradients' device: the per-gradient sums of
/// squares are added in the same order as the fused pass adds them, and nothing crosses to
/// the host.
fn norm_on_device(grads: &BTreeMap<String, Tensor>) -> Result<Tensor> {
    let squares: Vec<Tensor> = grads
        .values()
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all()?.reshape(1))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&squares, 0)?.sum_all()?.sqrt()?)
}

/// The constants of one AdamW step, in the precision of the f32 ops that use them.
#[derive(Clone, Copy)]
struct Coefs {
    /// The clipping factor, when below 1.
    clip: Option<f32>,
    /// 1 − β₁.
    keep1: f32,
    /// β₂.
    beta2: f32,
    /// 1 − β₂.
    keep2: f32,
    /// 1 / √(1 − β₂ᵗ).
    inv_bias2: f32,
    eps: f32,
    /// 1 − lr · weight_decay.
    decay: f32,
    /// lr / (1 − β₁ᵗ).
    step_size: f32,
}

/// One parameter's update in a single pass (f32 on the CPU): the new value and moments, from the
/// same f32 operations in the same order as the composed candle ops of [`AdamW::step`] (each
/// scalar product of those is an affine op computing `x · c + 0` in f32), so both give the same
/// bits.
fn fused_update(param: &Tensor, g: &Tensor, moments: Option<&Moments>, c: Coefs) -> Result<(Tensor, Moments)> {
    use crate::kernels::with_cpu;
    let op = "adamw";
    let n = param.elem_count();
    let (mut p1, mut m1, mut v1) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut finite = true;
    let mut run = |p: &[f32], g: &[f32], m: Option<&[f32]>, v: Option<&[f32]>| {
        for i in 0..n {
            let g = match c.clip {
                Some(clip) => g[i] * clip,
                None => g[i],
            };
            let (m0, v0) = (m.map_or(0.0, |m| m[i]), v.map_or(0.0, |v| v[i]));
            let m = m0 + (g - m0) * c.keep1;
            let v = v0 * c.beta2 + g * g * c.keep2;
            let denom = v.sqrt() * c.inv_bias2 + c.eps;
            p1[i] = p[i] * c.decay - m / denom * c.step_size;
            (m1[i], v1[i]) = (m, v);
            finite &= p1[i].is_finite() && m.is_finite() && v.is_finite();
        }
    };
    with_cpu::<f32, _>(param, op, |p| {
        with_cpu::<f32, _>(g, op, |g| match moments {
            Some(mo) => with_cpu::<f32, _>(&mo.m, op, |m| {
                with_cpu::<f32, _>(&mo.v, op, |v| {
                    run(p, g, Some(m), Some(v));
                    Ok(())
                })
            }),
            None => {
                run(p, g, None, None);
                Ok(())
            }
        })
    })?;
    if !finite {
        return Err(non_finite_update());
    }
    let (shape, dev) = (param.shape(), param.device());
    let moments = Moments { m: Tensor::from_vec(m1, shape, dev)?, v: Tensor::from_vec(v1, shape, dev)?, master: None };
    Ok((Tensor::from_vec(p1, shape, dev)?, moments))
}

/// The refusal of a step whose update would leave a weight or a moment NaN or infinite (a finite
/// but huge learning rate, say): every update is computed before any is applied, so nothing
/// changes.
fn non_finite_update() -> EngineError {
    EngineError::InvalidParam {
        field: "learning_rate",
        value: "this step".into(),
        reason: "the update would make weights or optimizer moments NaN or infinite; nothing was changed (lower the learning rate, or clip gradients)",
    }
}

/// A scalar f32 tensor that is 0 when every element of `tensors` is finite: Σ 0·x is 0 for
/// finite values and NaN otherwise (0·∞ is NaN), summed on the device.
fn non_finite_marker(tensors: &[&Tensor], device: &candle_core::Device) -> Result<Tensor> {
    let mut total = Tensor::zeros((), DType::F32, device)?;
    for t in tensors {
        total = (total + t.to_dtype(DType::F32)?.affine(0.0, 0.0)?.sum_all()?)?;
    }
    Ok(total)
}

impl AdamW {
    /// Applies one step to `params` using `grads` (same names); parameters without a gradient
    /// are skipped, as in torch. Validates first; on error nothing changes.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        p: &AdamParams,
    ) -> Result<OptimStepOutput> {
        let fused =
            params.iter().filter_map(|(name, var)| Some((name, var, grads.get(name)?))).all(|(name, var, g)| {
                let m = self.moments.get(name);
                [var.as_tensor(), g].into_iter().chain(m.into_iter().flat_map(|m| [&m.m, &m.v])).all(fusable)
            });
        self.step_with(params, grads, p, fused)
    }

    /// [`AdamW::step`], each parameter's update in one fused pass (f32 on the CPU) or composed
    /// from candle ops (everywhere). Both give the same bits.
    fn step_with(
        &mut self,
        params: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        p: &AdamParams,
        fused: bool,
    ) -> Result<OptimStepOutput> {
        validate(p)?;
        if grads.is_empty() {
            return Err(EngineError::NoGradients);
        }
        if !fused {
            return self.step_composed(params, grads, p);
        }
        let grad_norm = global_norm_with(grads, true)?;
        if !grad_norm.is_finite() {
            return Err(EngineError::NonFiniteLoss { op: "optim_step", value: grad_norm });
        }
        // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.
        let clip = if p.grad_clip_norm > 0.0 { (p.grad_clip_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        let (step, bias2_sqrt, step_size) = self.schedule(p);
        // Compute every update first, then commit, so a failure midway changes nothing.
        let with_grads = || params.iter().filter_map(|(name, var)| Some((name, var, grads.get(name)?)));
        let c = Coefs {
            clip: (clip < 1.0).then_some(clip as f32),
            keep1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            keep2: (1.0 - p.beta2) as f32,
            inv_bias2: (1.0 / bias2_sqrt) as f32,
            eps: p.eps as f32,
            decay: (1.0 - p.learning_rate * p.weight_decay) as f32,
            step_size: step_size as f32,
        };
        // each parameter one task on the pool
        let work: Vec<_> = with_grads().collect();
        let updates: Vec<(&String, &Var, Tensor, Moments)> = work
            .into_par_iter()
            .map(|(name, var, g)| {
                fused_update(var.as_tensor(), g, self.moments.get(name), c).map(|(param, m)| (name, var, param, m))
            })
            .collect::<Result<_>>()?;
        self.commit(step, updates, p, grad_norm)
    }

    /// The next step's number, `sqrt(1 − β₂^step)` and the step size `lr / (1 − β₁^step)`
    /// (torch's bias corrections).
    fn schedule(&self, p: &AdamParams) -> (u64, f64, f64) {
        let step = self.step + 1;
        let bias1 = 1.0 - p.beta1.powi(step as i32);
        let bias2_sqrt = (1.0 - p.beta2.powi(step as i32)).sqrt();
        (step, bias2_sqrt, p.learning_rate / bias1)
    }

    /// Applies a step's updates, all computed and checked before: the new values and moments,
    /// and the step counter.
    fn commit(
        &mut self,
        step: u64,
        updates: Vec<(&String, &Var, Tensor, Moments)>,
        p: &AdamParams,
        grad_norm: f64,
    ) -> Result<OptimStepOutput> {
        for (name, var, param, moments) in updates {
            var.set(&param)?;
            self.moments.insert(name.clone(), moments);
        }
        self.step = step;
        Ok(OptimStepOutput { step, learning_rate: p.learning_rate, grad_norm })
    }

    /// The step composed from candle ops, for any device and dtype. The norm, the clipping
    /// factor and every update are computed on the device; one transfer at the end brings the
    /// norm and the finiteness check to the host (a GPU waits for the step once, not once per
    /// parameter), and only then is anything applied.
    fn step_composed(
        &mut self,
        params: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        p: &AdamParams,
    ) -> Result<OptimStepOutput> {
        let device = grads.values().next().map(|g| g.device().clone()).ok_or(EngineError::NoGradients)?;
        let norm = norm_on_device(grads)?;
        // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.
        let clip = if p.grad_clip_norm > 0.0 {
            let max = Tensor::full(p.grad_clip_norm, (), &device)?;
            Some(max.div(&(&norm + 1e-6)?)?.minimum(1.0)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        let (step, bias2_sqrt, step_size) = self.schedule(p);
        let mut updates = Vec::new();
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let dtype = var.dtype();
            let g = g.to_dtype(DType::F32)?;
            let g = match &clip {
                Some(c) => g.broadcast_mul(c)?,
                None => g,
            };
            let previous = self.moments.get(name);
            let (m, v) = match previous {
                Some(mo) => (mo.m.clone(), mo.v.clone()),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = (&m + ((&g - &m)? * (1.0 - p.beta1))?)?; // torch: exp_avg.lerp_(grad, 1 - beta1)
            let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + p.eps)?;
            let param = match previous.and_then(|mo| mo.master.clone()) {
                Some(master) => master,
                None => var.as_tensor().to_dtype(DType::F32)?,
            };
            let param = (param * (1.0 - p.learning_rate * p.weight_decay))?;
            let param = (param - ((&m / &denom)? * step_size)?)?;
            let master = needs_master(dtype).then(|| param.clone());
            updates.push((name, var, param.to_dtype(dtype)?, Moments { m, v, master }));
        }
        let all: Vec<&Tensor> = updates
            .iter()
            .flat_map(|(_, _, param, m)| [param, &m.m, &m.v].into_iter().chain(m.master.as_ref()))
            .collect();
        let marker = non_finite_marker(&all, &device)?;
        let answer: Vec<f64> =
            Tensor::cat(&[norm.reshape(1)?, marker.to_dtype(DType::F64)?.reshape(1)?], 0)?.to_vec1()?;
        let (grad_norm, finite) = (answer[0], answer[1] == 0.0);
        if !grad_norm.is_finite() {
            return Err(EngineError::NonFiniteLoss { op: "optim_step", value: grad_norm });
        }
        if !finite {
            return Err(non_finite_update());
        }
        self.commit(step, updates, p, grad_norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// Three steps, the fused pass against the composed ops: the same bits in the parameters,
    /// both moments and the gradient norm; with and without clipping and weight decay, and one
    /// parameter without a gradient (skipped by both).
    #[test]
    fn the_fused_step_gives_the_composed_steps_bits() {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(7);
        let mut values = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|_| ((rng.next_u64() % 20001) as f32 / 10000.0 - 1.0) * scale).collect()
        };
        let shapes: [&[usize]; 3] = [&[16, 40], &[72, 16], &[5]];
        let start: Vec<Tensor> =
            shapes.iter().map(|s| Tensor::from_vec(values(s.iter().product(), 1.0), *s, &dev).unwrap()).collect();
        for (clip, wd) in [(0.0, 0.0), (0.5, 0.1), (1e6, 0.01)] {
            let p = AdamParams { learning_rate: 1e-2, grad_clip_norm: clip, weight_decay: wd, ..AdamParams::default() };
            let make = || {
                start
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("p{i}"), Var::from_tensor(t).unwrap()))
                    .collect::<Vec<_>>()
            };
            let (fused, composed) = (make(), make());
            let (mut fo, mut co) = (AdamW::default(), AdamW::default());
            for _ in 0..3 {
                let grads: BTreeMap<String, Tensor> = shapes[..2]
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        (format!("p{i}"), Tensor::from_vec(values(s.iter().product(), 3.0), *s, &dev).unwrap())
                    })
                    .collect();
                let a = fo.step_with(&fused, &grads, &p, true).unwrap();
                let b = co.step_with(&composed, &grads, &p, false).unwrap();
                assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "grad norm, clip {clip}");
                for ((name, f), (_, c)) in fused.iter().zip(&composed) {
                    assert_eq!(bits(f.as_tensor()), bits(c.as_tensor()), "{name}, clip {clip}, wd {wd}");
                }
                for (name, m) in &fo.moments {
                    assert_eq!(
                        (bits(&m.m), bits(&m.v)),
                        (bits(&co.moments[name].m), bits(&co.moments[name].v)),
                        "moments of {name}"
                    );
                }
            }
            assert_eq!(bits(fused[2].1.as_tensor()), bits(&start[2]), "a parameter without a gradient stays");
            assert_eq!(fo.moments.len(), 2);
        }
    }

    /// A finite but huge learning rate would turn every weight into NaN: the step is refused and
    /// changes nothing (weights, moments, step counter), in the fused pass and the composed ops.
    #[test]
    fn a_step_that_would_make_weights_non_finite_is_refused_and_changes_nothing() {
        let dev = Device::Cpu;
        let start =
            Tensor::from_vec((0..64).map(|i| i as f32 / 64.0 - 0.5).collect::<Vec<f32>>(), (8, 8), &dev).unwrap();
        let grads: BTreeMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::from_vec((0..64).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<f32>>(), (8, 8), &dev).unwrap(),
        )]
        .into();
        for fused in [true, false] {
            let params = vec![("w".to_string(), Var::from_tensor(&start).unwrap())];
            let mut opt = AdamW::default();
            opt.step_with(&params, &grads, &AdamParams { learning_rate: 1e-2, ..AdamParams::default() }, fused)
                .unwrap();
            let (before, moments) =
                (bits(params[0].1.as_tensor()), (bits(&opt.moments["w"].m), bits(&opt.moments["w"].v)));
            // 1e30 is refused by name; lr · weight_decay past f32's range makes the decayed weights
            // infinite, which only the update's own check sees
            let huge_lr = AdamParams { learning_rate: 1e30, ..AdamParams::default() };
            let huge_decay = AdamParams { learning_rate: 1.0, weight_decay: 1e300, ..AdamParams::default() };
            for (p, says) in [(huge_lr, "between 0 and 10"), (huge_decay, "NaN or infinite")] {
                let e = opt.step_with(&params, &grads, &p, fused).unwrap_err();
                assert!(e.to_string().contains(says), "fused {fused}: {e}");
                assert!(e.is_user_error());
                assert_eq!(bits(params[0].1.as_tensor()), before, "fused {fused}: the weights changed");
                assert_eq!(
                    (bits(&opt.moments["w"].m), bits(&opt.moments["w"].v)),
                    moments,
                    "fused {fused}: the moments changed"
                );
                assert_eq!(opt.step, 1);
            }
            opt.step_with(&params, &grads, &AdamParams { learning_rate: 1e-2, ..AdamParams::default() }, fused)
                .unwrap();
            assert_eq!(opt.step, 2, "a sane step still works afterwards");
        }
    }
}
