//! The lossy link: what stands between the producer's feed and the consumer in the demo.
//!
//! The link is a pure, seeded schedule. It takes the feed's events in order, one at a time, and
//! decides for each what reaches the consumer: nothing (**dropped**), one copy, or two copies
//! (**duplicated**); and whether a copy is **held back** behind up to `window` later events of
//! the feed (**reordered**). The same seed and the same input give the same output, so a run's
//! delivery schedule is reproducible (`--seed N`), whatever the timing of the services around it.
//!
//! The link knows nothing of HTTP or of the consumer: the demo's driver reads the feed, passes
//! each event through [`Link::pass`], delivers what comes out, and calls [`Link::flush`] when the
//! feed is idle (nothing is held back forever).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The most later events a reordered copy may be held back behind.
pub const REORDER_WINDOW_MAX: usize = 1_000;

/// What the link does to the feed. Probabilities are in `0.0 ..= 1.0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkConfig {
    /// The chance that an event is not delivered at all.
    pub drop: f64,
    /// The chance that an event that is delivered is delivered twice.
    pub dup: f64,
    /// The chance that a copy is held back behind later events.
    pub reorder: f64,
    /// A held-back copy comes out after 1 ..= `window` later events of the feed (or at the next
    /// [`Link::flush`]).
    pub window: usize,
    /// The seed of the schedule.
    pub seed: u64,
}

/// Why a [`LinkConfig`] is refused.
#[derive(Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkConfigError {
    #[error("--{name} must be a probability between 0 and 1, not {value}")]
    Probability { name: &'static str, value: f64 },
    #[error("the reorder window must be 1 ..= {REORDER_WINDOW_MAX} events, not {0}")]
    Window(usize),
}

impl LinkConfig {
    /// Checks the probabilities and the window.
    ///
    /// # Errors
    /// [`LinkConfigError`] naming what is out of range.
    pub fn check(&self) -> Result<(), LinkConfigError> {
        for (name, value) in [
            ("drop", self.drop),
            ("dup", self.dup),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(LinkConfigError::Probability { name, value });
            }
        }
        if self.window == 0 || self.window > REORDER_WINDOW_MAX {
            return Err(LinkConfigError::Window(self.window));
        }
        Ok(())
    }
}

/// What the link did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Events of the feed passed to the link.
    pub received: u64,
    /// Events the link did not deliver at all.
    pub dropped: u64,
    /// Events the link delivered twice.
    pub duplicated: u64,
    /// Copies held back behind later events.
    pub reordered: u64,
    /// Copies that came out of the link.
    pub delivered: u64,
}

impl LinkStats {
    /// Adds what another link did.
    pub fn add(&mut self, other: &LinkStats) {
        self.received += other.received;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.delivered += other.delivered;
    }
}

/// A copy held back: it comes out once `left` more events went through.
#[derive(Debug)]
struct Held<T> {
    left: usize,
    event: T,
}

/// The lossy link's schedule. See the module documentation.
#[derive(Debug)]
pub struct Link<T> {
    config: LinkConfig,
    rng: StdRng,
    /// Held-back copies, in the order they were held.
    held: Vec<Held<T>>,
    stats: LinkStats,
}

impl<T: Clone> Link<T> {
    /// A link with `config`'s schedule.
    ///
    /// # Errors
    /// [`LinkConfigError`] when the configuration is out of range.
    pub fn new(config: LinkConfig) -> Result<Link<T>, LinkConfigError> {
        config.check()?;
        Ok(Link {
            config,
            rng: StdRng::seed_from_u64(config.seed),
            held: Vec::new(),
            stats: LinkStats::default(),
        })
    }

    /// Takes the feed's next event; returns what the link delivers now, in delivery order: the
    /// copies of `event` not held back, then the held-back copies whose wait ended.
    pub fn pass(&mut self, event: T) -> Vec<T> {
        self.stats.received += 1;
        let mut out = Vec::new();
        // The copies held before this event wait one event less.
        let mut released = Vec::new();
        let mut still = Vec::with_capacity(self.held.len());
        for mut held in self.held.drain(..) {
            held.left -= 1;
            if held.left == 0 {
                released.push(held.event);
            } else {
                still.push(held);
            }
        }
        self.held = still;
        let copies = if self.rng.random_bool(self.config.drop) {
            self.stats.dropped += 1;
            0
        } else if self.rng.random_bool(self.config.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.rng.random_bool(self.config.reorder) {
                self.stats.reordered += 1;
                let left = self.rng.random_range(1..=self.config.window);
                self.held.push(Held {
                    left,
                    event: event.clone(),
                });
            } else {
                out.push(event.clone());
            }
        }
        out.extend(released);
        self.stats.delivered += out.len() as u64;
        out
    }

