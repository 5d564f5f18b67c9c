//! An in-process SSH bastion (russh server) for faults OpenSSH cannot produce on demand.
//!
//! [`Bastion`] listens on `127.0.0.1` (an ephemeral port), authenticates clients by public key,
//! and forwards `direct-tcpip` channels only to the targets it was told about. Everything else
//! is refused as *administratively prohibited*, like OpenSSH's `PermitOpen`. It needs no
//! `sshd` and no `ssh-keygen`: [`Bastion::generate_client_key`] writes a client key and
//! [`Bastion::write_known_hosts`] a known_hosts file, which is all a zero-configuration quick
//! start needs.
//!
//! Faults, all switchable at run time:
//! - [`Bastion::drop_sessions`]: close every SSH session's TCP socket at once (the client sees
//!   the connection end), keep listening;
//! - [`Bastion::blackhole`] / [`Bastion::restore`]: stop reading from and writing to every SSH
//!   socket without closing anything, so keepalives go unanswered and forwarded data stops:
//!   a truly silent link;
//! - [`Bastion::refuse_channels`]: refuse every new `direct-tcpip` channel;
//! - [`Bastion::set_latency`]: a one-way delay line on forwarded data in both directions;
//! - [`Bastion::stop`] / [`Bastion::restart`]: stop listening and drop the sessions, then listen
//!   again on the same port with the same host key;
//! - hostile modes: [`Bastion::send_garbage_on_connect`], [`Bastion::stall_handshake`],
//!   [`Bastion::close_channels_randomly`].
//!
//! ```no_run
//! # async fn demo() -> sea_orm_tunnel::Result<()> {
//! use sea_orm_tunnel::testkit::Bastion;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let (key_path, public_key) = Bastion::generate_client_key(dir.path())?;
//! let bastion = Bastion::builder()
//!     .authorize_key(public_key)
//!     .allow_target("127.0.0.1", 5432)
//!     .start()
//!     .await?;
//! bastion.write_known_hosts(&dir.path().join("known_hosts"))?;
//! println!("ssh -i {} -p {} {}@127.0.0.1", key_path.display(), bastion.port(), bastion.user());
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure, MethodKind, MethodSet, SshId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};

/// The user name [`Bastion::user`] reports when no user was configured (any name is accepted then).
const DEFAULT_USER: &str = "tunnel";
/// How long a forwarded connection may take to reach its target before the channel is refused.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Bastion::stop`] waits for dropped sessions to wind down.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Upper bound of bytes held in one direction of the latency delay line.
const DELAY_LINE_MAX: usize = 4 * 1024 * 1024;
/// Longest delay before a channel picked by [`Bastion::close_channels_randomly`] is closed.
const RANDOM_CLOSE_MAX_MS: u64 = 100;

/// What a [`Bastion`] accepts and where it forwards. Build it with [`Bastion::builder`].
///
/// Defaults: no authorised key (nobody gets in), no allowed target (every channel refused),
/// any user name.
#[derive(Clone, Default)]
#[must_use]
pub struct BastionOptions {
    authorized_keys: Vec<PublicKey>,
    allowed_targets: Vec<(String, u16)>,
    user: Option<String>,
}

impl fmt::Debug for BastionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self
            .authorized_keys
            .iter()
            .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
            .collect();
        f.debug_struct("BastionOptions")
            .field("authorized_keys", &keys)
            .field("allowed_targets", &self.allowed_targets)
            .field("user", &self.user)
            .finish()
    }
}

impl BastionOptions {
    /// Options that accept nobody and forward nowhere; add keys and targets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Authorise a client public key (like a line of `authorized_keys`). May be called repeatedly.
    pub fn authorize_key(mut self, key: PublicKey) -> Self {
        self.authorized_keys.push(key);
        self
    }

    /// Allow `direct-tcpip` channels to `host:port`. The host is matched literally, like
    /// OpenSSH's `PermitOpen` (`localhost` is not `127.0.0.1`). May be called repeatedly.
    pub fn allow_target(mut self, host: impl Into<String>, port: u16) -> Self {
        self.allowed_targets.push((host.into(), port));
        self
    }

