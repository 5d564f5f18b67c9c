//! The state one tunnel's handles and background tasks share.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sessions::{BastionSet, SessionSet};
use super::{LocalEndpoint, TunnelEvent, TunnelState, auth, host_key, session};
use crate::Error;
use crate::config::TunnelConfig;
use crate::generation::Generation;
use crate::observe::events as observe;
use crate::observe::tunnel::TunnelTelemetry;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connections_total: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) open_failures: AtomicU64,
    pub(crate) bytes_to_remote: AtomicU64,
    pub(crate) bytes_from_remote: AtomicU64,
    pub(crate) channels_active: AtomicUsize,
    pub(crate) spares_opened: AtomicU64,
    pub(crate) spares_used: AtomicU64,
    pub(crate) spares_discarded: AtomicU64,
}

/// Shared state of one tunnel. Background tasks hold an `Arc` and end when `cancel` fires.
pub(crate) struct Inner {
    pub(crate) config: TunnelConfig,
    pub(crate) ssh_config: Arc<russh::client::Config>,
    pub(crate) credentials: auth::Credentials,
    pub(crate) verifier: host_key::HostKeyVerifier,
    /// Verifies the jump hosts of `proxy_jump`: the tunnel's policy, except that a pinned
    /// fingerprint is the bastion's, so jump hosts are then checked strictly against known_hosts.
    pub(crate) jump_verifier: host_key::HostKeyVerifier,
    /// The bastions in failover order, and what is known about each.
    pub(crate) bastions: BastionSet,
    pub(crate) endpoint: LocalEndpoint,
    unix_dir: Option<PathBuf>,
    /// The local endpoints of `config.alternate_targets`, in order (with their socket
    /// directories), bound before the tunnel started.
    pub(crate) alternates: Vec<(LocalEndpoint, Option<PathBuf>)>,
    /// The tunnel's metrics, labelled with its pool label.
    pub(crate) telemetry: TunnelTelemetry,
    pub(crate) state: watch::Sender<TunnelState>,
    pub(crate) events: broadcast::Sender<TunnelEvent>,
    pub(crate) sessions: SessionSet,
    /// Session set, capacity or state changed: waiters for a slot re-check.
    pub(crate) changed: Notify,
    /// The last session was lost: the supervisor starts reconnecting.
    pub(crate) lost: Notify,
    /// A caller asks for a new round of attempts now, instead of after the pause that follows a
    /// round that gave up. Read only by the supervisor, and only during that pause; notified with
    /// `notify_waiters`, so a request at any other time leaves nothing behind.
    pub(crate) round_requested: Notify,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    next_session_id: AtomicU64,
    last_error: Mutex<Option<Arc<Error>>>,
    /// The bastion's latest answer to a channel open was a permanent refusal; cleared when a
    /// channel opens.
    channel_refusal: Mutex<Option<Arc<Error>>>,
    pub(crate) counters: Counters,
    /// Spares opened before the last [`Inner::discard_spares`] are not used.
    pub(crate) spare_epoch: AtomicU64,
    /// Wakes the tasks holding spares when they are discarded.
    pub(crate) spares_discard: Notify,
    shutting_down: AtomicBool,
    pub(crate) shutdown_done: tokio::sync::OnceCell<()>,
}

