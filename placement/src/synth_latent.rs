//! A second synthetic routing model, built on another mechanism than [`crate::synth`]'s: routing
//! read off a token's *residual stream*.
//!
//! [`crate::synth`] writes cross-layer affinity down directly (every expert has a few likely
//! successors). A solver developed against it may learn that shape rather than routing. Here no
//! expert-to-expert table exists; affinity comes out of the same mechanism as in a transformer:
//!
//! - every token carries a latent state `x_l ∈ R^dim` through the layers: a persistent part (its
//!   sequence's topic, drawn around its domain's mean) plus a token part that drifts from layer to
//!   layer as an AR(1) process (`x_l = topic + r_l`, `r_l = ρ r_{l−1} + √(1−ρ²) ξ_l`);
//! - every expert of every layer has a random unit direction `u_{l,e}` and a bias `b_{l,e}`
//!   (popularity); the router's logit is `sharpness · ⟨u_{l,e}, x_l⟩ + b_{l,e}`;
//! - the top-k logits are chosen, within the best `topk_groups` of `groups` expert groups when
//!   groups are given (DeepSeek-V3's group-limited routing: a group scores the sum of its two best
//!   logits); weights are the softmax of the chosen logits, ids ordered by weight.
//!
//! Consecutive layers' choices correlate because the state persists (`ρ`, the topic), not because a
//! table says so, and the correlation is spread over many experts. Domains differ in their topic
//! means, so a sample drawn with another domain mix (`domain_weights`) is another day's traffic,
//! not just another sample of the same day.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::trace::MAX_EXPERTS;
use crate::{RoutingTrace, TraceError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatentConfig {
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Expert groups and how many of them a token may use (`None`: no group limit).
    pub groups: Option<(usize, usize)>,
    pub num_sequences: usize,
    pub tokens_per_sequence: usize,
    /// Dimension of the latent state.
    pub dim: usize,
    /// Correlation of a token's own part of the state between consecutive layers (0–1).
    pub persistence: f64,
    /// Share (0–1) of the state's variance that is the sequence's topic (kept in every layer).
    pub topic_share: f64,
    /// How far apart the domains' topic means are, against the spread of topics within a domain.
    pub domain_separation: f64,
    /// Scale of the router's logits on the state: higher routes more by the state, less by bias.
    pub sharpness: f64,
    /// Standard deviation of the experts' biases: how much popularity differs between experts.
    pub bias_spread: f64,
    pub domains: usize,
    /// Probability of each domain per sequence (empty: uniform). Another mix, same model: traffic
    /// of another day.
    pub domain_weights: Vec<f64>,
    /// Defines directions, biases and domain means.
    pub model_seed: u64,
    /// Defines the sampled sequences.
    pub seed: u64,
}

impl Default for LatentConfig {
    fn default() -> Self {
        Self {
            num_layers: 8,
            num_experts: 32,
            top_k: 4,
            groups: None,
            num_sequences: 64,
            tokens_per_sequence: 64,
            dim: 32,
            persistence: 0.8,
            topic_share: 0.4,
            domain_separation: 1.0,
            sharpness: 2.0,
            bias_spread: 0.5,
            domains: 4,
            domain_weights: Vec::new(),
            model_seed: 0,
            seed: 1,
        }
    }
}

impl LatentConfig {
    /// DeepSeek-V3 shape: 58 MoE layers, 256 routed experts top-8 within 4 of 8 groups.
    pub fn deepseek_v3() -> Self {
        Self { num_layers: 58, num_experts: 256, top_k: 8, groups: Some((8, 4)), model_seed: 0x001a_7e47, ..Self::default() }
    }

    /// Mixtral shape: 32 MoE layers, 8 experts top-2.
    pub fn mixtral() -> Self {
        Self { num_layers: 32, num_experts: 8, top_k: 2, dim: 16, model_seed: 0x0001_a7e8, ..Self::default() }
    }

    pub fn num_tokens(&self) -> usize {
        self.num_sequences.saturating_mul(self.tokens_per_sequence)
    }

    /// Checks every field is in range; the error names the first that is not.
    pub fn validate(&self) -> Result<(), TraceError> {
        let bad = |m: String| Err(TraceError::Invalid(format!("latent synth config: {m}")));
        if self.num_layers == 0 || self.dim == 0 {
            return bad("num_layers and dim must be at least 1".into());
        }
        if self.num_experts == 0 || self.num_experts > MAX_EXPERTS {
            return bad(format!("num_experts {} is not in 1..={MAX_EXPERTS}", self.num_experts));
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad(format!("top_k {} is not in 1..={}", self.top_k, self.num_experts));
        }
        if let Some((g, tg)) = self.groups
            && (g == 0 || !self.num_experts.is_multiple_of(g) || tg == 0 || tg > g || tg * (self.num_experts / g) < self.top_k)
        {
            return bad(format!("groups ({g}, {tg}) must divide {} experts and leave room for top_k {}", self.num_experts, self.top_k));
        }
        if self.num_sequences == 0 || self.tokens_per_sequence == 0 {
            return bad("num_sequences and tokens_per_sequence must be at least 1".into());
        }
        let tokens = self.num_sequences as u128 * self.tokens_per_sequence as u128;
        if tokens * self.num_layers as u128 * self.top_k as u128 > (1u128 << 32) {
            return bad(format!("{tokens} tokens x {} layers x k {} is too large", self.num_layers, self.top_k));
        }
        for (name, v) in [("persistence", self.persistence), ("topic_share", self.topic_share)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} {v} is not in 0..=1"));
            }
        }
        for (name, v) in [("domain_separation", self.domain_separation), ("sharpness", self.sharpness), ("bias_spread", self.bias_spread)] {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                return bad(format!("{name} {v} is not in 0..=100"));
            }
        }
        if self.domains == 0 || self.domains > 1024 {
            return bad(format!("domains {} is not in 1..=1024", self.domains));
        }
        if !self.domain_weights.is_empty()
            && (self.domain_weights.len() != self.domains
                || self.domain_weights.iter().any(|w| !w.is_finite() || *w < 0.0)
                || self.domain_weights.iter().sum::<f64>() <= 0.0)
        {
            return bad(format!("domain_weights {:?}: one finite non-negative weight per domain ({}), not all zero", self.domain_weights, self.domains));
        }
        Ok(())
    }
}

