//! [`FaultProxy`]: a loopback TCP proxy that can cut, blackhole and restore the link.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::util::{Result, TestkitError};

/// A TCP proxy on `127.0.0.1:ephemeral` in front of `target`, for failure tests.
///
/// - [`cut`](Self::cut): every established connection is reset (the client and the target both
///   see an RST); new connections are still accepted.
/// - [`blackhole`](Self::blackhole): sockets stay open but nothing is forwarded in either
///   direction, for established and new connections alike (new ones do not reach the target)
///   — a silent dead link, as when a NAT or firewall drops the path.
/// - [`restore`](Self::restore): forward again; data held during the blackhole is delivered.
///
/// All tasks are tracked and stop (resetting their connections) when the proxy is dropped.
///
/// ```no_run
/// # async fn demo(target: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::FaultProxy;
///
/// let proxy = FaultProxy::start(target).await?;
/// // point the client at proxy.addr() ...
/// proxy.blackhole();
/// proxy.restore();
/// proxy.cut();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Debug)]
struct Shared {
    /// `true` while forwarding, `false` while blackholed.
    forwarding: watch::Sender<bool>,
    /// Cancelled by `cut`; replaced by a fresh one for later connections.
    cut: Mutex<CancellationToken>,
    live: AtomicUsize,
    accepted: AtomicUsize,
    /// Where new connections go (see `retarget`).
    target: Mutex<SocketAddr>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `target`.
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| TestkitError::io("binding the fault proxy on 127.0.0.1", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the fault proxy address", e))?;
        let shared = Arc::new(Shared {
            forwarding: watch::Sender::new(true),
            cut: Mutex::new(CancellationToken::new()),
            live: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            target: Mutex::new(target),
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, shared.clone(), shutdown.clone(), tracker.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            shutdown,
            tracker,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        *self.shared.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forwards new connections to `target` from now on; established ones stay where they are,
    /// as when a DNS name moves to a new primary during a failover.
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Resets every established connection (SO_LINGER 0, then close: both peers see an RST).
    /// Keeps accepting new connections, and keeps the current forwarding/blackhole mode.
    pub fn cut(&self) {
        let old = {
            let mut cut = self.shared.cut.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *cut, CancellationToken::new())
        };
        old.cancel();
    }

    /// Stops forwarding in both directions without closing anything, for current and new connections.
    pub fn blackhole(&self) {
        self.shared.forwarding.send_replace(false);
    }

    /// Forwards again after [`blackhole`](Self::blackhole).
    pub fn restore(&self) {
        self.shared.forwarding.send_replace(true);
    }

    /// Whether the proxy is blackholing.
    pub fn is_blackholed(&self) -> bool {
        !*self.shared.forwarding.borrow()
    }

    /// Connections currently open through the proxy.
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Connections accepted since the proxy started.
    pub fn total_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting, resets every connection and waits for all tasks to end.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The tasks see this at their next poll and reset their sockets.
        self.shutdown.cancel();
        self.tracker.close();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let cut = shared.cut.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let guard = LiveGuard::new(shared.clone());
        let target = *shared.target.lock().unwrap_or_else(|p| p.into_inner());
        tracker.spawn(connection(client, target, shared.clone(), cut, shutdown.clone(), guard));
    }
}

/// Counts a live connection for as long as it exists.
struct LiveGuard(Arc<Shared>);

impl LiveGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.live.fetch_add(1, Ordering::SeqCst);
        LiveGuard(shared)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    shared: Arc<Shared>,
    cut: CancellationToken,
    shutdown: CancellationToken,
    _guard: LiveGuard,
) {
    let mut forwarding = shared.forwarding.subscribe();
    // A blackholed link never reaches the target: connect only once forwarding.
    let connected = tokio::select! {
        _ = cut.cancelled() => None,
        _ = shutdown.cancelled() => None,
        r = async {
            wait_forwarding(&mut forwarding).await;
            TcpStream::connect(target).await
        } => r.ok(),
    };
    let Some(mut server) = connected else {
        // Cut, shut down, or the target refused: the client sees a reset, like a refused connect.
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);

    let reset_both = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let up = pump(&mut client_read, &mut server_write, shared.forwarding.subscribe());
        let down = pump(&mut server_read, &mut client_write, shared.forwarding.subscribe());
        // A reset or error in either direction resets both at once, as a peer's RST does on a
        // direct path: waiting for the other direction too would leave a client that is only
        // reading (waiting for an answer) hanging forever.
        tokio::select! {
            _ = cut.cancelled() => true,
            _ = shutdown.cancelled() => true,
            r = async { tokio::try_join!(up, down) } => r.is_err(),
        }
    };
    if reset_both {
        reset(&client);
        reset(&server);
    }
}

/// Copies one direction, holding data while blackholed. `Ok` on a clean EOF (forwarded as a
/// half-close), `Err` on a reset or error (then both sides are reset).
async fn pump<R, W>(reader: &mut R, writer: &mut W, mut forwarding: watch::Receiver<bool>) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // While blackholed, do not even read: the sender's buffers fill as on a dead path.
        wait_forwarding(&mut forwarding).await;
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        // A blackhole that began during the read holds this chunk until restore.
        wait_forwarding(&mut forwarding).await;
        writer.write_all(&buf[..n]).await?;
    }
}

async fn wait_forwarding(forwarding: &mut watch::Receiver<bool>) {
    // The sender lives in `Shared`, which this task keeps alive, so this only ends by forwarding.
    let _ = forwarding.wait_for(|on| *on).await;
}

/// Close with SO_LINGER 0 so the peer gets an RST instead of a FIN.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
