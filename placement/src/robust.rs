//! Planning for the uncertainty of routing statistics. A trace is a sample of tomorrow's traffic,
//! and its sequences are not independent tokens: a document or a conversation sends many tokens
//! to the same few experts, so per-expert loads vary from sample to sample far more than token
//! counts suggest. Two tools, both from resampling whole sequences of the trace (the bootstrap):
//!
//! - [`shrink_loads`]: an empirical-Bayes (James–Stein) shrinkage of each layer's expert loads
//!   toward the layer mean, by the share of their spread across experts that resampling alone
//!   produces. An expert that looks hot only because a few sequences used it is planned for as
//!   less hot; a spread that holds across resamples stays. Layers with strong, stable skew barely
//!   move. The solvers then balance what is likely to hold rather than what the sample shows.
//! - [`balancedness_interval`]: a placement's balancedness on resamples of a trace, as a
//!   5th–95th percentile interval beside the in-sample figure: how much of the in-sample figure
//!   is luck of the sample. (It cannot see shifts the trace does not contain, such as another
//!   domain of traffic; the cross-domain scenarios of `place bench` measure those.)
//!
//! Deterministic: resampling draws from a seeded generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::eval::rank_loads;
use crate::placement::Placement;
use crate::stats::RoutingStats;
use crate::trace::RoutingTrace;

/// Resamples drawn by default.
pub const RESAMPLES: usize = 32;

/// Per-layer expert loads of `resamples` bootstrap resamples of `trace` (whole sequences drawn
/// with replacement, as many as the trace has).
pub fn bootstrap_loads(trace: &RoutingTrace, resamples: usize, seed: u64) -> Vec<Vec<Vec<f64>>> {
    resample(&sequence_loads(trace), resamples, seed)
}

/// Largest total size of [`bootstrap_transitions`]' tables (bytes): a layer pair's transition
/// table has experts² entries, so DeepSeek-V3's 58 × 256 experts take 30 MB per resample.
pub const MAX_TRANSITION_RESAMPLE_BYTES: usize = 256 << 20;

/// Primary-expert transitions (as [`RoutingStats::transitions`]) of `resamples` bootstrap
/// resamples of `trace`, whole sequences drawn with replacement: `[resample][layer][e · E + e2]`.
/// How much of a placement's same-rank hops rests on a few sequences shows in how its hop gains
/// vary across them. Empty when the trace has fewer than two sequences, fewer than two layers, or
/// the tables would pass [`MAX_TRANSITION_RESAMPLE_BYTES`]. Deterministic for a seed.
pub fn bootstrap_transitions(trace: &RoutingTrace, resamples: usize, seed: u64) -> Vec<Vec<Vec<f64>>> {
    let (token_seq, n) = token_sequences(trace);
    if trace.num_layers < 2 || n < 2 || transition_bytes(trace, resamples) > MAX_TRANSITION_RESAMPLE_BYTES {
        return Vec::new();
    }
    weighted_transitions(trace, &token_seq, &draw_counts(n, resamples, seed))
}

/// Per resample, how often each of `n` sequences is drawn when `n` are drawn with replacement.
fn draw_counts(n: usize, resamples: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..resamples)
        .map(|_| {
            let mut times = vec![0.0f64; n];
            for _ in 0..n {
                times[rng.random_range(0..n)] += 1.0;
            }
            times
        })
        .collect()
}

fn transition_bytes(trace: &RoutingTrace, tables: usize) -> usize {
    let ne = trace.num_experts;
    tables.saturating_mul(trace.num_layers.saturating_sub(1)).saturating_mul(ne.saturating_mul(ne)).saturating_mul(8)
}

/// Every token's sequence index (in order of first appearance) and the number of sequences.
fn token_sequences(trace: &RoutingTrace) -> (Vec<usize>, usize) {
    let mut seq_index: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    let token_seq: Vec<usize> = (0..trace.num_tokens())
        .map(|t| {
            let next = seq_index.len();
            *seq_index.entry(trace.seq_id(t)).or_insert(next)
        })
        .collect();
    (token_seq, seq_index.len())
}

