//! Live expert load: a sliding window with exponential decay over the per-layer, per-expert
//! token counts a running cluster reports, and the balancedness of a placement under it.
//!
//! Workers report cumulative counts; the window turns successive reports into increments and
//! keeps `load ← load·decay^(dt/half_life…) + increment`, so recent traffic weighs most and a
//! window with no traffic keeps its last shape (decay scales every expert alike, so balancedness,
//! a ratio, does not move).
//!
//! Beside it the window keeps a recent one (a quarter of the half-life): when the workload
//! shifts, the recent window shows the new routing seconds before the long one does. The
//! [`LoadWindow::shift_distance`] between their routing distributions tells a scheduler that a
//! shift is under way, so that it can decide on where the load is going rather than on a blend of
//! before and after (see `rebalance::RebalanceConfig::shift_distance`).

use crate::Placement;
use crate::eval::rank_loads;

/// Half-life of the recent window as a fraction of the window's.
pub const RECENT_HALF_LIFE_FRACTION: f64 = 0.25;

/// Decayed per-layer, per-expert load.
#[derive(Debug, Clone)]
pub struct LoadWindow {
    num_layers: usize,
    num_experts: usize,
    /// Seconds after which an observation weighs half.
    half_life_s: f64,
    load: Vec<Vec<f64>>,
    /// The same observations with [`RECENT_HALF_LIFE_FRACTION`] of the half-life.
    recent: Vec<Vec<f64>>,
    /// Last cumulative report per source (worker rank), to turn reports into increments.
    last: Vec<Option<Vec<u64>>>,
    /// Tokens (routed assignments) seen in total.
    total: f64,
}

