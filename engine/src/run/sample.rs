//! `sample`: KV-cache generation from the run's current weights.
//!
//! One prefill of the prompt (batch 1) is shared by all `num_samples` sequences, which then
//! decode as one batch. Reported logprobs are the model's own (temperature 1, unfiltered), so
//! they equal what `forward` gives for the same sequence.
//!
//! Each step picks one token per sequence with one seeded uniform, drawn in sequence order.
//! Where the picks are made follows the device: on the CPU the rows of logits are scored on the
//! host ([`choose`]); on a GPU the same picks are made where the logits are ([`device_picks`]),
//! and only block sums or a few candidates per row cross to the host, never a vocabulary-sized
//! row. Prompt logprobs go through the head in chunks of positions, one number per position to
//! the host.

use super::decode::Decoder;
use super::Run;
use crate::batch::check_tokens;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{KvCache, Model};
use candle_core::{DType, Device, Tensor, D};
use hearth_api::{LoraConfig, SampleInput, SampleOutput, SamplingParams, TrainingConfig};
use rayon::prelude::*;

/// Most sequences one call may generate.
pub const MAX_SAMPLES: usize = 256;

/// Columns per sort on the device: candle's CUDA sort is one bitonic sort per row in shared
/// memory, so a vocabulary-wide row is sorted as blocks of this many.
const SORT_BLOCK: usize = 4096;
/// Most candidates the device selects per row: keeping at most half of each block at least
/// halves the width every round of block sorts.
const MAX_CANDIDATES: usize = SORT_BLOCK / 2;
/// Candidates a nucleus over the whole vocabulary tries first (then [`MAX_CANDIDATES`]).
const NUCLEUS_FIRST: usize = 256;
/// Weights summed per block for a draw from the whole vocabulary.
const SUM_BLOCK: usize = 512;

/// Where a step's picks are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Picking {
    /// Whole rows of logits to the host, scored by [`choose`].
    Host,
    /// On the logits' device by [`device_picks`]: the same tokens, small transfers.
    Device,
}

impl Picking {
    /// The host for a model on the CPU (its rows are already in host memory), the device
    /// otherwise.
    pub(super) fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Picking::Host
        } else {
            Picking::Device
        }
    }
}
fn validate(p: &SamplingParams, num_samples: usize) -> Result<()> {
    let bad = |field: &'static str, value: String, reason: &'static str| {
        Err(EngineError::InvalidParam { field, value, reason })
    };
    if num_samples == 0 || num_samples > MAX_SAMPLES {
        return bad("num_samples", num_samples.to_string(), "must be between 1 and 256");
    }
    if p.max_tokens == 0 {
        return bad("max_tokens", "0".into(), "must be at least 1");
    }
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return bad("temperature", p.temperature.to_string(), "must be finite and non-negative");
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad("top_p", p.top_p.to_string(), "must be in (0, 1]");
    }
    Ok(())
}

/// A step's logits (n, V), padded to whole sort blocks, are one tensor: past 2³² − 1 elements
/// candle's CUDA kernels would index them wrongly, so such a call is refused. (Prompt logits are
/// chunked by position; one position's row fits whenever a step's rows do.)
fn check_step_size(num_samples: usize, vocab: usize) -> Result<()> {
    if num_samples as u64 * (vocab.div_ceil(SORT_BLOCK) * SORT_BLOCK) as u64 > crate::recompute::MAX_GPU_TENSOR_ELEMENTS
    {
        return Err(EngineError::InvalidParam {
            field: "num_samples",
            value: format!("{num_samples} (vocab_size {vocab})"),
            reason: "num_samples × vocab_size exceeds 2^32 logits per step, more than candle's 32-bit CUDA indexing addresses",
        });
    }
    Ok(())
}

/// log Σ exp(row): the normaliser of the model's own (temperature-1) distribution.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32 + max
}

/// The `k` highest-scoring token ids, best first (ties broken by the lower id).
fn top(row: &[f32], k: usize) -> Vec<u32> {
    let by_score = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k, by_score);
        ids.truncate(k);
    }
    ids.sort_unstable_by(by_score);
    ids
}

/// Draws one id from `ids` with unnormalised `weights` (same order), `u` uniform in [0, 1).
fn draw(ids: &[u32], weights: &[f64], u: f64) -> u32 {
    let mut u = u * weights.iter().sum::<f64>();
    for (&id, w) in ids.iter().zip(weights) {
        u -= w;
        if u < 0.0 {
            return id;
        }
    }
    ids.last().copied().unwrap_or(0)
}

/// The tempered weight of logit `x` in a row whose largest is `max`: exp((x − max)/T), the
/// quotient in f32 and the exponential in f64, as every pick computes it.
fn weight(x: f32, max: f32, temperature: f32) -> f64 {
    (((x - max) / temperature) as f64).exp()
}