    /// Accept only this user name. Without it any user name is accepted.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Start a bastion with these options; same as [`Bastion::start`].
    pub async fn start(self) -> Result<Bastion> {
        Bastion::start(self).await
    }
}

/// An in-process SSH bastion for tests and the zero-configuration quick start.
///
/// Cheap to clone; the bastion stops (listener closed, sessions dropped, tasks ended) when
/// the last clone is dropped or [`Bastion::shutdown`] is called.
///
/// Faults: [`drop_sessions`](Bastion::drop_sessions), [`blackhole`](Bastion::blackhole) /
/// [`restore`](Bastion::restore), [`refuse_channels`](Bastion::refuse_channels),
/// [`set_latency`](Bastion::set_latency), [`stop`](Bastion::stop) / [`restart`](Bastion::restart),
/// and the hostile modes [`send_garbage_on_connect`](Bastion::send_garbage_on_connect),
/// [`stall_handshake`](Bastion::stall_handshake) and
/// [`close_channels_randomly`](Bastion::close_channels_randomly).
#[derive(Clone)]
pub struct Bastion {
    owner: Arc<Owner>,
}

/// Tears the bastion down when the last [`Bastion`] handle goes away. Background tasks hold
/// `Arc<Shared>`, never this, so they cannot keep the bastion alive.
struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.teardown();
    }
}

impl fmt::Debug for Bastion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.owner.shared;
        f.debug_struct("Bastion")
            .field("addr", &s.addr)
            .field("host_key", &s.fingerprint)
            .field("allowed_targets", &s.options.allowed_targets)
            .field("active_sessions", &s.active_sessions())
            .finish_non_exhaustive()
    }
}

impl Bastion {
    /// Start building [`BastionOptions`]; finish with [`BastionOptions::start`].
    pub fn builder() -> BastionOptions {
        BastionOptions::new()
    }

