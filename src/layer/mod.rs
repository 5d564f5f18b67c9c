//! Tower layers that put a [`ConnectionManager`](crate::ConnectionManager) into an axum or tonic
//! service stack.
//!
//! - [`InjectDatabaseLayer`] puts the managed [`DatabaseConnection`](sea_orm::DatabaseConnection)
//!   and the manager into every request's extensions, and runs the request in a span carrying
//!   its [`CorrelationId`] (`x-request-id`, echoed on the response) so every database event of
//!   that request carries the id.
//! - [`RecoveryLayer`] keeps requests away from a database that is recovering: it waits a bounded
//!   time for the health check to pass, then sheds the request with `503` + `Retry-After` (or gRPC
//!   `UNAVAILABLE`) without calling the handler; and it retries idempotent requests whose
//!   response is marked [`TransientDbFailure`].
//!
//! Both are generic over `http::Request<B>`, so the same layers serve axum and tonic. Neither
//! ever waits in `poll_ready`: decisions are made in `call` (axum treats services as always
//! ready).
//!
//! Put the inject layer outside the recovery layer, so shed and retried requests are logged with
//! their correlation id and still get their `x-request-id` back:
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use sea_orm::ConnectionTrait;
//! use sea_orm_tunnel::ConnectionManager;
//! use sea_orm_tunnel::layer::{Db, InjectDatabaseLayer, RecoveryLayer};
//! use tower::ServiceBuilder;
//!
//! async fn now(Db(db): Db) -> Result<String, sea_orm_tunnel::Error> {
//!     db.execute_unprepared("SELECT now()").await?;
//!     Ok("ok".to_owned())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = ConnectionManager::from_env().await?;
//! let app = Router::new().route("/now", get(now)).layer(
//!     ServiceBuilder::new()
//!         .layer(InjectDatabaseLayer::new(manager.clone()))
//!         .layer(RecoveryLayer::new(manager.clone())),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! With tonic, `Server::builder().layer(InjectDatabaseLayer::new(m.clone())).layer(RecoveryLayer::new(m))`;
//! a handler reads the connection from the request's extensions:
//!
//! ```
//! use sea_orm::DatabaseConnection;
//! use sea_orm_tunnel::layer::CorrelationId;
//!
//! fn database<T>(request: &tonic::Request<T>) -> Result<DatabaseConnection, tonic::Status> {
//!     if let Some(id) = request.extensions().get::<CorrelationId>() {
//!         tracing::debug!(correlation_id = %id, "handling");
//!     }
//!     request
//!         .extensions()
//!         .get::<DatabaseConnection>()
//!         .cloned()
//!         .ok_or_else(|| tonic::Status::internal("InjectDatabaseLayer is missing"))
//! }
//! ```

use std::fmt;
use std::sync::Arc;

use http::HeaderName;

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "tonic")]
pub mod grpc;
pub mod inject;
pub mod recovery;

#[cfg(feature = "axum")]
pub use self::axum::{Db, MissingInjectLayer};
pub use inject::{InjectDatabase, InjectDatabaseLayer};
pub use recovery::{Recovery, RecoveryLayer};

/// `x-request-id`: read by [`InjectDatabaseLayer`] and echoed on the response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Target of the events the layers emit (request spans, shed and retried requests).
pub const TARGET_LAYER: &str = "sea_orm_tunnel::layer";

pub use crate::observe::metrics::{DB_REQUESTS_RETRIED_TOTAL, DB_REQUESTS_SHED_TOTAL};

/// The id of one request, in its extensions and in the span of every event it causes.
///
/// [`InjectDatabaseLayer`] takes it from the `x-request-id` header when that is present and
/// valid (1 to 128 visible ASCII characters), and generates one otherwise (a random UUID v4).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(Arc<str>);

impl CorrelationId {
    /// The longest `x-request-id` accepted as is; a longer one is replaced by a generated id.
    pub const MAX_LEN: usize = 128;

    /// A new random id (UUID v4 text form).
    pub fn generate() -> Self {
        CorrelationId(inject::generate_id().into())
    }

    /// Uses `value` when it is 1 to [`MAX_LEN`](Self::MAX_LEN) visible ASCII characters
    /// (`!` to `~`); `None` otherwise. That keeps log lines and the echoed header sane whatever
    /// a client sends.
    pub fn parse(value: &str) -> Option<Self> {
        let ok = !value.is_empty() && value.len() <= Self::MAX_LEN && value.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| CorrelationId(value.into()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CorrelationId").field(&&*self.0).finish()
    }
}

impl AsRef<str> for CorrelationId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Response extension: the response reports a transient database failure (the tunnel dropped,
/// the pool timed out, PostgreSQL is restarting).
///
/// The crate's [`Error`](crate::Error) inserts it when converted into an axum response and
/// [`is_transient`](crate::Error::is_transient) is true; insert it yourself on a response you
/// build. [`RecoveryLayer`] retries an idempotent request whose response carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransientDbFailure;

/// Request extension: this request may be retried even though its method is not idempotent
/// (e.g. a gRPC call, always `POST`, to a read-only method).
///
/// Insert it in a layer outside [`RecoveryLayer`]:
///
/// ```
/// use sea_orm_tunnel::layer::Idempotent;
///
/// let mut request = http::Request::post("/pkg.Svc/Get").body(()).unwrap();
/// request.extensions_mut().insert(Idempotent);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Idempotent;

/// Whether a request is a gRPC call (`content-type: application/grpc`, `application/grpc+proto`, ...).
pub(crate) fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_validated() {
        assert_eq!(CorrelationId::parse("req-42").unwrap().as_str(), "req-42");
        assert!(CorrelationId::parse("").is_none());
        assert!(CorrelationId::parse("has space").is_none());
        assert!(CorrelationId::parse("bell\u{7}").is_none());
        assert!(CorrelationId::parse("é").is_none());
        assert!(CorrelationId::parse(&"x".repeat(CorrelationId::MAX_LEN)).is_some());
        assert!(CorrelationId::parse(&"x".repeat(CorrelationId::MAX_LEN + 1)).is_none());
    }

    #[test]
    fn generated_ids_are_uuid_v4_and_differ() {
        let a = CorrelationId::generate();
        let b = CorrelationId::generate();
        assert_ne!(a, b);
        let s = a.as_str();
        assert_eq!(s.len(), 36, "{s}");
        let groups: Vec<_> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert!(CorrelationId::parse(s).is_some());
    }
}
