//! Dead letters: messages a consumer could not apply and that retrying does not fix — a body
//! that is not an integration event, an event of another feed, an event the handler refuses, a
//! producer whose answers do not continue the subject — recorded durably in the view store with
//! the reason, for the operator, so that the transport can ack them and go on with the other
//! subjects (docs/design/consumer.md, "Dead letters").
//!
//! A subject with an open dead letter is **parked**: its cursor stays before the event that
//! failed (G7: nothing is applied over it). Each later delivery of a parked subject is tried
//! once, without the bounded retries (the operator may have fixed the handler); when it fails it
//! is recorded as a dead letter of kind [`DeadLetterKind::Parked`] and acked — the producer still
//! has it, so nothing is lost. Any later success of that subject — a delivery, `ensure`, a
//! reconstitution walk — resolves (removes) its dead letters up to the new cursor.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headwater_core::{FeedId, Sequence, Subject};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::IntegrationEvent;
use crate::consumer::{ConsumeError, Consumer, Delivery};
use crate::event::DecodeError;
use crate::upstream::Upstream;
use crate::view::{ViewError, ViewStore};

/// The most dead letters a view store keeps per feed; recording one more drops the oldest.
pub const DEAD_LETTERS_MAX: u64 = 10_000;
/// The most bytes of a message's body a dead letter keeps (the rest is cut).
pub const DEAD_LETTER_BODY_BYTES_MAX: usize = 4 * 1024;
/// The most bytes of a dead letter's reason (the rest is cut).
pub const DEAD_LETTER_REASON_BYTES_MAX: usize = 1024;
/// Attempts at a delivery that fails for a reason retrying may not fix, before it is
/// dead-lettered, by default.
pub const DEAD_LETTER_ATTEMPTS_DEFAULT: u32 = 3;
/// The wait between two of those attempts.
const DEAD_LETTER_RETRY_WAIT: Duration = Duration::from_millis(20);
/// Dead letters read per page when the consumer loads the parked subjects.
const LOAD_PAGE_LETTERS: u64 = 1_000;

/// Why a message is a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// The body is not an integration event (`IntegrationEvent::from_cloud_event` refused it).
    Undecodable,
    /// An event of another feed than the consumer's.
    WrongFeed,
    /// The user's handler refused the event (or one the heal before it brought).
    Handler,
    /// The producer refused the heal, or answered something that does not continue the subject.
    Upstream,
    /// The view store refused the events as not continuing the cursor.
    View,
    /// A later event of a subject that already has a dead letter, which it cannot pass.
    Parked,
}

