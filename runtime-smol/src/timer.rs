//! The timer task shared by the server and the tunnel: it sleeps until the state machine's
//! `poll_timeout`, and inputs that bring the deadline forward wake it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;

use crate::lock;

/// Longest sleep without a deadline, so that a stop is noticed even if a wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// A state machine driven by [`Shared::run_timer`].
pub(crate) trait Timed {
    /// When `on_timeout` is next due.
    fn deadline(&self) -> Option<Instant>;
    /// Calls `handle_timeout` and drains the outputs.
    fn on_timeout(&mut self, now: Instant);
    /// Whether the timer task should end.
    fn stopped(&self) -> bool;
    /// The deadline the timer task sleeps until (kept by the state so inputs can compare).
    fn armed(&mut self) -> &mut Option<Instant>;
}

/// A state machine behind a mutex that is only held for its synchronous calls (never across
/// an `.await`), with the timer task's wake-up and a "something changed" signal for waiters.
#[derive(Debug, Default)]
pub(crate) struct Shared<T> {
    pub(crate) state: Mutex<T>,
    pub(crate) timer: Event,
    pub(crate) changed: Event,
}

impl<T: Timed> Shared<T> {
    /// Wakes the timer task if `state`'s deadline is now earlier than the one it sleeps to.
    /// Call after every input, with the lock held.
    pub(crate) fn rearm(&self, state: &mut T) {
        let deadline = state.deadline();
        let armed = *state.armed();
        if deadline.is_some_and(|d| armed.is_none_or(|a| d < a)) || state.stopped() {
            self.timer.notify(usize::MAX);
        }
    }

    /// The timer task's body.
    pub(crate) async fn run_timer(&self) {
        loop {
            let wake = self.timer.listen();
            let until = {
                let mut state = lock(&self.state);
                if state.stopped() {
                    return;
                }
                let now = Instant::now();
                match state.deadline() {
                    Some(at) if at <= now => {
                        state.on_timeout(now);
                        None
                    }
                    Some(at) => Some(at),
                    None => Some(now + IDLE_WAIT),
                }
                .inspect(|at| *state.armed() = Some(*at))
            };
            let Some(at) = until else { continue };
            future::or(
                async {
                    Timer::at(at).await;
                },
                wake,
            )
            .await;
            *lock(&self.state).armed() = None;
        }
    }
}
