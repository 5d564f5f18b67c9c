//! The local endpoint and the forwarding of each accepted connection over a `direct-tcpip` channel.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::pgwire;
use super::session::SshSession;
use super::sessions::Reservation;
use super::{Inner, LOG_TARGET, LocalEndpoint, TunnelEvent, TunnelState};
use crate::config::{LocalEndpointConfig, TunnelConfig};
use crate::error::TimeoutKind;
use crate::observe::events as observe;
use crate::{Error, Result};

/// Copy buffer per direction: one full SSH channel packet (32 KiB) per read.
const COPY_BUF: usize = 32 * 1024;

/// The bound local endpoint.
pub(crate) enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener),
}

/// A database server the tunnel forwards to: the configured remote target, or one of
/// [`TunnelConfig::alternate_targets`], each behind its own local endpoint.
pub(crate) struct Route {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// TLS to this server (its own name verified), when the tunnel holds TLS.
    tls: Option<crate::tls::PostgresTls>,
    /// The spare channel to this server (see [`super::spare`]).
    spares: Arc<super::spare::Spares>,
}

impl Route {
    /// The configured target.
    pub(crate) fn main(config: &TunnelConfig) -> Route {
        Route {
            host: config.remote_host.clone(),
            port: config.remote_port,
            tls: config.postgres_tls.clone(),
            spares: Arc::default(),
        }
    }

    /// Alternate target `i`, with TLS checked against its own name: its entry in
    /// `alternate_server_names` when there is one (the bastion dials its `hostaddr`), else its
    /// host, unless the certificate name was set apart from the host, as `sslservername` does:
    /// then that name, for every server.
    pub(crate) fn alternate(config: &TunnelConfig, i: usize, host: &str, port: u16) -> Route {
        let tls = config.postgres_tls.clone().map(|tls| {
            if let Some(name) = config.alternate_server_names.get(i) {
                tls.server_name(name)
            } else if tls.server_name == config.remote_host {
                tls.server_name(host)
            } else {
                tls
            }
        });
        Route {
            host: host.to_owned(),
            port,
            tls,
            spares: Arc::default(),
        }
    }

    fn target(&self) -> String {
        crate::url::host_port(&self.host, self.port)
    }
}

/// Binds the endpoint: `127.0.0.1:port` (never a wildcard address), or a Unix socket
/// `.s.PGSQL.<remote_port>` in a fresh 0700 directory under the temp dir.
pub(crate) async fn bind(config: &TunnelConfig) -> Result<(Listener, LocalEndpoint, Option<PathBuf>)> {
    // TLS files are read once, here: a missing sslrootcert fails the start, not each connection.
    if let Some(tls) = config.postgres_tls.as_ref().filter(|t| t.is_enabled()) {
        tls.validate()?;
    }
    bind_endpoint(&config.local, config.remote_port).await
}

/// Binds the local endpoint of an alternate target: an ephemeral loopback port when the main
/// endpoint is TCP, else a Unix socket named after `remote_port` in its own 0700 directory.
pub(crate) async fn bind_alternate(
    config: &TunnelConfig,
    route: &Route,
) -> Result<(Listener, LocalEndpoint, Option<PathBuf>)> {
    if let Some(tls) = route.tls.as_ref().filter(|t| t.is_enabled()) {
        tls.validate()?;
    }
    let local = match config.local {
        LocalEndpointConfig::Tcp(_) => LocalEndpointConfig::Tcp(0),
        ref other => other.clone(),
    };
    bind_endpoint(&local, route.port).await
}

