//! Capped exponential backoff with jitter, for every retry in the daemon (Docker, SSM,
//! ACME, crashed containers).
//!
//! "Equal jitter": each delay is half the exponential step plus a random part of the other
//! half. The random part keeps a fleet that failed together from retrying together; the
//! fixed half keeps successive delays growing, so a crash loop visibly slows down.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial: initial.max(Duration::from_millis(1)), max: max.max(initial), failures: 0 }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step(self.failures);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// The un-jittered step after `failures` failures: initial × 2^failures, capped.
    pub fn step(&self, failures: u32) -> Duration {
        self.initial
            .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// After a success (or a long enough healthy stretch): start from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let step = b.step(i as u32);
            assert!(*d >= step / 2 && *d <= step, "delay {i} = {d:?} outside [{:?}, {step:?}]", step / 2);
        }
        assert_eq!(b.step(10), Duration::from_secs(8));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