/// Per row of `weights` (one weight per sequence, in order of first appearance), the trace's
/// primary-expert transitions with every token weighted by its sequence's weight (`token_seq`:
/// [`token_sequences`]; the trace has at least two layers).
fn weighted_transitions(trace: &RoutingTrace, token_seq: &[usize], weights: &[Vec<f64>]) -> Vec<Vec<Vec<f64>>> {
    let (nl, ne) = (trace.num_layers, trace.num_experts);
    weights
        .iter()
        .map(|w| {
            let mut tr = vec![vec![0.0; ne * ne]; nl - 1];
            for (t, &s) in token_seq.iter().enumerate() {
                let x = w.get(s).copied().unwrap_or(0.0);
                if x == 0.0 {
                    continue;
                }
                for (l, table) in tr.iter_mut().enumerate() {
                    let (a, b) = (trace.experts(t, l)[0] as usize, trace.experts(t, l + 1)[0] as usize);
                    table[a * ne + b] += x;
                }
            }
            tr
        })
        .collect()
}

/// Per sequence of `trace` (in order of first appearance), its per-layer expert counts.
fn sequence_loads(trace: &RoutingTrace) -> Vec<Vec<Vec<f64>>> {
    let (nl, ne) = (trace.num_layers, trace.num_experts);
    let (token_seq, n) = token_sequences(trace);
    let mut per_seq: Vec<Vec<Vec<f64>>> = vec![vec![vec![0.0; ne]; nl]; n];
    for (t, &s) in token_seq.iter().enumerate() {
        for (l, counts) in per_seq[s].iter_mut().enumerate() {
            for &e in trace.experts(t, l) {
                counts[e as usize] += 1.0;
            }
        }
    }
    per_seq
}

/// `resamples` sums of `per_seq.len()` sequences drawn with replacement.
fn resample(per_seq: &[Vec<Vec<f64>>], resamples: usize, seed: u64) -> Vec<Vec<Vec<f64>>> {
    if per_seq.is_empty() {
        return Vec::new();
    }
    draw_counts(per_seq.len(), resamples, seed).iter().map(|times| weighted_loads(per_seq, times)).collect()
}

/// Loads of `draws` plausible shifts of the traffic mix: every sequence of `trace` weighted by
/// its own Gamma(α) draw (a Dirichlet reweighting of the sequence population), `[draw][layer][expert]`.
/// Unlike independent per-expert drift ([`drift_factors`]) this keeps what the trace says about
/// which experts rise and fall together: experts that the same kind of prompt uses move together
/// when tomorrow brings more of that kind. α is set so that the shift is as large as `drift` says
/// (the root-mean-square log-ratio of an expert's share to its sampled share, over draws, layers
/// and experts, is `drift`), or as large as the sequences allow (α at its floor) when they are too
/// alike. Empty with fewer than two sequences or no drift. Deterministic for a seed.
pub fn shifted_loads(trace: &RoutingTrace, draws: usize, drift: f64, seed: u64) -> Vec<Vec<Vec<f64>>> {
    let per_seq = sequence_loads(trace);
    shift_weights(&per_seq, draws, drift, seed).iter().map(|w| weighted_loads(&per_seq, w)).collect()
}

/// `per_seq` summed with one weight per sequence, `[layer][expert]`.
fn weighted_loads(per_seq: &[Vec<Vec<f64>>], w: &[f64]) -> Vec<Vec<f64>> {
    let Some(shape) = per_seq.first() else { return Vec::new() };
    let mut load: Vec<Vec<f64>> = shape.iter().map(|l| vec![0.0; l.len()]).collect();
    for (s, &x) in per_seq.iter().zip(w) {
        for (acc, counts) in load.iter_mut().zip(s) {
            for (a, c) in acc.iter_mut().zip(counts) {
                *a += c * x;
            }
        }
    }
    load
}

