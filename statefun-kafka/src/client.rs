//! How every Kafka client of the runtime is configured, and the check at start that the
//! brokers can be reached and accept this client's credentials.
//!
//! Why it exists: a production Kafka asks for TLS, SASL, client ids and tuning on every
//! connection, and the runtime opens many (the transactional producer, restore readers,
//! the group member, ingress consumers, admin clients, the snapshot reader, dead-letter
//! and egress producers). Each is built by [`client_config`] from the bootstrap servers
//! and the same user properties, so none can be forgotten.
//!
//! Invariants:
//! * The user's properties never replace a property the runtime owns: those are refused
//!   up front ([`check_properties`], with the reason and the field to use instead), and
//!   each client sets its own after the user's. The runtime's defaults (`linger.ms`, ...)
//!   give way to the user's ([`ConfigExt::set_default`]).
//! * Property values whose names suggest a secret never reach `Debug` output
//!   ([`Redacted`]).
//! * librdkafka retries a refused login or an untrusted certificate forever, logging
//!   it. [`probe`] turns the first such error into an [`Error::Connect`] naming the
//!   listener and the cause, within about a second, instead of a start that hangs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::Error;

/// The properties the runtime sets itself, and why (the field to use instead, where
/// there is one). Aliases librdkafka accepts for them are listed too.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set it with the bootstrap_servers field"),
    (
        "metadata.broker.list",
        "set the bootstrap servers with the bootstrap_servers field",
    ),
    (
        "transactional.id",
        "the runtime derives it from the instance (<application_id>-<instance_id>, or \
         KafkaChangelogConfig::transactional_id); it is what fences a restarted instance's \
         previous process",
    ),
    (
        "enable.idempotence",
        "the runtime's producers are idempotent (transactions need it; egress ids rely on it)",
    ),
    (
        "acks",
        "transactions and idempotence need acks=all, which the runtime sets",
    ),
    (
        "request.required.acks",
        "transactions and idempotence need acks=all, which the runtime sets",
    ),
    (
        "transaction.timeout.ms",
        "set it with the transaction_timeout field (KafkaClusterConfig, KafkaChangelogConfig)",
    ),
    (
        "isolation.level",
        "the runtime reads its own topics read_committed (and asks for partition ends \
         read_uncommitted); any other level breaks exactly-once",
    ),
    (
        "enable.auto.commit",
        "the runtime commits consumer offsets itself, in its transactions or up to what it \
         holds durably",
    ),
    (
        "auto.commit.enable",
        "the runtime commits consumer offsets itself, in its transactions or up to what it \
         holds durably",
    ),
    (
        "enable.auto.offset.store",
        "the runtime stores consumer offsets itself, in its transactions or up to what it \
         holds durably",
    ),
    (
        "group.id",
        "the consumer group is the application_id in cluster mode (KafkaIngressConfig::group_id \
         for a KafkaIngress)",
    ),
    (
        "group.instance.id",
        "set with the static_membership field: the runtime uses <application_id>-<instance_id>",
    ),
    (
        "group.protocol",
        "the runtime uses the classic group protocol, whose session and rebalance timeouts it \
         sets (session_timeout, rebalance_timeout)",
    ),
    ("partition.assignment.strategy", "set it with the assignment field"),
    (
        "auto.offset.reset",
        "set where ingress topics start with the start field; the runtime's own readers must \
         fail at a missing offset rather than skip",
    ),
    ("session.timeout.ms", "set it with the session_timeout field"),
    ("max.poll.interval.ms", "set it with the rebalance_timeout field"),
    (
        "enable.partition.eof",
        "the runtime's readers track their position themselves; end-of-partition events would \
         fail a restore",
    ),
];

/// Why the runtime refuses the librdkafka property `key` from a user, if it does: the
/// runtime sets it itself, and another value would break exactly-once, fencing or the
/// group's assignment. The reason names the configuration field to use instead, where
/// there is one. Every other property is passed to every client (`security.protocol`,
/// `ssl.*`, `sasl.*`, `client.id`, tuning).
pub fn reserved_property(key: &str) -> Option<&'static str> {
    RESERVED.iter().find(|(k, _)| *k == key.trim()).map(|(_, why)| *why)
}

