//! [`BackoffPolicy`]: the retry schedule of SSH reconnects, health re-checks, `manager.retry` and
//! the recovery layer.

use std::time::Duration;

use super::Profile;

/// Exponential backoff with jitter.
///
/// Delay *n* (from 0) is `min(initial_delay × factorⁿ, max_delay)`, plus a random extra of up to
/// `jitter` × that delay. [`delays`](BackoffPolicy::delays) yields the schedule.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// First delay.
    pub initial_delay: Duration,
    /// Growth factor (>= 1.0).
    pub factor: f64,
    /// Cap of one delay (before jitter).
    pub max_delay: Duration,
    /// Add up to this fraction of the delay at random (0.0..=1.0).
    pub jitter: f64,
    /// Give up after this many retries; 0 = never.
    pub max_retries: u32,
    /// Give up once the delays slept since the first failure would exceed this; `None` = no limit.
    pub max_elapsed: Option<Duration>,
}

/// A `backoff` 0.4 policy as a [`BackoffPolicy`] (feature `backoff`), for code that already
/// configures one.
///
/// The intervals, multiplier and `max_elapsed_time` carry over; `randomization_factor` becomes
/// [`jitter`](BackoffPolicy::jitter) (clamped to `0.0..=1.0`). `backoff` spreads a delay to
/// `d ± d × factor`; ours adds up to `d × jitter`, so a jittered delay is never shorter than the
/// schedule. `backoff` has no retry count: `max_retries` is 0 (bounded by `max_elapsed` only).
///
/// ```
/// use std::time::Duration;
/// use sea_orm_tunnel::config::BackoffPolicy;
///
/// let theirs = backoff::ExponentialBackoffBuilder::new()
///     .with_initial_interval(Duration::from_millis(250))
///     .with_max_elapsed_time(Some(Duration::from_secs(30)))
///     .build();
/// let ours = BackoffPolicy::from(&theirs);
/// assert_eq!(ours.initial_delay, Duration::from_millis(250));
/// assert_eq!(ours.max_elapsed, Some(Duration::from_secs(30)));
/// ```
#[cfg(feature = "backoff")]
impl<C> From<&backoff::exponential::ExponentialBackoff<C>> for BackoffPolicy {
    fn from(b: &backoff::exponential::ExponentialBackoff<C>) -> Self {
        BackoffPolicy::new(b.initial_interval)
            .factor(b.multiplier.max(1.0))
            .max_delay(b.max_interval.max(b.initial_interval))
            .jitter(b.randomization_factor.clamp(0.0, 1.0))
            .max_retries(0)
            .max_elapsed(b.max_elapsed_time)
    }
}

impl BackoffPolicy {
    /// Exponential backoff starting at `initial_delay`: factor 2 (the usual doubling), at most
    /// 30 s per delay, 20 % jitter, no retry or time limit.
    pub fn new(initial_delay: Duration) -> Self {
        BackoffPolicy {
            initial_delay,
            factor: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
            max_retries: 0,
            max_elapsed: None,
        }
    }

    /// SSH reconnects for `profile`: `SSH_RETRY_DELAY` first (1 s / 2 s), doubling, at most 30 s
    /// per delay, 20 % jitter, `SSH_MAX_RETRIES` attempts (3 / 5), no time limit.
    ///
    /// 30 s caps the wait after a bastion reboot; the jitter keeps many instances that lost the
    /// same bastion from reconnecting in lockstep.
    pub fn reconnect(profile: Profile) -> Self {
        let d = profile.defaults();
        Self::new(d.ssh_retry_delay).max_retries(d.ssh_max_retries)
    }

    /// Retrying a failed database operation (`manager.retry`, the recovery layer): 100 ms first,
    /// doubling, at most 2 s per delay, 50 % jitter, 3 retries, at most 5 s of sleeping in all.
    ///
    /// A lost SSH session is replaced in ~0.1–1 s, which 100 + 200 + 400 ms cover;
    /// the wide jitter spreads the retries of many requests that failed together; the time limit
    /// keeps a request from hanging when the retries are raised.
    pub fn retry() -> Self {
        Self::new(Duration::from_millis(100))
            .max_delay(Duration::from_secs(2))
            .jitter(0.5)
            .max_retries(3)
            .max_elapsed(Duration::from_secs(5))
    }

    /// Health re-checks after a failure: 500 ms first, doubling, at most 10 s per delay, 20 %
    /// jitter, until healthy again.
    ///
    /// Recovery is noticed within seconds instead of a whole health interval, while an outage
    /// costs at most one probe per 10 s.
    pub fn health_recheck() -> Self {
        Self::new(Duration::from_millis(500)).max_delay(Duration::from_secs(10))
    }

    /// First delay.
    #[must_use]
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Growth factor of each delay; at least 1.0.
    #[must_use]
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Cap of one delay before jitter.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Fraction of each delay (0.0..=1.0) added at random: a delay `d` becomes a uniform value in
    /// `[d, d × (1 + jitter))`. 0 disables jitter.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Give up after this many retries; 0 = never.
    #[must_use]
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Give up once the delays slept would add up to more than this; `None` = no limit.
    #[must_use]
    pub fn max_elapsed(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.max_elapsed = limit.into();
        self
    }

