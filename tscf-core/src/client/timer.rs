//! The client's timers: one small table keyed by [`Timer`]; `poll_timeout` is its minimum.

use std::time::Instant;

/// Everything the client waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Timer {
    /// Datagram transport: retransmit the outstanding request, or give it up.
    Retransmit,
    /// Stream transport: give up the outstanding request.
    ResponseTimeout,
    /// Nothing sent for one keepalive interval: send a Keepalive.
    Keepalive,
    /// Nothing heard from the server for `silence_intervals` intervals: the transport is lost.
    Silence,
    /// The reconnect backoff is over: start the next connection attempt.
    Reconnect,
}

impl Timer {
    const COUNT: usize = 5;

    fn index(self) -> usize {
        self as usize
    }
}

/// The earlier of two deadlines, either of which may be unset: plain code rather than an
/// iterator chain, because runtimes ask for `poll_timeout` after every input.
pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Deadlines of every [`Timer`]; `None` when stopped.
#[derive(Clone, Debug, Default)]
pub(super) struct TimerTable {
    deadlines: [Option<Instant>; Timer::COUNT],
}

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.index()] = Some(at);
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.index()] = None;
    }

    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer.index()]
    }

    pub(super) fn stop_all(&mut self) {
        self.deadlines = [None; Timer::COUNT];
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().fold(None, |at, d| earliest(at, *d))
    }

    /// Stops and returns the earliest timer whose deadline is at or before `now`.
    pub(super) fn pop_expired(&mut self, now: Instant) -> Option<Timer> {
        const ALL: [Timer; Timer::COUNT] = [
            Timer::Retransmit,
            Timer::ResponseTimeout,
            Timer::Keepalive,
            Timer::Silence,
            Timer::Reconnect,
        ];
        let timer = ALL
            .into_iter()
            .filter(|t| self.get(*t).is_some_and(|at| at <= now))
            .min_by_key(|t| self.get(*t))?;
        self.stop(timer);
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::base;
    use std::time::Duration;

    #[test]
    fn next_is_the_earliest_deadline_set_and_follows_every_change() {
        let t0 = base();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut table = TimerTable::default();
        assert_eq!(table.next(), None);
        table.set(Timer::Silence, at(300));
        assert_eq!(table.next(), Some(at(300)));
        table.set(Timer::Keepalive, at(100));
        table.set(Timer::Reconnect, at(200));
        assert_eq!(table.next(), Some(at(100)));
        // Moving the earliest later, or stopping it, uncovers the next one.
        table.set(Timer::Keepalive, at(400));
        assert_eq!(table.next(), Some(at(200)));
        table.stop(Timer::Reconnect);
        assert_eq!(table.next(), Some(at(300)));
        // A timer brought forward is the deadline at once.
        table.set(Timer::Retransmit, at(50));
        assert_eq!(table.next(), Some(at(50)));
        assert_eq!(table.pop_expired(at(60)), Some(Timer::Retransmit));
        assert_eq!(table.next(), Some(at(300)));
        table.stop_all();
        assert_eq!(table.next(), None);
        assert_eq!(earliest(None, Some(at(1))), Some(at(1)));
        assert_eq!(earliest(Some(at(2)), None), Some(at(2)));
        assert_eq!(earliest(Some(at(2)), Some(at(1))), Some(at(1)));
    }
}
