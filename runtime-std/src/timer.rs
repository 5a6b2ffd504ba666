//! The timer thread shared by the server and the tunnel: it sleeps on a condition variable
//! until the state machine's `poll_timeout`, and inputs that bring the deadline forward wake it.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::lock;

/// Longest sleep without a deadline, so that a stop is noticed even if a wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// A state machine driven by a timer thread or task: this crate's and the smol runtime's.
#[doc(hidden)]
pub trait Timed {
    /// When `on_timeout` is next due.
    fn deadline(&self) -> Option<Instant>;
    /// Calls `handle_timeout` and drains the outputs.
    fn on_timeout(&mut self, now: Instant);
    /// Whether the timer should end.
    fn stopped(&self) -> bool;
    /// The deadline the timer sleeps until (kept by the state so inputs can compare).
    fn armed(&mut self) -> &mut Option<Instant>;

    /// Whether the timer must wake after an input: the deadline is now earlier than the one it
    /// sleeps to, or the state stopped.
    fn needs_wake(&mut self) -> bool {
        let deadline = self.deadline();
        let armed = *self.armed();
        deadline.is_some_and(|d| armed.is_none_or(|a| d < a)) || self.stopped()
    }
}

/// A state machine behind a mutex, with the timer thread's condition variable.
#[derive(Debug, Default)]
pub(crate) struct Shared<T> {
    pub(crate) state: Mutex<T>,
    pub(crate) timer: Condvar,
}

impl<T: Timed> Shared<T> {
    /// Wakes the timer thread if `state`'s deadline is now earlier than the one it sleeps to.
    /// Call after every input, with the lock held.
    pub(crate) fn rearm(&self, state: &mut T) {
        if state.needs_wake() {
            self.timer.notify_all();
        }
    }

    /// The timer thread's body.
    pub(crate) fn run_timer(&self) {
        let mut state = lock(&self.state);
        loop {
            if state.stopped() {
                return;
            }
            let now = Instant::now();
            let wait = match state.deadline() {
                Some(at) if at <= now => {
                    state.on_timeout(now);
                    continue;
                }
                Some(at) => at - now,
                None => IDLE_WAIT,
            };
            *state.armed() = Some(now + wait);
            state = self
                .timer
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            *state.armed() = None;
        }
    }
}