impl DeadLetterKind {
    /// The kind's stable name, as stored and shown (`undecodable`, `handler`…).
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Undecodable => "undecodable",
            DeadLetterKind::WrongFeed => "wrong_feed",
            DeadLetterKind::Handler => "handler",
            DeadLetterKind::Upstream => "upstream",
            DeadLetterKind::View => "view",
            DeadLetterKind::Parked => "parked",
        }
    }

    /// The kind of a stored name.
    pub fn parse(name: &str) -> Option<DeadLetterKind> {
        [
            DeadLetterKind::Undecodable,
            DeadLetterKind::WrongFeed,
            DeadLetterKind::Handler,
            DeadLetterKind::Upstream,
            DeadLetterKind::View,
            DeadLetterKind::Parked,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dead letter to record (`ViewStore::record_dead_letter`). Built with [`NewDeadLetter::new`],
/// which cuts the reason and the body to their limits.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewDeadLetter {
    /// The consumer's feed (not the message's: that one may be another, or unreadable).
    pub feed: FeedId,
    /// The event's subject and sequence, when the message could be decoded.
    pub subject: Option<Subject>,
    pub sequence: Option<Sequence>,
    /// The event's id, when the message could be decoded.
    pub event_id: Option<String>,
    pub kind: DeadLetterKind,
    /// Why, for the operator (at most [`DEAD_LETTER_REASON_BYTES_MAX`] bytes).
    pub reason: String,
    /// Where the message came from: `rabbitmq`, `nats`, `http`, `walk`, `ensure`.
    pub transport: String,
    /// The message as received (at most [`DEAD_LETTER_BODY_BYTES_MAX`] bytes); `None` for an
    /// event fetched from upstream (the producer has it).
    pub body: Option<Vec<u8>>,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl NewDeadLetter {
    pub fn new(
        feed: FeedId,
        kind: DeadLetterKind,
        reason: &str,
        transport: &str,
        at_ms: u64,
    ) -> NewDeadLetter {
        NewDeadLetter {
            feed,
            subject: None,
            sequence: None,
            event_id: None,
            kind,
            reason: cut(reason, DEAD_LETTER_REASON_BYTES_MAX).to_owned(),
            transport: cut(transport, 64).to_owned(),
            body: None,
            at_ms,
        }
    }

    /// The letter of `event` (its subject, sequence and id).
    #[must_use]
    pub fn of_event(mut self, event: &IntegrationEvent) -> NewDeadLetter {
        self.subject = Some(event.subject.clone());
        self.sequence = Some(event.sequence);
        self.event_id = Some(event.id.to_string());
        self
    }

    /// The letter of `subject` at `sequence`, without an event at hand.
    #[must_use]
    pub fn at(mut self, subject: Subject, sequence: Sequence) -> NewDeadLetter {
        self.subject = Some(subject);
        self.sequence = Some(sequence);
        self
    }

    /// Keeps the start of the message's `body`.
    #[must_use]
    pub fn with_body(mut self, body: &[u8]) -> NewDeadLetter {
        self.body = Some(body[..body.len().min(DEAD_LETTER_BODY_BYTES_MAX)].to_vec());
        self
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A recorded dead letter, as `ViewStore::dead_letters` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Increasing in the order letters were first recorded, per view store.
    pub id: u64,
    #[serde(serialize_with = "display")]
    pub feed: FeedId,
    #[serde(serialize_with = "display_opt")]
    pub subject: Option<Subject>,
    #[serde(serialize_with = "sequence_opt")]
    pub sequence: Option<Sequence>,
    pub event_id: Option<String>,
    pub kind: DeadLetterKind,
    /// The reason of the last time it was recorded.
    pub reason: String,
    pub transport: String,
    /// The start of the message's body (shown as text, invalid UTF-8 replaced).
    #[serde(serialize_with = "lossy_opt")]
    pub body: Option<Vec<u8>>,
    /// First and last time recorded (ms since the Unix epoch), and how many times.
    pub first_at_ms: u64,
    pub last_at_ms: u64,
    pub count: u64,
}

fn display<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<S: serde::Serializer>(v: &Option<Subject>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(v.as_str()),
        None => s.serialize_none(),
    }
}

fn sequence_opt<S: serde::Serializer>(v: &Option<Sequence>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&v.get()),
        None => s.serialize_none(),
    }
}

fn lossy_opt<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&String::from_utf8_lossy(v)),
        None => s.serialize_none(),
    }
}

/// The dead letters of a view in memory (`MemoryView`), with the same rules as the durable
/// stores: idempotent per (feed, subject, sequence), at most [`DEAD_LETTERS_MAX`] per feed.
#[derive(Debug, Default)]
pub(crate) struct DeadLetterBook {
    /// Per feed, by id.
    letters: std::collections::BTreeMap<FeedId, std::collections::BTreeMap<u64, DeadLetter>>,
    last_id: u64,
}

impl DeadLetterBook {
    pub(crate) fn record(&mut self, letter: &NewDeadLetter) -> u64 {
        let of_feed = self.letters.entry(letter.feed.clone()).or_default();
        if letter.subject.is_some()
            && let Some(found) = of_feed
                .values_mut()
                .find(|l| l.subject == letter.subject && l.sequence == letter.sequence)
        {
            found.reason.clone_from(&letter.reason);
            found.transport.clone_from(&letter.transport);
            if letter.body.is_some() {
                found.body.clone_from(&letter.body);
            }
            found.last_at_ms = letter.at_ms;
            found.count += 1;
            return found.id;
        }
        self.last_id += 1;
        let id = self.last_id;
        of_feed.insert(
            id,
            DeadLetter {
                id,
                feed: letter.feed.clone(),
                subject: letter.subject.clone(),
                sequence: letter.sequence,
                event_id: letter.event_id.clone(),
                kind: letter.kind,
                reason: letter.reason.clone(),
                transport: letter.transport.clone(),
                body: letter.body.clone(),
                first_at_ms: letter.at_ms,
                last_at_ms: letter.at_ms,
                count: 1,
            },
        );
        while of_feed.len() as u64 > DEAD_LETTERS_MAX {
            of_feed.pop_first();
        }
        id
    }

