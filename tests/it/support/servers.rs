//! Real servers for the tests: PostgreSQL and OpenSSH sshd, the tunnel and manager configurations
//! that reach one through the other, the environment block a child process reads them from, and a
//! loopback echo server.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::{BackoffPolicy, TunnelConfig};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres, fast_config};
use sea_orm_tunnel::tunnel::SshTunnel;
use sea_orm_tunnel::url::local_database_url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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

/// The variables a program configured through the environment needs to reach `pg` through
/// `sshd` with the sshd's client key (no agent, no ssh_config); known_hosts and the host key policy are left to
/// the caller.
pub fn env_block(sshd: &OpenSshd, pg: &TempPostgres) -> Vec<(&'static str, OsString)> {
    vec![
        ("DATABASE_URL", pg.url().into()),
        ("SSH_HOST", sshd.host().into()),
        ("SSH_PORT", sshd.port().to_string().into()),
        ("SSH_USER", sshd.user().into()),
        ("SSH_KEY_PATH", sshd.client_key_path().into()),
        ("SSH_USE_AGENT", "false".into()),
        // Never the machine's ~/.ssh/config or /etc/ssh/ssh_config.
        ("SSH_CONFIG", "none".into()),
    ]
}

/// The database URL through the tunnel's endpoint (TCP or Unix socket).
pub fn url_via(tunnel: &SshTunnel, pg: &TempPostgres) -> String {
    local_database_url(&pg.url(), tunnel.local_endpoint(), pg.port()).expect("the test kit's URL is valid")
}

/// PostgreSQL reached through OpenSSH sshd.
pub struct Servers {
    pub pg: TempPostgres,
    pub sshd: OpenSshd,
}

impl Servers {
    pub async fn start() -> Servers {
        let (pg, sshd) = servers().await;
        Servers { pg, sshd }
    }

    /// A manager through the tunnel, with fast health checks so outages are seen quickly.
    pub async fn manager(&self, prefix: &str) -> ConnectionManager {
        let tunnel = self
            .sshd
            .tunnel_config("127.0.0.1", self.pg.port())
            .keepalive_interval(Duration::from_secs(1))
            .keepalive_max(2)
            .connect_timeout(Duration::from_secs(5))
            .map_reconnect(|r| {
                r.initial_delay(Duration::from_millis(100))
                    .max_delay(Duration::from_millis(500))
                    .max_retries(0)
            });
        let config = fast_config(self.pg.url(), prefix).tunnel(tunnel).recovery(
            BackoffPolicy::new(Duration::from_millis(50))
                .max_delay(Duration::from_millis(500))
                .max_retries(4),
        );
        ConnectionManager::new(config).await.expect("manager starts")
    }
}

/// A loopback echo server: every connection gets back what it sends, then a half-close. Stops
/// (with its connections) when dropped.
pub struct Echo {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Echo {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Echo { addr, task }
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
