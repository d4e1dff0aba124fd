//! `bank demo`: both services in one process, a link between them that loses, duplicates and
//! reorders events on purpose, and the proof that the consumer still converges.
//!
//! 1. `accounts` and `statements` start on the embedded store, in a temporary directory (or
//!    `--data DIR`), on free loopback ports. `statements` takes no feed of its own
//!    (`Transport::External`): the demo's relay reads the producer's feed over HTTP and delivers
//!    it through the lossy [`link`].
//! 2. **Phase 1**: concurrent clients send random opens, deposits and withdrawals (some refused)
//!    over HTTP. The link drops, doubles and reorders the events; the consumer heals the gaps from
//!    the producer and skips the duplicates. Then some accounts get a last deposit that the link
//!    never delivers: no later event reveals it, only the reconstitution walk finds it. The
//!    verdict compares every account's balance, consumer against producer (and the producer
//!    against the sum of the commands it acknowledged).
//! 3. **Phase 2**: while commands go on, `accounts` starts projecting feed v2 (a backfill of the
//!    whole log) and `statements` moves to it: v2 is built beside v1, which keeps serving, then
//!    flipped to. The link goes on with v2; lost last events, reconstitution and the verdict
//!    again, on v2.
//!
//! The table and the verdict go to stdout, progress to stderr. Exit 0 when the consumer converged
//! in both phases, 1 otherwise (the verdict names the first account that differs).

pub mod link;
mod load;
mod progress;
mod relay;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use headwater::consume::{ConsumerStats, ViewStore};
use headwater::feed::FeedId;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::client::Client;
use crate::model::{FEED_V1, FEED_V2};
use crate::statements::{self, Statements, StatementsConsumer, Transport};
use crate::{accounts, accounts::Accounts};
use link::LinkConfig;
use load::Ledger;
pub use progress::Mode;
use progress::{Gauges, Screen};
use relay::Relay;
pub use report::{Commands, ConsumerWork, Fixes, Phase, Report, Verdict};

/// Accounts, by default.
pub const ACCOUNTS_DEFAULT: u64 = 500;
/// The most accounts.
pub const ACCOUNTS_MAX: u64 = 100_000;
/// Commands per phase, by default.
pub const COMMANDS_DEFAULT: u64 = 4_000;
/// Concurrent clients, by default.
pub const CLIENTS_DEFAULT: usize = 16;
/// The most concurrent clients.
pub const CLIENTS_MAX: usize = 1_024;
/// The exit code after Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;
/// A seed not given is drawn below this.
const SEED_RANDOM_MAX: u64 = 1_000_000;
/// Commands per second, by default.
pub const RATE_DEFAULT: u64 = 500;
/// The link's chances, by default.
pub const DROP_DEFAULT: f64 = 0.1;
pub const DUP_DEFAULT: f64 = 0.1;
pub const REORDER_DEFAULT: f64 = 0.1;
/// A reordered event comes out behind up to this many later events.
pub const REORDER_WINDOW_EVENTS: usize = 16;
/// One account in this many gets a last event the link loses (at least one account).
const LOST_LAST_ONE_IN: u64 = 20;
/// One account in this many more is opened while the link is cut, then read through
/// `statements` (a bootstrap on demand; at least one account).
const FRESH_ONE_IN: u64 = 100;
/// The amount of each lost last deposit, in cents.
const LAST_DEPOSIT_CENTS: u64 = 100;
/// The longest wait for the link to have read the whole feed, for the move to v2, for the
/// producer to answer.
const WAIT_MAX: Duration = Duration::from_secs(120);
/// Producer reads at once, for the verdict.
const VERDICT_READS_AT_ONCE: usize = 16;

