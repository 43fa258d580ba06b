//! # statefun-remote
//!
//! Remote functions for the statefun-rs runtime: a [`RemoteFunction`] is a
//! [`StatefulFunction`] whose code runs in another process, reached over StateFun's
//! request-reply protocol by HTTP ([`HttpTransport`]) or by statefun-rs's gRPC service
//! ([`GrpcTransport`]); and StateFun's `module.yaml` format ([`module`]).
//!
//! Why it exists: in StateFun most functions run remotely. The function process holds
//! no state; the runtime sends each address's batch of messages with its registered
//! state values and applies the returned effects (state changes, messages, delayed
//! messages and cancellations, egress records) in its one place for effects, exactly
//! as for an embedded function. So functions written with StateFun's Python, Java, Go
//! or JavaScript SDK run unchanged, and a Rust function runs embedded or behind
//! `statefun_sdk::remote::RemoteServer` with no change to its code.
//!
//! What it promises:
//! * **The state handshake**: a function's states need not be declared to the runtime.
//!   The first request carries none; the function names the states it needs
//!   (`IncompleteInvocationContext`), the runtime registers them for the function type,
//!   with their type and expiry, and sends the same batch again at once.
//! * **Batching**: the runtime keeps one request in flight per address and sends the
//!   messages that arrived meanwhile as the next batch (`statefun_runtime` dispatch).
//! * **Failures**: an attempt that fails to connect, times out, or gets HTTP 5xx/429
//!   (gRPC `UNAVAILABLE`, `INTERNAL`, ...) is retried with exponential backoff until
//!   the call timeout; then the batch fails, and the runtime's retry policy takes over:
//!   after its attempts, only that address is parked and its messages go to the
//!   dead-letter sink with the error. An answer that is not a valid `FromFunction`, has
//!   the wrong content type, or changes a state that is not registered (or with another
//!   type) is an error naming the field, not retried by the transport, never a panic.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use statefun_remote::{HttpTransport, RemoteOptions};
//! use statefun_sdk::{FunctionSpec, Module, TypeName};
//!
//! let http = HttpTransport::new(RemoteOptions::default())?;
//! let cart = TypeName::parse("retail/cart")?;
//! let module = Module::builder()
//!     // No states declared: the function names them in the handshake.
//!     .with_function(FunctionSpec::new(cart), http.function("http://127.0.0.1:8000/statefun")?)
//!     .build()?;
//! # let _ = module; Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use statefun_protocol::grpc::remote_function_client::RemoteFunctionClient;
use statefun_sdk::protocol::reqreply::{FromFunction, ToFunction, to_function};
use statefun_sdk::protocol::{CONTENT_TYPE, apply_response, batch_request};
use statefun_sdk::{
    BatchError, Context, FunctionResult, FunctionSpec, Invocation, Message, Module, ModuleBuilder, StatefulFunction,
};
use tokio::time::Instant;

pub mod module;

/// How calls to a remote function are made. The defaults are StateFun's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// The whole call, retries included (StateFun's `call`). Default 2 min.
    pub call_timeout: Duration,
    /// Connecting, per attempt (StateFun's `connect`). Default 20 s.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this (StateFun's `pool_ttl`). Default 15 s.
    pub pool_ttl: Duration,
    /// Connections per HTTP transport at most (StateFun's `pool_size`): requests beyond
    /// it wait for a connection (counted in the call timeout) instead of opening more.
    /// Default 1024.
    pub pool_size: usize,
    /// Largest answer accepted (StateFun's `payload_max_bytes`). Default 32 MiB.
    pub max_response_bytes: usize,
    /// Wait before the second attempt; doubles per attempt up to `max_backoff`.
    /// Default 10 ms.
    pub initial_backoff: Duration,
    /// Longest wait between attempts. Default 1 s.
    pub max_backoff: Duration,
    /// `https`: certificate authorities (PEM files) trusted besides Mozilla's roots
    /// (StateFun's `trust_cacerts`). Default: none.
    pub trusted_ca_pem: Vec<std::path::PathBuf>,
    /// `https`: the client certificate chain and its private key (PEM files), for
    /// endpoints that require client authentication (StateFun's `client_cert` and
    /// `client_key`). Default: none.
    pub client_identity_pem: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            call_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(20),
            pool_ttl: Duration::from_secs(15),
            pool_size: 1024,
            max_response_bytes: 32 * 1024 * 1024,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            trusted_ca_pem: Vec::new(),
            client_identity_pem: None,
        }
    }
}

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The URL is not a valid http(s) URL.
    #[error("invalid function URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A gRPC channel is created inside a tokio runtime (it spawns its connection task).
    #[error("a gRPC transport must be created inside a tokio runtime")]
    NoRuntime,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// A certificate or key file could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// Two endpoints serve the same function type or namespace.
    #[error(transparent)]
    Module(#[from] statefun_sdk::ModuleError),
}

