//! `x @ wᵀ` for a few rows of x against a weight held as ggml blocks (decoding from a quantized
//! base): each block of 32 weights is read once for all the input rows, its 4- or 8-bit values
//! converted in registers and multiplied with the f32 inputs, the block's scale applied once to
//! the block's sum (`d·Σ q·x`, plus `m·Σ x` for a block with a minimum). A decode step so reads
//! the file's bytes (5 bits a weight for `Q4_1`) instead of dequantizing a weight-sized f32 copy
//! for every token.
//!
//! The inputs stay f32 (llama.cpp rounds them to 8 bits, which moves a token's logprob by a few
//! hundredths on SmolLM2): a step's logits are the products of the dequantized weights with the
//! inputs, as `forward` computes them, up to the order of the sums, so a sample's logprobs stay
//! the model's own. Every (weight row, input row) pair is reduced the same way whatever the other
//! rows are (eight lanes per block, scaled and added over the blocks in order, then summed in a
//! fixed order), so a row's outputs do not depend on the rows beside it.

use candle_core::quantized::GgmlDType;
use std::sync::Mutex;

/// Block layouts read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// f16 scale, 32 × i8: `d·q`.
    Q8_0,
    /// f16 scale, 16 bytes of 4-bit values: `d·(q − 8)`.
    Q4_0,
    /// f16 scale, f16 minimum, 16 bytes of 4-bit values: `d·q + m`.
    Q4_1,
}

impl Blocks {
    /// The layout of a ggml block type, if this kernel reads it.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            _ => None,
        }
    }

    /// Bytes of one block of 32 weights.
    pub fn bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
        }
    }
}

/// An input row with its sums over each block of 32 (what a block's minimum multiplies).
pub struct Row<'a> {
    x: &'a [f32],
    sums: Vec<f32>,
}

impl<'a> Row<'a> {
    /// `x` (a multiple of 32 long) and its block sums.
    pub fn new(x: &'a [f32]) -> Self {
        Self { x, sums: x.chunks_exact(32).map(|b| b.iter().sum()).collect() }
    }
}

/// Output features per task: at most 64, and at least sixteen tasks where the weight has the
/// rows (the k/v projections' 192 rows as three tasks kept one of two threads waiting).
fn block_rows(n: usize) -> usize {
    n.div_ceil(16).next_multiple_of(8).clamp(8, 64)
}

/// Below this many bytes of blocks, one thread streams them faster than waking the pool.
const PAR_MIN: usize = 64 * 1024;

/// The IEEE half-precision number stored little-endian at `b[at..at + 2]`, exactly.
#[inline]
fn f16(b: &[u8], at: usize) -> f32 {
    let h = u32::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let (sign, exp, frac) = ((h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x03FF);
    match exp {
        // subnormal: frac · 2⁻²⁴ (exact in f32)
        0 => {
            let v = frac as f32 * (1.0 / 16_777_216.0);
            if sign == 0 {
                v
            } else {
                -v
            }
        }
        31 => f32::from_bits(sign | 0x7F80_0000 | (frac << 13)),
        e => f32::from_bits(sign | ((e + 112) << 23) | (frac << 13)),
    }
}

/// y (m, n) = x (m, k) · w (n, k)ᵀ with w as `kind` blocks (n rows of k/32 blocks), all
/// row-major. `None` when the sizes do not match (k not a
/// multiple of 32, too few bytes).
pub fn few_rows_times_qt(x: &[f32], m: usize, k: usize, blocks: &[u8], kind: Blocks, n: usize) -> Option<Vec<f32>> {
    let row_bytes = k / 32 * kind.bytes();
    if k == 0 || !k.is_multiple_of(32) || blocks.len() < n * row_bytes || x.len() < m * k {
        return None;
    }
    let xs: Vec<Row> = x.chunks_exact(k).take(m).map(Row::new).collect();
    let mut yt = vec![0f32; n * m]; // (n, m): each task owns whole output features
    if n * row_bytes < PAR_MIN {
        rows(&xs, &blocks[..n * row_bytes], row_bytes, kind, &mut yt);
    } else {
        // candle's barrier pool, as the dense decode kernel uses (see `gemv.rs`)
        let block = block_rows(n);
        let outs: Vec<Mutex<&mut [f32]>> = yt.chunks_mut(block * m).map(Mutex::new).collect();
        let parts: Vec<&[u8]> = blocks[..n * row_bytes].chunks(block * row_bytes).collect();
        candle_core::utils::barrier_pool().execute_chunked(outs.len(), |range| {
            for u in range {
                if let Ok(mut out) = outs[u].lock() {
                    rows(&xs, parts[u], row_bytes, kind, &mut out);
                }
            }
        });
    }
    Some(super::gemv::by_rows(yt, m, n))
}

/// out[o·m + i] = x_i · w_o for the weight rows held in `blocks`.
fn rows(xs: &[Row], blocks: &[u8], row_bytes: usize, kind: Blocks, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
            return unsafe { avx2::rows(xs, blocks, row_bytes, kind, out) };
        }
    }
    let m = xs.len();
    for (o, row) in blocks.chunks_exact(row_bytes).enumerate() {
        for (i, x) in xs.iter().enumerate() {
            out[o * m + i] = generic_dot(row, kind, x);
        }
    }
}

