//! What a partition and a finished run report: plain counters.

use crate::partitioner::PartitionId;

/// Counters of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// The partition.
    pub partition: PartitionId,
    /// Messages processed successfully.
    pub invocations: u64,
    /// Invocation batches started (a batch holds one or more messages of one address).
    pub batches: u64,
    /// Failed invocation attempts.
    pub failures: u64,
    /// Messages dead-lettered by this partition.
    pub dead_letters: u64,
    /// Addresses parked now.
    pub parked: usize,
    /// Addresses with queued or in-flight messages now.
    pub active_addresses: usize,
    /// Messages queued or in flight now.
    pub buffered: usize,
    /// Delayed messages waiting now.
    pub pending_delayed: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Final statistics of each partition.
    pub partitions: Vec<PartitionStats>,
    /// Errors the ingresses stopped with.
    pub ingress_errors: Vec<String>,
    /// False if the drain timeout expired with messages still outstanding.
    pub drained: bool,
}

impl RunReport {
    /// Invocations over all partitions.
    pub fn invocations(&self) -> u64 {
        self.partitions.iter().map(|p| p.invocations).sum()
    }
}