    /// The delays to sleep before each retry, ending when `max_retries` or `max_elapsed` is
    /// reached (never, if neither is set).
    ///
    /// Delay *n* (from 0) is `min(initial_delay × factorⁿ, max_delay)`, then up to `jitter` × that
    /// delay is added at random. The schedule ends before the first delay that would bring the
    /// sum of the delays yielded past `max_elapsed`, so the limit holds for what callers sleep,
    /// jitter included. The arithmetic is in whole nanoseconds (exact for delays below 100 days),
    /// so `100 ms × 2` is exactly 200 ms.
    ///
    /// An invalid policy (see [`validate`](Self::validate)) does not panic here: a factor that is
    /// below 1 or not finite counts as 1, a jitter outside `0.0..=1.0` is clamped (NaN counts as
    /// 0).
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        Delays::new(self, fastrand::Rng::new())
    }

    /// [`delays`](Self::delays) with a seeded random source, for reproducible schedules.
    pub fn delays_seeded(&self, seed: u64) -> impl Iterator<Item = Duration> + Send + 'static {
        Delays::new(self, fastrand::Rng::with_seed(seed))
    }
}

/// The iterator behind [`BackoffPolicy::delays`].
struct Delays {
    /// The next delay before jitter, in nanoseconds (`f64`: it is multiplied by the factor).
    next: f64,
    factor: f64,
    max_delay: f64,
    jitter: f64,
    /// Delays left; `None` = unlimited.
    remaining: Option<u32>,
    /// Sum of the delays yielded so far, against `max_elapsed`.
    slept: Duration,
    max_elapsed: Option<Duration>,
    rng: fastrand::Rng,
}

impl Delays {
    fn new(policy: &BackoffPolicy, rng: fastrand::Rng) -> Self {
        let factor = if policy.factor.is_finite() {
            policy.factor.max(1.0)
        } else {
            1.0
        };
        let jitter = if policy.jitter.is_nan() {
            0.0
        } else {
            policy.jitter.clamp(0.0, 1.0)
        };
        Delays {
            next: policy.initial_delay.as_nanos() as f64,
            factor,
            max_delay: policy.max_delay.as_nanos() as f64,
            jitter,
            remaining: (policy.max_retries > 0).then_some(policy.max_retries),
            slept: Duration::ZERO,
            max_elapsed: policy.max_elapsed,
            rng,
        }
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.remaining == Some(0) {
            return None;
        }
        let base = self.next.min(self.max_delay);
        // The next base stops growing at the cap, so it never overflows.
        self.next = (base * self.factor).min(self.max_delay);
        // Floor keeps a jittered delay below `base × (1 + jitter)`.
        let nanos = (base + (base * self.jitter * self.rng.f64()).floor()).round();
        // `as` saturates: an absurd delay (hundreds of years) is capped, not wrapped.
        let delay = Duration::from_nanos(nanos as u64);
        let slept = self.slept.saturating_add(delay);
        if self.max_elapsed.is_some_and(|limit| slept > limit) {
            // Fused: a later, shorter delay does not sneak in under the limit.
            self.remaining = Some(0);
            return None;
        }
        self.slept = slept;
        if let Some(n) = &mut self.remaining {
            *n -= 1;
        }
        Some(delay)
    }
}

impl Default for BackoffPolicy {
    /// [`BackoffPolicy::retry`].
    fn default() -> Self {
        Self::retry()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_are_exact_and_capped() {
        let p = BackoffPolicy::new(ms(100))
            .factor(1.5)
            .jitter(0.0)
            .max_delay(ms(400))
            .max_retries(6);
        let got: Vec<_> = p.delays().collect();
        assert_eq!(
            got,
            [
                ms(100),
                ms(150),
                ms(225),
                Duration::from_micros(337_500),
                ms(400),
                ms(400)
            ]
        );
        // The cap applies to the first delay as well.
        let p = BackoffPolicy::new(ms(100)).jitter(0.0).max_delay(ms(50)).max_retries(2);
        assert_eq!(p.delays().collect::<Vec<_>>(), [ms(50), ms(50)]);
    }

    #[test]
    fn max_elapsed_ends_the_schedule_for_good() {
        // 100 + 100 = 200 <= 250; the third would pass it, and nothing follows.
        let mut d = BackoffPolicy::new(ms(100))
            .factor(1.0)
            .jitter(0.0)
            .max_elapsed(ms(250))
            .delays();
        assert_eq!((d.next(), d.next(), d.next()), (Some(ms(100)), Some(ms(100)), None));
        assert_eq!(d.next(), None);
    }

    #[test]
    fn absurd_policies_do_not_panic() {
        let huge = Duration::from_secs(u64::MAX);
        let p = BackoffPolicy::new(huge).max_delay(huge).factor(f64::MAX).jitter(1.0);
        let got: Vec<_> = p.delays().take(3).collect();
        assert_eq!(got.len(), 3);
        assert!(
            got.iter().all(|d| *d >= Duration::from_secs(500 * 365 * 86_400)),
            "{got:?}"
        );
        // A factor below 1 counts as 1, a negative jitter as 0.
        let p = BackoffPolicy::new(ms(10)).factor(0.5).jitter(-1.0).max_retries(3);
        assert_eq!(p.delays().collect::<Vec<_>>(), [ms(10), ms(10), ms(10)]);
    }
}
