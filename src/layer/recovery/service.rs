use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt as _, Limited};
use tower_service::Service;

use super::RecoveryLayer;
use super::body::RecoveryBody;
use super::future::ResponseFuture;
use super::health::Availability;
use super::layer::{Settings, Shared};
use crate::layer::{DB_REQUESTS_RETRIED_TOTAL, DB_REQUESTS_SHED_TOTAL, Idempotent, TARGET_LAYER, TransientDbFailure};
use crate::observe::metrics::{DEFAULT_POOL, POOL_LABEL};

/// Middleware that waits out or sheds requests while the database recovers, and retries
/// idempotent requests that failed transiently. See the [module docs](super).
pub struct Recovery<S> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
}

impl<S> Recovery<S> {
    /// The layer that wraps services in this middleware.
    pub fn layer(manager: crate::manager::ConnectionManager) -> RecoveryLayer {
        RecoveryLayer::new(manager)
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

impl<S: Clone> Clone for Recovery<S> {
    fn clone(&self) -> Self {
        Recovery {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Recovery<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Recovery<S>
where
    S: Service<Request<RecoveryBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<crate::error::BoxError>,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never waits for the database here: that is decided per request in `call`.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let settings = &self.shared.settings;
        let grpc = crate::layer::is_grpc(&request);
        let availability = self.shared.health.availability();
        match availability {
            Availability::ShuttingDown => {
                return ResponseFuture::ready(Ok(shed(grpc, settings, ShedReason::ShuttingDown)));
            }
            Availability::Failed => return ResponseFuture::ready(Ok(shed(grpc, settings, ShedReason::Failed))),
            Availability::Ready | Availability::Recovering => {}
        }
        let retryable = settings.retry.is_some() && is_idempotent(&request) && fits(&request, settings);
        if availability == Availability::Ready && !retryable {
            return ResponseFuture::inner(self.inner.call(request.map(RecoveryBody::new)));
        }
        // The service made ready by `poll_ready` goes with the request; `self` keeps a fresh
        // clone (axum's middleware pattern).
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::boxed(Box::pin(recover(
            service,
            shared,
            request,
            availability,
            retryable,
            grpc,
        )))
    }
}

/// The slow path: wait for recovery, then call once, or buffer the body and retry.
async fn recover<S, ReqBody, ResBody>(
    mut service: S,
    shared: Arc<Shared>,
    request: Request<ReqBody>,
    availability: Availability,
    retryable: bool,
    grpc: bool,
) -> Result<Response<ResBody>, S::Error>
where
    S: Service<Request<RecoveryBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<crate::error::BoxError>,
    ResBody: Default,
{
    let settings = &shared.settings;
    if availability != Availability::Ready
        && let Err(reason) = wait_until_ready(&shared).await
    {
        return Ok(shed(grpc, settings, reason));
    }
    if !retryable {
        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
        return service.call(request.map(RecoveryBody::new)).await;
    }

    let (parts, body) = request.into_parts();
    let Ok(collected) = Limited::new(body, settings.max_buffered_body as usize).collect().await else {
        // The client's body failed (or lied about its length): nothing can be served.
        return Ok(bad_request(grpc));
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let mut delays = settings.retry.as_ref().map(|p| p.delays());
    let mut attempt = 0u32;
    loop {
        let retry = Request::from_parts(parts.clone(), RecoveryBody::buffered(data.clone(), trailers.clone()));
        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
        let response = service.call(retry).await?;
        if response.extensions().get::<TransientDbFailure>().is_none() {
            return Ok(response);
        }
        let Some(delay) = delays.as_mut().and_then(Iterator::next) else {
            return Ok(response);
        };
        drop(response);
        attempt += 1;
        tracing::info!(
            target: TARGET_LAYER,
            method = %parts.method,
            path = %parts.uri.path(),
            attempt,
            delay_ms = delay.as_millis() as u64,
            "retrying an idempotent request after a transient database failure"
        );
        metrics::counter!(DB_REQUESTS_RETRIED_TOTAL, POOL_LABEL => DEFAULT_POOL).increment(1);
        tokio::time::sleep(delay).await;
        if let Err(reason) = wait_until_ready(&shared).await {
            return Ok(shed(grpc, settings, reason));
        }
    }
}

/// Waits up to `max_wait` for the database to be healthy.
async fn wait_until_ready(shared: &Shared) -> Result<(), ShedReason> {
    let availability = match shared.health.availability() {
        Availability::Recovering if !shared.settings.max_wait.is_zero() => {
            shared.health.wait(shared.settings.max_wait).await
        }
        other => other,
    };
    match availability {
        Availability::Ready => Ok(()),
        Availability::Recovering => Err(ShedReason::Recovering),
        Availability::ShuttingDown => Err(ShedReason::ShuttingDown),
        Availability::Failed => Err(ShedReason::Failed),
    }
}

fn is_idempotent<B>(request: &Request<B>) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || request.extensions().get::<Idempotent>().is_some()
}

/// Whether the body can be buffered: its length is known and small enough.
fn fits<B: Body>(request: &Request<B>, settings: &Settings) -> bool {
    request
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= settings.max_buffered_body)
}

#[derive(Debug, Clone, Copy)]
enum ShedReason {
    Recovering,
    ShuttingDown,
    Failed,
}

impl ShedReason {
    fn as_str(self) -> &'static str {
        match self {
            ShedReason::Recovering => "recovering",
            ShedReason::ShuttingDown => "shutting_down",
            ShedReason::Failed => "failed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            ShedReason::Recovering => "database unavailable: recovering, retry later",
            ShedReason::ShuttingDown => "database unavailable: the service is shutting down",
            ShedReason::Failed => "database unavailable: the SSH tunnel failed permanently (see the service log)",
        }
    }
}

/// The answer to a request the handler never sees: `503` + `Retry-After`, or for gRPC a
/// trailers-only `UNAVAILABLE` (HTTP 200, `grpc-status: 14`) with a retry pushback.
fn shed<B: Default>(grpc: bool, settings: &Settings, reason: ShedReason) -> Response<B> {
    tracing::warn!(
        target: TARGET_LAYER,
        reason = reason.as_str(),
        max_wait_ms = settings.max_wait.as_millis() as u64,
        "request shed: {}",
        reason.message()
    );
    metrics::counter!(DB_REQUESTS_SHED_TOTAL, POOL_LABEL => DEFAULT_POOL, "reason" => reason.as_str()).increment(1);
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    if grpc {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        headers.insert("grpc-message", HeaderValue::from_static(reason.message()));
        let pushback = Duration::from_secs(settings.retry_after_secs).as_millis() as u64;
        headers.insert("grpc-retry-pushback-ms", HeaderValue::from(pushback));
    } else {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(settings.retry_after_secs));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    response
}

fn bad_request<B: Default>(grpc: bool) -> Response<B> {
    let mut response = Response::new(B::default());
    if grpc {
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("request body could not be read"),
        );
    } else {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    response
}
