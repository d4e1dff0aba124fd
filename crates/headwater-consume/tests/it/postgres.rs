//! The PostgreSQL view store (`HEADWATER_TEST_POSTGRES_URL`; these tests fail without it): the
//! view's rows and the cursor commit together, a failing handler writes nothing, a reconnected
//! view has everything, and the consumer converges on it as on memory.

use std::sync::Arc;

use async_trait::async_trait;
use headwater_consume::{
    IntegrationEvent, MemoryUpstream, PgHandler, PgView, ViewError, ViewStore,
};
use headwater_core::{FeedId, Sequence, Subject};
use proptest::prelude::*;
use tokio_postgres::Transaction;

use crate::consumer::{
    apply_many_is_one_transaction, deliver_lossy_then_reconstitute, event, marks_behave, produce,
    runtime,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn feed() -> FeedId {
    FeedId::parse("accounts.v1").unwrap()
}

/// A table `applied(subject, sequence)`; the handler refuses an event that is not the subject's
/// next, and one whose data says `"fail"`.
pub(crate) struct Applier;

#[async_trait]
impl PgHandler for Applier {
    async fn apply(&self, tx: &Transaction<'_>, e: &IntegrationEvent) -> Result<(), BoxError> {
        let count: i64 = tx
            .query_one(
                "SELECT count(*) FROM applied WHERE subject = $1",
                &[&e.subject.as_str()],
            )
            .await?
            .get(0);
        if e.sequence.get() != count as u64 + 1 {
            return Err(format!("#{} where #{} was due", e.sequence.get(), count + 1).into());
        }
        tx.execute(
            "INSERT INTO applied (subject, sequence) VALUES ($1, $2)",
            &[&e.subject.as_str(), &(e.sequence.get() as i64)],
        )
        .await?;
        if e.data.contains("\"fail\"") {
            return Err("the handler refuses this one".into());
        }
        Ok(())
    }
}

/// A schema of the test's own, dropped at the end.
pub(crate) struct Schema {
    url: String,
    name: String,
}

impl Schema {
    pub(crate) fn new() -> Schema {
        Schema {
            url: headwater_testkit::postgres::url(),
            name: headwater_testkit::postgres::fresh_schema(),
        }
    }

    pub(crate) async fn open(&self) -> PgView<Applier> {
        PgView::connect(
            &self.url,
            &self.name,
            "CREATE TABLE IF NOT EXISTS applied (subject TEXT NOT NULL, sequence BIGINT NOT NULL)",
            Applier,
        )
        .await
        .unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        headwater_testkit::postgres::drop_schema(&self.url, &self.name);
    }
}

async fn rows(view: &PgView<Applier>) -> Vec<(String, i64)> {
    let guard = view.client().await.unwrap();
    let client = guard.as_ref().unwrap();
    client
        .query(
            "SELECT subject, sequence FROM applied ORDER BY subject COLLATE \"C\", sequence",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
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
async fn apply_moves_the_cursor_with_the_rows_and_a_failure_writes_neither_postgres() {
    let schema = Schema::new();
    let view = schema.open().await;
    let s = Subject::new("acc-1").unwrap();
    let applied = view
        .apply(&feed(), &s, &[event(1, "acc-1", 1), event(2, "acc-1", 2)])
        .await
        .unwrap();
    assert_eq!((applied.cursor, applied.applied), (Sequence(2), 2));
    let applied = view
        .apply(&feed(), &s, &[event(2, "acc-1", 2), event(3, "acc-1", 3)])
        .await
        .unwrap();
    assert_eq!(
        (applied.cursor, applied.applied, applied.duplicates),
        (Sequence(3), 1, 1)
    );
    let error = view
        .apply(&feed(), &s, &[event(5, "acc-1", 5)])
        .await
        .unwrap_err();
    assert!(matches!(error, ViewError::NotContiguous { .. }), "{error}");
    let error = view
        .apply(&feed(), &s, &[event(4, "acc-1", 4), failing("acc-1", 5)])
        .await
        .unwrap_err();
    assert!(matches!(error, ViewError::Handler { .. }), "{error}");
    assert_eq!(view.cursor(&feed(), &s).await.unwrap(), Sequence(3));
    assert_eq!(rows(&view).await.len(), 3);
    view.save_feed_position(&feed(), 9).await.unwrap();
    view.save_feed_position(&feed(), 4).await.unwrap();
    drop(view);
    let view = schema.open().await;
    assert_eq!(view.cursor(&feed(), &s).await.unwrap(), Sequence(3));
    assert_eq!(rows(&view).await.len(), 3);
    assert_eq!(view.feed_position(&feed()).await.unwrap(), 9, "never back");
    assert_eq!(
        view.cursors(&feed(), None, 10).await.unwrap(),
        vec![(s, Sequence(3))]
    );
}

#[tokio::test]
async fn apply_many_is_one_transaction_in_the_postgres_view() {
    let schema = Schema::new();
    let view = schema.open().await;
    apply_many_is_one_transaction(&view, failing).await;
    assert_eq!(rows(&view).await.len(), 4);
}

#[tokio::test]
async fn marks_are_durable_in_the_postgres_view() {
    let schema = Schema::new();
    marks_behave(&schema.open().await).await;
    let view = schema.open().await;
    assert_eq!(
        view.mark("walk/accounts.v1").await.unwrap().as_deref(),
        Some("acc-7")
    );
}

#[tokio::test]
async fn a_bad_schema_name_is_refused() {
    for name in ["", "Upper", "1digit", "semi;colon", &"x".repeat(64)] {
        let error = PgView::connect(&headwater_testkit::postgres::url(), name, "", Applier)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("invalid schema name"),
            "{name}: {error}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// The property test of `consumer`, on the PostgreSQL view store.
    #[test]
    fn any_delivery_schedule_converges_on_the_postgres_view(
        subjects in proptest::collection::vec(0u8..4, 1..50),
        drops in proptest::collection::vec(0u8..10, 50),
        swaps in proptest::collection::vec((0usize..50, 0usize..50), 0..20),
    ) {
        runtime().block_on(async {
            let schema = Schema::new();
            let upstream = Arc::new(MemoryUpstream::new());
            let events = produce(&upstream, &subjects);
            let view = Arc::new(schema.open().await);
            let expected = deliver_lossy_then_reconstitute(Arc::clone(&view), upstream, &events, &drops, &swaps).await;
            prop_assert_eq!(rows(&view).await, expected);
            Ok(())
        })?;
    }
}
