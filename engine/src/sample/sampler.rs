//! Choosing the next token.
//!
//! [`Sampler`]: greedy at temperature 0 (the first maximal logit, as `argmax` does),
//! otherwise softmax at a temperature over the top-k and then the top-p nucleus, drawn
//! with a seeded SplitMix64 generator, so a seed fixes the output. [`top_logprobs`] is
//! the log-softmax in f64. Turning tokens back into text is `crate::sample::detok`'s.

use crate::error::{Error, Result};
pub use crate::request::SamplingParams;
pub use crate::rng::SplitMix64;

/// Picks tokens from logits according to [`SamplingParams`].
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

/// Index of the first maximal value (the first of equal maxima).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = SplitMix64::new(params.seed);
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick one token id from a row of logits (vocab,).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::InvalidInput(
                "cannot sample from empty logits".into(),
            ));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::InvalidInput(
                "the model produced NaN logits; try --dtype f32".into(),
            ));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let inv_t = 1.0 / self.params.temperature as f64;
        // Candidates in descending logit order (ties by id, for determinism).
        let mut cand: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        match self.params.top_k {
            Some(k) if k > 0 && k < cand.len() => {
                cand.select_nth_unstable_by(k - 1, by_logit);
                cand.truncate(k);
            }
            _ => {}
        }
        cand.sort_unstable_by(by_logit);
        let max = logits[cand[0] as usize] as f64;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if let Some(top_p) = self.params.top_p {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * kept_total;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return Ok(cand[i]);
            }
            u -= p;
        }
        Ok(cand[keep - 1])
    }
}

/// Log-softmax of a row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// The `k` most likely tokens with their log-probabilities (f64), most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f64)> {
    top_of_logprobs(&log_softmax(logits), k)
}

/// The `k` largest entries of a row of log-probabilities, most likely first (ties: the
/// lower id first).
pub fn top_of_logprobs(lp: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut ids: Vec<u32> = (0..lp.len() as u32).collect();
    let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    let k = k.min(ids.len());
    if k == 0 {
        return Vec::new();
    }
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by);
        ids.truncate(k);
    }
    ids.sort_unstable_by(by);
    ids.into_iter().map(|i| (i, lp[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::detok::StopStrings;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(3),
            top_p: None,
            seed: 42,
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        // the top 3 logits are 1.8 at ids 6, 13, 20 (ties broken by id)
        assert!(a.iter().all(|&t| t == 6 || t == 13 || t == 20), "{a:?}");
        let b = draw(&SamplingParams { seed: 43, ..params });
        assert_ne!(a, b);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ~ 0.665, 0.245, 0.09
        let logits = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
            seed: 1,
        })
        .unwrap();
        assert!((0..100).all(|_| s.sample(&logits).unwrap() == 0));
    }

    #[test]
    fn bad_params_are_errors() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: Some(0.0),
            ..Default::default()
        }
        .validate()
        .is_err());
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert!(s.sample(&[f32::NAN, 1.0]).is_err());
    }

    #[test]
    fn logprobs_sum_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        let top = top_logprobs(&[1.0, 2.0, 3.0], 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn stop_strings_hold_back_and_cut() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), "hello ");
        assert_eq!(s.push("N"), "");
        assert_eq!(s.push("D and more"), "");
        assert!(s.stopped());
        assert_eq!(s.text(), "hello ");

        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("a E"), "a ");
        assert_eq!(s.push("x"), "Ex");
        assert_eq!(s.push("é EN"), "é ");
        assert_eq!(s.finish(), "EN");
    }
}
