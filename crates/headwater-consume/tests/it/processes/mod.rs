//! The consumer with real processes: a producer (a child process of this binary, `producer`)
//! appends to many accounts, projects one feed and serves it over its feed API on loopback; a
//! consumer (another child, `consumer`) follows that feed over HTTP into a view on disk (SQLite)
//! or in PostgreSQL, while the test kills it with SIGKILL at random moments and starts it again
//! (`crash`: every event applied exactly once). `bootstrap`: consumers in this process bootstrap
//! subjects they never saw from a producer process, many callers at once, one fetch.
//!
//! `HEADWATER_CRASH_SEED=<u64>` replays a run's random choices; each test prints its seed first.

mod bootstrap;
mod consumer;
mod crash;
mod producer;

use rand::SeedableRng;
use rand::rngs::StdRng;

/// Set by whoever runs the tests: the seed of a test's random choices.
const SEED_ENV: &str = "HEADWATER_CRASH_SEED";

/// The test's random generator, its seed printed (from [`SEED_ENV`] when set).
fn seeded() -> (u64, StdRng) {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .map_or_else(rand::random::<u64>, |s| s.parse().unwrap());
    eprintln!("{SEED_ENV}={seed}");
    (seed, StdRng::seed_from_u64(seed))
}

/// The checksum of a subject's events: folded over their ids in sequence order (FNV-1a 64), so
/// it differs when an event is missing, doubled, foreign or out of place.
fn checksum(previous: u64, id: &str) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = previous;
    for byte in previous.to_le_bytes().iter().chain(id.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// The checksum of a subject with no events.
const CHECKSUM_START: u64 = 0xcbf2_9ce4_8422_2325;
