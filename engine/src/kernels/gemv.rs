//! `x @ wᵀ` for a few rows of x (decoding): stream each weight row once, dot it with every row.
//!
//! gemm packs the weight into panels before multiplying, which for a handful of rows doubles
//! the memory traffic of an operation that is memory-bound anyway: at batch 1, a decode step
//! reads every weight once and does two flops per weight. Here each weight row is read straight
//! from memory, kept in L1 while the (few, L1-resident) input rows are dotted with it, and the
//! output rows are split across candle's barrier pool (see [`few_rows_times_wt`]). f32 only;
//! other dtypes take the gemm path.

use super::qgemv::{few_rows_times_qt, Blocks};
use crate::quant::QWeight;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Most input rows handled here for one run; above it gemm's blocking wins.
pub const MAX_ROWS: usize = 16;

/// Most input rows of a decode step over several runs ([`linear_segments`]): past it each
/// weight row is dotted with more input rows than L1 holds, and a batch is split.
pub const MAX_SEGMENT_ROWS: usize = 64;

/// Output features per task: 64 rows of a 576-wide weight is 144 KiB.
const BLOCK: usize = 64;

/// Below this many weights (1 MiB of f32) one thread streams the weight faster than waking
/// the pool: LoRA factors and k/v projections stay on the calling thread.
const PAR_MIN: usize = 64 * 1024;

/// The CPU fast path of `frozen_matmul`: `Some` when x is f32 with at most [`MAX_ROWS`] rows and
/// both operands are contiguous; `None` to fall back to gemm.
pub fn frozen_matmul_few_rows(
    x: &CpuStorage,
    x_l: &Layout,
    w: &CpuStorage,
    w_l: &Layout,
) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
    let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) else { return Ok(None) };
    let (Some((xa, xb)), Some((wa, wb))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets()) else {
        return Ok(None);
    };
    let dims = x_l.dims();
    let Some((&k, batch)) = dims.split_last() else { return Ok(None) };
    let m: usize = batch.iter().product();
    let (n, wk) = w_l.shape().dims2()?;
    if m > MAX_ROWS || wk != k || k == 0 {
        return Ok(None);
    }
    let y = few_rows_times_wt(&xs[xa..xb], m, k, &ws[wa..wb], n);
    let mut out_dims = batch.to_vec();
    out_dims.push(n);
    Ok(Some((CpuStorage::F32(y), Shape::from(out_dims))))
}

