//! Matmul throughput on the shapes of one training step (smollm2-135m-shape, T=256), one thread,
//! gemm called directly: `y = x·Wᵀ` written row-major (gemm transposes the problem and packs W)
//! against the same product written column-major (yᵀ: x is packed instead) plus the transpose
//! back, and the backward `g·W`. Diagnostic for the fused linear's layout choices.
#![allow(clippy::print_stdout, clippy::unwrap_used)]
use std::time::Instant;

#[allow(clippy::too_many_arguments)] // gemm's own interface
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    d_rs: isize,
    d_cs: isize,
    lhs: &[f32],
    l_rs: isize,
    l_cs: isize,
    rhs: &[f32],
    r_rs: isize,
    r_cs: isize,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            d_cs,
            d_rs,
            false,
            lhs.as_ptr(),
            l_cs,
            l_rs,
            rhs.as_ptr(),
            r_cs,
            r_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let s = Instant::now();
    for _ in 0..reps {
        f();
    }
    s.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let t = 256;
    for (name, inp, out) in [
        ("q 576→576", 576, 576),
        ("gate 576→1536", 576, 1536),
        ("down 1536→576", 1536, 576),
        ("head 576→49152", 576, 49152),
    ] {
        let x: Vec<f32> = (0..t * inp).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 5 % 11) as f32 - 5.0) / 10.0).collect();
        let g: Vec<f32> = (0..t * out).map(|i| ((i * 3 % 7) as f32 - 3.0) / 10.0).collect();
        let mut y = vec![0f32; t * out];
        let mut yt = vec![0f32; t * out];
        let mut dx = vec![0f32; t * inp];
        let flops = 2.0 * (t * inp * out) as f64;
        let reps = (3e9 / flops).clamp(2.0, 200.0) as usize;
        // row-major y (M×out) = x (M×in, rs=in) · Wᵀ (in×out: rs=1, cs=in)
        let a = time(reps, || gemm(t, out, inp, &mut y, out as isize, 1, &x, inp as isize, 1, &w, 1, inp as isize));
        // column-major y: element (i, j) at j*t + i, then transposed to row-major
        let b_mm = time(reps, || gemm(t, out, inp, &mut yt, 1, t as isize, &x, inp as isize, 1, &w, 1, inp as isize));
        let b_tr = time(reps, || {
            for j in 0..out {
                for i in 0..t {
                    y[i * out + j] = yt[j * t + i];
                }
            }
        });
        // backward dx (M×in) = g (M×out) · W (out×in, rs=in)
        let c = time(reps, || gemm(t, inp, out, &mut dx, inp as isize, 1, &g, out as isize, 1, &w, inp as isize, 1));
        println!(
            "{name:16} fwd row-major {:6.1} GFLOP/s | col-major {:6.1} GFLOP/s + transpose {:.3} ms ({:6.1} GFLOP/s all in) | bwd {:6.1} GFLOP/s",
            flops / a / 1e9,
            flops / b_mm / 1e9,
            b_tr * 1e3,
            flops / (b_mm + b_tr) / 1e9,
            flops / c / 1e9
        );
    }
}