/// The nucleus pick among candidates best first (`ids`, their `weights`): a draw from the
/// shortest prefix holding `top_p` of `total`; all of them when none does and `complete` (no
/// candidate is left out), else `None` (the caller widens).
fn nucleus(ids: &[u32], weights: &[f64], total: f64, top_p: f32, complete: bool, u: f64) -> Option<u32> {
    let mut acc = 0.0;
    for (n, w) in weights.iter().enumerate() {
        acc += w / total;
        if acc >= top_p as f64 {
            return Some(draw(&ids[..=n], &weights[..=n], u));
        }
    }
    complete.then(|| draw(ids, weights, u))
}

/// Picks a token from one row of logits: greedy at temperature 0, otherwise from the tempered
/// distribution restricted to the `top_k` best and then to the smallest prefix (best first)
/// holding `top_p` of the remaining mass. Only the candidates are sorted, never the whole
/// vocabulary (a full sort per token was most of the sampling cost at batch 8). `u` is the one
/// uniform draw a tempered pick uses (greedy ignores it).
fn choose(row: &[f32], p: &SamplingParams, u: f64) -> u32 {
    if p.temperature == 0.0 {
        return row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(i, _)| i as u32);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |x: f32| weight(x, max, p.temperature);
    let vocab = row.len();
    let k = if p.top_k == 0 { vocab } else { p.top_k.min(vocab) };
    if p.top_p >= 1.0 {
        if k == vocab {
            let weights: Vec<f64> = row.iter().map(|&x| weight(x)).collect();
            let ids: Vec<u32> = (0..vocab as u32).collect();
            return draw(&ids, &weights, u);
        }
        let ids = top(row, k);
        let weights: Vec<f64> = ids.iter().map(|&i| weight(row[i as usize])).collect();
        return draw(&ids, &weights, u);
    }
    // Nucleus: the mass is over the top-k set; widen the sorted prefix until it holds top_p.
    let total: f64 = if k == vocab {
        row.iter().map(|&x| weight(x)).sum()
    } else {
        top(row, k).iter().map(|&i| weight(row[i as usize])).sum()
    };
    let mut width = k.min(256);
    loop {
        let ids = top(row, width);
        let weights: Vec<f64> = ids.iter().map(|&i| weight(row[i as usize])).collect();
        if let Some(id) = nucleus(&ids, &weights, total, p.top_p, width == k, u) {
            return id;
        }
        width = (width * 8).min(k);
    }
}

/// [`choose`] at temperature > 0 over the best candidates of a row, best first as [`top`]
/// ranks them (`xs`, their logits): all `min(top_k, V)` of a top-k cut, or the first few of the
/// whole vocabulary for a nucleus over it, `total` then being the whole row's tempered mass.
/// The same code as [`choose`] on the same candidates, so the same pick. Returns the pick's
/// index among the candidates; `None` when the nucleus needs more of them than `xs` holds.
fn choose_among(xs: &[f32], p: &SamplingParams, vocab: usize, total: Option<f64>, u: f64) -> Option<usize> {
    let max = *xs.first()?;
    let weights: Vec<f64> = xs.iter().map(|&x| weight(x, max, p.temperature)).collect();
    let at: Vec<u32> = (0..xs.len() as u32).collect();
    if p.top_p >= 1.0 {
        return Some(draw(&at, &weights, u) as usize);
    }
    let (total, complete) = match total {
        Some(total) => (total, xs.len() == vocab),
        None => (weights.iter().sum(), true),
    };
    nucleus(&at, &weights, total, p.top_p, complete, u).map(|i| i as usize)
}

/// Greedy picks of logits (n, V) on their device: the highest logit of each row (the lowest id
/// among equal ones, as [`choose`] does) and its log-probability.
fn greedy_picks(logits: &Tensor) -> Result<Vec<(u32, f32)>> {
    let (_n, v) = logits.dims2()?;
    let max = logits.max_keepdim(D::Minus1)?; // (n,1)
                                              // lowest id among the maxima: ids where the row equals its max, others pushed past the end
    let ids = Tensor::arange(0u32, v as u32, logits.device())?.to_dtype(DType::F32)?.unsqueeze(0)?; // (1,V)
    let at_max = logits.broadcast_eq(&max)?; // (n,V) u8
    let beyond = Tensor::full(v as f32, logits.shape(), logits.device())?;
    let first = at_max.where_cond(&ids.broadcast_as(logits.shape())?, &beyond)?.min_keepdim(D::Minus1)?; // (n,1)
    let lse = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?; // (n,1), relative to max
    let ids: Vec<f32> = first.squeeze(1)?.to_vec1()?;
    let logprobs: Vec<f32> = lse.neg()?.squeeze(1)?.to_vec1()?;
    Ok(ids.into_iter().map(|i| i as u32).zip(logprobs).collect())
}

