//! One SSH session: establishing it (TCP, key exchange, host-key check, authentication) and
//! watching it with keepalives.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{DisconnectReason, Handle, Handler};
use russh::keys::PublicKeyOrCertificate;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::host_key::HostKeyVerifier;
use super::inner::lock;
use super::sessions::Retire;
use super::socket;
use super::{Inner, LOG_TARGET};
use crate::config::TunnelConfig;
use crate::error::TimeoutKind;
use crate::{Error, Result};

/// How long a graceful close waits for the server to acknowledge before aborting the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What to do about a bastion that offers only RSA host keys to a build without RSA.
pub(crate) const RSA_FEATURE: &str = "enable the `rsa` feature of sea-orm-tunnel";

/// The russh client configuration for a tunnel.
pub(crate) fn russh_config(config: &TunnelConfig) -> russh::client::Config {
    let verifier = HostKeyVerifier::for_tunnel(config);
    russh::client::Config {
        // connect_stream does not apply this flag itself (the socket wrapper sets TCP_NODELAY),
        // but keep the config truthful.
        nodelay: true,
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        // A bigger receive window lets bulk results stream without waiting for window adjusts.
        window_size: config.channel_window,
        maximum_packet_size: 32 * 1024,
        preferred: russh::Preferred {
            cipher: Cow::Borrowed(preferred_ciphers()),
            // The key types known_hosts lists for the host first, as `ssh` orders them: a server
            // with several host keys then presents the recorded one (another type would be a
            // changed key). Read when the tunnel is created.
            key: Cow::Owned(ordered_host_key_algorithms(
                &verifier.known_key_algorithms(&config.host, config.port),
            )),
            // Host certificates only when known_hosts has an `@cert-authority` line that could
            // vouch for this host (read when the tunnel is created): otherwise a server that
            // prefers certificates would present one that only its plain key could verify.
            host_key_certificates: if verifier.could_verify_certificates(&config.host, config.port) {
                Cow::Borrowed(preferred_host_key_algorithms())
            } else {
                Cow::Borrowed(&[])
            },
            ..russh::Preferred::default()
        },
        ..Default::default()
    }
}

/// AES-GCM first where the CPU has AES instructions (about 1.6x faster than chacha20 through
/// ring on this crate's benchmark machine), chacha20-poly1305 first otherwise.
fn preferred_ciphers() -> &'static [russh::cipher::Name] {
    use russh::cipher::{AES_128_GCM, AES_256_CTR, AES_256_GCM, CHACHA20_POLY1305};
    static AES_FIRST: [russh::cipher::Name; 4] = [AES_256_GCM, AES_128_GCM, CHACHA20_POLY1305, AES_256_CTR];
    static CHACHA_FIRST: [russh::cipher::Name; 4] = [CHACHA20_POLY1305, AES_256_GCM, AES_128_GCM, AES_256_CTR];
    if has_aes_instructions() {
        &AES_FIRST
    } else {
        &CHACHA_FIRST
    }
}

/// russh's host-key list, minus RSA in a build without the `rsa` feature: russh advertises RSA
/// either way but cannot verify an RSA signature without it, so an RSA-only bastion fails in the
/// algorithm negotiation instead, where [`handshake_error`] names the feature.
pub(crate) fn preferred_host_key_algorithms() -> &'static [russh::keys::Algorithm] {
    #[cfg(feature = "rsa")]
    {
        &russh::Preferred::DEFAULT.key
    }
    #[cfg(not(feature = "rsa"))]
    {
        use russh::keys::{Algorithm, EcdsaCurve};
        static WITHOUT_RSA: [Algorithm; 4] = [
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
        ];
        &WITHOUT_RSA
    }
}