    pub(crate) fn list(&self, feed: &FeedId, after: u64, limit: u64) -> Vec<DeadLetter> {
        self.letters.get(feed).map_or_else(Vec::new, |of_feed| {
            of_feed
                .range(after.saturating_add(1)..)
                .map(|(_, l)| l.clone())
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .collect()
        })
    }

    pub(crate) fn resolve(&mut self, feed: &FeedId, subject: &Subject, through: Sequence) -> u64 {
        let Some(of_feed) = self.letters.get_mut(feed) else {
            return 0;
        };
        let before = of_feed.len();
        of_feed.retain(|_, l| {
            !(l.subject.as_ref() == Some(subject) && l.sequence.is_some_and(|s| s <= through))
        });
        (before - of_feed.len()) as u64
    }

    pub(crate) fn discard(&mut self, feed: &FeedId, id: u64) -> bool {
        self.letters
            .get_mut(feed)
            .is_some_and(|of_feed| of_feed.remove(&id).is_some())
    }
}

/// A consumer's dead-letter state: the parked subjects (loaded from the view store on first use)
/// and counters.
#[derive(Debug, Default)]
pub(crate) struct DeadLetters {
    /// Per parked subject, the highest sequence among its open dead letters.
    parked: OnceCell<Mutex<HashMap<Subject, Sequence>>>,
    /// Letters without a subject (undecodable), open, as far as this consumer knows.
    loose: AtomicU64,
    recorded: AtomicU64,
    resolved: AtomicU64,
    metrics: DeadLetterMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The dead letters' Prometheus metrics (`Consumer::register_metrics`).
#[derive(Debug, Default)]
struct DeadLetterMetrics {
    recorded: Family<KindLabels, Counter>,
    resolved: Counter,
    parked_subjects: Gauge,
    without_subject: Gauge,
}

impl DeadLetters {
    /// Registers the dead letters' metrics (prefix `headwater_consumer_`, labelled with the feed).
    pub(crate) fn register(&self, feed: &FeedId, registry: &mut Registry) {
        let m = &self.metrics;
        let r = registry
            .sub_registry_with_prefix("headwater_consumer")
            .sub_registry_with_label(("feed".into(), feed.to_string().into()));
        r.register(
            "dead_letters_recorded",
            "Dead letters recorded (or recorded again), by kind: undecodable, wrong_feed, handler, upstream, view, parked",
            m.recorded.clone(),
        );
        r.register(
            "dead_letters_resolved",
            "Dead letters resolved by a later success of their subject",
            m.resolved.clone(),
        );
        r.register(
            "parked_subjects",
            "Subjects parked behind a dead letter (their cursor stays before the failed event)",
            m.parked_subjects.clone(),
        );
        r.register(
            "dead_letters_without_subject",
            "Open dead letters that name no subject (undecodable, another feed's), as this process knows",
            m.without_subject.clone(),
        );
    }

    fn parked_changed(&self, parked: &HashMap<Subject, Sequence>) {
        self.metrics
            .parked_subjects
            .set(i64::try_from(parked.len()).unwrap_or(i64::MAX));
    }

