//! Remote functions over `https`: a function behind the SDK's `RemoteServer`, served
//! over TLS (tokio-rustls) on 127.0.0.1 with a certificate from a test CA, reached by
//! the runtime through `HttpTransport` trusting that CA (StateFun's `trust_cacerts`).
//! A transport that does not trust it refuses the server (the address is parked with
//! the certificate error) and sends it nothing.

mod common;

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use statefun_remote::{HttpTransport, RemoteOptions};
use statefun_sdk::prelude::*;
use statefun_sdk::remote::RemoteServer;

const F: TypeName = TypeName::from_static("secure/counter");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");

fn count(ctx: &mut Context, _msg: Message) -> FunctionResult {
    let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + 1;
    ctx.storage().set(&COUNT, &n)?;
    Ok(())
}

/// Serves the counter over TLS with a certificate for 127.0.0.1 signed by a fresh CA;
/// returns the port and the CA's PEM.
async fn https_server() -> (u16, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let module = Module::builder()
        .with_fn(FunctionSpec::new(F).with_state(COUNT), count)
        .build()
        .unwrap();
    let router = RemoteServer::new(module).router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: not an error here.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = TowerToHyperService::new(router);
                let _ = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_function_is_reached_with_its_ca_trusted_and_refused_without() {
    let (port, ca_pem) = https_server().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("https://127.0.0.1:{port}/statefun");

    let trusting = HttpTransport::new(RemoteOptions {
        trusted_ca_pem: vec![ca_file],
        ..Default::default()
    })
    .unwrap();
    let strict = HttpTransport::new(RemoteOptions {
        call_timeout: std::time::Duration::from_millis(500),
        ..Default::default()
    })
    .unwrap();
    // Two function types on the same server: one reached trusting the CA, one not.
    const STRICT: TypeName = TypeName::from_static("secure/strict");
    let r = common::start(
        vec![
            (F, Arc::new(trusting.function(&url).unwrap())),
            (STRICT, Arc::new(strict.function(&url).unwrap())),
        ],
        TypeName::from_static("unused/egress"),
        2,
    );
    let h = &r.handle;
    let a = Address::new(F, "a").unwrap();
    for _ in 0..3 {
        h.send_value(a.clone(), &1i64).await.unwrap();
    }
    h.send_value(Address::new(STRICT, "a").unwrap(), &1i64).await.unwrap();
    h.wait_idle().await;
    assert_eq!(
        h.state(&a, &COUNT).await.unwrap(),
        Some(3),
        "state round-tripped over TLS"
    );
    let parked = h.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0.type_name(), &STRICT);
    assert!(parked[0].1.contains("certificate"), "{}", parked[0].1);
    r.stop().await;
}

#[test]
fn a_missing_or_empty_ca_file_is_a_setup_error() {
    let e = HttpTransport::new(RemoteOptions {
        trusted_ca_pem: vec!["/nonexistent/ca.pem".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().starts_with("TLS: /nonexistent/ca.pem:"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let e = HttpTransport::new(RemoteOptions {
        trusted_ca_pem: vec![empty],
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("no certificate in the file"), "{e}");
}
