//! HTTP helpers: an app served on a free loopback port and a raw HTTP/1.1 client.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// `SELECT now()` as text on `db`.
pub async fn select_now(db: &impl sea_orm::ConnectionTrait) -> Result<String, sea_orm_tunnel::Error> {
    use sea_orm::{DbBackend, Statement};
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT now()::text"))
        .await?
        .expect("one row");
    Ok(row.try_get_by_index(0)?)
}

/// An axum app with `GET /now`: logs the request's correlation id, then `SELECT now()` on the
/// injected connection; counts its calls in `calls`.
pub fn now_app(calls: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> axum::Router {
    use axum::extract::State;
    use sea_orm_tunnel::layer::{CorrelationId, Db};
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn now(
        State(calls): State<std::sync::Arc<AtomicUsize>>,
        Db(db): Db,
        id: CorrelationId,
    ) -> Result<String, sea_orm_tunnel::Error> {
        calls.fetch_add(1, Ordering::SeqCst);
        tracing::info!(%id, "handling /now");
        select_now(&db).await
    }
    axum::Router::new()
        .route("/now", axum::routing::get(now))
        .with_state(calls)
}