async fn bind_endpoint(
    local: &LocalEndpointConfig,
    remote_port: u16,
) -> Result<(Listener, LocalEndpoint, Option<PathBuf>)> {
    match local {
        LocalEndpointConfig::Tcp(port) => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            let listener = TcpListener::bind(addr).await.map_err(|e| Error::Io {
                context: format!("binding the tunnel's local endpoint {addr}"),
                source: e.into(),
            })?;
            let local = listener.local_addr().map_err(|e| Error::Io {
                context: "reading the tunnel's local address".into(),
                source: e.into(),
            })?;
            Ok((Listener::Tcp(listener), LocalEndpoint::Tcp(local), None))
        }
        #[cfg(unix)]
        LocalEndpointConfig::Unix => {
            use std::os::unix::fs::DirBuilderExt;
            let dir = std::env::temp_dir().join(format!(
                "sea-orm-tunnel-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            // Mode 0700 from creation: only this OS user can reach the socket inside.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::Io {
                    context: format!("creating the tunnel's socket directory {}", dir.display()),
                    source: e.into(),
                })?;
            let path = dir.join(format!(".s.PGSQL.{remote_port}"));
            match tokio::net::UnixListener::bind(&path) {
                Ok(listener) => Ok((Listener::Unix(listener), LocalEndpoint::Unix(path), Some(dir))),
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    Err(Error::Io {
                        context: format!("binding the tunnel's Unix socket {}", path.display()),
                        source: e.into(),
                    })
                }
            }
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::config(
            "tunnel.local",
            "this local endpoint kind is not supported on this platform",
        )),
    }
}

/// Accepts local connections until the tunnel shuts down; the listener closes when this ends.
/// `routes` are the endpoint's server and, with
/// [`TunnelConfig::alternate_fallthrough`], the ones a connection falls through to.
/// `limit` is `max_local_connections` (one permit per local connection being served), shared by
/// every endpoint of the tunnel.
pub(crate) async fn accept_loop(
    inner: Arc<Inner>,
    listener: Listener,
    routes: Arc<[Arc<Route>]>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
) {
    loop {
        let accepted = tokio::select! {
            () = inner.cancel.cancelled() => return,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((stream, origin)) => {
                inner.counters.connections_total.fetch_add(1, Ordering::Relaxed);
                let permit = match &limit {
                    None => None,
                    Some(limit) => match limit.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            inner.tracker.spawn(refuse_over_limit(inner.clone(), stream));
                            continue;
                        }
                    },
                };
                let inner = inner.clone();
                let routes = routes.clone();
                inner.tracker.clone().spawn(async move {
                    serve(inner, stream, origin, routes).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(target: LOG_TARGET, error = %e, "accepting a local connection failed");
                tokio::select! {
                    () = inner.cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// A local connection, TCP or Unix.
enum LocalStream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(LocalStream, (String, u32))> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            // Database protocols are request/response with small messages.
            let _ = stream.set_nodelay(true);
            Ok((
                LocalStream::Tcp(stream),
                (peer.ip().to_string(), u32::from(peer.port())),
            ))
        }
        #[cfg(unix)]
        Listener::Unix(l) => {
            let (stream, _) = l.accept().await?;
            Ok((LocalStream::Unix(stream), ("127.0.0.1".to_owned(), 0)))
        }
    }
}

/// Why a local connection could not get a channel.
enum Refusal {
    ShutDown,
    Failed(Arc<Error>),
    NoSession,
    Capacity,
}

/// A reserved channel on a session that serves a local connection (counted as active); the
/// reservation is released on drop.
struct Slot {
    inner: Arc<Inner>,
    reservation: Reservation,
}

impl Slot {
    fn new(inner: &Arc<Inner>, reservation: Reservation) -> Self {
        inner.counters.channels_active.fetch_add(1, Ordering::Relaxed);
        inner.channels_changed();
        Slot {
            inner: inner.clone(),
            reservation,
        }
    }

    fn session(&self) -> &Arc<SshSession> {
        self.reservation.session()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // disconnect() resets the counter to 0 after the tasks ended; never wrap below it.
        let _ = self
            .inner
            .counters
            .channels_active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        self.inner.channels_changed();
        // Then `reservation` drops: the channel is released and waiters are woken.
    }
}

/// Waits (until `deadline`) for a session with a free channel, opening another session when every
/// open one is full and `max_sessions` allows it.
async fn acquire_slot(inner: &Arc<Inner>, deadline: Instant) -> std::result::Result<Slot, Refusal> {
    loop {
        let notified = inner.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if inner.is_shutting_down() {
            return Err(Refusal::ShutDown);
        }
        if let Some(reservation) = inner.try_reserve() {
            return Ok(Slot::new(inner, reservation));
        }
        if let TunnelState::Failed { error } = &*inner.state.borrow() {
            return Err(Refusal::Failed(error.clone()));
        }
        let live = inner.live_sessions();
        inner.open_for_capacity(live);
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(deadline) => {
                return Err(if live == 0 { Refusal::NoSession } else { Refusal::Capacity });
            }
            () = inner.cancel.cancelled() => return Err(Refusal::ShutDown),
        }
    }
}

/// Forwards one local connection: reserve a slot, open the channel, copy both ways (through the
/// PostgreSQL startup phase first when the tunnel holds TLS).
async fn serve(inner: Arc<Inner>, local: LocalStream, origin: (String, u32), routes: Arc<[Arc<Route>]>) {
    // Every route of a tunnel holds TLS or none does (they differ in the name only): the first
    // one decides the path. Its settings were loaded (and validated) by `bind`.
    let startup = match startup_settings(&inner, &routes[0]) {
        Ok(startup) => startup.is_some(),
        Err(()) => return,
    };
    match (local, startup) {
        (local, false) => serve_raw(inner, local, origin, &routes).await,
        (LocalStream::Tcp(s), true) => serve_startup(inner, s, origin, &routes).await,
        #[cfg(unix)]
        (LocalStream::Unix(s), true) => serve_startup(inner, s, origin, &routes).await,
    }
}

/// The startup path's settings for `route`: its TLS, the plaintext ones in PgBouncer mode
/// (which parses the protocol after the startup as well), `None` for a plain copy. `Err` (logged)
/// when its TLS settings are unusable.
fn startup_settings(inner: &Inner, route: &Route) -> std::result::Result<Option<Arc<crate::tls::Loaded>>, ()> {
    match route.tls.as_ref().filter(|t| t.is_enabled()) {
        // Loaded (and validated) by `bind`: a cache hit.
        Some(tls) => match tls.load() {
            Ok(loaded) => Ok(Some(loaded)),
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, error = %e, "TLS settings unusable; closing the local connection");
                Err(())
            }
        },
        None if inner.config.pgbouncer => Ok(Some(plaintext_startup())),
        None => Ok(None),
    }
}