    /// Everything held back, in the order it was held (the feed is idle: nothing more is coming
    /// for a while, so nothing waits any longer).
    pub fn flush(&mut self) -> Vec<T> {
        let out: Vec<T> = self.held.drain(..).map(|held| held.event).collect();
        self.stats.delivered += out.len() as u64;
        out
    }

    /// Copies held back right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// What the link did so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: u64) -> LinkConfig {
        LinkConfig {
            drop: 0.1,
            dup: 0.1,
            reorder: 0.1,
            window: 8,
            seed,
        }
    }

    fn schedule(config: LinkConfig, events: u64) -> Vec<u64> {
        let mut link = Link::new(config).unwrap();
        let mut out: Vec<u64> = (1..=events).flat_map(|e| link.pass(e)).collect();
        out.extend(link.flush());
        out
    }

    #[test]
    fn out_of_range_configurations_are_refused() {
        let bad = [
            (
                LinkConfig {
                    drop: 1.5,
                    ..config(1)
                },
                "drop",
            ),
            (
                LinkConfig {
                    dup: -0.1,
                    ..config(1)
                },
                "dup",
            ),
            (
                LinkConfig {
                    reorder: f64::NAN,
                    ..config(1)
                },
                "reorder",
            ),
        ];
        for (config, name) in bad {
            let error = Link::<u64>::new(config).unwrap_err();
            assert!(
                matches!(error, LinkConfigError::Probability { name: n, .. } if n == name),
                "{error}"
            );
        }
        assert_eq!(
            Link::<u64>::new(LinkConfig {
                window: 0,
                ..config(1)
            })
            .unwrap_err(),
            LinkConfigError::Window(0)
        );
    }

    #[test]
    fn a_perfect_link_delivers_everything_once_in_order() {
        let perfect = LinkConfig {
            drop: 0.0,
            dup: 0.0,
            reorder: 0.0,
            window: 1,
            seed: 7,
        };
        assert_eq!(schedule(perfect, 500), (1..=500).collect::<Vec<_>>());
    }

    #[test]
    fn each_event_comes_out_zero_one_or_two_times_at_most_window_events_late() {
        let config = config(3);
        let mut link = Link::new(config).unwrap();
        let mut seen = std::collections::HashMap::<u64, u64>::new();
        for event in 1..=10_000u64 {
            for out in link.pass(event) {
                assert!(out <= event, "{out} came out before it went in ({event})");
                assert!(
                    event - out <= config.window as u64,
                    "{out} came out {} events late",
                    event - out
                );
                *seen.entry(out).or_default() += 1;
            }
        }
        for out in link.flush() {
            *seen.entry(out).or_default() += 1;
        }
        let stats = link.stats();
        assert_eq!(stats.received, 10_000);
        assert!(seen.values().all(|&copies| copies == 1 || copies == 2));
        let twice = seen.values().filter(|&&copies| copies == 2).count() as u64;
        assert_eq!(twice, stats.duplicated);
        assert_eq!(10_000 - seen.len() as u64, stats.dropped);
        assert_eq!(seen.values().sum::<u64>(), stats.delivered);
        // The rates are what was asked, within a few standard deviations.
        let near = |count: u64, expected: f64| (count as f64 - expected).abs() < 150.0;
        assert!(near(stats.dropped, 1_000.0), "{stats:?}");
        assert!(near(stats.duplicated, 900.0), "{stats:?}");
        assert!(near(stats.reordered, 0.1 * 9_900.0 * 1.1), "{stats:?}");
    }

    #[test]
    fn the_schedule_is_the_seeds() {
        let first = schedule(config(42), 2_000);
        assert_eq!(
            first,
            schedule(config(42), 2_000),
            "same seed, same schedule"
        );
        assert_ne!(
            first,
            schedule(config(43), 2_000),
            "another seed, another schedule"
        );
        let in_order: Vec<u64> = (1..=2_000).collect();
        assert_ne!(first, in_order, "the link did nothing");
    }
}
