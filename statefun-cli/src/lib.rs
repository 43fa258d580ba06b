//! # statefun-cli
//!
//! The `statefun` command: runs an application described by StateFun's `module.yaml`
//! as one instance of a statefun-rs cluster on Kafka. Why it exists: a StateFun user
//! moves by pointing our runtime at the module file they have, their remote functions
//! unchanged; what StateFun leaves to Flink's configuration goes in one document of
//! ours (`io.statefun-rs.v1/runtime`, see `docs/protocol.md`).
//!
//! [`plan`] turns a read module into the cluster's configuration and the remote
//! functions, refusing what cannot run as asked with an error naming the component and
//! the field. The mapping:
//!
//! * HTTP (and our gRPC) endpoints become remote functions ([`statefun_remote::remote_module`]);
//!   the smallest `maxNumBatchRequests` bounds the backlog per address.
//! * Kafka ingresses become the cluster's ingress topics, routed as StateFun does (the
//!   record key is the function id, the value is a message of the topic's `valueType`).
//!   All ingresses and egresses of an application use one Kafka cluster (`address`).
//! * Kafka egresses commit the StateFun Kafka records their functions write to the
//!   topic each names, in the cluster's transaction: exactly once for every
//!   `deliverySemantic` (stronger than `at-least-once` asks). The topics a record may
//!   name are listed in `egressTopics`.
//! * Kafka client properties: the runtime document's `kafkaProperties` go to every
//!   client of the instance (`KafkaClusterConfig::client_properties`, and the
//!   dead-letter producer). The security properties StateFun users put in an ingress's
//!   or egress's `properties` (`security.protocol`, `ssl.*`, `sasl.*`, `client.id`) are
//!   taken too, when every component that sets one agrees on its value (one Kafka
//!   cluster, one set of credentials). Properties the runtime owns are refused naming
//!   the field (`spec.kafkaProperties.<key>`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use statefun_kafka::{KafkaClusterConfig, StartPosition};
use statefun_remote::module::{ModuleSpec, StartupPosition};
use statefun_runtime::{KeyRouter, RetryConfig, RuntimeConfig};
use statefun_sdk::Module;

/// What the command line sets for one instance.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// This instance: stable across its restarts, unique in the application.
    pub instance_id: String,
    /// Overrides the module's state directory.
    pub state_dir: Option<PathBuf>,
    /// Overrides the ingresses' and egresses' `address`.
    pub bootstrap_servers: Option<String>,
}

/// An instance, ready to run.
#[derive(Debug)]
pub struct Plan {
    /// The cluster configuration (ingresses, egresses, runtime settings).
    pub cluster: KafkaClusterConfig,
    /// The remote functions.
    pub functions: Module,
    /// Where dead letters go, if anywhere but the log.
    pub dead_letter_topic: Option<String>,
}

