//! The layers in a real tonic server on loopback (`Server::builder().layer(..)`), with a manager
//! reaching a real PostgreSQL through a real OpenSSH sshd: handlers read the connection from the
//! request's extensions, calls get `UNAVAILABLE` without reaching the handler while PostgreSQL is
//! down or the manager shuts down, and succeed again after a restart.

#[path = "../../examples/tonic_app/proto.rs"]
mod proto;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::support::*;
use proto::{Database, DatabaseClient, DatabaseServer, HealthReply, HealthRequest, NowReply, NowRequest};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::layer::{CorrelationId, InjectDatabaseLayer, RecoveryLayer};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

/// The service under test: reads everything from the request's extensions.
struct Handlers {
    calls: Arc<AtomicUsize>,
}

/// What `InjectDatabaseLayer` put into the request.
fn injected<T: Send + Sync + 'static, B>(request: &Request<B>) -> Result<&T, Status> {
    request
        .extensions()
        .get::<T>()
        .ok_or_else(|| Status::internal("InjectDatabaseLayer is missing"))
}

impl Database for Handlers {
    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        let status = injected::<ConnectionManager, _>(&request)?.status();
        Ok(Response::new(HealthReply {
            healthy: status.healthy,
            ..Default::default()
        }))
    }

    async fn now(&self, request: Request<NowRequest>) -> Result<Response<NowReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let db = injected::<DatabaseConnection, _>(&request)?;
        let id = request.extensions().get::<CorrelationId>().map(|id| id.to_string());
        let row = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT now()::text"))
            .await
            .map_err(sea_orm_tunnel::Error::from)?
            .ok_or_else(|| Status::internal("no row"))?;
        let now: String = row.try_get_by_index(0).map_err(sea_orm_tunnel::Error::from)?;
        Ok(Response::new(NowReply {
            now,
            correlation_id: id.unwrap_or_default(),
        }))
    }
}

struct GrpcApp {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_grpc(manager: &ConnectionManager, max_wait: Duration) -> GrpcApp {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Server::builder()
        .layer(InjectDatabaseLayer::new(manager.clone()))
        .layer(RecoveryLayer::new(manager.clone()).max_wait(max_wait))
        .add_service(DatabaseServer::new(Handlers { calls: calls.clone() }));
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });
    GrpcApp { addr, calls, task }
}

async fn client(app: &GrpcApp) -> DatabaseClient {
    DatabaseClient::connect(format!("http://{}", app.addr)).await.unwrap()
}

fn with_request_id<T>(message: T, id: &'static str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-request-id", id.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_handler_gets_the_connection_and_the_correlation_id() {
    let servers = Servers::start().await;
    let manager = servers.manager("grpc-ok").await;
    let app = serve_grpc(&manager, Duration::from_secs(1)).await;
    let mut client = client(&app).await;

    let response = client.now(with_request_id(NowRequest {}, "grpc-req-7")).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "grpc-req-7");
    let reply = response.into_inner();
    assert!(
        reply.now.starts_with("20"),
        "a timestamp from PostgreSQL: {:?}",
        reply.now
    );
    assert_eq!(reply.correlation_id, "grpc-req-7");

    let health = client.health(HealthRequest {}).await.unwrap().into_inner();
    assert!(health.healthy);
    assert_eq!(app.calls.load(Ordering::SeqCst), 1);
    manager.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_get_unavailable_without_the_handler_while_postgres_is_down_and_succeed_after_restart() {
    let servers = Servers::start().await;
    let manager = servers.manager("grpc-down").await;
    let max_wait = Duration::from_secs(1);
    let app = serve_grpc(&manager, max_wait).await;
    let mut client = client(&app).await;
    client.now(NowRequest {}).await.expect("healthy at first");

    servers.pg.stop().await.unwrap();
    wait_health(&mut manager.health(), "unhealthy", |s| !s.healthy).await;
    let before = app.calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        let started = Instant::now();
        let status = client.now(NowRequest {}).await.expect_err("shed");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < max_wait + Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        app.calls.load(Ordering::SeqCst),
        before,
        "the handler is not called while unhealthy"
    );

    servers.pg.start_again().await.unwrap();
    eventually("served again after the restart", || {
        let mut client = client.clone();
        async move { client.now(NowRequest {}).await.is_ok() }
    })
    .await;

    // A manager that is shutting down sheds at once, whatever max_wait is.
    let shutdown = manager.clone();
    let shutting = tokio::spawn(async move { shutdown.shutdown(Duration::from_secs(5)).await });
    eventually("shutting down", || async { manager.is_shutting_down() }).await;
    let status = client.now(NowRequest {}).await.expect_err("shed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    shutting.await.unwrap();
}
