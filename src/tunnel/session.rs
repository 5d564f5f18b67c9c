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
        window_size: 8 * 1024 * 1024,
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

/// A live SSH session of the tunnel.
pub(crate) struct SshSession {
    pub(crate) id: u64,
    pub(crate) handle: Handle<ClientHandler>,
    /// Channels open (or being opened) on this session. Incremented only under the tunnel's
    /// session-list lock (`Inner::try_reserve`), which is also where an idle session is retired.
    pub(crate) channels: AtomicUsize,
    /// When this session was opened or last released a channel: the start of its idle time.
    last_active: Mutex<Instant>,
    /// Signalled when the last channel is released, so the monitor arms the idle timer.
    went_idle: Notify,
    /// Aborts the transport socket; also tells this session's forwarders to stop.
    pub(crate) kill: CancellationToken,
    /// Cancelled when russh's session task has ended.
    pub(crate) ended: CancellationToken,
    end_reason: Arc<Mutex<Option<String>>>,
}

impl SshSession {
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
        self.kill.is_cancelled() || self.ended.is_cancelled() || self.handle.is_closed()
    }

    fn end_reason(&self) -> String {
        lock(&self.end_reason)
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned())
    }

    /// SSH disconnect, then wait for russh's task to end; abort the socket if it does not.
    pub(crate) async fn close_gracefully(&self) {
        if !self.is_dead() {
            let _ = tokio::time::timeout(
                CLOSE_GRACE,
                self.handle
                    .disconnect(russh::Disconnect::ByApplication, "tunnel closed", "en"),
            )
            .await;
            let _ = tokio::time::timeout(CLOSE_GRACE, self.ended.cancelled()).await;
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

/// Opens one SSH session: TCP connect, handshake, host-key verification and authentication,
/// all within `connect_timeout`.
pub(crate) async fn establish(inner: &Inner) -> Result<Arc<SshSession>> {
    let config = &inner.config;
    let kill = CancellationToken::new();
    let ended = CancellationToken::new();
    let verdict = Arc::new(Mutex::new(None));
    let end_reason = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        host: config.host.clone(),
        port: config.port,
        verifier: inner.verifier.clone(),
        verdict: verdict.clone(),
        end_reason: end_reason.clone(),
        ended: ended.clone(),
    };
    let connect = async {
        let tcp = TcpStream::connect((config.host.as_str(), config.port))
            .await
            .map_err(|e| Error::SshConnect {
                host: config.host.clone(),
                port: config.port,
                message: format!("TCP connect failed: {e}"),
                source: Some(Arc::new(e)),
            })?;
        let stream = socket::transport(tcp, &kill);
        let mut handle = russh::client::connect_stream(inner.ssh_config.clone(), stream, handler)
            .await
            .map_err(|e| match lock(&verdict).take() {
                Some(verdict) => verdict,
                None => handshake_error(config, e),
            })?;
        inner
            .credentials
            .authenticate(&mut handle, &config.user, &config.host, config.port)
            .await?;
        Ok(handle)
    };
    let result = tokio::select! {
        r = tokio::time::timeout(config.connect_timeout, connect) => r.unwrap_or_else(|_| Err(Error::Timeout {
            kind: TimeoutKind::SshConnect,
            after: config.connect_timeout,
            detail: format!(" (connecting to {}:{})", config.host, config.port),
        })),
        () = inner.cancel.cancelled() => Err(Error::ShutDown("SshTunnel")),
    };
    match result {
        Ok(handle) => Ok(Arc::new(SshSession {
            id: inner.next_session_id(),
            handle,
            channels: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            went_idle: Notify::new(),
            kill,
            ended,
            end_reason,
        })),
        Err(e) => {
            // Make sure russh's task (if any) ends now rather than on a TCP timeout.
            kill.cancel();
            Err(e)
        }
    }
}

fn handshake_error(config: &TunnelConfig, e: russh::Error) -> Error {
    if let Some(offered) = rsa_only_host_keys(cfg!(feature = "rsa"), &e) {
        return Error::FeatureRequired {
            host: config.host.clone(),
            port: config.port,
            needs: format!("RSA host keys (the bastion offers only {offered})"),
            feature: "rsa",
        };
    }
    Error::SshConnect {
        host: config.host.clone(),
        port: config.port,
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
                if session.handle.is_closed() {
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
    });
}

impl std::fmt::Debug for SshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSession")
            .field("id", &self.id)
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
        let config = TunnelConfig::new("bastion.example", "deploy").port(2222);
        let e = handshake_error(&config, no_common_host_key(&["ssh-rsa", "rsa-sha2-512"]));
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
