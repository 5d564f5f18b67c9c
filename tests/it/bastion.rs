//! The in-process test bastion: a real russh client logs in with a real key, verifies the
//! bastion's host key, and forwards through it to a real TCP echo server; then each fault is
//! injected and observed from the client's side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelOpenFailure, ChannelStream};
use sea_orm_tunnel::testkit::Bastion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::{Echo, echo_server, wait_until};

/// Generous liveness bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(10);

/// A client handler that accepts exactly the bastion's host key.
struct Client {
    expected_fingerprint: String,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                key.fingerprint(HashAlg::Sha256).to_string() == self.expected_fingerprint
            }
            _ => false,
        })
    }
}

fn client_config(keepalive: Option<(Duration, usize)>) -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: keepalive.map(|(i, _)| i),
        keepalive_max: keepalive.map_or(3, |(_, m)| m),
        nodelay: true,
        ..Default::default()
    })
}

/// Connect and verify the host key; `Ok(handle, authenticated)`.
async fn login(
    bastion: &Bastion,
    key: &Path,
    user: &str,
    keepalive: Option<(Duration, usize)>,
) -> (client::Handle<Client>, bool) {
    let handler = Client {
        expected_fingerprint: bastion.host_key_fingerprint(),
    };
    let mut handle = tokio::time::timeout(SOON, client::connect(client_config(keepalive), bastion.addr(), handler))
        .await
        .expect("handshake within bound")
        .expect("handshake succeeds");
    let key = russh::keys::load_secret_key(key, None).unwrap();
    let auth = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .unwrap();
    (handle, auth.success())
}

async fn session(bastion: &Bastion, key: &Path, keepalive: Option<(Duration, usize)>) -> client::Handle<Client> {
    let (handle, ok) = login(bastion, key, bastion.user(), keepalive).await;
    assert!(ok, "authorised key accepted");
    handle
}

async fn open(handle: &client::Handle<Client>, target: SocketAddr) -> Result<ChannelStream<client::Msg>, russh::Error> {
    let ch = handle
        .channel_open_direct_tcpip(target.ip().to_string(), u32::from(target.port()), "127.0.0.1", 40000)
        .await?;
    Ok(ch.into_stream())
}

async fn round_trip(stream: &mut ChannelStream<client::Msg>, payload: &[u8]) {
    stream.write_all(payload).await.unwrap();
    stream.flush().await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(SOON, stream.read_exact(&mut back))
        .await
        .expect("echo within bound")
        .unwrap();
    assert_eq!(back, payload);
}

