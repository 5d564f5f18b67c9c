//! Run with: cargo run --example axum_app
//!
//! An axum service on a managed connection, the way a production service would use this crate.
//!
//! Configuration comes from the environment (and `.env.local` / `.env` when present), see the
//! README's table. At least `DATABASE_URL`; add `SSH_HOST`, `SSH_USER` and a key (`SSH_KEY_PATH`,
//! default `~/.ssh/id_ed25519`, or the agent) to go through a bastion. Besides:
//!
//! - `APP_ADDR`: where to listen, default `127.0.0.1:3000`;
//! - `RUST_LOG`: log filter, default `info`. Logs are JSON lines; every line of a request carries
//!   its `correlation_id` (the `x-request-id` header, or a generated id echoed back). The filter
//!   applies to the log only: `/metrics` has `db_connection_acquire_seconds` at any level.
//!
//! Routes:
//!
//! - `GET /health`: the manager's [`HealthStatus`] as JSON; 200 when healthy, 503 otherwise;
//! - `GET /metrics`: Prometheus text (pool, health checks, tunnel, shed and retried requests);
//! - `GET /now`: `SELECT now()` through SeaORM.
//!
//! Ctrl-C or SIGTERM stops accepting requests, lets the running ones finish, then shuts the
//! manager down (drain, close, disconnect). A bad configuration exits with status 2 and says
//! which variable is wrong.

#[path = "support/logging.rs"]
mod logging;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_tunnel::layer::{Db, InjectDatabaseLayer, RecoveryLayer};
use sea_orm_tunnel::observe::metrics::describe_metrics;
use sea_orm_tunnel::{ConnectionManager, Error, HealthStatus};

#[tokio::main]
async fn main() -> ExitCode {
    logging::init();

    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Plain text on stderr as well: the first thing someone running this sees.
            eprintln!("axum_app: {error}");
            tracing::error!(error = %error, "axum_app failed");
            match error {
                AppError::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// What can stop the app.
#[derive(Debug)]
enum AppError {
    /// The environment is wrong (a variable is missing or malformed).
    Config(Error),
    /// The database or tunnel could not be reached at startup.
    Start(Error),
    /// Binding or serving failed.
    Io(String),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Config(e) => write!(f, "{e}"),
            AppError::Start(e) => write!(f, "could not start: {e}"),
            AppError::Io(e) => f.write_str(e),
        }
    }
}

async fn run() -> Result<(), AppError> {
    let addr: SocketAddr = std::env::var("APP_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()
        .map_err(|e| AppError::Config(Error::config("APP_ADDR", format!("not a socket address: {e}"))))?;

    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| AppError::Io(format!("installing the Prometheus recorder: {e}")))?;
    describe_metrics();

    let manager = ConnectionManager::from_env().await.map_err(|e| match e {
        e @ Error::Config { .. } => AppError::Config(e),
        e => AppError::Start(e),
    })?;

    let app = Router::new()
        .route("/now", get(now))
        .layer(RecoveryLayer::new(manager.clone()))
        .layer(InjectDatabaseLayer::new(manager.clone()))
        // Health and metrics stay outside the recovery layer: they must answer during an outage.
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            manager: manager.clone(),
            prometheus,
        });

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Io(format!("binding APP_ADDR {addr}: {e}")))?;
    tracing::info!(%addr, "listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await;

    let report = manager.shutdown_default().await;
    tracing::info!(
        drained = report.drained,
        forced = report.forced,
        duration_ms = report.duration.as_millis() as u64,
        "database connections closed"
    );
    served.map_err(|e| AppError::Io(format!("serving: {e}")))
}

#[derive(Clone)]
struct AppState {
    manager: ConnectionManager,
    prometheus: PrometheusHandle,
}

/// `GET /now`.
async fn now(Db(db): Db) -> Result<String, Error> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT now()::text"))
        .await?
        .ok_or_else(|| Error::Database(sea_orm::DbErr::RecordNotFound("SELECT now() returned no row".into())))?;
    let now: String = row.try_get_by_index(0)?;
    tracing::info!(%now, "queried the time");
    Ok(now)
}

/// `GET /health`.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let status = state.manager.status();
    let code = if status.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health_json(&status)))
}

fn health_json(status: &HealthStatus) -> serde_json::Value {
    serde_json::json!({
        "healthy": status.healthy,
        "tunnel": status.tunnel.to_string(),
        "database": status.database,
        "latency_ms": status.latency.map(|l| l.as_secs_f64() * 1000.0),
        "pool_size": status.pool_size,
        "idle": status.idle,
        "error": status.error,
        "checked_at_unix_ms": status.checked_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).ok(),
    })
}

/// `GET /metrics`.
async fn render_metrics(State(state): State<AppState>) -> String {
    // Without the exporter's HTTP listener nothing runs upkeep (histogram housekeeping) for us.
    state.prometheus.run_upkeep();
    state.prometheus.render()
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
