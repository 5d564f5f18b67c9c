//! The PostgreSQL wire protocol's startup phase, and nothing after it.
//!
//! A forwarded connection that needs the tunnel to take part in the protocol (TLS held by the
//! tunnel today; PgBouncer and pooling later) goes through here once:
//!
//! 1. [`read_client_startup`]: the local client's first message. An `SSLRequest` or
//!    `GSSENCRequest` is answered `N` locally (the local endpoint is private and plaintext), then
//!    the `StartupMessage` or `CancelRequest` is read whole.
//! 2. [`negotiate`]: upstream, an `SSLRequest`, the server's `S`/`N`, the TLS handshake or not per
//!    `sslmode`.
//! 3. The caller sends the client's message on and copies bytes both ways, untouched: nothing
//!    after startup is parsed (CPU).
//!
//! When something fails before the server has said anything, [`error_response`] builds the
//! `ErrorResponse` the local client gets (severity `FATAL`, a class 08 SQLSTATE), so sqlx and psql
//! show what went wrong instead of "connection closed".

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio_rustls::client::TlsStream;

use crate::Error;
use crate::tls::{Loaded, SslMode, TlsSession};

/// `SSLRequest`'s request code (1234.5679).
pub(crate) const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `GSSENCRequest`'s request code (1234.5680).
pub(crate) const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// `CancelRequest`'s request code (1234.5678).
pub(crate) const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// PostgreSQL refuses longer startup packets (`MAX_STARTUP_PACKET_LENGTH`).
pub(crate) const MAX_STARTUP_LEN: usize = 10_000;
/// Encryption requests a client may make before its startup message (libpq: GSS, then SSL).
const MAX_NEGOTIATIONS: usize = 2;

/// SQLSTATE 08P01 protocol_violation.
pub(crate) const SQLSTATE_PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE 08001 sqlclient_unable_to_establish_sqlconnection: a permanent refusal.
pub(crate) const SQLSTATE_UNABLE_TO_CONNECT: &str = "08001";
/// SQLSTATE 08006 connection_failure: a transient one.
pub(crate) const SQLSTATE_CONNECTION_FAILURE: &str = "08006";

/// The client's first real message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartupKind {
    /// A `StartupMessage` (protocol 3.x).
    Startup,
    /// A `CancelRequest`: passed on as is, and the server answers nothing.
    Cancel,
}

/// The local client's startup message, whole (length word included), as it will be sent on.
#[derive(Debug, Clone)]
pub(crate) struct ClientStartup {
    pub(crate) kind: StartupKind,
    pub(crate) message: Vec<u8>,
}

impl ClientStartup {
    /// The `StartupMessage`'s `(name, value)` parameters (`user`, `database`, `options`, ...);
    /// empty for a `CancelRequest`.
    #[allow(dead_code)] // For the PgBouncer and pooling work, and the tests.
    pub(crate) fn parameters(&self) -> Vec<(&str, &str)> {
        if self.kind != StartupKind::Startup || self.message.len() < 8 {
            return Vec::new();
        }
        let mut fields = self.message[8..]
            .split(|&b| b == 0)
            .map(|f| std::str::from_utf8(f).unwrap_or(""));
        let mut out = Vec::new();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            if name.is_empty() {
                break;
            }
            out.push((name, value));
        }
        out
    }
}

/// Why the client's startup could not be read.
#[derive(Debug)]
pub(crate) enum StartupError {
    /// The client went away or the socket failed: nothing to answer.
    Io(io::Error),
    /// Not PostgreSQL's startup protocol: answer with an `ErrorResponse` naming the problem.
    Protocol(String),
}

impl From<io::Error> for StartupError {
    fn from(e: io::Error) -> Self {
        StartupError::Io(e)
    }
}

/// Reads the local client's first message, answering `SSLRequest` and `GSSENCRequest` with `N`.
pub(crate) async fn read_client_startup<S>(client: &mut S) -> Result<ClientStartup, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..=MAX_NEGOTIATIONS {
        let mut head = [0u8; 8];
        client.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            return Err(StartupError::Protocol(format!(
                "invalid startup packet length {len} (expected 8 to {MAX_STARTUP_LEN})"
            )));
        }
        match code {
            SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
                if len != 8 {
                    return Err(StartupError::Protocol(format!(
                        "invalid encryption request length {len}"
                    )));
                }
                // The local side is private: no encryption here, the tunnel encrypts upstream.
                client.write_all(b"N").await?;
                client.flush().await?;
                continue;
            }
            CANCEL_REQUEST_CODE if len != 16 => {
                return Err(StartupError::Protocol(format!("invalid cancel request length {len}")));
            }
            CANCEL_REQUEST_CODE => {}
            _ if code >> 16 != 3 => {
                return Err(StartupError::Protocol(format!(
                    "unsupported frontend protocol {}.{}: the tunnel speaks protocol 3",
                    code >> 16,
                    code & 0xffff
                )));
            }
            _ => {}
        }
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(&head);
        message.resize(len, 0);
        client.read_exact(&mut message[8..]).await?;
        let kind = if code == CANCEL_REQUEST_CODE {
            StartupKind::Cancel
        } else {
            StartupKind::Startup
        };
        return Ok(ClientStartup { kind, message });
    }
    Err(StartupError::Protocol(
        "too many encryption requests before the startup message".into(),
    ))
}

