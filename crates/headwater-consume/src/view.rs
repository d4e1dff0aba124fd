//! Where a consumer keeps its view and, in the same store, each subject's cursor.

use async_trait::async_trait;
use headwater_core::{FeedId, Sequence, Subject};

use crate::IntegrationEvent;
use crate::dead::{DeadLetter, NewDeadLetter};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What one [`ViewStore::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The subject's cursor after it.
    pub cursor: Sequence,
    /// Events handed to the handler and committed.
    pub applied: u64,
    /// Events at or below the cursor, skipped.
    pub duplicates: u64,
}

/// Why a view store operation failed. In every case nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The user's handler refused an event (it cannot be decoded, it breaks a rule of the view).
    #[error("the handler failed on {subject} #{sequence}: {reason}")]
    Handler {
        subject: Subject,
        sequence: Sequence,
        reason: String,
    },
    /// The events do not continue the subject's cursor: the first new one is not cursor + 1, or
    /// they are not contiguous, or not all of the subject.
    #[error("{subject}: events do not continue the cursor at {cursor}: {detail}")]
    NotContiguous {
        subject: Subject,
        cursor: Sequence,
        detail: String,
    },
    /// A bad argument (a mark's key or value out of bounds); nothing was written.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The backend failed.
    #[error("the view store failed: {0}")]
    Backend(#[source] BoxError),
}

/// A consumer's view and its per-subject cursors, in one store: applying events and moving the
/// cursor is one transaction (G7). The store holds the user's handler; the library calls
/// [`ViewStore::apply`], so a handler only changes the view and never has to remember the cursor.
#[async_trait]
pub trait ViewStore: Send + Sync + 'static {
    /// The last sequence of `subject` applied to the view (`Sequence::START` when none).
    async fn cursor(&self, feed: &FeedId, subject: &Subject) -> Result<Sequence, ViewError>;

    /// Applies `events` — all of `subject`, in sequence order — to the view and moves the
    /// subject's cursor past them, in one transaction. Events at or below the cursor are skipped
    /// (duplicates); the others must be `cursor + 1, cursor + 2, …` without a hole.
    ///
    /// # Errors
    /// [`ViewError::NotContiguous`] when they are not, [`ViewError::Handler`] when the handler
    /// refuses one; in both cases, and on a backend error, nothing is written.
    ///
    /// # Durability
    /// On `Ok`, the view's changes and the cursor are durable together, as the backend documents.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still commit; the next apply of the same
    /// events then skips them as duplicates.
    async fn apply(
        &self,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError>;

    /// Applies the events of several subjects, each element as [`ViewStore::apply`] would — the
    /// answers in the same order — in ONE transaction where the backend can (`EmbeddedView`,
    /// `PgView`: one commit, one fsync, for a whole page of a feed). Each subject's events and
    /// its cursor always commit together (G7). A store that cannot may apply subject by subject
    /// ([`apply_each`]); the batch as a whole is then not all or nothing. No default: a wrapper
    /// store must pass it on, or it silently loses the batching.
    ///
    /// # Errors
    /// As [`ViewStore::apply`], for the first subject that fails; in one transaction nothing of
    /// the batch is written then.
    ///
    /// # Durability
    /// As [`ViewStore::apply`].
    async fn apply_many(
        &self,
        feed: &FeedId,
        batches: &[(Subject, Vec<IntegrationEvent>)],
    ) -> Result<Vec<Applied>, ViewError>;

    /// The cursors of the feed's subjects after `after` (all when `None`), in byte order of the
    /// subject, at most `limit`.
    async fn cursors(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<(Subject, Sequence)>, ViewError>;

    /// How far a transport that reads the whole feed (the HTTP feed) got: the last feed position
    /// it delivered (0 when none). Only a starting point — deliveries are deduplicated by the
    /// subjects' cursors — so it is saved after the events, not with them.
    async fn feed_position(&self, feed: &FeedId) -> Result<u64, ViewError>;

    /// Saves the feed position; a position below the saved one is ignored.
    async fn save_feed_position(&self, feed: &FeedId, position: u64) -> Result<(), ViewError>;

    // --- Marks: small durable values of the library's own ---

    /// A small durable value of the library's own, by key (`walk/accounts.v1`,
    /// `active/statements`…): the walker's resume point, the active feed version. `None` when
    /// unset.
    ///
    /// # Errors
    /// [`ViewError::Invalid`] for a key out of bounds ([`check_mark`]); a backend error.
    async fn mark(&self, key: &str) -> Result<Option<String>, ViewError>;

    /// Sets (`Some`) or clears (`None`) a mark.
    ///
    /// # Errors
    /// [`ViewError::Invalid`] for a key or value out of bounds ([`check_mark`]), writing nothing;
    /// a backend error.
    ///
    /// # Durability
    /// On `Ok`, the mark is durable (one transaction of its own), as the backend documents.
    async fn set_mark(&self, key: &str, value: Option<&str>) -> Result<(), ViewError>;

    // --- Dead letters (src/dead.rs; docs/design/consumer.md, "Dead letters") ---

    /// Records a dead letter and returns its id. Idempotent per (feed, subject, sequence): a
    /// letter of a subject and sequence that is already open is updated (reason, transport,
    /// body when given, last time, count + 1), not added. A feed keeps at most
    /// [`crate::DEAD_LETTERS_MAX`] letters: recording one more drops the oldest.
    ///
    /// # Durability
    /// On `Ok`, the letter is durable as an apply is.
    ///
    /// # Cancel safety
    /// Dropping the future may still record it (one transaction).
    async fn record_dead_letter(&self, letter: &NewDeadLetter) -> Result<u64, ViewError>;

    /// The feed's open dead letters with an id above `after`, in id order, at most `limit`.
    async fn dead_letters(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
    ) -> Result<Vec<DeadLetter>, ViewError>;

    /// Resolves (removes) `subject`'s dead letters at or below `through`; returns how many.
    ///
    /// # Durability
    /// As [`ViewStore::record_dead_letter`].
    async fn resolve_dead_letters(
        &self,
        feed: &FeedId,
        subject: &Subject,
        through: Sequence,
    ) -> Result<u64, ViewError>;

    /// Removes the dead letter `id` of `feed` (the operator dealt with it); whether it was there.
    async fn discard_dead_letter(&self, feed: &FeedId, id: u64) -> Result<bool, ViewError>;
}

/// [`ViewStore::apply_many`] for a store without transactions over several subjects: one
/// [`ViewStore::apply`] per subject, in order, stopping at the first failure.
///
/// # Errors
/// The first subject's failure; the subjects before it stay applied.
pub async fn apply_each<V: ViewStore + ?Sized>(
    view: &V,
    feed: &FeedId,
    batches: &[(Subject, Vec<IntegrationEvent>)],
) -> Result<Vec<Applied>, ViewError> {
    let mut applied = Vec::with_capacity(batches.len());
    for (subject, events) in batches {
        applied.push(view.apply(feed, subject, events).await?);
    }
    Ok(applied)
}

/// The longest key of a mark, in bytes.
pub const MARK_KEY_BYTES_MAX: usize = 256;
/// The longest value of a mark, in bytes.
pub const MARK_VALUE_BYTES_MAX: usize = 64 * 1024;

/// Checks a mark's key (1 ..= [`MARK_KEY_BYTES_MAX`] bytes, no control characters) and value
/// (at most [`MARK_VALUE_BYTES_MAX`] bytes, no NUL).
pub fn check_mark(key: &str, value: Option<&str>) -> Result<(), ViewError> {
    if key.is_empty() || key.len() > MARK_KEY_BYTES_MAX {
        return Err(ViewError::Invalid(format!(
            "a mark's key is 1 to {MARK_KEY_BYTES_MAX} bytes, not {}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(ViewError::Invalid(
            "a mark's key has a control character".into(),
        ));
    }
    if let Some(value) = value {
        if value.len() > MARK_VALUE_BYTES_MAX {
            return Err(ViewError::Invalid(format!(
                "a mark's value is at most {MARK_VALUE_BYTES_MAX} bytes, not {}",
                value.len()
            )));
        }
        if value.contains('\0') {
            return Err(ViewError::Invalid("a mark's value has a NUL byte".into()));
        }
    }
    Ok(())
}

/// Checks `events` against the cursor: all of `subject`, in order, contiguous above it. Returns
/// how many lead the batch at or below the cursor (duplicates to skip).
pub fn check_contiguous(
    subject: &Subject,
    cursor: Sequence,
    events: &[IntegrationEvent],
) -> Result<usize, ViewError> {
    let not = |detail: String| ViewError::NotContiguous {
        subject: subject.clone(),
        cursor,
        detail,
    };
    let mut expected = cursor.get() + 1;
    let mut duplicates = 0;
    for event in events {
        if &event.subject != subject {
            return Err(not(format!("an event of {} in the batch", event.subject)));
        }
        let sequence = event.sequence.get();
        if sequence <= cursor.get() && expected == cursor.get() + 1 {
            // Still in the leading run of events the view already has.
            duplicates += 1;
            continue;
        }
        if sequence != expected {
            return Err(not(format!("#{sequence} where #{expected} was due")));
        }
        expected += 1;
    }
    Ok(duplicates)
}
