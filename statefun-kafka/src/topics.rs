//! The runtime's own topics (the changelog, cluster mode's internal topic): created
//! with the configured replication, or checked when they exist.
//!
//! Why it exists: a topic created with replication factor 1 loses state with its one
//! broker, and an existing topic with the wrong partition count or cleanup policy breaks
//! the runtime long after the start (a changelog that deletes old records loses state;
//! a compacted internal topic refuses the runtime's keyless messages). So a created
//! topic gets a replication factor of min(3, brokers) and `min.insync.replicas` one
//! less (at least 1) unless configured, and an existing topic that does not fit is an
//! error at start naming the topic and what to change. Never silent: what cannot be
//! checked (no `DescribeConfigs` right) is logged as a warning.
//!
//! Who it talks to: the admin API (`CreateTopics`, `DescribeConfigs`) and the metadata,
//! through a client built by `client::client_config`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::Error;

/// The admin client that creates and checks the runtime's topics: the user's
/// properties, and no automatic topic creation (its metadata requests name topics that
/// may not exist yet, and a broker with `auto.create.topics.enable` would create them
/// with its defaults).
pub(crate) fn admin(
    bootstrap_servers: &str,
    properties: &[(String, String)],
) -> Result<AdminClient<DefaultClientContext>, Error> {
    crate::client::client_config(bootstrap_servers, properties)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(crate::kafka("cannot create an admin client"))
}

/// The replication of created topics, as configured (`None`: the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replication {
    /// Replication factor. Default: min(3, brokers).
    pub(crate) factor: Option<i32>,
    /// `min.insync.replicas`. Default: the replication factor - 1, at least 1.
    pub(crate) min_insync: Option<i32>,
}

impl Replication {
    /// Checks what is configured alone (before the broker count is known); `owner`
    /// names the configuration ("KafkaClusterConfig").
    pub(crate) fn check(&self, owner: &str) -> Result<(), String> {
        if let Some(rf) = self.factor
            && rf < 1
        {
            return Err(format!("{owner}::replication_factor is {rf}: it must be at least 1"));
        }
        if let Some(isr) = self.min_insync
            && isr < 1
        {
            return Err(format!("{owner}::min_insync_replicas is {isr}: it must be at least 1"));
        }
        if let (Some(rf), Some(isr)) = (self.factor, self.min_insync)
            && isr > rf
        {
            return Err(format!(
                "{owner}::min_insync_replicas ({isr}) is above replication_factor ({rf}): no write could \
                 ever succeed"
            ));
        }
        Ok(())
    }

    /// The replication factor and `min.insync.replicas` for a cluster of `brokers`.
    pub(crate) fn resolve(&self, brokers: usize, owner: &str) -> Result<(i32, i32), String> {
        self.check(owner)?;
        let brokers = i32::try_from(brokers).unwrap_or(i32::MAX).max(1);
        let rf = self.factor.unwrap_or(brokers.min(3));
        if rf > brokers {
            return Err(format!(
                "{owner}::replication_factor is {rf}, but the cluster has {brokers} broker{} in its \
                 metadata (the ones that are up): lower it, or start when its brokers are up",
                if brokers == 1 { "" } else { "s" }
            ));
        }
        let isr = self.min_insync.unwrap_or((rf - 1).max(1));
        if isr > rf {
            return Err(format!(
                "{owner}::min_insync_replicas ({isr}) is above the replication factor ({rf})"
            ));
        }
        Ok((rf, isr))
    }
}

/// One of the runtime's topics.
#[derive(Debug, Clone)]
pub(crate) struct OwnTopic<'a> {
    /// Its name.
    pub(crate) name: &'a str,
    /// What it is, for errors ("changelog topic").
    pub(crate) what: &'static str,
    /// The partition count it must have.
    pub(crate) partitions: i32,
    /// The `cleanup.policy` it must have.
    pub(crate) cleanup_policy: &'static str,
    /// Why, for errors.
    pub(crate) why: &'static str,
}

/// What to do when the topic is missing.
#[derive(Debug, Clone)]
pub(crate) enum Missing {
    /// Create it (with the configured replication, resolved for the cluster's brokers).
    Create {
        /// As configured.
        replication: Replication,
        /// The brokers in the cluster's metadata.
        brokers: usize,
        /// Names the configuration in errors ("KafkaClusterConfig").
        owner: &'static str,
    },
    /// It is provisioned elsewhere: a missing topic is an error, and the check of an
    /// existing topic's configuration is best effort (a warning when it cannot be read).
    Refuse,
}