/// The flags of `bank demo`.
#[derive(Clone, Debug, clap::Args)]
#[command(
    after_help = "Progress goes to stderr; each phase's table and verdict to stdout.\n\
Exit status: 0 when the consumer's balances equal the producer's for every account in both \
phases; 1 when they do not (the verdict names the first account that differs) or the demo \
could not run; 2 for bad flags; 130 when interrupted."
)]
pub struct Args {
    /// Accounts the commands go to.
    #[arg(long, value_name = "N", default_value_t = ACCOUNTS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=ACCOUNTS_MAX))]
    pub accounts: u64,
    /// Commands sent in each phase (opens, deposits, withdrawals; many withdrawals are refused
    /// for insufficient funds).
    #[arg(long, value_name = "N", default_value_t = COMMANDS_DEFAULT)]
    pub commands: u64,
    /// Clients sending commands at once, each over HTTP.
    #[arg(long, value_name = "N", default_value_t = CLIENTS_DEFAULT,
          value_parser = parse_clients)]
    pub clients: usize,
    /// Commands per second at most (0: as fast as the clients go). A steady load the consumer
    /// keeps up with, so that the latency measured is the system's, not a queue's.
    #[arg(long, value_name = "N", default_value_t = RATE_DEFAULT)]
    pub rate: u64,
    /// The chance that the link drops an event (never delivers it).
    #[arg(long, value_name = "P", default_value_t = DROP_DEFAULT, value_parser = parse_probability)]
    pub drop: f64,
    /// The chance that the link delivers an event twice.
    #[arg(long, value_name = "P", default_value_t = DUP_DEFAULT, value_parser = parse_probability)]
    pub dup: f64,
    /// The chance that the link holds an event back behind up to 16 later ones.
    #[arg(long, value_name = "P", default_value_t = REORDER_DEFAULT, value_parser = parse_probability)]
    pub reorder: f64,
    /// The seed of the link's schedule and of the commands' choices (random when not given;
    /// printed, so a run's link can be replayed).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Keep the services' data in DIR (missing or empty; kept at the end) instead of a temporary
    /// directory removed at the end.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Skip the reconstitution: the lost last events stay lost, and the verdict says so (exit 1).
    /// Shows why reconstitution is needed.
    #[arg(long)]
    pub skip_reconstitution: bool,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            accounts: ACCOUNTS_DEFAULT,
            commands: COMMANDS_DEFAULT,
            clients: CLIENTS_DEFAULT,
            rate: RATE_DEFAULT,
            drop: DROP_DEFAULT,
            dup: DUP_DEFAULT,
            reorder: REORDER_DEFAULT,
            seed: None,
            data: None,
            skip_reconstitution: false,
            json: false,
        }
    }
}

/// A fault put in on purpose, to show (and test) that the verdict catches a consumer that went
/// wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The link adds one cent to the first deposit it delivers that the consumer applies: the
    /// consumer's view of that account is wrong, and nothing heals it.
    CorruptOneDeposit,
}

