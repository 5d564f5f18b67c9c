//! Run with: cargo run --example tonic_app
//!
//! A gRPC service (tonic) on a managed connection: `demo.Database` from `database.proto` with
//! `Health` (the manager's health) and `Now` (`SELECT now()` through SeaORM).
//!
//! Configuration comes from the environment (and `.env.local` / `.env` when present), see the
//! README's table. At least `DATABASE_URL`; add `SSH_HOST`, `SSH_USER` and a key (`SSH_KEY_PATH`,
//! default `~/.ssh/id_ed25519`, or the agent) to go through a bastion. Besides:
//!
//! - `GRPC_ADDR`: where to listen, default `127.0.0.1:50051`;
//! - `RUST_LOG`: log filter, default `info`. Logs are JSON lines carrying each call's
//!   `correlation_id` (the `x-request-id` metadata, or a generated id echoed back).
//!
//! While the database recovers, calls wait up to 3 s and then get `UNAVAILABLE` without reaching
//! the handlers. Ctrl-C or SIGTERM stops the server, then shuts the manager down. A bad
//! configuration exits with status 2 and says which variable is wrong.
//!
//! Try it with grpcurl (the server has no reflection, so pass the proto):
//!
//! ```text
//! grpcurl -plaintext -import-path examples/tonic_app -proto database.proto \
//!     -H 'x-request-id: try-1' 127.0.0.1:50051 demo.Database/Now
//! ```

mod proto;

#[path = "../support/logging.rs"]
mod logging;

use std::net::SocketAddr;
use std::process::ExitCode;

use proto::{Database, DatabaseServer, HealthReply, HealthRequest, NowReply, NowRequest};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use sea_orm_tunnel::layer::{CorrelationId, InjectDatabaseLayer, RecoveryLayer};
use sea_orm_tunnel::{ConnectionManager, Error};
use tonic::{Request, Response, Status};

/// The handlers. They hold nothing: the layers put the connection, the manager and the
/// correlation id into every request's extensions.
struct Handlers;

/// The connection [`InjectDatabaseLayer`] put into the request.
fn database<T>(request: &Request<T>) -> Result<&DatabaseConnection, Status> {
    request
        .extensions()
        .get::<DatabaseConnection>()
        .ok_or_else(|| Status::internal("InjectDatabaseLayer is missing"))
}

impl Database for Handlers {
    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        let manager = request
            .extensions()
            .get::<ConnectionManager>()
            .ok_or_else(|| Status::internal("InjectDatabaseLayer is missing"))?;
        let status = manager.status();
        Ok(Response::new(HealthReply {
            healthy: status.healthy,
            tunnel: status.tunnel.to_string(),
            database: status.database,
            pool_size: status.pool_size,
            idle: status.idle,
            error: status.error.unwrap_or_default(),
        }))
    }

    async fn now(&self, request: Request<NowRequest>) -> Result<Response<NowReply>, Status> {
        let db = database(&request)?;
        let correlation_id = request.extensions().get::<CorrelationId>().map(ToString::to_string);
        // `Error` converts into the right status: UNAVAILABLE for a lost tunnel, DEADLINE_EXCEEDED
        // for a pool timeout, INTERNAL for an SQL error.
        let row = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT now()::text"))
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Status::internal("SELECT now() returned no row"))?;
        let now: String = row.try_get_by_index(0).map_err(Error::from)?;
        tracing::info!(%now, "queried the time");
        Ok(Response::new(NowReply {
            now,
            correlation_id: correlation_id.unwrap_or_default(),
        }))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    logging::init();

    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("tonic_app: {message}");
            tracing::error!(error = %message, "tonic_app failed");
            ExitCode::from(code)
        }
    }
}

async fn run() -> Result<(), (u8, String)> {
    let addr: SocketAddr = std::env::var("GRPC_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:50051".to_owned())
        .parse()
        .map_err(|e| {
            (
                2,
                format!("invalid configuration: GRPC_ADDR: not a socket address: {e}"),
            )
        })?;

    let manager = ConnectionManager::from_env().await.map_err(|e| match e {
        e @ Error::Config { .. } => (2, e.to_string()),
        e => (1, format!("could not start: {e}")),
    })?;

    tracing::info!(%addr, "listening");
    let served = tonic::transport::Server::builder()
        // Outermost first: the inject layer's span and id cover shed calls too.
        .layer(InjectDatabaseLayer::new(manager.clone()))
        .layer(RecoveryLayer::new(manager.clone()))
        .add_service(DatabaseServer::new(Handlers))
        .serve_with_shutdown(addr, shutdown_signal())
        .await;

    let report = manager.shutdown_default().await;
    tracing::info!(
        drained = report.drained,
        forced = report.forced,
        "database connections closed"
    );
    served.map_err(|e| (1, format!("serving on {addr}: {e}")))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
