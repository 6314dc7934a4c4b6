//! Fair-share accounting: GPU-seconds per user, decayed with a half-life so that recent use
//! counts more than old use. Rebuilt from the store at start-up (each finished job's
//! `gpu_seconds` at its finish time, plus what removed jobs had used, which `clean` keeps
//! in the store), so neither a restart nor a clean resets fairness.

use std::collections::HashMap;
use std::time::Duration;

use crate::spec::{JobRecord, Millis};

pub struct Ledger {
    half_life_ms: f64,
    per_user: HashMap<String, (f64, Millis)>,
}

impl Ledger {
    pub fn new(half_life: Duration) -> Self {
        Ledger {
            half_life_ms: half_life.as_millis().max(1) as f64,
            per_user: HashMap::new(),
        }
    }

    fn decay(&self, value: f64, from: Millis, to: Millis) -> f64 {
        if to <= from {
            return value;
        }
        value * 0.5f64.powf((to - from) as f64 / self.half_life_ms)
    }

    /// Adds `seconds` of GPU time used by `user`, ending at `at`.
    pub fn add(&mut self, user: &str, seconds: f64, at: Millis) {
        if seconds <= 0.0 {
            return;
        }
        let old = self.per_user.get(user).copied().unwrap_or((0.0, at));
        let merged = self.merge(old, (seconds, at));
        self.per_user.insert(user.to_string(), merged);
    }

    /// Two amounts of use, each as of its time, as one as of the later time.
    pub fn merge(&self, (a, a_at): (f64, Millis), (b, b_at): (f64, Millis)) -> (f64, Millis) {
        if b_at >= a_at {
            (self.decay(a, a_at, b_at) + b, b_at)
        } else {
            (a + self.decay(b, b_at, a_at), a_at)
        }
    }

    /// Counts a job's past GPU time (at start-up).
    pub fn record_finished(&mut self, job: &JobRecord) {
        if job.gpu_seconds > 0.0 {
            self.add(
                &job.owner.user,
                job.gpu_seconds,
                job.finished_at.unwrap_or(job.updated_at),
            );
        }
    }

    /// Decayed usage per user at `now`, including the running jobs' GPU time so far.
    pub fn snapshot<'a>(
        &self,
        now: Millis,
        running: impl Iterator<Item = &'a JobRecord>,
    ) -> HashMap<String, f64> {
        let mut out: HashMap<String, f64> = self
            .per_user
            .iter()
            .map(|(u, (v, at))| (u.clone(), self.decay(*v, *at, now)))
            .collect();
        for job in running {
            let gpus = job.placement.as_ref().map_or(0, |p| p.gpus.len()) as f64;
            let secs = job
                .started_at
                .map_or(0.0, |s| (now - s).max(0) as f64 / 1000.0);
            *out.entry(job.owner.user.clone()).or_default() += gpus * secs;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_halves_every_half_life() {
        let mut l = Ledger::new(Duration::from_secs(100));
        l.add("a", 1000.0, 0);
        let s = l.snapshot(100_000, std::iter::empty());
        assert!((s["a"] - 500.0).abs() < 1e-6);
        l.add("a", 500.0, 100_000);
        let s = l.snapshot(200_000, std::iter::empty());
        assert!((s["a"] - 500.0).abs() < 1e-6);
    }

    /// Use merged as of the later time, in either order: what `clean` carries.
    #[test]
    fn merges_as_of_the_later_time() {
        let l = Ledger::new(Duration::from_secs(100));
        let (v, at) = l.merge((1000.0, 0), (10.0, 100_000));
        assert_eq!(at, 100_000);
        assert!((v - 510.0).abs() < 1e-6);
        assert_eq!(l.merge((10.0, 100_000), (1000.0, 0)), (v, at));
    }
}