/// Runs `bank demo`: the demo, then the table (or `--json`) on stdout.
///
/// # Errors
/// The services could not start, `--data` is not empty, or the demo could not run to its verdict
/// (the producer did not answer, the feed did not arrive in time). A verdict that the consumer
/// differs is not an error: it is exit code 1.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = tokio::select! {
        report = demo(&args, Mode::detect(), None) => report?,
        () = crate::shutdown::signal() => {
            // Dropping the demo stops both services and removes the temporary directory.
            eprintln!("bank demo: interrupted");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if report.converged() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The demo: starts the services, runs both phases, stops the services and returns the report.
/// Unless `args.json`, each phase's table and verdict are printed on stdout as it ends; progress
/// goes to stderr as `mode` says.
///
/// # Errors
/// As [`run`].
///
/// # Cancel safety
/// Not cancel safe: the services stop when dropped, without their graceful shutdown.
pub async fn demo(args: &Args, mode: Mode, fault: Option<Fault>) -> anyhow::Result<Report> {
    let started = Instant::now();
    // A seed short enough to type again.
    let seed = args
        .seed
        .unwrap_or_else(|| rand::rng().random_range(1..SEED_RANDOM_MAX));
    let link = LinkConfig {
        drop: args.drop,
        dup: args.dup,
        reorder: args.reorder,
        window: REORDER_WINDOW_EVENTS,
        seed,
    };
    link.check()?;
    let mut screen = Screen::new(mode);
    let (dir, _temporary) = data_dir(args.data.as_deref())?;
    // The feed API refuses reads without a token: one for this run.
    let token = format!("demo-{}", headwater::Uuid::new_v4().simple());

    let mut config = accounts::Config::new(dir.join("accounts"));
    config.token = Some(token.clone());
    config.versions = vec![1];
    let producer = accounts::start(config).await.context("starting accounts")?;
    let mut config = statements::Config::new(dir.join("statements"), &producer.url());
    config.transport = Transport::External;
    config.token = Some(token.clone());
    // Reconstitution only when the demo asks for it: it is what the lost last events show.
    config.reconstitute_every = None;
    config.walk_requests_per_second = None;
    let consumer = statements::start(config)
        .await
        .context("starting statements")?;

    screen.say("bank demo — the producer `accounts` and the consumer `statements` in one process, a lossy link between them");
    screen.say(&format!(
        "  data        {}{}",
        dir.display(),
        if args.data.is_some() {
            " (kept at the end)"
        } else {
            " (removed at the end; --data DIR keeps it)"
        }
    ));
    screen.say(&format!(
        "  accounts    {}  (commands, the feed API under /feeds)",
        producer.url()
    ));
    screen.say(&format!(
        "  statements  http://{}  (GET /balances/{{id}}, GET /status)",
        consumer.address()
    ));
    screen.say(&format!(
        "  link        drop {:.0}% · dup {:.0}% · reorder {:.0}% (window {REORDER_WINDOW_EVENTS}) · seed {seed}  (--seed {seed} replays it)",
        link.drop * 100.0,
        link.dup * 100.0,
        link.reorder * 100.0
    ));

    let mut demo = Demo {
        args,
        seed,
        link,
        token,
        producer: &producer,
        consumer: &consumer,
        client: Arc::new(Client::new(&producer.url())?),
        ledger: Arc::new(Mutex::new(Ledger::new(
            usize::try_from(args.accounts).unwrap_or(usize::MAX),
        ))),
        screen: &mut screen,
        fault,
        corrupted: None,
    };
    let mut phases = Vec::new();
    let first = demo.phase_one().await?;
    let converged = first.verdict.converged();
    demo.print(&first);
    phases.push(first);
    if converged {
        let second = demo.phase_two().await?;
        demo.print(&second);
        phases.push(second);
    } else {
        demo.screen
            .say("phase 2 (feed v2) skipped: phase 1 did not converge");
    }
    let corrupted = demo.corrupted.take();
    drop(demo);
    screen.finish();
    let (stopped, ()) = tokio::join!(consumer.shutdown(), producer.shutdown());
    stopped.context("stopping statements")?;
    Ok(Report {
        seed,
        accounts: args.accounts,
        phases,
        corrupted,
        wall_ms: millis(started.elapsed()),
    })
}

/// The run's parts, for the phases.
struct Demo<'a> {
    args: &'a Args,
    seed: u64,
    link: LinkConfig,
    token: String,
    producer: &'a Accounts,
    consumer: &'a Statements,
    client: Arc<Client>,
    ledger: Arc<Mutex<Ledger>>,
    screen: &'a mut Screen,
    fault: Option<Fault>,
    /// The account whose deposit the link corrupted ([`Fault::CorruptOneDeposit`]).
    corrupted: Option<String>,
}