impl LoadWindow {
    pub fn new(num_layers: usize, num_experts: usize, half_life_s: f64) -> Self {
        LoadWindow {
            num_layers,
            num_experts,
            half_life_s: if half_life_s.is_finite() && half_life_s > 0.0 { half_life_s } else { 30.0 },
            load: vec![vec![0.0; num_experts]; num_layers],
            recent: vec![vec![0.0; num_experts]; num_layers],
            last: Vec::new(),
            total: 0.0,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Ages the window by `dt_s` seconds.
    pub fn decay(&mut self, dt_s: f64) {
        if dt_s <= 0.0 || !dt_s.is_finite() {
            return;
        }
        let age = |rows: &mut Vec<Vec<f64>>, half_life_s: f64| {
            let f = 0.5f64.powf(dt_s / half_life_s);
            rows.iter_mut().flatten().for_each(|x| *x *= f);
        };
        age(&mut self.load, self.half_life_s);
        age(&mut self.recent, self.half_life_s * RECENT_HALF_LIFE_FRACTION);
    }

    /// Adds one report of `source`'s cumulative counts (`[layers × experts]`, row-major): the
    /// increment since its previous report. A source's counts start at zero (its first report
    /// counts in full: traffic before the first poll is traffic too); a report smaller than the
    /// last (the source restarted) counts from zero. Returns the assignments added.
    pub fn observe_cumulative(&mut self, source: usize, counts: &[u64]) -> u64 {
        if counts.len() != self.num_layers * self.num_experts {
            return 0;
        }
        if self.last.len() <= source {
            self.last.resize(source + 1, None);
        }
        let inc: Vec<u64> = match &self.last[source] {
            Some(prev) if !prev.iter().zip(counts).any(|(p, c)| c < p) => counts.iter().zip(prev).map(|(c, p)| c - p).collect(),
            _ => counts.to_vec(),
        };
        self.last[source] = Some(counts.to_vec());
        self.add(&inc)
    }

    /// Adds increments `[layers × experts]` (row-major). Returns the assignments added.
    pub fn add(&mut self, inc: &[u64]) -> u64 {
        if inc.len() != self.num_layers * self.num_experts {
            return 0;
        }
        let mut n = 0;
        for (i, &x) in inc.iter().enumerate() {
            let (l, e) = (i / self.num_experts, i % self.num_experts);
            self.load[l][e] += x as f64;
            self.recent[l][e] += x as f64;
            n += x;
        }
        self.total += n as f64;
        n
    }

    /// The decayed load, `[layer][expert]`.
    pub fn load(&self) -> &[Vec<f64>] {
        &self.load
    }

    /// The recent window's decayed load, `[layer][expert]`.
    pub fn recent_load(&self) -> &[Vec<f64>] {
        &self.recent
    }

    /// Where the load is heading while it shifts: the recent load moved on along the trend the two
    /// windows show, `horizon_s` seconds ahead. An exponential window lags a steady ramp by its
    /// time constant τ (half-life / ln 2), so the gap between the recent (τ_r) and the long (τ_l)
    /// window's expert shares is the ramp's slope × (τ_l − τ_r); the share now plus `horizon_s` is
    /// then recent + gap × (τ_r + horizon) / (τ_l − τ_r). Shares clipped at 0; the layer's recent
    /// total kept (the balancedness of a placement under it is what counts, not the scale).
    pub fn trend_load(&self, horizon_s: f64) -> Vec<Vec<f64>> {
        let tau_l = self.half_life_s / std::f64::consts::LN_2;
        let tau_r = tau_l * RECENT_HALF_LIFE_FRACTION;
        let gain = (tau_r + horizon_s.max(0.0)) / (tau_l - tau_r);
        self.recent
            .iter()
            .zip(&self.load)
            .map(|(r, l)| {
                let (tr, tl) = (r.iter().sum::<f64>(), l.iter().sum::<f64>());
                if tr <= 0.0 || tl <= 0.0 {
                    return r.clone();
                }
                r.iter().zip(l).map(|(x, y)| (x / tr + gain * (x / tr - y / tl)).max(0.0) * tr).collect()
            })
            .collect()
    }

    /// How far the recent routing has moved from the window's: per layer the total variation
    /// distance (½ Σ_e |p_recent(e) − p_window(e)|, 0 = same distribution, 1 = disjoint experts)
    /// between the two windows' expert shares, averaged over layers with load. 0 without load.
    pub fn shift_distance(&self) -> f64 {
        self.mean_over_loaded_layers(|r, tr, l, tl| 0.5 * r.iter().zip(l).map(|(x, y)| (x / tr - y / tl).abs()).sum::<f64>())
            .unwrap_or(0.0)
    }

    /// Mean over layers with load in both windows of `f(recent, its total, long, its total)`;
    /// `None` without such a layer.
    fn mean_over_loaded_layers(&self, f: impl Fn(&[f64], f64, &[f64], f64) -> f64) -> Option<f64> {
        let (mut sum, mut layers) = (0.0, 0usize);
        for (r, l) in self.recent.iter().zip(&self.load) {
            let (tr, tl) = (r.iter().sum::<f64>(), l.iter().sum::<f64>());
            if tr > 0.0 && tl > 0.0 {
                sum += f(r, tr, l, tl);
                layers += 1;
            }
        }
        (layers > 0).then(|| sum / layers as f64)
    }

    /// The [`LoadWindow::shift_distance`] sampling alone would give on steady traffic, about: per
    /// layer ½ Σ_e E|p̂_e − p_e| ≈ ½ Σ_e √(2/π) · √(p_e (1 − p_e) / n), with p_e the long window's
    /// shares and n = 2 × the recent window's total S: a decayed sum of Poisson counts has
    /// variance Σ wᵢ²λ ≈ λτ/2 = S/2, i.e. relative variance 1/(2S), that of 2S independent samples.
    /// Averaged over layers with load; infinite without load (nothing can be told apart then).
    pub fn shift_distance_noise(&self) -> f64 {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        self.mean_over_loaded_layers(|_, tr, l, tl| 0.5 * l.iter().map(|y| y / tl).map(|p| c * (p * (1.0 - p) / (2.0 * tr)).sqrt()).sum::<f64>())
            .unwrap_or(f64::INFINITY)
    }

    /// The drift of expert loads the windows show: the log-normal spread (the sd of the log of
    /// an expert's load factor) that takes the long window's expert shares to the recent
    /// window's, net of sampling. Per layer `Σ_e p_e ln²(q_e / p_e) − E / (2S)`: p and q the long
    /// and recent shares (half a token added to every expert so that one the recent window has
    /// not seen yet stays finite), E the experts with load and S the recent total — an expert's
    /// recent share alone has a relative variance of 1/(2 S q) (see
    /// [`LoadWindow::shift_distance_noise`]), so sampling adds about E/(2S). Averaged over layers
    /// with load, clipped at 0, square-rooted; 0 without load. Steady traffic gives about 0, a
    /// shift what it moves.
    pub fn observed_drift(&self) -> f64 {
        self.mean_over_loaded_layers(|r, tr, l, tl| {
            let experts = l.iter().filter(|&&y| y > 0.0).count() as f64;
            let half = 0.5 * r.len() as f64;
            let sq: f64 = r
                .iter()
                .zip(l)
                .filter(|(_, y)| **y > 0.0)
                .map(|(x, y)| {
                    let (q, p) = ((x + 0.5) / (tr + half), (y + 0.5) / (tl + half));
                    y / tl * (q / p).ln().powi(2)
                })
                .sum();
            (sq - experts / (2.0 * tr)).max(0.0)
        })
        .unwrap_or(0.0)
        .sqrt()
    }

    /// Whether anything was observed yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0.0
    }

    /// Per-layer balancedness (mean/max rank load) of `placement` under the window, and the total
    /// Σmean/Σmax. Layers without load count as balanced (1.0).
    pub fn balancedness(&self, placement: &Placement) -> (Vec<f64>, f64) {
        balancedness(placement, &self.load)
    }

    /// Windowed load of every rank of `placement`, summed over layers.
    pub fn rank_load(&self, placement: &Placement) -> Vec<f64> {
        let mut out = vec![0.0; placement.num_ranks()];
        for (l, ld) in placement.layers.iter().zip(&self.load) {
            for (acc, x) in out.iter_mut().zip(rank_loads(&l.ranks, ld)) {
                *acc += x;
            }
        }
        out
    }

    /// The last cumulative report of every source, summed (`[layers × experts]`): all assignments
    /// the sources counted, without decay.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.num_layers * self.num_experts];
        for counts in self.last.iter().flatten() {
            for (a, b) in out.iter_mut().zip(counts) {
                *a += b;
            }
        }
        out
    }
}