/// The remote functions that `spec`'s endpoints declare, as a [`Module`]: an endpoint
/// for one function type registers a [`RemoteFunction`] for it; one for `namespace/*`
/// registers a namespace function (its URL template resolved per type at each call).
/// No state is declared: the handshake registers it. Each HTTP endpoint gets its own
/// pooled client with the endpoint's timeouts and pool settings. Create it inside a
/// tokio runtime when there are gRPC endpoints.
pub fn remote_module(spec: &module::ModuleSpec) -> Result<Module, SetupError> {
    fn register(b: ModuleBuilder, pattern: &module::FunctionsPattern, f: RemoteFunction) -> ModuleBuilder {
        let f: Arc<dyn StatefulFunction> = Arc::new(f);
        match pattern {
            module::FunctionsPattern::Type(t) => b.with_shared_function(FunctionSpec::new(t.clone()), f),
            module::FunctionsPattern::Namespace(ns) => b.with_namespace_function(ns, f),
        }
    }
    let mut builder = Module::builder();
    for e in &spec.endpoints {
        let http = HttpTransport::new(RemoteOptions {
            call_timeout: e.call_timeout,
            connect_timeout: e.connect_timeout,
            pool_ttl: e.pool_ttl,
            pool_size: e.pool_size as usize,
            max_response_bytes: usize::try_from(e.payload_max_bytes).unwrap_or(usize::MAX),
            trusted_ca_pem: e.trust_cacerts.iter().cloned().collect(),
            client_identity_pem: e.client_identity.clone(),
            ..Default::default()
        })?;
        let url = match &e.functions {
            module::FunctionsPattern::Type(t) => e.url(t),
            module::FunctionsPattern::Namespace(_) => e.url_path_template.clone(),
        };
        builder = register(builder, &e.functions, http.function(&url)?);
    }
    for e in &spec.grpc_endpoints {
        let grpc = GrpcTransport::new(
            &e.url,
            RemoteOptions {
                call_timeout: e.call_timeout,
                connect_timeout: e.connect_timeout,
                ..Default::default()
            },
        )?;
        builder = register(builder, &e.functions, grpc.function());
    }
    Ok(builder.build()?)
}

/// A remote call that failed for good (after the transport's retries).
#[derive(Debug, thiserror::Error)]
#[error("remote function at {url}: {error} (after {attempts} attempt(s) in {elapsed_ms} ms)")]
pub struct CallError {
    /// The function's URL.
    pub url: String,
    /// Attempts made.
    pub attempts: u32,
    /// Time spent, retries included.
    pub elapsed_ms: u64,
    /// The last attempt's error.
    pub error: String,
    /// Whether the last error was one the transport retries (the call timeout ran out)
    /// or one it does not (a malformed answer, a 4xx status).
    pub retryable: bool,
}

/// What one attempt ended with.
enum Attempt {
    /// Retried while the call timeout allows.
    Retry(String),
    /// Not retried by the transport.
    Fatal(String),
}

/// A pooled HTTP client for StateFun's HTTP endpoints: one per endpoint (or per
/// application), shared by every function it reaches. `http://` and `https://`
/// (rustls; Mozilla's roots plus `RemoteOptions::trusted_ca_pem`, and a client
/// certificate for endpoints that ask for one).
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    /// One permit per connection (`pool_size`).
    connections: Arc<tokio::sync::Semaphore>,
    options: Arc<RemoteOptions>,
}

impl HttpTransport {
    /// A client with `options`' connect timeout, pool and TLS settings.
    pub fn new(options: RemoteOptions) -> Result<HttpTransport, SetupError> {
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .pool_idle_timeout(options.pool_ttl)
            .pool_max_idle_per_host(options.pool_size)
            .tcp_nodelay(true)
            .tls_backend_preconfigured(tls_config(&options)?)
            .build()?;
        Ok(HttpTransport {
            client,
            connections: Arc::new(tokio::sync::Semaphore::new(options.pool_size.max(1))),
            options: Arc::new(options),
        })
    }

    /// The function served at `url` (POST of `ToFunction`, answered with `FromFunction`).
    /// In a URL template (StateFun's `urlPathTemplate`), `{function.name}` is replaced by
    /// the name of the target's function type at each call: one `RemoteFunction` then
    /// serves a whole namespace (`Module` namespace functions).
    pub fn function(&self, url: &str) -> Result<RemoteFunction, SetupError> {
        let target = if url.contains(FUNCTION_NAME) {
            // Checked with a sample name: the template makes valid URLs.
            check_url(&url.replace(FUNCTION_NAME, "f"))?;
            HttpUrl::Template(Arc::from(url))
        } else {
            HttpUrl::Fixed(check_url(url)?)
        };
        Ok(RemoteFunction {
            endpoint: Endpoint::Http {
                client: self.client.clone(),
                connections: Arc::clone(&self.connections),
                url: target,
            },
            url: Arc::from(url),
            options: Arc::clone(&self.options),
        })
    }
}

