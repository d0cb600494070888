//! Causal (optionally sliding-window) grouped-query attention in one CPU op, with the
//! flash-attention backward: the forward keeps only the output and one log-sum-exp per query row;
//! the backward recomputes the probabilities block by block. No (B, H, T, S) tensor outlives a
//! call, and blocks above the diagonal are never computed.

use super::matmul::{mm, Mat};
use super::pool::as_task;
use super::real::{both, same, storage, with_cpu, Real};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per block: a block computes scores only for the keys its last row may see.
const BLOCK: usize = 64;

/// softmax(q·kᵀ/√D + mask)·v for q (B, H, L, D) at positions first..first+L over k, v
/// (B, K, S, D) (H a multiple of K; query head h reads kv head h / (H/K)) → (B, H, L, D). Query
/// position p sees key j when j ≤ p and, with a window w, p − j < w.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, first: usize, window: Option<usize>) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let (kb, kh, s, kd) = k.dims4()?;
    if kb != b || kd != d || k.dims() != v.dims() || kh == 0 || h % kh != 0 || first + l > s {
        return Err(candle_core::Error::Msg(format!(
            "attention: q {:?}, k {:?}, v {:?} and {first} earlier positions do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        ))
        .into());
    }
    let op = Attention { first, window, scale: 1.0 / (d as f64).sqrt(), lse: Mutex::new(None) };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    first: usize,
    window: Option<usize>,
    scale: f64,
    /// One log-sum-exp per query row (B·H·L), from the forward pass, for the backward.
    lse: Mutex<Option<Vec<f64>>>,
}

/// One backward task's dQ (L × D, its blocks' rows) and dK, dV partials (S × D each).
type Part<'a, T> = (&'a [T], &'a [T], &'a [T]);

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    kh: usize,
    l: usize,
    s: usize,
    d: usize,
}

impl Attention {
    /// The keys query row `i` may see: kmin..=kmax.
    fn visible(&self, i: usize) -> (usize, usize) {
        let p = self.first + i;
        (self.window.map_or(0, |w| (p + 1).saturating_sub(w)), p)
    }

    /// Keys a block of rows i0..i0+lb reads: [lo, hi).
    fn block_keys(&self, i0: usize, lb: usize) -> (usize, usize) {
        (self.visible(i0).0, self.visible(i0 + lb - 1).1 + 1)
    }

    /// Scores of rows i0..i0+lb over keys lo..hi into `sc` (lb × (hi−lo)), masked with −∞.
    #[allow(clippy::too_many_arguments)]
    fn scores<T: Real>(&self, sc: &mut [T], q: &[T], k: &[T], i0: usize, lb: usize, lo: usize, hi: usize, d: usize) {
        let nk = hi - lo;
        mm(lb, nk, d, sc, Mat::rows(&q[i0 * d..], d), Mat::t(&k[lo * d..], d), false, T::from_f64(self.scale));
        for r in 0..lb {
            let (a, b) = self.visible(i0 + r);
            let row = &mut sc[r * nk..(r + 1) * nk];
            for (j, x) in row.iter_mut().enumerate() {
                let key = lo + j;
                if key < a || key > b {
                    *x = T::NEG_INFINITY;
                }
            }
        }
    }

    /// Rows i0..i0+lb of one (b, h): writes their y (lb × D) and log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    /// `sc` is scratch for the block's scores (a task's, reused across its blocks).
    #[allow(clippy::too_many_arguments)]
    fn forward_block<T: Real>(
        &self,
        sc: &mut Vec<T>,
        y: &mut [T],
        lse: &mut [f64],
        q: &[T],
        k: &[T],
        v: &[T],
        i0: usize,
        lb: usize,
        d: usize,
    ) {
        let (lo, hi) = self.block_keys(i0, lb);
        let nk = hi - lo;
        sc.resize(lb * nk, T::ZERO); // every element is written below
        self.scores(sc, q, k, i0, lb, lo, hi, d);
        for (r, row) in sc.chunks_mut(nk).enumerate() {
            let max = T::max_of(row);
            T::exp_shifted(row, max);
            let sum = T::sum_f64(row);
            let inv = T::from_f64(1.0 / sum);
            for x in row.iter_mut() {
                *x *= inv;
            }
            lse[r] = max.to_f64() + sum.ln();
        }
        mm(lb, d, nk, y, Mat::rows(sc, nk), Mat::rows(&v[lo * d..], d), false, T::ONE);
    }

