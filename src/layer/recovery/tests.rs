//! The layer's decisions, against a fake inner service and a health watch the test drives.
//! (The integration tests run it against real servers.)

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::watch;
use tower::{Service, ServiceBuilder, ServiceExt as _};

use super::health::WatchHealth;
use super::{RecoveryBody, RecoveryLayer};
use crate::config::BackoffPolicy;
use crate::layer::{Idempotent, TransientDbFailure};

/// A driven health source: `health.send(false)` makes the database "recover".
struct Harness {
    health: watch::Sender<bool>,
    shutting_down: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    layer: RecoveryLayer,
}

fn harness(healthy: bool) -> Harness {
    let (health, rx) = watch::channel(healthy);
    let shutting_down = Arc::new(AtomicBool::new(false));
    let flag = shutting_down.clone();
    let failed = Arc::new(AtomicBool::new(false));
    let failed_flag = failed.clone();
    let signal = WatchHealth::new(rx, |h: &bool| *h, move || flag.load(Ordering::SeqCst))
        .with_failed(move || failed_flag.load(Ordering::SeqCst));
    let policy = BackoffPolicy::new(Duration::from_millis(10)).jitter(0.0).max_retries(3);
    let layer = RecoveryLayer::from_signal(Arc::new(signal), policy).max_wait(Duration::from_millis(300));
    Harness {
        health,
        shutting_down,
        failed,
        layer,
    }
}

impl Harness {
    /// The layer with a wait far longer than any test: only an event ends it.
    fn patient(&self) -> RecoveryLayer {
        self.layer.clone().max_wait(Duration::from_secs(60))
    }
}

type ReqBody = Full<Bytes>;

/// An inner service that records each call's body and marks the first `fail` responses as
/// transient database failures.
#[derive(Clone)]
struct Fake {
    calls: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<Bytes>>>,
    fail: usize,
}