/// Checks the user's properties of `field` (named in the error): none is reserved
/// ([`reserved_property`]), none is empty or given twice with different values.
pub(crate) fn check_properties(field: &str, properties: &[(String, String)]) -> Result<(), String> {
    let mut problems = Vec::new();
    for (i, (key, value)) in properties.iter().enumerate() {
        if key.trim().is_empty() {
            problems.push("an empty property name".to_owned());
        } else if let Some(why) = reserved_property(key) {
            problems.push(format!("{key} cannot be set: {why}"));
        } else if let Some((_, other)) = properties[..i].iter().find(|(k, v)| k == key && v != value) {
            problems.push(format!(
                "{key} is given twice, with different values ({})",
                if is_secret(key) {
                    "values redacted".to_owned()
                } else {
                    format!("{other:?} and {value:?}")
                }
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{field}: {}", problems.join("; ")))
    }
}

/// The configuration every client of the runtime starts from: `bootstrap.servers`, then
/// the user's properties. The caller then sets the properties it owns (refused in the
/// user's by [`check_properties`]) and its defaults ([`ConfigExt::set_default`]).
pub(crate) fn client_config(bootstrap_servers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap_servers);
    for (k, v) in properties {
        cc.set(k.trim(), v);
    }
    cc
}

/// Defaults that give way to the user's properties.
pub(crate) trait ConfigExt {
    /// Sets `key` unless it is set already (by the user's properties).
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self;
}

impl ConfigExt for ClientConfig {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

/// Whether the value of property `key` may be a secret (a password, a key, inline PEM, a
/// JAAS or OAuth configuration).
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "pem", "jaas", "oauthbearer.config", "token"]
        .iter()
        .any(|s| k.contains(s))
}

/// Properties for `Debug`: keys and values, with the values of secrets redacted.
pub(crate) struct Redacted<'a>(pub(crate) &'a [(String, String)]);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if is_secret(k) { "<redacted>" } else { v.as_str() })),
            )
            .finish()
    }
}

/// Collects the errors librdkafka reports while [`probe`] waits for metadata.
#[derive(Default)]
struct Watch {
    /// The first error that no retry cures (authentication, TLS).
    refused: Mutex<Option<(RDKafkaErrorCode, String)>>,
    /// The last other error (a refused connection, a name that does not resolve).
    last: Mutex<Option<String>>,
}

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(
                code @ (RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::SaslAuthenticationFailed),
            ) => {
                self.refused
                    .lock()
                    .expect("watch lock")
                    .get_or_insert_with(|| (code, reason.to_owned()));
            }
            _ => *self.last.lock().expect("watch lock") = Some(reason.to_owned()),
        }
    }
}

impl ProducerContext for Watch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// What a successful [`probe`] learnt about the cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClusterInfo {
    /// The brokers in the cluster's metadata.
    pub(crate) brokers: usize,
}

/// Connects to `bootstrap_servers` with the user's `properties` and asks for the
/// cluster's metadata. A login the brokers refuse or a certificate this client does not
/// trust is an [`Error::Connect`] naming the listener and the cause, as soon as
/// librdkafka reports it (about a second); brokers that do not answer within `timeout`
/// are an [`Error::Kafka`] with the last error seen. Blocking.
pub(crate) fn probe(
    bootstrap_servers: &str,
    properties: &[(String, String)],
    timeout: Duration,
) -> Result<ClusterInfo, Error> {
    let client: BaseProducer<Watch> = client_config(bootstrap_servers, properties)
        .create_with_context(Watch::default())
        .map_err(crate::kafka("cannot create a client (check the client properties)"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let step = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        let answer = client.client().fetch_metadata(None, step);
        // Serves the events librdkafka queued to `Watch`: every one (a failing TLS
        // handshake queues many log lines before its error), waiting at most 20 ms.
        client.poll(Duration::from_millis(20));
        if let Some((code, reason)) = client.context().refused.lock().expect("watch lock").take() {
            return Err(refused(bootstrap_servers, properties, code, &reason));
        }
        let failure = match answer {
            Ok(md) if !md.brokers().is_empty() => {
                return Ok(ClusterInfo {
                    brokers: md.brokers().len(),
                });
            }
            Ok(_) => KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerNotAvailable),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            let last = client.context().last.lock().expect("watch lock").take();
            return Err(Error::Kafka {
                what: format!(
                    "cannot reach the brokers at {bootstrap_servers} within {timeout:?}{}",
                    last.map(|l| format!(" (last error: {l})")).unwrap_or_default()
                )
                .into(),
                source: failure,
            });
        }
    }
}