    /// Generate an ed25519 host key and start listening on `127.0.0.1` (ephemeral port).
    pub async fn start(options: BastionOptions) -> Result<Bastion> {
        let host_key = PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519)
            .map_err(|e| io_error("generating the bastion host key", io::Error::other(e)))?;
        let host_public = host_key.public_key().clone();
        let fingerprint = host_public.fingerprint(HashAlg::Sha256).to_string();
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| io_error("reading the bastion's listening address", e))?;

        let config = russh::server::Config {
            server_id: SshId::Standard("SSH-2.0-sea_orm_tunnel_testkit_bastion".into()),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            // A test kit has no timing side channel worth hiding; a short rejection delay keeps
            // "unauthorised key" tests fast.
            auth_rejection_time: Duration::from_millis(10),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            window_size: 2 * 1024 * 1024,
            maximum_packet_size: 32 * 1024,
            channel_buffer_size: 100,
            // Sessions live until the client leaves or a fault is injected; the bastion never
            // probes the client, so a blackhole stays silent in both directions.
            inactivity_timeout: None,
            keepalive_interval: None,
            // `run_stream` does not apply this flag; we set TCP_NODELAY on every accepted socket.
            nodelay: true,
            ..Default::default()
        };

        let (conn_count, _) = watch::channel(0usize);
        let shared = Arc::new(Shared {
            options,
            config: Arc::new(config),
            host_public,
            fingerprint,
            addr,
            root: CancellationToken::new(),
            tracker: TaskTracker::new(),
            listener: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            conn_count,
            next_conn_id: AtomicU64::new(0),
            blackholed: AtomicBool::new(false),
            refuse_channels: AtomicBool::new(false),
            latency_nanos: Arc::new(AtomicU64::new(0)),
            garbage_on_connect: AtomicBool::new(false),
            stall_handshake: AtomicBool::new(false),
            random_close_bits: AtomicU64::new(0f64.to_bits()),
            connections_accepted: AtomicU64::new(0),
            sessions_accepted: AtomicU64::new(0),
            channels_opened: AtomicU64::new(0),
            channels_refused: AtomicU64::new(0),
            active_channels: AtomicUsize::new(0),
        });
        Shared::listen(&shared, listener);
        tracing::debug!(target: "sea_orm_tunnel::testkit", %addr, host_key = %shared.fingerprint, "bastion listening");
        Ok(Bastion {
            owner: Arc::new(Owner { shared }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// Generate an ed25519 client key without `ssh-keygen`.
    ///
    /// Writes the private key in OpenSSH format (unencrypted, mode 0600) to a new file
    /// `id_ed25519` in `dir` (`id_ed25519_2`, `_3`, ... when taken) plus the public key next
    /// to it (`.pub`), and returns the private key's path and the public key.
    pub fn generate_client_key(dir: &Path) -> Result<(PathBuf, PublicKey)> {
        let key = PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519).map_err(|e| {
            file_error(
                "SSH private key",
                dir.to_path_buf(),
                "cannot generate key",
                Some(Box::new(e)),
            )
        })?;
        let pem = key.to_openssh(LineEnding::LF).map_err(|e| {
            file_error(
                "SSH private key",
                dir.to_path_buf(),
                "cannot encode key",
                Some(Box::new(e)),
            )
        })?;
        let public = key.public_key().clone();
        let public_line = public.to_openssh().map_err(|e| {
            file_error(
                "SSH public key",
                dir.to_path_buf(),
                "cannot encode key",
                Some(Box::new(e)),
            )
        })?;

        for n in 1u32.. {
            let path = if n == 1 {
                dir.join("id_ed25519")
            } else {
                dir.join(format!("id_ed25519_{n}"))
            };
            match write_new_private_file(&path, pem.as_bytes()) {
                Ok(()) => {
                    let pub_path = path.with_extension("pub");
                    std::fs::write(&pub_path, format!("{}\n", public_line.trim())).map_err(|e| {
                        file_error("SSH public key", pub_path.clone(), "cannot write", Some(Box::new(e)))
                    })?;
                    return Ok((path, public));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(file_error("SSH private key", path, "cannot write", Some(Box::new(e)))),
            }
        }
        unreachable!("u32 range exhausted while picking a key file name")
    }

    /// The listening address (`127.0.0.1:PORT`). It stays the same across [`Bastion::restart`].
    pub fn addr(&self) -> SocketAddr {
        self.shared().addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.shared().addr.port()
    }

    /// The user name to log in with: the configured one, or `"tunnel"` when none was set
    /// (any name is accepted then).
    pub fn user(&self) -> &str {
        self.shared().options.user.as_deref().unwrap_or(DEFAULT_USER)
    }

    /// The bastion's host public key (ed25519, generated at [`Bastion::start`]).
    pub fn host_public_key(&self) -> &PublicKey {
        &self.shared().host_public
    }

    /// The host key's fingerprint in OpenSSH form, `SHA256:...`.
    pub fn host_key_fingerprint(&self) -> String {
        self.shared().fingerprint.clone()
    }

    /// A known_hosts line for this bastion: `[127.0.0.1]:PORT ssh-ed25519 AAAA...`.
    pub fn known_hosts_line(&self) -> String {
        let key = self
            .shared()
            .host_public
            .to_openssh()
            .expect("an in-memory ed25519 public key always encodes");
        format!("[{}]:{} {}", self.addr().ip(), self.port(), key.trim())
    }

    /// Write a known_hosts file (created or truncated) holding [`Bastion::known_hosts_line`].
    pub fn write_known_hosts(&self, path: &Path) -> Result<()> {
        std::fs::write(path, format!("{}\n", self.known_hosts_line())).map_err(|e| {
            file_error(
                "known_hosts file",
                path.to_path_buf(),
                "cannot write",
                Some(Box::new(e)),
            )
        })
    }

    /// Close every SSH session's TCP socket at once (the client sees the connection end
    /// immediately, even while blackholed) and keep listening. Returns how many connections
    /// were closed (including unauthenticated and hostile ones).
    pub fn drop_sessions(&self) -> usize {
        let n = self.shared().kill_all();
        tracing::debug!(target: "sea_orm_tunnel::testkit", dropped = n, "bastion dropped all sessions");
        n
    }

    /// Make every SSH link silent, existing and new: nothing is read from or written to the
    /// SSH sockets, so forwarded data stops and keepalives go unanswered, yet nothing is
    /// closed. [`Bastion::restore`] resumes where it stopped.
    pub fn blackhole(&self) {
        self.shared().blackholed.store(true, Ordering::SeqCst);
    }

    /// End a [`Bastion::blackhole`]: buffered traffic flows again.
    pub fn restore(&self) {
        let shared = self.shared();
        shared.blackholed.store(false, Ordering::SeqCst);
        for conn in shared.conn_snapshot() {
            conn.wake();
        }
    }

    /// Whether the bastion is currently blackholed.
    pub fn is_blackholed(&self) -> bool {
        self.shared().blackholed.load(Ordering::SeqCst)
    }

    /// Refuse (`true`) or allow again (`false`) every new `direct-tcpip` channel, with reason
    /// *administratively prohibited*. Open channels are not touched.
    pub fn refuse_channels(&self, refuse: bool) {
        self.shared().refuse_channels.store(refuse, Ordering::SeqCst);
    }

    /// Delay forwarded data by `latency` in each direction (a delay line: throughput is kept,
    /// every byte arrives `latency` later, so a round trip gains twice `latency`). Applies to
    /// bytes read after the call, on open and new channels. `Duration::ZERO` turns it off.
    pub fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.shared().latency_nanos.store(nanos, Ordering::SeqCst);
    }

    /// Hostile mode for new connections: answer with an SSH banner followed by random bytes,
    /// then read and discard whatever the client sends until it gives up.
    pub fn send_garbage_on_connect(&self, on: bool) {
        self.shared().garbage_on_connect.store(on, Ordering::SeqCst);
    }

    /// Hostile mode for new connections: accept the TCP connection and never send the SSH
    /// banner (the client's handshake stalls until it times out or the bastion stops).
    pub fn stall_handshake(&self, on: bool) {
        self.shared().stall_handshake.store(on, Ordering::SeqCst);
    }

    /// Hostile mode: each new channel is, with this probability (clamped to 0..=1), closed by
    /// the bastion at a random moment within its first 100 ms. `0.0` turns it off.
    pub fn close_channels_randomly(&self, probability: f64) {
        let p = if probability.is_nan() {
            0.0
        } else {
            probability.clamp(0.0, 1.0)
        };
        self.shared().random_close_bits.store(p.to_bits(), Ordering::SeqCst);
    }

    /// Stop listening and drop every session. The port is released; [`Bastion::restart`]
    /// listens on it again. Waits (up to a few seconds) until the sessions have ended.
    pub async fn stop(&self) {
        let shared = self.shared();
        shared.stop_listening().await;
        shared.kill_all();
        shared.wait_no_connections(STOP_WAIT).await;
        tracing::debug!(target: "sea_orm_tunnel::testkit", addr = %shared.addr, "bastion stopped");
    }

    /// Listen again on the same port with the same host key (after [`Bastion::stop`]; when
    /// still listening this is a no-op). Fails if another process took the port meanwhile,
    /// or after [`Bastion::shutdown`].
    pub async fn restart(&self) -> Result<()> {
        let shared = self.shared();
        if shared.root.is_cancelled() {
            return Err(Error::ShutDown("bastion"));
        }
        if shared.is_listening() {
            return Ok(());
        }
        let listener = bind(shared.addr)?;
        Shared::listen(shared, listener);
        tracing::debug!(target: "sea_orm_tunnel::testkit", addr = %shared.addr, "bastion listening again");
        Ok(())
    }

    /// Whether the bastion is accepting connections.
    pub fn is_listening(&self) -> bool {
        self.shared().is_listening()
    }

    /// Stop for good: close the listener, drop every session and wait for all background
    /// tasks. Idempotent; dropping the last handle does the same without waiting.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        shared.teardown();
        shared.wait_no_connections(STOP_WAIT).await;
        let _ = tokio::time::timeout(STOP_WAIT, shared.tracker.wait()).await;
    }

    /// TCP connections accepted so far (every kind, including hostile modes).
    pub fn connections_accepted(&self) -> u64 {
        self.shared().connections_accepted.load(Ordering::SeqCst)
    }

    /// SSH sessions that authenticated successfully so far.
    pub fn sessions_accepted(&self) -> u64 {
        self.shared().sessions_accepted.load(Ordering::SeqCst)
    }

    /// Authenticated SSH sessions that are still open.
    pub fn active_sessions(&self) -> usize {
        self.shared().active_sessions()
    }

    /// `direct-tcpip` channels opened (target reached and channel confirmed) so far.
    pub fn channels_opened(&self) -> u64 {
        self.shared().channels_opened.load(Ordering::SeqCst)
    }

    /// `direct-tcpip` channels refused so far (target not allowed, [`Bastion::refuse_channels`],
    /// or target unreachable).
    pub fn channels_refused(&self) -> u64 {
        self.shared().channels_refused.load(Ordering::SeqCst)
    }

    /// Forwarded channels currently open.
    pub fn active_channels(&self) -> usize {
        self.shared().active_channels.load(Ordering::SeqCst)
    }
}

