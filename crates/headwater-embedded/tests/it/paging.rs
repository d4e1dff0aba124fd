//! Long pages of `read_all` and `read_stream` (read in two halves at once) end exactly where `MemoryStore`'s end,
//! whether the byte limit falls in the first half, in the second, or not at all.

use headwater_core::limits::{READ_PAGE_BYTES_MAX, READ_PAGE_EVENTS_MAX};
use headwater_core::{ExpectedVersion, Position, StreamVersion};
use headwater_store::conformance::{event, stream};
use headwater_store::{EventStore, MemoryStore};

use crate::support::open;

/// Appends `count` events of `data_bytes` bytes each to both stores, in appends of `per_append`.
async fn fill(
    stores: (&impl EventStore, &impl EventStore),
    count: usize,
    data_bytes: usize,
    per_append: usize,
) {
    let name = stream(&format!("paging{data_bytes}"));
    let mut left = count;
    while left > 0 {
        let n = left.min(per_append);
        let batch: Vec<_> = (0..n).map(|_| event(vec![b'p'; data_bytes])).collect();
        stores
            .0
            .append(&name, ExpectedVersion::Any, batch.clone())
            .await
            .unwrap();
        stores
            .1
            .append(&name, ExpectedVersion::Any, batch)
            .await
            .unwrap();
        left -= n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_pages_end_where_the_reference_ends() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = open(dir.path());
    let memory = MemoryStore::new();
    // Small events (no byte limit within a page), then events of 12 KiB (the limit falls in a
    // page's second half), then of 16 KiB (it falls in the first half).
    fill((&embedded, &memory), 12_000, 20, 1_000).await;
    fill((&embedded, &memory), 2_400, 12 * 1024, 400).await;
    fill((&embedded, &memory), 2_400, 16 * 1024, 400).await;
    let total = 12_000 + 2 * 2_400;
    let ids = |page: &[headwater_core::RecordedEvent]| {
        page.iter()
            .map(|e| (e.position, e.event_id))
            .collect::<Vec<_>>()
    };
    let mut checked_byte_limit = false;
    for after in [
        0,
        1,
        7_777,
        11_000,
        12_000,
        12_500,
        14_400,
        15_000,
        total - 2_500,
    ] {
        for limit in [1, 2_000, 2_001, 5_000, READ_PAGE_EVENTS_MAX] {
            let got = embedded.read_all(Position(after), limit).await.unwrap();
            let want = memory.read_all(Position(after), limit).await.unwrap();
            assert!(
                ids(&got) == ids(&want),
                "after {after}, limit {limit}: {} events up to {:?}, the reference {} up to {:?}",
                got.len(),
                got.last().map(|e| e.position),
                want.len(),
                want.last().map(|e| e.position),
            );
            let bytes: usize = got.iter().map(|e| e.data.len()).sum();
            assert!(bytes <= READ_PAGE_BYTES_MAX);
            checked_byte_limit |= (got.len() as u64) < limit && after + (got.len() as u64) < total;
        }
    }
    for (size, count) in [(20u64, 12_000u64), (12 * 1024, 2_400), (16 * 1024, 2_400)] {
        let name = stream(&format!("paging{size}"));
        for after in [0, 1, 999, count / 2, count - 2_100] {
            for limit in [2_000, 4_001, READ_PAGE_EVENTS_MAX] {
                let got = embedded
                    .read_stream(&name, StreamVersion(after), limit)
                    .await
                    .unwrap();
                let want = memory
                    .read_stream(&name, StreamVersion(after), limit)
                    .await
                    .unwrap();
                assert!(
                    ids(&got) == ids(&want),
                    "{name} after {after}, limit {limit}: {} events, the reference {}",
                    got.len(),
                    want.len(),
                );
            }
        }
    }
    assert!(checked_byte_limit, "some pages ended at the byte limit");
}
