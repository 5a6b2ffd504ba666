//! Durations counted in fixed buckets, as a Prometheus histogram holds them: the core records
//! what it measures (a peer tunnel's setup time, how long a path was silent), a runtime reads
//! the buckets and exports them. Recording is a search in a short table and an add; nothing
//! allocates.

use core::time::Duration;

/// The upper bounds of the buckets, from 1 ms to 10 s; a last bucket takes everything beyond.
const BOUNDS: [Duration; 15] = [
    Duration::from_millis(1),
    Duration::from_micros(2_500),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(1_500),
    Duration::from_secs(2),
    Duration::from_millis(2_500),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// Durations counted in fixed buckets ([`DurationHistogram::BOUNDS`]), with their number and
/// sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    /// Per bucket (not cumulative); the last one counts what exceeds every bound.
    counts: [u64; BOUNDS.len() + 1],
    sum: Duration,
}

impl DurationHistogram {
    /// The buckets' upper bounds (inclusive), from 1 ms to 10 s.
    pub const BOUNDS: [Duration; 15] = BOUNDS;

    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        let bucket = BOUNDS.partition_point(|bound| *bound < d);
        self.counts[bucket] += 1;
        self.sum = self.sum.saturating_add(d);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their sum.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// Each bound with how many durations were at most that long (cumulative, as Prometheus
    /// buckets are); durations beyond the last bound are in [`count`](Self::count) only.
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        BOUNDS
            .iter()
            .zip(&self.counts)
            .scan(0, |total, (bound, n)| {
                *total += n;
                Some((*bound, *total))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let mut h = DurationHistogram::default();
        h.record(Duration::from_micros(300));
        h.record(Duration::from_millis(1));
        h.record(Duration::from_millis(1_500));
        h.record(Duration::from_secs(60));
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum(), Duration::from_micros(61_501_300));
        let buckets: Vec<_> = h.buckets().collect();
        assert_eq!(buckets.len(), DurationHistogram::BOUNDS.len());
        assert_eq!(buckets[0], (Duration::from_millis(1), 2));
        assert_eq!(buckets[9], (Duration::from_secs(1), 2));
        assert_eq!(buckets[10], (Duration::from_millis(1_500), 3));
        assert_eq!(
            buckets[14],
            (Duration::from_secs(10), 3),
            "60 s is beyond them all"
        );
    }
}