/// The fixed part of a [`LatentConfig`]: expert directions and biases, domain means.
struct LatentModel {
    /// `[l][e * dim + i]`, unit rows.
    directions: Vec<Vec<f64>>,
    /// `[l][e]`.
    biases: Vec<Vec<f64>>,
    /// `[domain][i]`.
    domain_means: Vec<Vec<f64>>,
}

fn normal(rng: &mut StdRng) -> f64 {
    StandardNormal.sample(rng)
}

impl LatentModel {
    fn new(cfg: &LatentConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.model_seed ^ 0x7a7e_4e7a_11ed);
        let (ne, d) = (cfg.num_experts, cfg.dim);
        let directions = (0..cfg.num_layers)
            .map(|_| {
                let mut u: Vec<f64> = (0..ne * d).map(|_| normal(&mut rng)).collect();
                for row in u.chunks_mut(d) {
                    let n = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|x| *x /= n);
                }
                u
            })
            .collect();
        let biases = (0..cfg.num_layers).map(|_| (0..ne).map(|_| cfg.bias_spread * normal(&mut rng)).collect()).collect();
        let domain_means = (0..cfg.domains).map(|_| (0..d).map(|_| cfg.domain_separation * normal(&mut rng)).collect()).collect();
        Self { directions, biases, domain_means }
    }
}