/// Creates `topic` if it is missing (or refuses, per `missing`); checks an existing one:
/// its partition count and cleanup policy (errors naming the topic and what to change),
/// its replication factor (a warning when it is below what would be created).
pub(crate) async fn ensure(
    admin: &AdminClient<DefaultClientContext>,
    topic: &OwnTopic<'_>,
    missing: &Missing,
    timeout: Duration,
) -> Result<(), Error> {
    let created_with = match missing {
        Missing::Create {
            replication,
            brokers,
            owner,
        } => Some(replication.resolve(*brokers, owner).map_err(Error::Config)?),
        Missing::Refuse => None,
    };
    if let Some((rf, isr)) = created_with {
        let isr_text = isr.to_string();
        let new = NewTopic::new(topic.name, topic.partitions, TopicReplication::Fixed(rf))
            .set("cleanup.policy", topic.cleanup_policy)
            .set("min.insync.replicas", &isr_text);
        let results = admin
            .create_topics([&new], &AdminOptions::new().operation_timeout(Some(timeout)))
            .await
            .map_err(|source| Error::Kafka {
                what: format!("cannot create the {} {}", topic.what, topic.name).into(),
                source,
            })?;
        match results.into_iter().next() {
            // Created here: it has exactly the settings above.
            Some(Ok(_)) => {
                tracing::info!(
                    topic = topic.name,
                    partitions = topic.partitions,
                    replication_factor = rf,
                    min_insync_replicas = isr,
                    "created the {}",
                    topic.what
                );
                return Ok(());
            }
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => {}
            Some(Err((t, code))) => {
                return Err(Error::Kafka {
                    what: format!("cannot create the {} {t}", topic.what).into(),
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    check_existing(admin, topic, created_with.map(|(rf, _)| rf), timeout).await
}

/// Checks an existing topic (see [`ensure`]).
async fn check_existing(
    admin: &AdminClient<DefaultClientContext>,
    topic: &OwnTopic<'_>,
    wanted_rf: Option<i32>,
    timeout: Duration,
) -> Result<(), Error> {
    // A topic that another instance is creating at this moment (our create was answered
    // TopicAlreadyExists) may take a moment to appear in the metadata, with its leaders:
    // wait for it rather than call it missing (instances that start together).
    let deadline = std::time::Instant::now() + if wanted_rf.is_some() { timeout } else { Duration::ZERO };
    let found = loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic.name), timeout)
            .map_err(|source| Error::Kafka {
                what: format!("cannot read the metadata of the {} {}", topic.what, topic.name).into(),
                source,
            })?;
        let found = md
            .topics()
            .iter()
            .find(|t| t.name() == topic.name && t.error().is_none())
            .map(|t| {
                (
                    t.partitions().len(),
                    t.partitions().iter().map(|p| p.replicas().len()).min(),
                )
            })
            .filter(|(n, _)| *n > 0);
        if found.is_some() || std::time::Instant::now() >= deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Some((partitions, replicas)) = found else {
        return Err(Error::Topic {
            topic: topic.name.to_owned(),
            problem: format!(
                "the {} does not exist; create it with {} partitions and cleanup.policy={} (or let the \
                 runtime create it)",
                topic.what, topic.partitions, topic.cleanup_policy
            ),
        });
    };
    if partitions != topic.partitions as usize {
        return Err(Error::Topic {
            topic: topic.name.to_owned(),
            problem: format!(
                "the {} has {partitions} partition{}; it needs one per runtime partition ({}). The \
                 partition count is fixed for the life of the application's state: configure the \
                 partition count the topic was created for, or use another topic (another \
                 application id)",
                topic.what,
                if partitions == 1 { "" } else { "s" },
                topic.partitions
            ),
        });
    }
    if let (Some(wanted), Some(replicas)) = (wanted_rf, replicas)
        && (replicas as i32) < wanted
    {
        tracing::warn!(
            topic = topic.name,
            replicas,
            wanted,
            "the {} has fewer replicas than the runtime would create it with: one broker's loss can \
             lose it. Raise its replication factor (kafka-reassign-partitions.sh)",
            topic.what
        );
    }
    // Where the topic is provisioned elsewhere, this client may have no right to read
    // its configuration, or the brokers no such API (librdkafka's mock cluster): the
    // check is then best effort, a warning, and bounded to a few seconds. (Only a topic
    // the runtime may create has a wanted replication factor.)
    let best_effort = wanted_rf.is_none();
    let request_timeout = if best_effort {
        timeout.min(Duration::from_secs(5))
    } else {
        timeout
    };
    // A topic another instance has just created may still show the broker's default
    // policy on the broker that answers (its metadata not yet there: seen on a
    // three-broker cluster when two instances started together). A default value is
    // read again for a few seconds; a policy set on the topic is final at once.
    let settle = std::time::Instant::now() + timeout.min(Duration::from_secs(10));
    let failed = loop {
        let described = admin
            .describe_configs(
                [&ResourceSpecifier::Topic(topic.name)],
                &AdminOptions::new().request_timeout(Some(request_timeout)),
            )
            .await;
        let read = match described.map(|mut r| r.pop()) {
            Ok(Some(Ok(resource))) => Ok(resource.get("cleanup.policy").map(|e| (e.value.clone(), e.is_default))),
            Ok(None) => Ok(None),
            Ok(Some(Err(code))) => Err(KafkaError::AdminOp(code)),
            Err(e) => Err(e),
        };
        match read {
            Ok(Some((value, true)))
                if !same_policy(value.as_deref().unwrap_or("delete"), topic.cleanup_policy)
                    && std::time::Instant::now() < settle =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other.map(|entry| entry.and_then(|(value, _)| value)),
        }
    };
    let policy = match failed {
        Ok(policy) => policy,
        Err(e) if best_effort || code_of(&e).is_some_and(cannot_describe) => {
            tracing::warn!(
                topic = topic.name,
                error = %e,
                "cannot read the {}'s configuration (DescribeConfigs): make sure its cleanup.policy is {}",
                topic.what,
                topic.cleanup_policy
            );
            return Ok(());
        }
        Err(source) => {
            return Err(Error::Kafka {
                what: format!("cannot read the configuration of the {} {}", topic.what, topic.name).into(),
                source,
            });
        }
    };
    let policy = policy.unwrap_or_else(|| "delete".to_owned());
    if !same_policy(&policy, topic.cleanup_policy) {
        return Err(Error::Topic {
            topic: topic.name.to_owned(),
            problem: format!(
                "the {} has cleanup.policy={policy}; it must be {} ({}). Change it with \
                 `kafka-configs.sh --bootstrap-server ... --alter --entity-type topics --entity-name {} \
                 --add-config cleanup.policy={}`",
                topic.what, topic.cleanup_policy, topic.why, topic.name, topic.cleanup_policy
            ),
        });
    }
    Ok(())
}

/// The error code of an admin call's error.
fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

/// Errors of `DescribeConfigs` that mean the check cannot be made here (no right to
/// it, a broker or mock without the API), not that the topic is wrong.
fn cannot_describe(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::UnsupportedVersion
            | RDKafkaErrorCode::UnsupportedFeature
    )
}

/// Whether a `cleanup.policy` value (a list such as `compact,delete`) is exactly `want`.
fn same_policy(value: &str, want: &str) -> bool {
    let mut parts: Vec<&str> = value.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts == [want]
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "KafkaClusterConfig";

    #[test]
    fn replication_defaults_to_three_or_the_brokers_and_min_insync_one_less() {
        let default = Replication {
            factor: None,
            min_insync: None,
        };
        assert_eq!(default.resolve(1, OWNER), Ok((1, 1)));
        assert_eq!(default.resolve(2, OWNER), Ok((2, 1)));
        assert_eq!(default.resolve(3, OWNER), Ok((3, 2)));
        assert_eq!(default.resolve(6, OWNER), Ok((3, 2)));
        let set = Replication {
            factor: Some(2),
            min_insync: None,
        };
        assert_eq!(set.resolve(5, OWNER), Ok((2, 1)));
        let both = Replication {
            factor: Some(3),
            min_insync: Some(3),
        };
        assert_eq!(both.resolve(3, OWNER), Ok((3, 3)));
    }

    #[test]
    fn impossible_replication_is_refused_naming_the_field() {
        let cases = [
            (Some(0), None, 3, "KafkaClusterConfig::replication_factor is 0"),
            (None, Some(0), 3, "KafkaClusterConfig::min_insync_replicas is 0"),
            (
                Some(2),
                Some(3),
                3,
                "min_insync_replicas (3) is above replication_factor (2)",
            ),
            (
                Some(3),
                None,
                1,
                "replication_factor is 3, but the cluster has 1 broker",
            ),
            (
                None,
                Some(3),
                2,
                "min_insync_replicas (3) is above the replication factor (2)",
            ),
        ];
        for (factor, min_insync, brokers, expected) in cases {
            let e = Replication { factor, min_insync }.resolve(brokers, OWNER).unwrap_err();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }

    #[test]
    fn a_cleanup_policy_matches_only_exactly() {
        assert!(same_policy("compact", "compact"));
        assert!(same_policy(" compact ", "compact"));
        assert!(!same_policy("compact,delete", "compact"));
        assert!(!same_policy("delete,compact", "delete"));
        assert!(same_policy("delete", "delete"));
        assert!(!same_policy("", "delete"));
    }
}
