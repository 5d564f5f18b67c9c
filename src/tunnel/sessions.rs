//! The tunnel's set of SSH sessions: which ones are open, which one takes the next channel, when
//! another is opened for capacity or an idle extra one is retired, and what losing one means.
//!
//! Channels are reserved only on listed sessions and only under the set's lock, and a session is
//! retired only after it was seen with zero channels under that same lock, so no channel can land
//! on a session that is being closed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::inner::{Inner, lock};
use super::session::{self, SshSession};
use super::{LOG_TARGET, TunnelEvent, TunnelState};
use crate::Error;
use crate::config::{BastionHost, TunnelConfig};
use crate::generation::Generation;
use crate::observe::events as observe;

/// The live sessions of one tunnel, and what their losses mean for pooled connections.
pub(crate) struct SessionSet {
    /// Live sessions, oldest first (new channels fill the oldest session first).
    list: Mutex<Vec<Arc<SshSession>>>,
    /// A session is being opened for capacity (at most one at a time).
    opening: AtomicBool,
    /// When sessions that may have carried pooled connections were last lost.
    last_reconnect_at: Mutex<Option<Instant>>,
    /// The pool generation retired on such a loss.
    generation: Arc<Generation>,
}

impl SessionSet {
    pub(crate) fn new(generation: Arc<Generation>) -> SessionSet {
        SessionSet {
            list: Mutex::new(Vec::new()),
            opening: AtomicBool::new(false),
            last_reconnect_at: Mutex::new(None),
            generation,
        }
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.list).len()
    }

    pub(crate) fn last_reconnect_at(&self) -> Option<Instant> {
        *lock(&self.last_reconnect_at)
    }

    /// Pooled connections made before now may ride a dead session: retire them.
    fn mark_reconnect(&self) {
        let now = Instant::now();
        *lock(&self.last_reconnect_at) = Some(now);
        self.generation.retire_before(now);
    }

    /// Empties the set (shutdown); the caller closes the sessions.
    pub(crate) fn take_all(&self) -> Vec<Arc<SshSession>> {
        std::mem::take(&mut *lock(&self.list))
    }

    /// Aborts every listed session's socket.
    pub(crate) fn kill_all(&self) {
        for s in lock(&self.list).iter() {
            s.kill();
        }
    }
}

/// The bastions of one tunnel in failover order (`TunnelConfig::bastions()`), and what is known
/// about each. The rule (documented on `TunnelConfig::fallback_host`):
///
/// - a connect tries every bastion in configuration order, except that one that failed within
///   the last `cooldown` (`reconnect.max_delay`) goes after the others;
/// - a bastion that failed permanently (host key, authentication, ...) is not tried again during
///   the tunnel's life; its error is reported with the others when a connect fails;
/// - success clears a bastion's failure.
pub(crate) struct BastionSet {
    list: Vec<BastionEntry>,
    cooldown: Duration,
    /// The bastion the latest session was opened on (starts at the preferred one).
    current: AtomicUsize,
}

struct BastionEntry {
    address: BastionHost,
    name: Arc<str>,
    failed_at: Mutex<Option<Instant>>,
    permanent: Mutex<Option<Arc<Error>>>,
}