/// The error for a connection the brokers (or this client) refused.
fn refused(bootstrap_servers: &str, properties: &[(String, String)], code: RDKafkaErrorCode, reason: &str) -> Error {
    let protocol = properties
        .iter()
        .rev()
        .find(|(k, _)| k == "security.protocol")
        .map_or("PLAINTEXT", |(_, v)| v.as_str());
    let cause = match code {
        RDKafkaErrorCode::SSL => {
            "the TLS handshake failed: if the broker's certificate is not trusted, give its CA \
             in ssl.ca.location (or ssl.ca.pem); if the host name does not match, fix the \
             certificate or the bootstrap address"
        }
        _ => {
            "the broker refused the login: check sasl.username, sasl.password and \
             sasl.mechanisms (the user must exist for that mechanism)"
        }
    };
    Error::Connect {
        bootstrap_servers: bootstrap_servers.to_owned(),
        reason: format!("{cause} (security.protocol {protocol}); librdkafka: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn properties_the_runtime_owns_are_refused_naming_each_and_why() {
        let e = check_properties(
            "client_properties",
            &props(&[
                ("security.protocol", "SASL_SSL"),
                ("transactional.id", "x"),
                ("session.timeout.ms", "5000"),
                ("isolation.level", "read_uncommitted"),
            ]),
        )
        .unwrap_err();
        assert!(e.starts_with("client_properties: "), "{e}");
        assert!(
            e.contains("transactional.id cannot be set: the runtime derives it"),
            "{e}"
        );
        assert!(
            e.contains("session.timeout.ms cannot be set: set it with the session_timeout field"),
            "{e}"
        );
        assert!(e.contains("isolation.level cannot be set"), "{e}");
        assert!(!e.contains("security.protocol"), "{e}");
        for key in [
            "transactional.id",
            "isolation.level",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "enable.idempotence",
            "group.id",
            "group.instance.id",
            "partition.assignment.strategy",
            "auto.offset.reset",
            "bootstrap.servers",
            "acks",
            "session.timeout.ms",
            "max.poll.interval.ms",
            "transaction.timeout.ms",
        ] {
            assert!(reserved_property(key).is_some(), "{key} is not reserved");
        }
    }

    #[test]
    fn security_and_tuning_properties_pass_and_duplicates_that_disagree_are_refused() {
        let ok = props(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-256"),
            ("sasl.username", "app"),
            ("sasl.password", "secret"),
            ("ssl.ca.location", "/etc/ca.pem"),
            ("client.id", "app-1"),
            ("linger.ms", "20"),
            ("client.id", "app-1"),
        ]);
        check_properties("client_properties", &ok).unwrap();
        let e = check_properties("f", &props(&[("sasl.password", "a"), ("sasl.password", "b")])).unwrap_err();
        assert!(
            e.contains("sasl.password is given twice") && e.contains("values redacted"),
            "{e}"
        );
        assert!(!e.contains("\"a\""), "a secret leaked: {e}");
        let e = check_properties("f", &props(&[("", "x")])).unwrap_err();
        assert!(e.contains("an empty property name"), "{e}");
    }

    #[test]
    fn a_client_config_has_the_bootstrap_then_the_users_properties_and_defaults_give_way() {
        let mut cc = client_config("b:9092", &props(&[("security.protocol", "SSL"), ("linger.ms", "20")]));
        cc.set_default("linger.ms", "5").set_default("batch.size", "1000");
        assert_eq!(cc.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(cc.get("security.protocol"), Some("SSL"));
        assert_eq!(cc.get("linger.ms"), Some("20"), "the user's value wins over a default");
        assert_eq!(cc.get("batch.size"), Some("1000"));
    }

    #[test]
    fn debug_output_redacts_secret_values() {
        let p = props(&[
            ("sasl.username", "app"),
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "k3y"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----"),
            ("sasl.oauthbearer.client.secret", "s"),
        ]);
        let text = format!("{:?}", Redacted(&p));
        assert!(text.contains("\"sasl.username\": \"app\""), "{text}");
        for secret in ["hunter2", "k3y", "BEGIN PRIVATE KEY", "\"s\""] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn an_unreachable_broker_is_an_error_naming_it_after_the_timeout() {
        // Port 1 on localhost: nothing listens there.
        let started = Instant::now();
        let e = probe("127.0.0.1:1", &[], Duration::from_millis(1500)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        let text = e.to_string();
        assert!(text.contains("cannot reach the brokers at 127.0.0.1:1"), "{text}");
        assert!(e.is_retriable(), "{text}");
    }
}
