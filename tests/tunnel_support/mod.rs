//! Shared helpers of the tunnel integration tests (real PostgreSQL and OpenSSH sshd).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};
use sea_orm_tunnel::config::{BackoffPolicy, TunnelConfig};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::{LocalEndpoint, SshTunnel, TunnelEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// A generous liveness bound for anything that should take milliseconds.
pub const LIVENESS: Duration = Duration::from_secs(30);

/// Real PostgreSQL and sshd, the sshd trusted via its known_hosts.
pub async fn servers() -> (TempPostgres, OpenSshd) {
    let (pg, sshd) = tokio::join!(TempPostgres::start(), OpenSshd::start());
    (pg.expect("PostgreSQL starts"), sshd.expect("sshd starts"))
}

/// The tunnel config to reach `pg` through `sshd`, with test-friendly timings.
pub fn config(sshd: &OpenSshd, pg: &TempPostgres) -> TunnelConfig {
    sshd.tunnel_config("127.0.0.1", pg.port())
        .connect_timeout(Duration::from_secs(10))
        .reconnect(
            BackoffPolicy::new(Duration::from_millis(100))
                .jitter(0.0)
                .max_retries(0),
        )
}

/// The database URL through the tunnel's endpoint (TCP or Unix socket).
pub fn url_via(tunnel: &SshTunnel, pg: &TempPostgres) -> String {
    match tunnel.local_endpoint() {
        LocalEndpoint::Tcp(addr) => format!("postgres://{}:{}@{addr}/{}", pg.user(), pg.password(), pg.database()),
        LocalEndpoint::Unix(_) => {
            let dir = tunnel.local_endpoint().unix_dir().expect("unix dir");
            format!(
                "postgres://{}:{}@localhost/{}?host={}&port={}",
                pg.user(),
                pg.password(),
                pg.database(),
                dir.display(),
                pg.port()
            )
        }
    }
}

/// A SeaORM pool on `url` with `max` connections and quiet logging.
pub async fn pool(url: &str, max: u32) -> DatabaseConnection {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    Database::connect(opts).await.expect("pool connects through the tunnel")
}

/// `SELECT <n>::int4` and return the value.
pub async fn select(db: &DatabaseConnection, n: i32) -> Result<i32, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT {n}::int4 AS v"),
        ))
        .await?
        .expect("one row");
    row.try_get::<i32>("", "v")
}

/// Waits (bounded) for the first event matching `pred`, returning it.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<TunnelEvent>,
    within: Duration,
    mut pred: impl FnMut(&TunnelEvent) -> bool,
) -> TunnelEvent {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    })
    .await
    .expect("expected tunnel event did not arrive in time")
}

/// A loopback echo server: every connection gets back what it sends. Returns its address.
pub async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Sends `payload` through `addr` (an echo path) and checks the echo byte for byte.
pub async fn echo_roundtrip(addr: SocketAddr, payload: Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to tunnel");
    let (mut r, mut w) = s.split();
    let expected = payload.clone();
    let writer = async move {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let reader = async move {
        let mut got = Vec::with_capacity(expected.len());
        r.read_to_end(&mut got).await.expect("read echo");
        assert_eq!(got.len(), expected.len(), "echo length");
        assert!(got == expected, "echo content differs");
    };
    tokio::join!(writer, reader);
}