/// The TLS settings of `https` endpoints: rustls with the ring provider, Mozilla's root
/// certificates plus `options.trusted_ca_pem`, and the client identity if any.
fn tls_config(options: &RemoteOptions) -> Result<rustls::ClientConfig, SetupError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |what: &std::path::Path, e: &dyn std::fmt::Display| SetupError::Tls(format!("{}: {e}", what.display()));
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in &options.trusted_ca_pem {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls(path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls(path, &e))?;
        if certs.is_empty() {
            return Err(tls(path, &"no certificate in the file"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| tls(path, &e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match &options.client_identity_pem {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls(cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls(cert, &e))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls(key, &e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls(cert, &e))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The placeholder of a URL template (StateFun substitutes only this one).
const FUNCTION_NAME: &str = "{function.name}";

fn check_url(url: &str) -> Result<reqwest::Url, SetupError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| SetupError::Url {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SetupError::Url {
            url: url.to_owned(),
            reason: "not an http:// or https:// URL".to_owned(),
        });
    }
    Ok(parsed)
}

#[derive(Debug, Clone)]
enum HttpUrl {
    Fixed(reqwest::Url),
    Template(Arc<str>),
}

/// A connection to statefun-rs's gRPC service (`RemoteFunction.Invoke`), HTTP/2 over
/// one multiplexed connection, opened on first use and re-opened when it breaks.
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    client: RemoteFunctionClient<tonic::transport::Channel>,
    url: Arc<str>,
    options: Arc<RemoteOptions>,
}

impl GrpcTransport {
    /// A lazily connected channel to `url` (`http://host:port`). Call it inside a tokio
    /// runtime: the channel's connection task runs there.
    pub fn new(url: &str, options: RemoteOptions) -> Result<GrpcTransport, SetupError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SetupError::NoRuntime);
        }
        let invalid = |reason: String| SetupError::Url {
            url: url.to_owned(),
            reason,
        };
        if !url.starts_with("http://") {
            return Err(invalid(
                "only http:// is supported for gRPC (use the HTTP transport for https endpoints)".to_owned(),
            ));
        }
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| invalid(statefun_sdk::error_chain(&e)))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let client = RemoteFunctionClient::new(channel)
            .max_decoding_message_size(options.max_response_bytes)
            .max_encoding_message_size(usize::MAX);
        Ok(GrpcTransport {
            client,
            url: Arc::from(url),
            options: Arc::new(options),
        })
    }

    /// A function reached through this channel (the request names the target, so one
    /// channel serves every function type of the server).
    pub fn function(&self) -> RemoteFunction {
        RemoteFunction {
            endpoint: Endpoint::Grpc {
                client: self.client.clone(),
            },
            url: Arc::clone(&self.url),
            options: Arc::clone(&self.options),
        }
    }
}

#[derive(Debug, Clone)]
enum Endpoint {
    Http {
        client: reqwest::Client,
        connections: Arc<tokio::sync::Semaphore>,
        url: HttpUrl,
    },
    Grpc {
        client: RemoteFunctionClient<tonic::transport::Channel>,
    },
}

/// A function served by another process; register it in a `Module` like any function
/// (its `FunctionSpec` needs no states: the handshake registers them).
#[derive(Debug, Clone)]
pub struct RemoteFunction {
    endpoint: Endpoint,
    url: Arc<str>,
    options: Arc<RemoteOptions>,
}

