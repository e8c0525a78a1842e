//! Synthetic routing: a small generative *model* of MoE routing, and sampling traces from it.
//!
//! The model (fixed by `model_seed`):
//! - **popularity**: per layer, experts follow a Zipf law (`p ∝ rank^-zipf_exponent`) over a random
//!   permutation of the experts (a different permutation per layer);
//! - **domains**: each domain re-shuffles a fraction `domain_shift` of the ranking positions of every
//!   layer among themselves, so domains share the overall shape but differ in which experts are hot;
//! - **transitions**: every expert of layer l has `transition_fanout` likely successors at layer
//!   l + 1 (drawn by layer-l+1 popularity, weights ∝ 1/(j+1)).
//!
//! Sampling (fixed by `seed`): every sequence belongs to one domain (uniformly drawn); every token's
//! k experts at layer l are drawn one at a time without replacement (duplicates rejected), each draw
//! from the mixture `β · successors(previous layer's primary) + (1 − β) · popularity(domain, l)` with
//! `β = transition_strength` for the primary (first) draw and `β = transition_strength / 2` for the
//! others (`β = 0` at layer 0). Weights: softmax over `ln p + Gumbel noise` of the chosen experts, the
//! primary forced highest, ids ordered by weight descending. Same `model_seed` with another `seed` is
//! a held-out sample of the same model.
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::trace::MAX_EXPERTS;
use crate::{RoutingTrace, TraceError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub num_sequences: usize,
    pub tokens_per_sequence: usize,
    /// Zipf exponent of expert popularity; 0 = uniform, 0.3–1.5 spans real models.
    pub zipf_exponent: f64,
    /// 0 = an expert choice is independent of the previous layer's; 1 = the primary expert is always
    /// one of the previous primary's successors.
    pub transition_strength: f64,
    /// Likely successors per expert (e.g. 2–4).
    pub transition_fanout: usize,
    /// Number of domains (each sequence belongs to one).
    pub domains: usize,
    /// Fraction (0–1) of every layer's popularity ranking each domain re-shuffles.
    pub domain_shift: f64,
    /// Defines popularity, transitions and domains.
    pub model_seed: u64,
    /// Defines the sampled sequences.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            num_layers: 8,
            num_experts: 32,
            top_k: 4,
            num_sequences: 64,
            tokens_per_sequence: 64,
            zipf_exponent: 0.8,
            transition_strength: 0.5,
            transition_fanout: 3,
            domains: 4,
            domain_shift: 0.3,
            model_seed: 0,
            seed: 1,
        }
    }
}

impl SynthConfig {
    /// DeepSeek-V3 shape: 58 MoE layers, 256 routed experts, top-8; 32 sequences x 128 tokens.
    pub fn deepseek_v3() -> Self {
        Self {
            num_layers: 58,
            num_experts: 256,
            top_k: 8,
            num_sequences: 32,
            tokens_per_sequence: 128,
            zipf_exponent: 0.7,
            transition_strength: 0.4,
            transition_fanout: 4,
            domains: 4,
            domain_shift: 0.3,
            ..Self::default()
        }
    }

