//! Leader election for followers: a follower configured on several replicas runs on exactly one.
//!
//! The leader of follower `name` is the session that holds the session advisory lock
//! `lock_key(schema, "leader/<name>")`, on a connection dedicated to it. PostgreSQL drops the
//! lock with the session: when the leader's process dies, or its connection breaks, the lock is
//! free at once (or, when its host vanished without closing the socket, once the server's TCP
//! keepalive gives up on it), and the next replica that tries takes it.
//!
//! The leader learns it lost the lock by a health check on the same connection: every
//! `health_check_interval` it asks PostgreSQL whether its session still holds the lock. A failed
//! or late check, or a broken connection, ends the leadership *at once*: [`Leadership::lost`]
//! resolves and [`Leadership::is_leader`] turns false; the caller must stop its work.
//!
//! Between the moment a session dies on the server and the moment its process notices, another
//! replica may already lead: no lock service can close that window. So each leadership carries a
//! **term**, a number that grows with every acquisition of the lock (kept in `leader_terms`), and
//! a leader's writes must be fenced: with expected versions (G2) on the streams it writes, or by
//! a conditional update of its cursor. Then a deposed leader's late write fails visibly instead
//! of being applied twice.
//!
//! [`crate::PostgresStore`] implements [`headwater_store::Leadership`] with this election, so a
//! service hands its store to the projectors and publishers (`.leadership(store.clone())`): each
//! follower's `lead` acquires its election and returns a [`Lease`] that is lost when the
//! leadership is, and whose release ends the leadership (its session, so its lock).

use std::time::Duration;

use async_trait::async_trait;
use headwater_store::{Lease, LeaseHolder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::reader::to_u64;
use crate::schema::lock_key;
use crate::{PostgresStore, Target};

/// How often a leader checks that it still holds its lock, by default, in milliseconds.
pub const HEALTH_CHECK_INTERVAL_MILLIS_DEFAULT: u64 = 500;
/// How long one health check may take before leadership is taken as lost, by default, in
/// milliseconds.
pub const HEALTH_CHECK_TIMEOUT_MILLIS_DEFAULT: u64 = 2_000;
/// How long a replica waits between tries to take a held lock, by default, in milliseconds.
pub const RETRY_INTERVAL_MILLIS_DEFAULT: u64 = 500;
/// The longest wait between tries after connection failures (the wait doubles up to it), in
/// milliseconds.
pub const RETRY_BACKOFF_MILLIS_MAX: u64 = 5_000;
/// The longest follower name, in bytes.
pub const FOLLOWER_NAME_BYTES_MAX: usize = 200;

/// Why a try to lead failed (not "someone else leads": that is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaderError {
    #[error("leader election failed: {}", crate::detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("invalid follower name: empty or longer than {FOLLOWER_NAME_BYTES_MAX} bytes")]
    InvalidName,
}

/// The election of one follower's leader among the replicas of a store; see the module docs.
/// Made by [`crate::PostgresStore::leader_election`].
#[derive(Debug, Clone)]
pub struct LeaderElection {
    target: Target,
    name: String,
    key: i64,
    /// How long to wait between tries when another replica leads.
    pub retry_interval: Duration,
    /// How often a leader checks its lock.
    pub health_check_interval: Duration,
    /// How long one check may take.
    pub health_check_timeout: Duration,
}

impl LeaderElection {
    pub(crate) fn new(target: Target, name: &str) -> LeaderElection {
        let key = lock_key(&target.schema, &format!("leader/{name}"));
        LeaderElection {
            target,
            name: name.to_owned(),
            key,
            retry_interval: Duration::from_millis(RETRY_INTERVAL_MILLIS_DEFAULT),
            health_check_interval: Duration::from_millis(HEALTH_CHECK_INTERVAL_MILLIS_DEFAULT),
            health_check_timeout: Duration::from_millis(HEALTH_CHECK_TIMEOUT_MILLIS_DEFAULT),
        }
    }

    /// The follower's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The advisory lock key (bigint form) of this follower, as `pg_locks` shows it split into
    /// `classid` (high 32 bits) and `objid` (low 32 bits) with `objsubid = 1`.
    pub fn lock_key(&self) -> i64 {
        self.key
    }

