//! The token bucket behind the peer service's rate limits: the director's limits on peer
//! requests and introductions, and a client's probe budget (`docs/PROTOCOL.md` §7.3, §7.5).

use core::time::Duration;
use std::time::Instant;

/// A token bucket of `burst` tokens, refilled with one token every `interval`, kept as the
/// generic cell rate algorithm does (RFC 2697's token bucket, as a single instant): the time
/// at which the bucket is full again. It slides: however the takes fall, no span of time `t`
/// sees more than `burst + t / interval` of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TokenBucket {
    /// When the bucket is full again; `None` while it is full.
    full_at: Option<Instant>,
}

impl TokenBucket {
    /// Takes one token at `now`; false (and nothing taken) when the bucket is empty.
    pub(crate) fn take(&mut self, now: Instant, burst: u32, interval: Duration) -> bool {
        if self.available_at(now, burst, interval) > now {
            return false;
        }
        let full = self.full_at.filter(|t| *t > now).unwrap_or(now);
        self.full_at = Some(full.checked_add(interval).unwrap_or(full));
        true
    }

    /// When the next token is there (`now` or earlier when one is there now).
    pub(crate) fn available_at(&self, now: Instant, burst: u32, interval: Duration) -> Instant {
        let Some(full) = self.full_at.filter(|t| *t > now) else {
            return now;
        };
        // Full at `full`: one token short of full until `full - interval`, and so on; a token
        // is there while the bucket is at most `burst - 1` tokens short of full.
        let slack = interval.saturating_mul(burst.saturating_sub(1));
        full.checked_sub(slack).unwrap_or(now)
    }
}

/// The refill interval of a limit of `count` per `window` (at least a nanosecond).
pub(crate) fn interval(count: u32, window: Duration) -> Duration {
    (window / count.max(1)).max(Duration::from_nanos(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_burst_then_one_token_per_interval() {
        let t0 = t0();
        let mut b = TokenBucket::default();
        for _ in 0..3 {
            assert!(b.take(t0, 3, ms(100)));
        }
        assert!(!b.take(t0, 3, ms(100)));
        assert_eq!(b.available_at(t0, 3, ms(100)), t0 + ms(100));
        assert!(!b.take(t0 + ms(99), 3, ms(100)));
        assert!(b.take(t0 + ms(100), 3, ms(100)));
        assert!(!b.take(t0 + ms(150), 3, ms(100)));
        assert!(b.take(t0 + ms(200), 3, ms(100)));
        // Full again: a whole burst.
        for _ in 0..3 {
            assert!(b.take(t0 + ms(500), 3, ms(100)));
        }
        assert!(!b.take(t0 + ms(500), 3, ms(100)));
    }

    #[test]
    fn no_window_edge_doubles_the_rate() {
        // A fixed window of 10 per 10 s lets 20 through around its edge; the bucket lets
        // through 10 and then one per second.
        let t0 = t0();
        let mut b = TokenBucket::default();
        let taken = (0..20)
            .filter(|n| {
                let at = t0 + Duration::from_millis(9_900 + n * 10);
                b.take(at, 10, interval(10, Duration::from_secs(10)))
            })
            .count();
        assert_eq!(taken, 10);
    }
}