/// The rows of `logits` (R, V) that `rows` (one per pick) name, and each pick's row among
/// them: rows no pick uses (finished sequences) are dropped before anything is scored.
fn used_rows(logits: &Tensor, rows: &[usize]) -> Result<(Tensor, Vec<usize>)> {
    let mut used = rows.to_vec();
    used.sort_unstable();
    used.dedup();
    if used.len() == logits.dim(0)? {
        return Ok((logits.clone(), rows.to_vec()));
    }
    let ids: Vec<u32> = used.iter().map(|&r| r as u32).collect();
    let kept = logits.index_select(&Tensor::new(ids.as_slice(), logits.device())?, 0)?; // (R,V) -> (R',V)
    Ok((kept, rows.iter().map(|r| used.binary_search(r).unwrap_or(0)).collect()))
}

/// Picks for `rows` of `logits` (R, V) f32 with whole rows on the host ([`choose`]); `us` holds
/// one uniform per pick.
fn host_picks(logits: &Tensor, rows: &[usize], us: &[f64], p: &SamplingParams) -> Result<Vec<(u32, f32)>> {
    let host: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows
        .par_iter()
        .zip(us)
        .map(|(&r, &u)| {
            let row = &host[r];
            let tok = choose(row, p, u);
            (tok, row[tok as usize] - log_sum_exp(row))
        })
        .collect())
}

/// `x` (R, W) widened to `width` columns of `value`.
fn pad_columns(x: &Tensor, width: usize, value: f32) -> Result<Tensor> {
    let (r, w) = x.dims2()?;
    if w == width {
        return Ok(x.clone());
    }
    let fill = Tensor::full(value, (r, width - w), x.device())?.to_dtype(x.dtype())?;
    Ok(Tensor::cat(&[x, &fill], 1)?) // (R,W) -> (R,width)
}

/// log Σ exp(x) of each row of `x` (R, V) whose largest are `max` (R, 1), as [`log_sum_exp`]
/// computes it (exponentials and sum in f64) → (R, 1) f32.
fn log_normalisers(x: &Tensor, max: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_sub(max)?
        .to_dtype(DType::F64)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .to_dtype(DType::F32)?
        .broadcast_add(max)?)
}

/// [`weight`] of every logit of `x` (R, W) → (R, W) f64. The quotient is taken in f64 and
/// rounded once to f32: that is the correctly rounded f32 quotient (f64 carries more than
/// 2·24 + 2 bits), whatever the device's own f32 division does (fast-math CUDA's is not exact).
fn tempered(x: &Tensor, max: &Tensor, temperature: f32) -> Result<Tensor> {
    let t = Tensor::new(&[temperature as f64], x.device())?;
    Ok(x.broadcast_sub(max)?
        .to_dtype(DType::F64)?
        .broadcast_div(&t)?
        .to_dtype(DType::F32)?
        .to_dtype(DType::F64)?
        .exp()?)
}

/// The `m` (≤ [`MAX_CANDIDATES`]) largest keys of each row of `keys` (R, W) f32, largest
/// first, and their columns (R, m) u32. Rows are sorted in blocks of [`SORT_BLOCK`] columns
/// (padded with `pad`, below every real key); each block keeps its `m` largest, until one block
/// is left. An element among a row's m largest is among its block's, so nothing is lost; the
/// sort is unstable, so among equal keys which columns come back is arbitrary.
fn keep_largest(keys: &Tensor, m: usize, pad: f32) -> Result<(Tensor, Tensor)> {
    let (r, mut width) = keys.dims2()?;
    let mut keys = keys.clone();
    let mut cols: Option<Tensor> = None; // None: column j still holds key j
    loop {
        let blocks = width.div_ceil(SORT_BLOCK);
        let w = if blocks == 1 { width } else { SORT_BLOCK };
        let keep = m.min(w);
        let blocked = pad_columns(&keys, blocks * w, pad)?.reshape((r * blocks, w))?; // (R,nb·B) -> (R·nb,B)
        let (sorted, order) = blocked.sort_last_dim(false)?;
        let order = order.narrow(1, 0, keep)?.contiguous()?; // (R·nb,keep): positions in the block
        let found = match cols {
            None if blocks == 1 => order,
            None => {
                let starts = Tensor::arange_step(0u32, (blocks * SORT_BLOCK) as u32, SORT_BLOCK as u32, keys.device())?; // (nb)
                let starts = starts.unsqueeze(0)?.broadcast_as((r, blocks))?.contiguous()?.reshape((r * blocks, 1))?; // (R,nb) -> (R·nb,1)
                order.broadcast_add(&starts)?
            }
            Some(c) => pad_columns(&c, blocks * w, 0.0)?.reshape((r * blocks, w))?.gather(&order, 1)?,
        };
        keys = sorted.narrow(1, 0, keep)?.reshape((r, blocks * keep))?; // (R·nb,keep) -> (R,nb·keep)
        let found = found.reshape((r, blocks * keep))?; // (R·nb,keep) -> (R,nb·keep)
        if blocks == 1 {
            return Ok((keys, found));
        }
        cols = Some(found);
        width = blocks * keep;
    }
}

