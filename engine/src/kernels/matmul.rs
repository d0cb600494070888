//! `mm`: the kernels' matrix product, gemm on one thread per task, split over rayon's threads
//! by output columns (or rows, for a narrow output) when large enough; and the views it reads
//! ([`Mat`]) and writes ([`Out`]).

use super::pool::{claim_columns, run_tasks, threads_for};
use super::real::Real;

/// A matrix operand of [`mm`]: its first element and its row and column strides.
#[derive(Clone, Copy)]
pub(super) struct Mat<T> {
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
    pub(super) fn rows(v: &[T], cols: usize) -> Self {
        Mat { ptr: v.as_ptr(), rs: cols as isize, cs: 1 }
    }

    /// The transpose of a row-major (rows, cols) slice: (cols, rows).
    pub(super) fn t(v: &[T], cols: usize) -> Self {
        Mat { ptr: v.as_ptr(), rs: 1, cs: cols as isize }
    }
}

/// dst (m, n) row-major = beta · lhs (m, k) · rhs (k, n), added to dst when `acc`. Large enough
/// products are split over rayon's threads, each running gemm on one thread (gemm's own splitting
/// of a 256-row product scales poorly): by columns, in slices the threads claim as they go
/// ([`super::pool::claim_columns`]), or by rows when the output is too narrow to split (LoRA's rank-wide
/// products).
#[allow(clippy::too_many_arguments)] // gemm's own interface, reduced to what the kernels use
pub(super) fn mm<T: Real>(m: usize, n: usize, k: usize, dst: &mut [T], lhs: Mat<T>, rhs: Mat<T>, acc: bool, beta: T) {
    debug_assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    mm_split(threads_for(m * n * k), m, n, k, dst, lhs, rhs, acc, beta);
}

/// Guided slices of a split product are at least this many columns wide: each slice is a gemm
/// call of its own (its set-up, its pass over the whole m × k left operand), so a narrow slice
/// pays that set-up for little work (widths compared in bench/RESULTS.md).
pub(super) const MIN_COLUMNS: usize = 64;

/// A row-major (rows, n) output written by several tasks, each its own block.
#[derive(Clone, Copy)]
pub(super) struct Out<T> {
    ptr: *mut T,
    n: usize,
}

// SAFETY: tasks write disjoint blocks of the slice an Out is made from, which outlives them (each
// caller joins its tasks before returning the slice).
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T: Real> Out<T> {
    pub(super) fn new(v: &mut [T], n: usize) -> Self {
        Out { ptr: v.as_mut_ptr(), n }
    }

    /// This output as an operand, like [`Mat::rows`] (to be read only once it is written).
    pub(super) fn rows(self) -> Mat<T> {
        Mat { ptr: self.ptr.cast_const(), rs: self.n as isize, cs: 1 }
    }

    /// Its transpose, like [`Mat::t`] (to be read only once it is written).
    pub(super) fn t(self) -> Mat<T> {
        Mat { ptr: self.ptr.cast_const(), rs: 1, cs: self.n as isize }
    }

    /// Block rows r0..r0+nr, columns c0..c0+nc of this output = beta · lhs rows r0.. (k columns)
    /// · rhs columns c0.. (k rows), added to it when `acc`; gemm on the calling thread.
    ///
    /// # Safety
    /// The block lies inside the output and no other task touches it meanwhile; lhs rows
    /// r0..r0+nr and rhs columns c0..c0+nc lie inside the slices the views were made from.
    #[allow(clippy::too_many_arguments)] // a block and gemm's operands
    pub(super) unsafe fn gemm(
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
    // column-major (for x·Wᵀ the weight), and split by rows every thread would pack all of it
    // (as long as the products themselves, on two threads). By columns each thread
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

#[cfg(test)]
mod tests {
    use super::*;

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