/// [`preferred_host_key_algorithms`] with the algorithms of the `known` key types moved to the
/// front (RSA regardless of its signature hash, ECDSA per curve), otherwise in their order.
pub(crate) fn ordered_host_key_algorithms(known: &[russh::keys::Algorithm]) -> Vec<russh::keys::Algorithm> {
    use russh::keys::Algorithm;
    let same_type = |a: &Algorithm, k: &Algorithm| match (a, k) {
        (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
        _ => a == k,
    };
    let (mut first, rest): (Vec<_>, Vec<_>) = preferred_host_key_algorithms()
        .iter()
        .cloned()
        .partition(|a| known.iter().any(|k| same_type(a, k)));
    first.extend(rest);
    first
}

fn has_aes_instructions() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The russh client callbacks for one session.
pub(crate) struct ClientHandler {
    host: String,
    port: u16,
    verifier: HostKeyVerifier,
    /// Why the host key was rejected; russh itself only reports `UnknownKey`.
    verdict: Arc<Mutex<Option<Error>>>,
    /// Why the session ended, when russh tells us.
    end_reason: Arc<Mutex<Option<String>>>,
    /// The cipher the key exchange chose (the latest, after a re-key).
    cipher: Arc<Mutex<Option<String>>>,
    /// Cancelled when this handler is dropped, i.e. when russh's session task has ended.
    /// `Handler::disconnected` is skipped on some error paths (a write-shutdown error); drop is not.
    ended: CancellationToken,
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

impl Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, server_key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let verdict = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.verifier.verify(&self.host, self.port, key),
            // russh checks neither the CA signature, the principals nor the validity: we do.
            PublicKeyOrCertificate::Certificate(cert) => self.verifier.verify_certificate(&self.host, self.port, cert),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(e) => {
                *lock(&self.verdict) = Some(e);
                // russh aborts the handshake; nothing (no credentials) is sent to this server.
                Ok(false)
            }
        }
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        *lock(&self.cipher) = Some(names.cipher.as_ref().to_owned());
        Ok(())
    }

    async fn disconnected(&mut self, reason: DisconnectReason<Self::Error>) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!("server disconnected ({:?}): {}", info.reason_code, info.message)
            }
            DisconnectReason::Error(e) => format!("connection error: {e}"),
        };
        lock(&self.end_reason).get_or_insert(text);
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// One SSH connection of a ProxyJump chain that is not the bastion's: kept open for the
/// session's life, since the next hop's SSH connection rides one of its channels.
pub(crate) struct JumpHop {
    /// `user@host:port`, for logs.
    target: String,
    handle: Handle<ClientHandler>,
    /// Cancelled when this hop's russh task has ended.
    ended: CancellationToken,
    end_reason: Arc<Mutex<Option<String>>>,
    cipher: Arc<Mutex<Option<String>>>,
}

/// A live SSH session of the tunnel.
pub(crate) struct SshSession {
    pub(crate) id: u64,
    /// Which bastion (index into `TunnelConfig::bastions()`).
    pub(crate) bastion: usize,
    /// That bastion's `host:port`, for events, logs and metrics.
    pub(crate) bastion_name: Arc<str>,
    /// The bastion's (the chain's last hop's) SSH connection: forwarders open channels here.
    pub(crate) handle: Handle<ClientHandler>,
    /// The jump hosts before the bastion, in chain order (empty without `proxy_jump`).
    jumps: Vec<JumpHop>,
    /// Channels open (or being opened) on this session. Incremented only under the tunnel's
    /// session-list lock (`Inner::try_reserve`), which is also where an idle session is retired.
    pub(crate) channels: AtomicUsize,
    /// When this session was opened or last released a channel: the start of its idle time.
    last_active: Mutex<Instant>,
    /// Signalled when the last channel is released, so the monitor arms the idle timer.
    went_idle: Notify,
    /// Aborts the transport socket (of the first hop: the rest of a chain rides it); also tells
    /// this session's forwarders to stop.
    pub(crate) kill: CancellationToken,
    /// Cancelled when russh's session task (of the bastion hop) has ended.
    pub(crate) ended: CancellationToken,
    end_reason: Arc<Mutex<Option<String>>>,
    /// The cipher negotiated with the bastion.
    cipher: Arc<Mutex<Option<String>>>,
}

