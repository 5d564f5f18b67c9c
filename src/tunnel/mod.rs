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
//!   `connect_timeout`) for the supervisor instead of being accepted and dropped
//!   (sqlx retries a connect only on `ConnectionRefused`, so an accepted-then-closed socket would
//!   fail the acquire at once).
//! - **Liveness.** Every session is pinged each `keepalive_interval`; without a reply for
//!   `keepalive_interval × keepalive_max` it is declared dead and its socket is aborted.
//! - **Recovery.** When the last session is lost the supervisor reconnects: the first attempt
//!   after a random spread in `[0, min(initial_delay, 1 s))` (so replicas that lost one bastion
//!   together do not all knock at once; none without jitter), then with the `reconnect` backoff. Each attempt is a [`TunnelEvent::Reconnecting`];
//!   after `max_retries` (0 = forever) the state becomes [`TunnelState::Failed`]. The tunnel
//!   keeps trying: `reconnect.max_delay` (plus jitter) after a round gave up on transient errors
//!   it starts a new round with the same schedule and limit, until it is shut down. Permanent
//!   errors (host key, authentication, key file, configuration) fail at once and are never
//!   retried. Nothing cuts a round's backoff short; only [`SshTunnel::ensure_connected`] may
//!   start the next round before that pause ends (see there).
//! - **Refused channels.** A channel the bastion refuses as `administratively prohibited`
//!   (`AllowTcpForwarding` / `PermitOpen`) closes that local connection. The SSH session stays up
//!   (the state stays `Connected`: a bastion reconfigured for new sessions, or a per-user rule
//!   changed, can allow the next channel), but [`SshTunnel::permanent_error`] reports the refusal
//!   until a channel opens again, so callers can tell "the database is unreachable by
//!   configuration" from a transient outage instead of retrying it.
//! - **Shutdown.** [`SshTunnel::disconnect`] stops accepting, closes channels, sends an SSH
//!   disconnect and waits for every task. Dropping the last handle does the same without waiting.
//! - **Jump hosts** (`SSH_PROXY_JUMP`, [`TunnelConfig::proxy_jump`]). Each session is a chain:
//!   TCP to the first jump host, then for every next hop (the last is the bastion) an SSH
//!   connection riding a `direct-tcpip` channel of the previous one. Every hop's host key is
//!   verified with its own known_hosts entry (`[host]:port`) before anything is sent to it, and
//!   every hop authenticates with the tunnel's credentials as its own user (the hop's `user@`,
//!   else the tunnel's). A pinned `SHA256:` policy is the bastion's: jump hosts are then checked
//!   strictly against known_hosts; `accept-new` and `insecure-accept-any` apply to every hop
//!   (the latter warns for each). `connect_timeout` bounds each hop. An error names its hop
//!   ([`Error::Hop`]: "hop 2 of 2 (bastion ops@10.0.0.5:22): ..."). The jump hosts' connections
//!   live as long as the session; the session is lost when any hop's connection ends, and the
//!   keepalive pings the bastion through the whole chain, so a silent first hop is noticed like
//!   a silent bastion. Reconnecting rebuilds the whole chain.
//! - **Several bastions** (`SSH_HOST=a,b:2222`, [`TunnelConfig::fallback_host`]). Each new
//!   session goes to the first bastion that works, in configuration order, except that one
//!   that failed within `reconnect.max_delay` (a connect error, or a session on it was lost) is
//!   tried after the others: losing the current bastion sends the reconnect to the next one,
//!   and the preferred bastion takes sessions again once it has been quiet that long. Live
//!   sessions are never moved. A bastion that fails permanently (host key, authentication) is
//!   left out for the tunnel's life ([`TunnelEvent::BastionFailed`] with `permanent`); the
//!   tunnel fails for good only when every bastion has. Session events carry the bastion, and
//!   [`SshTunnel::bastion`] says where the tunnel is now.
//! - **Several database servers** ([`TunnelConfig::alternate_targets`], filled by the
//!   [`ConnectionManager`](crate::ConnectionManager) from a multi-host `DATABASE_URL`). Each
//!   has its own local endpoint of the same kind ([`SshTunnel::target_endpoints`]; a loopback
//!   port, or a Unix socket in its own 0700 directory) forwarding over the same sessions, with
//!   TLS (when the tunnel holds it) verified against that server's own name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::DropGuard;