    /// Mixtral 8x7B shape: 32 MoE layers, 8 experts, top-2; 32 sequences x 128 tokens.
    pub fn mixtral() -> Self {
        Self {
            num_layers: 32,
            num_experts: 8,
            top_k: 2,
            num_sequences: 32,
            tokens_per_sequence: 128,
            zipf_exponent: 0.4,
            transition_strength: 0.3,
            transition_fanout: 2,
            domains: 4,
            domain_shift: 0.5,
            ..Self::default()
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.num_sequences.saturating_mul(self.tokens_per_sequence)
    }

    /// Checks every field is in range; the error names the first that is not.
    pub fn validate(&self) -> Result<(), TraceError> {
        let bad = |m: String| Err(TraceError::Invalid(format!("synth config: {m}")));
        if self.num_layers == 0 {
            return bad("num_layers must be at least 1".into());
        }
        if self.num_experts == 0 || self.num_experts > MAX_EXPERTS {
            return bad(format!("num_experts {} is not in 1..={MAX_EXPERTS}", self.num_experts));
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad(format!("top_k {} is not in 1..={}", self.top_k, self.num_experts));
        }
        if self.num_sequences == 0 || self.tokens_per_sequence == 0 {
            return bad("num_sequences and tokens_per_sequence must be at least 1".into());
        }
        let tokens = self.num_sequences as u128 * self.tokens_per_sequence as u128;
        if tokens * self.num_layers as u128 * self.top_k as u128 > (1u128 << 32) {
            return bad(format!("{tokens} tokens x {} layers x k {} is too large", self.num_layers, self.top_k));
        }
        if !self.zipf_exponent.is_finite() || self.zipf_exponent < 0.0 || self.zipf_exponent > 10.0 {
            return bad(format!("zipf_exponent {} is not in 0..=10", self.zipf_exponent));
        }
        if !(0.0..=1.0).contains(&self.transition_strength) {
            return bad(format!("transition_strength {} is not in 0..=1", self.transition_strength));
        }
        if self.transition_fanout == 0 {
            return bad("transition_fanout must be at least 1".into());
        }
        if self.domains == 0 || self.domains > 1024 {
            return bad(format!("domains {} is not in 1..=1024", self.domains));
        }
        if !(0.0..=1.0).contains(&self.domain_shift) {
            return bad(format!("domain_shift {} is not in 0..=1", self.domain_shift));
        }
        Ok(())
    }
}

/// Walker/Vose alias table: O(1) draws from a fixed categorical distribution.
#[derive(Debug, Clone)]
struct Alias {
    prob: Vec<f64>,
    alias: Vec<u32>,
}

impl Alias {
    fn new(p: &[f64]) -> Self {
        let n = p.len();
        let total: f64 = p.iter().sum();
        let mut scaled: Vec<f64> = p.iter().map(|x| x * n as f64 / total).collect();
        let mut prob = vec![1.0; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            prob[s] = scaled[s];
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        Self { prob, alias }
    }

    #[inline]
    fn sample(&self, rng: &mut StdRng) -> usize {
        let i = rng.random_range(0..self.prob.len());
        if rng.random::<f64>() < self.prob[i] { i } else { self.alias[i] as usize }
    }
}

/// The routing model a [`SynthConfig`] defines through `model_seed` (independent of `seed` and of
/// the sample sizes).
#[derive(Debug, Clone)]
pub struct SynthModel {
    num_layers: usize,
    num_experts: usize,
    domains: usize,
    fanout: usize,
    /// `[domain * L + l][e]`, normalised.
    popularity: Vec<Vec<f64>>,
    /// `[domain * L + l][i]`: experts in descending popularity.
    ranking: Vec<Vec<u32>>,
    alias: Vec<Alias>,
    /// `[l][e * fanout + j]`: successors at layer l + 1 of expert e of layer l (`L - 1` layers).
    successors: Vec<Vec<u32>>,
    /// cumulative successor weights, `fanout` entries ending in 1.
    successor_cdf: Vec<f64>,
}

impl SynthModel {
    pub fn new(cfg: &SynthConfig) -> Result<Self, TraceError> {
        cfg.validate()?;
        let (nl, ne) = (cfg.num_layers, cfg.num_experts);
        let fanout = cfg.transition_fanout.min(ne);
        let mut rng = StdRng::seed_from_u64(cfg.model_seed ^ 0x0005_EED0_FA0D_E1A5);
        let zipf: Vec<f64> = (0..ne).map(|r| ((r + 1) as f64).powf(-cfg.zipf_exponent)).collect();
        let zsum: f64 = zipf.iter().sum();

        let base: Vec<Vec<u32>> = (0..nl)
            .map(|_| {
                let mut p: Vec<u32> = (0..ne as u32).collect();
                p.shuffle(&mut rng);
                p
            })
            .collect();
        let shifted = ((cfg.domain_shift * ne as f64).round() as usize).min(ne);
        let mut popularity = Vec::with_capacity(cfg.domains * nl);
        let mut ranking = Vec::with_capacity(cfg.domains * nl);
        for _ in 0..cfg.domains {
            for perm in &base {
                let mut perm = perm.clone();
                if shifted >= 2 {
                    let mut pos: Vec<usize> = (0..ne).collect();
                    pos.shuffle(&mut rng);
                    let pos = &pos[..shifted];
                    let mut vals: Vec<u32> = pos.iter().map(|&i| perm[i]).collect();
                    vals.shuffle(&mut rng);
                    for (&i, v) in pos.iter().zip(vals) {
                        perm[i] = v;
                    }
                }
                let mut p = vec![0.0; ne];
                for (r, &e) in perm.iter().enumerate() {
                    p[e as usize] = zipf[r] / zsum;
                }
                popularity.push(p);
                ranking.push(perm);
            }
        }
        let alias = popularity.iter().map(|p| Alias::new(p)).collect();

        // successors of layer l's experts drawn by layer l+1's base popularity, without replacement
        let mut successors = Vec::with_capacity(nl.saturating_sub(1));
        for l in 0..nl.saturating_sub(1) {
            let mut next = vec![0.0; ne];
            for (r, &e) in base[l + 1].iter().enumerate() {
                next[e as usize] = zipf[r];
            }
            let table = Alias::new(&next);
            let mut succ = Vec::with_capacity(ne * fanout);
            let mut pick: Vec<u32> = Vec::with_capacity(fanout);
            for _ in 0..ne {
                // `fanout` distinct draws by popularity (rejection; falls back to a scan when long)
                pick.clear();
                let mut attempts = 0;
                while pick.len() < fanout && attempts < 64 * fanout + 256 {
                    attempts += 1;
                    let e = table.sample(&mut rng) as u32;
                    if !pick.contains(&e) {
                        pick.push(e);
                    }
                }
                for &e in &base[l + 1] {
                    if pick.len() == fanout {
                        break;
                    }
                    if !pick.contains(&e) {
                        pick.push(e);
                    }
                }
                succ.extend_from_slice(&pick);
            }
            successors.push(succ);
        }
        let w: Vec<f64> = (0..fanout).map(|j| 1.0 / (j + 1) as f64).collect();
        let ws: f64 = w.iter().sum();
        let mut acc = 0.0;
        let mut successor_cdf: Vec<f64> = w
            .iter()
            .map(|x| {
                acc += x / ws;
                acc
            })
            .collect();
        if let Some(last) = successor_cdf.last_mut() {
            *last = 1.0;
        }
        Ok(Self { num_layers: nl, num_experts: ne, domains: cfg.domains, fanout, popularity, ranking, alias, successors, successor_cdf })
    }

