//! The SSH tunnel: a local endpoint whose connections ride `direct-tcpip` channels through a bastion.
//!
//! [`SshTunnel::connect`] binds a local endpoint (loopback TCP on an ephemeral port by default, or a
//! Unix socket in a private 0700 directory), opens a verified, authenticated SSH session, and starts
//! background tasks that forward every accepted connection to the configured remote `host:port`,
//! watch the link with keepalives and reconnect with backoff when it is lost. The endpoint never
//! moves, so a database pool pointed at it keeps working across reconnects.
//!
//! ```no_run
//! # async fn demo(config: sea_orm_tunnel::config::TunnelConfig) -> sea_orm_tunnel::Result<()> {
//! use sea_orm_tunnel::tunnel::SshTunnel;
//!
//! let tunnel = SshTunnel::connect(config).await?;
//! let addr = tunnel.local_endpoint().tcp_addr().expect("TCP endpoint");
//! let url = format!("postgres://app:secret@{addr}/app");
//! // ... build the pool on `url` ...
//! tunnel.disconnect().await;
//! # let _ = url; Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! - **Sessions and channels.** Each accepted connection takes one channel on an SSH session with a
//!   free slot (`max_channels` per session). When all are full another session is opened, up to
//!   `max_sessions`. A connection that finds no slot waits up to `connect_timeout`, then is closed
//!   and counted ([`TunnelStats::refused_connections`], [`TunnelEvent::CapacityExhausted`]).
//! - **Idle extra sessions.** A session other than the oldest that has had no channel for
//!   `session_idle_timeout` is closed with an SSH disconnect ([`TunnelEvent::SessionClosed`]);
//!   the last session is always kept. This is not a lost session: nothing reconnects and
//!   [`SshTunnel::last_reconnect_at`] does not move.
//! - **No session up.** A connection that arrives while the tunnel is reconnecting waits (up to
//!   `connect_timeout`) for the supervisor instead of being accepted and dropped (DESIGN §7 item 7).
//! - **Liveness.** Every session is pinged each `keepalive_interval`; without a reply for
//!   `keepalive_interval × keepalive_max` it is declared dead and its socket is aborted.
//! - **Recovery.** When the last session is lost the supervisor reconnects: the first attempt at
//!   once, then with the `reconnect` backoff. Each attempt is a [`TunnelEvent::Reconnecting`];
//!   after `max_retries` (0 = forever) the state becomes [`TunnelState::Failed`]. Permanent errors
//!   (host key, authentication, key file, configuration) fail at once and are never retried.
//!   Nothing cuts a round's backoff short: [`SshTunnel::ensure_connected`] waits for the round,
//!   and only starts a *new* round once a round has given up on transient errors (see there).
//! - **Refused channels.** A channel the bastion refuses as `administratively prohibited`
//!   (`AllowTcpForwarding` / `PermitOpen`) closes that local connection. The SSH session stays up
//!   (the state stays `Connected`: a bastion reconfigured for new sessions, or a per-user rule
//!   changed, can allow the next channel), but [`SshTunnel::permanent_error`] reports the refusal
//!   until a channel opens again, so callers can tell "the database is unreachable by
//!   configuration" from a transient outage instead of retrying it.
//! - **Shutdown.** [`SshTunnel::disconnect`] stops accepting, closes channels, sends an SSH
//!   disconnect and waits for every task. Dropping the last handle does the same without waiting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::config::TunnelConfig;
use crate::generation::Generation;
use crate::observe::metrics as m;
use crate::{Error, Result};

pub(crate) mod auth;
pub mod diagnose;
mod forward;
mod global;
pub(crate) mod host_key;
mod session;
mod socket;
mod supervisor;

use session::SshSession;

/// Tracing target of every tunnel event.
pub(crate) const LOG_TARGET: &str = "sea_orm_tunnel::tunnel";
/// The `pool` label on the tunnel's metrics.
const DEFAULT_POOL_LABEL: &str = "default";