/// A contiguous f32 CPU tensor's values, or `None`.
fn f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// A whole untracked linear layer in one pass for a few rows of x: `x Wᵀ + bias +
/// scale · (x Aᵀ) Bᵀ`, with B given transposed (r, n). Decoding runs hundreds of these per
/// token, and as separate candle ops (two matmuls, scale, add, bias) their fixed costs were a
/// third of a token's time.
/// `None` when the fast path does not apply (not CPU f32, too many rows, tracked tensors).
pub fn linear_few_rows(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Option<Tensor> {
    let m: usize = x.dims().split_last()?.1.iter().product();
    if m > MAX_ROWS {
        return None;
    }
    linear_segments(x, WeightRows::Dense(w), bias, &[(m, lora)])
}

/// A LoRA pair as the decode kernels take it: A (r, in), Bᵀ (r, out), scale.
pub type LoraRows<'a> = (&'a Tensor, &'a Tensor, f64);

/// A frozen weight (out, in) as the decode kernels read it: dense f32 values, or the ggml
/// blocks of a quantized base, read in place ([`super::qgemv`]).
#[derive(Debug, Clone, Copy)]
pub enum WeightRows<'a> {
    /// Dense values.
    Dense(&'a Tensor),
    /// Quantized blocks.
    Blocks(&'a QWeight),
}

/// [`linear_few_rows`] for rows of several runs at once: x's rows are split into segments
/// (`segs`: each one's row count and LoRA pair, in row order); the base product streams the
/// weight once for all rows and each segment adds its own pair. Every output row is computed
/// with the same arithmetic in the same order whatever the other rows are, so a run's rows
/// come out bit for bit as they would alone. `None` when the fast path does not apply.
pub fn linear_segments(
    x: &Tensor,
    w: WeightRows<'_>,
    bias: Option<&Tensor>,
    segs: &[(usize, Option<LoraRows<'_>>)],
) -> Option<Tensor> {
    let dims = x.dims();
    let (&k, batch) = dims.split_last()?;
    let m: usize = batch.iter().product();
    let untracked = |t: &Tensor| !t.track_op();
    let (n, wk) = match w {
        WeightRows::Dense(t) if untracked(t) => t.dims2().ok()?,
        WeightRows::Dense(_) => return None,
        WeightRows::Blocks(q) => q.dims2(),
    };
    if m > MAX_SEGMENT_ROWS || wk != k || k == 0 || !untracked(x) || segs.iter().map(|s| s.0).sum::<usize>() != m {
        return None;
    }
    let x = x.contiguous().ok()?;
    let mut y = match w {
        WeightRows::Dense(t) => f32_slice(&x, |xs| f32_slice(t, |ws| few_rows_times_wt(xs, m, k, ws, n)))??,
        WeightRows::Blocks(q) => {
            let (dtype, blocks) = q.cpu_blocks()?;
            let kind = Blocks::of(dtype)?;
            f32_slice(&x, |xs| few_rows_times_qt(xs, m, k, &blocks, kind, n))??
        }
    };
    let mut first = 0;
    for &(rows, lora) in segs {
        if let Some((a, bt, scale)) = lora {
            let r = a.dims2().ok()?.0;
            if !untracked(a) || !untracked(bt) || a.dims2().ok()? != (r, k) || bt.dims2().ok()? != (r, n) {
                return None;
            }
            let own = first * k..(first + rows) * k;
            let xa = f32_slice(&x, |xs| f32_slice(a, |av| few_rows_times_wt(&xs[own], rows, k, av, r)))??; // (rows, r)
            let scale = scale as f32;
            let y = &mut y[first * n..(first + rows) * n];
            f32_slice(bt, |btv| {
                // y_i += scale · Σ_j xa_ij · Bᵀ_j : r contiguous axpys per row
                for (yi, xai) in y.chunks_exact_mut(n).zip(xa.chunks_exact(r)) {
                    for (&c, btj) in xai.iter().zip(btv.chunks_exact(n)) {
                        let c = scale * c;
                        yi.iter_mut().zip(btj).for_each(|(y, b)| *y += c * b);
                    }
                }
            })?;
        }
        first += rows;
    }
    if let Some(bias) = bias {
        if !untracked(bias) || bias.dims() != [n] {
            return None;
        }
        f32_slice(bias, |bv| y.chunks_exact_mut(n).for_each(|row| row.iter_mut().zip(bv).for_each(|(y, b)| *y += b)))?;
    }
    let mut out_dims = batch.to_vec();
    out_dims.push(n);
    Tensor::from_vec(y, out_dims, x.device()).ok()
}

/// y (m, n) = x (m, k) · w (n, k)ᵀ, all row-major.
pub fn few_rows_times_wt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut yt = vec![0f32; n * m]; // (n, m): each task owns whole output features
    if n * k < PAR_MIN {
        block(x, m, k, w, &mut yt);
    } else {
        // candle's barrier pool: its workers spin for about a millisecond before parking, so
        // the next layer's kernels find them awake (rayon's workers were asleep between the
        // small serial ops of a decode step, and waking them cost more than the split saved).
        let outs: Vec<Mutex<&mut [f32]>> = yt.chunks_mut(BLOCK * m).map(Mutex::new).collect();
        let rows: Vec<&[f32]> = w.chunks(BLOCK * k).collect();
        candle_core::utils::barrier_pool().execute_chunked(outs.len(), |range| {
            for u in range {
                if let Ok(mut out) = outs[u].lock() {
                    block(x, m, k, rows[u], &mut out);
                }
            }
        });
    }
    by_rows(yt, m, n)
}

/// `yt` (n, m), the layout the decode kernels fill (each task owns whole output features), as
/// y (m, n).
pub(super) fn by_rows(yt: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (o, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + o] = v;
        }
    }
    y
}

/// out[o·m + i] = x_i · rows_o for the weight rows of one block.
fn block(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { block_avx512(x, m, k, rows, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { fma::block(x, m, k, rows, out) };
        }
    }
    block_generic(x, m, k, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_avx512(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    block_generic(x, m, k, rows, out)
}

/// The AVX2 kernel: explicit fused multiply-adds (the compiler does not fuse `a * b + c` on
/// its own), two weight rows against four input rows at a time, so that each 8-wide load
/// feeds more than one product (six loads for eight FMAs).
///
/// Every (weight row, input row) pair is reduced the same way wherever it falls in the
/// blocking (eight lanes of FMAs in order of k, the lanes summed in a fixed order, then the
/// tail of k past a multiple of eight), so an output does not depend on the other rows.
#[cfg(target_arch = "x86_64")]
pub(super) mod fma {
    use std::arch::x86_64::*;

    /// out[o·m + i] = x_i · rows_o.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
        let xs: Vec<&[f32]> = x.chunks_exact(k).take(m).collect();
        let ws: Vec<&[f32]> = rows.chunks_exact(k).collect();
        let mut o = 0;
        while o < ws.len() {
            if o + 2 <= ws.len() {
                let w = [ws[o], ws[o + 1]];
                let mut i = 0;
                while i + 4 <= m {
                    let d = dots(w, [xs[i], xs[i + 1], xs[i + 2], xs[i + 3]]);
                    for (a, row) in d.iter().enumerate() {
                        out[(o + a) * m + i..(o + a) * m + i + 4].copy_from_slice(row);
                    }
                    i += 4;
                }
                for (i, xi) in xs.iter().enumerate().skip(i) {
                    let d = dots(w, [*xi]);
                    out[o * m + i] = d[0][0];
                    out[(o + 1) * m + i] = d[1][0];
                }
                o += 2;
            } else {
                for (i, xi) in xs.iter().enumerate() {
                    out[o * m + i] = dots([ws[o]], [*xi])[0][0];
                }
                o += 1;
            }
        }
    }

    /// The R × X dot products of weight rows `w` with input rows `x` (all of length k).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dots<const R: usize, const X: usize>(w: [&[f32]; R], x: [&[f32]; X]) -> [[f32; X]; R] {
        let k = w[0].len();
        let full = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); X]; R];
        let mut j = 0;
        while j < full {
            let mut xv = [_mm256_setzero_ps(); X];
            for (v, xb) in xv.iter_mut().zip(&x) {
                // SAFETY: j + 8 ≤ full ≤ k = xb.len()
                *v = unsafe { _mm256_loadu_ps(xb.as_ptr().add(j)) };
            }
            for (acc_a, wa) in acc.iter_mut().zip(&w) {
                // SAFETY: j + 8 ≤ full ≤ k = wa.len()
                let wv = unsafe { _mm256_loadu_ps(wa.as_ptr().add(j)) };
                for (c, v) in acc_a.iter_mut().zip(&xv) {
                    *c = _mm256_fmadd_ps(wv, *v, *c);
                }
            }
            j += 8;
        }
        let mut out = [[0f32; X]; R];
        for ((out_a, acc_a), wa) in out.iter_mut().zip(&acc).zip(&w) {
            for ((o, c), xb) in out_a.iter_mut().zip(acc_a).zip(&x) {
                let mut s = hsum(*c);
                for t in full..k {
                    s += wa[t] * xb[t];
                }
                *o = s;
            }
        }
        out
    }

    /// The eight lanes of `v` summed in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::kernels) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[inline(always)]
