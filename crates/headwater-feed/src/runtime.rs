//! [`Projectors`]: a service's set of projections, each fed by its projector task.

use std::collections::BTreeMap;
use std::sync::Arc;

use headwater_core::{FeedId, FeedStatus};
use headwater_store::{EventStore, FeedError, FeedState, FeedStore};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::projector::{
    Projector, ProjectorError, ProjectorOptions, ProjectorState, ProjectorStatus, Stopped,
};
use headwater_store::{AlwaysLead, Leadership};

/// Why the projectors could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Two projections fill the same feed.
    #[error("two projections fill the feed {0}")]
    DuplicateFeed(FeedId),
    /// A feed could not be registered.
    #[error("registering the feed {feed}: {error}")]
    Register {
        feed: FeedId,
        #[source]
        error: FeedError,
    },
}

/// How to start a service's projectors: `Projectors::builder().projection(v1).projection(v2)
/// .start(events, feeds)`.
pub struct ProjectorsBuilder {
    projections: Vec<Arc<dyn Projection>>,
    options: ProjectorOptions,
    leadership: Arc<dyn Leadership>,
    metrics: Metrics,
}

impl std::fmt::Debug for ProjectorsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let feeds: Vec<_> = self.projections.iter().map(|p| p.feed()).collect();
        f.debug_struct("ProjectorsBuilder")
            .field("feeds", &feeds)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ProjectorsBuilder {
    /// Adds a projection (one feed: a name and version).
    #[must_use]
    pub fn projection(mut self, projection: impl Projection) -> ProjectorsBuilder {
        self.projections.push(Arc::new(projection));
        self
    }

    /// Adds a projection already behind an `Arc`.
    #[must_use]
    pub fn projection_arc(mut self, projection: Arc<dyn Projection>) -> ProjectorsBuilder {
        self.projections.push(projection);
        self
    }

    #[must_use]
    pub fn options(mut self, options: ProjectorOptions) -> ProjectorsBuilder {
        self.options = options;
        self
    }

    /// Who runs the projectors when several replicas share a store (default: [`AlwaysLead`],
    /// right for the embedded store).
    #[must_use]
    pub fn leadership(mut self, leadership: impl Leadership) -> ProjectorsBuilder {
        self.leadership = Arc::new(leadership);
        self
    }

    /// Registers the projectors' metrics (`headwater_projector_*`, labelled by feed) into
    /// `registry`.
    #[must_use]
    pub fn metrics(self, registry: &mut Registry) -> ProjectorsBuilder {
        self.metrics.register(registry);
        self
    }

    /// Registers every projection's feed with the feed store (a new one starts `backfilling`,
    /// empty) and starts one projector task per feed that is not retired.
    ///
    /// # Cancel safety
    /// Dropping it before it returns may leave some feeds registered and no task started;
    /// starting again is harmless.
    pub async fn start<E, F>(self, events: Arc<E>, feeds: Arc<F>) -> Result<Projectors, StartError>
    where
        E: EventStore + ?Sized,
        F: FeedStore + ?Sized,
    {
        let mut by_feed = BTreeMap::new();
        for projection in self.projections {
            let feed = projection.feed();
            if by_feed.insert(feed.clone(), projection).is_some() {
                return Err(StartError::DuplicateFeed(feed));
            }
        }
        let mut registered = Vec::with_capacity(by_feed.len());
        for feed in by_feed.keys() {
            let state = feeds
                .register(feed)
                .await
                .map_err(|error| StartError::Register {
                    feed: feed.clone(),
                    error,
                })?;
            registered.push(state);
        }
        let shutdown = CancellationToken::new();
        let mut running = Vec::with_capacity(by_feed.len());
        for (state, (feed, projection)) in registered.into_iter().zip(by_feed) {
            let projector = Projector::with_metrics(
                Arc::clone(&events),
                Arc::clone(&feeds),
                projection,
                self.options.clone(),
                self.metrics.clone(),
            );
            let status = projector.status();
            let task = if state.status == FeedStatus::Retired {
                tracing::info!(%feed, "feed retired: not projected");
                let (tx, rx) = watch::channel(retired_status(&state));
                drop(tx);
                running.push(Running {
                    feed,
                    status: rx,
                    task: None,
                });
                continue;
            } else {
                let leadership = Arc::clone(&self.leadership);
                let shutdown = shutdown.clone();
                tokio::spawn(async move { projector.run(&*leadership, &shutdown).await })
            };
            running.push(Running {
                feed,
                status,
                task: Some(task),
            });
        }
        Ok(Projectors { shutdown, running })
    }
}

fn retired_status(state: &FeedState) -> ProjectorStatus {
    ProjectorStatus {
        feed: state.feed.clone(),
        state: ProjectorState::Stopped,
        feed_status: FeedStatus::Retired,
        cursor: state.cursor,
        log_head: state.cursor,
        feed_head: state.head,
        backfill: None,
        last_error: None,
    }
}

struct Running {
    feed: FeedId,
    status: watch::Receiver<ProjectorStatus>,
    task: Option<JoinHandle<Result<Stopped, ProjectorError>>>,
}

/// A service's running projectors, one task per feed. [`Projectors::shutdown`] stops them and
/// waits; dropping the handle stops them too (each after its in-flight commit), without waiting.
#[must_use = "dropping Projectors stops the projectors"]
pub struct Projectors {
    shutdown: CancellationToken,
    running: Vec<Running>,
}

impl std::fmt::Debug for Projectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projectors")
            .field("statuses", &self.statuses())
            .finish_non_exhaustive()
    }
}

impl Drop for Projectors {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Projectors {
    pub fn builder() -> ProjectorsBuilder {
        ProjectorsBuilder {
            projections: Vec::new(),
            options: ProjectorOptions::default(),
            leadership: Arc::new(AlwaysLead),
            metrics: Metrics::default(),
        }
    }

    /// Every projector's status, in feed order.
    pub fn statuses(&self) -> Vec<ProjectorStatus> {
        self.running
            .iter()
            .map(|r| r.status.borrow().clone())
            .collect()
    }

    /// A watch of one feed's projector status.
    pub fn watch(&self, feed: &FeedId) -> Option<watch::Receiver<ProjectorStatus>> {
        self.running
            .iter()
            .find(|r| &r.feed == feed)
            .map(|r| r.status.clone())
    }

    /// Watches of every projector's status, for a status page or `/metrics` that outlives this
    /// handle.
    pub fn watches(&self) -> Vec<watch::Receiver<ProjectorStatus>> {
        self.running.iter().map(|r| r.status.clone()).collect()
    }

    /// A token that stops every projector when cancelled (the same as [`Projectors::shutdown`]
    /// without waiting).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every projector (each lets its in-flight commit finish) and waits for them. Returns
    /// each feed's outcome.
    ///
    /// # Cancel safety
    /// The projectors are told to stop at the first poll; dropping the future only stops the
    /// waiting.
    pub async fn shutdown(mut self) -> Vec<(FeedId, Result<Stopped, ProjectorError>)> {
        self.shutdown.cancel();
        let running = std::mem::take(&mut self.running);
        let mut outcomes = Vec::with_capacity(running.len());
        for running in running {
            let outcome = match running.task {
                None => Ok(Stopped::Retired),
                Some(task) => task.await.unwrap_or_else(|error| {
                    Err(ProjectorError::Task {
                        feed: running.feed.clone(),
                        detail: error.to_string(),
                    })
                }),
            };
            outcomes.push((running.feed, outcome));
        }
        outcomes
    }
}