/// Where the tunnel listens locally. Stable for the tunnel's whole life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalEndpoint {
    /// Loopback TCP, e.g. `127.0.0.1:54321`.
    Tcp(SocketAddr),
    /// The Unix socket file, inside a private 0700 directory. It is named `.s.PGSQL.<remote_port>`
    /// so that libpq (`psql -h <dir> -p <remote_port>`) and sqlx
    /// (`PgConnectOptions::socket(<dir>)` + `.port(<remote_port>)`) find it.
    Unix(PathBuf),
}

impl LocalEndpoint {
    /// The directory holding the Unix socket (what libpq and sqlx call the socket "host").
    pub fn unix_dir(&self) -> Option<&Path> {
        match self {
            LocalEndpoint::Unix(path) => path.parent(),
            LocalEndpoint::Tcp(_) => None,
        }
    }

    /// The TCP address, for a TCP endpoint.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            LocalEndpoint::Tcp(addr) => Some(*addr),
            LocalEndpoint::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for LocalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalEndpoint::Tcp(addr) => write!(f, "{addr}"),
            LocalEndpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The tunnel's current state, published on a [`watch`] channel ([`SshTunnel::state`]).
#[derive(Debug, Clone)]
pub enum TunnelState {
    /// The first session is being established.
    Connecting,
    /// At least one SSH session is up.
    Connected,
    /// Every session was lost; attempt `attempt` runs after `next_delay`.
    Reconnecting {
        /// 1-based attempt number.
        attempt: u32,
        /// Wait before this attempt (zero for the first).
        next_delay: Duration,
    },
    /// Shut down by [`SshTunnel::disconnect`] (or the last handle was dropped).
    Disconnected,
    /// Gave up: a permanent error, or `max_retries` exhausted (then `error` is the last one).
    Failed {
        /// Why.
        error: Arc<Error>,
    },
}

impl TunnelState {
    /// Whether this is [`TunnelState::Connected`].
    pub fn is_connected(&self) -> bool {
        matches!(self, TunnelState::Connected)
    }
}

/// Something that happened to the tunnel, broadcast to [`SshTunnel::subscribe`]rs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TunnelEvent {
    /// The tunnel is up: the first session at connect, or a new one after every session was lost.
    Connected {
        /// Session id (increasing, unique per tunnel).
        session: u64,
        /// `true` when this replaced lost sessions.
        reconnect: bool,
    },
    /// An additional session was opened because every open session was at `max_channels`.
    SessionOpened {
        /// Session id.
        session: u64,
        /// Sessions now open.
        sessions: usize,
    },
    /// An additional session opened for capacity had no channel for `session_idle_timeout` and
    /// was closed (SSH disconnect). Not a failure: nothing reconnects, and no connection rode it.
    SessionClosed {
        /// Session id.
        session: u64,
        /// Sessions still open.
        sessions: usize,
    },
    /// A session ended (lost link, closed by the server, keepalive unanswered).
    Disconnected {
        /// Session id.
        session: u64,
        /// Why.
        reason: String,
    },
    /// Every session is down; reconnect attempt `attempt` starts after `delay`.
    Reconnecting {
        /// 1-based attempt number.
        attempt: u32,
        /// Wait before this attempt.
        delay: Duration,
        /// The error that made the previous attempt fail (or why the link was lost).
        error: String,
    },
    /// The tunnel gave up (see [`TunnelState::Failed`]).
    Failed {
        /// Why.
        error: Arc<Error>,
    },
    /// The bastion refused a forwarding channel.
    ChannelOpenFailed {
        /// The server's reason.
        reason: String,
        /// `true` for `administratively prohibited` (AllowTcpForwarding / PermitOpen): retrying
        /// cannot help, the bastion configuration must change.
        permanent: bool,
    },
    /// A local connection found no free channel within `connect_timeout` and was closed.
    CapacityExhausted {
        /// Channels in use when it gave up.
        channels: usize,
        /// Sessions open when it gave up.
        sessions: usize,
    },
    /// [`SshTunnel::disconnect`] finished.
    Closed,
}

