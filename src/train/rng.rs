//! The worker's own random number generator: seeded, portable and savable.
//!
//! Candle's CPU generator cannot be seeded and its state cannot be saved, so every random
//! choice in training (initial weights, dropout masks, data order, the eval split) draws from
//! this generator instead, on the host. Its whole state is one `u64`, which a checkpoint
//! stores to make resumed runs bit-identical. It must not be used for anything where
//! unpredictability matters (it is SplitMix64, not a cryptographic generator).

use serde::{Deserialize, Serialize};

/// SplitMix64's increment (the golden ratio in 64-bit fixed point).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64: a tiny generator whose state is a single counter, so it can be saved and
/// restored exactly. Streams for different purposes are derived with [`Rng::derive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    /// The generator's complete state.
    pub state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// An independent stream for `purpose` (e.g. `"shuffle"`) and `index` (e.g. the epoch),
    /// so that one stream's draws never shift another's.
    pub fn derive(seed: u64, purpose: &str, index: u64) -> Self {
        let mut h = Rng::new(seed ^ 0x5851_f42d_4c95_7f2d);
        for b in purpose.bytes() {
            h.state ^= u64::from(b);
            h.next_u64();
        }
        h.state ^= index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Rng::new(h.next_u64())
    }

    /// Moves the generator past `n` draws at once, as `n` calls of [`Self::next_u64`] would
    /// (SplitMix64's state is a counter: the i-th draw depends only on the start and i, which
    /// is what lets dropout masks be drawn in parallel).
    pub fn skip(&mut self, n: u64) {
        self.state = self.state.wrapping_add(n.wrapping_mul(GAMMA));
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)`; `n` must be > 0. Uses rejection so every value is equally likely.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fills `out` with normal draws of mean 0 and standard deviation `std` (Box–Muller,
    /// both values of each pair used).
    pub fn fill_normal(&mut self, out: &mut [f32], std: f64) {
        let mut chunks = out.chunks_mut(2);
        for pair in &mut chunks {
            // 1 - u keeps the logarithm's argument in (0, 1].
            let u1 = 1.0 - self.next_f64();
            let u2 = self.next_f64();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let theta = 2.0 * std::f64::consts::PI * u2;
            pair[0] = (r * theta.cos()) as f32;
            if pair.len() > 1 {
                pair[1] = (r * theta.sin()) as f32;
            }
        }
    }

    /// Fills `out` uniformly from `[-bound, bound)`.
    pub fn fill_uniform(&mut self, out: &mut [f32], bound: f64) {
        for x in out {
            *x = ((self.next_f64() * 2.0 - 1.0) * bound) as f32;
        }
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restoring_the_state_replays_the_stream() {
        let mut a = Rng::new(7);
        a.next_u64();
        let saved = a;
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let mut b = saved;
        let again: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(first, again);
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }

    #[test]
    fn derived_streams_differ_and_are_stable() {
        let a = Rng::derive(1, "shuffle", 0);
        assert_eq!(a, Rng::derive(1, "shuffle", 0));
        assert_ne!(a, Rng::derive(1, "shuffle", 1));
        assert_ne!(a, Rng::derive(1, "dropout", 0));
    }

    #[test]
    fn normals_have_the_right_moments_and_permutations_are_complete() {
        let mut r = Rng::new(3);
        let mut v = vec![0f32; 20001];
        r.fill_normal(&mut v, 2.0);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "{var}");
        let mut p = r.permutation(100);
        assert_ne!(p, (0..100).collect::<Vec<_>>());
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
