//! The embedded store's integration tests (one test binary).

mod conformance;
mod corruption;
mod crash;
mod faults;
mod feed_conformance;
mod feed_crash;
mod feeds;
mod format;
mod group;
mod integrity;
mod locking;
mod paging;
mod support;
mod torn;