fn block_generic(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    for (row, out) in rows.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        // four input rows per pass: each 16-wide chunk of the weight row is loaded once
        let mut i = 0;
        while i + 4 <= m {
            let d = dot4(
                [
                    &x[i * k..(i + 1) * k],
                    &x[(i + 1) * k..(i + 2) * k],
                    &x[(i + 2) * k..(i + 3) * k],
                    &x[(i + 3) * k..(i + 4) * k],
                ],
                row,
            );
            out[i..i + 4].copy_from_slice(&d);
            i += 4;
        }
        for (xi, o) in x[i * k..].chunks_exact(k).zip(&mut out[i..]) {
            *o = dot(xi, row);
        }
    }
}

/// Dot product with 16 independent lanes (vectorises to one AVX-512 or two AVX2 registers).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Four dot products against the same `w`.
#[inline(always)]
fn dot4(xs: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; 16]; 4];
    let chunks = w
        .chunks_exact(16)
        .zip(xs[0].chunks_exact(16))
        .zip(xs[1].chunks_exact(16))
        .zip(xs[2].chunks_exact(16))
        .zip(xs[3].chunks_exact(16));
    for ((((wc, x0), x1), x2), x3) in chunks {
        for j in 0..16 {
            acc[0][j] += x0[j] * wc[j];
            acc[1][j] += x1[j] * wc[j];
            acc[2][j] += x2[j] * wc[j];
            acc[3][j] += x3[j] * wc[j];
        }
    }
    let n = w.len() / 16 * 16;
    let mut out = [0f32; 4];
    for ((o, acc), x) in out.iter_mut().zip(&acc).zip(&xs) {
        *o = acc.iter().sum::<f32>() + x[n..].iter().zip(&w[n..]).map(|(a, b)| a * b).sum::<f32>();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rows_outputs_do_not_depend_on_the_other_rows() {
        // k with a tail past a multiple of eight and of sixteen; n odd (a lone weight row last)
        let (k, n) = (603, 131);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 311.0).collect();
        let row = |r: usize| -> Vec<f32> { (0..k).map(|j| ((r * 31 + j * 17) % 97) as f32 / 13.0 - 3.5).collect() };
        let alone: Vec<Vec<f32>> = (0..9).map(|r| few_rows_times_wt(&row(r), 1, k, &w, n)).collect();
        for m in 1..=9 {
            let x: Vec<f32> = (0..m).flat_map(row).collect();
            let y = few_rows_times_wt(&x, m, k, &w, n);
            for (r, want) in alone.iter().enumerate().take(m) {
                assert_eq!(&y[r * n..(r + 1) * n], want.as_slice(), "row {r} of {m}");
            }
        }
    }

    #[test]
    fn matches_the_naive_product() {
        for (m, k, n) in [(1, 576, 200), (8, 37, 130), (3, 16, 1), (16, 100, 65)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
            let y = few_rows_times_wt(&x, m, k, &w, n);
            for i in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k).map(|j| x[i * k + j] as f64 * w[o * k + j] as f64).sum();
                    assert!((y[i * n + o] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "m{m} k{k} n{n} ({i},{o})");
                }
            }
        }
    }
}
