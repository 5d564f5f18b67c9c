//! Keep requests away from a database that is recovering, and retry idempotent requests that
//! failed transiently.
//!
//! For each request, [`Recovery`] looks at the manager's health (a `watch`, never the network):
//!
//! - **healthy**: the request goes straight to the inner service;
//! - **recovering** (the last health check failed, or the tunnel is down): the request waits for
//!   the health to come back, up to [`max_wait`](RecoveryLayer::max_wait); if it does not, it is
//!   answered `503 Service Unavailable` with `Retry-After`, or for a gRPC call (`content-type:
//!   application/grpc*`) with a trailers-only `UNAVAILABLE` (`grpc-status: 14`, HTTP 200) and a
//!   `grpc-retry-pushback-ms` — without calling the handler;
//! - **shutting down**: answered the same way at once;
//! - **a response marked [`TransientDbFailure`]** (the crate's [`Error`](crate::Error) does that
//!   when it becomes an axum response and is transient) to an **idempotent** request (`GET`,
//!   `HEAD`, `OPTIONS`, `PUT`, `DELETE`, `TRACE`, or marked [`Idempotent`]) whose body has a
//!   known length of at most [`max_buffered_body`](RecoveryLayer::max_buffered_body): the
//!   request is sent again after the backoff of [`retry_policy`](RecoveryLayer::retry_policy),
//!   waiting for health in between, until a response is not marked or the policy gives up (the
//!   last response is returned). `POST` and `PATCH` are never retried here: retry such work at
//!   the data layer with `manager.retry(..)`, inside a transaction, where it is safe.
//!
//! `poll_ready` only forwards to the inner service: waiting happens in the response future, so
//! the layer fits axum (which treats services as always ready) and any `ServiceBuilder` stack.
//! A healthy request that will not be retried costs one atomic load and no allocation.
//!
//! Shed and retried requests are logged (target [`TARGET_LAYER`](crate::layer::TARGET_LAYER))
//! and counted in [`DB_REQUESTS_SHED_TOTAL`](crate::layer::DB_REQUESTS_SHED_TOTAL) and
//! [`DB_REQUESTS_RETRIED_TOTAL`](crate::layer::DB_REQUESTS_RETRIED_TOTAL).
//!
//! The inner service receives `Request<`[`RecoveryBody<B>`]`>` (the original body, or the
//! buffered copy a retry replays); axum routers and tonic's `Routes` accept any body type. The
//! response body type is unchanged; it must implement `Default` for the responses the layer
//! makes itself (axum's and tonic's bodies do).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use sea_orm_tunnel::ConnectionManager;
//! use sea_orm_tunnel::layer::{InjectDatabaseLayer, RecoveryLayer};
//!
//! # async fn run(manager: ConnectionManager) {
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RecoveryLayer::new(manager.clone()).max_wait(Duration::from_secs(2)))
//!     .layer(InjectDatabaseLayer::new(manager)); // outermost: ids on shed requests too
//! # }
//! ```
//!
//! [`TransientDbFailure`]: crate::layer::TransientDbFailure
//! [`Idempotent`]: crate::layer::Idempotent

mod body;
mod future;
mod health;
mod layer;
mod service;

pub use body::RecoveryBody;
pub use future::ResponseFuture;
pub use layer::RecoveryLayer;
pub use service::Recovery;

#[cfg(test)]
mod tests;
