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
    let mut start = None;
    for ingress in &spec.ingresses {
        let id = &ingress.id;
        if let Some(k) = ingress
            .properties
            .keys()
            .find(|k| !["bootstrap.servers", "group.id"].contains(&k.as_str()))
        {
            bail!(
                "ingress {id}: spec.properties: {k:?} is not supported by statefun-rs (the cluster sets its consumers' properties)"
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
        if let Some(k) = egress.properties.keys().find(|k| k.as_str() != "bootstrap.servers") {
            bail!(
                "egress {}: spec.properties: {k:?} is not supported by statefun-rs (records are committed in the cluster's transaction)",
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