impl SshSession {
    /// The SSH cipher negotiated with the bastion, e.g. `aes256-gcm@openssh.com`.
    pub(crate) fn cipher(&self) -> Option<String> {
        lock(&self.cipher).clone()
    }

    pub(crate) fn kill(&self) {
        self.kill.cancel();
    }

    /// A channel slot is released. The idle clock restarts *before* the count drops, so a
    /// retirement check that sees zero channels also sees this release's time.
    pub(crate) fn release_channel(&self) {
        *lock(&self.last_active) = Instant::now();
        if self.channels.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.went_idle.notify_one();
        }
    }

    /// Whether this session has had no channel for at least `timeout` (call under the session-list
    /// lock so that no channel can be reserved meanwhile).
    pub(crate) fn idle_for(&self, timeout: Duration) -> bool {
        self.channels.load(Ordering::Acquire) == 0 && lock(&self.last_active).elapsed() >= timeout
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.kill.is_cancelled()
            || self.ended.is_cancelled()
            || self.handle.is_closed()
            || self
                .jumps
                .iter()
                .any(|j| j.ended.is_cancelled() || j.handle.is_closed())
    }

    fn end_reason(&self) -> String {
        // A broken chain: name the jump host that went first.
        for jump in &self.jumps {
            if jump.ended.is_cancelled() || jump.handle.is_closed() {
                let why = lock(&jump.end_reason)
                    .clone()
                    .unwrap_or_else(|| "connection closed".to_owned());
                return format!("jump host {}: {why}", jump.target);
            }
        }
        lock(&self.end_reason)
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned())
    }

    /// Resolves when the SSH connection of any jump host has ended (never without jump hosts).
    async fn jump_ended(&self) {
        if self.jumps.is_empty() {
            return std::future::pending().await;
        }
        let mut waits: Vec<_> = self.jumps.iter().map(|j| Box::pin(j.ended.cancelled())).collect();
        std::future::poll_fn(|cx| {
            if waits.iter_mut().any(|w| w.as_mut().poll(cx).is_ready()) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }

    /// SSH disconnect (the bastion first, then the jump hosts back to the first), then wait for
    /// russh's tasks to end; abort the socket if they do not.
    pub(crate) async fn close_gracefully(&self) {
        if !self.is_dead() {
            let _ = tokio::time::timeout(
                CLOSE_GRACE,
                self.handle
                    .disconnect(russh::Disconnect::ByApplication, "tunnel closed", "en"),
            )
            .await;
            let _ = tokio::time::timeout(CLOSE_GRACE, self.ended.cancelled()).await;
            for jump in self.jumps.iter().rev() {
                if jump.ended.is_cancelled() {
                    break;
                }
                let _ = tokio::time::timeout(
                    CLOSE_GRACE,
                    jump.handle
                        .disconnect(russh::Disconnect::ByApplication, "tunnel closed", "en"),
                )
                .await;
                let _ = tokio::time::timeout(CLOSE_GRACE, jump.ended.cancelled()).await;
            }
        }
        self.kill();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.ended.cancelled()).await;
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

/// A jump host's port unless it names one (OpenSSH's).
const SSH_PORT: u16 = 22;

/// [`HopTarget::role`] of the jump hosts and of the bastion.
const JUMP_HOST: &str = "jump host";
const BASTION: &str = "bastion";

/// One SSH connection to make: a jump host or the bastion.
struct HopTarget<'a> {
    host: &'a str,
    port: u16,
    user: &'a str,
    /// `"jump host"` or `"bastion"`.
    role: &'static str,
}

impl HopTarget<'_> {
    fn describe(&self) -> String {
        if self.host.contains(':') {
            format!("{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            format!("{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// The SSH connections to make for a session on bastion `bastion`: the jump hosts of
/// `proxy_jump` in order (port 22 and the tunnel's user unless the hop names others), then the
/// bastion.
fn chain<'a>(config: &'a TunnelConfig, bastion: &'a crate::config::BastionHost) -> Vec<HopTarget<'a>> {
    config
        .proxy_jump
        .iter()
        .map(|j| HopTarget {
            host: &j.host,
            port: j.port.unwrap_or(SSH_PORT),
            user: j.user.as_deref().unwrap_or(&config.user),
            role: JUMP_HOST,
        })
        .chain(std::iter::once(HopTarget {
            host: &bastion.host,
            port: bastion.port,
            user: &config.user,
            role: BASTION,
        }))
        .collect()
}

/// Opens one SSH session on the first bastion (of `TunnelConfig::bastions()`, healthy ones
/// first) that works; see `sessions::BastionSet` for the order and what a failure means.
pub(crate) async fn establish(inner: &Inner) -> Result<Arc<SshSession>> {
    inner.establish_on_some_bastion().await
}

/// Opens one SSH session on bastion `bastion`: for each hop of the chain (the jump hosts, then
/// the bastion) a transport (TCP for the first hop, a `direct-tcpip` channel of the previous hop
/// for the others), the handshake, host-key verification and authentication, each hop within
/// `connect_timeout`. In a chain, an error names its hop ([`Error::Hop`]).
pub(crate) async fn establish_on(
    inner: &Inner,
    bastion: usize,
    address: &crate::config::BastionHost,
) -> Result<Arc<SshSession>> {
    let config = &inner.config;
    let kill = CancellationToken::new();
    let hops = chain(config, address);
    let count = hops.len();
    let connect = async {
        let mut jumps: Vec<JumpHop> = Vec::with_capacity(count - 1);
        // The connection made last; the next hop rides one of its channels.
        let mut previous: Option<JumpHop> = None;
        for (i, hop) in hops.iter().enumerate() {
            let ended = CancellationToken::new();
            let end_reason = Arc::new(Mutex::new(None));
            let cipher = Arc::new(Mutex::new(None));
            let verifier = if i + 1 == count {
                inner.verifier.clone()
            } else {
                inner.jump_verifier.clone()
            };
            let through = previous.as_ref();
            let step = async {
                let handle = match through {
                    None => {
                        let tcp = TcpStream::connect((hop.host, hop.port))
                            .await
                            .map_err(|e| Error::SshConnect {
                                host: hop.host.to_owned(),
                                port: hop.port,
                                message: format!("TCP connect failed: {e}"),
                                source: Some(Arc::new(e)),
                            })?;
                        // The real socket: quick-ack re-arming and the kill switch apply here.
                        let stream = socket::transport(tcp, &kill);
                        handshake(inner, stream, hop, verifier, &ended, &end_reason, &cipher).await?
                    }
                    Some(through) => {
                        let channel = through
                            .handle
                            .channel_open_direct_tcpip(hop.host, u32::from(hop.port), "127.0.0.1", 0)
                            .await
                            .map_err(|e| forward_error(&hops[i - 1], hop, e))?;
                        handshake(
                            inner,
                            channel.into_stream(),
                            hop,
                            verifier,
                            &ended,
                            &end_reason,
                            &cipher,
                        )
                        .await?
                    }
                };
                Ok(handle)
            };
            let result = tokio::time::timeout(config.connect_timeout, step)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        kind: TimeoutKind::SshConnect,
                        after: config.connect_timeout,
                        detail: format!(" (connecting to {}:{})", hop.host, hop.port),
                    })
                });
            match result {
                Ok(handle) => {
                    jumps.extend(previous.take());
                    previous = Some(JumpHop {
                        target: hop.describe(),
                        handle,
                        ended,
                        end_reason,
                        cipher,
                    });
                }
                Err(e) if count == 1 => return Err(e),
                Err(e) => {
                    return Err(Error::Hop {
                        hop: i + 1,
                        hops: count,
                        role: hop.role,
                        target: hop.describe(),
                        source: Box::new(e),
                    });
                }
            }
        }
        let last = previous.expect("a chain has at least the bastion");
        Ok((last.handle, last.ended, last.end_reason, last.cipher, jumps))
    };
    let result = tokio::select! {
        r = connect => r,
        () = inner.cancel.cancelled() => Err(Error::ShutDown("SshTunnel")),
    };
    match result {
        Ok((handle, ended, end_reason, cipher, jumps)) => Ok(Arc::new(SshSession {
            id: inner.next_session_id(),
            bastion,
            bastion_name: address.to_string().into(),
            handle,
            jumps,
            channels: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            went_idle: Notify::new(),
            kill,
            ended,
            end_reason,
            cipher,
        })),
        Err(e) => {
            // Make sure russh's tasks (if any) end now rather than on a TCP timeout: killing the
            // first hop's socket ends every connection that rides it.
            kill.cancel();
            Err(e)
        }
    }
}

/// Key exchange, host-key verification and authentication of one hop over `stream`.
async fn handshake<S>(
    inner: &Inner,
    stream: S,
    hop: &HopTarget<'_>,
    verifier: HostKeyVerifier,
    ended: &CancellationToken,
    end_reason: &Arc<Mutex<Option<String>>>,
    cipher: &Arc<Mutex<Option<String>>>,
) -> Result<Handle<ClientHandler>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let verdict = Arc::new(Mutex::new(None));
    // ssh_config `HostKeyAlias` names the bastion's key in known_hosts: the bastion's verifier
    // carries it (`HostKeyVerifier::for_tunnel`); jump hosts are looked up by their own address.
    let handler = ClientHandler {
        host: hop.host.to_owned(),
        port: hop.port,
        verifier,
        verdict: verdict.clone(),
        end_reason: end_reason.clone(),
        cipher: cipher.clone(),
        ended: ended.clone(),
    };
    let mut handle = russh::client::connect_stream(inner.ssh_config.clone(), stream, handler)
        .await
        .map_err(|e| match lock(&verdict).take() {
            Some(verdict) => verdict,
            None => handshake_error(hop.host, hop.port, e),
        })?;
    inner
        .credentials
        .authenticate(&mut handle, hop.user, hop.host, hop.port)
        .await?;
    Ok(handle)
}