/// The startup path's settings for a plaintext upstream (PgBouncer mode without TLS): built once.
fn plaintext_startup() -> Arc<crate::tls::Loaded> {
    static PLAIN: std::sync::OnceLock<Arc<crate::tls::Loaded>> = std::sync::OnceLock::new();
    PLAIN
        .get_or_init(|| {
            crate::tls::PostgresTls::disabled()
                .load()
                .expect("sslmode=disable reads no file")
        })
        .clone()
}

/// Takes the route's spare channel when one is ready and good, else reserves a slot and opens a
/// channel, waiting (until `deadline`) for a session; then asks for the next spare (when spares
/// are on). A server that refuses TCP is skipped for the next of `routes` (there is one unless
/// [`TunnelConfig::alternate_fallthrough`]). `Err(None)` when the connection was refused
/// (already counted and logged), with the reply for the client when it can be told why.
async fn slot_and_channel<'r>(
    inner: &Arc<Inner>,
    origin: &(String, u32),
    deadline: Instant,
    routes: &'r [Arc<Route>],
) -> std::result::Result<(Slot, russh::Channel<russh::client::Msg>, &'r Route), Option<Vec<u8>>> {
    for (i, route) in routes.iter().enumerate() {
        let got = match route.spares.take(inner) {
            Some((reservation, channel)) => Ok((Slot::new(inner, reservation), channel)),
            None => open_slot_and_channel(inner, origin, deadline, route).await,
        };
        match got {
            Ok((slot, channel)) => {
                super::spare::refill(inner, &route.spares, &route.host, route.port);
                return Ok((slot, channel, route));
            }
            Err(Failure::Unreachable) if i + 1 < routes.len() => {
                tracing::info!(
                    target: LOG_TARGET,
                    from = %route.target(),
                    to = %routes[i + 1].target(),
                    "the server refused the connection; trying the next one"
                );
            }
            Err(Failure::Unreachable) => return Err(None),
            Err(Failure::Refused(reply)) => return Err(reply),
        }
    }
    Err(None)
}

