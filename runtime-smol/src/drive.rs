//! The one drive loop of this runtime: a host behind a lock held only for its synchronous
//! calls, never across an `.await` ([`Driven`]), the timer task, and the tasks of the sockets
//! and streams the host asks for.
//!
//! Every input goes through [`Shared::drive`]: lock, hand the input to the host and drain it
//! ([`Driven::run`]: send its datagrams without waiting, act on its events), wake the timer
//! task if the next deadline moved forward, and wake whoever waits for a change.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;
use smol::Task;
use tscf_core::io::{
    self, CloseReason, Connect, Driven, Driver, Host, Runtime, Sent, SocketId, StreamId, Transmit,
};

use crate::udp::Udp;

/// Longest sleep of the timer task without a deadline, so that a stop is noticed even if a
/// wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// What a runtime adds to a host of its own kind: what to do with the host's own events.
pub(crate) trait Extra: Send + Sized + 'static {
    /// The host.
    type Host: Host + Send + 'static;
    /// Acts on an event of the host that is not socket or stream work.
    fn on_event(
        io: &mut Io<Self>,
        host: &mut Self::Host,
        now: Instant,
        event: <Self::Host as Host>::Event,
    );
    /// Sends one envelope inside the QUIC peer session on `path` (a send with no session
    /// open fails).
    fn send_session(io: &mut Io<Self>, path: SocketAddr, bytes: &[u8]) -> Sent {
        let _ = (io, path, bytes);
        Sent::Failed
    }
}

/// A host and its driver behind a lock, with the wake-ups of the tasks that drive it.
pub(crate) type Shared<X> = io::Shared<<X as Extra>::Host, Io<X>, Tasks>;

/// The guarded state.
pub(crate) type State<X> = Driven<<X as Extra>::Host, Io<X>>;

/// The clock and the wake-ups of this runtime's tasks.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    timer: Event,
    /// Notified after every drain, for tasks that wait on the host's state.
    changed: Event,
}

impl Runtime for Tasks {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wake_timer(&self) {
        self.timer.notify(usize::MAX);
    }

    fn notify_changed(&self) {
        self.changed.notify(usize::MAX);
    }
}

/// The sockets and streams the host asked for, and what the runtime adds to the host.
pub(crate) struct Io<X: Extra> {
    pub(crate) me: Weak<Shared<X>>,
    pub(crate) sockets: HashMap<SocketId, Arc<Udp>>,
    /// The task of each socket; dropping it ends the task.
    pub(crate) socket_tasks: HashMap<SocketId, Task<()>>,
    pub(crate) streams: HashMap<StreamId, Slot>,
    pub(crate) extra: X,
    pub(crate) stopped: bool,
}

/// One stream: its task's wake-up, what the host asked of it, and for QUIC the connection
/// (datagrams go straight to it).
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) wake: Arc<Event>,
    pub(crate) closing: bool,
    pub(crate) abort: bool,
    /// Why the host closes it (QUIC tells the other side).
    pub(crate) reason: CloseReason,
    pub(crate) quic: Option<quinn::Connection>,
}

/// `host` driven by this runtime, with `extra`.
pub(crate) fn shared<X: Extra>(host: X::Host, extra: X) -> Arc<Shared<X>> {
    Arc::new_cyclic(|me| {
        let io = Io {
            me: me.clone(),
            sockets: HashMap::new(),
            socket_tasks: HashMap::new(),
            streams: HashMap::new(),
            extra,
            stopped: false,
        };
        Shared::new(host, io, Tasks::default())
    })
}

/// Waits until `done` holds or `deadline` passes.
pub(crate) async fn wait_until<X: Extra>(
    shared: &Shared<X>,
    deadline: Instant,
    mut done: impl FnMut(&State<X>) -> bool,
) {
    loop {
        let changed = shared.runtime.changed.listen();
        if done(&shared.lock()) || Instant::now() >= deadline {
            return;
        }
        future::or(changed, async {
            Timer::at(deadline).await;
        })
        .await;
    }
}

/// The timer task's body.
pub(crate) async fn run_timer<X: Extra>(shared: &Shared<X>) {
    loop {
        let wake = shared.runtime.timer.listen();
        let until = {
            let mut state = shared.lock();
            if state.driver.stopped {
                return;
            }
            let now = Instant::now();
            let until = state.on_timer(now);
            shared.runtime.notify_changed();
            match until {
                Some(at) if at <= now => continue,
                Some(at) => at,
                None => now + IDLE_WAIT,
            }
        };
        future::or(
            async {
                Timer::at(until).await;
            },
            wake,
        )
        .await;
    }
}

/// Stops the timer task and tells every stream task to end.
pub(crate) fn stop<X: Extra>(shared: &Shared<X>, state: &mut State<X>) {
    state.driver.stopped = true;
    state.driver.socket_tasks.clear();
    for slot in state.driver.streams.values_mut() {
        slot.abort = true;
        slot.wake.notify(usize::MAX);
    }
    shared.runtime.wake_timer();
    shared.runtime.notify_changed();
}

impl<X: Extra> Driver<X::Host> for Io<X> {
    fn send(&mut self, transmit: Transmit, bytes: &[u8], segment: usize) -> Sent {
        match transmit {
            // Non-blocking: a full socket buffer is a loss, as on the wire.
            Transmit::Datagram { socket, to } => match self.sockets.get(&socket) {
                Some(s) if s.send(to, bytes, segment).is_ok() => Sent::Done,
                _ => Sent::Failed,
            },
            Transmit::QuicDatagram { stream } => self.quic_datagram(stream, bytes),
            Transmit::PeerSession { path } => X::send_session(self, path, bytes),
        }
    }

    fn max_segments(&self, transmit: &Transmit) -> usize {
        match transmit {
            Transmit::Datagram { socket, .. } => self.sockets.get(socket).map_or(1, |s| s.batch()),
            _ => 1,
        }
    }

    fn connect(&mut self, connect: Connect) -> Result<(), String> {
        Io::connect(self, connect)
    }

    fn stream_ready(&mut self, stream: StreamId) {
        if let Some(slot) = self.streams.get(&stream) {
            slot.wake.notify(usize::MAX);
        }
    }

    fn close_stream(&mut self, stream: StreamId, abort: bool, reason: CloseReason) {
        if let Some(slot) = self.streams.get_mut(&stream) {
            // The first reason stands: a close that does not complete is then cut, for the
            // same reason.
            if !slot.closing {
                slot.reason = reason;
            }
            slot.closing = true;
            slot.abort |= abort;
            slot.wake.notify(usize::MAX);
        }
    }

    fn bind_socket(&mut self, socket: SocketId, remote: SocketAddr) -> std::io::Result<SocketAddr> {
        let sock = async_io::Async::<UdpSocket>::bind(tscf_core::tunnel::unspecified_for(remote))?;
        let local = sock.get_ref().local_addr()?;
        self.add_socket(socket, Arc::new(sock))?;
        Ok(local)
    }

    fn close_socket(&mut self, socket: SocketId) {
        self.sockets.remove(&socket);
        self.socket_tasks.remove(&socket);
    }

    fn on_event(&mut self, host: &mut X::Host, now: Instant, event: <X::Host as Host>::Event) {
        X::on_event(self, host, now, event);
    }
}