/// The `m` (≤ [`MAX_CANDIDATES`], ≤ V) best candidates of each row of `logits` (R, V) as
/// [`top`] ranks them (higher logit first, the lower id among equal ones), on the device:
/// (ids as f32, logits), (R, m) each, in no particular order.
///
/// An unstable sort gets the values of the m largest right but not which of equal ones it
/// keeps, so ties are settled by a second selection over distinct keys: first τ, the m-th
/// largest logit of each row; then the m largest of key = class·V + (V − 1 − id), class 2 for
/// logits above τ, 1 at τ, 0 below. Those are every logit above τ and the lowest ids at τ. The
/// keys are integers below 3V ≤ 2²⁴, exact in f32, and distinct, so the sort has no ties.
fn best(logits: &Tensor, m: usize) -> Result<(Tensor, Tensor)> {
    let (_r, vocab) = logits.dims2()?;
    let (largest, _) = keep_largest(logits, m, f32::NEG_INFINITY)?; // (R,m)
    let tau = largest.narrow(1, m - 1, 1)?.contiguous()?; // (R,1)
    let above = logits.broadcast_gt(&tau)?.to_dtype(DType::F32)?.affine(2.0, 0.0)?;
    let class = (above + logits.broadcast_eq(&tau)?.to_dtype(DType::F32)?)?; // (R,V) in {0,1,2}
    let rank =
        Tensor::arange(0u32, vocab as u32, logits.device())?.to_dtype(DType::F32)?.affine(-1.0, (vocab - 1) as f64)?; // (V): V−1−id
    let keys = class.affine(vocab as f64, 0.0)?.broadcast_add(&rank.unsqueeze(0)?)?; // (R,V)
    let (_, ids) = keep_largest(&keys, m, -1.0)?; // (R,m)
    Ok((ids.to_dtype(DType::F32)?, logits.gather(&ids, 1)?))
}

/// Draws from the whole tempered vocabulary as [`draw`] does over all ids, for `rows` of
/// `logits` (R, V) with uniforms `us`: the weights' sums over blocks of [`SUM_BLOCK`] ids go to
/// the host, which walks them to the block each uniform lands in; that block's logits come
/// next, and the walk ends within it exactly as [`draw`] walks.
///
/// The device adds up each block in its own order, so the running sum can differ from the
/// host's sequential one in the last bits of an f64 (about 1e-16 relative): a uniform landing
/// that close to the boundary between two tokens may pick the neighbour instead.
fn full_picks(logits: &Tensor, rows: &[usize], us: &[f64], temperature: f32) -> Result<Vec<(u32, f32)>> {
    let (r, vocab) = logits.dims2()?;
    let nb = vocab.div_ceil(SUM_BLOCK);
    let padded = pad_columns(logits, nb * SUM_BLOCK, f32::NEG_INFINITY)?; // (R,V) -> (R,nb·S): weight 0
    let max = logits.max_keepdim(1)?; // (R,1)
    let sums = tempered(&padded, &max, temperature)?.reshape((r, nb, SUM_BLOCK))?.sum(2)?; // (R,nb·S) -> (R,nb,S) -> (R,nb)
    let lse = log_normalisers(logits, &max)?;
    let stats: Vec<Vec<f64>> =
        Tensor::cat(&[&sums, &lse.to_dtype(DType::F64)?, &max.to_dtype(DType::F64)?], 1)?.to_vec2()?; // (R,nb+2)
                                                                                                      // (block, what is left of u·total where it starts); None past the last block, where draw
                                                                                                      // falls back to the last id
    let landing: Vec<(usize, Option<f64>)> = rows
        .iter()
        .zip(us)
        .map(|(&row, &u)| {
            let sums = &stats[row][..nb];
            let mut rest = u * sums.iter().sum::<f64>();
            for (b, &s) in sums.iter().enumerate() {
                if rest - s < 0.0 {
                    return (b, Some(rest));
                }
                rest -= s;
            }
            (nb - 1, None)
        })
        .collect();
    let at: Vec<u32> = rows.iter().zip(&landing).map(|(&row, &(b, _))| (row * nb + b) as u32).collect();
    let at = Tensor::new(at.as_slice(), logits.device())?;
    let blocks: Vec<Vec<f32>> = padded.reshape((r * nb, SUM_BLOCK))?.index_select(&at, 0)?.to_vec2()?; // (picks,S)
    Ok(rows
        .iter()
        .zip(landing)
        .zip(blocks)
        .map(|((&row, (b, rest)), xs)| {
            let (lse, max) = (stats[row][nb] as f32, stats[row][nb + 1] as f32);
            let i = match rest {
                None => vocab - 1 - b * SUM_BLOCK,
                Some(mut rest) => {
                    // past the block's end by rounding: its last token with any weight
                    let mut last = 0;
                    let mut hit = None;
                    for (i, &x) in xs.iter().enumerate() {
                        let w = weight(x, max, temperature);
                        if w > 0.0 {
                            last = i;
                        }
                        rest -= w;
                        if rest < 0.0 {
                            hit = Some(i);
                            break;
                        }
                    }
                    hit.unwrap_or(last)
                }
            };
            ((b * SUM_BLOCK + i) as u32, xs[i] - lse)
        })
        .collect())
}

