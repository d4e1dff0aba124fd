//! The hook that makes a follower (a projector, a publisher) run on one replica at a time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Decides which replica runs a follower. With one process (the embedded store) that is always
/// this one: [`AlwaysLead`]. With PostgreSQL several replicas share the store and
/// `headwater_postgres::PostgresStore` implements it with session advisory locks.
///
/// Correctness never rests on this alone: a projector commits with a compare-and-set on the
/// feed's cursor, so even two projectors of one feed at once write each batch once; two publishers
/// at once publish some events twice (at least once) and their cursor moves by compare-and-set.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits until this replica may run `follower` (`projector/accounts.v2`).
    ///
    /// # Cancel safety
    /// Must be cancel safe: the projector drops it at shutdown.
    async fn lead(&self, follower: &str) -> Result<Lease, BoxError>;
}

/// The right to run one follower, until it is lost or dropped. Dropping it tells whoever granted
/// it ([`LeaseHolder::released`]).
pub struct Lease {
    lost: watch::Receiver<bool>,
    released: watch::Sender<bool>,
    /// Held by a lease that is never lost.
    _forever: Option<watch::Sender<bool>>,
}

/// The granting side of a [`Lease`].
#[derive(Debug)]
pub struct LeaseHolder {
    lost: watch::Sender<bool>,
    released: watch::Receiver<bool>,
}

impl Lease {
    /// A lease and the handle that ends it.
    pub fn new() -> (Lease, LeaseHolder) {
        let (lost_tx, lost_rx) = watch::channel(false);
        let (released_tx, released_rx) = watch::channel(false);
        (
            Lease {
                lost: lost_rx,
                released: released_tx,
                _forever: None,
            },
            LeaseHolder {
                lost: lost_tx,
                released: released_rx,
            },
        )
    }

    /// A lease that is never lost.
    pub fn forever() -> Lease {
        let (mut lease, holder) = Lease::new();
        lease._forever = Some(holder.lost);
        lease
    }

    /// `true` once the lease is lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost (never, for a lease whose holder keeps it forever).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            // The holder dropped without a word: the lease is as good as lost.
            let _ = lost.wait_for(|lost| *lost).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.released.send_replace(true);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl LeaseHolder {
    /// Ends the lease: the projector stops after its in-flight commit and waits to lead again.
    pub fn lose(&self) {
        self.lost.send_replace(true);
    }

    /// Resolves when the projector dropped the lease (it stopped).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub fn released(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let mut released = self.released.clone();
        Box::pin(async move {
            let _ = released.wait_for(|released| *released).await;
        })
    }
}

/// Every lease granted at once and kept forever: the embedded store's single process.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysLead;

#[async_trait]
impl Leadership for AlwaysLead {
    async fn lead(&self, _follower: &str) -> Result<Lease, BoxError> {
        Ok(Lease::forever())
    }
}