    /// The query blocks `blocks` (first rows) of one (b, h): their rows of dQ (L × D) into `dq`,
    /// and their share of dK, dV (S × D each). `p`, `dp` are scratch (a task's, reused).
    #[allow(clippy::too_many_arguments)]
    fn backward_blocks<T: Real>(
        &self,
        (p, dp): &mut (Vec<T>, Vec<T>),
        blocks: &[usize],
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
        g: &[T],
        y: &[T],
        lse: &[f64],
        q: &[T],
        k: &[T],
        v: &[T],
        dm: Dims,
    ) {
        let Dims { l, d, .. } = dm;
        let scale = T::from_f64(self.scale);
        for &i0 in blocks {
            let lb = BLOCK.min(l - i0);
            let (lo, hi) = self.block_keys(i0, lb);
            let nk = hi - lo;
            p.resize(lb * nk, T::ZERO);
            dp.resize(lb * nk, T::ZERO);
            // P = exp(scores − lse), 0 where masked
            self.scores(p, q, k, i0, lb, lo, hi, d);
            for r in 0..lb {
                T::exp_shifted(&mut p[r * nk..(r + 1) * nk], T::from_f64(lse[i0 + r]));
            }
            let gb = &g[i0 * d..(i0 + lb) * d];
            // dV += Pᵀ·dY
            mm(nk, d, lb, &mut dv[lo * d..hi * d], Mat::t(p, nk), Mat::rows(gb, d), true, T::ONE);
            // dP = dY·Vᵀ
            mm(lb, nk, d, dp, Mat::rows(gb, d), Mat::t(&v[lo * d..], d), false, T::ONE);
            // dS = P ∘ (dP − rowsum(dY ∘ Y)), kept in dp
            for r in 0..lb {
                let row = (i0 + r) * d..(i0 + r + 1) * d;
                let di: T = g[row.clone()].iter().zip(&y[row]).map(|(&a, &b)| a * b).sum();
                for (x, &pv) in dp[r * nk..(r + 1) * nk].iter_mut().zip(&p[r * nk..(r + 1) * nk]) {
                    *x = pv * (*x - di);
                }
            }
            // dQ = scale·dS·K ; dK += scale·dSᵀ·Q
            mm(lb, d, nk, &mut dq[i0 * d..(i0 + lb) * d], Mat::rows(dp, nk), Mat::rows(&k[lo * d..], d), false, scale);
            mm(nk, d, lb, &mut dk[lo * d..hi * d], Mat::t(dp, nk), Mat::rows(&q[i0 * d..], d), true, scale);
        }
    }

    fn dims(ql: &Layout, kl: &Layout) -> candle_core::Result<(usize, Dims)> {
        let (b, h, l, d) = ql.shape().dims4()?;
        let (_, kh, s, _) = kl.shape().dims4()?;
        Ok((b, Dims { h, kh, l, s, d }))
    }

