//! The pool generation: one cutoff instant, owned by the manager, before which no pooled
//! connection is handed out again.
//!
//! Two things move it forward: the tunnel, when SSH sessions carrying pooled connections are lost
//! (every connection made before that instant may ride a dead channel), and the manager's health
//! check, when the database failed under a live connection. Both call [`Generation::retire_all`]
//! on the same value, and the pool's `before_acquire` / `after_release` rules read only this
//! value, computed from sqlx's connection metadata (`age`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic cutoff: connections created before it belong to a retired generation.
#[derive(Debug)]
pub(crate) struct Generation {
    /// The instant the offsets below are measured from.
    base: Instant,
    /// Nanoseconds after `base` of the cutoff, plus one; 0 = no cutoff yet.
    cutoff: AtomicU64,
    /// How many times the generation was retired.
    bumps: AtomicU64,
}

impl Default for Generation {
    fn default() -> Self {
        Generation::new()
    }
}

impl Generation {
    pub(crate) fn new() -> Generation {
        Generation {
            base: Instant::now(),
            cutoff: AtomicU64::new(0),
            bumps: AtomicU64::new(0),
        }
    }

    /// Every connection created before now is retired: never handed out again.
    pub(crate) fn retire_all(&self) {
        self.retire_before(Instant::now());
    }

    /// Every connection created before `at` is retired. The cutoff never moves back.
    pub(crate) fn retire_before(&self, at: Instant) {
        let offset = at
            .saturating_duration_since(self.base)
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64
            + 1;
        self.cutoff.fetch_max(offset, Ordering::AcqRel);
        self.bumps.fetch_add(1, Ordering::Relaxed);
    }

    /// The current cutoff, if a generation was ever retired.
    pub(crate) fn cutoff(&self) -> Option<Instant> {
        match self.cutoff.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    /// Whether a connection of this `age` (sqlx's `PoolConnectionMetadata::age`) was created
    /// before the cutoff.
    pub(crate) fn is_retired(&self, age: Duration) -> bool {
        let Some(cutoff) = self.cutoff() else {
            return false;
        };
        let now = Instant::now();
        let created = now.checked_sub(age).unwrap_or(self.base);
        created < cutoff
    }

    /// How many times [`retire_all`](Self::retire_all) (or `retire_before`) was called.
    pub(crate) fn bumps(&self) -> u64 {
        self.bumps.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_older_than_the_cutoff_are_retired() {
        let g = Generation::new();
        assert!(!g.is_retired(Duration::from_secs(3600)), "no cutoff yet");
        std::thread::sleep(Duration::from_millis(5));
        g.retire_all();
        assert_eq!(g.bumps(), 1);
        // Created 1 s ago: before the cutoff.
        assert!(g.is_retired(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(5));
        // Created just now: after it.
        assert!(!g.is_retired(Duration::ZERO));
    }

    #[test]
    fn the_cutoff_never_moves_back() {
        let g = Generation::new();
        let later = Instant::now() + Duration::from_secs(1);
        g.retire_before(later);
        g.retire_before(later - Duration::from_millis(500));
        assert_eq!(g.cutoff(), Some(later));
    }
}