use crate::config::TunnelConfig;
use crate::generation::Generation;
use crate::{Error, Result};

pub(crate) mod auth;
pub mod diagnose;
mod forward;
mod global;
pub(crate) mod host_key;
mod inner;
pub(crate) mod pgbouncer;
pub(crate) mod pgwire;
mod session;
mod sessions;
mod socket;
mod spare;
mod supervisor;

use inner::Inner;

/// Tracing target of every tunnel event.
pub(crate) use crate::observe::events::TARGET_TUNNEL as LOG_TARGET;

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
    /// Gave up: a permanent error (for good), or `max_retries` exhausted (then `error` is the last
    /// one, and the next round starts by itself after `reconnect.max_delay`).
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
        /// The bastion (`host:port`) the session runs on.
        bastion: String,
    },
    /// An additional session was opened because every open session was at `max_channels`.
    SessionOpened {
        /// Session id.
        session: u64,
        /// Sessions now open.
        sessions: usize,
        /// The bastion (`host:port`) the session runs on.
        bastion: String,
    },
    /// An additional session opened for capacity had no channel for `session_idle_timeout` and
    /// was closed (SSH disconnect). Not a failure: nothing reconnects, and no connection rode it.
    SessionClosed {
        /// Session id.
        session: u64,
        /// Sessions still open.
        sessions: usize,
        /// The bastion (`host:port`) the session ran on.
        bastion: String,
    },
    /// A session ended (lost link, closed by the server, keepalive unanswered).
    Disconnected {
        /// Session id.
        session: u64,
        /// Why.
        reason: String,
        /// The bastion (`host:port`) the session ran on.
        bastion: String,
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
    /// With several bastions (`SSH_HOST=a,b:2222`): connecting through one failed, and the next
    /// one (if any) is tried. A permanent failure takes that bastion out for the tunnel's life.
    BastionFailed {
        /// The bastion (`host:port`).
        bastion: String,
        /// What failed (names the hop, in a ProxyJump chain).
        error: Arc<Error>,
        /// `true` for a permanent error (host key, authentication): not tried again.
        permanent: bool,
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
    /// Spare channels opened ([`TunnelConfig::spare_channel`]).
    pub spare_channels_opened: u64,
    /// Local connections served on a spare channel (no channel-open round trip).
    pub spare_channels_used: u64,
    /// Spare channels closed unused: past their time, discarded, or found closed.
    pub spare_channels_discarded: u64,
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
                    "{}@{}:{}{}",
                    self.inner.config.user,
                    self.inner.config.host,
                    self.inner.config.port,
                    if self.inner.config.fallback_hosts.is_empty() {
                        ""
                    } else {
                        " (+ fallbacks)"
                    }
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
        Self::connect_labeled(config, crate::observe::metrics::DEFAULT_POOL).await
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
        let auth_config = config.auth.clone();
        // Decrypting a key (bcrypt KDF) takes a while: keep it off the async workers.
        let credentials = tokio::task::spawn_blocking(move || auth::Credentials::load(&auth_config))
            .await
            .map_err(|e| Error::Io {
                context: "loading the SSH key".into(),
                source: std::io::Error::other(e).into(),
            })??;
        let (listener, endpoint, unix_dir) = forward::bind(&config).await?;
        let main_route = Arc::new(forward::Route::main(&config));
        // Alternate targets: one endpoint each (a failure here drops what was bound so far,
        // removing their socket directories).
        let mut alternates = Vec::with_capacity(config.alternate_targets.len());
        let mut alternate_listeners = Vec::with_capacity(config.alternate_targets.len());
        for (i, (host, port)) in config.alternate_targets.iter().enumerate() {
            let route = forward::Route::alternate(&config, i, host, *port);
            match forward::bind_alternate(&config, &route).await {
                Ok((listener, endpoint, dir)) => {
                    alternates.push((endpoint, dir));
                    alternate_listeners.push((listener, Arc::new(route)));
                }
                Err(e) => {
                    inner::remove_socket_dirs(
                        std::iter::once((&endpoint, &unix_dir)).chain(alternates.iter().map(|(e, d)| (e, d))),
                    );
                    return Err(e);
                }
            }
        }
        let inner = Arc::new(Inner::new(
            config,
            pool_label.into(),
            generation,
            credentials,
            endpoint,
            unix_dir,
            alternates,
        ));
        let tunnel = SshTunnel {
            _alive: Arc::new(inner.cancel.clone().drop_guard()),
            inner: inner.clone(),
        };
        inner.gauges();
        match supervisor::connect_first(&inner).await {
            Ok(session) => inner.add_session(session),
            Err(e) => {
                // Nothing was spawned yet; the drop guard cancels, `Inner::drop` removes the socket dir.
                inner.set_state(TunnelState::Failed {
                    error: Arc::new(e.clone()),
                });
                return Err(e);
            }
        }
        // Each endpoint's servers: its own, then (falling through) the others in list order from
        // there, wrapping around.
        let routes: Vec<Arc<forward::Route>> = std::iter::once(main_route)
            .chain(alternate_listeners.iter().map(|(_, route)| route.clone()))
            .collect();
        let listeners = std::iter::once(listener).chain(alternate_listeners.into_iter().map(|(l, _)| l));
        // `max_local_connections` counts the connections of every endpoint together.
        let limit = inner
            .config
            .max_local_connections
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        for (i, listener) in listeners.enumerate() {
            let chain: Arc<[Arc<forward::Route>]> = if inner.config.alternate_fallthrough {
                routes[i..].iter().chain(&routes[..i]).cloned().collect()
            } else {
                routes[i..=i].into()
            };
            inner
                .tracker
                .spawn(forward::accept_loop(inner.clone(), listener, chain, limit.clone()));
        }
        inner.tracker.spawn(supervisor::run(inner.clone()));
        Ok(tunnel)
    }

    /// The local endpoint. Stable for the tunnel's whole life: reconnects never move it.
    pub fn local_endpoint(&self) -> &LocalEndpoint {
        &self.inner.endpoint
    }

    /// Every database server the tunnel forwards to, as `(host:port as the bastion dials it,
    /// local endpoint)`: the configured remote target first, then each of
    /// [`TunnelConfig::alternate_targets`], in order. Stable for the tunnel's whole life.
    pub fn target_endpoints(&self) -> Vec<(String, LocalEndpoint)> {
        let config = &self.inner.config;
        let name = crate::url::host_port;
        std::iter::once((
            name(&config.remote_host, config.remote_port),
            self.inner.endpoint.clone(),
        ))
        .chain(
            config
                .alternate_targets
                .iter()
                .zip(&self.inner.alternates)
                .map(|((host, port), (endpoint, _))| (name(host, *port), endpoint.clone())),
        )
        .collect()
    }

    /// True while at least one SSH session is up (`isConnectedToTunnel` in other tunnel libraries).
    pub fn is_connected(&self) -> bool {
        !self.inner.disconnecting() && self.inner.live_sessions() > 0
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
        self.inner.sessions.last_reconnect_at()
    }

    /// The most recent error (a failed reconnect attempt, a lost session, a refused channel).
    pub fn last_error(&self) -> Option<Arc<Error>> {
        self.inner.last_error()
    }

    /// Waits until a session is up, bounded by `connect_timeout`; never cuts a reconnect short.
    ///
    /// - Connected: `Ok(())` at once.
    /// - Connecting / reconnecting: waits for the current round of attempts (it keeps its backoff
    ///   schedule: this never makes an attempt happen sooner).
    /// - Failed with a permanent error (host key, authentication, ...): that error, at once.
    /// - Failed after `max_retries` transient failures: the tunnel starts its next round by itself
    ///   `reconnect.max_delay` later; this explicit call asks for that round **now** (attempt 1 at
    ///   once, then the backoff and the retry limit again) and waits for it. Concurrent callers
    ///   share one round. The [`ConnectionManager`](crate::manager::ConnectionManager)'s health
    ///   checks never ask: they only read the tunnel's state.
    ///
    /// On timeout: the last reconnect error, or an [`Error::Timeout`].
    pub async fn ensure_connected(&self) -> Result<()> {
        let inner = &self.inner;
        if self.is_connected() {
            return Ok(());
        }
        if inner.disconnecting() {
            return Err(Error::ShutDown("SshTunnel"));
        }
        let mut rx = inner.state.subscribe();
        let gave_up = match &*rx.borrow_and_update() {
            TunnelState::Failed { error } if !error.is_transient() => return Err(Error::clone(error)),
            TunnelState::Failed { error } => Some(error.clone()),
            _ => None,
        };
        if gave_up.is_some() {
            inner.round_requested.notify_waiters();
        }
        let timeout = inner.config.connect_timeout;
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| match s {
                TunnelState::Connected | TunnelState::Disconnected => true,
                // The failure seen above is the round before the one asked for: wait for that one.
                TunnelState::Failed { error } => !gave_up.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, error)),
                TunnelState::Connecting | TunnelState::Reconnecting { .. } => false,
            }),
        )
        .await;
        match waited {
            Ok(Ok(state)) => match &*state {
                TunnelState::Connected => Ok(()),
                TunnelState::Failed { error } => Err(Error::clone(error)),
                _ => Err(Error::ShutDown("SshTunnel")),
            },
            Ok(Err(_)) => Err(Error::ShutDown("SshTunnel")),
            Err(_) => Err(match self.last_error() {
                Some(e) => Error::clone(&e),
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
    ///   ([`Error::ChannelRefused`] with `transient: false`, e.g. `administratively prohibited`),
    ///   or the latest TLS negotiation with PostgreSQL was refused for good ([`Error::Tls`]: wrong
    ///   CA, expired certificate, name mismatch, no TLS where it is required); this clears as soon
    ///   as a channel opens (and negotiates) again.
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
        self.inner.channel_refusal()
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
            spare_channels_opened: c.spares_opened.load(Ordering::Relaxed),
            spare_channels_used: c.spares_used.load(Ordering::Relaxed),
            spare_channels_discarded: c.spares_discarded.load(Ordering::Relaxed),
        }
    }

    /// Closes the spare channels ready now ([`TunnelConfig::spare_channel`]) instead of handing
    /// them to the next connections: they were connected to wherever the database's name pointed
    /// when they were opened. The [`ConnectionManager`](crate::ConnectionManager) calls this on
    /// every failover signal; call it when you know the server behind the name changed.
    pub fn discard_spares(&self) {
        self.inner.discard_spares();
    }

    /// The bastion (`host:port`) the oldest live session runs on, which takes new channels
    /// first; `None` while no session is up. With several bastions (`SSH_HOST=a,b:2222`) this is
    /// where the tunnel is now.
    pub fn bastion(&self) -> Option<String> {
        self.inner.current_bastion()
    }

    /// The SSH cipher negotiated with the bastion on the current session, e.g.
    /// `aes256-gcm@openssh.com` (AES-GCM is preferred where the CPU has AES instructions, else
    /// chacha20-poly1305; the bastion's `Ciphers` may narrow it). `None` while no session is up.
    pub fn cipher(&self) -> Option<String> {
        self.inner.current_cipher()
    }

    /// The configuration this tunnel was created with.
    pub fn config(&self) -> &TunnelConfig {
        &self.inner.config
    }
}