/// The raw path's only look at the protocol, when the answer is known (`sslmode=disable` and no
/// TLS held by the tunnel): each `SSLRequest` or `GSSENCRequest` the client opens with is answered
/// `N` here, saving a round trip to the server. Returns the first bytes that are not such a
/// request (up to 8; fewer when the client went quiet until `deadline`), to be forwarded first;
/// `None` when the client closed before sending anything else.
pub(crate) async fn answer_encryption_requests<S>(
    client: &mut S,
    deadline: tokio::time::Instant,
) -> io::Result<Option<Vec<u8>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut answered = 0;
    loop {
        let mut head = Vec::with_capacity(8);
        while head.len() < 8 {
            // `read_buf` keeps what it read when the timeout cancels it.
            match tokio::time::timeout_at(deadline, client.read_buf(&mut head)).await {
                Ok(Ok(0)) if head.is_empty() => return Ok(None),
                Ok(Ok(0)) | Err(_) => return Ok(Some(head)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let request = len == 8 && matches!(code, SSL_REQUEST_CODE | GSSENC_REQUEST_CODE);
        if !request || answered == MAX_NEGOTIATIONS {
            return Ok(Some(head));
        }
        client.write_all(b"N").await?;
        client.flush().await?;
        answered += 1;
    }
}

/// A protocol 3.0 `StartupMessage` with these parameters.
pub(crate) fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// The `(code, value)` fields of an `ErrorResponse`; `None` for another message.
pub(crate) fn error_fields(message: &[u8]) -> Option<Vec<(u8, String)>> {
    if message.len() < 5 || message[0] != b'E' {
        return None;
    }
    let mut out = Vec::new();
    for field in message[5..].split(|&b| b == 0) {
        let Some((&code, value)) = field.split_first() else {
            break;
        };
        out.push((code, String::from_utf8_lossy(value).into_owned()));
    }
    Some(out)
}

/// The 8-byte `SSLRequest`.
pub(crate) fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// An `ErrorResponse` with severity `FATAL`: `code` (SQLSTATE), `message`, an optional
/// `detail`, and an optional `routine` (the tunnel marks its permanent refusals with one, so
/// [`Error::is_transient`] can tell them from the server's own class 08 errors).
pub(crate) fn error_response(code: &str, message: &str, detail: Option<&str>, routine: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + message.len());
    let mut field = |tag: u8, value: &str| {
        body.push(tag);
        // A NUL inside would end the field early; nothing we write has one, but be sure.
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    };
    field(b'S', "FATAL");
    field(b'V', "FATAL");
    field(b'C', code);
    field(b'M', message);
    if let Some(detail) = detail {
        field(b'D', detail);
    }
    if let Some(routine) = routine {
        field(b'R', routine);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The `ErrorResponse` for a tunnel-side error: permanent ones carry 08001 and the tunnel's
/// routine marker, transient ones 08006.
pub(crate) fn error_response_for(error: &Error) -> Vec<u8> {
    let message = format!("sea-orm-tunnel: {error}");
    if error.is_transient() {
        error_response(SQLSTATE_CONNECTION_FAILURE, &message, None, None)
    } else {
        error_response(
            SQLSTATE_UNABLE_TO_CONNECT,
            &message,
            None,
            Some(crate::error::TUNNEL_TLS_ROUTINE),
        )
    }
}

/// The longest first server message read whole (an `ErrorResponse` or a SASL offer is far
/// shorter).
const MAX_FIRST_MESSAGE: usize = 64 * 1024;
/// `AuthenticationSASL`'s code in an `R` message.
const AUTH_SASL: u32 = 10;
/// The channel-binding SCRAM mechanism.
const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// Reads the server's first message whole (type, length, body) and returns it as the local
/// client must see it: an `AuthenticationSASL` offer loses `SCRAM-SHA-256-PLUS`.
///
/// Channel binding ties SCRAM to the TLS session, and the client's session (plaintext, with the
/// tunnel) is not the server's (TLS, with the tunnel), so it cannot work through a tunnel that
/// holds TLS; libpq even refuses a server that offers it over a plaintext connection ("server
/// offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection"). Plain SCRAM is still
/// protected by the TLS the tunnel verified.
pub(crate) async fn read_first_server_message<S>(server: &mut S) -> io::Result<Vec<u8>>
where
    S: AsyncRead + Unpin,
{
    let mut head = [0u8; 5];
    server.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=MAX_FIRST_MESSAGE).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the server's first message has an invalid length {len}"),
        ));
    }
    let mut message = Vec::with_capacity(len + 1);
    message.extend_from_slice(&head);
    message.resize(len + 1, 0);
    server.read_exact(&mut message[5..]).await?;
    Ok(without_channel_binding(message))
}

