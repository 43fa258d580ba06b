//! A cluster instance on a Kafka listener with TLS and SASL/SCRAM, as production Kafka
//! runs: the test makes its own CA, a server certificate for 127.0.0.1 and a SCRAM user,
//! starts its own broker with `scripts/kafka start --secure` (Apache Kafka, a SASL_SSL
//! listener beside the PLAINTEXT one), and stops it at the end, even on failure.
//!
//! Proves: every client of a cluster instance (admin, group member, transactional
//! producer, restore and ingress readers) takes `client_properties`, so records go in
//! and committed egress comes out over SASL_SSL only, and the snapshot reader reads the
//! state over it too; and a wrong password or a CA the client does not trust fails the
//! start within seconds, naming the listener and the cause, instead of hanging while
//! librdkafka retries.

#[allow(dead_code)] // the helpers this file does not use
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{SEEN, counter_module, unique};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_kafka::{ChangelogSnapshot, ClusterError, KafkaCluster, KafkaClusterConfig};
use statefun_runtime::KeyRouter;
use statefun_sdk::{Address, TypeName, ValueType};
use tokio_util::sync::CancellationToken;

const COUNTER: TypeName = TypeName::from_static("secure-test/counter");
const VALUE: TypeName = TypeName::from_static("secure-test/value");
const OUT: TypeName = TypeName::from_static("secure-test/out");
const USER: &str = "statefun";
const PASSWORD: &str = "s3cret-scram";

/// A CA and a certificate it signed, for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    /// The server's PKCS#8 key and certificate chain (what `scripts/kafka` reads).
    server_pem: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "statefun-rs test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    // Both an IP and a DNS entry for 127.0.0.1: OpenSSL's host check compares the
    // bootstrap host as a name.
    params
        .subject_alt_names
        .push(SanType::DnsName("127.0.0.1".try_into().unwrap()));
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_pem: format!("{}{}{}", key.serialize_pem(), cert.pem(), ca.pem()),
    }
}

/// A broker of our own with a SASL_SSL listener; stopped when dropped.
struct Broker {
    script: PathBuf,
    name: String,
    /// The SASL_SSL listener's bootstrap address.
    secure: String,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka");
        let mut broker = Broker {
            script,
            name: unique("secure"),
            secure: String::new(),
        };
        let port = free_ports();
        // The guard exists before the start: a start that fails halfway is stopped too.
        let out = Command::new(&broker.script)
            .args(["start", "--name", &broker.name, "--secure"])
            .arg(dir)
            .args(["--port", &port.to_string()])
            .output()
            .expect("cannot run scripts/kafka");
        assert!(
            out.status.success(),
            "scripts/kafka start --secure failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines.len(),
            2,
            "expected the PLAINTEXT and SASL_SSL addresses: {stdout}"
        );
        broker.secure = lines[1].to_owned();
        broker
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).args(["stop", "--name", &self.name]).status();
    }
}

/// A first port P such that P, P + 1 and P + 50 are free (the broker's PLAINTEXT,
/// CONTROLLER and SASL_SSL ports).
fn free_ports() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 60_000 {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 50)).is_ok()
        {
            return p;
        }
    }
}