/// The jump host `via` could not open a channel to the next hop `to`.
fn forward_error(via: &HopTarget<'_>, to: &HopTarget<'_>, e: russh::Error) -> Error {
    match e {
        russh::Error::ChannelOpenFailure(failure) => {
            use russh::ChannelOpenFailure as F;
            let permanent = matches!(failure, F::AdministrativelyProhibited | F::UnknownChannelType);
            let reason = match failure {
                F::AdministrativelyProhibited => {
                    "administratively prohibited (check AllowTcpForwarding / PermitOpen on the jump host)".to_owned()
                }
                F::ConnectFailed => "connect failed (not reachable from the jump host)".to_owned(),
                F::UnknownChannelType => "direct-tcpip channels are not supported".to_owned(),
                F::ResourceShortage => "resource shortage".to_owned(),
                F::Other { code, reason } => format!("code {code}: {reason}"),
            };
            Error::ChannelRefused {
                target: format!("{}:{} (through jump host {})", to.host, to.port, via.describe()),
                reason,
                transient: !permanent,
            }
        }
        other => Error::SshConnect {
            host: to.host.to_owned(),
            port: to.port,
            message: format!("opening a channel through jump host {} failed: {other}", via.describe()),
            source: Some(Arc::new(other)),
        },
    }
}

