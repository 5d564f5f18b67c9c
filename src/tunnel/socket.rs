//! The SSH transport socket: a `TcpStream` this crate owns so it can tune it.
//!
//! Two things a plain `russh::client::connect` cannot do:
//!
//! - **TCP_QUICKACK after every read (Linux).** sshd often sends one response in two small
//!   segments; the second waits for the client's delayed ACK (~40 ms). Quick-ack mode is not
//!   sticky in Linux, so it is re-armed after each read. This takes a query through the tunnel
//!   from ~40 ms to well under a millisecond when a pool is used one query at a time.
//! - **Buffered reads.** russh reads each packet with two `read_exact` calls (length, then body);
//!   a 64 KiB read buffer turns that into about one `recv` per several packets.
//! - **A kill switch.** A session declared dead by keepalive may have its russh task parked in a
//!   write to a blackholed peer; the kernel would retransmit for many minutes. Cancelling the
//!   token makes every pending and future read/write fail at once, which ends the russh task.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Read buffer of the SSH socket: room for two full 32 KiB channel packets.
const READ_BUFFER: usize = 64 * 1024;

/// The stream handed to russh: buffered reads over a [`RawTransport`].
pub(crate) type TransportStream = BufReader<RawTransport>;

/// Wraps a connected stream: sets `TCP_NODELAY`, arms quick-ack, buffers reads; `kill` aborts all I/O.
pub(crate) fn transport(stream: TcpStream, kill: &CancellationToken) -> TransportStream {
    BufReader::with_capacity(READ_BUFFER, RawTransport::new(stream, kill))
}

/// A `TcpStream` that re-arms `TCP_QUICKACK` after each read and can be killed from outside.
pub(crate) struct RawTransport {
    inner: TcpStream,
    // Separate futures for the read and write side: `tokio::io::split` polls them from two
    // tasks' contexts, and one future keeps only the last waker.
    killed_read: Pin<Box<WaitForCancellationFutureOwned>>,
    killed_write: Pin<Box<WaitForCancellationFutureOwned>>,
    quickack: bool,
}

impl RawTransport {
    fn new(stream: TcpStream, kill: &CancellationToken) -> Self {
        // Small SSH packets (a query, a keepalive) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let mut this = Self {
            inner: stream,
            killed_read: Box::pin(kill.clone().cancelled_owned()),
            killed_write: Box::pin(kill.clone().cancelled_owned()),
            quickack: cfg!(any(target_os = "linux", target_os = "android")),
        };
        this.rearm_quickack();
        this
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn rearm_quickack(&mut self) {
        if self.quickack && socket2::SockRef::from(&self.inner).set_tcp_quickack(true).is_err() {
            // Not supported on this socket (should not happen for TCP): stop trying.
            self.quickack = false;
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn rearm_quickack(&mut self) {}
}

fn killed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "SSH session closed by the tunnel")
}

impl AsyncRead for RawTransport {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.killed_read.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(killed()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.rearm_quickack();
        }
        res
    }
}

impl AsyncWrite for RawTransport {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.killed_write.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.killed_write.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed_write.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed_write.as_mut().poll(cx).is_ready() {
            // Already dead: nothing left to shut down.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn passes_data_and_dies_on_kill() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let kill = CancellationToken::new();
        let mut wrapped = transport(client.unwrap(), &kill);
        let (mut server, _) = server.unwrap();

        wrapped.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        wrapped.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");

        // A read parked on a silent peer must end when the session is killed.
        let pending = tokio::spawn(async move { wrapped.read(&mut buf).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        kill.cancel();
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), pending)
            .await
            .expect("read must wake up on kill")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
