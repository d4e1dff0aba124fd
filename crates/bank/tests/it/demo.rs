//! Tests of `bank demo`: a short demo converges (exit 0, through the real binary), the verdict
//! catches a consumer that went wrong (exit 1 naming the account), and the link's schedule is
//! the seed's.

use std::process::Command;

use bank::demo::link::{Link, LinkConfig};
use bank::demo::{Args, Fault, Mode, Verdict, demo};

/// A demo small enough for a test: a few seconds in a debug build.
fn short(seed: u64) -> Args {
    Args {
        accounts: 20,
        commands: 300,
        clients: 4,
        seed: Some(seed),
        ..Args::default()
    }
}

fn bank_demo(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_bank"))
        .arg("demo")
        .args(args)
        .output()
        .expect("running bank demo");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_short_demo_converges_and_exits_0() {
    let (code, stdout, stderr) = bank_demo(&[
        "--accounts",
        "20",
        "--commands",
        "300",
        "--clients",
        "4",
        "--seed",
        "11",
    ]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let verdicts: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("verdict:"))
        .collect();
    assert_eq!(
        verdicts,
        [
            // 20, and one more in each phase opened while the link was cut (a bootstrap).
            "verdict: CONVERGED — the consumer's balance equals the producer's for all 21 accounts (accounts.v1)",
            "verdict: CONVERGED — the consumer's balance equals the producer's for all 22 accounts (accounts.v2)",
        ],
        "stdout:\n{stdout}"
    );
    // The seed is printed, so that the link's schedule can be replayed.
    assert!(stderr.contains("seed 11"), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lossy_link_and_the_lost_last_events_are_healed() {
    let report = demo(&short(12), Mode::Silent, None).await.unwrap();
    assert!(report.converged(), "{report:#?}");
    assert_eq!(report.phases.len(), 2);
    for phase in &report.phases {
        assert!(
            phase.link.dropped > 0,
            "the link dropped nothing: {phase:#?}"
        );
        assert!(phase.consumer.gaps > 0, "no gap healed: {phase:#?}");
        assert_eq!(phase.lost_last, 1, "one account in 20 loses its last event");
        // One account opened while the link was cut, read through statements.
        assert_eq!(phase.consumer.bootstraps, 1, "{phase:#?}");
        let fixes = phase.reconstitution.expect("the reconstitution ran");
        // The lost last events differed before it, and it found them.
        assert!(phase.behind_before_reconstitution >= 1, "{phase:#?}");
        assert!(
            fixes.accounts >= phase.behind_before_reconstitution,
            "{phase:#?}"
        );
        assert!(phase.latency_p50_us.is_some(), "{phase:#?}");
    }
    assert!(report.phases[1].switch_ms.is_some(), "phase 2 moved to v2");
}

#[test]
fn without_the_reconstitution_the_verdict_names_an_account_and_exits_1() {
    let (code, stdout, stderr) = bank_demo(&[
        "--accounts",
        "20",
        "--commands",
        "300",
        "--clients",
        "4",
        "--seed",
        "13",
        "--skip-reconstitution",
    ]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("verdict:"))
        .unwrap_or_else(|| panic!("no verdict line in:\n{stdout}"));
    assert!(
        verdict.starts_with("verdict: DIFFERENT — account acc-000"),
        "{verdict}"
    );
    // Phase 2 does not run after a phase that did not converge: one verdict only.
    assert_eq!(stdout.matches("verdict:").count(), 1, "stdout:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_event_applied_by_the_consumer_is_caught_by_the_verdict() {
    let args = Args {
        drop: 0.0,
        dup: 0.0,
        reorder: 0.0,
        ..short(14)
    };
    let report = demo(&args, Mode::Silent, Some(Fault::CorruptOneDeposit))
        .await
        .unwrap();
    assert!(!report.converged(), "{report:#?}");
    let corrupted = report.corrupted.clone().expect("a deposit was corrupted");
    assert_eq!(report.first_difference(), Some(corrupted.as_str()));
    match &report.phases[0].verdict {
        Verdict::Differs {
            account,
            producer: Some(producer),
            consumer: Some(consumer),
            differing,
        } => {
            assert_eq!(*account, corrupted);
            // A cent more per corrupted deposit, and only that account.
            assert!(consumer > producer, "{report:#?}");
            assert_eq!(*differing, 1);
        }
        other => panic!("not the corrupted account's difference: {other:?}"),
    }
}

#[test]
fn the_links_schedule_is_seeded_and_reproducible() {
    let config = |seed| LinkConfig {
        drop: 0.1,
        dup: 0.1,
        reorder: 0.1,
        window: 16,
        seed,
    };
    let schedule = |seed| {
        let mut link = Link::new(config(seed)).unwrap();
        let mut out: Vec<u32> = (1..=3_000).flat_map(|e| link.pass(e)).collect();
        out.extend(link.flush());
        (out, link.stats())
    };
    let (first, stats) = schedule(7);
    assert_eq!(
        (first.clone(), stats),
        schedule(7),
        "the same seed, the same schedule"
    );
    assert_ne!(first, schedule(8).0, "another seed, another schedule");
    // It did what it was asked: some events dropped, some doubled, some out of order.
    assert!(
        stats.dropped > 0 && stats.duplicated > 0 && stats.reordered > 0,
        "{stats:?}"
    );
    assert!(
        first.windows(2).any(|w| w[0] > w[1]),
        "nothing out of order"
    );
}
