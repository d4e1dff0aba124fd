//! Command ids and the context a command is handled in.

use std::fmt;

use headwater_core::EventId;
use uuid::Uuid;

/// The namespace of the event ids a command records (UUID v5, see [`CommandId::event_id`]).
///
/// This value is part of the stored format: changing it would make every command recorded before
/// look new again, so a retried command would be recorded twice.
pub const COMMAND_EVENT_ID_NAMESPACE: Uuid =
    Uuid::from_u128(0x2738_e263_ebec_402d_8783_62b8_3943_23a2);

/// The identity of one command, chosen by the client (a UUID) and sent again with every retry of
/// that command. It is what makes a retry idempotent: the events a command records get ids derived
/// from its command id, so the handler recognises a command it already recorded.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(Uuid);

impl CommandId {
    pub const fn from_uuid(uuid: Uuid) -> CommandId {
        CommandId(uuid)
    }

    /// A fresh random command id (UUID v4), for clients that make one per command.
    pub fn new_random() -> CommandId {
        CommandId(Uuid::new_v4())
    }

    /// Parses the hyphenated form (`67e55044-10b1-426f-9247-bb680e5fe0c8`).
    pub fn parse(text: &str) -> Option<CommandId> {
        Uuid::try_parse(text).ok().map(CommandId)
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The id of the event at `index` (0, 1, 2 …) among the events this command records:
    /// `EventId::derived(&COMMAND_EVENT_ID_NAMESPACE, command id bytes ‖ index as 8 big-endian
    /// bytes)`. Deterministic, so a retry of the command produces the same ids.
    pub fn event_id(&self, index: u64) -> EventId {
        let mut name = [0u8; 24];
        name[..16].copy_from_slice(self.0.as_bytes());
        name[16..].copy_from_slice(&index.to_be_bytes());
        EventId::derived(&COMMAND_EVENT_ID_NAMESPACE, &name)
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommandId({})", self.0.hyphenated())
    }
}

/// Where a command comes from, recorded in the metadata of the events it records.
///
/// By default both ids are the command id: a command from outside starts a new conversation
/// (correlation) and is the cause of its events (causation). A command issued in reaction to
/// something else passes that conversation's correlation id and the id of what caused it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandContext {
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
}

impl CommandContext {
    /// The default context: correlation and causation are the command id.
    pub fn new() -> CommandContext {
        CommandContext::default()
    }

    /// The conversation this command belongs to.
    #[must_use]
    pub fn correlation_id(mut self, correlation_id: Uuid) -> CommandContext {
        self.correlation_id = Some(correlation_id);
        self
    }

    /// What caused this command (an event id, a message id).
    #[must_use]
    pub fn causation_id(mut self, causation_id: Uuid) -> CommandContext {
        self.causation_id = Some(causation_id);
        self
    }

    /// The correlation and causation ids of the events `command_id` records.
    pub(crate) fn ids_for(&self, command_id: CommandId) -> (Uuid, Uuid) {
        (
            self.correlation_id.unwrap_or(command_id.0),
            self.causation_id.unwrap_or(command_id.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_derived_per_command_and_index() {
        let a = CommandId::from_uuid(Uuid::from_u128(1));
        let b = CommandId::from_uuid(Uuid::from_u128(2));
        assert_eq!(a.event_id(0), a.event_id(0));
        assert_ne!(a.event_id(0), a.event_id(1));
        assert_ne!(a.event_id(0), b.event_id(0));
        // Pinned: the derivation is part of the stored format (see COMMAND_EVENT_ID_NAMESPACE).
        let mut name = Uuid::from_u128(1).as_bytes().to_vec();
        name.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            a.event_id(1),
            EventId::derived(&COMMAND_EVENT_ID_NAMESPACE, &name)
        );
        assert_eq!(
            COMMAND_EVENT_ID_NAMESPACE.to_string(),
            "2738e263-ebec-402d-8783-62b8394323a2"
        );
    }

    #[test]
    fn context_defaults_to_the_command_id() {
        let command = CommandId::from_uuid(Uuid::from_u128(7));
        let other = Uuid::from_u128(9);
        let cause = Uuid::from_u128(11);
        let table = [
            (CommandContext::new(), (command.0, command.0)),
            (
                CommandContext::new().correlation_id(other),
                (other, command.0),
            ),
            (
                CommandContext::new().causation_id(cause),
                (command.0, cause),
            ),
            (
                CommandContext::new()
                    .correlation_id(other)
                    .causation_id(cause),
                (other, cause),
            ),
        ];
        for (context, ids) in table {
            assert_eq!(context.ids_for(command), ids, "{context:?}");
        }
    }

    #[test]
    fn command_ids_round_trip_through_text() {
        let id = CommandId::new_random();
        assert_eq!(CommandId::parse(&id.to_string()), Some(id));
        assert_eq!(CommandId::parse("nope"), None);
    }
}
