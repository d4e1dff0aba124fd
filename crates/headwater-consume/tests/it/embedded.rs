//! The embedded view store: the view's rows and the cursor commit together, a failing handler
//! writes nothing, a reopened view has everything, and the consumer converges on it as on memory.

use std::sync::Arc;

use headwater_consume::{EmbeddedView, IntegrationEvent, MemoryUpstream, ViewError, ViewStore};
use headwater_core::{FeedId, Sequence, Subject};
use proptest::prelude::*;
use rusqlite::params;

use crate::consumer::{
    apply_many_is_one_transaction, deliver_lossy_then_reconstitute, event, marks_behave, produce,
    runtime,
};

fn feed() -> FeedId {
    FeedId::parse("accounts.v1").unwrap()
}

/// A view with a table `applied(subject, sequence)`; the handler refuses an event that is not the
/// subject's next, and one whose data says `"fail": true`.
pub(crate) fn open(dir: &std::path::Path) -> EmbeddedView {
    EmbeddedView::open(
        dir.join("view.sqlite3"),
        |tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS applied (subject TEXT NOT NULL, sequence INTEGER NOT NULL)",
            )
        },
        |tx, e: &IntegrationEvent| {
            let count: i64 = tx.query_row(
                "SELECT count(*) FROM applied WHERE subject = ?1",
                params![e.subject.as_str()],
                |row| row.get(0),
            )?;
            if e.sequence.get() != count as u64 + 1 {
                return Err(format!("#{} where #{} was due", e.sequence.get(), count + 1).into());
            }
            tx.execute(
                "INSERT INTO applied (subject, sequence) VALUES (?1, ?2)",
                params![e.subject.as_str(), e.sequence.get() as i64],
            )?;
            if e.data.contains("\"fail\"") {
                return Err("the handler refuses this one".into());
            }
            Ok(())
        },
    )
    .unwrap()
}

async fn rows(view: &EmbeddedView) -> Vec<(String, i64)> {
    view.read(|c| {
        let mut statement =
            c.prepare("SELECT subject, sequence FROM applied ORDER BY subject, sequence")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect()
    })
    .await
    .unwrap()
}

fn failing(subject: &str, sequence: u64) -> IntegrationEvent {
    let json = format!(
        r#"{{"specversion":"1.0","id":"{}","source":"accounts","type":"t","subject":"{subject}",
        "time":"2026-11-27T18:00:00.000000Z","data":{{"fail":true}},"sequence":{sequence},
        "position":{sequence},"feed":"accounts.v1"}}"#,
        uuid::Uuid::new_v4()
    );
    IntegrationEvent::from_cloud_event(json.as_bytes()).unwrap()
}

#[tokio::test]
async fn apply_moves_the_cursor_with_the_rows_and_a_failure_writes_neither() {
    let dir = tempfile::tempdir().unwrap();
    let view = open(dir.path());
    let s = Subject::new("acc-1").unwrap();
    let applied = view
        .apply(&feed(), &s, &[event(1, "acc-1", 1), event(2, "acc-1", 2)])
        .await
        .unwrap();
    assert_eq!((applied.cursor, applied.applied), (Sequence(2), 2));
    // A duplicate prefix is skipped, the rest applied.
    let applied = view
        .apply(&feed(), &s, &[event(2, "acc-1", 2), event(3, "acc-1", 3)])
        .await
        .unwrap();
    assert_eq!(
        (applied.cursor, applied.applied, applied.duplicates),
        (Sequence(3), 1, 1)
    );
    // A gap: refused, nothing written.
    let error = view
        .apply(&feed(), &s, &[event(5, "acc-1", 5)])
        .await
        .unwrap_err();
    assert!(matches!(error, ViewError::NotContiguous { .. }), "{error}");
    // The handler fails on the second event of a batch: neither row nor cursor.
    let error = view
        .apply(&feed(), &s, &[event(4, "acc-1", 4), failing("acc-1", 5)])
        .await
        .unwrap_err();
    assert!(matches!(error, ViewError::Handler { .. }), "{error}");
    assert_eq!(view.cursor(&feed(), &s).await.unwrap(), Sequence(3));
    assert_eq!(rows(&view).await.len(), 3);
    drop(view);
    // Reopened: everything is there.
    let view = open(dir.path());
    assert_eq!(view.cursor(&feed(), &s).await.unwrap(), Sequence(3));
    assert_eq!(rows(&view).await.len(), 3);
    let cursors = view.cursors(&feed(), None, 10).await.unwrap();
    assert_eq!(cursors, vec![(s, Sequence(3))]);
}

#[tokio::test]
async fn apply_many_is_one_transaction_in_the_embedded_view() {
    let dir = tempfile::tempdir().unwrap();
    let view = open(dir.path());
    apply_many_is_one_transaction(&view, failing).await;
    assert_eq!(rows(&view).await.len(), 4);
}

#[tokio::test]
async fn marks_are_durable_in_the_embedded_view() {
    let dir = tempfile::tempdir().unwrap();
    marks_behave(&open(dir.path())).await;
    let view = open(dir.path());
    assert_eq!(
        view.mark("walk/accounts.v1").await.unwrap().as_deref(),
        Some("acc-7")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// The property test of `consumer`, on the embedded view store.
    #[test]
    fn any_delivery_schedule_converges_on_the_embedded_view(
        subjects in proptest::collection::vec(0u8..4, 1..60),
        drops in proptest::collection::vec(0u8..10, 60),
        swaps in proptest::collection::vec((0usize..60, 0usize..60), 0..20),
    ) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let upstream = Arc::new(MemoryUpstream::new());
            let events = produce(&upstream, &subjects);
            let view = Arc::new(open(dir.path()));
            let expected = deliver_lossy_then_reconstitute(Arc::clone(&view), upstream, &events, &drops, &swaps).await;
            prop_assert_eq!(rows(&view).await, expected);
            Ok(())
        })?;
    }
}