/// Why no channel was opened to a route.
enum Failure {
    /// The server refused TCP (`connect failed`).
    Unreachable,
    /// Anything else; the reply for the client when it can be told why.
    Refused(Option<Vec<u8>>),
}

async fn open_slot_and_channel(
    inner: &Arc<Inner>,
    origin: &(String, u32),
    deadline: Instant,
    route: &Route,
) -> std::result::Result<(Slot, russh::Channel<russh::client::Msg>), Failure> {
    loop {
        let slot = match acquire_slot(inner, deadline).await {
            Ok(slot) => slot,
            Err(refusal) => return Err(Failure::Refused(refuse(inner, refusal, inner.config.connect_timeout))),
        };
        match open_channel(inner, slot.session(), origin, route).await {
            Ok(channel) => return Ok((slot, channel)),
            Err(OpenError::SessionGone) => {
                // The session died under us: try another one (or wait for the reconnect).
                drop(slot);
                continue;
            }
            Err(OpenError::Unreachable) => return Err(Failure::Unreachable),
            Err(OpenError::Refused) => return Err(Failure::Refused(None)),
        }
    }
}

/// The startup phase (see [`pgwire`]): the client's startup read here, TLS (or not, per
/// `sslmode`) negotiated upstream, the startup sent on, then bytes copied untouched.
async fn serve_startup<S: AsyncRead + AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    local: S,
    origin: (String, u32),
    routes: &[Arc<Route>],
) {
    use tokio::io::AsyncWriteExt as _;
    let timeout = inner.config.connect_timeout;
    let deadline = Instant::now() + timeout;
    let (to_remote, from_remote) = inner.telemetry.byte_counters();
    let mut local = Counted {
        inner: local,
        counters: &inner.counters,
        to_remote,
        from_remote,
    };
    let startup = match tokio::time::timeout_at(deadline, pgwire::read_client_startup(&mut local)).await {
        Ok(Ok(startup)) => startup,
        Ok(Err(pgwire::StartupError::Protocol(message))) => {
            tracing::debug!(target: LOG_TARGET, %message, "local connection is not a PostgreSQL startup");
            let reply = pgwire::error_response(pgwire::SQLSTATE_PROTOCOL_VIOLATION, &message, None, None);
            let _ = local.write_all(&reply).await;
            return;
        }
        Ok(Err(pgwire::StartupError::Io(e))) => {
            tracing::trace!(target: LOG_TARGET, error = %e, "local client left before its startup message");
            return;
        }
        // Nothing in time.
        Err(_) => return,
    };
    let (slot, channel, route) = match slot_and_channel(&inner, &origin, deadline, routes).await {
        Ok(got) => got,
        Err(reply) => {
            if let Some(reply) = reply {
                let _ = local.write_all(&reply).await;
                let _ = local.flush().await;
            }
            return;
        }
    };
    // The server the channel reached (its own TLS name, when the connection fell through).
    let Ok(Some(tls)) = startup_settings(&inner, route) else {
        return;
    };
    let negotiated = tokio::select! {
        r = tokio::time::timeout_at(deadline, pgwire::negotiate(channel.into_stream(), &tls)) => r,
        () = slot.session().kill.cancelled() => return,
        () = inner.cancel.cancelled() => return,
    };
    let mut upstream = match negotiated {
        Ok(Ok(pgwire::Negotiated::Ready(upstream))) => upstream,
        Ok(Ok(pgwire::Negotiated::ServerError(server))) => {
            // The server's own error: hand it over as it comes.
            if local.write_all(b"E").await.is_ok() {
                let mut server = server;
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut server, COPY_BUF, COPY_BUF).await;
            }
            return;
        }
        // The channel broke mid-negotiation: close, as a plain forward would, so the client
        // sees the same I/O error it would see without TLS in the tunnel.
        Ok(Err(error)) if error.is_transient() => {
            tracing::debug!(target: LOG_TARGET, error = %error, "connection to PostgreSQL lost during TLS negotiation");
            inner.record_error(Arc::new(error));
            return;
        }
        Ok(Err(error)) => return tls_refused(&inner, &mut local, error).await,
        Err(_) => {
            let error = tls.error(
                crate::error::TlsErrorKind::Io,
                format!("no TLS handshake with the server within {timeout:?}"),
            );
            return tls_refused(&inner, &mut local, error).await;
        }
    };
    if let Some(session) = upstream.tls_session(&tls) {
        if let Some(left) = session.expires_in_secs() {
            inner.telemetry.set_tls_cert_expiry(left);
        }
        tls.record(session);
    }
    // The server's first answer is read here, not in the copy: a TLS 1.3 server refuses a
    // client certificate only after the handshake, and that must reach the client as an error;
    // and a SASL offer must lose its channel-binding mechanism (see `pgwire`).
    let is_tls = matches!(upstream, pgwire::Upstream::Tls(_));
    let first = async {
        upstream.write_all(&startup.message).await?;
        upstream.flush().await?;
        if startup.kind == pgwire::StartupKind::Cancel {
            // The server answers a cancel request with nothing.
            return Ok(None);
        }
        pgwire::read_first_server_message(&mut upstream).await.map(Some)
    };
    let first = tokio::select! {
        r = first => r,
        () = slot.session().kill.cancelled() => return,
        () = inner.cancel.cancelled() => return,
    };
    match first {
        Ok(None) => {}
        Ok(Some(message)) => {
            if local.write_all(&message).await.is_err() {
                return;
            }
        }
        Err(e) => {
            let error = tls.handshake_error(&e);
            if is_tls && !error.is_transient() {
                return tls_refused(&inner, &mut local, error).await;
            }
            tracing::trace!(target: LOG_TARGET, error = %e, "forwarded connection ended during startup");
            return;
        }
    }
    let copy = async {
        if inner.config.pgbouncer {
            // Named prepared statements become the unnamed one (see `pgbouncer`).
            super::pgbouncer::copy_rewriting(&mut local, &mut upstream).await
        } else {
            tokio::io::copy_bidirectional_with_sizes(&mut local, &mut upstream, COPY_BUF, COPY_BUF)
                .await
                .map(drop)
        }
    };
    until_the_session_ends(&inner, slot.session(), copy).await;
    drop(upstream);
    drop(slot);
}

