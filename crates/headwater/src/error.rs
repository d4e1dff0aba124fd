//! What can go wrong when handling a command.

use headwater_core::{
    DecodeError, EncodeError, ErrorKind, Position, StreamName, StreamNameError, StreamVersion,
};
use headwater_store::{AppendError, ReadError};

use crate::command::CommandId;

/// Why a command was not recorded (or a stream not loaded). `E` is the aggregate's
/// [`Aggregate::Error`](headwater_core::Aggregate::Error).
///
/// Only [`CommandError::Rejected`] is the domain's answer; everything else is about the command's
/// handling. [`CommandError::kind`] says what the caller should do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The aggregate refused the command (a business rule, not a failure). Nothing was recorded.
    #[error("the command was refused: {0}")]
    Rejected(E),
    /// The stream changed between each load and append, `attempts` times in a row. Nothing was
    /// recorded by this call; the command may be sent again later with the same command id.
    #[error("the stream kept changing under the command: gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    /// The aggregate id does not make a valid stream name (`category-id`).
    #[error("invalid aggregate id: {0}")]
    InvalidId(#[source] StreamNameError),
    /// An event the aggregate decided cannot be encoded: a bug in its `DomainEvent::encode`.
    #[error(transparent)]
    Encode(EncodeError),
    /// A stored event cannot be decoded (unknown type, unknown schema version: an upcaster is
    /// missing, or malformed data). The stream cannot be loaded until the code can read it.
    #[error(
        "cannot decode the event of {stream} at version {stream_version} (position {position}): {source}"
    )]
    Decode {
        stream: StreamName,
        stream_version: StreamVersion,
        position: Position,
        #[source]
        source: DecodeError,
    },
    /// This command id was already used for a command on another stream: a client reused it for
    /// a different command. Nothing was recorded.
    #[error("command id {command_id} was already used for a command on {stream}")]
    CommandIdReused {
        command_id: CommandId,
        stream: StreamName,
    },
    /// The store refused or failed the append. Nothing was recorded.
    #[error("cannot append: {0}")]
    Store(#[source] AppendError),
    /// The store failed a read.
    #[error("cannot read: {0}")]
    Read(#[source] ReadError),
}

impl<E> CommandError<E> {
    /// What the caller should do next.
    ///
    /// A [`CommandError::Rejected`] is [`ErrorKind::BadRequest`]: sent again unchanged on the same
    /// state, it is refused again. Edges that answer refusals differently (HTTP 409 for a
    /// withdrawal that would overdraw, 404 for an account that is not open) match `Rejected`
    /// first, since only the domain error knows which it is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::Rejected(_)
            | CommandError::InvalidId(_)
            | CommandError::CommandIdReused { .. } => ErrorKind::BadRequest,
            CommandError::Conflict { .. } => ErrorKind::Conflict,
            CommandError::Encode(_) | CommandError::Decode { .. } => ErrorKind::Internal,
            CommandError::Store(error) => error.kind(),
            CommandError::Read(error) => error.kind(),
        }
    }

    /// The domain's refusal, if that is what this is.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(error) => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("insufficient funds")]
    struct Refusal;

    #[test]
    fn kinds() {
        let stream = StreamName::new("account-1").unwrap();
        let table: [(CommandError<Refusal>, ErrorKind); 7] = [
            (CommandError::Rejected(Refusal), ErrorKind::BadRequest),
            (CommandError::Conflict { attempts: 3 }, ErrorKind::Conflict),
            (
                CommandError::InvalidId(StreamName::new("account-").unwrap_err()),
                ErrorKind::BadRequest,
            ),
            (
                CommandError::CommandIdReused {
                    command_id: CommandId::new_random(),
                    stream: stream.clone(),
                },
                ErrorKind::BadRequest,
            ),
            (
                CommandError::Decode {
                    stream,
                    stream_version: StreamVersion(1),
                    position: Position(1),
                    source: DecodeError::unknown_type("x", 1),
                },
                ErrorKind::Internal,
            ),
            (
                CommandError::Store(AppendError::Poisoned),
                ErrorKind::Unavailable,
            ),
            (
                CommandError::Read(ReadError::Invalid("limit".into())),
                ErrorKind::BadRequest,
            ),
        ];
        for (error, kind) in table {
            assert_eq!(error.kind(), kind, "{error}");
        }
        let rejected: CommandError<Refusal> = CommandError::Rejected(Refusal);
        assert_eq!(
            rejected.to_string(),
            "the command was refused: insufficient funds"
        );
        assert!(rejected.rejection().is_some());
        assert!(
            CommandError::<Refusal>::Conflict { attempts: 1 }
                .rejection()
                .is_none()
        );
    }
}