fn handshake_error(host: &str, port: u16, e: russh::Error) -> Error {
    if let Some(offered) = rsa_only_host_keys(cfg!(feature = "rsa"), &e) {
        return Error::FeatureRequired {
            host: host.to_owned(),
            port,
            needs: format!("RSA host keys (the bastion offers only {offered})"),
            feature: "rsa",
        };
    }
    Error::SshConnect {
        host: host.to_owned(),
        port,
        message: format!("SSH handshake failed: {e}"),
        source: Some(Arc::new(e)),
    }
}

/// The bastion's host-key algorithms, when the negotiation failed only because this build has no
/// RSA (`rsa_enabled` is the feature, a parameter so both cases are tested in one build).
pub(crate) fn rsa_only_host_keys(rsa_enabled: bool, e: &russh::Error) -> Option<String> {
    let russh::Error::NoCommonAlgo {
        kind: russh::AlgorithmKind::Key,
        theirs,
        ..
    } = e
    else {
        return None;
    };
    let is_rsa = |name: &String| name.starts_with("rsa-sha2-") || name.starts_with("ssh-rsa");
    (!rsa_enabled && theirs.iter().any(is_rsa)).then(|| theirs.join(","))
}

/// Watches one session until it dies (or the tunnel shuts down), then reports it lost; or
/// retires it once it is an extra session idle for `session_idle_timeout`.
///
/// A ping (`keepalive@openssh.com`) is sent every `keepalive_interval`; the session is dead when
/// no reply arrived for `keepalive_interval × keepalive_max`. `send_ping` also "succeeds" when its
/// reply is dropped because the session ended, hence the `is_closed()` check.
pub(crate) async fn monitor(inner: Arc<Inner>, session: Arc<SshSession>) {
    let idle_timeout = inner.config.session_idle_timeout;
    // With one session allowed there is never an extra one to retire.
    let may_retire = inner.config.max_sessions > 1;
    // The oldest session is kept; it is checked again only after another full idle period.
    let mut not_before = Instant::now();
    let interval = inner.config.keepalive_interval;
    let dead_after = interval * u32::try_from(inner.config.keepalive_max.max(1)).unwrap_or(u32::MAX);
    let mut last_alive = Instant::now();
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let mut ping_sent = Instant::now();
    let reason = loop {
        // Armed only while no channel is open: a release signals `went_idle` and re-arms it.
        let idle_armed = may_retire && session.channels.load(Ordering::Acquire) == 0;
        let idle_at = (*lock(&session.last_active) + idle_timeout).max(not_before);
        tokio::select! {
            () = inner.cancel.cancelled() => return,
            () = session.went_idle.notified() => {}
            () = tokio::time::sleep_until(idle_at), if idle_armed => {
                match inner.try_retire(&session) {
                    Retire::Retired { remaining } => {
                        retire(&inner, &session, remaining).await;
                        return;
                    }
                    // Someone else removed it (lost, shutting down): they handle the rest.
                    Retire::Gone => return,
                    Retire::Kept => not_before = Instant::now() + idle_timeout,
                    // A channel came, or a release moved the idle clock: re-evaluate.
                    Retire::Busy => {}
                }
            }
            () = session.kill.cancelled() => break session.end_reason(),
            () = session.ended.cancelled() => break session.end_reason(),
            // A jump host's connection ended: everything behind it rides it.
            () = session.jump_ended() => break session.end_reason(),
            () = async { ping.as_mut().expect("guarded").await }, if ping.is_some() => {
                ping = None;
                if session.handle.is_closed() {
                    break session.end_reason();
                }
                last_alive = Instant::now();
            }
            // A ping always gets at least one interval to be answered (matters for keepalive_max = 1).
            () = tokio::time::sleep_until((last_alive + dead_after).max(ping_sent + interval)), if ping.is_some() => {
                break format!(
                    "keepalive: no reply from the bastion for {dead_after:?} ({} x {interval:?})",
                    inner.config.keepalive_max.max(1)
                );
            }
            _ = tick.tick() => {
                if session.is_dead() {
                    break session.end_reason();
                }
                if ping.is_none() {
                    ping_sent = Instant::now();
                    let s = session.clone();
                    ping = Some(Box::pin(async move {
                        let _ = s.handle.send_ping().await;
                    }));
                }
            }
        }
    };
    tracing::debug!(target: LOG_TARGET, session = session.id, %reason, "SSH session ended");
    inner.session_lost(session.id, reason);
}

