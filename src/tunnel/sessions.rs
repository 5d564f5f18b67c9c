//! The tunnel's set of SSH sessions: which ones are open, which one takes the next channel, when
//! another is opened for capacity or an idle extra one is retired, and what losing one means.
//!
//! Channels are reserved only on listed sessions and only under the set's lock, and a session is
//! retired only after it was seen with zero channels under that same lock, so no channel can land
//! on a session that is being closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::inner::{Inner, lock};
use super::session::{self, SshSession};
use super::{LOG_TARGET, TunnelEvent, TunnelState};
use crate::Error;
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
    pub(crate) fn live_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Reserves a channel slot on the oldest session with room.
    pub(crate) fn try_reserve(&self) -> Option<Arc<SshSession>> {
        let sessions = lock(&self.sessions.list);
        let max = self.config.max_channels;
        // Reservations happen under the lock, so check-then-increment cannot overshoot.
        let s = sessions
            .iter()
            .find(|s| s.channels.load(Ordering::Acquire) < max && !s.is_dead())?;
        s.channels.fetch_add(1, Ordering::AcqRel);
        Some(s.clone())
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
            observe::tunnel_connected(
                session.id,
                reconnect,
                &format_args!("{}:{}", self.config.host, self.config.port),
                &self.endpoint,
            );
            self.set_state(TunnelState::Connected);
            self.emit(TunnelEvent::Connected {
                session: session.id,
                reconnect,
            });
        } else {
            tracing::debug!(target: LOG_TARGET, session = session.id, sessions = count, "additional SSH session opened");
            self.emit(TunnelEvent::SessionOpened {
                session: session.id,
                sessions: count,
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
        observe::session_lost(id, remaining, &reason);
        self.record_error(Arc::new(Error::TunnelLost {
            host: self.config.host.clone(),
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
        self.emit(TunnelEvent::Disconnected { session: id, reason });
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