    fn loose_changed(&self) {
        self.metrics
            .without_subject
            .set(i64::try_from(self.loose.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }
}

/// What the consumer knows of its dead letters (for `/status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetterStatus {
    /// Subjects parked behind a dead letter.
    pub parked_subjects: u64,
    /// Open dead letters without a subject (undecodable messages), as far as this process knows.
    pub undecodable: u64,
    /// Dead letters recorded and resolved since this consumer started.
    pub recorded: u64,
    pub resolved: u64,
}

/// What became of a message a transport handed to [`Consumer::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handled {
    /// Applied, or skipped as a duplicate.
    Delivered(Delivery),
    /// Recorded as the dead letter `id`: ack it, it will not be applied from this message.
    DeadLettered { id: u64, kind: DeadLetterKind },
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether an error can pass by waiting (the transport tries the message again later), as
/// opposed to one that retrying does not fix (dead-lettered after bounded retries).
pub(crate) fn is_transient(error: &ConsumeError) -> bool {
    match error {
        ConsumeError::Upstream(e) => e.is_transient(),
        ConsumeError::View(ViewError::Backend(_)) => true,
        _ => false,
    }
}

fn kind_of(error: &ConsumeError) -> DeadLetterKind {
    match error {
        ConsumeError::WrongFeed { .. } => DeadLetterKind::WrongFeed,
        ConsumeError::Upstream(_) | ConsumeError::Inconsistent { .. } => DeadLetterKind::Upstream,
        ConsumeError::View(ViewError::Handler { .. }) => DeadLetterKind::Handler,
        _ => DeadLetterKind::View,
    }
}

impl<V: ViewStore, U: Upstream> Consumer<V, U> {
    /// Takes one message from a transport: decodes it, delivers it (`deliver`), and when that
    /// fails for a reason retrying does not fix — after [`DEAD_LETTER_ATTEMPTS_DEFAULT`] attempts,
    /// or at once for a body that is not an integration event, an event of another feed, or a
    /// later event of a parked subject — records it as a dead letter with the reason. Either way
    /// the transport may then ack the message. A success of a parked subject resolves its dead
    /// letters up to the new cursor.
    ///
    /// # Errors
    /// [`ConsumeError`] only for what waiting may fix (the producer unavailable for a heal, the
    /// view store failing — also when recording the dead letter): do not ack; deliver the message
    /// again later (the broker redelivers it).
    ///
    /// # Cancel safety
    /// Cancel safe in effect, as [`Consumer::deliver`]: do not ack a message whose handling was
    /// cancelled.
    pub async fn handle(&self, body: &[u8], transport: &str) -> Result<Handled, ConsumeError> {
        match IntegrationEvent::from_cloud_event(body) {
            Ok(event) => self.handle_event(event, Some(body), transport).await,
            Err(e) => self.dead_letter_undecodable(body, &e, transport).await,
        }
    }

    /// As [`Consumer::handle`], for an event already decoded (`body`, when given, is kept in the
    /// dead letter).
    ///
    /// # Errors
    /// As [`Consumer::handle`].
    ///
    /// # Cancel safety
    /// As [`Consumer::handle`].
    pub async fn handle_event(
        &self,
        event: IntegrationEvent,
        body: Option<&[u8]>,
        transport: &str,
    ) -> Result<Handled, ConsumeError> {
        if event.feed != *self.feed() {
            // Not one of this feed's subjects: the letter names none (it parks nothing).
            let mut letter = NewDeadLetter::new(
                self.feed().clone(),
                DeadLetterKind::WrongFeed,
                &format!(
                    "an event of {} ({} #{}), not of {}",
                    event.feed,
                    event.subject,
                    event.sequence,
                    self.feed()
                ),
                transport,
                now_ms(),
            );
            letter.event_id = Some(event.id.to_string());
            if let Some(body) = body {
                letter = letter.with_body(body);
            }
            let id = self.record(letter).await?;
            return Ok(Handled::DeadLettered {
                id,
                kind: DeadLetterKind::WrongFeed,
            });
        }
        let parked = self.parked_at(&event.subject).await?.is_some();
        let attempts = if parked {
            1
        } else {
            DEAD_LETTER_ATTEMPTS_DEFAULT
        };
        let mut attempt = 1;
        let error = loop {
            match self.deliver(event.clone()).await {
                Ok(delivery) => {
                    if parked {
                        self.resolve_parked(&event.subject).await?;
                    }
                    return Ok(Handled::Delivered(delivery));
                }
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) if attempt < attempts => {
                    tracing::debug!(feed = %self.feed(), subject = %event.subject, attempt, error = %e, "a delivery failed; trying again");
                    tokio::time::sleep(DEAD_LETTER_RETRY_WAIT * attempt).await;
                    attempt += 1;
                }
                Err(e) => break e,
            }
        };
        let kind = if parked {
            DeadLetterKind::Parked
        } else {
            kind_of(&error)
        };
        let mut letter = NewDeadLetter::new(
            self.feed().clone(),
            kind,
            &error.to_string(),
            transport,
            now_ms(),
        )
        .of_event(&event);
        if let Some(body) = body {
            letter = letter.with_body(body);
        }
        // The event the handler refused may be an earlier one a heal brought.
        if let ConsumeError::View(ViewError::Handler { sequence, .. }) = &error
            && *sequence != event.sequence
            && !parked
        {
            self.record(
                NewDeadLetter::new(
                    self.feed().clone(),
                    DeadLetterKind::Handler,
                    &error.to_string(),
                    transport,
                    now_ms(),
                )
                .at(event.subject.clone(), *sequence),
            )
            .await?;
            letter.kind = DeadLetterKind::Parked;
        }
        let kind = letter.kind;
        let id = self.record(letter).await?;
        Ok(Handled::DeadLettered { id, kind })
    }

