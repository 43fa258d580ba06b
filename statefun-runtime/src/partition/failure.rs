//! Why an invocation batch failed, typed until it leaves the partition: as the text of
//! a retry's log line, of a park reason or of a dead letter's reason.

use std::sync::Arc;

use crate::state;

/// A failed batch: which message failed, and why.
#[derive(Debug)]
pub(super) struct Failure {
    /// Index in the batch of the message that failed.
    pub(super) index: usize,
    pub(super) kind: FailureKind,
}

impl Failure {
    /// A failure of the batch as a whole (its first message).
    pub(super) fn of_batch(kind: FailureKind) -> Failure {
        Failure { index: 0, kind }
    }
}

/// What went wrong.
#[derive(Debug)]
pub(super) enum FailureKind {
    /// The function returned an error (its error chain).
    Function(String),
    /// The function panicked (the panic message).
    Panic(String),
    /// A declared state could not be read before the batch.
    StateRead { name: Arc<str>, error: state::Error },
    /// The batch's commit could not be written.
    StateWrite(state::Error),
    /// The backend refuses a value or message the batch produced (e.g. larger than a
    /// Kafka record may be): `what` names it.
    Refused { what: String, error: String },
    /// The state handshake failed (a function and the runtime disagree on its states).
    Handshake(String),
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureKind::Function(e) | FailureKind::Panic(e) | FailureKind::Handshake(e) => f.write_str(e),
            FailureKind::StateRead { name, error } => write!(f, "cannot read state {name:?}: {error}"),
            FailureKind::StateWrite(e) => write!(f, "cannot write state: {e}"),
            FailureKind::Refused { what, error } => write!(f, "{what}: {error}"),
        }
    }
}