    /// One try: leads if no other session holds the lock.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped try closes its connection, which releases the lock if it was taken.
    pub async fn try_acquire(&self) -> Result<Option<Leadership>, LeaderError> {
        if self.name.is_empty() || self.name.len() > FOLLOWER_NAME_BYTES_MAX {
            return Err(LeaderError::InvalidName);
        }
        let client = self.target.connect().await?;
        client
            .batch_execute("SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0")
            .await?;
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&self.key])
            .await?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }
        let row = client
            .query_one(&self.target.sql.next_term, &[&self.name])
            .await?;
        let term = to_u64(row.get(0)).unwrap_or(0);
        let (lost_tx, lost) = watch::channel(false);
        let check = tokio::spawn(health_check(
            client,
            self.key,
            self.health_check_interval,
            self.health_check_timeout,
            lost_tx,
        ));
        tracing::info!(follower = %self.name, term, "leading");
        Ok(Some(Leadership {
            name: self.name.clone(),
            term,
            lost,
            check,
        }))
    }

    /// Waits until this replica leads: tries every `retry_interval` while another leads, and
    /// backs off (up to [`RETRY_BACKOFF_MILLIS_MAX`]) while PostgreSQL cannot be reached.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`LeaderElection::try_acquire`].
    pub async fn acquire(&self) -> Result<Leadership, LeaderError> {
        let mut backoff = self.retry_interval;
        loop {
            match self.try_acquire().await {
                Ok(Some(leadership)) => return Ok(leadership),
                Ok(None) => {
                    backoff = self.retry_interval;
                    tokio::time::sleep(self.retry_interval).await;
                }
                Err(LeaderError::InvalidName) => return Err(LeaderError::InvalidName),
                Err(error) => {
                    tracing::warn!(%error, follower = %self.name, "cannot try to lead; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(RETRY_BACKOFF_MILLIS_MAX));
                }
            }
        }
    }
}

/// Checks the lock until it is lost or the leadership is dropped (the task is aborted, its
/// connection closes, the session and its lock end).
async fn health_check(
    client: Client,
    key: i64,
    interval: Duration,
    timeout: Duration,
    lost: watch::Sender<bool>,
) {
    let sql = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
               AND pid = pg_backend_pid() AND objsubid = 1 \
               AND classid = (($1::bigint >> 32) & 4294967295)::oid \
               AND objid = ($1::bigint & 4294967295)::oid)";
    loop {
        tokio::time::sleep(interval).await;
        let held = tokio::time::timeout(timeout, client.query_one(sql, &[&key])).await;
        match held {
            Ok(Ok(row)) if row.get::<_, bool>(0) => {}
            Ok(Ok(_)) => {
                tracing::warn!("the leader lock is no longer held");
                break;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "leader health check failed");
                break;
            }
            Err(_) => {
                tracing::warn!("leader health check timed out");
                break;
            }
        }
    }
    lost.send_replace(true);
    drop(client);
}

/// Leadership of one follower, held until dropped or lost. See the module docs for what a
/// leader must do with [`Leadership::term`].
#[derive(Debug)]
pub struct Leadership {
    name: String,
    term: u64,
    lost: watch::Receiver<bool>,
    check: JoinHandle<()>,
}

impl Leadership {
    /// The follower's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This leadership's term: greater than every earlier leadership's of the same follower.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// `false` once the lock is known to be lost.
    pub fn is_leader(&self) -> bool {
        !*self.lost.borrow()
    }

    /// Resolves when the leadership is lost (a failed health check or a broken connection).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the check task ended: leadership is lost either way.
        let _ = lost.wait_for(|lost| *lost).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Dropping the task's client closes the session, which releases the lock.
        self.check.abort();
    }
}

/// The follower runs while this replica holds `follower`'s election ([`LeaderElection`], with the
/// timing of the store's [`crate::Options`]): [`headwater_store::Leadership::lead`] waits for
/// it, and the [`Lease`] it returns is lost as soon as the leadership is (a failed health
/// check, a broken connection, a terminated session). Dropping the lease ends the leadership: its
/// session closes and another replica may lead.
#[async_trait]
impl headwater_store::Leadership for PostgresStore {
    /// # Cancel safety
    /// Cancel safe: a dropped wait closes the connection of its try, which frees the lock if it
    /// was taken.
    async fn lead(
        &self,
        follower: &str,
    ) -> Result<Lease, Box<dyn std::error::Error + Send + Sync + 'static>> {
        let leadership = self.leader_election(follower).acquire().await?;
        let (lease, holder) = Lease::new();
        tokio::spawn(hold(leadership, holder));
        Ok(lease)
    }
}

/// Keeps `leadership` until it is lost (then the lease is) or the lease is released (then the
/// leadership is dropped: its session ends, freeing the lock).
async fn hold(leadership: Leadership, holder: LeaseHolder) {
    tokio::select! {
        () = leadership.lost() => {
            tracing::warn!(follower = %leadership.name(), term = leadership.term(), "lost the leadership");
            holder.lose();
        }
        () = holder.released() => {
            tracing::info!(follower = %leadership.name(), term = leadership.term(), "gave up the leadership");
        }
    }
    drop(leadership);
}