/// Per draw, the weight of every sequence of `per_seq` in a shift of the traffic mix (mean one),
/// sized as [`shifted_loads`] says.
fn shift_weights(per_seq: &[Vec<Vec<f64>>], draws: usize, drift: f64, seed: u64) -> Vec<Vec<f64>> {
    if per_seq.len() < 2 || drift.is_nan() || drift <= 0.0 || draws == 0 {
        return Vec::new();
    }
    let (nl, ne) = (per_seq[0].len(), per_seq[0].first().map_or(0, Vec::len));
    let total: Vec<Vec<f64>> = (0..nl).map(|l| (0..ne).map(|e| per_seq.iter().map(|s| s[l][e]).sum()).collect()).collect();
    // Gamma(α) = Gamma(α + 1) · U^(1/α) (exact), with Gamma(α + 1) by the Wilson–Hilferty cube of a
    // normal (within a few per cent for shapes ≥ 1). The uniforms and normals are drawn once and
    // reused for every α, so the spread moves smoothly with α and the bisection below converges.
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = StdRng::seed_from_u64(seed);
    let n = per_seq.len();
    let noise: Vec<Vec<(f64, f64)>> = (0..draws)
        .map(|_| (0..n).map(|_| (rng.random::<f64>().max(1e-300), StandardNormal.sample(&mut rng))).collect())
        .collect();
    let weights = |alpha: f64| -> Vec<Vec<f64>> {
        let k = alpha + 1.0;
        noise
            .iter()
            .map(|d| {
                let w: Vec<f64> = d
                    .iter()
                    .map(|&(u, z): &(f64, f64)| {
                        let c = 1.0 - 1.0 / (9.0 * k) + z / (3.0 * k.sqrt());
                        let gamma_k = k * c.max(0.0).powi(3);
                        gamma_k * u.powf(1.0 / alpha)
                    })
                    .collect();
                // Mean one: a shift changes the mix, not the volume.
                let scale = n as f64 / w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                w.into_iter().map(|x| x * scale).collect()
            })
            .collect()
    };
    let loads_for = |w: &Vec<Vec<f64>>| -> Vec<Vec<Vec<f64>>> { w.iter().map(|ws| weighted_loads(per_seq, ws)).collect() };
    let spread = |loads: &Vec<Vec<Vec<f64>>>| -> f64 {
        let (mut sq, mut count) = (0.0, 0usize);
        for d in loads {
            for (l, layer) in d.iter().enumerate() {
                let (sum_d, sum_t) = (layer.iter().sum::<f64>(), total[l].iter().sum::<f64>());
                if sum_d <= 0.0 || sum_t <= 0.0 {
                    continue;
                }
                // Shares floored at 1 % of the mean share, so an expert a draw leaves idle counts as
                // a large shift, not an infinite one.
                let floor = 0.01 / layer.len() as f64;
                for (x, t) in layer.iter().zip(&total[l]) {
                    if *t > 0.0 {
                        let r = ((x / sum_d).max(floor) / (t / sum_t).max(floor)).ln();
                        sq += r * r;
                        count += 1;
                    }
                }
            }
        }
        if count == 0 { 0.0 } else { (sq / count as f64).sqrt() }
    };
    // The spread falls as α grows; bisect log α in [1e-3, 1e3].
    let (mut lo, mut hi) = ((1e-3f64).ln(), (1e3f64).ln());
    if spread(&loads_for(&weights(lo.exp()))) <= drift {
        return weights(lo.exp());
    }
    for _ in 0..24 {
        let mid = 0.5 * (lo + hi);
        if spread(&loads_for(&weights(mid.exp()))) > drift {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    weights(hi.exp())
}

/// How far each layer's loads were shrunk (0: not at all, 1: to the mean).
#[derive(Debug, Clone, PartialEq)]
pub struct Shrinkage {
    pub per_layer: Vec<f64>,
}

/// `stats` with every layer's expert loads shrunk toward the layer mean (see the module doc);
/// the per-home-rank split is scaled with them, transitions and co-activation are kept. A trace
/// of fewer than two sequences cannot be resampled meaningfully: nothing is shrunk.
pub fn shrink_loads(stats: &RoutingStats, trace: &RoutingTrace, resamples: usize, seed: u64) -> (RoutingStats, Shrinkage) {
    let per_seq = sequence_loads(trace);
    let sequences = per_seq.len();
    let boots = resample(&per_seq, resamples.max(2), seed);
    let mut out = stats.clone();
    let mut per_layer = Vec::with_capacity(stats.num_layers);
    for l in 0..stats.num_layers {
        let load = &stats.load[l];
        let total: f64 = load.iter().sum();
        let ne = load.len() as f64;
        if total <= 0.0 || sequences < 2 {
            per_layer.push(0.0);
            continue;
        }
        let share: Vec<f64> = load.iter().map(|x| x / total).collect();
        let mean = 1.0 / ne;
        // Spread of the shares across experts, and the part of it resampling alone produces.
        let spread = share.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / ne;
        let noise = (0..load.len())
            .map(|e| {
                let xs: Vec<f64> = boots.iter().map(|b| b[l][e] / b[l].iter().sum::<f64>().max(f64::MIN_POSITIVE)).collect();
                let m = xs.iter().sum::<f64>() / xs.len() as f64;
                xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64
            })
            .sum::<f64>()
            / ne;
        let b = if spread > 0.0 { (noise / spread).clamp(0.0, 1.0) } else { 0.0 };
        per_layer.push(b);
        for (e, x) in out.load[l].iter_mut().enumerate() {
            let shrunk = total * (mean + (1.0 - b) * (share[e] - mean));
            if let Some(home) = out.home_load.as_mut() {
                let scale = if *x > 0.0 { shrunk / *x } else { 0.0 };
                for r in home[l].iter_mut() {
                    r[e] *= scale;
                }
            }
            *x = shrunk;
        }
    }
    (out, Shrinkage { per_layer })
}

/// Log-normal drift of expert loads the ILP plans for by default
/// ([`crate::solver::SolveOptions::load_drift`]): tomorrow an expert may carry e^±1 (0.37–2.7×)
/// of its sampled load. That is the order of a change of prompt domain, which moves loads far more
/// than resampling a trace does: on the trained model's prose and code routing the log-ratio of an
/// expert's share between the domains has a spread of 0.8–1.5 per layer, between resamples of one
/// domain 0.05–0.08.
pub const DEFAULT_DRIFT: f64 = 1.0;

/// Per-replica loads inflated for drift, and the offset every rank adds: the linear form of
/// "mean + c · sd" of a rank's load when every expert's load `w` drifts by a mean-one factor of
/// variance `s² = e^{drift²} − 1` (so a rank's variance is `V_r = s² Σ w_i²` over its replicas).
/// `sqrt(V_r)` linearised at the mean rank variance V̄ is `sqrt(V̄)/2 + V_r / (2 sqrt(V̄))`: each
/// replica of load `w` weighs `w + c s² w² / (2 sqrt(V̄))` and every rank adds `c sqrt(V̄) / 2`,
/// with `c = max_normal`, E[max of as many standard normals as ranks]
/// ([`expected_max_normal`]). Heavy replicas weigh more than their load, light ones about their
/// load. `per_replica[e]` is expert e's load per replica, `copies[e]` its replica count; `None`
/// when no drift is planned for (`drift` not positive, or no load).
pub fn drift_inflation(per_replica: &[f64], copies: &[usize], ranks: usize, drift: f64, max_normal: f64) -> Option<(Vec<f64>, f64)> {
    let (s2, sd) = drift_moments(per_replica, copies, ranks, drift)?;
    Some((per_replica.iter().map(|&w| w + max_normal * s2 * w * w / (2.0 * sd)).collect(), max_normal * sd / 2.0))
}

/// The coefficient `k` of [`drift_inflation`]'s `w + k w²` (the incremental rebalancer weighs
/// replicas with it).
pub fn drift_curvature(per_replica: &[f64], copies: &[usize], ranks: usize, drift: f64, max_normal: f64) -> Option<f64> {
    let (s2, sd) = drift_moments(per_replica, copies, ranks, drift)?;
    Some(max_normal * s2 / (2.0 * sd))
}

/// `s²` of the drift factor and `sqrt(V̄)`, the root of the mean rank variance; `None` without
/// drift or load.
fn drift_moments(per_replica: &[f64], copies: &[usize], ranks: usize, drift: f64) -> Option<(f64, f64)> {
    if drift.is_nan() || drift <= 0.0 {
        return None;
    }
    let s2 = (drift * drift).exp_m1();
    let variance: f64 = per_replica.iter().zip(copies).map(|(&w, &c)| s2 * w * w * c as f64).sum();
    let mean_variance = variance / ranks.max(1) as f64;
    if !(mean_variance > 0.0 && mean_variance.is_finite()) {
        return None;
    }
    Some((s2, mean_variance.sqrt()))
}

/// E[max of n independent standard normals] (0 for n ≤ 1): `∫₀^∞ (1 − Φⁿ(x) − Φⁿ(−x)) dx`, by the
/// trapezoid rule to x = 10.
pub fn expected_max_normal(n: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let phi = |x: f64| 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let (h, steps) = (0.01, 1000);
    let f = |x: f64| 1.0 - phi(x).powi(n as i32) - phi(-x).powi(n as i32);
    (0..steps).map(|i| 0.5 * h * (f(i as f64 * h) + f((i + 1) as f64 * h))).sum()
}

/// The error function (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x >= 0.0 { y } else { -y }
}

/// Mean-one log-normal drift factors `exp(drift · z − drift² / 2)`, z standard normal:
/// `[layer][draw][expert]`, `draws` per layer. Layer l draws from its own generator seeded by
/// `seed ^ l`, so a layer's factors do not depend on how many layers there are. Empty when
/// `drift` is not positive.
pub fn drift_factors(num_layers: usize, num_experts: usize, draws: usize, drift: f64, seed: u64) -> Vec<Vec<Vec<f64>>> {
    use rand_distr::{Distribution, StandardNormal};
    if drift.is_nan() || drift <= 0.0 {
        return Vec::new();
    }
    (0..num_layers)
        .map(|l| {
            let mut rng = StdRng::seed_from_u64(seed ^ l as u64);
            (0..draws)
                .map(|_| {
                    (0..num_experts)
                        .map(|_| {
                            let z: f64 = StandardNormal.sample(&mut rng);
                            (drift * z - drift * drift / 2.0).exp()
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// `p`'s balancedness when every expert's load of `load` is multiplied by its own
/// [`drift_factors`] factor, over `draws` draws: (5th, 50th, 95th percentile). Deterministic for a
/// seed; without drift every draw is the sampled load.
pub fn drift_balancedness_interval(p: &Placement, load: &[Vec<f64>], drift: f64, draws: usize, seed: u64) -> (f64, f64, f64) {
    let draws = draws.max(1);
    let experts = load.first().map_or(0, Vec::len);
    let factors = drift_factors(load.len(), experts, draws, drift, seed);
    let mut b: Vec<f64> = (0..draws)
        .map(|k| {
            let drifted: Vec<Vec<f64>> = load
                .iter()
                .enumerate()
                .map(|(l, layer)| match factors.get(l) {
                    Some(f) => layer.iter().zip(&f[k]).map(|(x, g)| x * g).collect(),
                    None => layer.clone(),
                })
                .collect();
            balancedness(p, &drifted)
        })
        .collect();
    b.sort_by(f64::total_cmp);
    let at = |q: f64| b[((b.len() - 1) as f64 * q).round() as usize];
    (at(0.05), at(0.5), at(0.95))
}

/// Balancedness (Σ mean rank load / Σ max rank load over layers) of `p` under per-layer loads.
pub fn balancedness(p: &Placement, load: &[Vec<f64>]) -> f64 {
    let (mut sum_mean, mut sum_max) = (0.0, 0.0);
    for (layer, l) in p.layers.iter().zip(load) {
        let loads = rank_loads(&layer.ranks, l);
        sum_mean += loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        sum_max += loads.iter().copied().fold(0.0, f64::max);
    }
    if sum_max > 0.0 { sum_mean / sum_max } else { 1.0 }
}

/// `p`'s balancedness on `resamples` bootstrap resamples of `trace`: (5th, 50th, 95th percentile).
pub fn balancedness_interval(p: &Placement, trace: &RoutingTrace, resamples: usize, seed: u64) -> (f64, f64, f64) {
    let mut b: Vec<f64> = bootstrap_loads(trace, resamples.max(1), seed).iter().map(|load| balancedness(p, load)).collect();
    if b.is_empty() {
        // No sequence to draw: nothing to vary.
        let x = balancedness(p, &[]);
        return (x, x, x);
    }
    b.sort_by(f64::total_cmp);
    let at = |q: f64| b[((b.len() - 1) as f64 * q).round() as usize];
    (at(0.05), at(0.5), at(0.95))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 sequences: at layer 0 every sequence uses expert 0 (a stable skew), at layer 1 each
    /// sequence sticks to one expert of its own choosing (a skew that is luck of the sample).
    fn trace() -> RoutingTrace {
        let mut ids = Vec::new();
        let mut seqs = Vec::new();
        for s in 0..40i64 {
            let own = [0u32, 0, 0, 1, 2, 3][s as usize % 6];
            for t in 0..20 {
                ids.extend_from_slice(&[0, 1 + (t % 3) as u32]);
                ids.extend_from_slice(&[own, (own + 1 + (t % 3) as u32) % 4]);
                seqs.push(s);
            }
        }
        RoutingTrace { num_experts: 4, num_layers: 2, top_k: 2, topk_ids: ids, topk_weights: None, seq_ids: Some(seqs) }
    }

    #[test]
    fn sampling_luck_is_shrunk_and_a_stable_skew_is_kept() {
        let t = trace();
        let stats = RoutingStats::from_trace(&t, Some(2));
        let (shrunk, s) = shrink_loads(&stats, &t, 64, 7);
        assert!(s.per_layer[0] < 0.05, "the stable skew of layer 0 stays: {:?}", s.per_layer);
        assert!(s.per_layer[1] > s.per_layer[0] + 0.02, "layer 1's skew depends on which sequences were drawn: {:?}", s.per_layer);
        for l in 0..2 {
            let (a, b): (f64, f64) = (stats.load[l].iter().sum(), shrunk.load[l].iter().sum());
            assert!((a - b).abs() < 1e-6, "total load kept");
        }
        let hot = |x: &RoutingStats| x.load[1].iter().copied().fold(0.0, f64::max);
        assert!(hot(&shrunk) < hot(&stats), "the hottest expert of layer 1 is planned for as less hot");
        let home: f64 = shrunk.home_load.as_ref().expect("home split")[1].iter().map(|r| r[0]).sum();
        assert!((home - shrunk.load[1][0]).abs() < 1e-6, "the home split follows the shrunk load");
    }

    #[test]
    fn resampled_transitions_average_to_the_trace_and_vary_where_sequences_do() {
        let t = trace();
        let stats = RoutingStats::from_trace(&t, None);
        let rs = bootstrap_transitions(&t, 64, 1);
        assert_eq!(rs.len(), 64);
        assert_eq!(rs[0].len(), 1);
        assert_eq!(rs[0][0].len(), 16);
        for e in 0..4 {
            for g in 0..4 {
                let mean = rs.iter().map(|r| r[0][e * 4 + g]).sum::<f64>() / 64.0;
                let want = stats.transitions[0][e * 4 + g];
                assert!((mean - want).abs() <= 0.15 * want.max(20.0), "{e}->{g}: {mean} vs {want}");
            }
        }
        // 0 -> 0 follows the sequences whose own expert is 0 (half of them), 0 -> 3 one sequence in
        // six: both vary with the sequences drawn.
        let spread = |i: usize| {
            let v: Vec<f64> = rs.iter().map(|r| r[0][i]).collect();
            v.iter().copied().fold(0.0, f64::max) - v.iter().copied().fold(f64::INFINITY, f64::min)
        };
        assert!(spread(0) > 0.0 && spread(3) > 0.0);
        assert_eq!(bootstrap_transitions(&t, 8, 1), bootstrap_transitions(&t, 8, 1), "deterministic");
        let one = RoutingTrace { seq_ids: Some(vec![0; t.num_tokens()]), ..t.clone() };
        assert!(bootstrap_transitions(&one, 8, 1).is_empty(), "one sequence: nothing to resample");
    }

    #[test]
    fn the_interval_brackets_the_median() {
        let t = trace();
        let p = crate::solver::contiguous::solve(2, 4, &crate::Topology::uniform(2, 1).expect("topology"), 2).expect("contiguous");
        let (lo, mid, hi) = balancedness_interval(&p, &t, 64, 3);
        assert!(lo <= mid && mid <= hi && lo > 0.0 && hi <= 1.0, "{lo} {mid} {hi}");
        assert!(hi - lo > 0.0, "resamples differ");
    }

    #[test]
    fn expected_max_of_normals_matches_known_values() {
        assert_eq!(expected_max_normal(1), 0.0);
        assert!((expected_max_normal(2) - 1.0 / std::f64::consts::PI.sqrt()).abs() < 1e-4);
        assert!((expected_max_normal(4) - 1.029_375).abs() < 1e-4);
        assert!((expected_max_normal(32) - 2.069_668).abs() < 1e-3);
    }

    /// Sequences of two kinds: kind A routes layer 0 to experts 0 and 1, kind B to 2 and 3.
    fn two_kinds() -> RoutingTrace {
        let (mut ids, mut seqs) = (Vec::new(), Vec::new());
        for s in 0..30i64 {
            for _ in 0..10 {
                ids.extend_from_slice(if s % 3 == 0 { &[2, 3] } else { &[0, 1] });
                seqs.push(s);
            }
        }
        RoutingTrace { num_experts: 4, num_layers: 1, top_k: 2, topk_ids: ids, topk_weights: None, seq_ids: Some(seqs) }
    }

    #[test]
    fn shifts_move_experts_of_one_kind_together_and_as_far_as_the_drift() {
        let t = two_kinds();
        let shifts = shifted_loads(&t, 64, 0.5, 9);
        assert_eq!(shifts.len(), 64);
        assert_eq!(shifts, shifted_loads(&t, 64, 0.5, 9), "deterministic for a seed");
        // Experts 0 and 1 are used by the same sequences: every draw moves them alike.
        for d in &shifts {
            assert!((d[0][0] - d[0][1]).abs() < 1e-9 && (d[0][2] - d[0][3]).abs() < 1e-9, "{:?}", d[0]);
        }
        // The calibrated size: RMS log-ratio of shares to the sampled shares (2/3, 1/3 of a pair).
        let sampled = [1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0];
        let sq: f64 = shifts
            .iter()
            .flat_map(|d| {
                let sum: f64 = d[0].iter().sum();
                d[0].iter().zip(sampled).map(move |(x, s)| ((x / sum).max(0.0025) / s).ln().powi(2)).collect::<Vec<_>>()
            })
            .sum();
        let rms = (sq / (64.0 * 4.0)).sqrt();
        assert!((rms - 0.5).abs() < 0.05, "spread {rms} for drift 0.5");
        assert!(shifted_loads(&t, 8, 0.0, 9).is_empty(), "no drift, no shift");
    }
}
