use headwater_core::{
    ErrorKind, EventId, ExpectedVersion, InvalidAppend, Position, StreamName, StreamVersion,
};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an append did not happen. In every case nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The stream is not at the expected version (G2). An expected outcome of concurrency, not a
    /// failure: reload the stream, decide again, retry.
    #[error("{stream}: expected {expected}, but the stream is at {}", display_head(*.actual))]
    Conflict {
        stream: StreamName,
        expected: ExpectedVersion,
        actual: Option<StreamVersion>,
    },
    /// The append breaks a limit or a rule of the API.
    #[error(transparent)]
    Invalid(#[from] InvalidAppend),
    /// One of the event ids is already recorded, but not as this same append at this place in the
    /// stream, so this is not a retry of it (G3).
    #[error("event id {event_id} is already recorded in {stream} at version {stream_version}")]
    DuplicateEventId {
        event_id: EventId,
        stream: StreamName,
        stream_version: StreamVersion,
    },
    /// An earlier write failed; the store refuses writes until it is reopened (an fsync is never
    /// retried: after a failure the state of the file is unknown).
    #[error("the store refuses writes after an earlier write failure; reopen it")]
    Poisoned,
    /// The store is closed or closing.
    #[error("the store is closed")]
    Closed,
    /// The backend failed (I/O, database error).
    #[error("the store failed: {0}")]
    Backend(#[source] BoxError),
}

fn display_head(head: Option<StreamVersion>) -> String {
    match head {
        None => "no stream".to_owned(),
        Some(version) => format!("version {version}"),
    }
}

impl AppendError {
    pub fn backend(error: impl Into<BoxError>) -> AppendError {
        AppendError::Backend(error.into())
    }

    /// What the caller should do next.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AppendError::Conflict { .. } => ErrorKind::Conflict,
            AppendError::Invalid(_) | AppendError::DuplicateEventId { .. } => ErrorKind::BadRequest,
            AppendError::Poisoned | AppendError::Closed => ErrorKind::Unavailable,
            AppendError::Backend(_) => ErrorKind::Internal,
        }
    }
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The read's arguments break a limit (a page limit of 0 or above the maximum).
    #[error("invalid read: {0}")]
    Invalid(String),
    /// Stored data failed its integrity check. It is reported, never served (G11).
    #[error("corruption at position {position}: {detail}")]
    Corrupt { position: Position, detail: String },
    /// The store is closed.
    #[error("the store is closed")]
    Closed,
    /// The backend failed.
    #[error("the store failed: {0}")]
    Backend(#[source] BoxError),
}

impl ReadError {
    pub fn backend(error: impl Into<BoxError>) -> ReadError {
        ReadError::Backend(error.into())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ReadError::Invalid(_) => ErrorKind::BadRequest,
            ReadError::Corrupt { .. } | ReadError::Closed => ErrorKind::Unavailable,
            ReadError::Backend(_) => ErrorKind::Internal,
        }
    }
}
