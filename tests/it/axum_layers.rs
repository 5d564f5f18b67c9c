//! The layers in a real axum server on loopback, with a manager reaching a real PostgreSQL
//! through a real OpenSSH sshd: the handler gets its connection, dropped SSH sessions and a stopped PostgreSQL are waited out or shed with
//! `503` + `Retry-After` (the handler not called), and idempotent requests are retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::support::*;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use sea_orm::ConnectionTrait;
use sea_orm_tunnel::layer::{Db, InjectDatabaseLayer, RecoveryLayer};
use sea_orm_tunnel::{ConnectionManager, Error};
use tower::ServiceBuilder;

#[tokio::test]
async fn a_missing_inject_layer_is_a_500_naming_it() {
    let app = Router::new().route("/", get(|Db(_db): Db| async { "unreachable" }));
    let served = serve(app).await;
    let response = http(served.addr, "GET", "/", &[], "").await;
    assert_eq!(response.status, 500);
    assert!(
        response
            .body
            .contains("InjectDatabaseLayer is missing: add .layer(InjectDatabaseLayer::new(manager))"),
        "{:?}",
        response.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_work_inside_a_service_builder_around_the_router() {
    let servers = Servers::start().await;
    let manager = servers.manager("axum-sb").await;
    let calls = Arc::new(AtomicUsize::new(0));
    // The whole stack as one service, served as is: the layers keep axum's request and
    // response types.
    let app = ServiceBuilder::new()
        .layer(InjectDatabaseLayer::new(manager.clone()))
        .layer(RecoveryLayer::new(manager.clone()))
        .service(now_app(calls.clone()));
    let served = serve(app).await;
    let response = http(served.addr, "GET", "/now", &[], "").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.header("x-request-id").is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    manager.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_ssh_sessions_during_a_stream_of_requests_are_waited_out_or_shed_and_then_served() {
    let servers = Servers::start().await;
    let manager = servers.manager("axum-drop").await;
    let app = now_app(Arc::default())
        .layer(RecoveryLayer::new(manager.clone()).max_wait(Duration::from_secs(2)))
        .layer(InjectDatabaseLayer::new(manager.clone()));
    let served = serve(app).await;
    let addr = served.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let response = tokio::time::timeout(PATIENCE / 2, http(addr, "GET", "/now", &[], ""))
                    .await
                    .unwrap_or_else(|_| panic!("a request hung for {:?}", PATIENCE / 2));
                outcomes.push((started, response));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut health_events = manager.subscribe_health();
    let dropped_at = Instant::now();
    let killed = tokio::task::block_in_place(|| servers.sshd.drop_sessions());
    assert!(killed > 0, "there were sessions to drop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_health(&mut manager.health(), "healthy again", |s| s.healthy).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);

    let mut saw_outage = false;
    while let Ok(event) = health_events.try_recv() {
        saw_outage |= !event.status().healthy;
    }
    assert!(saw_outage, "the manager saw the dropped sessions");

    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.expect("no request hung"));
    }
    let mut ok_after_drop = 0;
    for (started, response) in &outcomes {
        match response.status {
            200 => ok_after_drop += usize::from(*started > dropped_at),
            503 => assert!(
                response.header("retry-after").is_some(),
                "503 without Retry-After: {response:?}"
            ),
            _ => panic!("unexpected answer during the outage: {response:?}"),
        }
    }
    let shed = outcomes.iter().filter(|(_, r)| r.status == 503).count();
    eprintln!(
        "{} requests: {shed} shed (503), {ok_after_drop} served after the drop",
        outcomes.len()
    );
    assert!(ok_after_drop > 0, "requests succeed again after recovery");
    // And right now, everything is served.
    for _ in 0..3 {
        let response = http(addr, "GET", "/now", &[], "").await;
        assert_eq!(response.status, 200, "{response:?}");
    }
    manager.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_postgres_is_shed_within_max_wait_without_calling_the_handler_and_served_after_restart() {
    let servers = Servers::start().await;
    let manager = servers.manager("axum-pgstop").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let max_wait = Duration::from_secs(1);
    let app = now_app(calls.clone())
        .layer(RecoveryLayer::new(manager.clone()).max_wait(max_wait))
        .layer(InjectDatabaseLayer::new(manager.clone()));
    let served = serve(app).await;
    assert_eq!(http(served.addr, "GET", "/now", &[], "").await.status, 200);

    servers.pg.stop().await.unwrap();
    wait_health(&mut manager.health(), "unhealthy", |s| !s.healthy).await;
    let before = calls.load(Ordering::SeqCst);
    let shed = futures_join3(
        timed(http(served.addr, "GET", "/now", &[], "")),
        timed(http(served.addr, "POST", "/now", &[], "")),
        timed(http(served.addr, "GET", "/now", &[("x-request-id", "shed-1")], "")),
    )
    .await;
    for (elapsed, response) in &shed {
        // POST has no route: 405 would prove the router ran. The layer answers first.
        assert_eq!(response.status, 503, "{response:?}");
        assert_eq!(response.header("retry-after"), Some("2"));
        assert!(*elapsed < max_wait + Duration::from_secs(10), "took {elapsed:?}");
    }
    assert_eq!(
        shed[2].1.header("x-request-id"),
        Some("shed-1"),
        "shed requests keep their id"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "the handler is not called while unhealthy"
    );

    servers.pg.start_again().await.unwrap();
    eventually("served again after the restart", || async {
        http(served.addr, "GET", "/now", &[], "").await.status == 200
    })
    .await;
    assert!(calls.load(Ordering::SeqCst) > before);
    manager.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_get_with_a_transient_failure_is_retried_and_a_post_is_not() {
    let servers = Servers::start().await;
    let manager = servers.manager("axum-retry").await;

    /// Fails every other call with a real transient error: the server terminates its own
    /// backend (SQLSTATE 57P01, admin shutdown).
    async fn flaky(State(calls): State<Arc<AtomicUsize>>, manager: ConnectionManager) -> Result<String, Error> {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let db = manager.connection();
        if n % 2 == 0 {
            db.execute_unprepared("SELECT pg_terminate_backend(pg_backend_pid())")
                .await?;
            panic!("the backend was terminated, the statement cannot succeed");
        }
        select_now(db).await
    }
    let get_calls = Arc::new(AtomicUsize::new(0));
    let post_calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/get", get(flaky).with_state(get_calls.clone()))
        .route("/post", axum::routing::post(flaky).with_state(post_calls.clone()))
        .layer(RecoveryLayer::new(manager.clone()))
        .layer(InjectDatabaseLayer::new(manager.clone()));
    let served = serve(app).await;

    let response = http(served.addr, "GET", "/get", &[], "").await;
    assert_eq!(
        response.status, 200,
        "the GET was retried after its transient failure: {response:?}"
    );
    assert_eq!(get_calls.load(Ordering::SeqCst), 2);

    let response = http(served.addr, "POST", "/post", &[], "{}").await;
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(
        !response.body.contains("57P01"),
        "no details in the body: {:?}",
        response.body
    );
    assert_eq!(post_calls.load(Ordering::SeqCst), 1, "a POST is never retried");
    manager.shutdown(Duration::from_secs(5)).await;
}

async fn timed<F: std::future::Future>(f: F) -> (Duration, F::Output) {
    let started = Instant::now();
    let out = f.await;
    (started.elapsed(), out)
}

async fn futures_join3<T>(
    a: impl std::future::Future<Output = T>,
    b: impl std::future::Future<Output = T>,
    c: impl std::future::Future<Output = T>,
) -> [T; 3] {
    let (a, b, c) = tokio::join!(a, b, c);
    [a, b, c]
}