/// Counters a user can read without a metrics stack (bb8 `Statistics` style).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TunnelStats {
    /// SSH sessions open now.
    pub sessions: usize,
    /// Forwarding channels open now.
    pub channels_active: usize,
    /// Local connections accepted since the start.
    pub connections_total: u64,
    /// Reconnects after every session was lost.
    pub reconnects: u64,
    /// Local connections closed because no channel was free (or no session came up) in time.
    pub refused_connections: u64,
    /// Channel opens the bastion refused or that failed.
    pub channel_open_failures: u64,
    /// Bytes forwarded from local clients to the remote side.
    pub bytes_to_remote: u64,
    /// Bytes forwarded from the remote side to local clients.
    pub bytes_from_remote: u64,
}

/// A handle to an SSH tunnel. Cheap to clone; all clones share one tunnel.
///
/// Dropping the last handle stops the background tasks (without the graceful SSH disconnect that
/// [`SshTunnel::disconnect`] sends).
#[derive(Clone)]
pub struct SshTunnel {
    inner: Arc<Inner>,
    // Held only by user handles, never by tasks: when the last handle goes, the token is cancelled.
    _alive: Arc<DropGuard>,
}

impl std::fmt::Debug for SshTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTunnel")
            .field(
                "bastion",
                &format_args!(
                    "{}@{}:{}",
                    self.inner.config.user, self.inner.config.host, self.inner.config.port
                ),
            )
            .field(
                "remote",
                &format_args!("{}:{}", self.inner.config.remote_host, self.inner.config.remote_port),
            )
            .field("local_endpoint", &self.inner.endpoint)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connections_total: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) open_failures: AtomicU64,
    pub(crate) bytes_to_remote: AtomicU64,
    pub(crate) bytes_from_remote: AtomicU64,
    pub(crate) channels_active: AtomicUsize,
}

/// Shared state of one tunnel. Background tasks hold an `Arc` and end when `cancel` fires.
pub(crate) struct Inner {
    pub(crate) config: TunnelConfig,
    pub(crate) ssh_config: Arc<russh::client::Config>,
    pub(crate) credentials: auth::Credentials,
    pub(crate) verifier: host_key::HostKeyVerifier,
    pub(crate) endpoint: LocalEndpoint,
    unix_dir: Option<PathBuf>,
    pub(crate) pool_label: String,
    pub(crate) state: watch::Sender<TunnelState>,
    pub(crate) events: broadcast::Sender<TunnelEvent>,
    /// Live sessions, oldest first (new channels fill the oldest session first).
    sessions: Mutex<Vec<Arc<SshSession>>>,
    /// Sessions being opened on demand (at most one at a time).
    pub(crate) opening: AtomicUsize,
    /// Session set, capacity or state changed: waiters for a slot re-check.
    pub(crate) changed: Notify,
    /// The last session was lost: the supervisor starts reconnecting.
    pub(crate) lost: Notify,
    /// A round gave up on transient errors and the supervisor parked: start a new round.
    /// Notified only by the caller that moved the state from `Failed` to `Reconnecting`.
    pub(crate) wake: Notify,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    next_session_id: AtomicU64,
    last_reconnect_at: Mutex<Option<Instant>>,
    /// The pool generation this tunnel retires when sessions are lost.
    generation: Arc<Generation>,
    last_error: Mutex<Option<Arc<Error>>>,
    /// When the supervisor last gave up (entered `Failed`).
    failed_at: Mutex<Option<Instant>>,
    /// The bastion's latest answer to a channel open was a permanent refusal; cleared when a
    /// channel opens.
    channel_refusal: Mutex<Option<Arc<Error>>>,
    pub(crate) counters: Counters,
    shutting_down: AtomicBool,
    shutdown_done: tokio::sync::OnceCell<()>,
}