/// A TLS failure: recorded (a permanent one is reported by `SshTunnel::permanent_error`, so the
/// manager returns it instead of retrying), logged, and told to the local client.
async fn tls_refused<S: AsyncWrite + Unpin>(inner: &Inner, local: &mut S, error: Error) {
    use tokio::io::AsyncWriteExt as _;
    let reply = pgwire::error_response_for(&error);
    if error.is_transient() {
        tracing::debug!(target: LOG_TARGET, error = %error, "TLS to PostgreSQL failed");
    } else {
        tracing::warn!(target: LOG_TARGET, error = %error, "TLS to PostgreSQL refused");
    }
    let error = Arc::new(error);
    if !error.is_transient() {
        inner.set_channel_refusal(Some(error.clone()));
    }
    inner.record_error(error);
    let _ = local.write_all(&reply).await;
    let _ = local.flush().await;
}

/// Forwards one local connection as bytes: reserve a slot, open the channel, copy both ways.
async fn serve_raw(inner: Arc<Inner>, mut local: LocalStream, origin: (String, u32), routes: &[Arc<Route>]) {
    let timeout = inner.config.connect_timeout;
    let deadline = Instant::now() + timeout;
    let Some(first) = answer_encryption_locally(&inner, &mut local, deadline).await else {
        return;
    };
    let (slot, channel, _) = match slot_and_channel(&inner, &origin, deadline, routes).await {
        Ok(got) => got,
        Err(Some(reply)) => {
            // Nothing was forwarded yet: a PostgreSQL client can be told why.
            let tell = async {
                match &mut local {
                    LocalStream::Tcp(s) => tell_refused(&mut Prefixed::new(s, first), &reply).await,
                    #[cfg(unix)]
                    LocalStream::Unix(s) => tell_refused(&mut Prefixed::new(s, first), &reply).await,
                }
            };
            tokio::select! {
                () = tell => {}
                () = inner.cancel.cancelled() => {}
            }
            return;
        }
        Err(None) => return,
    };
    let mut remote = channel.into_stream();
    let (to_remote, from_remote) = inner.telemetry.byte_counters();
    let copy = async {
        match local {
            LocalStream::Tcp(s) => copy(&inner, Prefixed::new(s, first), &mut remote, to_remote, from_remote).await,
            #[cfg(unix)]
            LocalStream::Unix(s) => copy(&inner, Prefixed::new(s, first), &mut remote, to_remote, from_remote).await,
        }
    };
    until_the_session_ends(&inner, slot.session(), copy).await;
    drop(remote);
    drop(slot);
}