/// Picks for `rows` of `logits` (R, V) f32 on their device: the tokens [`choose`] gives for the
/// same uniforms `us` (one per pick), with small transfers to the host.
///
/// - Temperature 0: [`greedy_picks`], two numbers per row.
/// - The whole vocabulary: [`full_picks`], one f64 per block of 512 ids, then 512 logits.
/// - `top_k` up to [`MAX_CANDIDATES`], with or without `top_p`: the `top_k` best candidates of
///   each row ([`best`]), finished on the host by [`choose_among`].
/// - `top_p` over the whole vocabulary: the best [`NUCLEUS_FIRST`], then [`MAX_CANDIDATES`],
///   with the row's mass summed on the device (in its own order: see [`full_picks`]).
///
/// Left to whole rows on the host: `top_k` above [`MAX_CANDIDATES`] (and below V), the rows
/// whose nucleus needs more than [`MAX_CANDIDATES`] candidates, and vocabularies past 2²⁴/3
/// (where [`best`]'s keys stop being exact in f32). Logits of ±0 are equal on the device and
/// ordered on the host, and NaN logits are ordered differently: neither occurs in practice.
fn device_picks(logits: &Tensor, rows: &[usize], us: &[f64], p: &SamplingParams) -> Result<Vec<(u32, f32)>> {
    if p.temperature == 0.0 {
        let picks = greedy_picks(logits)?;
        return Ok(rows.iter().map(|&r| picks[r]).collect());
    }
    let (_r, vocab) = logits.dims2()?;
    let k = if p.top_k == 0 { vocab } else { p.top_k.min(vocab) };
    if k == vocab && p.top_p >= 1.0 {
        return full_picks(logits, rows, us, p.temperature);
    }
    if 3 * vocab > 1 << 24 || (k < vocab && k > MAX_CANDIDATES) {
        return host_picks(logits, rows, us, p);
    }
    let widths = if k < vocab { vec![k] } else { vec![NUCLEUS_FIRST.min(vocab), MAX_CANDIDATES.min(vocab)] };
    let mut picks = vec![(0, 0.0); rows.len()];
    // (pick, its row in `part`) of the picks still to make
    let mut pending: Vec<(usize, usize)> = rows.iter().copied().enumerate().collect();
    let mut part = logits.clone();
    for m in widths {
        let max = part.max_keepdim(1)?; // (R,1)
        let (ids, xs) = best(&part, m)?;
        let found: Vec<Vec<f32>> = Tensor::cat(&[&ids, &xs, &log_normalisers(&part, &max)?], 1)?.to_vec2()?; // (R,2m+1)
        let totals: Option<Vec<f64>> =
            if k == vocab { Some(tempered(&part, &max, p.temperature)?.sum(1)?.to_vec1()?) } else { None };
        let mut left = Vec::new();
        for (j, r) in pending {
            let (ids, rest) = found[r].split_at(m);
            let (xs, lse) = rest.split_at(m);
            // the candidates as `top` orders them
            let mut cands: Vec<(u32, f32)> = ids.iter().zip(xs).map(|(&id, &x)| (id as u32, x)).collect();
            cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let xs: Vec<f32> = cands.iter().map(|c| c.1).collect();
            match choose_among(&xs, p, vocab, totals.as_ref().map(|t| t[r]), us[j]) {
                Some(i) => picks[j] = (cands[i].0, cands[i].1 - lse[0]),
                None => left.push((j, r)),
            }
        }
        if left.is_empty() {
            return Ok(picks);
        }
        let (kept, at) = used_rows(&part, &left.iter().map(|&(_, r)| r).collect::<Vec<_>>())?;
        part = kept;
        pending = left.iter().zip(at).map(|(&(j, _), r)| (j, r)).collect();
    }
    let (rows, us): (Vec<usize>, Vec<f64>) = pending.iter().map(|&(j, r)| (r, us[j])).unzip();
    for (&(j, _), pick) in pending.iter().zip(host_picks(&part, &rows, &us, p)?) {
        picks[j] = pick;
    }
    Ok(picks)
}