/// One weight row's blocks against one input row, in scalar code.
fn generic_dot(row: &[u8], kind: Blocks, x: &Row) -> f32 {
    let (mut acc, mut mins) = (0f32, 0f32);
    for (b, block) in row.chunks_exact(kind.bytes()).enumerate() {
        let xb = &x.x[32 * b..32 * b + 32];
        let dot: f32 = match kind {
            Blocks::Q8_0 => block[2..34].iter().zip(xb).map(|(&w, &v)| f32::from(w as i8) * v).sum(),
            Blocks::Q4_0 | Blocks::Q4_1 => {
                let (qs, offset) = if kind == Blocks::Q4_0 { (&block[2..18], 8.0) } else { (&block[4..20], 0.0) };
                qs.iter()
                    .enumerate()
                    .map(|(j, &q)| (f32::from(q & 0x0F) - offset) * xb[j] + (f32::from(q >> 4) - offset) * xb[j + 16])
                    .sum()
            }
        };
        acc = f16(block, 0).mul_add(dot, acc);
        if kind == Blocks::Q4_1 {
            mins = f16(block, 2).mul_add(x.sums[b], mins);
        }
    }
    acc + mins
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Blocks, Row};
    use crate::kernels::gemv::fma::hsum;
    use std::arch::x86_64::*;

    /// [`super::rows`] with AVX2: input rows four at a time against each weight block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rows(xs: &[Row], blocks: &[u8], row_bytes: usize, kind: Blocks, out: &mut [f32]) {
        let m = xs.len();
        for (o, row) in blocks.chunks_exact(row_bytes).enumerate() {
            let mut i = 0;
            while i + 4 <= m {
                let d = dots(row, kind, [&xs[i], &xs[i + 1], &xs[i + 2], &xs[i + 3]]);
                out[o * m + i..o * m + i + 4].copy_from_slice(&d);
                i += 4;
            }
            for (i, x) in xs.iter().enumerate().skip(i) {
                out[o * m + i] = dots(row, kind, [x])[0];
            }
        }
    }

    /// The dot products of one weight row (its blocks) with X input rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dots<const X: usize>(row: &[u8], kind: Blocks, x: [&Row; X]) -> [f32; X] {
        match kind {
            Blocks::Q8_0 => over_blocks::<X, 0>(row, &x),
            Blocks::Q4_0 => over_blocks::<X, 1>(row, &x),
            Blocks::Q4_1 => over_blocks::<X, 2>(row, &x),
        }
    }

    /// `KIND` 0: `Q8_0`, 1: `Q4_0`, 2: `Q4_1` (a constant, so each kind gets its own loop).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn over_blocks<const X: usize, const KIND: u8>(row: &[u8], x: &[&Row; X]) -> [f32; X] {
        let bytes = [34, 18, 20][KIND as usize];
        let mut acc = [_mm256_setzero_ps(); X];
        let mut mins = [0f32; X];
        for (b, block) in row.chunks_exact(bytes).enumerate() {
            // SAFETY: a block holds `bytes` bytes: the scales, then 32 (Q8_0) or 16 bytes
            let (dm, q) = unsafe {
                let scales =
                    _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([block[0], block[1], block[2], block[3]])));
                let dm = [_mm_cvtss_f32(scales), _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1))];
                // the 32 values as f32, in four vectors (elements 0–7, 8–15, 16–23, 24–31)
                let q: [__m256; 4] = if KIND == 0 {
                    let p = block.as_ptr().add(2);
                    let part = |g: usize| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * g) as *const __m128i)))
                    };
                    [part(0), part(1), part(2), part(3)]
                } else {
                    let raw = _mm_loadu_si128(block.as_ptr().add(if KIND == 1 { 2 } else { 4 }) as *const __m128i);
                    let mask = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(raw, mask); // elements 0–15
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask); // elements 16–31
                    let off = _mm256_set1_ps(if KIND == 1 { 8.0 } else { 0.0 });
                    let f = |p: __m128i| _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(p)), off);
                    [f(lo), f(_mm_srli_si128(lo, 8)), f(hi), f(_mm_srli_si128(hi, 8))]
                };
                (dm, q)
            };
            let d = _mm256_set1_ps(dm[0]);
            for ((a, m), xr) in acc.iter_mut().zip(&mut mins).zip(x) {
                // SAFETY: 32b + 32 ≤ k = xr.x.len()
                let t = unsafe {
                    let xp = xr.x.as_ptr().add(32 * b);
                    let t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xp));
                    let t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xp.add(8)), t);
                    let t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xp.add(16)), t);
                    _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xp.add(24)), t)
                };
                *a = _mm256_fmadd_ps(d, t, *a);
                if KIND == 2 {
                    *m = dm[1].mul_add(xr.sums[b], *m);
                }
            }
        }
        let mut out = [0f32; X];
        for ((o, a), m) in out.iter_mut().zip(&acc).zip(&mins) {
            *o = hsum(*a) + m;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Blocks of `kind` quantized from a deterministic (n, k) weight, and their dequantized
    /// values as candle reads them.
    fn weight(kind: GgmlDType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let vals: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, kind).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (q.data().unwrap().to_vec(), deq)
    }

    #[test]
    fn products_are_the_dequantized_weights_times_the_inputs_and_rows_stay_independent() {
        let (n, k) = (131, 96);
        let row = |r: usize| -> Vec<f32> { (0..k).map(|j| ((r * 31 + j * 17) % 97) as f32 / 13.0 - 3.5).collect() };
        for kind in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let (blocks, deq) = weight(kind, n, k);
            let b = Blocks::of(kind).unwrap();
            let alone: Vec<Vec<f32>> =
                (0..6).map(|r| few_rows_times_qt(&row(r), 1, k, &blocks, b, n).unwrap()).collect();
            for m in 1..=6 {
                let x: Vec<f32> = (0..m).flat_map(row).collect();
                let y = few_rows_times_qt(&x, m, k, &blocks, b, n).unwrap();
                for (r, want) in alone.iter().enumerate().take(m) {
                    assert_eq!(&y[r * n..(r + 1) * n], want.as_slice(), "{kind:?}: row {r} of {m}");
                    for o in 0..n {
                        let terms = (0..k).map(|j| f64::from(deq[o * k + j]) * f64::from(x[r * k + j]));
                        let (exact, scale) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                        let got = f64::from(y[r * n + o]);
                        assert!((got - exact).abs() <= 1e-6 * (1.0 + scale), "{kind:?} ({r},{o}): {got} vs {exact}");
                    }
                }
            }
        }
        assert!(few_rows_times_qt(&[0.0; 48], 1, 48, &[0; 64], Blocks::Q8_0, 1).is_none(), "k not a multiple of 32");
    }

    #[test]
    fn the_scalar_path_computes_the_same_products() {
        let (n, k) = (9, 64);
        let x: Vec<f32> = (0..k).map(|j| (j as f32 * 0.37).sin() * 3.0).collect();
        let q = Row::new(&x);
        for kind in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let (blocks, _) = weight(kind, n, k);
            let b = Blocks::of(kind).unwrap();
            let fast = few_rows_times_qt(&x, 1, k, &blocks, b, n).unwrap();
            for (o, row) in blocks.chunks_exact(k / 32 * b.bytes()).enumerate() {
                let scalar = generic_dot(row, b, &q);
                assert!(
                    (scalar - fast[o]).abs() <= 1e-4 * (1.0 + fast[o].abs()),
                    "{kind:?} {o}: {scalar} vs {}",
                    fast[o]
                );
            }
        }
    }

    #[test]
    fn half_precision_scales_are_read_exactly() {
        let cases = [
            (0x3C00u16, 1.0f32),
            (0xC000, -2.0),
            (0x0001, 2f32.powi(-24)),
            (0x03FF, 1023.0 * 2f32.powi(-24)),
            (0x0400, 2f32.powi(-14)),
            (0x7BFF, 65504.0),
            (0x3555, 0.333_251_95),
            (0x8000, -0.0),
            (0x7C00, f32::INFINITY),
        ];
        for (bits, want) in cases {
            assert_eq!(f16(&bits.to_le_bytes(), 0).to_bits(), want.to_bits(), "{bits:#06x}");
        }
        assert!(f16(&0x7E00u16.to_le_bytes(), 0).is_nan());
    }
}