/// Closes a session that `Inner::try_retire` took out of the tunnel (no channels, none can be
/// assigned any more): SSH disconnect, then report it. Not a lost session: nothing reconnects and
/// `last_reconnect_at` stays, since no pooled connection rode it.
async fn retire(inner: &Inner, session: &SshSession, sessions: usize) {
    tracing::info!(
        target: LOG_TARGET,
        session = session.id,
        sessions,
        idle_timeout = ?inner.config.session_idle_timeout,
        "closing an idle additional SSH session"
    );
    session.close_gracefully().await;
    inner.emit(super::TunnelEvent::SessionClosed {
        session: session.id,
        sessions,
        bastion: session.bastion_name.to_string(),
    });
}

impl std::fmt::Debug for SshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSession")
            .field("id", &self.id)
            .field("bastion", &self.bastion_name)
            .field("jumps", &self.jumps.len())
            .field("channels", &self.channels.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_common_host_key(theirs: &[&str]) -> russh::Error {
        russh::Error::NoCommonAlgo {
            kind: russh::AlgorithmKind::Key,
            ours: vec!["ssh-ed25519".into()],
            theirs: theirs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn an_rsa_only_bastion_without_the_feature_is_named() {
        let e = no_common_host_key(&["rsa-sha2-512", "rsa-sha2-256"]);
        assert_eq!(
            rsa_only_host_keys(false, &e).as_deref(),
            Some("rsa-sha2-512,rsa-sha2-256")
        );
        // With RSA built in, a failed negotiation is something else and keeps russh's message.
        assert_eq!(rsa_only_host_keys(true, &e), None);
        // No RSA on offer either (e.g. DSA only): not ours to explain.
        assert_eq!(rsa_only_host_keys(false, &no_common_host_key(&["ssh-dss"])), None);
        let cipher = russh::Error::NoCommonAlgo {
            kind: russh::AlgorithmKind::Cipher,
            ours: vec![],
            theirs: vec!["rsa-sha2-512".into()],
        };
        assert_eq!(rsa_only_host_keys(false, &cipher), None);
    }

    #[test]
    fn the_missing_feature_error_is_permanent_and_says_what_to_enable() {
        let e = handshake_error(
            "bastion.example",
            2222,
            no_common_host_key(&["ssh-rsa", "rsa-sha2-512"]),
        );
        if cfg!(feature = "rsa") {
            assert!(matches!(e, Error::SshConnect { .. }), "{e:?}");
        } else {
            let text = e.to_string();
            assert!(!e.is_transient(), "{e:?}");
            assert!(text.contains("bastion.example:2222"), "{text}");
            assert!(text.contains("enable the `rsa` feature of sea-orm-tunnel"), "{text}");
            assert!(text.contains("ssh-rsa,rsa-sha2-512"), "{text}");
        }
    }

    #[test]
    fn known_host_key_types_are_preferred() {
        use russh::keys::{Algorithm, EcdsaCurve};
        let p256 = Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        };
        let ordered = ordered_host_key_algorithms(std::slice::from_ref(&p256));
        assert_eq!(ordered[0], p256);
        assert_eq!(ordered.len(), preferred_host_key_algorithms().len());
        assert_eq!(ordered_host_key_algorithms(&[]), preferred_host_key_algorithms());
        if cfg!(feature = "rsa") {
            let ordered = ordered_host_key_algorithms(&[Algorithm::Rsa { hash: None }]);
            assert!(
                ordered[..2].iter().all(|a| matches!(a, Algorithm::Rsa { .. })),
                "{ordered:?}"
            );
        }
    }

    #[test]
    fn rsa_host_keys_are_offered_only_with_the_feature() {
        let offered = preferred_host_key_algorithms();
        assert!(offered.contains(&russh::keys::Algorithm::Ed25519));
        assert_eq!(
            offered.iter().any(|a| matches!(a, russh::keys::Algorithm::Rsa { .. })),
            cfg!(feature = "rsa"),
            "{offered:?}"
        );
    }
}
