//! With `sslmode=disable` and no TLS held by the tunnel, the local endpoint answers a client's
//! `SSLRequest` / `GSSENCRequest` with `N` itself: the server never sees that round trip. With the
//! sslmode unknown (no `postgres_tls`), the request is forwarded untouched.
//!
//! A recording proxy between sshd and PostgreSQL keeps the first 8 bytes of every connection the
//! server gets, so the test sees what actually crossed the tunnel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm_tunnel::testkit::TempPostgres;
use sea_orm_tunnel::tls::PostgresTls;
use sea_orm_tunnel::tunnel::SshTunnel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::support::*;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// Protocol 3.0 in a `StartupMessage`.
const PROTOCOL_3: u32 = 196_608;

/// A proxy in front of PostgreSQL recording each connection's first 8 bytes (its request code).
struct Recorder {
    port: u16,
    codes: Arc<Mutex<Vec<u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start(pg: &TempPostgres) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let codes = Arc::new(Mutex::new(Vec::new()));
        let (target, seen) = (pg.port(), codes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 8];
                    if client.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    seen.lock()
                        .unwrap()
                        .push(u32::from_be_bytes([head[4], head[5], head[6], head[7]]));
                    let mut server = TcpStream::connect(("127.0.0.1", target)).await.unwrap();
                    if server.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Recorder { port, codes, task }
    }

    fn codes(&self) -> Vec<u32> {
        self.codes.lock().unwrap().clone()
    }
}

/// `psql` (libpq, `sslmode=prefer`: it sends an `SSLRequest` first) runs `SELECT 41 + 1` through
/// the tunnel's endpoint.
async fn psql_prefer(tunnel: &SshTunnel, pg: &TempPostgres) -> String {
    let addr = tunnel.local_endpoint().tcp_addr().unwrap();
    let url = format!(
        "postgresql://{}@127.0.0.1:{}/{}?sslmode=prefer&gssencmode=disable",
        pg.user(),
        addr.port(),
        pg.database()
    );
    let password = pg.password().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args(["-X", "-A", "-t", "-c", "SELECT 41 + 1"])
            .arg(url)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "20")
            .output()
            .expect("psql runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_disable_answers_ssl_request_locally() {
    let (pg, sshd) = servers().await;
    let recorder = Recorder::start(&pg).await;
    let tunnel = SshTunnel::connect(
        sshd.tunnel_config("127.0.0.1", recorder.port)
            .connect_timeout(Duration::from_secs(10))
            .postgres_tls(PostgresTls::disabled()),
    )
    .await
    .expect("tunnel connects");

    assert_eq!(psql_prefer(&tunnel, &pg).await, "42");
    assert_eq!(
        recorder.codes(),
        vec![PROTOCOL_3],
        "the server got the StartupMessage first, never the SSLRequest"
    );
    let stats = tunnel.stats();
    assert!(stats.bytes_to_remote > 8 && stats.bytes_from_remote > 0, "{stats:?}");

    // GSSENCRequest then SSLRequest, both answered here; the client then leaves: no channel is
    // opened for it at all, nothing reaches the server. (psql's connection is done first: its
    // Terminate may still be on its way when psql has exited.)
    eventually("psql's channel closed", || async {
        tunnel.stats().channels_active == 0
    })
    .await;
    let channels_before = tunnel.stats();
    let mut raw = TcpStream::connect(tunnel.local_endpoint().tcp_addr().unwrap())
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    for request in [GSSENC_REQUEST, SSL_REQUEST] {
        raw.write_all(&request).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), raw.read_exact(&mut answer))
            .await
            .expect("answered in time")
            .unwrap();
        assert_eq!(&answer, b"N");
    }
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(recorder.codes(), vec![PROTOCOL_3]);
    assert_eq!(
        tunnel.stats().bytes_to_remote,
        channels_before.bytes_to_remote,
        "the answered requests are not bytes sent to the server"
    );
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sslmode_forwards_ssl_request_untouched() {
    let (pg, sshd) = servers().await;
    let recorder = Recorder::start(&pg).await;
    // No postgres_tls: the tunnel does not know what the client's sslmode asked for.
    let tunnel = SshTunnel::connect(
        sshd.tunnel_config("127.0.0.1", recorder.port)
            .connect_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("tunnel connects");

    assert_eq!(psql_prefer(&tunnel, &pg).await, "42");
    assert_eq!(
        recorder.codes(),
        vec![pgwire_ssl_code()],
        "the server itself answered the client's SSLRequest"
    );
    tunnel.disconnect().await;
}

fn pgwire_ssl_code() -> u32 {
    u32::from_be_bytes([SSL_REQUEST[4], SSL_REQUEST[5], SSL_REQUEST[6], SSL_REQUEST[7]])
}