impl BastionSet {
    pub(crate) fn new(config: &TunnelConfig) -> BastionSet {
        BastionSet {
            list: config
                .bastions()
                .into_iter()
                .map(|address| BastionEntry {
                    name: address.to_string().into(),
                    address,
                    failed_at: Mutex::new(None),
                    permanent: Mutex::new(None),
                })
                .collect(),
            cooldown: config.reconnect.max_delay,
            current: AtomicUsize::new(0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// `host:port` of bastion `i`.
    pub(crate) fn name(&self, i: usize) -> &Arc<str> {
        &self.list[i].name
    }

    /// The bastions to try now, in order, and the errors of those skipped for good.
    fn order(&self) -> (Vec<usize>, Vec<(String, Error)>) {
        let now = Instant::now();
        let mut fresh = Vec::new();
        let mut cooling = Vec::new();
        let mut skipped = Vec::new();
        for (i, b) in self.list.iter().enumerate() {
            if let Some(e) = &*lock(&b.permanent) {
                skipped.push((b.name.to_string(), Error::clone(e)));
                continue;
            }
            match *lock(&b.failed_at) {
                Some(at) if now.duration_since(at) < self.cooldown => cooling.push((at, i)),
                _ => fresh.push(i),
            }
        }
        // Of the bastions that failed recently, the one that failed longest ago first.
        cooling.sort();
        fresh.extend(cooling.into_iter().map(|(_, i)| i));
        (fresh, skipped)
    }

    /// A connect to bastion `i` failed transiently, or a session on it was lost.
    pub(crate) fn failed(&self, i: usize) {
        *lock(&self.list[i].failed_at) = Some(Instant::now());
    }

    fn failed_permanently(&self, i: usize, error: Arc<Error>) {
        *lock(&self.list[i].permanent) = Some(error);
    }

    fn succeeded(&self, i: usize) {
        *lock(&self.list[i].failed_at) = None;
    }

    /// A session was opened on bastion `i`: whether that moves the tunnel to another bastion.
    fn switch_to(&self, i: usize) -> bool {
        self.current.swap(i, Ordering::AcqRel) != i
    }
}

/// A channel reserved on a session by [`Inner::try_reserve`] (so `max_channels` counts it):
/// released, and waiters for a free channel woken, on drop.
pub(crate) struct Reservation {
    inner: Arc<Inner>,
    session: Arc<SshSession>,
}

impl Reservation {
    pub(crate) fn session(&self) -> &Arc<SshSession> {
        &self.session
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.session.release_channel();
        self.inner.changed.notify_waiters();
    }
}

impl Inner {
    /// Opens a session on the first bastion that works, in [`BastionSet`] order. With one
    /// bastion its error is returned as it is; with several, [`Error::AllBastionsFailed`].
    pub(crate) async fn establish_on_some_bastion(&self) -> crate::Result<Arc<SshSession>> {
        let set = &self.bastions;
        if set.len() == 1 {
            return session::establish_on(self, 0, &set.list[0].address).await;
        }
        let (order, skipped) = set.order();
        let mut errors = Vec::new();
        for i in order {
            let name = set.name(i).clone();
            match session::establish_on(self, i, &set.list[i].address).await {
                Ok(session) => {
                    set.succeeded(i);
                    if set.switch_to(i) {
                        observe::bastion_failover(&name);
                        self.telemetry.count_failover(&name);
                    }
                    return Ok(session);
                }
                Err(e @ Error::ShutDown(_)) => return Err(e),
                Err(e) => {
                    let permanent = !e.is_transient();
                    let error = Arc::new(e.clone());
                    if permanent {
                        set.failed_permanently(i, error.clone());
                    } else {
                        set.failed(i);
                    }
                    observe::bastion_failed(&name, permanent, &e);
                    self.emit(TunnelEvent::BastionFailed {
                        bastion: name.to_string(),
                        error,
                        permanent,
                    });
                    errors.push((name.to_string(), e));
                }
            }
        }
        errors.extend(skipped);
        Err(Error::AllBastionsFailed { errors })
    }
}

/// What [`Inner::try_retire`] decided.
pub(crate) enum Retire {
    /// Removed from the tunnel; `remaining` sessions are left. The caller closes it.
    Retired {
        /// Sessions left open.
        remaining: usize,
    },
    /// Not listed any more (lost, or the tunnel is shutting down).
    Gone,
    /// The oldest session: always kept.
    Kept,
    /// It has channels, or has not been idle long enough.
    Busy,
}

impl Inner {
    /// The bastion of the oldest live session.
    pub(crate) fn current_bastion(&self) -> Option<String> {
        lock(&self.sessions.list).first().map(|s| s.bastion_name.to_string())
    }

    /// The cipher of the oldest live session (the one new channels go to first).
    pub(crate) fn current_cipher(&self) -> Option<String> {
        lock(&self.sessions.list).first().and_then(|s| s.cipher())
    }

    pub(crate) fn live_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Reserves a channel slot on the oldest session with room.
    pub(crate) fn try_reserve(self: &Arc<Self>) -> Option<Reservation> {
        let sessions = lock(&self.sessions.list);
        let max = self.config.max_channels;
        // Reservations happen under the lock, so check-then-increment cannot overshoot.
        let s = sessions
            .iter()
            .find(|s| s.channels.load(Ordering::Acquire) < max && !s.is_dead())?;
        s.channels.fetch_add(1, Ordering::AcqRel);
        Some(Reservation {
            inner: self.clone(),
            session: s.clone(),
        })
    }

    /// Every one of the `live` open sessions is full: opens one more in the background if
    /// `max_sessions` allows it and none is being opened already. With no session up the
    /// supervisor is reconnecting; nothing is opened here.
    pub(crate) fn open_for_capacity(self: &Arc<Self>, live: usize) {
        if live > 0
            && live < self.config.max_sessions
            && self
                .sessions
                .opening
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.tracker.spawn(open_extra_session(self.clone()));
        }
    }

    pub(crate) fn gauges(&self) {
        self.telemetry.set_sessions(self.live_sessions());
        let mut per_bastion = vec![0usize; self.bastions.len()];
        for s in lock(&self.sessions.list).iter() {
            per_bastion[s.bastion] += 1;
        }
        for (i, n) in per_bastion.into_iter().enumerate() {
            self.telemetry.set_bastion_sessions(self.bastions.name(i), n);
        }
        self.channels_changed();
    }

    /// The channel count changed: the gauge follows the counter (its only writer).
    pub(crate) fn channels_changed(&self) {
        self.telemetry
            .set_channels(self.counters.channels_active.load(Ordering::Relaxed));
    }

    /// Registers an established session and starts its keepalive monitor.
    ///
    /// The first session and a session that replaces lost ones publish `Connected`; sessions
    /// opened for capacity publish `SessionOpened`.
    pub(crate) fn add_session(self: &Arc<Self>, session: Arc<SshSession>) {
        // Anything but the initial connect means every earlier session was lost.
        let reconnect = !matches!(*self.state.borrow(), TunnelState::Connecting);
        let (count, first) = {
            let mut sessions = lock(&self.sessions.list);
            sessions.push(session.clone());
            (sessions.len(), sessions.len() == 1)
        };
        if self.is_shutting_down() {
            // disconnect() raced with the open: it may already have collected the sessions.
            session.kill();
            lock(&self.sessions.list).retain(|s| s.id != session.id);
            return;
        }
        self.tracker.spawn(session::monitor(self.clone(), session.clone()));
        self.gauges();
        if first {
            if reconnect {
                self.sessions.mark_reconnect();
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                self.telemetry.count_reconnect();
            }
            observe::tunnel_connected(session.id, reconnect, &session.bastion_name, &self.endpoint);
            self.set_state(TunnelState::Connected);
            self.emit(TunnelEvent::Connected {
                session: session.id,
                reconnect,
                bastion: session.bastion_name.to_string(),
            });
        } else {
            tracing::debug!(target: LOG_TARGET, session = session.id, sessions = count, bastion = %session.bastion_name, "additional SSH session opened");
            self.emit(TunnelEvent::SessionOpened {
                session: session.id,
                sessions: count,
                bastion: session.bastion_name.to_string(),
            });
        }
        self.changed.notify_waiters();
    }

    /// Removes a dead session, aborts its socket and, if it was the last one, wakes the supervisor.
    pub(crate) fn session_lost(&self, id: u64, reason: String) {
        let (session, remaining) = {
            let mut sessions = lock(&self.sessions.list);
            let Some(pos) = sessions.iter().position(|s| s.id == id) else {
                return;
            };
            let s = sessions.remove(pos);
            (s, sessions.len())
        };
        session.kill();
        self.gauges();
        if self.is_shutting_down() {
            return;
        }
        // The next session goes to another bastion first, if there is one.
        self.bastions.failed(session.bastion);
        observe::session_lost(id, remaining, &session.bastion_name, &reason);
        self.record_error(Arc::new(Error::TunnelLost {
            host: session.bastion_name.to_string(),
            reason: reason.clone(),
        }));
        // State first, then the event: whoever reacts to `Disconnected` must already see the
        // tunnel as not connected (a watcher that waited for `Connected` right after the event
        // used to see the stale `Connected` and return at once).
        if remaining == 0 {
            self.set_state(TunnelState::Reconnecting {
                attempt: 1,
                next_delay: Duration::ZERO,
            });
        } else {
            // The connections of that session died with it; the survivors carry on.
            self.sessions.mark_reconnect();
        }
        self.emit(TunnelEvent::Disconnected {
            session: id,
            reason,
            bastion: session.bastion_name.to_string(),
        });
        if remaining == 0 {
            self.lost.notify_one();
        }
        self.changed.notify_waiters();
    }

    /// Takes `session` out of the tunnel if it is an extra session (not the oldest) idle for
    /// `session_idle_timeout`.
    pub(crate) fn try_retire(&self, session: &SshSession) -> Retire {
        let remaining = {
            let mut sessions = lock(&self.sessions.list);
            let Some(pos) = sessions.iter().position(|s| s.id == session.id) else {
                return Retire::Gone;
            };
            if self.is_shutting_down() {
                return Retire::Gone;
            }
            if pos == 0 {
                // The oldest session is the base: new channels fill it first, keep it.
                return Retire::Kept;
            }
            if !session.idle_for(self.config.session_idle_timeout) {
                return Retire::Busy;
            }
            sessions.remove(pos);
            sessions.len()
        };
        self.gauges();
        // Waiters for a slot re-check (one may now open a session again).
        self.changed.notify_waiters();
        Retire::Retired { remaining }
    }
}

/// Opens one more session because all open ones are at `max_channels`.
async fn open_extra_session(inner: Arc<Inner>) {
    let result = session::establish(&inner).await;
    inner.sessions.opening.store(false, Ordering::Release);
    match result {
        Ok(session) => inner.add_session(session),
        Err(e) => {
            if !inner.is_shutting_down() {
                tracing::warn!(target: LOG_TARGET, error = %e, "opening an additional SSH session failed");
                inner.record_error(Arc::new(e));
            }
            inner.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cooldown: Duration) -> BastionSet {
        let config = TunnelConfig::new("a", "u")
            .fallback_host("b", 22)
            .fallback_host("c", 22)
            .map_reconnect(|r| r.max_delay(cooldown));
        BastionSet::new(&config)
    }

    #[test]
    fn bastions_are_tried_in_order_recent_failures_last_permanent_ones_never() {
        let bastions = set(Duration::from_secs(60));
        assert_eq!(bastions.order().0, [0, 1, 2]);
        bastions.failed(0);
        assert_eq!(bastions.order().0, [1, 2, 0], "a failed bastion goes last");
        std::thread::sleep(Duration::from_millis(5));
        bastions.failed(1);
        assert_eq!(
            bastions.order().0,
            [2, 0, 1],
            "the older failure first among the failed"
        );
        bastions.succeeded(0);
        assert_eq!(bastions.order().0, [0, 2, 1]);
        bastions.failed_permanently(2, Arc::new(Error::config("x", "permanent")));
        let (order, skipped) = bastions.order();
        assert_eq!(order, [0, 1]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(bastions.name(1).as_ref(), "b:22");

        // After the cooldown a failed bastion is back in its place.
        let quick = set(Duration::from_millis(1));
        quick.failed(0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(quick.order().0, [0, 1, 2]);
        // Moving counts only when the bastion changes.
        assert!(!quick.switch_to(0));
        assert!(quick.switch_to(1));
        assert!(!quick.switch_to(1));
        assert!(quick.switch_to(0));
    }
}