impl Inner {
    pub(crate) fn new(
        config: TunnelConfig,
        pool_label: String,
        generation: Arc<Generation>,
        credentials: auth::Credentials,
        endpoint: LocalEndpoint,
        unix_dir: Option<PathBuf>,
        alternates: Vec<(LocalEndpoint, Option<PathBuf>)>,
    ) -> Inner {
        let (state, _) = watch::channel(TunnelState::Connecting);
        let (events, _) = broadcast::channel(256);
        Inner {
            ssh_config: Arc::new(session::russh_config(&config)),
            // HostKeyAlias and the extra known_hosts files apply to the bastion.
            verifier: host_key::HostKeyVerifier::for_tunnel(&config),
            // A pinned fingerprint is the bastion's: jump hosts are then checked strictly.
            jump_verifier: host_key::HostKeyVerifier::new(
                match &config.host_key_policy {
                    crate::config::HostKeyPolicy::Fingerprint(_) => crate::config::HostKeyPolicy::Strict,
                    other => other.clone(),
                },
                config.known_hosts.clone(),
            )
            .with_extra_known_hosts(config.extra_known_hosts.clone()),
            bastions: BastionSet::new(&config),
            credentials,
            endpoint,
            unix_dir,
            alternates,
            telemetry: TunnelTelemetry::new(&pool_label),
            state,
            events,
            sessions: SessionSet::new(generation),
            changed: Notify::new(),
            lost: Notify::new(),
            round_requested: Notify::new(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_session_id: AtomicU64::new(1),
            last_error: Mutex::new(None),
            channel_refusal: Mutex::new(None),
            counters: Counters::default(),
            spare_epoch: AtomicU64::new(0),
            spares_discard: Notify::new(),
            shutting_down: AtomicBool::new(false),
            shutdown_done: tokio::sync::OnceCell::new(),
            config,
        }
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// `disconnect` started (the flag alone: the handle reports it before the tasks see it).
    pub(crate) fn disconnecting(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.disconnecting() || self.cancel.is_cancelled()
    }

    pub(crate) fn set_state(&self, state: TunnelState) {
        let up = state.is_connected();
        self.state.send_replace(state);
        self.telemetry.set_up(up);
        // Connections waiting for a session re-check (and give up at once on Failed).
        self.changed.notify_waiters();
    }

    pub(crate) fn emit(&self, event: TunnelEvent) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }

    pub(crate) fn last_error(&self) -> Option<Arc<Error>> {
        lock(&self.last_error).clone()
    }

    /// Spare channels ready now are not used (they are closed when next looked at or when their
    /// time is up): they were connected where the target's name pointed before.
    pub(crate) fn discard_spares(&self) {
        self.spare_epoch.fetch_add(1, Ordering::AcqRel);
        self.spares_discard.notify_waiters();
    }

    pub(crate) fn record_error(&self, error: Arc<Error>) {
        *lock(&self.last_error) = Some(error);
    }

    pub(crate) fn channel_refusal(&self) -> Option<Arc<Error>> {
        lock(&self.channel_refusal).clone()
    }

    /// The bastion refused a channel permanently (or, with `None`, a channel opened).
    pub(crate) fn set_channel_refusal(&self, refusal: Option<Arc<Error>>) {
        let mut current = lock(&self.channel_refusal);
        if refusal.is_some() || current.is_some() {
            *current = refusal;
        }
    }

    pub(crate) async fn shutdown(self: Arc<Self>) {
        self.shutting_down.store(true, Ordering::Release);
        // 1. Stop accepting and end the forwarders, monitors and supervisor (dropping the channel
        //    streams sends CHANNEL_CLOSE for each).
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        // 2. SSH disconnect on every session, then make sure each russh task has ended.
        let sessions = self.sessions.take_all();
        for s in &sessions {
            s.close_gracefully().await;
        }
        drop(sessions);
        self.remove_unix_dir();
        self.counters.channels_active.store(0, Ordering::Relaxed);
        self.gauges();
        self.set_state(TunnelState::Disconnected);
        observe::tunnel_closed(&self.endpoint);
        self.emit(TunnelEvent::Closed);
    }

    fn remove_unix_dir(&self) {
        remove_socket_dirs(
            std::iter::once((&self.endpoint, &self.unix_dir)).chain(self.alternates.iter().map(|(e, d)| (e, d))),
        );
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last reference gone (every task ended): never leave the socket directory behind.
        self.remove_unix_dir();
        self.sessions.kill_all();
    }
}

/// Removes the socket file and the private directory of each Unix endpoint (TCP endpoints have
/// no directory).
pub(crate) fn remove_socket_dirs<'a>(endpoints: impl Iterator<Item = (&'a LocalEndpoint, &'a Option<PathBuf>)>) {
    for (endpoint, dir) in endpoints {
        if let Some(dir) = dir {
            if let LocalEndpoint::Unix(path) = endpoint {
                let _ = std::fs::remove_file(path);
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

pub(crate) use crate::sync::lock;
