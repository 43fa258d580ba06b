//! Hosting functions remotely (feature `remote`): [`RemoteServer`] serves any
//! [`StatefulFunction`](crate::StatefulFunction) of a [`Module`] over StateFun's HTTP
//! request-reply protocol and over statefun-rs's gRPC service, on one port.
//!
//! Why it exists: the same Rust function runs embedded in the runtime or in its own
//! process with no change to its code; the runtime reaches it through `statefun-remote`
//! (HTTP or gRPC) exactly as it reaches a function written with StateFun's Python, Java,
//! Go or JavaScript SDK. The process holds no state: each request carries the address's
//! state and the answer carries the changes ([`crate::protocol::serve_request`]).
//!
//! * **HTTP**: a `POST` of a `ToFunction` to any path (StateFun's `urlPathTemplate`
//!   decides the path) is answered `200` with `Content-Type: application/octet-stream`
//!   and a `FromFunction`; a request that does not decode is `400`, an unknown function
//!   type `404`, a function that returned an error or panicked `422` with the error as
//!   text. The runtime's transport does not retry a `422` (a function's error is not a
//!   transport's); the runtime's retry policy does, then parks the address.
//! * **gRPC**: `statefun_rs.remote.v1.RemoteFunction/Invoke` with the same messages;
//!   the same cases are `INVALID_ARGUMENT`, `NOT_FOUND` and `FAILED_PRECONDITION`.
//!
//! HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) are both accepted on the port.
//!
//! ```no_run
//! # async fn run(module: statefun_sdk::Module) -> std::io::Result<()> {
//! use statefun_sdk::remote::RemoteServer;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! RemoteServer::new(module).serve(listener, std::future::pending()).await
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prost::Message as _;
use statefun_protocol::grpc::remote_function_server::{RemoteFunction, RemoteFunctionServer};
use statefun_protocol::reqreply::{FromFunction, ToFunction};

use crate::function::Module;
use crate::protocol::{CONTENT_TYPE, ServeError, serve_request};

/// Largest request body accepted by default: 32 MiB, StateFun's `payload_max_bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// Serves the functions of a [`Module`] over HTTP and gRPC on one port.
#[derive(Debug, Clone)]
pub struct RemoteServer {
    module: Arc<Module>,
    max_request_bytes: usize,
}

impl RemoteServer {
    /// A server for every function of `module`.
    pub fn new(module: Module) -> RemoteServer {
        RemoteServer {
            module: Arc::new(module),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// Largest request accepted (HTTP body or gRPC message); larger ones are refused
    /// (`413` / `RESOURCE_EXHAUSTED`) without being read.
    pub fn max_request_bytes(mut self, bytes: usize) -> RemoteServer {
        self.max_request_bytes = bytes;
        self
    }

    /// The routes, for embedding in an existing axum application.
    pub fn router(&self) -> axum::Router {
        let grpc = RemoteFunctionServer::new(Grpc {
            module: Arc::clone(&self.module),
        })
        .max_decoding_message_size(self.max_request_bytes);
        let http = axum::routing::post(http_invoke).with_state(Arc::clone(&self.module));
        tonic::service::Routes::new(grpc)
            .into_axum_router()
            .fallback_service(http)
            .layer(DefaultBodyLimit::max(self.max_request_bytes))
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the requests in
    /// progress.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn http_invoke(State(module): State<Arc<Module>>, body: Bytes) -> Response {
    let request = match ToFunction::decode(body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad request: {e}")).into_response(),
    };
    match serve_request(&module, request).await {
        Ok(answer) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], answer.encode_to_vec()).into_response(),
        Err(e) => {
            let status = match e {
                ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
                ServeError::UnknownFunction(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            tracing::warn!(error = %e, "remote invocation failed");
            (status, e.to_string()).into_response()
        }
    }
}

struct Grpc {
    module: Arc<Module>,
}

#[tonic::async_trait]
impl RemoteFunction for Grpc {
    async fn invoke(
        &self,
        request: tonic::Request<ToFunction>,
    ) -> Result<tonic::Response<FromFunction>, tonic::Status> {
        match serve_request(&self.module, request.into_inner()).await {
            Ok(answer) => Ok(tonic::Response::new(answer)),
            Err(e) => {
                tracing::warn!(error = %e, "remote invocation failed");
                Err(match e {
                    ServeError::BadRequest(_) => tonic::Status::invalid_argument(e.to_string()),
                    ServeError::UnknownFunction(_) => tonic::Status::not_found(e.to_string()),
                    _ => tonic::Status::failed_precondition(e.to_string()),
                })
            }
        }
    }
}