impl Demo<'_> {
    fn print(&self, phase: &Phase) {
        if !self.args.json {
            print!("{}", report::render_phase(phase));
        }
    }

    /// Phase 1: commands, feed v1 through the link, lost last events, reconstitution, verdict.
    async fn phase_one(&mut self) -> anyhow::Result<Phase> {
        let v1 = FeedId::parse(FEED_V1)?;
        let gauges = Arc::new(Gauges::default());
        let consumer = self.consumer.consumer();
        let before = consumer.stats();
        let relay = self.relay(&v1, Arc::clone(&consumer), 0, &gauges, 1)?;
        self.screen.say(&format!(
            "\nphase 1 — {} commands over {} accounts by {} clients; statements reads {FEED_V1} through the link",
            report::count(self.args.commands),
            report::count(self.args.accounts),
            self.args.clients
        ));
        self.screen
            .start("phase 1", self.args.commands, Arc::clone(&gauges));
        let commands = load::run(&self.client, &self.ledger, &gauges, self.plan(0)).await?;
        self.screen.finish();
        let (relay, lost_last) = self.lose_last_events(relay, 1).await?;
        let outcome = relay.stop().await?;
        // The link is statements' transport here: it records how far it read, as a transport
        // does, so that the move to v2 follows v1 from there.
        consumer
            .view()
            .save_feed_position(&v1, outcome.position)
            .await?;
        self.corrupted = outcome.corrupted.clone();
        let work = work(before, consumer.stats());
        self.finish_phase(
            format!("phase 1: {FEED_V1} through the lossy link"),
            &v1,
            &consumer,
            commands,
            outcome,
            lost_last,
            work,
            None,
        )
        .await
    }

    /// Phase 2: commands go on while feed v2 is added (a backfill of the whole log) and
    /// statements moves to it; then the link carries v2: lost last events, reconstitution and
    /// the verdict on v2.
    async fn phase_two(&mut self) -> anyhow::Result<Phase> {
        let v2 = FeedId::parse(FEED_V2)?;
        let gauges = Arc::new(Gauges::default());
        // Half the commands while v2 is backfilled and statements moves to it, the other half
        // after the move, through the link on v2.
        let during = self.args.commands / 2;
        let after_move = self.args.commands - during;
        self.screen.say(&format!(
            "\nphase 2 — {} commands while accounts adds feed {FEED_V2} (a backfill of the whole log) and statements moves to it, then {} through the link on v2",
            report::count(during),
            report::count(after_move)
        ));
        self.screen
            .start("phase 2", self.args.commands, Arc::clone(&gauges));
        let load = {
            let (client, ledger, gauges) = (
                Arc::clone(&self.client),
                Arc::clone(&self.ledger),
                Arc::clone(&gauges),
            );
            let plan = load::Plan {
                commands: during,
                ..self.plan(2)
            };
            tokio::spawn(async move { load::run(&client, &ledger, &gauges, plan).await })
        };
        self.producer
            .add_version(2)
            .await
            .context("adding feed v2")?;
        // The move: statements builds v2 beside v1 (following v1 meanwhile), then flips.
        let moving = Instant::now();
        gauges.moving.store(true, Ordering::Relaxed);
        self.consumer.switch_to(v2.clone())?;
        tokio::time::timeout(WAIT_MAX, self.consumer.wait_for(&v2))
            .await
            .context("statements did not move to v2 in time")?;
        gauges.moving.store(false, Ordering::Relaxed);
        let switch_ms = millis(moving.elapsed());
        self.screen.say(&format!(
            "  statements moved to {FEED_V2} in {}: built beside v1, which kept serving, then flipped",
            report::seconds(switch_ms)
        ));
        // From now on the link carries v2, from where the move left it.
        let consumer = self.consumer.consumer();
        let before = consumer.stats();
        let after = consumer.view().feed_position(&v2).await?;
        tracing::debug!(
            after,
            head = self
                .ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .v2_events(),
            "the link takes over v2"
        );
        let relay = self.relay(&v2, Arc::clone(&consumer), after, &gauges, 2)?;
        let mut commands = load.await.context("the commands task failed")??;
        let plan = load::Plan {
            commands: after_move,
            ..self.plan(3)
        };
        commands.add(&load::run(&self.client, &self.ledger, &gauges, plan).await?);
        self.screen.finish();
        let (relay, lost_last) = self.lose_last_events(relay, 2).await?;
        let outcome = relay.stop().await?;
        let work = work(before, consumer.stats());
        self.finish_phase(
            format!("phase 2: {FEED_V2}, moved to live"),
            &v2,
            &consumer,
            commands,
            outcome,
            lost_last,
            work,
            Some(switch_ms),
        )
        .await
    }

    /// The commands of a phase, their choices seeded from the run's seed and `phase`.
    fn plan(&self, phase: u64) -> load::Plan {
        load::Plan {
            commands: self.args.commands,
            clients: self.args.clients,
            rate: self.args.rate,
            seed: self.seed.wrapping_add(phase),
        }
    }

    /// Starts the relay of `feed` after position `after` into `consumer`, the link's seed
    /// derived from the run's and `phase`.
    fn relay(
        &self,
        feed: &FeedId,
        consumer: Arc<StatementsConsumer>,
        after: u64,
        gauges: &Arc<Gauges>,
        phase: u64,
    ) -> anyhow::Result<Relay> {
        let link = LinkConfig {
            seed: self.seed.wrapping_add(phase),
            ..self.link
        };
        let route = relay::Route {
            upstream: self.producer.url(),
            token: Some(self.token.clone()),
            feed: feed.clone(),
            after,
            corrupt: self.fault == Some(Fault::CorruptOneDeposit),
        };
        Relay::start(route, consumer, link, Arc::clone(gauges))
    }

    /// Waits until the link delivered the whole feed, then cuts it and gives some accounts a
    /// last deposit the link loses. Returns the relay (settled) and how many events were lost.
    async fn lose_last_events(
        &mut self,
        mut relay: Relay,
        version: u32,
    ) -> anyhow::Result<(Relay, u64)> {
        let events = |ledger: &Ledger| {
            if version == 1 {
                ledger.v1_events()
            } else {
                ledger.v2_events()
            }
        };
        let expected = events(&self.ledger.lock().unwrap_or_else(|e| e.into_inner()));
        relay.settled(expected, WAIT_MAX).await?;
        let chosen: Vec<usize> = {
            let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            let opened: Vec<usize> = ledger.opened().collect();
            let lost = (self.args.accounts / LOST_LAST_ONE_IN).max(1);
            let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(u64::from(version) * 7));
            let mut chosen: Vec<usize> = opened
                .choose_multiple(&mut rng, usize::try_from(lost).unwrap_or(usize::MAX))
                .copied()
                .collect();
            chosen.sort_unstable();
            chosen
        };
        relay.cut(true);
        load::last_deposits(&self.client, &self.ledger, &chosen, LAST_DEPOSIT_CENTS).await?;
        // And a few new accounts whose every event is lost: statements has never heard of them.
        let fresh = usize::try_from((self.args.accounts / FRESH_ONE_IN).max(1)).unwrap_or(1);
        let fresh = load::open_new(&self.client, &self.ledger, fresh, LAST_DEPOSIT_CENTS).await?;
        let expected = events(&self.ledger.lock().unwrap_or_else(|e| e.into_inner()));
        relay.settled(expected, WAIT_MAX).await?;
        self.screen.say(&format!(
            "  {} accounts got a last deposit the link lost: no later event reveals it",
            report::count(chosen.len() as u64)
        ));
        // A read of an account statements does not hold bootstraps it from the producer (G9).
        let reader = Client::new(&format!("http://{}", self.consumer.address()))?;
        for &index in &fresh {
            let id = load::account_id(index);
            reader
                .statement(&id)
                .await
                .with_context(|| format!("reading {id} from statements"))?;
        }
        self.screen.say(&format!(
            "  {} account(s) opened while the link was cut, read through statements' GET /balances/{{id}}: bootstrapped on demand",
            report::count(fresh.len() as u64)
        ));
        Ok((relay, chosen.len() as u64))
    }

    /// The end of a phase: accounts behind, the reconstitution, the verdict.
    #[allow(clippy::too_many_arguments)]
    async fn finish_phase(
        &mut self,
        title: String,
        feed: &FeedId,
        consumer: &StatementsConsumer,
        commands: Commands,
        outcome: relay::RelayOutcome,
        lost_last: u64,
        work: ConsumerWork,
        switch_ms: Option<u64>,
    ) -> anyhow::Result<Phase> {
        let behind = self.compare().await?.differing;
        let reconstitution = if self.args.skip_reconstitution {
            None
        } else {
            self.screen.say(&format!(
                "  {} balances differ (lost last events, and last events the link dropped); reconstitution: walking every account the producer lists",
                report::count(behind)
            ));
            let stats_before = consumer.stats();
            let accounts = self.consumer.reconstitute().await?;
            let stats_after = consumer.stats();
            Some(Fixes {
                walked: self.producer_accounts(),
                accounts,
                events: stats_after.reconstituted - stats_before.reconstituted,
            })
        };
        let verdict = self.compare().await?.verdict;
        Ok(Phase {
            title,
            feed: feed.to_string(),
            commands,
            events: outcome.link.received + outcome.lost,
            link: outcome.link,
            lost_last,
            failed_deliveries: outcome.failed,
            consumer: work,
            behind_before_reconstitution: behind,
            reconstitution,
            switch_ms,
            latency_p50_us: (!outcome.latency.is_empty())
                .then(|| outcome.latency.value_at_quantile(0.5)),
            latency_p99_us: (!outcome.latency.is_empty())
                .then(|| outcome.latency.value_at_quantile(0.99)),
            verdict,
        })
    }

    /// Accounts the producer holds (those opened).
    fn producer_accounts(&self) -> u64 {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .opened()
            .count() as u64
    }

    /// Every account: the producer against the acknowledged commands, the consumer against the
    /// producer.
    async fn compare(&self) -> anyhow::Result<Comparison> {
        let tallies: Vec<(usize, i128, bool)> = {
            let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            let opened: std::collections::HashSet<usize> = ledger.opened().collect();
            ledger
                .tallies()
                .iter()
                .enumerate()
                .map(|(i, t)| (i, t.net, opened.contains(&i)))
                .collect()
        };
        // The producer, over HTTP, a few reads at once.
        let mut producer = BTreeMap::new();
        let mut reads = tokio::task::JoinSet::new();
        let mut pending = tallies.iter().map(|(i, _, _)| *i);
        loop {
            while reads.len() < VERDICT_READS_AT_ONCE {
                let Some(index) = pending.next() else { break };
                let client = Arc::clone(&self.client);
                reads.spawn(async move {
                    let id = load::account_id(index);
                    let balance = client.account(&id).await;
                    (index, balance)
                });
            }
            let Some(read) = reads.join_next().await else {
                break;
            };
            let (index, balance) = read.context("a read of the producer failed")?;
            let balance = balance
                .with_context(|| format!("reading {} from accounts", load::account_id(index)))?;
            producer.insert(index, balance.map(|b| b.balance));
        }
        let consumer = self.consumer.balances().await?;
        let mut verdict = None;
        let mut differing = 0;
        for (index, net, opened) in tallies {
            let id = load::account_id(index);
            let held = producer.get(&index).copied().flatten();
            let acknowledged = opened.then_some(net);
            if held.map(i128::from) != acknowledged {
                verdict.get_or_insert(Verdict::ProducerDisagrees {
                    account: id.clone(),
                    producer: held.unwrap_or(0),
                    acknowledged: net,
                });
            }
            let seen = consumer.get(&id).map(|b| b.balance);
            if seen != held {
                differing += 1;
                if verdict.is_none() {
                    verdict = Some(Verdict::Differs {
                        account: id,
                        producer: held,
                        consumer: seen,
                        differing: 0,
                    });
                }
            }
        }
        // An account the consumer holds that the demo never sent commands to.
        let known: std::collections::HashSet<String> =
            producer.keys().map(|&i| load::account_id(i)).collect();
        if let Some(stranger) = consumer.keys().find(|id| !known.contains(*id)) {
            differing += 1;
            verdict.get_or_insert(Verdict::Differs {
                account: stranger.clone(),
                producer: None,
                consumer: consumer.get(stranger).map(|b| b.balance),
                differing: 0,
            });
        }
        let verdict = match verdict {
            Some(Verdict::Differs {
                account,
                producer,
                consumer,
                ..
            }) => Verdict::Differs {
                account,
                producer,
                consumer,
                differing,
            },
            Some(other) => other,
            None => Verdict::Converged {
                accounts: self.producer_accounts(),
            },
        };
        Ok(Comparison { differing, verdict })
    }
}