impl Fake {
    fn new(fail: usize) -> Self {
        Fake {
            calls: Arc::default(),
            bodies: Arc::default(),
            fail,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<Request<RecoveryBody<ReqBody>>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let fake = self.clone();
        tower::service_fn(move |request: Request<RecoveryBody<ReqBody>>| {
            let fake = fake.clone();
            async move {
                let n = fake.calls.fetch_add(1, Ordering::SeqCst);
                let body = request.into_body().collect().await.unwrap().to_bytes();
                fake.bodies.lock().unwrap().push(body);
                if n < fake.fail {
                    let mut response = Response::new(Full::from("transient"));
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    response.extensions_mut().insert(TransientDbFailure);
                    Ok::<_, Infallible>(response)
                } else {
                    Ok(Response::new(Full::from("ok")))
                }
            }
        })
    }
}

fn request(method: Method, body: &'static str) -> Request<ReqBody> {
    Request::builder()
        .method(method)
        .uri("/x")
        .body(Full::from(body))
        .unwrap()
}

fn grpc_request() -> Request<ReqBody> {
    Request::post("/pkg.Svc/Get")
        .header("content-type", "application/grpc+proto")
        .body(Full::default())
        .unwrap()
}

async fn body_text(response: Response<Full<Bytes>>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn healthy_requests_pass_through() {
    let h = harness(true);
    let fake = Fake::new(0);
    let service = ServiceBuilder::new().layer(h.layer.clone()).service(fake.service());
    let response = service.oneshot(request(Method::POST, "hello")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await, "ok");
    assert_eq!(fake.calls(), 1);
    assert_eq!(fake.bodies.lock().unwrap()[0], "hello");
}

#[tokio::test]
async fn recovering_past_max_wait_is_shed_with_retry_after_and_the_handler_is_not_called() {
    let h = harness(false);
    let fake = Fake::new(0);
    let service = h
        .layer
        .clone()
        .retry_after(Duration::from_millis(1500))
        .layer_service(fake.service());
    let started = Instant::now();
    let response = service.oneshot(request(Method::GET, "")).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "2", "1.5 s rounds up");
    assert_eq!(fake.calls(), 0);
    assert!(waited >= Duration::from_millis(290), "waited only {waited:?}");
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

#[tokio::test]
async fn a_request_waits_for_recovery_and_then_runs() {
    let h = harness(false);
    let fake = Fake::new(0);
    let service = h
        .layer
        .clone()
        .max_wait(Duration::from_secs(30))
        .layer_service(fake.service());
    let pending = tokio::spawn(service.oneshot(request(Method::POST, "body")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.calls(), 0, "must not be called while recovering");
    h.health.send(true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("woken by the health watch")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn shutting_down_is_shed_at_once() {
    let h = harness(true);
    h.shutting_down.store(true, Ordering::SeqCst);
    let fake = Fake::new(0);
    let service = h
        .layer
        .clone()
        .max_wait(Duration::from_secs(30))
        .layer_service(fake.service());
    let response = tokio::time::timeout(Duration::from_secs(5), service.oneshot(request(Method::GET, "")))
        .await
        .expect("not waiting")
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn a_permanent_failure_is_shed_at_once_and_during_a_wait() {
    let h = harness(false);
    let fake = Fake::new(0);
    let service = h.patient().layer_service(fake.service());
    // Unhealthy and waiting; then the tunnel fails for good (e.g. a changed host key).
    let pending = tokio::spawn(service.clone().oneshot(request(Method::GET, "")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.failed.store(true, Ordering::SeqCst);
    h.health.send(false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the wait ends when the failure is known")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A new request is answered without waiting at all.
    let response = tokio::time::timeout(Duration::from_secs(1), service.oneshot(request(Method::GET, "")))
        .await
        .expect("not waiting")
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn shutdown_during_the_wait_sheds_without_waiting_it_out() {
    let h = harness(false);
    let fake = Fake::new(0);
    let service = h.patient().layer_service(fake.service());
    let pending = tokio::spawn(service.oneshot(request(Method::GET, "")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.shutting_down.store(true, Ordering::SeqCst);
    // The manager publishes an unhealthy status when it shuts down.
    h.health.send(false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn grpc_calls_are_shed_with_unavailable() {
    let h = harness(false);
    let fake = Fake::new(0);
    let service = h.layer.clone().max_wait(Duration::ZERO).layer_service(fake.service());
    let response = service.oneshot(grpc_request()).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "gRPC errors travel as trailers-only responses"
    );
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert!(response.headers().contains_key("grpc-message"));
    assert_eq!(response.headers()["grpc-retry-pushback-ms"], "2000");
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn an_idempotent_request_is_retried_with_its_body() {
    let h = harness(true);
    let fake = Fake::new(2);
    let service = h.layer.clone().layer_service(fake.service());
    let response = service.oneshot(request(Method::PUT, "payload")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.calls(), 3);
    assert!(fake.bodies.lock().unwrap().iter().all(|b| b == "payload"));
}

#[tokio::test]
async fn a_post_is_never_retried() {
    let h = harness(true);
    let fake = Fake::new(1);
    let service = h.layer.clone().layer_service(fake.service());
    let response = service.oneshot(request(Method::POST, "payload")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.extensions().get::<TransientDbFailure>().is_some());
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn a_post_marked_idempotent_is_retried() {
    let h = harness(true);
    let fake = Fake::new(1);
    let service = h.layer.clone().layer_service(fake.service());
    let mut request = request(Method::POST, "payload");
    request.extensions_mut().insert(Idempotent);
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn retries_stop_at_the_policy_limit() {
    let h = harness(true);
    let fake = Fake::new(100);
    let service = h.layer.clone().layer_service(fake.service());
    let response = service.oneshot(request(Method::GET, "")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_text(response).await, "transient");
    assert_eq!(fake.calls(), 4, "the first call and max_retries = 3 retries");
}

#[tokio::test]
async fn large_bodies_and_disabled_retries_are_not_retried() {
    let h = harness(true);
    let fake = Fake::new(100);
    let service = h.layer.clone().max_buffered_body(4).layer_service(fake.service());
    let response = service
        .oneshot(request(Method::PUT, "more than four bytes"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fake.calls(), 1);
    assert_eq!(fake.bodies.lock().unwrap()[0], "more than four bytes");

    let fake = Fake::new(100);
    let service = h.layer.clone().without_retries().layer_service(fake.service());
    service.oneshot(request(Method::GET, "")).await.unwrap();
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn poll_ready_does_not_wait_for_the_database() {
    let h = harness(false);
    let fake = Fake::new(0);
    let mut service = h.patient().layer_service(fake.service());
    tokio::time::timeout(Duration::from_secs(1), service.ready())
        .await
        .expect("poll_ready forwards to the inner service only")
        .unwrap();
}

#[test]
fn retry_after_rounds_up_to_whole_seconds() {
    let h = harness(true);
    let secs = |d| h.layer.clone().retry_after(d).shared.settings.retry_after_secs;
    assert_eq!(secs(Duration::ZERO), 1);
    assert_eq!(secs(Duration::from_millis(1)), 1);
    assert_eq!(secs(Duration::from_secs(3)), 3);
    assert_eq!(secs(Duration::from_millis(3001)), 4);
}

/// `layer.layer(service)` reads badly next to `tower::Layer`; this names it.
trait LayerService {
    fn layer_service<S>(self, service: S) -> super::Recovery<S>;
}

impl LayerService for RecoveryLayer {
    fn layer_service<S>(self, service: S) -> super::Recovery<S> {
        tower::Layer::layer(&self, service)
    }
}