/// State shared by the handle and every background task.
struct Shared {
    options: BastionOptions,
    config: Arc<russh::server::Config>,
    host_public: PublicKey,
    fingerprint: String,
    addr: SocketAddr,
    /// Cancelled once, at teardown: ends the accept loop and every connection task.
    root: CancellationToken,
    tracker: TaskTracker,
    /// The running accept loop: its own token (so `stop` can end it alone) and its task.
    listener: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Number of entries in `conns`, for waiting until sessions are gone.
    conn_count: watch::Sender<usize>,
    next_conn_id: AtomicU64,
    blackholed: AtomicBool,
    refuse_channels: AtomicBool,
    latency_nanos: Arc<AtomicU64>,
    garbage_on_connect: AtomicBool,
    stall_handshake: AtomicBool,
    random_close_bits: AtomicU64,
    connections_accepted: AtomicU64,
    sessions_accepted: AtomicU64,
    channels_opened: AtomicU64,
    channels_refused: AtomicU64,
    active_channels: AtomicUsize,
}

impl Shared {
    fn listen(this: &Arc<Self>, listener: TcpListener) {
        let token = this.root.child_token();
        let task = this.tracker.spawn(accept_loop(this.clone(), listener, token.clone()));
        let old = this.listener.lock().unwrap().replace((token, task));
        if let Some((old_token, _)) = old {
            old_token.cancel();
        }
    }

