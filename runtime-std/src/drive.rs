//! The one drive loop of this runtime: a host behind a mutex ([`Driven`]), the timer thread,
//! and the threads of the sockets and streams the host asks for.
//!
//! Every input goes through the core's [`io::Shared::drive`]: lock, hand the input to the host
//! and drain it ([`Driven::run`]: send its datagrams, act on its events), wake the timer thread
//! if the next deadline moved forward, and wake whoever waits for the host's state to change.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Condvar, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tscf_core::io::{
    self, CloseReason, Connect, Driven, Driver, Host, Runtime, Sent, SocketId, StreamId, Transmit,
};

use crate::udp::Udp;

/// Longest sleep of the timer thread without a deadline, so that a stop is noticed even if a
/// wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// What a runtime adds to a host of its own kind: what to do with the host's own events.
pub(crate) trait Extra: Send + Sized + 'static {
    /// The host.
    type Host: Host + Send + 'static;
    /// Acts on an event of the host that is not socket or stream work.
    fn on_event(&mut self, host: &mut Self::Host, event: <Self::Host as Host>::Event);
}

/// A host and its driver behind a mutex, with the wake-ups of the threads that drive it.
pub(crate) type Shared<X> = io::Shared<<X as Extra>::Host, Io<X>, Threads>;

/// The guarded state.
pub(crate) type State<X> = Driven<<X as Extra>::Host, Io<X>>;

/// The clock and the wake-ups of this runtime's threads.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    timer: Condvar,
    /// Signalled after every drain, for threads that wait on the host's state.
    changed: Condvar,
}

impl Runtime for Threads {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wake_timer(&self) {
        self.timer.notify_all();
    }

    fn notify_changed(&self) {
        self.changed.notify_all();
    }
}

/// The sockets and streams the host asked for, and what the runtime adds to the host.
pub(crate) struct Io<X: Extra> {
    pub(crate) me: Weak<Shared<X>>,
    pub(crate) sockets: HashMap<SocketId, Arc<Udp>>,
    pub(crate) streams: HashMap<StreamId, Slot>,
    pub(crate) extra: X,
    pub(crate) stopped: bool,
}

/// One stream: its socket (for a shutdown from any thread; `None` while connecting) and its
/// writer's wake-up.
pub(crate) struct Slot {
    pub(crate) sock: Option<TcpStream>,
    pub(crate) ready: Arc<Condvar>,
    pub(crate) closing: bool,
}

impl Slot {
    pub(crate) fn new(sock: Option<TcpStream>) -> Self {
        Self {
            sock,
            ready: Arc::new(Condvar::new()),
            closing: false,
        }
    }
}

/// `host` driven by this runtime, with `extra`.
pub(crate) fn shared<X: Extra>(host: X::Host, extra: X) -> Arc<Shared<X>> {
    Arc::new_cyclic(|me| {
        let sockets = HashMap::new();
        let (streams, stopped) = (HashMap::new(), false);
        let io = Io {
            me: me.clone(),
            sockets,
            streams,
            extra,
            stopped,
        };
        Shared::new(host, io, Threads::default())
    })
}

/// Waits until `done` holds or `deadline` passes.
pub(crate) fn wait_until<'a, X: Extra>(
    shared: &'a Shared<X>,
    mut state: MutexGuard<'a, State<X>>,
    deadline: Instant,
    mut done: impl FnMut(&State<X>) -> bool,
) -> MutexGuard<'a, State<X>> {
    loop {
        let now = Instant::now();
        if done(&state) || now >= deadline {
            return state;
        }
        state = shared
            .runtime
            .changed
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The timer thread's body.
pub(crate) fn run_timer<X: Extra>(shared: &Shared<X>) {
    let mut state = shared.lock();
    while !state.driver.stopped {
        let now = Instant::now();
        let wait = match state.on_timer(now) {
            Some(at) if at <= now => continue,
            Some(at) => at - now,
            None => IDLE_WAIT,
        };
        shared.runtime.notify_changed();
        state = shared
            .runtime
            .timer
            .wait_timeout(state, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Stops the timer thread and every thread that checks `stopped`.
pub(crate) fn stop<X: Extra>(shared: &Shared<X>, state: &mut State<X>) {
    state.driver.stopped = true;
    for slot in state.driver.streams.values() {
        if let Some(sock) = &slot.sock {
            let _ = sock.shutdown(Shutdown::Both);
        }
        slot.ready.notify_all();
    }
    shared.runtime.wake_timer();
    shared.runtime.notify_changed();
}

impl<X: Extra> Driver<X::Host> for Io<X> {
    fn send(&mut self, transmit: Transmit, bytes: &[u8], segment: usize) -> Sent {
        let sent = match transmit {
            // Non-blocking: a full socket buffer is a loss, as on the wire.
            Transmit::Datagram { socket, to } => self
                .sockets
                .get(&socket)
                .is_some_and(|s| s.send(to, bytes, segment).is_ok()),
            // No QUIC here: a host told so never asks for it.
            Transmit::QuicDatagram { .. } | Transmit::PeerSession { .. } => false,
        };
        if sent {
            Sent::Done
        } else {
            Sent::Failed
        }
    }

    fn max_segments(&self, transmit: &Transmit) -> usize {
        let Transmit::Datagram { socket, .. } = transmit else {
            return 1;
        };
        self.sockets.get(socket).map_or(1, |s| s.batch())
    }

    fn connect(&mut self, connect: Connect) -> Result<(), String> {
        Io::connect(self, connect)
    }

    fn stream_ready(&mut self, stream: StreamId) {
        if let Some(slot) = self.streams.get(&stream) {
            slot.ready.notify_all();
        }
    }

    // No transport of this runtime can tell the other side why.
    fn close_stream(&mut self, stream: StreamId, abort: bool, _: CloseReason) {
        if let Some(slot) = self.streams.get_mut(&stream) {
            slot.closing = true;
            if let (true, Some(sock)) = (abort, &slot.sock) {
                let _ = sock.shutdown(Shutdown::Both);
            }
            slot.ready.notify_all();
        }
    }

    fn bind_socket(&mut self, socket: SocketId, remote: SocketAddr) -> std::io::Result<SocketAddr> {
        let sock = Udp::new(UdpSocket::bind(tscf_core::tunnel::unspecified_for(remote))?)?;
        let local = sock.local_addr()?;
        self.add_socket(socket, sock)?;
        Ok(local)
    }

    fn close_socket(&mut self, socket: SocketId) {
        self.sockets.remove(&socket);
    }

    fn on_event(&mut self, host: &mut X::Host, _: Instant, event: <X::Host as Host>::Event) {
        self.extra.on_event(host, event);
    }
}