/// With `sslmode=disable` and no TLS held by the tunnel the answer to a client's `SSLRequest` /
/// `GSSENCRequest` is known (`N`: the operator ruled TLS to PostgreSQL out), so it is given here
/// instead of after a round trip to the server. Returns the client's first bytes that are not such
/// a request, to be forwarded first (always empty, nothing read, with any other sslmode: then the
/// client's own sslmode decides with the server); `None` when the client left.
async fn answer_encryption_locally(inner: &Inner, local: &mut LocalStream, deadline: Instant) -> Option<Vec<u8>> {
    if inner.config.postgres_tls.as_ref().is_none_or(|t| t.is_enabled()) {
        return Some(Vec::new());
    }
    let answer = async {
        match local {
            LocalStream::Tcp(s) => pgwire::answer_encryption_requests(s, deadline).await,
            #[cfg(unix)]
            LocalStream::Unix(s) => pgwire::answer_encryption_requests(s, deadline).await,
        }
    };
    let answered = tokio::select! {
        r = answer => r,
        () = inner.cancel.cancelled() => return None,
    };
    match answered {
        Ok(first) => first,
        Err(e) => {
            tracing::trace!(target: LOG_TARGET, error = %e, "local client left during its encryption request");
            None
        }
    }
}

/// Runs a forwarded connection's copy until it ends, its SSH session dies (the local side is then
/// closed at once, so the client sees it) or the tunnel shuts down.
async fn until_the_session_ends<T>(inner: &Inner, session: &SshSession, copy: impl Future<Output = io::Result<T>>) {
    tokio::select! {
        r = copy => {
            if let Err(e) = r {
                tracing::trace!(target: LOG_TARGET, session = session.id, error = %e, "forwarded connection ended with an error");
            }
        }
        () = session.kill.cancelled() => {}
        () = inner.cancel.cancelled() => {}
    }
}

async fn copy<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    local: S,
    remote: &mut russh::ChannelStream<russh::client::Msg>,
    to_remote: metrics::Counter,
    from_remote: metrics::Counter,
) -> io::Result<(u64, u64)> {
    let mut local = Counted {
        inner: local,
        counters: &inner.counters,
        to_remote,
        from_remote,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut local, remote, COPY_BUF, COPY_BUF).await
}

enum OpenError {
    SessionGone,
    /// The bastion could not connect to the server (`connect failed`).
    Unreachable,
    Refused,
}

/// How one `direct-tcpip` open on a session ended.
pub(super) enum RawOpen {
    /// Answered, or timed out after the connect timeout (`Err`).
    Done(
        std::result::Result<
            std::result::Result<russh::Channel<russh::client::Msg>, russh::Error>,
            tokio::time::error::Elapsed,
        >,
    ),
    /// The session was killed while waiting.
    Killed,
    /// The tunnel is shutting down.
    Cancelled,
}

/// Opens a `direct-tcpip` channel to `host:port` on `session`, bounded by the connect timeout and
/// abandoned when the session is killed or the tunnel cancelled. The callers decide what a
/// failure means (an error for the connection that asked, nothing for a spare).
pub(super) async fn raw_open(
    inner: &Inner,
    session: &SshSession,
    host: String,
    port: u16,
    origin: (String, u32),
) -> RawOpen {
    let open = session
        .handle
        .channel_open_direct_tcpip(host, u32::from(port), origin.0, origin.1);
    tokio::select! {
        r = tokio::time::timeout(inner.config.connect_timeout, open) => RawOpen::Done(r),
        () = session.kill.cancelled() => RawOpen::Killed,
        () = inner.cancel.cancelled() => RawOpen::Cancelled,
    }
}