/// Builds an instance from a module (see the crate docs). Call it inside a tokio
/// runtime (gRPC endpoints open their channel there).
pub fn plan(spec: &ModuleSpec, overrides: &Overrides) -> anyhow::Result<Plan> {
    use anyhow::{Context as _, bail};
    if spec.ingresses.is_empty() {
        bail!("the module has no io.statefun.kafka.v1/ingress: nothing would reach its functions");
    }
    let functions = statefun_remote::remote_module(spec).context("the module's endpoints")?;
    let first = &spec.ingresses[0];
    let bootstrap = overrides
        .bootstrap_servers
        .clone()
        .unwrap_or_else(|| first.address.clone());
    if overrides.bootstrap_servers.is_none() {
        let addresses = spec
            .ingresses
            .iter()
            .map(|i| (&i.id, &i.address))
            .chain(spec.egresses.iter().map(|e| (&e.id, &e.address)));
        for (id, address) in addresses {
            if *address != bootstrap {
                bail!(
                    "{id}: spec.address {address:?} differs from {bootstrap:?}: statefun-rs runs an application on one Kafka cluster"
                );
            }
        }
    }
    let rt = &spec.runtime;
    let application_id = rt
        .application_id
        .clone()
        .unwrap_or_else(|| first.consumer_group_id.clone());
    let state_dir = overrides
        .state_dir
        .clone()
        .or_else(|| rt.state_dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("statefun-state"));
    let mut cluster = KafkaClusterConfig::new(
        &bootstrap,
        application_id,
        &overrides.instance_id,
        rt.partitions,
        state_dir,
    );
    cluster.commit_interval = rt.commit_interval;
    // Dead letters of messages commit in the transaction; those of ingress records that
    // cannot be routed go through the instance's dead-letter producer, same topic.
    cluster.dead_letter_topic = rt.dead_letter_topic.clone();
    cluster.replication_factor = rt.replication_factor;
    cluster.min_insync_replicas = rt.min_insync_replicas;
    cluster.static_membership = rt.static_membership;
    cluster.session_timeout = rt.session_timeout;
    cluster.client_properties = client_properties(spec)?;
    let mut start = None;
    for ingress in &spec.ingresses {
        let id = &ingress.id;
        if let Some(k) = ingress
            .properties
            .keys()
            .find(|k| !["bootstrap.servers", "group.id"].contains(&k.as_str()) && !is_security_property(k))
        {
            bail!(
                "ingress {id}: spec.properties: {k:?} is not supported by statefun-rs (the cluster sets its consumers' properties; \
                 only security.protocol, ssl.*, sasl.* and client.id are taken here, other client properties go in \
                 io.statefun-rs.v1/runtime spec.kafkaProperties)"
            );
        }
        let position = match &ingress.startup_position {
            StartupPosition::Earliest => StartPosition::Earliest,
            StartupPosition::Latest => StartPosition::Latest,
            // The cluster keeps its progress with the state, not in the group's
            // offsets: a first start falls back to the reset position, as StateFun does
            // for a group without offsets.
            StartupPosition::GroupOffsets if ingress.auto_offset_reset_earliest => StartPosition::Earliest,
            StartupPosition::GroupOffsets => StartPosition::Latest,
            other => bail!(
                "ingress {id}: spec.startupPosition: {other:?} is not supported by statefun-rs (earliest, latest or group-offsets)"
            ),
        };
        if start.is_some_and(|s| s != position) {
            bail!(
                "ingress {id}: spec.startupPosition differs from another ingress's: statefun-rs starts every ingress topic at one position"
            );
        }
        start = Some(position);
        for (i, topic) in ingress.topics.iter().enumerate() {
            if let Some(target) = topic.targets.iter().find(|t| functions.get(t).is_none()) {
                bail!("ingress {id}: spec.topics[{i}].targets: no endpoint serves function type {target}");
            }
            // Every target gets each record (one acceptance, one message per target).
            let router = KeyRouter::to_all(topic.targets.clone(), topic.value_type.clone())
                .with_context(|| format!("ingress {id}: spec.topics[{i}].targets: no target"))?;
            cluster = cluster.ingress(&topic.topic, router);
        }
    }
    cluster.start = start.unwrap_or_default();
    for egress in &spec.egresses {
        let topics: BTreeSet<String> = rt
            .egress_topics
            .get(&egress.id)
            .with_context(|| {
                format!(
                    "egress {}: list the topics its records may name in io.statefun-rs.v1/runtime spec.egressTopics",
                    egress.id
                )
            })?
            .iter()
            .cloned()
            .collect();
        if let Some(k) = egress
            .properties
            .keys()
            .find(|k| k.as_str() != "bootstrap.servers" && !is_security_property(k))
        {
            bail!(
                "egress {}: spec.properties: {k:?} is not supported by statefun-rs (records are committed in the cluster's transaction; \
                 only security.protocol, ssl.*, sasl.* and client.id are taken here, other client properties go in \
                 io.statefun-rs.v1/runtime spec.kafkaProperties)",
                egress.id
            );
        }
        cluster = cluster.record_egress(egress.id.clone(), topics);
    }
    if let Some(id) = rt
        .egress_topics
        .keys()
        .find(|id| !spec.egresses.iter().any(|e| &e.id == *id))
    {
        bail!("io.statefun-rs.v1/runtime spec.egressTopics: {id} is not an io.statefun.kafka.v1/egress of the module");
    }
    let max_queued = spec
        .endpoints
        .iter()
        .filter_map(|e| e.max_num_batch_requests)
        .min()
        .map_or(usize::MAX, |m| m as usize);
    cluster.runtime = RuntimeConfig {
        max_queued_per_address: max_queued,
        retry: RetryConfig {
            max_attempts: rt.max_attempts,
            initial_backoff_ms: millis(rt.initial_backoff),
            max_backoff_ms: millis(rt.max_backoff),
        },
        ..Default::default()
    };
    Ok(Plan {
        cluster,
        functions,
        dead_letter_topic: rt.dead_letter_topic.clone(),
    })
}

