//! The timer task shared by the server and the tunnel: it sleeps until the state machine's
//! `poll_timeout`, and inputs that bring the deadline forward wake it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;

use crate::lock;
pub(crate) use tscf_runtime_std::Timed;

/// Longest sleep without a deadline, so that a stop is noticed even if a wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

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
        if state.needs_wake() {
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