    fn is_listening(&self) -> bool {
        self.listener
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|(_, task)| !task.is_finished())
    }

    async fn stop_listening(&self) {
        let running = self.listener.lock().unwrap().take();
        if let Some((token, task)) = running {
            token.cancel();
            // The task owns the listener; once it has returned, the port is free.
            let _ = task.await;
        }
    }

    fn teardown(&self) {
        self.root.cancel();
        self.tracker.close();
        self.kill_all();
    }

    fn conn_snapshot(&self) -> Vec<Arc<Conn>> {
        self.conns.lock().unwrap().values().cloned().collect()
    }

    fn kill_all(&self) -> usize {
        let conns = self.conn_snapshot();
        for conn in &conns {
            conn.kill();
        }
        conns.len()
    }

    fn active_sessions(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .values()
            .filter(|c| c.authenticated.load(Ordering::SeqCst))
            .count()
    }

    fn register(&self, conn: Arc<Conn>) {
        let mut conns = self.conns.lock().unwrap();
        conns.insert(conn.id, conn);
        self.conn_count.send_replace(conns.len());
    }

    fn unregister(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap();
        conns.remove(&id);
        self.conn_count.send_replace(conns.len());
    }

    async fn wait_no_connections(&self, limit: Duration) {
        let mut rx = self.conn_count.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
    }

    fn authorizes(&self, user: &str, key: &PublicKey) -> bool {
        let user_ok = self.options.user.as_deref().is_none_or(|u| u == user);
        // Compare key material only: comments are not part of a key's identity.
        user_ok
            && self
                .options
                .authorized_keys
                .iter()
                .any(|k| k.key_data() == key.key_data())
    }

    fn target_allowed(&self, host: &str, port: u32) -> bool {
        self.options
            .allowed_targets
            .iter()
            .any(|(h, p)| h == host && u32::from(*p) == port)
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let context = || format!("binding the bastion to {addr}");
    let socket = TcpSocket::new_v4().map_err(|e| io_error(context(), e))?;
    // Restarting on the same port must work while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(|e| io_error(context(), e))?;
    socket.bind(addr).map_err(|e| io_error(context(), e))?;
    socket.listen(128).map_err(|e| io_error(context(), e))
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, token: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Usually EMFILE or a connection reset before accept: back off briefly, keep going.
                tracing::warn!(target: "sea_orm_tunnel::testkit", error = %e, "bastion accept failed");
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        shared.connections_accepted.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
        // A duplicate of the socket lets `drop_sessions` shut the connection down at once, no
        // matter what the session task is doing.
        let socket = match socket2::SockRef::from(&tcp).try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "sea_orm_tunnel::testkit", error = %e, "bastion cannot duplicate socket");
                continue;
            }
        };
        let conn = Arc::new(Conn {
            id: shared.next_conn_id.fetch_add(1, Ordering::SeqCst),
            killed: AtomicBool::new(false),
            authenticated: AtomicBool::new(false),
            read_waker: Mutex::new(None),
            write_waker: Mutex::new(None),
            socket,
            token: shared.root.child_token(),
        });
        shared.register(conn.clone());
        tracing::trace!(target: "sea_orm_tunnel::testkit", %peer, conn = conn.id, "bastion accepted");
        shared.tracker.spawn(serve_connection(shared.clone(), conn, tcp));
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: Arc<Conn>, tcp: TcpStream) {
    if shared.stall_handshake.load(Ordering::SeqCst) {
        hold_silently(&conn, tcp).await;
    } else if shared.garbage_on_connect.load(Ordering::SeqCst) {
        send_garbage(&conn, tcp).await;
    } else {
        run_session(&shared, &conn, tcp).await;
    }
    // The session is over: end its forwarding tasks too (a target that ignores a half-close
    // would otherwise keep one alive) and make sure the client sees the socket close.
    conn.token.cancel();
    conn.close_socket();
    shared.unregister(conn.id);
}