/// The client properties for the SASL_SSL listener, trusting `ca` and logging in with
/// `password`.
fn secure_properties(ca: &Path, password: &str) -> Vec<(String, String)> {
    [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-256"),
        ("sasl.username", USER),
        ("sasl.password", password),
        ("ssl.ca.location", ca.to_str().unwrap()),
        ("client.id", "statefun-secure-test"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn client(bootstrap: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap);
    for (k, v) in properties {
        cc.set(k, v);
    }
    cc
}

fn instance_config(
    broker: &Broker,
    app: &str,
    dir: &Path,
    properties: &[(String, String)],
    input: &str,
    output: &str,
) -> KafkaClusterConfig {
    let mut config = KafkaClusterConfig::new(&broker.secure, app, "a", 2, dir)
        .ingress(input, KeyRouter::new(COUNTER, VALUE))
        .egress(OUT, output);
    config.timeout = Duration::from_secs(15);
    for (k, v) in properties {
        config = config.client_property(k, v);
    }
    config
}

/// Runs `config` and waits for its error; panics if it runs (or hangs) for more than
/// `bound`. Returns the error and how long it took.
async fn start_fails(config: KafkaClusterConfig, bound: Duration) -> (ClusterError, Duration) {
    let started = Instant::now();
    let stop = CancellationToken::new();
    let result = tokio::time::timeout(
        bound,
        KafkaCluster::run(config, |b| b.module(counter_module(COUNTER, OUT)), stop.clone()),
    )
    .await;
    stop.cancel();
    match result {
        Ok(Err(e)) => (e, started.elapsed()),
        Ok(Ok(_)) => panic!("the instance ran"),
        Err(_) => panic!("the start neither ran nor failed within {bound:?}: it hangs"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_instance_runs_over_sasl_ssl_and_a_wrong_password_or_untrusted_ca_fails_at_once_naming_the_listener()
{
    let dir = tempfile::tempdir().unwrap();
    let certs = pki();
    std::fs::write(dir.path().join("server.pem"), &certs.server_pem).unwrap();
    std::fs::write(dir.path().join("users"), format!("{USER} {PASSWORD}\n")).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    let broker = Broker::start(dir.path());
    let good = secure_properties(&ca, PASSWORD);

    // Topics, input and the run: over the SASL_SSL listener only.
    let (app, input, output) = (unique("sec-app"), unique("sec-in"), unique("sec-out"));
    let admin: AdminClient<DefaultClientContext> = client(&broker.secure, &good).create().unwrap();
    let topics = [
        NewTopic::new(&input, 2, TopicReplication::Fixed(1)),
        NewTopic::new(&output, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    let producer: FutureProducer = client(&broker.secure, &good).create().unwrap();
    const RECORDS: usize = 20;
    for i in 0..RECORDS {
        let (key, value) = (format!("k{}", i % 4), i.to_string());
        producer
            .send(
                FutureRecord::to(&input).key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let config = instance_config(&broker, &app, state.path(), &good, &input, &output);
    let run = tokio::spawn(KafkaCluster::run(
        config,
        |b| b.module(counter_module(COUNTER, OUT)),
        stop.clone(),
    ));

    let consumer: StreamConsumer = client(&broker.secure, &good)
        .set("group.id", unique("sec-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[&output]).unwrap();
    let mut egress = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while egress.len() < RECORDS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => egress.push(
                <String as ValueType>::decode(m.payload().unwrap_or_default()).expect("egress records are strings"),
            ),
            Ok(Err(e)) => panic!("egress consumer error: {e}"),
            Err(_) => break,
        }
    }
    egress.sort();
    let mut expected: Vec<String> = (0..RECORDS).map(|i| format!("k{}:{i}:{}", i % 4, i / 4 + 1)).collect();
    expected.sort();
    assert_eq!(egress, expected, "committed egress over SASL_SSL, each record once");

    // The committed state, read over the same listener.
    let snapshot = {
        let (secure, good, topic) = (
            broker.secure.clone(),
            good.clone(),
            KafkaClusterConfig::changelog_topic_of(&app),
        );
        tokio::task::spawn_blocking(move || {
            ChangelogSnapshot::read_with(&secure, &good, &topic, Duration::from_secs(30))
        })
        .await
        .unwrap()
        .unwrap()
    };
    for k in 0..4 {
        let address = Address::new(COUNTER, format!("k{k}")).unwrap();
        assert_eq!(snapshot.state(&address, &SEEN).unwrap(), Some(5), "{address}");
    }
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert!(report.generations >= 1);

    // A wrong password: refused by the broker, named at once.
    let wrong = secure_properties(&ca, "not-the-password");
    let other_state = tempfile::tempdir().unwrap();
    let (e, took) = start_fails(
        instance_config(
            &broker,
            &unique("sec-wrong"),
            other_state.path(),
            &wrong,
            &input,
            &output,
        ),
        Duration::from_secs(20),
    )
    .await;
    let text = e.to_string();
    eprintln!("wrong password: {took:?}: {text}");
    assert!(text.contains(&broker.secure), "names the listener: {text}");
    assert!(
        text.contains("refused the login") && text.contains("SASL authentication"),
        "says the login was refused: {text}"
    );
    assert!(!text.contains("not-the-password"), "the password leaked: {text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // A CA this client does not trust: the TLS handshake fails, named at once.
    let stranger = dir.path().join("other-ca.pem");
    std::fs::write(&stranger, pki().ca_pem).unwrap();
    let (e, took) = start_fails(
        instance_config(
            &broker,
            &unique("sec-untrusted"),
            other_state.path(),
            &secure_properties(&stranger, PASSWORD),
            &input,
            &output,
        ),
        Duration::from_secs(20),
    )
    .await;
    let text = e.to_string();
    eprintln!("untrusted CA: {took:?}: {text}");
    assert!(text.contains(&broker.secure), "names the listener: {text}");
    assert!(
        text.contains("TLS handshake failed") && text.contains("certificate verify failed"),
        "says the certificate is not trusted: {text}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
