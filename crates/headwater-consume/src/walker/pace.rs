//! The walker's pace: a limit on the requests it makes of the producer.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A rate limit of `per_second` requests, `burst` of them at once after a pause: over any
/// window of `t` seconds at most `burst + per_second × t` requests pass. A generic cell rate
/// algorithm (one instant of state) on tokio's clock, so a test with a paused clock sees it act.
#[derive(Debug)]
pub(crate) struct Pace {
    /// The time one request uses: 1 / rate.
    emission: Duration,
    /// How far ahead of the clock requests may run: (burst − 1) × emission.
    tolerance: Duration,
    /// The theoretical arrival time of the next request.
    next: Mutex<Option<Instant>>,
}

impl Pace {
    pub(crate) fn new(per_second: NonZeroU32, burst: u32) -> Pace {
        let emission = Duration::from_secs(1) / per_second.get();
        Pace {
            emission,
            tolerance: emission * burst.max(1).saturating_sub(1),
            next: Mutex::new(None),
        }
    }

    /// Waits until one more request may go.
    ///
    /// # Cancel safety
    /// Cancel safe; a cancelled wait still used its request's slot (the pace errs on the slow
    /// side).
    pub(crate) async fn ready(&self) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let due = next.map_or(now, |n| n.max(now));
            *next = Some(due + self.emission);
            due.checked_sub(self.tolerance).unwrap_or(now)
        };
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_burst_plus_rate_times_elapsed() {
        let pace = Pace::new(NonZeroU32::new(10).unwrap(), 3);
        let start = Instant::now();
        for n in 1..=33_u32 {
            pace.ready().await;
            let elapsed = start.elapsed().as_secs_f64();
            assert!(
                f64::from(n) <= 3.0 + 10.0 * elapsed + 1e-9,
                "request {n} passed after {elapsed} s"
            );
        }
        // 33 requests: 3 at once, then 30 at 10/s.
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
