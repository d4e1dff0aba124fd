//! G9 against a real producer process over HTTP: a consumer that never saw a subject bootstraps
//! it on demand, its whole stream, and many concurrent `ensure` calls for one subject make one
//! fetch. The fetches are counted by a proxy in front of the producer (every request it passes
//! on, after a delay that stands for a slow network, so that the callers all arrive while the
//! first fetch is under way) and cross-checked with the producer's own request metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headwater_consume::{Consumer, ConsumerOptions, FeedClient};
use headwater_core::{Sequence, Subject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::processes::consumer::{check_consistent, open_embedded, read_embedded};
use crate::processes::producer::{
    Producer, TOKEN, Workload, feed, http_get, read_feed, subject_heads,
};
use crate::processes::seeded;

/// The producer's subjects, and the events it holds (about 250 a subject).
const ACCOUNTS: u64 = 12;
const PRELOAD_EVENTS: u64 = 3_000;
/// Subjects bootstrapped, and callers of `ensure` for each, all at once.
const ENSURED_SUBJECTS: usize = 4;
const CALLERS_PER_SUBJECT: usize = 8;
/// Events the consumer asks per page: a bootstrap takes several.
const PAGE_EVENTS: u64 = 100;
/// What the proxy adds to every request, in milliseconds: a slow network.
const PROXY_DELAY_MILLIS: u64 = 100;
/// The request metric of the producer's subject reads.
const SUBJECT_ROUTE: &str = "route=\"/feeds/{name}/{version}/subjects/{subject}\"";

/// A TCP proxy to `upstream` that records the target of every HTTP request it passes on (the
/// consumer's client sends only bodiless GETs), each after [`PROXY_DELAY_MILLIS`].
async fn counting_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(upstream).await.unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            });
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buffer = [0; 16 * 1024];
                loop {
                    let Ok(n) = from_client.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    pending.extend_from_slice(&buffer[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = pending.drain(..end + 4).collect();
                        let text = String::from_utf8_lossy(&head);
                        assert!(
                            !text.to_ascii_lowercase().contains("content-length")
                                && !text.to_ascii_lowercase().contains("transfer-encoding"),
                            "a request with a body: {text}"
                        );
                        let target = text.split(' ').nth(1).unwrap_or_default().to_owned();
                        tokio::time::sleep(Duration::from_millis(PROXY_DELAY_MILLIS)).await;
                        log.lock().unwrap().push(target);
                        if to_server.write_all(&head).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (address, seen)
}

/// The sum of the producer's counted requests on its subject route.
fn subject_reads_served(api: SocketAddr) -> u64 {
    let (code, body) = http_get(api, "/metrics");
    assert_eq!(code, 200);
    String::from_utf8(body)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("headwater_api_requests") && l.contains(SUBJECT_ROUTE))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum()
}

/// The `after` of each page one fetch of a subject whose head is `head` asks for: pages of
/// [`PAGE_EVENTS`] from 0, and the one after the head that answers nothing.
fn one_fetch(head: u64) -> Vec<u64> {
    let mut afters: Vec<u64> = (0..head).step_by(PAGE_EVENTS as usize).collect();
    afters.push(head);
    afters
}

#[test]
fn concurrent_bootstraps_from_a_producer_process_fetch_each_subject_once() {
    let (seed, _) = seeded();
    let dir = tempfile::tempdir().unwrap();
    let producer = Producer::start(
        dir.path(),
        seed,
        Workload {
            accounts: ACCOUNTS,
            preload: PRELOAD_EVENTS,
            append_every_micros: None,
        },
    );
    let heads = subject_heads(producer.api);
    let expected = read_feed(producer.api);
    assert_eq!(heads.len(), ACCOUNTS as usize);
    // Some subjects the consumer bootstraps, and one the producer does not have.
    let mut ensured: Vec<(String, u64)> = heads
        .iter()
        .take(ENSURED_SUBJECTS)
        .map(|(s, h)| (s.clone(), *h))
        .collect();
    ensured.push(("nobody".to_owned(), 0));
    let served_before = subject_reads_served(producer.api);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let view_dir = tempfile::tempdir().unwrap();
    let (view, requests, stats) = runtime.block_on(async {
        let (proxy, requests) = counting_proxy(producer.api).await;
        let client = FeedClient::new(&format!("http://{proxy}"), Some(TOKEN.to_owned())).unwrap();
        let view = Arc::new(open_embedded(&view_dir.path().join("view.sqlite3")));
        let consumer = Arc::new(Consumer::new(
            feed(),
            Arc::clone(&view),
            Arc::new(client),
            ConsumerOptions::default().with_page_events(PAGE_EVENTS),
        ));
        let start = Arc::new(tokio::sync::Barrier::new(
            ensured.len() * CALLERS_PER_SUBJECT,
        ));
        let mut callers = Vec::new();
        for (subject, head) in &ensured {
            for _ in 0..CALLERS_PER_SUBJECT {
                let (consumer, start) = (Arc::clone(&consumer), Arc::clone(&start));
                let subject = Subject::new(subject.clone()).unwrap();
                let head = *head;
                callers.push(tokio::spawn(async move {
                    start.wait().await;
                    let cursor = consumer.ensure(&subject).await.unwrap();
                    assert_eq!(cursor, Sequence(head), "ensure({subject})");
                }));
            }
        }
        for caller in callers {
            caller.await.unwrap();
        }
        let requests = requests.lock().unwrap().clone();
        (read_embedded(&view).await, requests, consumer.stats())
    });

    // The view has each ensured subject whole, once, as the producer has it; nothing else.
    check_consistent(&view, "after the bootstraps");
    for (subject, head) in &ensured {
        let Some(e) = expected.get(subject) else {
            assert!(
                !view.contains_key(subject),
                "{subject} is not at the producer"
            );
            continue;
        };
        let s = &view[subject];
        assert_eq!((s.cursor, s.checksum), (*head, e.checksum), "{subject}");
    }
    assert_eq!(
        view.len(),
        ENSURED_SUBJECTS,
        "only the ensured subjects: {:?}",
        view.keys()
    );

    // One fetch per subject: each page asked once, whatever the number of callers.
    let mut asked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let prefix = "/feeds/accounts/v1/subjects/";
    for target in &requests {
        let rest = target
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("a request other than a subject read: {target}"));
        let (subject, query) = rest.split_once('?').unwrap();
        let after = query
            .split('&')
            .find_map(|p| p.strip_prefix("after="))
            .unwrap()
            .parse()
            .unwrap();
        asked.entry(subject.to_owned()).or_default().push(after);
    }
    for (subject, head) in &ensured {
        let mut afters = asked.remove(subject).unwrap_or_default();
        afters.sort_unstable();
        assert_eq!(
            afters,
            one_fetch(*head),
            "{subject}: the pages asked by {CALLERS_PER_SUBJECT} concurrent callers"
        );
    }
    assert!(
        asked.is_empty(),
        "reads of subjects nobody ensured: {asked:?}"
    );
    assert_eq!(stats.bootstraps, ensured.len() as u64, "{stats:?}");
    // The producer served exactly what the proxy passed on.
    assert_eq!(
        subject_reads_served(producer.api) - served_before,
        requests.len() as u64
    );
    eprintln!(
        "{} callers of ensure on {} subjects: {} subject reads served",
        ensured.len() * CALLERS_PER_SUBJECT,
        ensured.len(),
        requests.len()
    );
    producer.kill();
}
