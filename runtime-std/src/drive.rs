//! The one drive loop of this runtime: a host behind a mutex ([`Driven`]), the timer thread,
//! and the threads of the sockets and streams the host asks for.
//!
//! Every input goes through the core's [`io::Shared::drive`]: lock, hand the input to the host
//! and drain it ([`Driven::run`]: send its datagrams, act on its events), wake the timer thread
//! if the next deadline moved forward, and wake whoever waits for the host's state to change.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tscf_core::io::{
    self, Driven, Driver, Host, Input, IoEvent, Runtime, SocketId, StreamId, Transmit,
};
use tscf_core::tls::ClientTlsConfig;
use tscf_core::tunnel::TunnelCredentials;

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
    /// How streams the host connects are secured (a client's; a server connects none).
    pub(crate) credentials: TunnelCredentials,
    pub(crate) tls: Option<ClientTlsConfig>,
    /// Bound of one connect and TLS handshake.
    pub(crate) timeout: Duration,
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

/// `host` driven by this runtime, with `extra`; streams it connects are secured with
/// `credentials` and `tls` (the tunnel's settings), each within `timeout`.
pub(crate) fn shared<X: Extra>(
    host: X::Host,
    extra: X,
    credentials: TunnelCredentials,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
) -> Arc<Shared<X>> {
    Arc::new_cyclic(|me| {
        let io = Io {
            me: me.clone(),
            sockets: HashMap::new(),
            streams: HashMap::new(),
            extra,
            stopped: false,
            credentials,
            tls,
            timeout,
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
    fn send(&mut self, transmit: Transmit, bytes: &[u8], segment: usize) -> Option<Input<'static>> {
        let sent = match transmit {
            // Non-blocking: a full socket buffer is a loss, as on the wire.
            Transmit::Datagram { socket, to } => self
                .sockets
                .get(&socket)
                .is_some_and(|s| s.send(to, bytes, segment).is_ok()),
            // No QUIC here: a host told so never asks for it.
            Transmit::QuicDatagram { .. } | Transmit::PeerSession { .. } => false,
        };
        (!sent).then_some(Input::SendFailed)
    }

    fn max_segments(&self, transmit: &Transmit) -> usize {
        let Transmit::Datagram { socket, .. } = transmit else {
            return 1;
        };
        self.sockets.get(socket).map_or(1, |s| s.batch())
    }

    fn act(&mut self, host: &mut X::Host, now: Instant, event: <X::Host as Host>::Event) {
        let Some(io) = X::Host::io_event(&event) else {
            self.extra.on_event(host, event);
            return;
        };
        match io {
            IoEvent::Connect(connect) => self.connect(host, now, connect),
            IoEvent::StreamReady { stream } => {
                if let Some(slot) = self.streams.get(&stream) {
                    slot.ready.notify_all();
                }
            }
            IoEvent::CloseStream { stream, abort } => {
                if let Some(slot) = self.streams.get_mut(&stream) {
                    slot.closing = true;
                    if let (true, Some(sock)) = (abort, &slot.sock) {
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                    slot.ready.notify_all();
                }
            }
            IoEvent::BindSocket { socket, remote } => {
                let bound = self.bind(socket, remote).map_err(|e| e.to_string());
                match bound {
                    Ok(local) => host.handle_input(now, Input::SocketBound { socket, local }),
                    Err(error) => {
                        let failed = Input::SocketFailed {
                            socket,
                            error: &error,
                        };
                        host.handle_input(now, failed);
                    }
                }
            }
            IoEvent::CloseSocket { socket } => {
                self.sockets.remove(&socket);
            }
        }
    }
}
