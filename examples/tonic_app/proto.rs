//! `demo.Database` from `database.proto`, written by hand: the prost messages, a server that
//! routes the two unary methods to a [`Database`] implementation, and a client. This is what
//! tonic-prost-build would generate, minus the need for `protoc` at build time.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// `demo.HealthRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthRequest {}

/// `demo.HealthReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthReply {
    #[prost(bool, tag = "1")]
    pub healthy: bool,
    #[prost(string, tag = "2")]
    pub tunnel: String,
    #[prost(bool, tag = "3")]
    pub database: bool,
    #[prost(uint32, tag = "4")]
    pub pool_size: u32,
    #[prost(uint32, tag = "5")]
    pub idle: u32,
    #[prost(string, tag = "6")]
    pub error: String,
}

/// `demo.NowRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NowRequest {}

/// `demo.NowReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NowReply {
    #[prost(string, tag = "1")]
    pub now: String,
    #[prost(string, tag = "2")]
    pub correlation_id: String,
}

const SERVICE: &str = "demo.Database";
const HEALTH: &str = "/demo.Database/Health";
const NOW: &str = "/demo.Database/Now";

/// The methods of `demo.Database`.
pub trait Database: Send + Sync + 'static {
    /// `rpc Health(HealthRequest) returns (HealthReply)`.
    fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> impl Future<Output = Result<Response<HealthReply>, Status>> + Send;
    /// `rpc Now(NowRequest) returns (NowReply)`.
    fn now(&self, request: Request<NowRequest>) -> impl Future<Output = Result<Response<NowReply>, Status>> + Send;
}

/// The server side: a tower service for `Server::builder().add_service(..)`.
pub struct DatabaseServer<T> {
    inner: Arc<T>,
}

impl<T> DatabaseServer<T> {
    pub fn new(inner: T) -> Self {
        DatabaseServer { inner: Arc::new(inner) }
    }
}

impl<T> Clone for DatabaseServer<T> {
    fn clone(&self) -> Self {
        DatabaseServer {
            inner: self.inner.clone(),
        }
    }
}

impl<T> tonic::server::NamedService for DatabaseServer<T> {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<T, B> tower::Service<http::Request<B>> for DatabaseServer<T>
where
    T: Database,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match request.uri().path() {
            HEALTH => Box::pin(async move {
                let method = tower::service_fn(move |r| {
                    let inner = inner.clone();
                    async move { inner.health(r).await }
                });
                Ok(tonic::server::Grpc::new(ProstCodec::default())
                    .unary(method, request)
                    .await)
            }),
            NOW => Box::pin(async move {
                let method = tower::service_fn(move |r| {
                    let inner = inner.clone();
                    async move { inner.now(r).await }
                });
                Ok(tonic::server::Grpc::new(ProstCodec::default())
                    .unary(method, request)
                    .await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The client side.
#[derive(Clone)]
pub struct DatabaseClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl DatabaseClient {
    /// Connects to `http://host:port`.
    pub async fn connect(uri: String) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(uri)?.connect().await?;
        Ok(DatabaseClient {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    pub async fn health(
        &mut self,
        request: impl tonic::IntoRequest<HealthRequest>,
    ) -> Result<Response<HealthReply>, Status> {
        self.unary(request.into_request(), HEALTH).await
    }

    pub async fn now(&mut self, request: impl tonic::IntoRequest<NowRequest>) -> Result<Response<NowReply>, Status> {
        self.unary(request.into_request(), NOW).await
    }

    async fn unary<M1, M2>(&mut self, request: Request<M1>, path: &'static str) -> Result<Response<M2>, Status>
    where
        M1: prost::Message + Send + Sync + 'static,
        M2: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("service not ready: {e}")))?;
        self.grpc
            .unary(request, PathAndQuery::from_static(path), ProstCodec::default())
            .await
    }
}