impl RemoteFunction {
    /// Sends one request, retrying what may succeed on a later attempt until the call
    /// timeout, with exponential backoff.
    pub async fn call(&self, request: ToFunction) -> Result<FromFunction, CallError> {
        let started = Instant::now();
        let deadline = started + self.options.call_timeout;
        let failed = |url: &str, error: String, attempts, retryable| CallError {
            url: url.to_owned(),
            attempts,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error,
            retryable,
        };
        let (url, shown) = match &self.endpoint {
            Endpoint::Http {
                url: HttpUrl::Template(t),
                ..
            } => {
                let name = match &request.request {
                    Some(to_function::Request::Invocation(b)) => b.target.as_ref().map(|t| t.r#type.as_str()),
                    None => None,
                }
                .unwrap_or_default();
                let resolved = t.replace(FUNCTION_NAME, name);
                let url = check_url(&resolved).map_err(|e| failed(&resolved, e.to_string(), 0, false))?;
                (Some(url), resolved)
            }
            Endpoint::Http {
                url: HttpUrl::Fixed(u), ..
            } => (Some(u.clone()), self.url.to_string()),
            Endpoint::Grpc { .. } => (None, self.url.to_string()),
        };
        // HTTP sends these bytes on every attempt; gRPC encodes the request itself.
        let body = url.as_ref().map(|_| Bytes::from(request.encode_to_vec()));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let target = url.as_ref().zip(body.clone());
            let attempt = self.attempt(&request, target);
            let outcome = match tokio::time::timeout(remaining, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Attempt::Retry(format!(
                    "no answer within the call timeout of {} ms",
                    self.options.call_timeout.as_millis()
                ))),
            };
            let (error, retryable) = match outcome {
                Ok(answer) => return Ok(answer),
                Err(Attempt::Fatal(e)) => (e, false),
                Err(Attempt::Retry(e)) => (e, true),
            };
            let backoff = self
                .options
                .initial_backoff
                .saturating_mul(1 << (attempts - 1).min(20))
                .min(self.options.max_backoff);
            if !retryable || Instant::now() + backoff >= deadline {
                return Err(failed(&shown, error, attempts, retryable));
            }
            tracing::debug!(url = %shown, attempt = attempts, error = %error, "remote call failed; retrying");
            tokio::time::sleep(backoff).await;
        }
    }

    /// One attempt: an HTTP POST of `http`'s body to its URL, or a gRPC call.
    async fn attempt(
        &self,
        request: &ToFunction,
        http: Option<(&reqwest::Url, Bytes)>,
    ) -> Result<FromFunction, Attempt> {
        match &self.endpoint {
            Endpoint::Http {
                client, connections, ..
            } => {
                let (url, body) = http.expect("an HTTP call has a URL and a body");
                let _connection = connections.acquire().await.expect("the semaphore is never closed");
                self.attempt_http(client, url, body).await
            }
            Endpoint::Grpc { client } => {
                let mut client = client.clone();
                match client.invoke(request.clone()).await {
                    Ok(answer) => Ok(answer.into_inner()),
                    Err(status) => {
                        use tonic::Code;
                        let e = format!("gRPC {:?}: {}", status.code(), status.message());
                        Err(match status.code() {
                            Code::Unavailable
                            | Code::Unknown
                            | Code::Internal
                            | Code::ResourceExhausted
                            | Code::DeadlineExceeded
                            | Code::Aborted => Attempt::Retry(e),
                            _ => Attempt::Fatal(e),
                        })
                    }
                }
            }
        }
    }

    async fn attempt_http(
        &self,
        client: &reqwest::Client,
        url: &reqwest::Url,
        body: Bytes,
    ) -> Result<FromFunction, Attempt> {
        let response = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body)
            .send()
            .await
            .map_err(|e| Attempt::Retry(statefun_sdk::error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let text = read_at_most(response, 300).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let e = format!("HTTP {status}: {text}");
            return Err(
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    Attempt::Retry(e)
                } else {
                    Attempt::Fatal(e)
                },
            );
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if content_type.split(';').next().map(str::trim) != Some(CONTENT_TYPE) {
            return Err(Attempt::Fatal(format!(
                "answered {status} with Content-Type {content_type:?}, expected {CONTENT_TYPE}"
            )));
        }
        let max = self.options.max_response_bytes;
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(Attempt::Fatal(format!("the answer is larger than {max} bytes")));
        }
        let bytes = read_at_most(response, max + 1)
            .await
            .map_err(|e| Attempt::Retry(statefun_sdk::error_chain(&e)))?;
        if bytes.len() > max {
            return Err(Attempt::Fatal(format!("the answer is larger than {max} bytes")));
        }
        FromFunction::decode(bytes).map_err(|e| Attempt::Fatal(format!("the answer is not a FromFunction: {e}")))
    }
}

/// The body, or its first `limit` bytes: a body without a `Content-Length` is read chunk
/// by chunk and never held beyond the limit.
async fn read_at_most(mut response: reqwest::Response, limit: usize) -> Result<Bytes, reqwest::Error> {
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out.freeze())
}

#[async_trait::async_trait]
impl StatefulFunction for RemoteFunction {
    async fn invoke(&self, ctx: &mut Context, message: Message) -> FunctionResult {
        let caller = ctx.caller().cloned();
        self.invoke_batch(ctx, &[Invocation { caller, message }])
            .await
            .map_err(|e| match e {
                BatchError::Failed { error, .. } => error,
                other => other.to_string().into(),
            })
    }

    async fn invoke_batch(&self, ctx: &mut Context, batch: &[Invocation]) -> Result<(), BatchError> {
        let answer = self
            .call(batch_request(ctx, batch))
            .await
            .map_err(|e| BatchError::failed(0, e))?;
        apply_response(ctx, answer)
    }
}