async fn run_session(shared: &Arc<Shared>, conn: &Arc<Conn>, tcp: TcpStream) {
    let stream = GatedStream {
        inner: tcp,
        conn: conn.clone(),
        shared: shared.clone(),
    };
    let handler = SessionHandler {
        shared: shared.clone(),
        conn: conn.clone(),
    };
    let config = shared.config.clone();
    // `run_stream` exchanges banners before returning, which a silent client can stall.
    let session = tokio::select! {
        () = conn.token.cancelled() => return,
        r = russh::server::run_stream(config, stream, handler) => r,
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(target: "sea_orm_tunnel::testkit", error = %e, "bastion handshake failed");
            return;
        }
    };
    // A killed connection makes the gated stream fail, which ends the session task; wait for
    // that, bounded, in case the session is stuck elsewhere (its socket is shut down anyway).
    let mut session = session;
    tokio::select! {
        r = &mut session => {
            if let Err(e) = r {
                tracing::debug!(target: "sea_orm_tunnel::testkit", error = %e, "bastion session ended with error");
            }
        }
        () = conn.token.cancelled() => {
            let _ = tokio::time::timeout(STOP_WAIT, session).await;
        }
    }
}

/// Stall-handshake mode: keep the connection open, never say a word.
async fn hold_silently(conn: &Conn, mut tcp: TcpStream) {
    let mut sink = [0u8; 4096];
    loop {
        tokio::select! {
            () = conn.token.cancelled() => return,
            r = tcp.read(&mut sink) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// Garbage mode: a plausible banner, then random bytes where the key exchange should be.
async fn send_garbage(conn: &Conn, mut tcp: TcpStream) {
    let mut garbage = vec![0u8; 16 * 1024];
    fastrand::fill(&mut garbage);
    let write = async {
        tcp.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await?;
        tcp.write_all(&garbage).await?;
        tcp.flush().await
    };
    let written = tokio::select! {
        () = conn.token.cancelled() => return,
        r = write => r,
    };
    if written.is_ok() {
        hold_silently(conn, tcp).await;
    }
}

/// One accepted TCP connection, registered so faults can reach it.
struct Conn {
    id: u64,
    killed: AtomicBool,
    authenticated: AtomicBool,
    /// Tasks parked by a blackhole, woken on restore or kill.
    read_waker: Mutex<Option<Waker>>,
    write_waker: Mutex<Option<Waker>>,
    /// A duplicate descriptor of the connection's socket, for an immediate shutdown.
    socket: socket2::Socket,
    /// Cancelled when the connection is killed: ends its forwarding tasks.
    token: CancellationToken,
}

impl Conn {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.close_socket();
        self.token.cancel();
        self.wake();
    }

    fn close_socket(&self) {
        // Shutting down the shared socket sends FIN at once; the duplicate descriptor itself
        // is closed when the last reference to this `Conn` goes.
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    fn wake(&self) {
        for slot in [&self.read_waker, &self.write_waker] {
            if let Some(w) = slot.lock().unwrap().take() {
                w.wake();
            }
        }
    }
}

/// The SSH socket as the russh session sees it: fails once killed, pends while blackholed.
struct GatedStream {
    inner: TcpStream,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
}

impl GatedStream {
    /// `Some(..)` when the I/O must not reach the socket now.
    fn gate(&self, cx: &mut Context<'_>, slot: &Mutex<Option<Waker>>) -> Option<Poll<io::Result<()>>> {
        let killed = || self.conn.killed.load(Ordering::SeqCst);
        let dead = || Some(Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionAborted))));
        if killed() {
            return dead();
        }
        if self.shared.blackholed.load(Ordering::SeqCst) {
            *slot.lock().unwrap() = Some(cx.waker().clone());
            // Re-check after registering so a concurrent restore or kill is not missed.
            if killed() {
                return dead();
            }
            if self.shared.blackholed.load(Ordering::SeqCst) {
                return Some(Poll::Pending);
            }
        }
        None
    }
}