async fn open_channel(
    inner: &Arc<Inner>,
    session: &SshSession,
    origin: &(String, u32),
    route: &Route,
) -> std::result::Result<russh::Channel<russh::client::Msg>, OpenError> {
    let config = &inner.config;
    let target = route.target();
    let result = match raw_open(
        inner,
        session,
        route.host.clone(),
        route.port,
        (origin.0.clone(), origin.1),
    )
    .await
    {
        RawOpen::Done(result) => result,
        RawOpen::Killed => return Err(OpenError::SessionGone),
        RawOpen::Cancelled => return Err(OpenError::Refused),
    };
    let unreachable = matches!(
        result,
        Ok(Err(russh::Error::ChannelOpenFailure(
            russh::ChannelOpenFailure::ConnectFailed
        )))
    );
    let (error, permanent) = match result {
        Ok(Ok(channel)) => {
            inner.set_channel_refusal(None);
            return Ok(channel);
        }
        Ok(Err(russh::Error::ChannelOpenFailure(failure))) => {
            use russh::ChannelOpenFailure as F;
            let permanent = matches!(failure, F::AdministrativelyProhibited | F::UnknownChannelType);
            let reason = match failure {
                F::AdministrativelyProhibited => {
                    "administratively prohibited (check AllowTcpForwarding / PermitOpen on the bastion)".to_owned()
                }
                F::ConnectFailed => "connect failed (the target is not reachable from the bastion)".to_owned(),
                F::UnknownChannelType => "direct-tcpip channels are not supported".to_owned(),
                F::ResourceShortage => "resource shortage".to_owned(),
                F::Other { code, reason } => format!("code {code}: {reason}"),
            };
            (
                Error::ChannelRefused {
                    target,
                    reason,
                    transient: !permanent,
                },
                permanent,
            )
        }
        Ok(Err(_)) if session.is_dead() => return Err(OpenError::SessionGone),
        Ok(Err(e)) => (
            Error::ChannelRefused {
                target,
                reason: e.to_string(),
                transient: true,
            },
            false,
        ),
        Err(_) => (
            Error::Timeout {
                kind: TimeoutKind::ChannelOpen,
                after: config.connect_timeout,
                detail: format!(" (channel to {target})"),
            },
            false,
        ),
    };
    inner.counters.open_failures.fetch_add(1, Ordering::Relaxed);
    inner.telemetry.count_channel_open_failure();
    if permanent {
        observe::channel_refused(session.id, &error);
    } else {
        tracing::warn!(target: LOG_TARGET, session = session.id, error = %error, "opening a forwarding channel failed");
    }
    let reason = match &error {
        Error::ChannelRefused { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    let error = Arc::new(error);
    if permanent {
        // Reported by `SshTunnel::permanent_error` until a channel opens again.
        inner.set_channel_refusal(Some(error.clone()));
    }
    inner.record_error(error);
    inner.emit(TunnelEvent::ChannelOpenFailed { reason, permanent });
    Err(if unreachable {
        OpenError::Unreachable
    } else {
        OpenError::Refused
    })
}

/// Counts and logs a refusal; returns the `ErrorResponse` to tell the client why (`None` at
/// shutdown, when the connection is just closed).
fn refuse(inner: &Inner, refusal: Refusal, timeout: Duration) -> Option<Vec<u8>> {
    let (channels, sessions) = (
        inner.counters.channels_active.load(Ordering::Relaxed),
        inner.live_sessions(),
    );
    let reply = match refusal {
        Refusal::ShutDown => return None,
        Refusal::Failed(error) => {
            tracing::debug!(target: LOG_TARGET, error = %error, "local connection refused: the tunnel has failed");
            pgwire::error_response_for(&error)
        }
        Refusal::NoSession => {
            tracing::warn!(target: LOG_TARGET, ?timeout, "local connection refused: no SSH session came up in time");
            pgwire::error_response(
                pgwire::SQLSTATE_CONNECTION_FAILURE,
                &format!("sea-orm-tunnel: no SSH session to the bastion came up within {timeout:?}"),
                None,
                None,
            )
        }
        Refusal::Capacity => {
            tracing::warn!(
                target: LOG_TARGET,
                channels,
                sessions,
                ?timeout,
                "local connection refused: every SSH session is at max_channels"
            );
            inner.emit(TunnelEvent::CapacityExhausted { channels, sessions });
            pgwire::error_response(
                SQLSTATE_TOO_MANY_CONNECTIONS,
                &format!(
                    "sea-orm-tunnel: no free SSH channel within {timeout:?}: {channels} channels on {sessions} \
                     SSH sessions in use (max_channels {} x max_sessions {})",
                    inner.config.max_channels,
                    match inner.config.max_sessions {
                        usize::MAX => "unlimited".to_owned(),
                        n => n.to_string(),
                    }
                ),
                Some("Raise SSH_MAX_SESSIONS or SSH_MAX_CHANNELS (sea-orm-tunnel forward --max-sessions)."),
                None,
            )
        }
    };
    inner.counters.refused.fetch_add(1, Ordering::Relaxed);
    inner.telemetry.count_channel_open_failure();
    Some(reply)
}

/// SQLSTATE `too_many_connections`.
const SQLSTATE_TOO_MANY_CONNECTIONS: &str = "53300";

/// How long a refused client has to send its startup message before it is closed without one.
const REFUSAL_READ: Duration = Duration::from_secs(2);

/// Tells a refused client why, as a PostgreSQL client understands it: its startup message is
/// read (an SSL request answered with `N`), then `reply` is sent. A client that is not
/// PostgreSQL (or sends nothing in time) is just closed.
async fn tell_refused<S: AsyncRead + AsyncWrite + Unpin>(local: &mut S, reply: &[u8]) {
    use tokio::io::AsyncWriteExt as _;
    match tokio::time::timeout(REFUSAL_READ, pgwire::read_client_startup(local)).await {
        Ok(Ok(startup)) if startup.kind != pgwire::StartupKind::Cancel => {
            let _ = local.write_all(reply).await;
            let _ = local.flush().await;
        }
        _ => {}
    }
}

/// A local connection beyond `max_local_connections`: answered with 53300 and closed.
async fn refuse_over_limit(inner: Arc<Inner>, local: LocalStream) {
    let Some(max) = inner.config.max_local_connections else {
        return;
    };
    tracing::warn!(target: LOG_TARGET, max, "local connection refused: max_local_connections reached");
    inner.counters.refused.fetch_add(1, Ordering::Relaxed);
    let reply = pgwire::error_response(
        SQLSTATE_TOO_MANY_CONNECTIONS,
        &format!("sea-orm-tunnel: too many connections: the limit of {max} local connections is reached"),
        Some(
            "The tunnel serves at most this many clients at once (sea-orm-tunnel forward --max-connections / FORWARD_MAX_CONNECTIONS).",
        ),
        None,
    );
    let serve = async {
        match local {
            LocalStream::Tcp(mut s) => tell_refused(&mut s, &reply).await,
            #[cfg(unix)]
            LocalStream::Unix(mut s) => tell_refused(&mut s, &reply).await,
        }
    };
    tokio::select! {
        () = serve => {}
        () = inner.cancel.cancelled() => {}
    }
}

/// A local stream whose first bytes were already read (by [`answer_encryption_locally`]): they
/// are read again first.
struct Prefixed<S> {
    inner: S,
    first: Vec<u8>,
    at: usize,
}

impl<S> Prefixed<S> {
    fn new(inner: S, first: Vec<u8>) -> Self {
        Prefixed { inner, first, at: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let n = (this.first.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts bytes on the local side: reads go to the remote, writes come from it.
struct Counted<'a, S> {
    inner: S,
    counters: &'a super::inner::Counters,
    to_remote: metrics::Counter,
    from_remote: metrics::Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.counters.bytes_to_remote.fetch_add(n, Ordering::Relaxed);
            self.to_remote.increment(n);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.counters.bytes_from_remote.fetch_add(n as u64, Ordering::Relaxed);
            self.from_remote.increment(n as u64);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