/// Picks for `rows` (one per pick) of a step's `logits` (R, V) f32, where `picking` says.
pub(super) fn pick(
    logits: &Tensor,
    rows: &[usize],
    us: &[f64],
    p: &SamplingParams,
    picking: Picking,
) -> Result<Vec<(u32, f32)>> {
    let (logits, rows) = used_rows(logits, rows)?;
    match picking {
        Picking::Host => host_picks(&logits, &rows, us, p),
        Picking::Device => device_picks(&logits, &rows, us, p),
    }
}

/// Log-probabilities of the prompt's tokens (none for the first) from its final hidden states
/// `hidden` (1, P, C), and the last position's logits (1, V) f32 for the first pick. The head
/// runs over chunks of positions holding at most `head_elements` logits (one position at
/// least), and one number per position crosses to the host.
fn score_prompt(model: &Model, hidden: &Tensor, prompt: &[u32]) -> Result<(Vec<Option<f32>>, Tensor)> {
    let (_b, len, _c) = hidden.dims3()?;
    let chunk = model.chunking().head_positions(1, len, model.config().vocab_size);
    let mut logprobs = vec![None];
    let mut last = None;
    for s in (0..len).step_by(chunk) {
        let n = chunk.min(len - s);
        let logits = model.head(&hidden.narrow(1, s, n)?)?.squeeze(0)?.to_dtype(DType::F32)?; // (1,n,C) -> (1,n,V) -> (n,V)
        let scored = n.min(len - 1 - s); // positions with a next prompt token
        if scored > 0 {
            let part = logits.narrow(0, 0, scored)?;
            let lse = log_normalisers(&part, &part.max_keepdim(1)?)?; // (scored,1)
            let next = Tensor::new(&prompt[s + 1..s + 1 + scored], logits.device())?.unsqueeze(1)?; // (scored,1)
            let lp: Vec<f32> = (part.gather(&next, 1)? - lse)?.squeeze(1)?.to_vec1()?;
            logprobs.extend(lp.into_iter().map(Some));
        }
        if s + n == len {
            last = Some(logits.narrow(0, n - 1, 1)?);
        }
    }
    let last =
        last.ok_or(EngineError::InvalidParam { field: "prompt", value: "[]".into(), reason: "must not be empty" })?;
    Ok((logprobs, last))
}

/// One sequence's new token in a step: (sequence, token, logprob).
pub type Picked = (usize, u32, f32);

/// Checks a sampling request against the model before anything runs.
pub(super) fn validate_request(cfg: &ModelConfig, input: &SampleInput) -> Result<()> {
    let p = &input.sampling_params;
    validate(p, input.num_samples)?;
    check_tokens(&input.prompt, "prompt", cfg.vocab_size, cfg.max_position_embeddings)?;
    // checked: a max_tokens near usize::MAX must not wrap past the context check
    if input.prompt.len().checked_add(p.max_tokens).is_none_or(|end| end > cfg.max_position_embeddings) {
        return Err(EngineError::InvalidParam {
            field: "max_tokens",
            value: p.max_tokens.to_string(),
            reason: "prompt + max_tokens exceeds the model's context (max_position_embeddings)",
        });
    }
    check_step_size(input.num_samples, cfg.vocab_size)
}

/// Runs the prompt (batch 1) into `cache`: its logprobs when asked for, and the last position's
/// logits (1, V) f32 for the first pick.
pub(super) fn prefill(
    model: &Model,
    prompt: &[u32],
    with_logprobs: bool,
    cache: &mut KvCache,
) -> Result<(Option<Vec<Option<f32>>>, Tensor)> {
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?; // (1,P)
    if with_logprobs {
        let hidden = model.forward_cached_hidden(&ids, cache)?; // (1,P,C)
        let (logprobs, last) = score_prompt(model, &hidden, prompt)?;
        Ok((Some(logprobs), last))
    } else {
        Ok((None, model.forward_cached(&ids, cache, false)?.squeeze(0)?.to_dtype(DType::F32)?))
        // (1,1,V) -> (1,V)
    }
}