/// Per-layer balancedness (mean/max rank load) of `placement` under `load[layer][expert]`, and the
/// total Σmean/Σmax.
pub fn balancedness(placement: &Placement, load: &[Vec<f64>]) -> (Vec<f64>, f64) {
    let (mut sum_mean, mut sum_max) = (0.0, 0.0);
    let per: Vec<f64> = placement
        .layers
        .iter()
        .zip(load)
        .map(|(l, ld)| {
            let rl = rank_loads(&l.ranks, ld);
            let max = rl.iter().cloned().fold(0.0, f64::max);
            let mean = rl.iter().sum::<f64>() / rl.len().max(1) as f64;
            sum_mean += mean;
            sum_max += max;
            if max > 0.0 { mean / max } else { 1.0 }
        })
        .collect();
    (per, if sum_max > 0.0 { sum_mean / sum_max } else { 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topology;
    use crate::placement::LayerPlacement;

    fn two_rank(ranks: Vec<Vec<usize>>) -> Placement {
        Placement::new(4, Topology::uniform(2, 1).unwrap(), vec![LayerPlacement { ranks }])
    }

    /// Poisson traffic from one distribution shows about no drift; a shift to other experts a
    /// large one, that fades as the long window catches up.
    #[test]
    fn observed_drift_is_near_zero_on_steady_traffic_and_large_at_a_shift() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Poisson};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let rates = [200.0, 120.0, 80.0, 60.0, 40.0, 30.0, 20.0, 10.0];
        let mut w = LoadWindow::new(1, rates.len(), 2.0);
        assert_eq!(w.observed_drift(), 0.0, "no load");
        let mut draw = |rates: &[f64]| -> Vec<u64> {
            rates.iter().map(|&r| Poisson::new(r).unwrap().sample(&mut rng) as u64).collect()
        };
        let mut steady = Vec::new();
        for _ in 0..40 {
            w.decay(0.25);
            w.add(&draw(&rates));
            steady.push(w.observed_drift());
        }
        let worst = steady[20..].iter().copied().fold(0.0, f64::max);
        assert!(worst < 0.15, "steady traffic: drift up to {worst}");
        let shifted: Vec<f64> = rates.iter().rev().copied().collect();
        for _ in 0..4 {
            w.decay(0.25);
            w.add(&draw(&shifted));
        }
        let during = w.observed_drift();
        assert!(during > 0.5, "one second into a shift: {during}");
        for _ in 0..80 {
            w.decay(0.25);
            w.add(&draw(&shifted));
        }
        assert!(w.observed_drift() < 0.15, "after the shift: {}", w.observed_drift());
    }

    /// A workload that moves to other experts shows in the recent window first: the distance
    /// grows at the shift and fades once the long window has caught up; steady traffic keeps it 0.
    #[test]
    fn shift_distance_rises_at_a_shift_and_fades_after() {
        let mut w = LoadWindow::new(1, 4, 2.0);
        assert_eq!(w.shift_distance(), 0.0, "no load, no shift");
        for _ in 0..20 {
            w.decay(0.5);
            w.add(&[30, 10, 0, 0]);
        }
        assert!(w.shift_distance() < 1e-9, "steady traffic: {}", w.shift_distance());
        // 40 assignments per 0.5 s into a recent window of half-life 0.5 s: ~58 in it, noise ≈ 0.04.
        let noise = w.shift_distance_noise();
        assert!(noise > 0.01 && noise < 0.1, "sampling noise estimate {noise}");
        let steady = w.trend_load(1.0);
        assert!(steady[0].iter().zip(&w.recent_load()[0]).all(|(a, b)| (a - b).abs() < 1e-6), "no trend, no change: {steady:?}");
        w.decay(0.5);
        w.add(&[0, 0, 30, 10]);
        w.decay(0.5);
        w.add(&[0, 0, 30, 10]);
        let during = w.shift_distance();
        assert!(during > 0.3, "one second into a shift: {during}");
        assert!(w.recent_load()[0][2] > w.recent_load()[0][0], "the recent window already shows the new experts");
        assert!(w.load()[0][0] > w.load()[0][2], "the long one still the old");
        // The trend is further along than the recent window: more on the new experts, less on the
        // old, never negative.
        let ahead = w.trend_load(0.5);
        let share = |row: &[f64], e: usize| row[e] / row.iter().sum::<f64>();
        assert!(share(&ahead[0], 2) > share(&w.recent_load()[0], 2) && share(&ahead[0], 0) < share(&w.recent_load()[0], 0));
        assert!(ahead[0].iter().all(|&x| x >= 0.0));
        for _ in 0..40 {
            w.decay(0.5);
            w.add(&[0, 0, 30, 10]);
        }
        assert!(w.shift_distance() < 0.01, "after 20 s: {}", w.shift_distance());
    }

    #[test]
    fn reports_become_increments_and_decay_keeps_the_shape() {
        let mut w = LoadWindow::new(1, 4, 10.0);
        assert_eq!(w.observe_cumulative(0, &[0, 0, 0, 0]), 0);
        assert_eq!(w.observe_cumulative(0, &[10, 0, 0, 0]), 10);
        assert_eq!(w.observe_cumulative(0, &[10, 0, 0, 0]), 0, "an unchanged report adds nothing");
        assert_eq!(w.observe_cumulative(1, &[0, 0, 0, 30]), 30, "a first report counts in full");
        assert_eq!(w.load()[0], vec![10.0, 0.0, 0.0, 30.0]);
        let p = two_rank(vec![vec![0, 1], vec![2, 3]]);
        let (per, total) = w.balancedness(&p);
        assert!((per[0] - 20.0 / 30.0).abs() < 1e-12 && (total - per[0]).abs() < 1e-12);
        w.decay(10.0);
        assert_eq!(w.load()[0], vec![5.0, 0.0, 0.0, 15.0]);
        assert!((w.balancedness(&p).1 - total).abs() < 1e-12, "decay alone must not move balancedness");
        assert_eq!(w.rank_load(&p), vec![5.0, 15.0]);
        assert_eq!(w.cumulative(), vec![10, 0, 0, 30], "cumulative counts do not decay");
        // A restarted source counts from zero; a wrong-sized report is ignored.
        assert_eq!(w.observe_cumulative(0, &[2, 0, 0, 0]), 2);
        assert_eq!(w.observe_cumulative(0, &[1, 2, 3]), 0);
    }

    #[test]
    fn replicas_split_their_load() {
        let load = vec![vec![30.0, 10.0, 10.0, 10.0]];
        let p = two_rank(vec![vec![0, 1, 2], vec![0, 3, 2]]);
        // rank 0: 15 + 10 + 5, rank 1: 15 + 10 + 5.
        assert_eq!(balancedness(&p, &load).1, 1.0);
    }
}