/// Indices of the `k` largest of `scores` among `allowed`, largest first.
fn top_k(scores: &[f64], allowed: impl Iterator<Item = usize>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = allowed.collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Samples a trace of `cfg` (model from `model_seed`, sequences from `seed`).
pub fn synthesize_latent(cfg: &LatentConfig) -> Result<RoutingTrace, TraceError> {
    cfg.validate()?;
    let model = LatentModel::new(cfg);
    let (nl, ne, k, d) = (cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.dim);
    let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ cfg.model_seed ^ 0x1a7e);
    let weights: Vec<f64> = if cfg.domain_weights.is_empty() { vec![1.0; cfg.domains] } else { cfg.domain_weights.clone() };
    let total_w: f64 = weights.iter().sum();
    // Topic around the domain mean (unit spread), scaled with the token part to unit variance.
    let topic_scale = (cfg.topic_share / (1.0 + cfg.domain_separation * cfg.domain_separation)).sqrt();
    let token_scale = (1.0 - cfg.topic_share).sqrt();
    let innovation = (1.0 - cfg.persistence * cfg.persistence).sqrt();
    let tokens = cfg.num_tokens();
    let mut ids = Vec::with_capacity(tokens * nl * k);
    let mut out_w = Vec::with_capacity(tokens * nl * k);
    let mut seq_ids = Vec::with_capacity(tokens);
    let (mut logits, mut r, mut x) = (vec![0.0; ne], vec![0.0; d], vec![0.0; d]);
    for s in 0..cfg.num_sequences {
        let mut pick = rng.random::<f64>() * total_w;
        let domain = weights.iter().position(|&w| {
            pick -= w;
            pick < 0.0
        });
        let domain = domain.unwrap_or(cfg.domains - 1);
        let topic: Vec<f64> = model.domain_means[domain].iter().map(|m| topic_scale * (m + normal(&mut rng))).collect();
        for _ in 0..cfg.tokens_per_sequence {
            seq_ids.push(s as i64);
            r.iter_mut().for_each(|v| *v = normal(&mut rng));
            for l in 0..nl {
                if l > 0 {
                    r.iter_mut().for_each(|v| *v = cfg.persistence * *v + innovation * normal(&mut rng));
                }
                for i in 0..d {
                    x[i] = topic[i] + token_scale * r[i];
                }
                for (e, lg) in logits.iter_mut().enumerate() {
                    let u = &model.directions[l][e * d..(e + 1) * d];
                    *lg = cfg.sharpness * u.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>() + model.biases[l][e];
                }
                let chosen = match cfg.groups {
                    Some((g, tg)) => {
                        let per = ne / g;
                        let group_score: Vec<f64> =
                            (0..g).map(|gi| top_k(&logits, gi * per..(gi + 1) * per, 2).iter().map(|&e| logits[e]).sum()).collect();
                        let groups = top_k(&group_score, 0..g, tg);
                        top_k(&logits, groups.iter().flat_map(|&gi| gi * per..(gi + 1) * per), k)
                    }
                    None => top_k(&logits, 0..ne, k),
                };
                let top = logits[chosen[0]];
                let total: f64 = chosen.iter().map(|&e| (logits[e] - top).exp()).sum();
                for &e in &chosen {
                    ids.push(e as u32);
                    out_w.push(((logits[e] - top).exp() / total) as f32);
                }
            }
        }
    }
    let trace = RoutingTrace { num_experts: ne, num_layers: nl, top_k: k, topk_ids: ids, topk_weights: Some(out_w), seq_ids: Some(seq_ids) };
    trace.validate()?;
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RoutingStats;

    fn small(persistence: f64, seed: u64) -> LatentConfig {
        LatentConfig { num_layers: 4, num_experts: 16, top_k: 2, num_sequences: 32, tokens_per_sequence: 32, persistence, seed, ..LatentConfig::default() }
    }

    /// Share of primary transitions that go to the layer's most likely successor of each expert.
    fn concentration(stats: &RoutingStats) -> f64 {
        let ne = stats.num_experts;
        let (mut best, mut all) = (0.0, 0.0);
        for t in &stats.transitions {
            for e in 0..ne {
                let row = &t[e * ne..(e + 1) * ne];
                best += row.iter().copied().fold(0.0, f64::max);
                all += row.iter().sum::<f64>();
            }
        }
        best / all
    }

    #[test]
    fn samples_are_valid_deterministic_and_differ_by_seed() {
        let a = synthesize_latent(&small(0.8, 1)).unwrap();
        assert_eq!(a, synthesize_latent(&small(0.8, 1)).unwrap());
        assert_ne!(a.topk_ids, synthesize_latent(&small(0.8, 2)).unwrap().topk_ids);
        assert_eq!((a.num_layers, a.num_experts, a.top_k, a.num_tokens()), (4, 16, 2, 1024));
        let g = LatentConfig { num_layers: 2, num_sequences: 4, tokens_per_sequence: 8, ..LatentConfig::deepseek_v3() };
        let t = synthesize_latent(&g).unwrap();
        // Group-limited: a token's 8 experts come from at most 4 groups of 32.
        for tok in t.topk_ids.chunks(8) {
            let mut groups: Vec<u32> = tok.iter().map(|e| e / 32).collect();
            groups.sort_unstable();
            groups.dedup();
            assert!(groups.len() <= 4, "{tok:?}");
        }
    }

    #[test]
    fn affinity_comes_from_the_state_persisting() {
        // No topic: what carries a token's routing from layer to layer is its own state alone.
        let stats = |p| RoutingStats::from_trace(&synthesize_latent(&LatentConfig { topic_share: 0.0, ..small(p, 3) }).unwrap(), None);
        let (kept, fresh) = (concentration(&stats(0.95)), concentration(&stats(0.0)));
        assert!(kept > 1.15 * fresh, "persistent state {kept:.3} vs fresh every layer {fresh:.3}");
    }

    #[test]
    fn another_domain_mix_moves_the_loads() {
        let mix = |w: Vec<f64>| {
            let cfg = LatentConfig { domain_weights: w, domain_separation: 2.0, ..small(0.8, 5) };
            RoutingStats::from_trace(&synthesize_latent(&cfg).unwrap(), None)
        };
        let (a, b) = (mix(vec![1.0, 0.0, 0.0, 0.0]), mix(vec![0.0, 0.0, 0.0, 1.0]));
        let share = |s: &RoutingStats, l: usize| -> Vec<f64> {
            let t: f64 = s.load[l].iter().sum();
            s.load[l].iter().map(|x| x / t).collect()
        };
        let tv: f64 = share(&a, 0).iter().zip(share(&b, 0)).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0;
        assert!(tv > 0.2, "total variation {tv:.3} between two domains");
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        for (cfg, field) in [
            (LatentConfig { groups: Some((7, 2)), ..LatentConfig::default() }, "groups"),
            (LatentConfig { persistence: 1.5, ..LatentConfig::default() }, "persistence"),
            (LatentConfig { domain_weights: vec![1.0], ..LatentConfig::default() }, "domain_weights"),
            (LatentConfig { top_k: 0, ..LatentConfig::default() }, "top_k"),
        ] {
            let e = synthesize_latent(&cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
