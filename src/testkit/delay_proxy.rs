//! [`DelayProxy`]: a loopback TCP proxy that adds a fixed round-trip time, for measuring a
//! far-away bastion on one machine (`sch_netem` is not available everywhere).
//!
//! It runs on its own OS threads with blocking sockets and `std::thread::sleep`, not on the
//! async runtime: tokio's timer rounds every deadline up to a whole millisecond and wakes late
//! under load, which added 2–3 ms to every 50 ms round trip and showed up in every ratio measured
//! through the proxy. A thread sleeping to an `Instant` is late by tens of microseconds.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::util::{Result, TestkitError};

/// Bytes one direction of one connection may hold in flight inside the proxy: far above any
/// window that is measured through it (it bounds memory, not throughput).
const MAX_IN_FLIGHT: usize = 256 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;
/// The proxy's threads do little on their stacks.
const STACK: usize = 256 * 1024;

/// A TCP proxy on `127.0.0.1:ephemeral` in front of `target` that delays every byte by half the
/// round trip in each direction, so a connection through it sees `rtt` more round-trip time.
/// Data is delayed, never rate-limited: a window of W bytes moves at most W per round trip, as
/// over a long link. Stops (closing its connections) when dropped.
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
    stop: Arc<AtomicBool>,
    /// Every connection the proxy holds, so that dropping it closes them all.
    sockets: Arc<Mutex<Vec<Held>>>,
}

impl DelayProxy {
    /// Listens on `127.0.0.1:0` and forwards to `target` with `rtt` added to every round trip.
    pub async fn start(target: SocketAddr, rtt: Duration) -> Result<DelayProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| TestkitError::io("binding the delay proxy on 127.0.0.1", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the delay proxy address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let (one_way, stop2, sockets2) = (rtt / 2, stop.clone(), sockets.clone());
        spawn("delay-proxy-accept", move || {
            accept_loop(listener, target, one_way, &stop2, &sockets2)
        })
        .map_err(|e| TestkitError::io("starting the delay proxy thread", e))?;
        Ok(DelayProxy {
            addr,
            rtt,
            stop,
            sockets,
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
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop, which then sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let sockets = std::mem::take(&mut *self.sockets.lock().unwrap_or_else(|p| p.into_inner()));
        for held in sockets {
            let _ = held.client.shutdown(Shutdown::Both);
            let _ = held.server.shutdown(Shutdown::Both);
        }
    }
}

/// One proxied connection's two sockets, and how many of its two directions have ended.
#[derive(Debug)]
struct Held {
    client: TcpStream,
    server: TcpStream,
    ended: Arc<AtomicUsize>,
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    thread::Builder::new()
        .name(name.into())
        .stack_size(STACK)
        .spawn(f)
        .map(drop)
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    one_way: Duration,
    stop: &AtomicBool,
    sockets: &Mutex<Vec<Held>>,
) {
    while !stop.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(server) = TcpStream::connect(target) else {
            continue;
        };
        let _ = (
            client.set_nonblocking(false),
            client.set_nodelay(true),
            server.set_nodelay(true),
        );
        let clones = (|| {
            Ok::<_, std::io::Error>((
                client.try_clone()?,
                client.try_clone()?,
                server.try_clone()?,
                server.try_clone()?,
            ))
        })();
        let Ok((client_w, client_keep, server_r, server_keep)) = clones else {
            continue;
        };
        let ended = Arc::new(AtomicUsize::new(0));
        {
            let mut held = sockets.lock().unwrap_or_else(|p| p.into_inner());
            if stop.load(Ordering::Acquire) {
                return;
            }
            // Connections whose two directions have both ended are closed already.
            held.retain(|h| h.ended.load(Ordering::Acquire) < 2);
            held.push(Held {
                client: client_keep,
                server: server_keep,
                ended: ended.clone(),
            });
        }
        let started = pipe(client, server, one_way, "delay-proxy-up", ended.clone())
            .and_then(|()| pipe(server_r, client_w, one_way, "delay-proxy-down", ended));
        if started.is_err() {
            return;
        }
    }
}

/// Bytes read but not yet written by one direction, and a wake-up for a reader waiting for room.
type Room = (Mutex<usize>, Condvar);

/// One direction: what is read at `t` is written at `t + delay`, in order. A reader thread and a
/// writer thread joined by a queue, so reading never waits for a delayed write.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    name: &str,
    ended: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let room: Arc<Room> = Arc::new((Mutex::new(0), Condvar::new()));
    let room2 = room.clone();
    spawn(name, move || {
        loop {
            {
                let mut held = room2.0.lock().unwrap_or_else(|p| p.into_inner());
                while *held > MAX_IN_FLIGHT {
                    held = room2.1.wait(held).unwrap_or_else(|p| p.into_inner());
                }
            }
            let mut buf = vec![0u8; READ_CHUNK];
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.truncate(n);
                    *room2.0.lock().unwrap_or_else(|p| p.into_inner()) += n;
                    if tx.send((Instant::now() + delay, buf)).is_err() {
                        return;
                    }
                }
            }
        }
    })?;
    spawn(name, move || {
        let _ended = EndOnDrop(ended);
        while let Ok((at, buf)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            if to.write_all(&buf).is_err() {
                return;
            }
            *room.0.lock().unwrap_or_else(|p| p.into_inner()) -= buf.len();
            room.1.notify_one();
        }
        let _ = to.shutdown(Shutdown::Write);
    })
}

/// Counts one direction as ended when its writer stops, however it stops.
struct EndOnDrop(Arc<AtomicUsize>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}
