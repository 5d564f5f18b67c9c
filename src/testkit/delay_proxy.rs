//! [`DelayProxy`]: a loopback TCP proxy that adds a fixed round-trip time, for measuring a
//! far-away bastion on one machine (`sch_netem` is not available everywhere).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::util::{Result, TestkitError};

/// Bytes one direction of one connection may hold in flight inside the proxy: far above any
/// window that is measured through it (it bounds memory, not throughput).
const MAX_IN_FLIGHT: usize = 256 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;

/// A TCP proxy on `127.0.0.1:ephemeral` in front of `target` that delays every byte by half the
/// round trip in each direction, so a connection through it sees `rtt` more round-trip time.
/// Data is delayed, never rate-limited: a window of W bytes moves at most W per round trip, as
/// over a long link. Stops (resetting its connections) when dropped.
///
/// ```no_run
/// # async fn demo(sshd: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sea_orm_tunnel::testkit::DelayProxy;
///
/// // The bastion 50 ms away.
/// let far = DelayProxy::start(sshd, Duration::from_millis(50)).await?;
/// println!("connect to {} instead of {sshd}", far.addr());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    rtt: Duration,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl DelayProxy {
    /// Listens on `127.0.0.1:0` and forwards to `target` with `rtt` added to every round trip.
    pub async fn start(target: SocketAddr, rtt: Duration) -> Result<DelayProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| TestkitError::io("binding the delay proxy on 127.0.0.1", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the delay proxy address", e))?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (one_way, cancel, tasks) = (rtt / 2, shutdown.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = listener.accept() => r,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        _ = async { tokio::join!(pipe(cr, sw, one_way), pipe(sr, cw, one_way)) } => {}
                    }
                });
            }
        });
        Ok(DelayProxy {
            addr,
            rtt,
            shutdown,
            tracker,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The round-trip time it adds.
    pub fn rtt(&self) -> Duration {
        self.rtt
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.tracker.close();
    }
}

/// One direction: what is read at `t` is written at `t + delay`, in order.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let room = std::sync::Arc::new((std::sync::atomic::AtomicUsize::new(0), Notify::new()));
    let reader = {
        let room = room.clone();
        async move {
            loop {
                while room.0.load(std::sync::atomic::Ordering::Acquire) > MAX_IN_FLIGHT {
                    room.1.notified().await;
                }
                let mut buf = vec![0u8; READ_CHUNK];
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        room.0.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
                        if tx.send((Instant::now() + delay, buf)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let n = buf.len();
            if to.write_all(&buf).await.is_err() {
                return;
            }
            room.0.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
            // A stored permit: a reader that checks the room just before this still wakes.
            room.1.notify_one();
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
