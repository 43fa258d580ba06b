//! Remote functions wired from a `module.yaml`: an HTTP endpoint for a whole namespace
//! (`shop/*`, URL template `.../fn/{function.name}`: each type is called at its own
//! path) and a gRPC endpoint (ours) for one type, driven by the runtime.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{Uri, header};
use axum::response::IntoResponse;
use prost::Message as _;
use statefun_remote::module::parse;
use statefun_remote::remote_module;
use statefun_sdk::prelude::*;
use statefun_sdk::protocol::reqreply::ToFunction;
use statefun_sdk::protocol::{CONTENT_TYPE, serve_request};
use statefun_sdk::remote::RemoteServer;

const COUNT: ValueSpec<i64> = ValueSpec::named("count");

fn count(ctx: &mut Context, _msg: Message) -> FunctionResult {
    let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + 1;
    ctx.storage().set(&COUNT, &n)?;
    Ok(())
}

fn hosted() -> Module {
    let mut b = Module::builder();
    for t in ["shop/cart", "shop/loyalty", "other/echo"] {
        b = b.with_fn(FunctionSpec::new(TypeName::parse(t).unwrap()).with_state(COUNT), count);
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_endpoint_calls_each_type_at_its_templated_url_and_a_grpc_endpoint_serves_its_type() {
    // HTTP: records the path of every request, answers with the hosted functions.
    let paths = Arc::new(Mutex::new(Vec::<String>::new()));
    let module = Arc::new(hosted());
    let (p, m) = (paths.clone(), module.clone());
    let app = axum::Router::new().fallback(axum::routing::post(move |uri: Uri, body: Bytes| {
        let (p, m) = (p.clone(), m.clone());
        async move {
            p.lock().unwrap().push(uri.path().to_owned());
            let answer = serve_request(&m, ToFunction::decode(body).unwrap()).await.unwrap();
            ([(header::CONTENT_TYPE, CONTENT_TYPE)], answer.encode_to_vec()).into_response()
        }
    }));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = http.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(http, app).await });
    // gRPC: the SDK's server.
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_port = grpc.local_addr().unwrap().port();
    tokio::spawn(RemoteServer::new(hosted()).serve(grpc, std::future::pending()));

    let yaml = format!(
        "\
kind: io.statefun.endpoints.v2/http
spec:
  functions: shop/*
  urlPathTemplate: http://127.0.0.1:{http_port}/fn/{{function.name}}
  transport:
    call: 5s
---
kind: io.statefun-rs.endpoints.v1/grpc
spec:
  functions: other/echo
  url: http://127.0.0.1:{grpc_port}
"
    );
    let spec = parse(&yaml).unwrap();
    let functions = remote_module(&spec).unwrap();
    let r = common::start_with(Vec::new(), TypeName::from_static("unused/egress"), 2, |b| {
        let mut b = b;
        for (n, f) in functions.namespaces() {
            b = b.with_namespace_function(n, Arc::clone(f.function()));
        }
        for t in functions.types() {
            b = b.with_shared_function(
                FunctionSpec::new(t.clone()),
                Arc::clone(functions.get(t).unwrap().function()),
            );
        }
        b
    });
    let h = &r.handle;
    let at = |t: &str| Address::new(TypeName::parse(t).unwrap(), "1").unwrap();
    for t in ["shop/cart", "shop/cart", "shop/loyalty", "other/echo"] {
        h.send_value(at(t), &1i64).await.unwrap();
        h.wait_idle().await;
    }
    assert_eq!(h.state(&at("shop/cart"), &COUNT).await.unwrap(), Some(2));
    assert_eq!(h.state(&at("shop/loyalty"), &COUNT).await.unwrap(), Some(1));
    assert_eq!(h.state(&at("other/echo"), &COUNT).await.unwrap(), Some(1));
    let mut seen = paths.lock().unwrap().clone();
    seen.dedup();
    assert_eq!(seen, ["/fn/cart", "/fn/loyalty"], "each type at its own URL");
    let report = r.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0);
}
