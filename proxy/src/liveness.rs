//! Heartbeats from the proxy threads, so a watchdog can tell a wedged thread from a quiet one.
//!
//! [`serve_per_core`](crate::server::serve_per_core) runs `:443` on threads of its own, each
//! with its own runtime. A watchdog that pings systemd from the daemon's main runtime proves
//! only that runtime turns: a proxy thread stuck in a blocking call or a busy loop would go on
//! being reported healthy while every connection it accepted hangs. Each proxy thread
//! therefore runs a small task that stamps the time on every beat; the task can only run
//! when the thread's event loop does, so a stamp that stops advancing means the thread has.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A stamp that marks a heart as stopped on purpose (its thread finished): never stalled.
const STOPPED: u64 = u64::MAX;

/// The set of proxy threads' hearts. Cheap to clone; all clones see the same threads.
#[derive(Clone, Debug)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Stamps are milliseconds since this instant (an `Instant` does not fit an atomic).
    origin: Instant,
    /// How often each heart beats.
    interval: Duration,
    hearts: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new(Duration::from_secs(1))
    }
}

impl Liveness {
    /// Hearts added to this set beat every `interval`.
    pub fn new(interval: Duration) -> Self {
        Liveness { inner: Arc::new(Inner { origin: Instant::now(), interval, hearts: Mutex::new(Vec::new()) }) }
    }

    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    /// A new heart named `name`, counted as beating now. Dropping it marks it stopped, so a
    /// thread that ends (a drained listener) is not mistaken for a stalled one.
    pub fn add(&self, name: impl Into<String>) -> Heart {
        let stamp = Arc::new(AtomicU64::new(self.now_ms()));
        if let Ok(mut hearts) = self.inner.hearts.lock() {
            hearts.push((name.into(), stamp.clone()));
        }
        Heart { stamp, liveness: self.clone() }
    }

    /// Names of the hearts that have not beaten for longer than `max_age`. A threshold below
    /// a few beat intervals would report a thread that is merely busy between two beats, so
    /// it is raised to three intervals.
    pub fn stalled(&self, max_age: Duration) -> Vec<String> {
        let max_age = max_age.max(3 * self.inner.interval).as_millis() as u64;
        let now = self.now_ms();
        let Ok(hearts) = self.inner.hearts.lock() else {
            return Vec::new();
        };
        hearts
            .iter()
            .filter(|(_, stamp)| {
                let last = stamp.load(Ordering::Relaxed);
                last != STOPPED && now.saturating_sub(last) > max_age
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.inner.origin.elapsed().as_millis() as u64
    }
}

/// One thread's heart: [`beat`](Heart::beat) it from the thread's event loop.
#[derive(Debug)]
pub struct Heart {
    stamp: Arc<AtomicU64>,
    liveness: Liveness,
}

impl Heart {
    pub fn beat(&self) {
        self.stamp.store(self.liveness.now_ms(), Ordering::Relaxed);
    }

    /// Beats every interval for as long as the runtime it is spawned on turns.
    pub async fn keep_beating(self) {
        let mut tick = tokio::time::interval(self.liveness.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.beat();
        }
    }
}

impl Drop for Heart {
    fn drop(&mut self) {
        self.stamp.store(STOPPED, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heart_that_stops_beating_is_reported_and_a_dropped_one_is_not() {
        let liveness = Liveness::new(Duration::from_millis(10));
        let beating = liveness.add("beating");
        let silent = liveness.add("silent");
        let finished = liveness.add("finished");
        drop(finished);
        std::thread::sleep(Duration::from_millis(60));
        beating.beat();
        assert_eq!(liveness.stalled(Duration::from_millis(40)), vec!["silent".to_string()]);
        silent.beat();
        assert!(liveness.stalled(Duration::from_millis(40)).is_empty());
    }

    #[test]
    fn the_threshold_is_never_below_three_beats() {
        // Seconds, not milliseconds: a loaded test machine can oversleep by tens of them.
        let liveness = Liveness::new(Duration::from_millis(500));
        let _heart = liveness.add("busy");
        std::thread::sleep(Duration::from_millis(800));
        // 0.8 s without a beat is over one interval but under three (1.5 s): busy, not stalled.
        assert!(liveness.stalled(Duration::from_millis(1)).is_empty());
    }
}
