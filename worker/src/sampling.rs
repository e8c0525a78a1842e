#![forbid(unsafe_code)]
//! Token sampling: greedy, temperature, top-k, top-p; deterministic for a given seed.

use crate::error::{ModelError, Result};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Sampling parameters of a request. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// RNG seed; `None` picks one from the request id.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::InvalidSampling(format!("temperature {} must be >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidSampling(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Index of the largest value (first on ties, NaN ignored).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best
}

/// Log-probabilities of one generated token, from the raw distribution `softmax(logits)`
/// (before temperature, top-k and top-p: what OpenAI's API reports).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The `n` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probability of `token` under `log_softmax(logits)` and the `top_n` most likely tokens.
/// Non-finite logits count as probability 0.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprobs {
    let mx = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !mx.is_finite() {
        return TokenLogprobs { logprob: f32::NEG_INFINITY, top: vec![] };
    }
    // log-sum-exp in f64: a vocabulary of 100k+ terms loses precision in f32.
    let lse = mx as f64 + logits.iter().filter(|x| x.is_finite()).map(|&x| ((x - mx) as f64).exp()).sum::<f64>().ln();
    let lp = |x: f32| if x.is_finite() { (x as f64 - lse) as f32 } else { f32::NEG_INFINITY };
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&x| lp(x));
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        // One pass keeping the best `top_n` (n <= 20): cheaper than sorting the vocabulary.
        for (i, &x) in logits.iter().enumerate() {
            if !x.is_finite() || (top.len() == top_n && x <= top[top_n - 1].1) {
                continue;
            }
            let at = top.partition_point(|&(_, y)| y >= x);
            top.insert(at, (i as u32, x));
            top.truncate(top_n);
        }
    }
    TokenLogprobs { logprob, top: top.into_iter().map(|(i, x)| (i, lp(x))).collect() }
}

/// A per-sequence sampler (owns its RNG, so results do not depend on batching).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams, default_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(default_seed);
        Sampler { params, rng: StdRng::seed_from_u64(seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits) as u32;
        }
        let t = self.params.temperature;
        let mut cand: Vec<(usize, f32)> =
            logits.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, &x)| (i, x / t)).collect();
        if cand.is_empty() {
            return argmax(logits) as u32;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let mx = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, x)| (x - mx).exp()).collect();
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r: f32 = self.rng.random::<f32>();
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if r < cum {
                return cand[i].0 as u32;
            }
        }
        cand[probs.len() - 1].0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_n_in_order() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let lp = logprobs(&logits, 2, 2);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
    }
}