/// `message` without `SCRAM-SHA-256-PLUS` if it is an `AuthenticationSASL` offer.
pub(crate) fn without_channel_binding(message: Vec<u8>) -> Vec<u8> {
    if message.len() < 9 || message[0] != b'R' || message[5..9] != AUTH_SASL.to_be_bytes() {
        return message;
    }
    let mechanisms: Vec<&[u8]> = message[9..]
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty() && *m != SCRAM_PLUS)
        .collect();
    let mut body = AUTH_SASL.to_be_bytes().to_vec();
    for m in mechanisms {
        body.extend_from_slice(m);
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'R');
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The upstream side after negotiation: plaintext or TLS.
pub(crate) enum Upstream<S> {
    /// The server answered `N` (`prefer`/`allow`), or `sslmode=disable`.
    Plain(S),
    /// TLS.
    Tls(Box<TlsStream<S>>),
}

impl<S> Upstream<S> {
    /// What TLS negotiated; `None` for plaintext.
    pub(crate) fn tls_session(&self, loaded: &Loaded) -> Option<TlsSession> {
        let Upstream::Tls(tls) = self else { return None };
        let conn = tls.get_ref().1;
        Some(TlsSession {
            protocol: conn.protocol_version().map_or_else(|| "?".into(), |v| format!("{v:?}")),
            cipher: conn
                .negotiated_cipher_suite()
                .map_or_else(|| "?".into(), |c| format!("{:?}", c.suite())),
            verification: loaded.verify,
            server_name: loaded.name.clone(),
            not_after: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::not_after_unix(c)),
        })
    }
}

/// The outcome of [`negotiate`].
pub(crate) enum Negotiated<S> {
    /// Ready for the client's startup message.
    Ready(Upstream<S>),
    /// The server answered the `SSLRequest` with an `ErrorResponse` (`E`, already consumed):
    /// pass `E` and the rest to the client untouched.
    ServerError(S),
}