impl SshTunnel {
    /// Binds the local endpoint, establishes the first SSH session and starts the forwarder,
    /// keepalive and supervisor tasks.
    ///
    /// Permanent errors (host key, authentication, key file or passphrase, invalid configuration)
    /// are returned at once. Transient ones (sshd not reachable yet, timeouts) are retried per
    /// `config.reconnect`, then the last one is returned.
    ///
    /// With `config.reconnect.max_retries == 0` (retry forever) and no `max_elapsed`, this waits
    /// until the bastion is reachable; wrap it in a timeout if that is not what you want.
    pub async fn connect(config: TunnelConfig) -> Result<SshTunnel> {
        Self::connect_labeled(config, DEFAULT_POOL_LABEL).await
    }

    /// [`SshTunnel::connect`], with `pool_label` as the `pool` label of the tunnel's metrics
    /// (so a service with several pools can tell their tunnels apart).
    pub async fn connect_labeled(config: TunnelConfig, pool_label: impl Into<String>) -> Result<SshTunnel> {
        Self::connect_with_generation(config, pool_label, Arc::new(Generation::new())).await
    }

    /// [`SshTunnel::connect_labeled`], retiring `generation` whenever sessions that may carry
    /// pooled connections are lost (the manager passes the generation its pool rules read).
    pub(crate) async fn connect_with_generation(
        config: TunnelConfig,
        pool_label: impl Into<String>,
        generation: Arc<Generation>,
    ) -> Result<SshTunnel> {
        config.validate()?;
        validate(&config)?;
        let auth_config = config.auth.clone();
        // Decrypting a key (bcrypt KDF) takes a while: keep it off the async workers.
        let credentials = tokio::task::spawn_blocking(move || auth::Credentials::load(&auth_config))
            .await
            .map_err(|e| Error::Io {
                context: "loading the SSH key".into(),
                source: std::io::Error::other(e),
            })??;
        let (listener, endpoint, unix_dir) = forward::bind(&config).await?;
        let (state, _) = watch::channel(TunnelState::Connecting);
        let (events, _) = broadcast::channel(256);
        let cancel = CancellationToken::new();
        let inner = Arc::new(Inner {
            ssh_config: Arc::new(session::russh_config(&config)),
            verifier: host_key::HostKeyVerifier::new(config.host_key_policy.clone(), config.known_hosts.clone()),
            credentials,
            endpoint,
            unix_dir,
            pool_label: pool_label.into(),
            state,
            events,
            sessions: Mutex::new(Vec::new()),
            opening: AtomicUsize::new(0),
            changed: Notify::new(),
            lost: Notify::new(),
            wake: Notify::new(),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            next_session_id: AtomicU64::new(1),
            last_reconnect_at: Mutex::new(None),
            generation,
            last_error: Mutex::new(None),
            failed_at: Mutex::new(None),
            channel_refusal: Mutex::new(None),
            counters: Counters::default(),
            shutting_down: AtomicBool::new(false),
            shutdown_done: tokio::sync::OnceCell::new(),
            config,
        });
        let tunnel = SshTunnel {
            _alive: Arc::new(cancel.drop_guard()),
            inner: inner.clone(),
        };
        inner.gauges();
        match supervisor::connect_first(&inner).await {
            Ok(session) => inner.add_session(session),
            Err(e) => {
                // Nothing was spawned yet; the drop guard cancels, `Inner::drop` removes the socket dir.
                inner.set_state(TunnelState::Failed {
                    error: Arc::new(duplicate_error(&e)),
                });
                return Err(e);
            }
        }
        inner.tracker.spawn(forward::accept_loop(inner.clone(), listener));
        inner.tracker.spawn(supervisor::run(inner.clone()));
        Ok(tunnel)
    }

    /// The local endpoint. Stable for the tunnel's whole life: reconnects never move it.
    pub fn local_endpoint(&self) -> &LocalEndpoint {
        &self.inner.endpoint
    }

    /// True while at least one SSH session is up (the spec's `isConnectedToTunnel`).
    pub fn is_connected(&self) -> bool {
        !self.inner.shutting_down.load(Ordering::Acquire) && self.inner.live_sessions() > 0
    }

    /// A receiver of the current [`TunnelState`]; `changed().await` wakes on every transition.
    pub fn state(&self) -> watch::Receiver<TunnelState> {
        self.inner.state.subscribe()
    }