    /// Records a subject that a catch-up (`ensure`, a walk) could not bring up to date for a
    /// reason retrying does not fix, parking it. Transient errors are not recorded.
    ///
    /// # Errors
    /// The view store's, when it cannot record.
    pub(crate) async fn dead_letter_catch_up(
        &self,
        subject: &Subject,
        error: &ConsumeError,
        transport: &str,
    ) -> Result<(), ViewError> {
        if is_transient(error) {
            return Ok(());
        }
        let sequence = match error {
            ConsumeError::View(ViewError::Handler { sequence, .. }) => *sequence,
            _ => Sequence(self.view().cursor(self.feed(), subject).await?.get() + 1),
        };
        let letter = NewDeadLetter::new(
            self.feed().clone(),
            kind_of(error),
            &error.to_string(),
            transport,
            now_ms(),
        )
        .at(subject.clone(), sequence);
        match self.record(letter).await {
            Ok(_) => Ok(()),
            Err(ConsumeError::View(e)) => Err(e),
            Err(e) => Err(ViewError::Backend(e.to_string().into())),
        }
    }

    /// After a success of `subject` (a delivery, `ensure`, a walk): resolves its dead letters up
    /// to its cursor, if it is parked.
    ///
    /// # Errors
    /// The view store's.
    pub(crate) async fn resolve_parked(&self, subject: &Subject) -> Result<(), ConsumeError> {
        if self.parked_at(subject).await?.is_none() {
            return Ok(());
        }
        let cursor = self.view().cursor(self.feed(), subject).await?;
        let resolved = self
            .view()
            .resolve_dead_letters(self.feed(), subject, cursor)
            .await?;
        let dead = &self.dead;
        dead.resolved.fetch_add(resolved, Ordering::Relaxed);
        dead.metrics.resolved.inc_by(resolved);
        if let Some(parked) = dead.parked.get() {
            let mut parked = parked.lock().unwrap_or_else(|e| e.into_inner());
            if parked
                .get(subject)
                .is_some_and(|highest| *highest <= cursor)
            {
                parked.remove(subject);
            }
            dead.parked_changed(&parked);
        }
        if resolved > 0 {
            tracing::info!(feed = %self.feed(), %subject, %cursor, resolved, "a parked subject caught up: its dead letters are resolved");
        }
        Ok(())
    }

    /// The open dead letters of this consumer's feed with an id above `after`, in id order, at
    /// most `limit`.
    ///
    /// # Errors
    /// The view store's.
    ///
    /// # Cancel safety
    /// Cancel safe (a read).
    pub async fn dead_letters(&self, after: u64, limit: u64) -> Result<Vec<DeadLetter>, ViewError> {
        self.view().dead_letters(self.feed(), after, limit).await
    }