impl AsyncRead for GatedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(p) = this.gate(cx, &this.conn.read_waker) {
            return p;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(p) = this.gate(cx, &this.conn.write_waker) {
            return p.map_ok(|()| 0);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(p) = this.gate(cx, &this.conn.write_waker) {
            return p;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        if let Some(p) = this.gate(cx, &this.conn.write_waker) {
            return p;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// russh server handler, one per SSH connection.
struct SessionHandler {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl russh::server::Handler for SessionHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        // Refuse unknown keys before the client bothers to sign.
        Ok(if self.shared.authorizes(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        Ok(if self.shared.authorizes(user, key.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.conn.authenticated.store(true, Ordering::SeqCst);
        self.shared.sessions_accepted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let shared = &self.shared;
        if shared.refuse_channels.load(Ordering::SeqCst) || !shared.target_allowed(host_to_connect, port_to_connect) {
            shared.channels_refused.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(
                target: "sea_orm_tunnel::testkit",
                host = host_to_connect, port = port_to_connect, "bastion refused channel"
            );
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        // Connect outside the session loop so one slow target does not stall the session.
        let target = (host_to_connect.to_owned(), port_to_connect as u16);
        shared
            .tracker
            .spawn(forward(shared.clone(), self.conn.clone(), channel, reply, target));
        Ok(())
    }
}

/// Decrements the open-channel gauge however the forwarding task ends.
struct ActiveChannel<'a>(&'a AtomicUsize);

impl Drop for ActiveChannel<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    (host, port): (String, u16),
) {
    let connect = tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)));
    let target = tokio::select! {
        () = conn.token.cancelled() => None,
        r = connect => match r {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(target: "sea_orm_tunnel::testkit", %host, port, error = %e, "bastion target unreachable");
                None
            }
            Err(_) => None,
        },
    };
    let Some(target) = target else {
        shared.channels_refused.fetch_add(1, Ordering::SeqCst);
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let _ = target.set_nodelay(true);
    reply.accept().await;
    shared.channels_opened.fetch_add(1, Ordering::SeqCst);
    shared.active_channels.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveChannel(&shared.active_channels);

    let p = f64::from_bits(shared.random_close_bits.load(Ordering::SeqCst));
    let random_close = async {
        if p > 0.0 && fastrand::f64() < p {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=RANDOM_CLOSE_MAX_MS))).await;
        } else {
            std::future::pending::<()>().await;
        }
    };