impl Run {
    /// Generates `num_samples` continuations of `prompt` with the run's current weights (or the
    /// base model's). `detokenize` turns generated ids into text for stop strings; `cancelled`
    /// is checked between tokens and ends the call with [`EngineError::Interrupted`].
    pub fn sample(
        &self,
        input: &SampleInput,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<SampleOutput> {
        self.sample_streaming(input, detokenize, cancelled, &|_| {})
    }

    /// [`sample`](Self::sample) with every pick made by the device-side sampler, whatever the
    /// device. On the CPU, where `sample` scores whole rows on the host, the two must give the
    /// same tokens for a seed; tests compare them there.
    pub fn sample_with_device_picks(
        &self,
        input: &SampleInput,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<SampleOutput> {
        self.sample_alone(input, Picking::Device, detokenize, cancelled, &|_| {})
    }

    /// [`sample`](Self::sample), reporting each step's new tokens as they are picked:
    /// `on_tokens` gets `(sequence, token, logprob)` for every sequence still going (a live
    /// stream sends them on while the rest is sampled).
    pub fn sample_streaming(
        &self,
        input: &SampleInput,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
        on_tokens: &(dyn Fn(&[Picked]) + Sync),
    ) -> Result<SampleOutput> {
        self.sample_alone(input, Picking::for_device(&self.base.device), detokenize, cancelled, on_tokens)
    }

    /// The model a request samples: an inference copy of the run's (its current weights,
    /// storage shared), or the base model alone.
    pub(super) fn sampling_model(&self, base_model_only: bool) -> Result<Model> {
        if base_model_only {
            let frozen = TrainingConfig::Lora(LoraConfig { target_modules: Vec::new(), ..LoraConfig::default() });
            Ok(Model::new_quantized(&self.base.config, &self.base.weights, &self.base.quantized, &frozen)?.0)
        } else {
            Ok(self.model.detached())
        }
    }

    /// One request through a [`Decoder`] of its own.
    fn sample_alone(
        &self,
        input: &SampleInput,
        picking: Picking,
        detokenize: &(dyn Fn(&[u32]) -> String + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
        on_tokens: &(dyn Fn(&[Picked]) + Sync),
    ) -> Result<SampleOutput> {
        // Decoding is a long chain of small ops; run it on a pool thread so each parallel
        // kernel splits work with a warm sibling instead of waking the pool from outside.
        crate::kernels::in_pool_for(&self.base.device, || {
            let mut decoder = Decoder::default();
            decoder.join_picking(0, self, input, Some(Box::new(move |p: &[Picked]| on_tokens(p))), picking)?;
            loop {
                if cancelled() {
                    decoder.cancel(0);
                    return Err(EngineError::Interrupted);
                }
                if let Some((_, out)) = decoder.step(detokenize).pop() {
                    return out;
                }
            }
        })
        .map_err(crate::recompute::classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..SamplingParams::default() }
    }

    /// Frequencies of 20 000 draws.
    fn histogram(row: &[f32], p: &SamplingParams) -> Vec<f64> {
        let mut rng = Rng::new(7);
        let mut counts = vec![0.0; row.len()];
        let n = 20_000;
        for _ in 0..n {
            counts[choose(row, p, rng.uniform()) as usize] += 1.0 / n as f64;
        }
        counts
    }

    #[test]
    fn filters_follow_the_definitions() {
        // probabilities at temperature 1: 0.4, 0.3, 0.2, 0.1 (ids shuffled)
        let row: Vec<f32> = [0.2f32, 0.4, 0.1, 0.3].iter().map(|p| p.ln()).collect();
        let close = |got: &[f64], want: &[f64]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 0.015, "got {got:?}, want {want:?}");
            }
        };
        close(&histogram(&row, &params(1.0, 0, 1.0)), &[0.2, 0.4, 0.1, 0.3]);
        close(&histogram(&row, &params(1.0, 2, 1.0)), &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0]);
        // top_p 0.65: 0.4 + 0.3 ≥ 0.65 keeps two tokens
        close(&histogram(&row, &params(1.0, 0, 0.65)), &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0]);
        // top_k 3 renormalises to 4/9, 3/9, 2/9; top_p 0.5 then needs the first two
        close(&histogram(&row, &params(1.0, 3, 0.5)), &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0]);
        close(&histogram(&row, &params(1.0, 1, 1.0)), &[0.0, 1.0, 0.0, 0.0]);
        // temperature 0.5 squares the probabilities: 4:16:1:9
        close(&histogram(&row, &params(0.5, 0, 1.0)), &[4.0 / 30.0, 16.0 / 30.0, 1.0 / 30.0, 9.0 / 30.0]);
        assert_eq!(choose(&row, &params(0.0, 0, 1.0), 0.5), 1);
    }

    #[test]
    fn nucleus_widens_past_the_first_window() {
        // 1000 equal logits: top_p 0.9 needs 900 candidates, more than the first 256-wide window
        let row = vec![0.0f32; 1000];
        let h = histogram(&row, &params(1.0, 0, 0.9));
        assert_eq!(h[900..].iter().sum::<f64>(), 0.0);
        assert!(h[600..900].iter().sum::<f64>() > 0.25);
    }

    /// `r` rows of `v` logits rounded to bf16, as a GPU model's are (so with many ties).
    fn bf16_rows(r: usize, v: usize, std: f64, seed: u64) -> Vec<Vec<f32>> {
        let xs = Rng::new(seed).normal_vec(r * v, std);
        let t = Tensor::from_vec(xs, (r, v), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }

    /// Rows of 10 000 logits (three sort blocks, twenty sum blocks) that stress the device
    /// sampler: bf16 ties, one value everywhere (a nucleus past `MAX_CANDIDATES`), a plateau of
    /// 1000 (a nucleus past `NUCLEUS_FIRST`), few distinct values with the best last, and −∞.
    fn crafted_rows() -> Vec<Vec<f32>> {
        let v = 10_000;
        let mut rows = bf16_rows(3, v, 3.0, 1);
        rows.push(vec![0.5; v]);
        rows.push((0..v).map(|i| if i < 1000 { 5.0 } else { -20.0 }).collect());
        let mut few: Vec<f32> = (0..v).map(|i| ((i * 7919) % 13) as f32).collect();
        few[v - 1] = 20.0;
        rows.push(few);
        rows.push((0..v).map(|i| if i % 3 == 0 { f32::NEG_INFINITY } else { (i % 5) as f32 }).collect());
        rows
    }

    #[test]
    fn device_candidates_are_the_host_top_k_ties_included() {
        let rows = crafted_rows();
        let t = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        for m in [1, 2, 5, 40, 256, MAX_CANDIDATES] {
            let (ids, xs) = best(&t, m).unwrap();
            let (ids, xs) = (ids.to_vec2::<f32>().unwrap(), xs.to_vec2::<f32>().unwrap());
            for (r, row) in rows.iter().enumerate() {
                let mut got: Vec<u32> = ids[r].iter().map(|&id| id as u32).collect();
                got.sort_unstable_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
                assert_eq!(got, top(row, m), "row {r}, m {m}");
                assert!(ids[r].iter().zip(&xs[r]).all(|(&id, &x)| row[id as usize] == x), "row {r}, m {m}: logits");
            }
        }
    }

    #[test]
    fn device_picks_equal_host_picks_on_crafted_rows() {
        let rows = crafted_rows();
        let logits = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let picks: Vec<usize> = (0..6 * rows.len()).map(|i| i % rows.len()).collect();
        let mut rng = Rng::new(3);
        for temperature in [0.0, 0.7, 1.0, 1.3] {
            // 3000 > MAX_CANDIDATES: on the host; 10 000: the whole vocabulary
            for top_k in [0, 1, 5, 40, 3000, 10_000] {
                for top_p in [1.0, 0.5, 0.9, 0.95] {
                    let p = params(temperature, top_k, top_p);
                    let mut us: Vec<f64> = picks.iter().map(|_| rng.uniform()).collect();
                    us[0] = 0.0;
                    us[1] = 1.0 - 1e-12;
                    let host = host_picks(&logits, &picks, &us, &p).unwrap();
                    let device = device_picks(&logits, &picks, &us, &p).unwrap();
                    for (j, (h, d)) in host.iter().zip(&device).enumerate() {
                        assert_eq!(
                            h.0, d.0,
                            "T {temperature}, top_k {top_k}, top_p {top_p}: pick {j} (row {})",
                            picks[j]
                        );
                        assert!(
                            (h.1 - d.1).abs() < 1e-5,
                            "T {temperature}, top_k {top_k}, top_p {top_p}: logprob {} vs {}",
                            h.1,
                            d.1
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn steps_past_two_to_the_32_logits_are_refused() {
        assert!(check_step_size(256, 128_256).is_ok());
        let err = check_step_size(256, 20_000_000).unwrap_err();
        assert!(
            err.to_string().contains("invalid num_samples = 256 (vocab_size 20000000)")
                && err.to_string().contains("2^32"),
            "{err}"
        );
    }

    #[test]
    fn greedy_picks_on_the_device_agree_with_the_host() {
        // ties (bf16 logits have many) go to the lowest id, as on the host
        let rows = vec![vec![0.5f32, 2.0, -1.0, 2.0], vec![3.0, 3.0, 3.0, 3.0], vec![-7.0, -2.5, -9.0, -2.6]];
        let t = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let picks = greedy_picks(&t).unwrap();
        for (row, (id, logprob)) in rows.iter().zip(picks) {
            let want = choose(row, &params(0.0, 0, 1.0), 0.0);
            assert_eq!(id, want);
            let want_lp = row[want as usize] - log_sum_exp(row);
            assert!((logprob - want_lp).abs() < 1e-6, "{logprob} vs {want_lp}");
        }
    }
}