/// Whether a StateFun ingress's or egress's property is one the `statefun` command takes
/// from there (connection security and the client id).
fn is_security_property(key: &str) -> bool {
    key == "security.protocol" || key == "client.id" || key.starts_with("ssl.") || key.starts_with("sasl.")
}

/// The librdkafka properties of every client of the instance: the runtime document's
/// `kafkaProperties`, and the security properties of the ingresses and egresses, which
/// must agree with each other and with `kafkaProperties` where they overlap.
fn client_properties(spec: &ModuleSpec) -> anyhow::Result<Vec<(String, String)>> {
    use anyhow::bail;
    const DOCUMENT: &str = "io.statefun-rs.v1/runtime spec.kafkaProperties";
    let mut merged: std::collections::BTreeMap<&str, (&str, String)> = std::collections::BTreeMap::new();
    for (key, value) in &spec.runtime.kafka_properties {
        if let Some(why) = statefun_kafka::reserved_property(key) {
            let instead = match key.as_str() {
                "session.timeout.ms" => " Use spec.sessionTimeout.".to_owned(),
                "group.instance.id" => " Use spec.staticMembership.".to_owned(),
                "group.id" => " The group is spec.applicationId.".to_owned(),
                "bootstrap.servers" | "metadata.broker.list" => {
                    " Use the ingresses' address (or `statefun run --bootstrap-servers`).".to_owned()
                }
                _ => String::new(),
            };
            bail!("{DOCUMENT}.{key}: the runtime sets it itself: {why}.{instead}");
        }
        merged.insert(key, (value, DOCUMENT.to_owned()));
    }
    let components = spec
        .ingresses
        .iter()
        .map(|i| (format!("ingress {}", i.id), &i.properties))
        .chain(
            spec.egresses
                .iter()
                .map(|e| (format!("egress {}", e.id), &e.properties)),
        );
    for (component, properties) in components {
        for (key, value) in properties.iter().filter(|(k, _)| is_security_property(k)) {
            match merged.get(key.as_str()) {
                Some((other, from)) if *other != value.as_str() => bail!(
                    "{component}: spec.properties: {key} differs from the value in {from}: statefun-rs runs all of \
                     an application's Kafka clients with one set of properties; give it once, in {DOCUMENT}"
                ),
                Some(_) => {}
                None => {
                    merged.insert(key, (value, component.clone()));
                }
            }
        }
    }
    Ok(merged
        .into_iter()
        .map(|(k, (v, _))| (k.to_owned(), v.to_owned()))
        .collect())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use statefun_remote::module::parse;

    const BASE: &str = "\
kind: io.statefun.endpoints.v2/http
spec:
  functions: com.example/*
  urlPathTemplate: http://127.0.0.1:8000/{function.name}
  maxNumBatchRequests: 50
---
kind: io.statefun.kafka.v1/ingress
spec:
  id: com.example/names
  address: kafka:9092
  consumerGroupId: greeter
  startupPosition:
    type: earliest
  topics:
    - topic: names
      valueType: io.statefun.types/string
      targets: [com.example/greeter]
---
kind: io.statefun.kafka.v1/egress
spec:
  id: com.example/out
  address: kafka:9092
";

    fn overrides() -> Overrides {
        Overrides {
            instance_id: "a".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_statefun_module_maps_onto_the_cluster_configuration() {
        let text = format!(
            "{BASE}---\nkind: io.statefun-rs.v1/runtime\nspec:\n  partitions: 4\n  egressTopics:\n    com.example/out: [greetings]\n"
        );
        let p = plan(&parse(&text).unwrap(), &overrides()).unwrap();
        assert_eq!(p.cluster.application_id, "greeter", "the ingress's consumer group");
        assert_eq!(p.cluster.partitions, 4);
        assert_eq!(p.cluster.bootstrap_servers, "kafka:9092");
        assert_eq!(p.cluster.ingress.len(), 1);
        assert_eq!(p.cluster.start, StartPosition::Earliest);
        assert_eq!(p.cluster.runtime.max_queued_per_address, 50);
        let out = statefun_sdk::TypeName::parse("com.example/out").unwrap();
        assert!(p.cluster.record_egresses[&out].contains("greetings"));
        assert!(
            p.functions
                .get(&statefun_sdk::TypeName::parse("com.example/anything").unwrap())
                .is_some()
        );
    }

    const RUNTIME: &str =
        "---\nkind: io.statefun-rs.v1/runtime\nspec:\n  egressTopics:\n    com.example/out: [greetings]\n";

    /// `BASE` with `properties` (YAML lines, already indented for a list of one-entry
    /// maps) on the ingress and the egress, and `runtime` lines added to the runtime
    /// document's spec.
    fn module(ingress: &str, egress: &str, runtime: &str) -> String {
        let with = |kind: &str, props: &str, text: String| {
            if props.is_empty() {
                return text;
            }
            let anchor = format!("kind: io.statefun.kafka.v1/{kind}\nspec:\n");
            text.replace(&anchor, &format!("{anchor}  properties:\n{props}"))
        };
        let text = with("ingress", ingress, BASE.to_owned());
        let text = with("egress", egress, text);
        format!("{text}{RUNTIME}{runtime}")
    }

    #[tokio::test]
    async fn kafka_properties_and_the_components_security_properties_reach_every_client() {
        let text = module(
            "    - security.protocol: SASL_SSL\n    - sasl.username: app\n",
            "    - security.protocol: SASL_SSL\n    - ssl.ca.location: /etc/ca.pem\n",
            "  kafkaProperties:\n    sasl.mechanisms: SCRAM-SHA-256\n    sasl.password: secret\n    linger.ms: 10\n  \
             replicationFactor: 3\n  minInsyncReplicas: 2\n  staticMembership: false\n  sessionTimeout: 20s\n",
        );
        let p = plan(&parse(&text).unwrap(), &overrides()).unwrap();
        let props: std::collections::BTreeMap<&str, &str> = p
            .cluster
            .client_properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            props,
            [
                ("linger.ms", "10"),
                ("sasl.mechanisms", "SCRAM-SHA-256"),
                ("sasl.password", "secret"),
                ("sasl.username", "app"),
                ("security.protocol", "SASL_SSL"),
                ("ssl.ca.location", "/etc/ca.pem"),
            ]
            .into()
        );
        assert_eq!(p.cluster.replication_factor, Some(3));
        assert_eq!(p.cluster.min_insync_replicas, Some(2));
        assert!(!p.cluster.static_membership);
        assert_eq!(p.cluster.session_timeout, Duration::from_secs(20));
        assert!(
            !format!("{:?}", p.cluster).contains("secret"),
            "the password is redacted in Debug"
        );

        let defaults = plan(&parse(&module("", "", "")).unwrap(), &overrides()).unwrap();
        assert!(defaults.cluster.client_properties.is_empty());
        assert_eq!(defaults.cluster.replication_factor, None, "decided from the brokers");
        assert!(defaults.cluster.static_membership);
    }

    #[tokio::test]
    async fn kafka_properties_the_runtime_owns_or_that_disagree_are_refused_naming_the_field() {
        let cases = [
            (
                module("", "", "  kafkaProperties:\n    transactional.id: mine\n"),
                "io.statefun-rs.v1/runtime spec.kafkaProperties.transactional.id: the runtime sets it itself",
            ),
            (
                module("", "", "  kafkaProperties:\n    isolation.level: read_uncommitted\n"),
                "spec.kafkaProperties.isolation.level: the runtime sets it itself",
            ),
            (
                module("", "", "  kafkaProperties:\n    session.timeout.ms: 30000\n"),
                "spec.kafkaProperties.session.timeout.ms: the runtime sets it itself: set it with the \
                 session_timeout field. Use spec.sessionTimeout.",
            ),
            (
                module("", "", "  kafkaProperties:\n    enable.auto.commit: true\n"),
                "spec.kafkaProperties.enable.auto.commit",
            ),
            (
                module(
                    "    - security.protocol: SASL_SSL\n",
                    "    - security.protocol: SSL\n",
                    "",
                ),
                "egress com.example/out: spec.properties: security.protocol differs from the value in ingress \
                 com.example/names",
            ),
            (
                module(
                    "    - sasl.password: pw-one\n",
                    "",
                    "  kafkaProperties:\n    sasl.password: pw-two\n",
                ),
                "ingress com.example/names: spec.properties: sasl.password differs from the value in \
                 io.statefun-rs.v1/runtime spec.kafkaProperties",
            ),
            (
                module("    - max.poll.records: 10\n", "", ""),
                "ingress com.example/names: spec.properties: \"max.poll.records\" is not supported",
            ),
            (
                module("", "    - acks: 1\n", ""),
                "egress com.example/out: spec.properties: \"acks\" is not supported",
            ),
        ];
        for (text, expected) in cases {
            let e = plan(&parse(&text).unwrap(), &overrides()).unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains(expected), "{e}\nshould contain\n{expected}");
            assert!(!e.contains("pw-"), "secret values leaked: {e}");
        }
    }

    #[tokio::test]
    async fn what_cannot_run_as_asked_is_refused_naming_the_component_and_field() {
        let egress_topics =
            "---\nkind: io.statefun-rs.v1/runtime\nspec:\n  egressTopics:\n    com.example/out: [greetings]\n";
        let cases = [
            (BASE.to_owned(), "egress com.example/out: list the topics"),
            (
                format!("{BASE}{egress_topics}").replace(
                    "targets: [com.example/greeter]",
                    "targets: [com.example/greeter, elsewhere/other]",
                ),
                "ingress com.example/names: spec.topics[0].targets: no endpoint serves function type elsewhere/other",
            ),
            (
                format!("{BASE}{egress_topics}")
                    .replace("targets: [com.example/greeter]", "targets: [elsewhere/greeter]"),
                "no endpoint serves function type elsewhere/greeter",
            ),
            (
                format!("{BASE}{egress_topics}")
                    .replace("type: earliest", "type: date\n    date: 2020-01-01 00:00:00.000 +0000"),
                "spec.startupPosition: Date",
            ),
            (
                format!("{BASE}{egress_topics}").replacen("address: kafka:9092", "address: other:9092", 1),
                "spec.address \"kafka:9092\" differs from \"other:9092\"",
            ),
        ];
        for (text, expected) in cases {
            let e = plan(&parse(&text).unwrap(), &overrides()).unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }
}