struct Setup {
    _dir: tempfile::TempDir,
    key: PathBuf,
    echo: Echo,
    bastion: Bastion,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = Bastion::generate_client_key(dir.path()).unwrap();
    let echo = echo_server().await;
    let bastion = Bastion::builder()
        .authorize_key(public)
        .allow_target("127.0.0.1", echo.addr.port())
        .start()
        .await
        .unwrap();
    Setup {
        _dir: dir,
        key,
        echo,
        bastion,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_bytes_exactly_to_an_allowed_target() {
    let s = setup().await;
    assert_eq!(s.bastion.addr().ip().to_string(), "127.0.0.1");
    let line = s.bastion.known_hosts_line();
    assert!(
        line.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 AAAA", s.bastion.port())),
        "{line}"
    );
    assert!(s.bastion.host_key_fingerprint().starts_with("SHA256:"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&s.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    let handle = session(&s.bastion, &s.key, None).await;
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    // 4 MiB both ways at once, so the SSH windows fill and refill; compared byte for byte.
    let mut payload = vec![0u8; 4 * 1024 * 1024];
    fastrand::fill(&mut payload);
    let (mut r, mut w) = tokio::io::split(stream);
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.flush().await.unwrap();
        w
    });
    let mut back = vec![0u8; expected.len()];
    tokio::time::timeout(SOON, r.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back == expected, "echoed bytes differ");
    stream = r.unsplit(writer.await.unwrap());
    round_trip(&mut stream, b"and once more").await;

    assert_eq!(s.bastion.sessions_accepted(), 1);
    assert_eq!(s.bastion.active_sessions(), 1);
    assert_eq!(s.bastion.channels_opened(), 1);
    assert_eq!(s.bastion.active_channels(), 1);
    assert_eq!(s.bastion.channels_refused(), 0);

    drop(stream);
    handle
        .disconnect(russh::Disconnect::ByApplication, "", "")
        .await
        .unwrap();
    wait_until("session gone", SOON, || s.bastion.active_sessions() == 0).await;
    wait_until("channel gone", SOON, || s.bastion.active_channels() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_targets_it_was_not_told_about() {
    let s = setup().await;
    let other = echo_server().await;
    let handle = session(&s.bastion, &s.key, None).await;

    let err = open(&handle, other.addr).await.err().expect("refused");
    assert!(
        matches!(
            err,
            russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited)
        ),
        "{err:?}"
    );
    // Matched literally, like PermitOpen: `localhost` is not `127.0.0.1`.
    let err = handle
        .channel_open_direct_tcpip("localhost", u32::from(s.echo.addr.port()), "127.0.0.1", 40000)
        .await
        .expect_err("refused");
    assert!(matches!(
        err,
        russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited)
    ));
    assert_eq!(s.bastion.channels_refused(), 2);

    // The session survives a refusal.
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_unauthorised_keys_and_other_users() {
    let dir = tempfile::tempdir().unwrap();
    let (good, good_pub) = Bastion::generate_client_key(dir.path()).unwrap();
    let (bad, _) = Bastion::generate_client_key(dir.path()).unwrap();
    assert_ne!(good, bad, "a second key gets its own file");
    let bastion = Bastion::builder()
        .authorize_key(good_pub)
        .user("deploy")
        .start()
        .await
        .unwrap();
    assert_eq!(bastion.user(), "deploy");

    let (_h, ok) = login(&bastion, &bad, "deploy", None).await;
    assert!(!ok, "unauthorised key must be rejected");
    let (_h, ok) = login(&bastion, &good, "root", None).await;
    assert!(!ok, "authorised key for another user must be rejected");
    let (_h, ok) = login(&bastion, &good, "deploy", None).await;
    assert!(ok);
    assert_eq!(bastion.sessions_accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_a_bastion_with_another_host_key() {
    let s = setup().await;
    let impostor = Client {
        expected_fingerprint: "SHA256:not-this-one".into(),
    };
    let r = client::connect(client_config(None), s.bastion.addr(), impostor).await;
    assert!(matches!(r, Err(russh::Error::UnknownKey)), "{:?}", r.err());
    assert_eq!(s.bastion.sessions_accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_sessions_cuts_clients_and_new_sessions_work() {
    let s = setup().await;
    let handle = session(&s.bastion, &s.key, None).await;
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"before").await;

    assert_eq!(s.bastion.drop_sessions(), 1);
    // The client sees its connection end: the channel reaches end of stream (or an error)
    // and the session handle reports closed.
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(SOON, stream.read(&mut buf))
        .await
        .expect("read ends");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    wait_until("client session closed", SOON, || handle.is_closed()).await;
    wait_until("bastion session gone", SOON, || s.bastion.active_sessions() == 0).await;

    let handle = session(&s.bastion, &s.key, None).await;
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"after").await;
    assert_eq!(s.bastion.sessions_accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_is_silent_and_restore_resumes() {
    let s = setup().await;
    // Session A never probes, so it outlives the blackhole; B sends keepalives.
    let a = session(&s.bastion, &s.key, None).await;
    let b = session(&s.bastion, &s.key, Some((Duration::from_millis(300), 3))).await;
    let mut stream = open(&a, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"warm").await;

    // The bastion answers keepalives: B stays up well past interval x (max + 1).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!b.is_closed(), "keepalive replies must keep an idle session alive");

    s.bastion.blackhole();
    stream.write_all(b"into the void").await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = [0u8; 13];
    let r = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await;
    assert!(r.is_err(), "nothing comes back through a blackhole");
    // Unanswered keepalives: B declares the link dead, although nothing was closed.
    wait_until("keepalive detects the blackhole", SOON, || b.is_closed()).await;
    assert!(!a.is_closed());

    s.bastion.restore();
    tokio::time::timeout(SOON, stream.read_exact(&mut buf))
        .await
        .expect("data flows after restore")
        .unwrap();
    assert_eq!(&buf, b"into the void");
    round_trip(&mut stream, b"and onwards").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_channels_toggles() {
    let s = setup().await;
    let handle = session(&s.bastion, &s.key, None).await;
    let mut open_before = open(&handle, s.echo.addr).await.unwrap();

    s.bastion.refuse_channels(true);
    let err = open(&handle, s.echo.addr).await.err().expect("refused");
    assert!(matches!(
        err,
        russh::Error::ChannelOpenFailure(ChannelOpenFailure::AdministrativelyProhibited)
    ));
    assert_eq!(s.bastion.channels_refused(), 1);
    // Channels opened before keep working.
    round_trip(&mut open_before, b"untouched").await;

    s.bastion.refuse_channels(false);
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"allowed again").await;
    assert_eq!(s.bastion.channels_opened(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_each_direction() {
    let s = setup().await;
    let handle = session(&s.bastion, &s.key, None).await;
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    let latency = Duration::from_millis(150);
    s.bastion.set_latency(latency);
    let started = Instant::now();
    round_trip(&mut stream, b"slow").await;
    let rtt = started.elapsed();
    // A delay line never delivers early: the round trip crosses it once each way.
    assert!(rtt >= 2 * latency, "round trip {rtt:?} with {latency:?} each way");

    // Bulk data still arrives intact through the delay line.
    let mut payload = vec![0u8; 256 * 1024];
    fastrand::fill(&mut payload);
    round_trip(&mut stream, &payload).await;

    s.bastion.set_latency(Duration::ZERO);
    round_trip(&mut stream, b"fast again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_restart_on_the_same_port_with_the_same_host_key() {
    let s = setup().await;
    let handle = session(&s.bastion, &s.key, None).await;
    let port = s.bastion.port();
    let fingerprint = s.bastion.host_key_fingerprint();

    s.bastion.stop().await;
    assert!(!s.bastion.is_listening());
    wait_until("client session closed", SOON, || handle.is_closed()).await;
    assert_eq!(s.bastion.active_sessions(), 0);
    let refused = tokio::net::TcpStream::connect(s.bastion.addr()).await;
    assert!(refused.is_err(), "nothing listens while stopped");

    s.bastion.restart().await.unwrap();
    assert!(s.bastion.is_listening());
    assert_eq!(s.bastion.port(), port);
    assert_eq!(s.bastion.host_key_fingerprint(), fingerprint);
    // The client verifies the same host key again.
    let handle = session(&s.bastion, &s.key, None).await;
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"back").await;

    s.bastion.shutdown().await;
    assert!(s.bastion.restart().await.is_err(), "no restart after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modes_fail_clients_without_hanging_them() {
    let s = setup().await;

    s.bastion.stall_handshake(true);
    let handler = Client {
        expected_fingerprint: s.bastion.host_key_fingerprint(),
    };
    let stalled = tokio::time::timeout(
        Duration::from_secs(1),
        client::connect(client_config(None), s.bastion.addr(), handler),
    )
    .await;
    assert!(stalled.is_err(), "a stalled handshake never completes");
    s.bastion.stall_handshake(false);

    s.bastion.send_garbage_on_connect(true);
    let handler = Client {
        expected_fingerprint: s.bastion.host_key_fingerprint(),
    };
    let garbage = tokio::time::timeout(
        Duration::from_secs(2),
        client::connect(client_config(None), s.bastion.addr(), handler),
    )
    .await;
    assert!(!matches!(garbage, Ok(Ok(_))), "garbage never yields a session");
    s.bastion.send_garbage_on_connect(false);
    assert_eq!(s.bastion.sessions_accepted(), 0);
    assert_eq!(s.bastion.connections_accepted(), 2);

    s.bastion.close_channels_randomly(1.0);
    let handle = session(&s.bastion, &s.key, None).await;
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(SOON, stream.read(&mut buf))
        .await
        .expect("closed within bound");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    s.bastion.close_channels_randomly(0.0);
    let mut stream = open(&handle, s.echo.addr).await.unwrap();
    round_trip(&mut stream, b"calm again").await;

    // Hostile connections are dropped like any other.
    s.bastion.drop_sessions();
    wait_until("hostile connections gone", SOON, || s.bastion.active_sessions() == 0).await;
}