    /// A receiver of [`TunnelEvent`]s from now on. A receiver that falls more than 256 events
    /// behind loses the oldest (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<TunnelEvent> {
        self.inner.events.subscribe()
    }

    /// The instant after which every pooled connection is known to ride a live session: set when
    /// the tunnel reconnects after losing every session, and when one of several sessions is lost
    /// (its connections died with it). `None` if no session was ever lost.
    ///
    /// A pool should discard connections created before it.
    pub fn last_reconnect_at(&self) -> Option<Instant> {
        *lock(&self.inner.last_reconnect_at)
    }

    /// The most recent error (a failed reconnect attempt, a lost session, a refused channel).
    pub fn last_error(&self) -> Option<Arc<Error>> {
        lock(&self.inner.last_error).clone()
    }

    /// Waits until a session is up, bounded by `connect_timeout`; never cuts a reconnect short.
    ///
    /// - Connected: `Ok(())` at once.
    /// - Connecting / reconnecting: waits for the current round of attempts (it keeps its backoff
    ///   schedule: this never makes an attempt happen sooner).
    /// - Failed with a permanent error (host key, authentication, ...): that error, at once.
    /// - Failed after `max_retries` transient failures: this explicit call starts a **new round**
    ///   (attempt 1 at once, then the backoff again) and waits for it. Concurrent callers share
    ///   one round. The [`ConnectionManager`](crate::manager::ConnectionManager)'s health loop
    ///   does this on its own too, but at most once per `reconnect.max_delay` after a round gave
    ///   up, so `max_retries` still bounds every round and rounds never come faster than the
    ///   slowest retry.
    ///
    /// On timeout: the last reconnect error, or an [`Error::Timeout`].
    pub async fn ensure_connected(&self) -> Result<()> {
        self.ensure_connected_paced(Duration::ZERO).await
    }

    /// [`ensure_connected`](Self::ensure_connected), but a new round after `Failed` starts only if
    /// the last round gave up at least `min_gap` ago; otherwise the failure is returned at once.
    pub(crate) async fn ensure_connected_paced(&self, min_gap: Duration) -> Result<()> {
        let inner = &self.inner;
        if self.is_connected() {
            return Ok(());
        }
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShutDown("SshTunnel"));
        }
        let mut rx = inner.state.subscribe();
        let current = rx.borrow_and_update().clone();
        if let TunnelState::Failed { error } = &current {
            if !error.is_transient() {
                return Err(duplicate_error(error));
            }
            let gave_up = *lock(&inner.failed_at);
            if gave_up.is_some_and(|at| at.elapsed() < min_gap) {
                return Err(duplicate_error(error));
            }
            inner.restart_round();
        }
        let timeout = inner.config.connect_timeout;
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| {
                matches!(
                    s,
                    TunnelState::Connected | TunnelState::Failed { .. } | TunnelState::Disconnected
                )
            }),
        )
        .await;
        match waited {
            Ok(Ok(state)) => match &*state {
                TunnelState::Connected => Ok(()),
                TunnelState::Failed { error } => Err(duplicate_error(error)),
                _ => Err(Error::ShutDown("SshTunnel")),
            },
            Ok(Err(_)) => Err(Error::ShutDown("SshTunnel")),
            Err(_) => Err(match self.last_error() {
                Some(e) => duplicate_error(&e),
                None => Error::Timeout {
                    kind: crate::error::TimeoutKind::SshConnect,
                    after: timeout,
                    detail: " (waiting for the tunnel to reconnect)".into(),
                },
            }),
        }
    }

    /// The permanent problem that stops this tunnel from forwarding right now, if any:
    ///
    /// - the tunnel is [`TunnelState::Failed`] with a permanent error (host key changed or
    ///   revoked, authentication refused, ...), or
    /// - the bastion's latest answer to a channel open was a permanent refusal
    ///   ([`Error::ChannelRefused`] with `transient: false`, e.g. `administratively prohibited`);
    ///   this clears as soon as a channel opens again.
    ///
    /// A local connection made while this is `Some` is closed without data, which a database
    /// driver reports as a (transient-looking) I/O error; the manager uses this to return the
    /// real, permanent cause instead of retrying.
    pub fn permanent_error(&self) -> Option<Arc<Error>> {
        if let TunnelState::Failed { error } = &*self.inner.state.borrow()
            && !error.is_transient()
        {
            return Some(error.clone());
        }
        lock(&self.inner.channel_refusal).clone()
    }

    /// Graceful shutdown: stop accepting, close channels, send SSH disconnect, end every task and
    /// remove the Unix socket directory. Idempotent; concurrent callers all wait for the end.
    pub async fn disconnect(&self) {
        let inner = self.inner.clone();
        self.inner.shutdown_done.get_or_init(|| inner.shutdown()).await;
    }

    /// Snapshot counters.
    pub fn stats(&self) -> TunnelStats {
        let c = &self.inner.counters;
        TunnelStats {
            sessions: self.inner.live_sessions(),
            channels_active: c.channels_active.load(Ordering::Relaxed),
            connections_total: c.connections_total.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            refused_connections: c.refused.load(Ordering::Relaxed),
            channel_open_failures: c.open_failures.load(Ordering::Relaxed),
            bytes_to_remote: c.bytes_to_remote.load(Ordering::Relaxed),
            bytes_from_remote: c.bytes_from_remote.load(Ordering::Relaxed),
        }
    }

    /// The configuration this tunnel was created with.
    pub fn config(&self) -> &TunnelConfig {
        &self.inner.config
    }
}

