//! The PostgreSQL store's integration tests (one test binary). They need a server: set
//! `HEADWATER_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/postgres`), or run
//! `./scripts/test`, which starts a private cluster and sets it.

mod conformance;
mod crash;
mod feed_crash;
mod feeds;
mod g4;
mod group;
mod leader;
mod migrate;
mod support;
mod tools;