    /// Discards the dead letter `id` (the operator dealt with it). A subject's letter discarded
    /// does not unpark it until this consumer restarts or the subject catches up.
    ///
    /// # Errors
    /// The view store's.
    ///
    /// # Cancel safety
    /// Cancel safe in effect (one statement).
    pub async fn discard_dead_letter(&self, id: u64) -> Result<bool, ViewError> {
        self.view().discard_dead_letter(self.feed(), id).await
    }

    /// What this consumer knows of its dead letters, from memory (no store access).
    pub fn dead_letter_status(&self) -> DeadLetterStatus {
        let dead = &self.dead;
        DeadLetterStatus {
            parked_subjects: dead.parked.get().map_or(0, |p| {
                p.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
            }),
            undecodable: dead.loose.load(Ordering::Relaxed),
            recorded: dead.recorded.load(Ordering::Relaxed),
            resolved: dead.resolved.load(Ordering::Relaxed),
        }
    }

    /// The parked subjects, loaded from the view store on first use.
    async fn parked(&self) -> Result<&Mutex<HashMap<Subject, Sequence>>, ViewError> {
        self.dead
            .parked
            .get_or_try_init(|| self.load_parked())
            .await
    }

    /// The highest sequence among `subject`'s open dead letters, if it is parked.
    pub(crate) async fn parked_at(&self, subject: &Subject) -> Result<Option<Sequence>, ViewError> {
        Ok(self
            .parked()
            .await?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(subject)
            .copied())
    }

    async fn load_parked(&self) -> Result<Mutex<HashMap<Subject, Sequence>>, ViewError> {
        let mut parked: HashMap<Subject, Sequence> = HashMap::new();
        let mut loose = 0;
        let mut after = 0;
        loop {
            let page = self
                .view()
                .dead_letters(self.feed(), after, LOAD_PAGE_LETTERS)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for letter in page {
                match (letter.subject, letter.sequence) {
                    (Some(subject), Some(sequence)) => {
                        let highest = parked.entry(subject).or_default();
                        *highest = (*highest).max(sequence);
                    }
                    _ => loose += 1,
                }
            }
        }
        self.dead.loose.store(loose, Ordering::Relaxed);
        self.dead.loose_changed();
        self.dead.parked_changed(&parked);
        Ok(Mutex::new(parked))
    }

    async fn dead_letter_undecodable(
        &self,
        body: &[u8],
        error: &DecodeError,
        transport: &str,
    ) -> Result<Handled, ConsumeError> {
        let letter = NewDeadLetter::new(
            self.feed().clone(),
            DeadLetterKind::Undecodable,
            &error.to_string(),
            transport,
            now_ms(),
        )
        .with_body(body);
        let id = self.record(letter).await?;
        Ok(Handled::DeadLettered {
            id,
            kind: DeadLetterKind::Undecodable,
        })
    }

    async fn record(&self, letter: NewDeadLetter) -> Result<u64, ConsumeError> {
        // Loaded first, so the new letter is not counted twice.
        let parked = self.parked().await?;
        let id = self.view().record_dead_letter(&letter).await?;
        let dead = &self.dead;
        dead.recorded.fetch_add(1, Ordering::Relaxed);
        dead.metrics
            .recorded
            .get_or_create(&KindLabels {
                kind: letter.kind.as_str(),
            })
            .inc();
        match (&letter.subject, letter.sequence) {
            (Some(subject), Some(sequence)) => {
                let mut parked = parked.lock().unwrap_or_else(|e| e.into_inner());
                let highest = parked.entry(subject.clone()).or_default();
                *highest = (*highest).max(sequence);
                dead.parked_changed(&parked);
            }
            _ => {
                dead.loose.fetch_add(1, Ordering::Relaxed);
                dead.loose_changed();
            }
        }
        tracing::error!(
            feed = %self.feed(),
            subject = letter.subject.as_ref().map_or("", |s| s.as_str()),
            sequence = letter.sequence.map_or(0, |s| s.get()),
            kind = %letter.kind,
            transport = %letter.transport,
            reason = %letter.reason,
            id,
            "dead letter recorded"
        );
        Ok(id)
    }
}