impl Inner {
    pub(crate) fn live_sessions(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire) || self.cancel.is_cancelled()
    }

    pub(crate) fn set_state(&self, state: TunnelState) {
        let up = state.is_connected();
        self.state.send_replace(state);
        metrics::gauge!(m::SSH_TUNNEL_UP, "pool" => self.pool_label.clone()).set(if up { 1.0 } else { 0.0 });
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

    pub(crate) fn record_error(&self, error: Arc<Error>) {
        *lock(&self.last_error) = Some(error);
    }

    /// The supervisor gave up: remember when (paces new rounds, see `ensure_connected_paced`).
    pub(crate) fn record_gave_up(&self) {
        *lock(&self.failed_at) = Some(Instant::now());
    }

    /// `Failed` (transient) -> `Reconnecting`, and wake the parked supervisor. Only the caller
    /// that made the transition notifies, so a round is started once, and no stale wake-up is
    /// left behind to skip a later backoff.
    pub(crate) fn restart_round(&self) -> bool {
        let restarted = self.state.send_if_modified(|s| match s {
            TunnelState::Failed { error } if error.is_transient() => {
                *s = TunnelState::Reconnecting {
                    attempt: 1,
                    next_delay: Duration::ZERO,
                };
                true
            }
            _ => false,
        });
        if restarted {
            self.changed.notify_waiters();
            self.wake.notify_one();
        }
        restarted
    }

    /// Records a reconnect (or the loss of one of several sessions): pooled connections made
    /// before now may ride a dead session.
    fn mark_reconnect(&self) {
        let now = Instant::now();
        *lock(&self.last_reconnect_at) = Some(now);
        self.generation.retire_before(now);
    }

    /// The bastion refused a channel permanently (or, with `None`, a channel opened).
    pub(crate) fn set_channel_refusal(&self, refusal: Option<Arc<Error>>) {
        let mut current = lock(&self.channel_refusal);
        if refusal.is_some() || current.is_some() {
            *current = refusal;
        }
    }

    fn gauges(&self) {
        let label = self.pool_label.clone();
        metrics::gauge!(m::SSH_TUNNEL_SESSIONS, "pool" => label.clone()).set(self.live_sessions() as f64);
        metrics::gauge!(m::SSH_TUNNEL_CHANNELS_ACTIVE, "pool" => label)
            .set(self.counters.channels_active.load(Ordering::Relaxed) as f64);
    }

    /// Registers an established session and starts its keepalive monitor.
    ///
    /// The first session and a session that replaces lost ones publish `Connected`; sessions
    /// opened for capacity publish `SessionOpened`.
    pub(crate) fn add_session(self: &Arc<Self>, session: Arc<SshSession>) {
        // Anything but the initial connect means every earlier session was lost.
        let reconnect = !matches!(*self.state.borrow(), TunnelState::Connecting);
        let (count, first) = {
            let mut sessions = lock(&self.sessions);
            sessions.push(session.clone());
            (sessions.len(), sessions.len() == 1)
        };
        if self.is_shutting_down() {
            // disconnect() raced with the open: it may already have collected the sessions.
            session.kill();
            lock(&self.sessions).retain(|s| s.id != session.id);
            return;
        }
        self.tracker.spawn(session::monitor(self.clone(), session.clone()));
        self.gauges();
        if first {
            if reconnect {
                self.mark_reconnect();
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::SSH_TUNNEL_RECONNECTS_TOTAL, "pool" => self.pool_label.clone()).increment(1);
            }
            tracing::info!(
                target: LOG_TARGET,
                event = "tunnel_connected",
                session = session.id,
                reconnect,
                bastion = %format_args!("{}:{}", self.config.host, self.config.port),
                local_endpoint = %self.endpoint,
                "SSH tunnel connected"
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
            let mut sessions = lock(&self.sessions);
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
        tracing::warn!(
            target: LOG_TARGET,
            event = "tunnel_disconnected",
            session = id,
            remaining,
            error = %reason,
            "SSH session lost"
        );
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
            self.mark_reconnect();
        }
        self.emit(TunnelEvent::Disconnected { session: id, reason });
        if remaining == 0 {
            self.lost.notify_one();
        }
        self.changed.notify_waiters();
    }

    /// Takes `session` out of the tunnel if it is an extra session (not the oldest) idle for
    /// `session_idle_timeout`.
    ///
    /// Channels are reserved only under the same lock and only on listed sessions, so once this
    /// has seen zero channels and removed the session, no channel can ever be opened on it.
    pub(crate) fn try_retire(&self, session: &SshSession) -> Retire {
        let remaining = {
            let mut sessions = lock(&self.sessions);
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

    /// Reserves a channel slot on the oldest session with room.
    pub(crate) fn try_reserve(&self) -> Option<Arc<SshSession>> {
        let sessions = lock(&self.sessions);
        let max = self.config.max_channels;
        // Reservations happen under the lock, so check-then-increment cannot overshoot.
        let s = sessions
            .iter()
            .find(|s| s.channels.load(Ordering::Acquire) < max && !s.is_dead())?;
        s.channels.fetch_add(1, Ordering::AcqRel);
        Some(s.clone())
    }

    async fn shutdown(self: Arc<Self>) {
        self.shutting_down.store(true, Ordering::Release);
        // 1. Stop accepting and end the forwarders, monitors and supervisor (dropping the channel
        //    streams sends CHANNEL_CLOSE for each).
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        // 2. SSH disconnect on every session, then make sure each russh task has ended.
        let sessions: Vec<_> = std::mem::take(&mut *lock(&self.sessions));
        for s in &sessions {
            s.close_gracefully().await;
        }
        drop(sessions);
        self.remove_unix_dir();
        self.counters.channels_active.store(0, Ordering::Relaxed);
        self.gauges();
        self.set_state(TunnelState::Disconnected);
        tracing::info!(target: LOG_TARGET, event = "tunnel_disconnected", local_endpoint = %self.endpoint, "SSH tunnel closed");
        self.emit(TunnelEvent::Closed);
    }

    fn remove_unix_dir(&self) {
        if let Some(dir) = &self.unix_dir {
            if let LocalEndpoint::Unix(path) = &self.endpoint {
                let _ = std::fs::remove_file(path);
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last reference gone (every task ended): never leave the socket directory behind.
        self.remove_unix_dir();
        for s in lock(&self.sessions).iter() {
            s.kill();
        }
    }
}

fn validate(config: &TunnelConfig) -> Result<()> {
    if config.host.is_empty() {
        return Err(Error::config("tunnel.host", "is empty"));
    }
    if config.user.is_empty() {
        return Err(Error::config("tunnel.user", "is empty"));
    }
    if config.port == 0 {
        return Err(Error::config("tunnel.port", "must not be 0"));
    }
    if config.remote_host.is_empty() {
        return Err(Error::config("tunnel.remote_host", "is empty"));
    }
    if config.remote_port == 0 {
        return Err(Error::config("tunnel.remote_port", "must not be 0"));
    }
    if config.max_channels == 0 {
        return Err(Error::config("tunnel.max_channels", "must be at least 1"));
    }
    if config.max_sessions == 0 {
        return Err(Error::config("tunnel.max_sessions", "must be at least 1"));
    }
    if config.keepalive_interval.is_zero() {
        return Err(Error::config("tunnel.keepalive_interval", "must be positive"));
    }
    if config.connect_timeout.is_zero() {
        return Err(Error::config("tunnel.connect_timeout", "must be positive"));
    }
    if config.session_idle_timeout.is_zero() {
        // Zero would close a session opened for capacity before its waiter could use it.
        return Err(Error::config("tunnel.session_idle_timeout", "must be positive"));
    }
    Ok(())
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

/// Locks a std mutex, ignoring poisoning (the data are plain values that stay consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A copy of an error that keeps its variant (and so `is_transient`); foreign sources are
/// flattened into the message. `Error` itself is not `Clone` because of those sources.
pub(crate) fn duplicate_error(e: &Error) -> Error {
    match e {
        Error::Config { field, message } => Error::Config {
            field: field.clone(),
            message: message.clone(),
        },
        Error::File {
            what, path, message, ..
        } => Error::File {
            what,
            path: path.clone(),
            message: message.clone(),
            source: None,
        },
        Error::KeyPassphrase { path, problem } => Error::KeyPassphrase {
            path: path.clone(),
            problem,
        },
        Error::HostKeyUnknown {
            host,
            fingerprint,
            known_hosts,
        } => Error::HostKeyUnknown {
            host: host.clone(),
            fingerprint: fingerprint.clone(),
            known_hosts: known_hosts.clone(),
        },
        Error::HostKeyChanged {
            host,
            expected,
            actual,
            source_of_expected,
        } => Error::HostKeyChanged {
            host: host.clone(),
            expected: expected.clone(),
            actual: actual.clone(),
            source_of_expected: source_of_expected.clone(),
        },
        Error::HostKeyRevoked {
            host,
            fingerprint,
            known_hosts,
        } => Error::HostKeyRevoked {
            host: host.clone(),
            fingerprint: fingerprint.clone(),
            known_hosts: known_hosts.clone(),
        },
        Error::Auth { user, host, tried } => Error::Auth {
            user: user.clone(),
            host: host.clone(),
            tried: tried.clone(),
        },
        Error::SshConnect {
            host,
            port,
            message,
            source,
        } => Error::SshConnect {
            host: host.clone(),
            port: *port,
            message: match source {
                Some(s) => format!("{message}: {s}"),
                None => message.clone(),
            },
            source: None,
        },
        Error::TunnelLost { host, reason } => Error::TunnelLost {
            host: host.clone(),
            reason: reason.clone(),
        },
        Error::ChannelRefused {
            target,
            reason,
            transient,
        } => Error::ChannelRefused {
            target: target.clone(),
            reason: reason.clone(),
            transient: *transient,
        },
        Error::TunnelFailed(inner) => Error::TunnelFailed(Box::new(duplicate_error(inner))),
        Error::Timeout { kind, after, detail } => Error::Timeout {
            kind: *kind,
            after: *after,
            detail: detail.clone(),
        },
        Error::NotInitialized(what) => Error::NotInitialized(what),
        Error::ShutDown(what) => Error::ShutDown(what),
        Error::Io { context, source } => Error::Io {
            context: context.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => Error::TunnelLost {
            host: String::new(),
            reason: other.to_string(),
        },
    }
}
