//! Spare channels ([`TunnelConfig::spare_channel`](crate::config::TunnelConfig::spare_channel)):
//! after a local connection gets its channel, one more is opened to the same database server and
//! kept ready, so that the next local connection starts without the channel-open round trip to
//! the bastion.
//!
//! A spare holds a channel reservation on its session (so `max_channels` counts it) but is not
//! an active forwarded connection until it is taken. It is never renewed on its own: only a
//! connection that is served asks for the next one, and one unused for the configured time is
//! closed. Before use it is checked: a spare from an older epoch (see [`Inner::discard_spares`]),
//! on a dead session, past its time, or closed by the bastion or the server is closed instead
//! and the connection opens a channel as it would without spares.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use russh::ChannelMsg;

use super::LOG_TARGET;
use super::inner::{Inner, lock};
use super::sessions::Reservation;

type Channel = russh::Channel<russh::client::Msg>;

/// A route's spare: at most one ready, at most one being opened.
#[derive(Default)]
pub(crate) struct Spares {
    ready: Mutex<Option<Spare>>,
    opening: AtomicBool,
    next_id: AtomicU64,
}

struct Spare {
    id: u64,
    epoch: u64,
    born: Instant,
    channel: Option<Channel>,
    /// `None` once handed on with the channel.
    reservation: Option<Reservation>,
}

impl Drop for Spare {
    fn drop(&mut self) {
        // A bare `Channel` does not close when dropped; its stream does (from a task, so only
        // inside a runtime: outside one the session is gone and the channel with it).
        if let Some(channel) = self.channel.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            drop(channel.into_stream());
        }
    }
}

impl Spares {
    /// The ready spare, if it is still good: the channel's reservation on its session (to become
    /// the connection's slot) and the channel. A spare that is not good is closed.
    pub(crate) fn take(&self, inner: &Inner) -> Option<(Reservation, Channel)> {
        let ttl = inner.config.spare_channel?;
        let mut spare = lock(&self.ready).take()?;
        let why = if spare.epoch != inner.spare_epoch.load(Ordering::Acquire) {
            Some("discarded")
        } else if spare.born.elapsed() >= ttl {
            Some("expired")
        } else if spare.reservation.as_ref().is_none_or(|r| r.session().is_dead()) {
            Some("its session ended")
        } else if spare.channel.as_mut().is_none_or(|c| !still_open(c)) {
            Some("closed by the bastion or the server")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::debug!(target: LOG_TARGET, reason = why, "spare channel not used");
            inner.counters.spares_discarded.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let reservation = spare.reservation.take()?;
        let channel = spare.channel.take()?;
        inner.counters.spares_used.fetch_add(1, Ordering::Relaxed);
        Some((reservation, channel))
    }

    fn remove(&self, id: u64) -> Option<Spare> {
        let mut ready = lock(&self.ready);
        if ready.as_ref().is_some_and(|s| s.id == id) {
            ready.take()
        } else {
            None
        }
    }
}

/// Whether nothing but window adjustments arrived on a channel no byte was sent on: PostgreSQL
/// and PgBouncer say nothing before the client's first message, so anything else (EOF, close,
/// data) means the spare is unusable.
fn still_open(channel: &mut Channel) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let wait = std::pin::pin!(channel.wait());
        match wait.poll(&mut cx) {
            Poll::Pending => return true,
            Poll::Ready(Some(ChannelMsg::WindowAdjusted { .. })) => {}
            Poll::Ready(_) => return false,
        }
    }
}

/// Asks for a spare on `spares` (the route `host:port`) unless spares are off, one is ready or
/// being opened, or the tunnel is shutting down. Opened in the background on a session with a
/// free channel (never a new session), and closed unused after the configured time.
pub(crate) fn refill(inner: &Arc<Inner>, spares: &Arc<Spares>, host: &str, port: u16) {
    let Some(ttl) = inner.config.spare_channel else {
        return;
    };
    if inner.is_shutting_down()
        || lock(&spares.ready).is_some()
        || spares
            .opening
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return;
    }
    let (inner2, spares, host) = (inner.clone(), spares.clone(), host.to_owned());
    inner.tracker.spawn(async move {
        let inner = inner2;
        let opened = open(&inner, &spares, host, port).await;
        spares.opening.store(false, Ordering::Release);
        let Some(spare) = opened else {
            return;
        };
        let (id, born) = (spare.id, spare.born);
        let kill = spare.reservation.as_ref().map(|r| r.session().kill.clone());
        let discarded = inner.spares_discard.notified();
        tokio::pin!(discarded);
        discarded.as_mut().enable();
        if spare.epoch != inner.spare_epoch.load(Ordering::Acquire) {
            inner.counters.spares_discarded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let replaced = lock(&spares.ready).replace(spare);
        drop(replaced);
        inner.counters.spares_opened.fetch_add(1, Ordering::Relaxed);
        let killed = async {
            match kill {
                Some(kill) => kill.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until((born + ttl).into()) => {}
            () = killed => {}
            () = &mut discarded => {}
            () = inner.cancel.cancelled() => {}
        }
        if let Some(unused) = spares.remove(id) {
            tracing::trace!(target: LOG_TARGET, "spare channel closed unused");
            inner.counters.spares_discarded.fetch_add(1, Ordering::Relaxed);
            drop(unused);
        }
    });
}

async fn open(inner: &Arc<Inner>, spares: &Spares, host: String, port: u16) -> Option<Spare> {
    let reservation = inner.try_reserve()?;
    let epoch = inner.spare_epoch.load(Ordering::Acquire);
    let result =
        match super::forward::raw_open(inner, reservation.session(), host, port, ("127.0.0.1".to_owned(), 0)).await {
            super::forward::RawOpen::Done(result) => result,
            super::forward::RawOpen::Killed | super::forward::RawOpen::Cancelled => return None,
        };
    match result {
        Ok(Ok(channel)) => Some(Spare {
            id: spares.next_id.fetch_add(1, Ordering::Relaxed),
            epoch,
            born: Instant::now(),
            channel: Some(channel),
            reservation: Some(reservation),
        }),
        // The connection that asked for it got its channel: a failure here is not the tunnel's
        // state, and the next connection opens its own channel (and reports what fails then).
        Ok(Err(e)) => {
            tracing::debug!(target: LOG_TARGET, error = %e, "opening a spare channel failed");
            None
        }
        Err(_) => {
            tracing::debug!(target: LOG_TARGET, "opening a spare channel timed out");
            None
        }
    }
}
