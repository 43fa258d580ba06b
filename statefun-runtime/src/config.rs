//! The runtime's configuration: one typed struct, passed explicitly.
//!
//! Every field has a documented default (`RuntimeConfig::default()`); unknown fields are
//! rejected when deserializing, so a typo in a config file is an error, not a silent
//! default. [`RuntimeConfig::validate`] checks ranges and is called by the builder.

use serde::{Deserialize, Serialize};

/// Why a configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Retry policy for failing invocations, before the address is parked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per message, including the first, before the address is parked and the
    /// message is dead-lettered. Default: 6.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt. Default: 100 ms.
    pub initial_backoff_ms: u64,
    /// Upper bound of the backoff. Default: 10 000 ms.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 6,
            initial_backoff_ms: 100,
            max_backoff_ms: 10_000,
        }
    }
}

impl RetryConfig {
    /// Backoff after `failures` failed attempts (1 = after the first failure).
    pub fn backoff(&self, failures: u32) -> std::time::Duration {
        let exp = failures.saturating_sub(1).min(30);
        let ms = self
            .initial_backoff_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_backoff_ms);
        std::time::Duration::from_millis(ms)
    }
}

/// Configuration of a runtime instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Number of partitions the address space is cut into. Fixed for the life of the
    /// state: changing it moves addresses between partitions. Default: 8.
    pub partitions: u32,
    /// Most messages for one address handed to one invocation batch (StateFun's
    /// `maxNumBatchRequests`). Default: 1000.
    pub max_batch_size: usize,
    /// Messages queued for one address behind its batch in flight before its partition
    /// stops taking ingress records until the backlog drains below it (StateFun's
    /// `maxNumBatchRequests`: with a slow remote function, the backlog of one hot
    /// address stays bounded instead of filling the partition's buffer). Internal
    /// messages between functions are still accepted. Default: 1000.
    pub max_queued_per_address: usize,
    /// Messages a partition holds (queued or in flight) before it stops taking ingress
    /// records; internal messages between functions are always accepted so that
    /// partitions cannot deadlock each other. Default: 10 000.
    pub max_buffered_per_partition: usize,
    /// Capacity of each partition's ingress queue. Default: 1024.
    pub ingress_queue_capacity: usize,
    /// Retry policy for failing invocations.
    pub retry: RetryConfig,
    /// On shutdown, how long to wait for in-flight and queued messages to finish before
    /// stopping anyway. Default: 30 000 ms.
    pub drain_timeout_ms: u64,
    /// Interval of periodic checkpoints, for state backends that take them (RocksDB with
    /// a checkpoint directory); 0 disables periodic checkpoints (on-demand ones through
    /// `RuntimeHandle::checkpoint` still work). Default: 60 000 ms.
    pub checkpoint_interval_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            partitions: 8,
            max_batch_size: 1000,
            max_queued_per_address: 1000,
            max_buffered_per_partition: 10_000,
            ingress_queue_capacity: 1024,
            retry: RetryConfig::default(),
            drain_timeout_ms: 30_000,
            checkpoint_interval_ms: 60_000,
        }
    }
}

impl RuntimeConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.partitions == 0 || self.partitions > 65_536 {
            return err("partitions", "must be between 1 and 65536");
        }
        if self.max_batch_size == 0 {
            return err("max_batch_size", "must be at least 1");
        }
        if self.max_queued_per_address == 0 {
            return err("max_queued_per_address", "must be at least 1");
        }
        if self.max_buffered_per_partition == 0 {
            return err("max_buffered_per_partition", "must be at least 1");
        }
        if self.ingress_queue_capacity == 0 {
            return err("ingress_queue_capacity", "must be at least 1");
        }
        if self.retry.max_attempts == 0 {
            return err("retry.max_attempts", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<RuntimeConfig>(r#"{"partitons": 4}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn missing_fields_take_their_defaults() {
        let c: RuntimeConfig = serde_json::from_str(r#"{"partitions": 4, "retry": {"max_attempts": 2}}"#).unwrap();
        assert_eq!(c.partitions, 4);
        assert_eq!(c.retry.max_attempts, 2);
        assert_eq!(c.retry.initial_backoff_ms, 100);
        assert_eq!(c.max_batch_size, 1000);
    }

    #[test]
    fn invalid_ranges_name_the_field() {
        let c = RuntimeConfig {
            partitions: 0,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "partitions");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = RetryConfig::default();
        assert_eq!(r.backoff(1).as_millis(), 100);
        assert_eq!(r.backoff(3).as_millis(), 400);
        assert_eq!(r.backoff(40).as_millis(), 10_000);
    }
}