/// Upstream negotiation per `sslmode`: `SSLRequest`, the server's answer, the handshake.
/// `sslmode=disable` sends nothing and returns plaintext.
pub(crate) async fn negotiate<S>(mut server: S, tls: &Loaded) -> Result<Negotiated<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if tls.mode == SslMode::Disable {
        return Ok(Negotiated::Ready(Upstream::Plain(server)));
    }
    let io_error = |e: io::Error| {
        tls.error(
            crate::error::TlsErrorKind::Io,
            format!("the connection closed while asking the server for TLS: {e}"),
        )
    };
    server.write_all(&ssl_request()).await.map_err(io_error)?;
    server.flush().await.map_err(io_error)?;
    // Exactly one byte: anything the server (or a man in the middle) sent after it belongs to
    // the TLS handshake, not to us (CVE-2021-23222).
    let mut answer = [0u8; 1];
    server.read_exact(&mut answer).await.map_err(io_error)?;
    match answer[0] {
        b'S' => {
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), server)
                .await
                .map_err(|e| tls.handshake_error(&e))?;
            Ok(Negotiated::Ready(Upstream::Tls(Box::new(stream))))
        }
        b'N' if tls.mode.requires_tls() => Err(tls.not_supported()),
        b'N' => Ok(Negotiated::Ready(Upstream::Plain(server))),
        b'E' => Ok(Negotiated::ServerError(server)),
        other => Err(tls.error(
            crate::error::TlsErrorKind::Handshake,
            format!("the server answered the SSLRequest with {other:#04x}, not S or N: is it PostgreSQL?"),
        )),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Upstream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Upstream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        startup_message(params)
    }

    fn request(code: u32) -> Vec<u8> {
        [8u32.to_be_bytes(), code.to_be_bytes()].concat()
    }

    async fn run(input: Vec<u8>) -> (Result<ClientStartup, StartupError>, Vec<u8>) {
        let (mut client, mut tunnel) = tokio::io::duplex(64 * 1024);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let result = read_client_startup(&mut tunnel).await;
        drop(tunnel);
        let mut answers = Vec::new();
        client.read_to_end(&mut answers).await.unwrap();
        (result, answers)
    }

    #[tokio::test]
    async fn startup_message_is_read_whole() {
        let msg = startup(&[("user", "app"), ("database", "db")]);
        let (result, answers) = run(msg.clone()).await;
        let s = result.unwrap();
        assert_eq!(s.kind, StartupKind::Startup);
        assert_eq!(s.message, msg);
        assert_eq!(s.parameters(), vec![("user", "app"), ("database", "db")]);
        assert!(answers.is_empty(), "nothing is answered to a plain startup");
    }

    #[tokio::test]
    async fn ssl_and_gssenc_requests_are_answered_n_locally() {
        let msg = startup(&[("user", "app")]);
        let input = [request(GSSENC_REQUEST_CODE), request(SSL_REQUEST_CODE), msg.clone()].concat();
        let (result, answers) = run(input).await;
        assert_eq!(result.unwrap().message, msg);
        assert_eq!(answers, b"NN");
    }

    #[tokio::test]
    async fn cancel_request_is_passed_through() {
        let cancel = [
            16u32.to_be_bytes(),
            CANCEL_REQUEST_CODE.to_be_bytes(),
            7u32.to_be_bytes(),
            9u32.to_be_bytes(),
        ]
        .concat();
        let (result, _) = run(cancel.clone()).await;
        let s = result.unwrap();
        assert_eq!((s.kind.clone(), s.message.clone()), (StartupKind::Cancel, cancel));
        assert!(s.parameters().is_empty());
    }

    #[tokio::test]
    async fn protocol_violations_are_named() {
        let (r, _) = run([0u32.to_be_bytes(), 0u32.to_be_bytes()].concat()).await;
        assert!(matches!(r, Err(StartupError::Protocol(m)) if m.contains("length 0")));
        let (r, _) = run([9999u32.to_be_bytes(), (2u32 << 16).to_be_bytes()].concat()).await;
        assert!(matches!(r, Err(StartupError::Protocol(m)) if m.contains("protocol 2.0")));
        let (r, _) = run([12u32.to_be_bytes(), CANCEL_REQUEST_CODE.to_be_bytes()].concat()).await;
        assert!(matches!(r, Err(StartupError::Protocol(m)) if m.contains("cancel")));
        let (r, answers) = run([
            request(SSL_REQUEST_CODE),
            request(SSL_REQUEST_CODE),
            request(SSL_REQUEST_CODE),
        ]
        .concat())
        .await;
        assert!(matches!(r, Err(StartupError::Protocol(m)) if m.contains("too many")));
        assert_eq!(answers, b"NNN");
        let (r, _) = run(vec![0, 0, 0]).await;
        assert!(matches!(r, Err(StartupError::Io(_))));
    }

    #[test]
    fn error_response_bytes() {
        let bytes = error_response("08001", "no TLS", Some("d"), Some("r"));
        let body = b"SFATAL\0VFATAL\0C08001\0Mno TLS\0Dd\0Rr\0\0";
        let mut expected = vec![b'E'];
        expected.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        expected.extend_from_slice(body);
        assert_eq!(bytes, expected);
        // A NUL in the message cannot end the field early.
        let bytes = error_response("08006", "a\0b", None, None);
        assert!(bytes.windows(4).any(|w| w == b"Mab\0"));
        let fields = error_fields(&error_response("08001", "m", None, Some("r"))).unwrap();
        assert!(fields.contains(&(b'C', "08001".into())) && fields.contains(&(b'R', "r".into())));
        assert_eq!(error_fields(b"R\0\0\0\x08\0\0\0\0"), None);
    }

    fn sasl(mechanisms: &[&str]) -> Vec<u8> {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        for m in mechanisms {
            body.extend_from_slice(m.as_bytes());
            body.push(0);
        }
        body.push(0);
        [vec![b'R'], ((body.len() + 4) as u32).to_be_bytes().to_vec(), body].concat()
    }

    #[tokio::test]
    async fn channel_binding_is_not_offered_to_the_local_client() {
        let offer = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let mut input = offer.clone();
        input.extend_from_slice(b"next message untouched");
        let mut reader = &input[..];
        let first = read_first_server_message(&mut reader).await.unwrap();
        assert_eq!(first, sasl(&["SCRAM-SHA-256"]));
        assert_eq!(reader, b"next message untouched", "only the first message is read");
        // Anything else passes as it is.
        let error = error_response("28000", "no", None, None);
        assert_eq!(without_channel_binding(error.clone()), error);
        let md5 = [b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4].to_vec();
        assert_eq!(without_channel_binding(md5.clone()), md5);
        let mut bad = &[b'R', 0, 0, 0, 2][..];
        assert!(read_first_server_message(&mut bad).await.is_err());
    }

    #[test]
    fn ssl_request_bytes() {
        assert_eq!(ssl_request(), [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    }
}