    fn run_forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], b: usize, dm: Dims) -> (Vec<T>, Vec<f64>) {
        let Dims { h, kh, l, s, d } = dm;
        let n = h / kh;
        let mut y = vec![T::ZERO; b * h * l * d];
        let mut lse = vec![0f64; b * h * l];
        // one task per (b, h) and block of query rows: blocks are independent in the forward
        // pass, and later blocks see more keys, so many uneven tasks balance where the heads
        // alone (9 on 2 threads) did not
        y.par_chunks_mut(l * d).zip(lse.par_chunks_mut(l)).enumerate().for_each(|(bh, (y, lse))| {
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * kh + hi / n) * s * d;
            let (q, k, v) = (&q[bh * l * d..(bh + 1) * l * d], &k[kv..kv + s * d], &v[kv..kv + s * d]);
            y.par_chunks_mut(BLOCK * d).zip(lse.par_chunks_mut(BLOCK)).enumerate().for_each_init(
                Vec::new,
                |sc, (blk, (y, lse))| {
                    as_task(|| self.forward_block(sc, y, lse, q, k, v, blk * BLOCK, lse.len(), d));
                },
            );
        });
        (y, lse)
    }

    /// The query blocks (first rows) split into groups of about equal work (rows × keys read),
    /// enough groups that B·H·groups tasks keep `threads` busy to the end.
    fn block_groups(&self, l: usize, heads: usize, threads: usize) -> Vec<Vec<usize>> {
        let blocks: Vec<usize> = (0..l).step_by(BLOCK).collect();
        let want = if threads > 1 { (8 * threads).div_ceil(heads) } else { 1 };
        let n = want.clamp(1, blocks.len().max(1));
        let work = |&i0: &usize| {
            let lb = BLOCK.min(l - i0);
            let (lo, hi) = self.block_keys(i0, lb);
            lb * (hi - lo)
        };
        let mut by_work = blocks.clone();
        by_work.sort_by_key(|b| std::cmp::Reverse(work(b)));
        let mut groups = vec![(0usize, Vec::new()); n];
        for b in by_work {
            let Some(g) = groups.iter_mut().min_by_key(|g| g.0) else { break };
            g.0 += work(&b);
            g.1.push(b);
        }
        groups
            .into_iter()
            .map(|(_, mut g)| {
                g.sort_unstable();
                g
            })
            .filter(|g| !g.is_empty())
            .collect()
    }

    /// (dq, dk, dv) stacked into one buffer: B·H·L·D, then B·K·S·D twice.
    #[allow(clippy::too_many_arguments)]
    fn run_backward<T: Real>(
        &self,
        g: &[T],
        y: &[T],
        lse: &[f64],
        q: &[T],
        k: &[T],
        v: &[T],
        b: usize,
        dm: Dims,
    ) -> Vec<T> {
        let Dims { h, kh, l, s, d } = dm;
        let n = h / kh;
        // dK and dV sum over query blocks, so the backward pass cannot split a head by blocks
        // without partial sums: one task per (b, h) and group of blocks, each with its own
        // dQ rows and dK, dV partials, summed below
        let groups = self.block_groups(l, b * h, rayon::current_num_threads());
        let ng = groups.len();
        // the tasks' partials in one buffer, allocated here (tasks allocating their own at the
        // same moment waited on the allocator's lock), and each task's scratch reused
        let per = l * d + 2 * s * d;
        let mut buf = vec![T::ZERO; b * h * ng * per];
        buf.par_chunks_mut(per).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |scratch, (unit, part)| {
                let (bh, gi) = (unit / ng, unit % ng);
                let (bi, hi) = (bh / h, bh % h);
                let kv = (bi * kh + hi / n) * s * d;
                let (dq, dkv) = part.split_at_mut(l * d);
                let (dk, dv) = dkv.split_at_mut(s * d);
                let head = bh * l * d..(bh + 1) * l * d;
                as_task(|| {
                    self.backward_blocks(
                        scratch,
                        &groups[gi],
                        dq,
                        dk,
                        dv,
                        &g[head.clone()],
                        &y[head.clone()],
                        &lse[bh * l..(bh + 1) * l],
                        &q[head],
                        &k[kv..kv + s * d],
                        &v[kv..kv + s * d],
                        dm,
                    )
                });
            },
        );
        let parts: Vec<Part<T>> = buf
            .chunks(per)
            .map(|part| {
                let (dq, dkv) = part.split_at(l * d);
                let (dk, dv) = dkv.split_at(s * d);
                (dq, dk, dv)
            })
            .collect();
        let (nq, nkv) = (b * h * l * d, b * kh * s * d);
        let mut out = vec![T::ZERO; nq + 2 * nkv];
        let (dq, rest) = out.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nkv);
        // dQ of (b, h): its groups' rows; dK, dV of (b, kv head): every group of its n heads
        dq.par_chunks_mut(l * d).enumerate().for_each(|(bh, out)| {
            for &(part, ..) in &parts[bh * ng..(bh + 1) * ng] {
                for (o, &x) in out.iter_mut().zip(part) {
                    *o += x;
                }
            }
        });
        let sum_kv = |out: &mut [T], bk: usize, pick: &(dyn for<'a> Fn(&Part<'a, T>) -> &'a [T] + Sync)| {
            let (bi, ki) = (bk / kh, bk % kh);
            let first = bi * h + ki * n; // heads ki·n.. read kv head ki
            for part in &parts[first * ng..(first + n) * ng] {
                for (o, &x) in out.iter_mut().zip(pick(part)) {
                    *o += x;
                }
            }
        };
        dk.par_chunks_mut(s * d).enumerate().for_each(|(bk, out)| sum_kv(out, bk, &|p| p.1));
        dv.par_chunks_mut(s * d).enumerate().for_each(|(bk, out)| sum_kv(out, bk, &|p| p.2));
        out
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, dm) = Self::dims(ql, kl)?;
        let (y, lse) = both!(self.name(), q, ql, |q, T| {
            let (k, v) = (same::<T>(k, kl, self.name())?, same::<T>(v, vl, self.name())?);
            let (y, lse) = self.run_forward::<T>(q, k, v, b, dm);
            (storage(y), lse)
        });
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        Ok((y, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| candle_core::Error::Msg("fused-attention: backward before forward".into()))?;
        let (b, h, l, d) = q.dims4()?;
        let (_, kh, s, _) = k.dims4()?;
        let dm = Dims { h, kh, l, s, d };
        let (q, k, v, res, g) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, res.contiguous()?, g.contiguous()?);
        macro_rules! go {
            ($t:ty) => {
                with_cpu::<$t, _>(&g, "fused-attention", |g| {
                    with_cpu::<$t, _>(&res, "fused-attention", |y| {
                        with_cpu::<$t, _>(&q, "fused-attention", |qs| {
                            with_cpu::<$t, _>(&k, "fused-attention", |ks| {
                                with_cpu::<$t, _>(&v, "fused-attention", |vs| {
                                    Ok(self.run_backward::<$t>(g, y, &lse, qs, ks, vs, b, dm))
                                })
                            })
                        })
                    })
                })?
            };
        }
        let dev = q.device().clone();
        let (nq, nkv) = (b * h * l * d, b * kh * s * d);
        let all = match q.dtype() {
            DType::F32 => Tensor::from_vec(go!(f32), nq + 2 * nkv, &dev)?,
            DType::F64 => Tensor::from_vec(go!(f64), nq + 2 * nkv, &dev)?,
            dt => candle_core::bail!("fused-attention: {dt:?} is not fused"),
        };
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nkv)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nkv, nkv)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check, randn};
    use super::*;
    use candle_core::{Device, Var, D};

    /// Softmax over the last dim from differentiable ops (the model's composed form).
    fn softmax_last_dim(x: &Tensor) -> Tensor {
        let neg_max = x.max_keepdim(D::Minus1).unwrap().detach().neg().unwrap();
        let e = super::super::frozen::add_const(x, &neg_max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
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
        let probs = softmax_last_dim(&scores.broadcast_add(&mask).unwrap());
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
}