    let mut channel = DelayLine::new(channel.into_stream(), shared.latency_nanos.clone());
    let mut target = DelayLine::new(target, shared.latency_nanos.clone());
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut channel, &mut target) => {
            if let Err(e) = r {
                tracing::trace!(target: "sea_orm_tunnel::testkit", error = %e, "bastion channel copy ended");
            }
        }
        () = conn.token.cancelled() => {}
        () = random_close => {
            tracing::debug!(target: "sea_orm_tunnel::testkit", "bastion closed a channel at random");
        }
    }
    // Dropping the channel stream sends SSH_MSG_CHANNEL_CLOSE; dropping the target closes it.
}

/// Delays every byte read through it by the current latency, without limiting throughput:
/// reads from the inner stream are queued with a due time and handed out once due.
/// Writes pass straight through.
struct DelayLine<S> {
    inner: S,
    latency_nanos: Arc<AtomicU64>,
    /// (due, bytes, consumed). An empty chunk marks end of stream.
    queue: VecDeque<(Instant, Vec<u8>, usize)>,
    queued: usize,
    inner_eof: bool,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> DelayLine<S> {
    fn new(inner: S, latency_nanos: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            latency_nanos,
            queue: VecDeque::new(),
            queued: 0,
            inner_eof: false,
            timer: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DelayLine<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let latency = Duration::from_nanos(this.latency_nanos.load(Ordering::Relaxed));
        if latency.is_zero() && this.queue.is_empty() && !this.inner_eof {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Take in everything available now so the delay does not throttle throughput.
        while !this.inner_eof && this.queued < DELAY_LINE_MAX {
            let mut chunk = vec![0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    let due = Instant::now() + latency;
                    if n == 0 {
                        this.inner_eof = true;
                        this.queue.push_back((due, Vec::new(), 0));
                    } else {
                        chunk.truncate(n);
                        this.queued += n;
                        this.queue.push_back((due, chunk, 0));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        loop {
            let Some((due, chunk, consumed)) = this.queue.front_mut() else {
                // Empty: either end of stream was delivered, or the inner read is pending.
                return if this.inner_eof {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            };
            if *due <= Instant::now() {
                this.timer = None;
                if chunk.is_empty() {
                    this.queue.pop_front();
                    return Poll::Ready(Ok(()));
                }
                let n = (chunk.len() - *consumed).min(buf.remaining());
                buf.put_slice(&chunk[*consumed..*consumed + n]);
                *consumed += n;
                this.queued -= n;
                if *consumed == chunk.len() {
                    this.queue.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            let due = *due;
            let timer = match &mut this.timer {
                Some(t) if t.deadline() == due => t,
                slot => slot.insert(Box::pin(tokio::time::sleep_until(due))),
            };
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => this.timer = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DelayLine<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Create `path` only if it does not exist, readable by the owner only, and write `contents`.
fn write_new_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn io_error(context: impl Into<String>, source: io::Error) -> Error {
    Error::Io {
        context: context.into(),
        source: source.into(),
    }
}

fn file_error(
    what: &'static str,
    path: PathBuf,
    message: &str,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> Error {
    Error::File {
        what,
        path,
        message: message.to_owned(),
        source: source.map(Into::into),
    }
}
