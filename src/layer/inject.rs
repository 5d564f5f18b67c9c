//! Put the managed database connection into every request, and run each request in a span
//! carrying its correlation id.
//!
//! [`InjectDatabaseLayer`] inserts into the request's extensions:
//!
//! - the managed [`DatabaseConnection`] (a pool handle: clone it freely),
//! - the [`ConnectionManager`] itself (for `manager.retry(..)`, `begin()`, health),
//! - the request's [`CorrelationId`]: the `x-request-id` header when it is valid, else a
//!   generated id, which is then also set on the request's `x-request-id` header.
//!
//! The inner service runs in an INFO span `request` (target [`TARGET_LAYER`]) with the fields
//! `method`, `path` and `correlation_id`, and inside
//! [`crate::observe::events::with_correlation_id`], so the connection events
//! the request causes carry `correlation_id` themselves. The response gets the id back in
//! `x-request-id` unless the service set that header already.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use sea_orm::DatabaseConnection;
//! use sea_orm_tunnel::ConnectionManager;
//! use sea_orm_tunnel::layer::{CorrelationId, InjectDatabaseLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # async fn run(manager: ConnectionManager) -> Result<(), Infallible> {
//! let service = ServiceBuilder::new()
//!     .layer(InjectDatabaseLayer::new(manager))
//!     .service(service_fn(|request: Request<String>| async move {
//!         let _db: &DatabaseConnection = request.extensions().get().expect("injected");
//!         let id = request.extensions().get::<CorrelationId>().expect("injected");
//!         Ok::<_, Infallible>(Response::new(format!("request {id}")))
//!     }));
//!
//! let request = Request::get("/").header("x-request-id", "req-42").body(String::new()).unwrap();
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.headers()["x-request-id"], "req-42");
//! assert_eq!(response.body(), "request req-42");
//! # Ok(()) }
//! ```
//!
//! [`TARGET_LAYER`]: super::TARGET_LAYER

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use sea_orm::DatabaseConnection;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument as _;

use super::{CorrelationId, REQUEST_ID_HEADER, TARGET_LAYER};
use crate::manager::ConnectionManager;
use crate::observe::events::with_correlation_id;

/// Layer that applies [`InjectDatabase`]: puts the managed connection, the manager and a
/// [`CorrelationId`] into every request. See the [module docs](self).
#[derive(Clone)]
pub struct InjectDatabaseLayer {
    manager: ConnectionManager,
}

impl InjectDatabaseLayer {
    /// Injects `manager`'s connection into every request.
    pub fn new(manager: ConnectionManager) -> Self {
        InjectDatabaseLayer { manager }
    }
}

impl fmt::Debug for InjectDatabaseLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectDatabaseLayer")
            .field("manager", &self.manager)
            .finish()
    }
}

impl<S> Layer<S> for InjectDatabaseLayer {
    type Service = InjectDatabase<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectDatabase::new(inner, self.manager.clone())
    }
}

/// Middleware that puts the managed connection, the manager and a [`CorrelationId`] into every
/// request and runs it in a span carrying the id. See the [module docs](self).
#[derive(Clone)]
pub struct InjectDatabase<S> {
    inner: S,
    manager: ConnectionManager,
}

impl<S> InjectDatabase<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, manager: ConnectionManager) -> Self {
        InjectDatabase { inner, manager }
    }

    /// The layer that wraps services in this middleware.
    pub fn layer(manager: ConnectionManager) -> InjectDatabaseLayer {
        InjectDatabaseLayer::new(manager)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for InjectDatabase<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectDatabase")
            .field("inner", &self.inner)
            .field("manager", &self.manager)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for InjectDatabase<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let from_header = request
            .headers()
            .get(&REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(CorrelationId::parse);
        let id = match from_header {
            Some(id) => id,
            None => {
                let id = CorrelationId::generate();
                // Downstream services (and proxies we call) see the same id.
                request.headers_mut().insert(REQUEST_ID_HEADER, header_value(&id));
                id
            }
        };
        let request_id = header_value(&id);

        let extensions = request.extensions_mut();
        extensions.insert(self.manager.clone());
        extensions.insert::<DatabaseConnection>(self.manager.connection().clone());
        extensions.insert(id.clone());

        let span = tracing::info_span!(
            target: TARGET_LAYER,
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            correlation_id = %id,
        );
        // The call itself (not only the future) runs in the span: some services do their work there.
        let future = span.in_scope(|| self.inner.call(request));
        let future = with_correlation_id(id.shared(), future.instrument(span));
        // A `DbErr` turned into our `Error` while serving it is looked at for failover signals.
        let future = self.manager.failover_detector().scope(future);
        ResponseFuture {
            inner: Box::pin(future),
            request_id,
            _future: PhantomData,
        }
    }
}

fn header_value(id: &CorrelationId) -> HeaderValue {
    // A parsed id is visible ASCII and a generated one is hex and dashes: always a valid value.
    HeaderValue::from_str(id.as_str()).expect("a correlation id is visible ASCII")
}

/// Response future of [`InjectDatabase`]: sets `x-request-id` on the response.
pub struct ResponseFuture<F: Future> {
    // Boxed because the correlation-id scope is an `async fn` future without a nameable type.
    inner: Pin<Box<dyn Future<Output = F::Output> + Send>>,
    request_id: HeaderValue,
    _future: PhantomData<fn() -> F>,
}

impl<F: Future> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = match self.inner.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(response)) => response,
        };
        if !response.headers().contains_key(&REQUEST_ID_HEADER) {
            let value = self.request_id.clone();
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        Poll::Ready(Ok(response))
    }
}

/// A random UUID v4 in its text form.
pub(crate) fn generate_id() -> String {
    let mut bits = fastrand::u128(..);
    // Version 4 (random) in the high nibble of byte 6, variant 0b10 in the top bits of byte 8,
    // so log tools that recognise UUIDs do.
    bits = (bits & !(0xF << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
