//! Spare channels (`TunnelConfig::spare_channel`, `SSH_SPARE_CHANNEL`): after a connection is
//! served the tunnel keeps one more channel to the same server open, so the next connection skips
//! the channel-open round trip; a spare the server closed, one past its time, a discarded one and
//! one still ready at shutdown are closed, never handed out.
//!
//! A gate between sshd and PostgreSQL counts the connections the server side has open, and
//! closes any that sends nothing for a while, as PostgreSQL's `authentication_timeout` does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm_tunnel::testkit::{DelayProxy, OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::SshTunnel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::support::*;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A proxy in front of PostgreSQL: closes a connection that sends nothing within `idle_close`,
/// and counts the connections open now.
struct Gate {
    port: u16,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    async fn start(pg: &TempPostgres, idle_close: Duration) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicUsize::new(0));
        let (target, counter) = (pg.port(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    if let Ok(Ok(1)) = tokio::time::timeout(idle_close, client.read(&mut first)).await {
                        let mut server = TcpStream::connect(("127.0.0.1", target)).await.unwrap();
                        if server.write_all(&first).await.is_ok() {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Gate { port, open, task }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Sends an `SSLRequest` to the tunnel's endpoint and waits for the server's one-byte answer:
/// the time of a channel (when one must be opened) plus one round trip to the server.
async fn ssl_probe(tunnel: &SshTunnel) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(tunnel.local_endpoint().tcp_addr().unwrap())
        .await
        .unwrap();
    s.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer)
        .await
        .expect("the server answers the SSLRequest");
    assert!(matches!(&answer, b"N" | b"S"), "answer {answer:?}");
    started.elapsed()
}

fn with_spare(sshd: &OpenSshd, pg: &TempPostgres, gate: &Gate, ttl: Duration) -> sea_orm_tunnel::config::TunnelConfig {
    config(sshd, pg).remote("127.0.0.1", gate.port).spare_channel(Some(ttl))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_channel_saves_the_channel_open_round_trip() {
    let (pg, sshd) = servers().await;
    let gate = Gate::start(&pg, Duration::from_secs(60)).await;
    let rtt = Duration::from_millis(400);
    let far = DelayProxy::start(sshd.addr(), rtt).await.unwrap();
    sshd.trust_host_key_at(far.addr()).unwrap();
    let tunnel = SshTunnel::connect(
        with_spare(&sshd, &pg, &gate, Duration::from_secs(30))
            .host(far.addr().ip().to_string())
            .port(far.addr().port()),
    )
    .await
    .expect("tunnel connects through the delay proxy");

    // The first connection opens its channel: two round trips at least.
    let first = ssl_probe(&tunnel).await;
    assert!(first >= rtt * 2, "first connection took {first:?}");
    wait_until("a spare is open", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_opened == 1
    })
    .await;
    wait_until("the first connection is closed", Duration::from_secs(10), || {
        gate.open() == 1
    })
    .await;

    // The next one is served on the spare: one round trip (a generous bound, well below two).
    let second = ssl_probe(&tunnel).await;
    assert!(
        second < rtt * 3 / 2,
        "a connection on the spare took {second:?} (first {first:?})"
    );
    let stats = tunnel.stats();
    assert_eq!(stats.spare_channels_used, 1, "{stats:?}");

    // A whole SeaORM connection and query on a spare (the pool's first connection takes the
    // spare the last probe left).
    wait_until("the next spare is open", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_opened == 2
    })
    .await;
    let db = pool(&url_via(&tunnel, &pg), 1).await;
    assert_eq!(select(&db, 7).await.unwrap(), 7);
    assert_eq!(tunnel.stats().spare_channels_used, 2);
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_the_server_closed_is_not_handed_out() {
    let (pg, sshd) = servers().await;
    // The server side closes a silent connection after 300 ms, spares included.
    let gate = Gate::start(&pg, Duration::from_millis(300)).await;
    let tunnel = SshTunnel::connect(with_spare(&sshd, &pg, &gate, Duration::from_secs(30)))
        .await
        .expect("tunnel connects");
    let url = url_via(&tunnel, &pg);
    let db = pool(&url, 1).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);
    db.close().await.unwrap();
    wait_until("a spare is open", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_opened == 1
    })
    .await;
    wait_until("the server side closed it", Duration::from_secs(10), || {
        gate.open() == 0
    })
    .await;

    // The next connection finds the spare closed and opens its own channel.
    let db = pool(&url, 1).await;
    assert_eq!(select(&db, 2).await.unwrap(), 2);
    let stats = tunnel.stats();
    assert_eq!(stats.spare_channels_used, 0, "{stats:?}");
    assert!(stats.spare_channels_discarded >= 1, "{stats:?}");
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_expire_are_discarded_and_close_at_shutdown() {
    let (pg, sshd) = servers().await;
    let gate = Gate::start(&pg, Duration::from_secs(60)).await;

    // Past its time a spare is closed, and no other is opened until a connection is served.
    let tunnel = SshTunnel::connect(with_spare(&sshd, &pg, &gate, Duration::from_millis(500)))
        .await
        .expect("tunnel connects");
    ssl_probe(&tunnel).await;
    wait_until("a spare is open", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_opened == 1
    })
    .await;
    wait_until("the spare expired and was closed", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_discarded == 1 && gate.open() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = tunnel.stats();
    assert_eq!((stats.spare_channels_opened, gate.open()), (1, 0), "{stats:?}");
    assert_eq!(stats.channels_active, 0, "{stats:?}");
    tunnel.disconnect().await;

    // Discarded (a failover): closed at once, and the next connection opens its own channel.
    let tunnel = SshTunnel::connect(with_spare(&sshd, &pg, &gate, Duration::from_secs(30)))
        .await
        .expect("tunnel connects");
    ssl_probe(&tunnel).await;
    wait_until("a spare is open", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_opened == 1 && gate.open() == 1
    })
    .await;
    tunnel.discard_spares();
    wait_until("the discarded spare is closed", Duration::from_secs(5), || {
        gate.open() == 0
    })
    .await;
    ssl_probe(&tunnel).await;
    assert_eq!(tunnel.stats().spare_channels_used, 0);

    // Ready at shutdown: closed, and the shutdown does not wait for it.
    wait_until("a new spare is open", Duration::from_secs(10), || {
        tunnel.stats().spare_channels_opened == 2 && gate.open() == 1
    })
    .await;
    let started = Instant::now();
    tunnel.disconnect().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    wait_until("the spare is closed at shutdown", Duration::from_secs(5), || {
        gate.open() == 0
    })
    .await;
}
