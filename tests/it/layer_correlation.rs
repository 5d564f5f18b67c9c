//! Every event of a request carries its correlation id: the handler's own events (through the
//! request span) and the manager's connection events (through the task-local id), with a real
//! axum server, PostgreSQL and OpenSSH sshd.
//!
//! One test alone in its binary: it captures events with a thread-local subscriber, and
//! tracing's per-callsite interest cache is shared by every thread of the process, so another
//! test hitting the same callsites at the same moment could make this one miss events.

use std::sync::Arc;
use std::time::Duration;

use super::support::*;
use sea_orm_tunnel::layer::{InjectDatabaseLayer, RecoveryLayer};
use tracing_subscriber::layer::SubscriberExt as _;

#[tokio::test(flavor = "current_thread")]
async fn handler_gets_the_connection_and_the_requests_events_carry_its_correlation_id() {
    // Current-thread runtime: the server's tasks run on this thread, under this subscriber.
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));

    let servers = Servers::start().await;
    let manager = servers.manager("axum-corr").await;
    let app = now_app(Arc::default())
        .layer(RecoveryLayer::new(manager.clone()))
        .layer(InjectDatabaseLayer::new(manager.clone()));
    let served = serve(app).await;

    capture.clear();
    let response = http(served.addr, "GET", "/now", &[("x-request-id", "req-axum-42")], "").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response.body.starts_with("20"),
        "a timestamp from PostgreSQL: {:?}",
        response.body
    );
    assert_eq!(response.header("x-request-id"), Some("req-axum-42"));

    let events = capture.events();
    let handler = events
        .iter()
        .find(|e| e.field("message") == Some("handling /now"))
        .unwrap_or_else(|| panic!("the handler's event in {events:#?}"));
    assert_eq!(handler.span_correlation_id.as_deref(), Some("req-axum-42"));
    let acquired: Vec<_> = events
        .iter()
        .filter(|e| e.field("event") == Some("connection_acquired"))
        .collect();
    assert!(!acquired.is_empty(), "the pool reported the acquire: {events:#?}");
    for event in &acquired {
        assert_eq!(event.field("correlation_id"), Some("req-axum-42"), "{event:?}");
    }

    // Without a header (or with an unusable one) an id is generated, echoed and used the same way.
    capture.clear();
    let response = http(served.addr, "GET", "/now", &[("x-request-id", "has space")], "").await;
    assert_eq!(response.status, 200, "{response:?}");
    let generated = response.header("x-request-id").expect("a generated id").to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let events = capture.events();
    let handler = events
        .iter()
        .find(|e| e.field("message") == Some("handling /now"))
        .unwrap();
    assert_eq!(handler.span_correlation_id.as_deref(), Some(generated.as_str()));
    assert_eq!(
        handler.field("id"),
        Some(generated.as_str()),
        "the extractor saw the same id"
    );

    drop(served);
    manager.shutdown(Duration::from_secs(5)).await;
}
