//! What the kernels' tests share: random inputs and the check of a kernel against finite
//! differences and its composed form.

use candle_core::{DType, Device, Tensor, Var};

pub(super) fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec(rng.uniform_vec(n, -2.0, 2.0), shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
}

/// Checks `f`'s gradient against central finite differences in f64 at every input element,
/// with a random linear functional of the output as the loss, and against the composed form.
pub(super) fn check(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, composed: impl Fn(&[Tensor]) -> Tensor) {
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
