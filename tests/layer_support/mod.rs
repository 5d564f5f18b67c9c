//! Shared helpers of the layer tests: real PostgreSQL behind a real sshd, a manager over the
//! tunnel, a served axum app, a raw HTTP/1.1 client, and a tracing capture.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::BackoffPolicy;
use sea_orm_tunnel::manager::HealthStatus;
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres, fast_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A liveness bound, not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// PostgreSQL reached through OpenSSH sshd.
pub struct Servers {
    pub pg: TempPostgres,
    pub sshd: OpenSshd,
}

impl Servers {
    pub async fn start() -> Servers {
        let (pg, sshd) = tokio::join!(TempPostgres::start(), OpenSshd::start());
        Servers {
            pg: pg.expect("PostgreSQL starts"),
            sshd: sshd.expect("sshd starts"),
        }
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

/// Waits until the health watch satisfies `pred`.
pub async fn wait_health(manager: &ConnectionManager, what: &str, pred: impl FnMut(&HealthStatus) -> bool) {
    let mut rx: watch::Receiver<HealthStatus> = manager.health();
    if tokio::time::timeout(PATIENCE, rx.wait_for(pred)).await.is_err() {
        panic!("not {what} after {PATIENCE:?}; last: {:?}", *rx.borrow());
    }
}

/// A served app, stopped when dropped.
pub struct Served {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` (an axum router or a `ServiceBuilder` stack around one) on a free loopback port.
pub async fn serve<S>(app: S) -> Served
where
    S: tower::Service<axum::extract::Request, Response = axum::response::Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let make_service = axum::ServiceExt::<axum::extract::Request>::into_make_service(app);
        axum::serve(listener, make_service).await.unwrap();
    });
    Served { addr, task }
}

/// One HTTP/1.1 exchange.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the whole answer.
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the app");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read the response");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse { status, headers, body }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// Polls `f` until it returns true (up to [`PATIENCE`]).
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    sea_orm_tunnel::testkit::eventually(what, PATIENCE, f).await
}

// ---- tracing capture -------------------------------------------------------------------------

/// One captured event: its target, its own fields, and the `correlation_id` of the innermost
/// span that has one.
#[derive(Debug, Clone)]
pub struct Captured {
    pub target: String,
    pub fields: HashMap<String, String>,
    pub span_correlation_id: Option<String>,
}

impl Captured {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// A tracing layer keeping every event; install it with `tracing::subscriber::set_default`
/// (current-thread runtime, so the server's tasks run on the test's thread).
#[derive(Clone, Default)]
pub struct Capture {
    events: Arc<Mutex<Vec<Captured>>>,
}

impl Capture {
    pub fn events(&self) -> Vec<Captured> {
        self.events.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

struct SpanCorrelation(String);

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(value), Some(span)) = (fields.0.remove("correlation_id"), ctx.span(id)) {
            span.extensions_mut().insert(SpanCorrelation(value));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let span_correlation_id = ctx.event_scope(event).and_then(|scope| {
            scope
                .into_iter()
                .find_map(|span| span.extensions().get::<SpanCorrelation>().map(|c| c.0.clone()))
        });
        self.events.lock().unwrap().push(Captured {
            target: event.metadata().target().to_owned(),
            fields: fields.0,
            span_correlation_id,
        });
    }
}
