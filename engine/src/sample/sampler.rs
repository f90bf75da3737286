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

/// Index of the first maximal value (the first of equal maxima); NaNs are never the
/// maximum, except a NaN first value, whose index is returned (no value compares
/// greater than it). 0 for an empty slice.
///
/// Two passes a compiler vectorises (the maximum in 16 lanes, then the first index
/// holding it) rather than one compare-and-branch per logit: the greedy pick runs on
/// every decoded token, over the whole vocabulary, while the kernel threads wait.
pub fn argmax(logits: &[f32]) -> u32 {
    match logits.first() {
        None => return 0,
        Some(x) if x.is_nan() => return 0,
        Some(_) => {}
    }
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            // A NaN `x` compares false and leaves the lane as it was.
            *l = if x > *l { x } else { *l };
        }
    }
    let max = rest
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    // `max` is one of the values (or -inf, when the first value is -inf and no other
    // is larger), so the search finds it.
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// Whether any logit is NaN, in one pass without an early exit (which vectorises).
fn any_nan(logits: &[f32]) -> bool {
    logits.iter().fold(false, |seen, x| seen | x.is_nan())
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
        if any_nan(logits) {
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

    /// The lane-wise argmax picks what one compare per logit picks: ties, NaNs (first or
    /// not), infinities, lengths around the lane count.
    #[test]
    fn argmax_equals_the_plain_scan() {
        fn plain(xs: &[f32]) -> u32 {
            let mut best = 0usize;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] {
                    best = i;
                }
            }
            best as u32
        }
        let mut rng = SplitMix64::new(9);
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.5];
        for len in [0usize, 1, 2, 15, 16, 17, 33, 100, 49_152] {
            for trial in 0..40 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| {
                        let u = rng.next_f64();
                        match trial % 4 {
                            // few distinct values: many ties
                            0 => (u * 4.0).floor() as f32,
                            1 if u < 0.1 => special[(u * 60.0) as usize % special.len()],
                            _ => (u * 20.0 - 10.0) as f32,
                        }
                    })
                    .collect();
                assert_eq!(argmax(&xs), plain(&xs), "len {len}, trial {trial}: {xs:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), plain(&[f32::NAN, 1.0, 2.0]));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert!(any_nan(&[0.0, f32::NAN]) && !any_nan(&[0.0, f32::INFINITY]));
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