/// What one comparison found.
struct Comparison {
    differing: u64,
    verdict: Verdict,
}

/// The consumer's work between two snapshots of its counters.
fn work(before: ConsumerStats, after: ConsumerStats) -> ConsumerWork {
    ConsumerWork {
        gaps: after.gaps - before.gaps,
        healed: after.healed - before.healed,
        duplicates: after.duplicates - before.duplicates,
        bootstraps: after.bootstraps - before.bootstraps,
    }
}

/// The data directory: `--data DIR` (missing or empty), or a temporary one removed when the
/// returned guard drops.
fn data_dir(data: Option<&Path>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match data {
        Some(dir) => {
            if dir.exists() {
                let mut entries = std::fs::read_dir(dir)
                    .with_context(|| format!("reading --data {}", dir.display()))?;
                anyhow::ensure!(
                    entries.next().is_none(),
                    "--data {} is not empty: the demo starts from nothing (give a new directory)",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating --data {}", dir.display()))?;
            Ok((dir.to_path_buf(), None))
        }
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("bank-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            Ok((temporary.path().to_path_buf(), Some(temporary)))
        }
    }
}

/// `--drop`, `--dup`, `--reorder`: 0 ..= 1.
fn parse_probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("a probability between 0 and 1 (0.1 is 10 %)".to_owned()),
    }
}

/// `--clients`: 1 ..= [`CLIENTS_MAX`].
fn parse_clients(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=CLIENTS_MAX).contains(&n) => Ok(n),
        _ => Err(format!("a number of clients, 1 to {CLIENTS_MAX}")),
    }
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}
