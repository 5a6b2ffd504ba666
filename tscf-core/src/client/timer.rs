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
        self.deadlines.iter().flatten().min().copied()
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