    /// Popularity (probability of a draw, before transitions) of every expert of `layer` in `domain`.
    pub fn popularity(&self, domain: usize, layer: usize) -> &[f64] {
        &self.popularity[domain * self.num_layers + layer]
    }

    /// Likely successors at layer `layer + 1` of expert `e` of `layer`, most likely first.
    pub fn successors(&self, layer: usize, e: usize) -> &[u32] {
        &self.successors[layer][e * self.fanout..(e + 1) * self.fanout]
    }

    #[inline]
    fn draw_successor(&self, layer: usize, prev: usize, rng: &mut StdRng) -> usize {
        let u = rng.random::<f64>();
        let j = self.successor_cdf.iter().position(|&c| u < c).unwrap_or(self.fanout - 1);
        self.successors[layer][prev * self.fanout + j] as usize
    }

    /// Samples `cfg.num_sequences x cfg.tokens_per_sequence` tokens with `cfg.seed` (the model's own
    /// shape wins over `cfg`'s model fields; `cfg.top_k` must not exceed the model's expert count).
    pub fn sample(&self, cfg: &SynthConfig) -> Result<RoutingTrace, TraceError> {
        cfg.validate()?;
        let (nl, ne, k) = (self.num_layers, self.num_experts, cfg.top_k);
        if k > ne {
            return Err(TraceError::Invalid(format!("synth config: top_k {k} exceeds num_experts {ne}")));
        }
        let strength = cfg.transition_strength;
        let tokens = cfg.num_tokens();
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ cfg.model_seed);
        let mut ids = Vec::with_capacity(tokens * nl * k);
        let mut weights = Vec::with_capacity(tokens * nl * k);
        let mut seq_ids = Vec::with_capacity(tokens);
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        let mut z: Vec<(f64, usize)> = Vec::with_capacity(k);
        let max_attempts = 64 * k + 256;
        for s in 0..cfg.num_sequences {
            let domain = rng.random_range(0..self.domains);
            for _ in 0..cfg.tokens_per_sequence {
                seq_ids.push(s as i64);
                let mut prev: Option<usize> = None;
                for l in 0..nl {
                    let table = domain * nl + l;
                    let pop = &self.popularity[table];
                    chosen.clear();
                    let mut attempts = 0;
                    while chosen.len() < k && attempts < max_attempts {
                        attempts += 1;
                        let beta = if chosen.is_empty() { strength } else { strength * 0.5 };
                        let e = match prev {
                            Some(p) if beta > 0.0 && rng.random::<f64>() < beta => self.draw_successor(l - 1, p, &mut rng),
                            _ => self.alias[table].sample(&mut rng),
                        };
                        if !chosen.contains(&e) {
                            chosen.push(e);
                        }
                    }
                    if chosen.len() < k {
                        // Rejection ran long (k close to E under heavy skew): fill by popularity.
                        for &e in &self.ranking[table] {
                            if chosen.len() == k {
                                break;
                            }
                            if !chosen.contains(&(e as usize)) {
                                chosen.push(e as usize);
                            }
                        }
                    }
                    // weights: softmax over ln p + Gumbel, primary forced highest
                    z.clear();
                    for &e in &chosen {
                        let u: f64 = rng.random::<f64>().max(1e-300);
                        z.push((pop[e].max(1e-300).ln() - (-u.ln()).ln(), e));
                    }
                    let top = z.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
                    z[0].0 = top;
                    z[1..].sort_by(|a, b| b.0.total_cmp(&a.0));
                    let total: f64 = z.iter().map(|x| (x.0 - top).exp()).sum();
                    for &(v, e) in &z {
                        ids.push(e as u32);
                        weights.push(((v - top).exp() / total) as f32);
                    }
                    prev = Some(chosen[0]);
                }
            }
        }
        let trace = RoutingTrace {
            num_experts: ne,
            num_layers: nl,
            top_k: k,
            topk_ids: ids,
            topk_weights: Some(weights),
            seq_ids: Some(seq_ids),
        };
        trace.validate()?;
        Ok(trace)
    }
}

/// Builds the model of `cfg` (from `model_seed`) and samples a trace from it (with `seed`).
pub fn synthesize(cfg: &SynthConfig) -> Result<RoutingTrace, TraceError> {
    SynthModel::new(cfg)?.sample(cfg)
}
