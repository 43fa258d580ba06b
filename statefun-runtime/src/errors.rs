//! The errors users of the runtime see: building or running it ([`Error`]), sending
//! through a handle ([`SendError`]), querying through a handle ([`QueryError`]). Each
//! variant says whose fault it is and what to do.
//!
//! They sit just above the state layer (they carry the state backend's
//! [`state::Error`]) and below everything that returns them.

use statefun_sdk::TypeName;

use crate::config::ConfigError;
use crate::partitioner::PartitionId;
use crate::state;

/// Why the runtime could not be built or failed while running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid (operator's fault; fix the config).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No module was given (programmer's fault).
    #[error("no functions registered: call RuntimeBuilder::module")]
    NoModule,
    /// The state backend failed to open a partition.
    #[error("cannot open state of partition {partition}: {source}")]
    State {
        /// The partition.
        partition: PartitionId,
        /// The backend's error.
        #[source]
        source: state::Error,
    },
    /// A partition task ended unexpectedly (an internal bug; please report it).
    #[error("partition task failed: {0}")]
    Internal(String),
    /// An egress sink is registered, but the state backend commits per interval
    /// ([`StateBackend::commit_interval`](state::StateBackend::commit_interval)) and
    /// does not take this egress: its records would leave before the state that
    /// produced them is committed, and a crash would produce them again under new ids.
    #[error(
        "egress {0} has a sink, but the state backend commits per interval and does not commit this egress: \
         commit it with the backend (e.g. KafkaChangelogConfig::egress) instead of registering a sink"
    )]
    EgressOutsideCommit(TypeName),
    /// The state backend could not commit (see [`StateBackend::commit`](state::StateBackend::commit)): a permanent
    /// failure during the run, or any failure of the final commit at shutdown. What was
    /// not committed is redone from the last commit when the runtime starts again.
    #[error("cannot commit state: {0}")]
    Commit(#[source] state::Error),
}

/// Why a message could not be sent through a [`RuntimeHandle`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No function is registered for the target's type.
    #[error("no function registered for type {0}")]
    UnknownFunctionType(TypeName),
    /// The runtime is stopping or stopped.
    #[error("runtime is shutting down")]
    ShuttingDown,
    /// Cluster mode: no partition runs on this instance (now), so none can accept it.
    #[error("partition {0} does not run on this instance")]
    NotOwned(PartitionId),
    /// The value could not be encoded.
    #[error(transparent)]
    Codec(#[from] statefun_sdk::CodecError),
}

/// Why a query through a [`RuntimeHandle`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The runtime is not running.
    #[error("runtime is not running")]
    NotRunning,
    /// Cluster mode: the partition asked about runs on another instance.
    #[error("partition {0} does not run on this instance")]
    NotOwned(PartitionId),
    /// The function type is unknown or does not declare this state.
    #[error("state {name:?} is not declared by {function}")]
    Undeclared {
        /// The function type.
        function: TypeName,
        /// The state name.
        name: String,
    },
    /// The state backend failed.
    #[error(transparent)]
    State(#[from] state::Error),
    /// The stored value does not decode as the requested type.
    #[error(transparent)]
    Codec(#[from] statefun_sdk::CodecError),
}
