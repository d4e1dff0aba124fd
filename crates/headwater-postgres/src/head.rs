//! The head watch: `LISTEN` on a dedicated connection, with a fallback poll.
//!
//! Every group transaction that writes events calls `pg_notify(<schema>, <new head>)`;
//! PostgreSQL delivers the notification after the commit, to every listening session (other
//! replicas' included), in commit order. A notification can still be missed: the listening
//! connection may drop and reconnect. So the head is also read every poll interval and right
//! after each (re)connection; the watch only ever moves forward.
//!
//! The same connection serves the feeds' head watches ([`crate::PgFeedStore`]): it also
//! listens on `<schema>.feeds` (payload `<feed> <head>`, sent by `feed_commit`), and while some
//! feed is watched its poll reads every feed's head too, also at once when a new watch asks.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use headwater_core::Position;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::feed::FeedShared;
use crate::reader::to_u64;
use crate::{Target, advance};

/// How long to wait before connecting again after the listener's connection failed, in
/// milliseconds.
const RECONNECT_DELAY_MILLIS: u64 = 500;
/// The longest a poll of the head may take before the connection is taken for dead, in
/// milliseconds.
const POLL_TIMEOUT_MILLIS: u64 = 5_000;

/// Keeps `head` up to date until the task is aborted (when the store is dropped).
pub(crate) async fn follow(
    target: Target,
    head: Arc<watch::Sender<Position>>,
    feeds: Arc<FeedShared>,
    poll: Duration,
) {
    loop {
        if let Err(error) = listen(&target, &head, &feeds, poll).await {
            tracing::warn!(%error, schema = %target.schema, "head listener failed; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(RECONNECT_DELAY_MILLIS)).await;
    }
}

/// One connection's life: listen, then poll until the connection fails.
async fn listen(
    target: &Target,
    head: &Arc<watch::Sender<Position>>,
    feeds: &Arc<FeedShared>,
    poll: Duration,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = target.config.connect(NoTls).await?;
    let notified = head.clone();
    let notified_feeds = feeds.clone();
    let channel = target.sql.channel.clone();
    let feed_channel = target.sql.feeds.channel.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.channel() == channel => {
                    if let Some(position) = n.payload().parse::<i64>().ok().and_then(to_u64) {
                        advance(&notified, Position(position));
                    }
                }
                Ok(AsyncMessage::Notification(n)) if n.channel() == feed_channel => {
                    notified_feeds.notified(n.payload());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "head listener connection ended");
                    return;
                }
            }
        }
    });
    // Aborted however this function ends, also when the store drops (aborts) its caller.
    let mut driver = AbortOnDrop(driver);
    let result = async {
        client
            .batch_execute(&format!(
                "LISTEN \"{}\"; LISTEN \"{}\"",
                target.sql.channel, target.sql.feeds.channel
            ))
            .await?;
        let read_head = client.prepare(&target.sql.read_head).await?;
        let read_feed_heads = client.prepare(&target.sql.feeds.heads).await?;
        loop {
            // After LISTEN: whatever committed before it is in this read.
            let timeout = Duration::from_millis(POLL_TIMEOUT_MILLIS);
            let read = async {
                let row = client.query_one(&read_head, &[]).await?;
                let position: i64 = row.get(0);
                advance(head, Position(to_u64(position).unwrap_or(0)));
                if feeds.watching() {
                    feeds.polled(&client.query(&read_feed_heads, &[]).await?);
                }
                Ok::<(), tokio_postgres::Error>(())
            };
            match tokio::time::timeout(timeout, read).await {
                Ok(read) => read?,
                Err(_) => {
                    tracing::warn!("reading the head timed out; reconnecting");
                    return Ok(());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = feeds.poll_now.notified() => {}
                _ = &mut driver.0 => return Ok(()),
            }
        }
    }
    .await;
    drop(driver);
    result
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
