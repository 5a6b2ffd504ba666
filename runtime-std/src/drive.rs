//! The one drive loop of this runtime: a host behind a mutex, the timer thread, and the
//! threads of the sockets and streams the host asks for.
//!
//! Every input goes through [`Shared::drive`]: lock, hand the input to the host, drain it
//! ([`tscf_core::io::drain`]: send its datagrams, act on its events), wake the timer thread if
//! the next deadline moved forward, and wake whoever waits for the host's state to change.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tscf_core::io::{
    self, Driver, Host, Input, IoEvent, Security, SocketId, StreamError, StreamId, Transmit,
};
use tscf_core::tls::ClientTlsConfig;
use tscf_core::tunnel::{unspecified_for, TunnelCredentials};
use tscf_core::wire::Transport;

use crate::{lock, net, OS};

/// Longest sleep of the timer thread without a deadline, so that a stop is noticed even if a
/// wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// What a runtime adds to a host of its own kind: what to do with the host's own events, and
/// how a listener's connection is admitted.
pub(crate) trait Extra<H: Host>: Send + 'static {
    /// Acts on an event of the host that is not socket or stream work.
    fn on_event(&mut self, host: &mut H, event: H::Event);
    /// A listener accepted a connection of `transport` from `remote`: its stream id, or
    /// `None` to close it.
    fn accept(
        host: &mut H,
        now: Instant,
        transport: Transport,
        remote: SocketAddr,
    ) -> Option<StreamId>;
}

/// A host behind a mutex, with the wake-ups of the threads that drive it.
pub(crate) struct Shared<H, X> {
    pub(crate) state: Mutex<State<H, X>>,
    timer: Condvar,
    /// Signalled after every drain, for threads that wait on the host's state.
    pub(crate) changed: Condvar,
}

/// What the mutex guards.
pub(crate) struct State<H, X> {
    pub(crate) host: H,
    pub(crate) io: Io,
    pub(crate) extra: X,
    buf: Vec<u8>,
    armed: Option<Instant>,
    pub(crate) stopped: bool,
}

/// The sockets and streams the host asked for.
pub(crate) struct Io {
    pub(crate) sockets: HashMap<SocketId, Arc<UdpSocket>>,
    pub(crate) streams: HashMap<StreamId, Slot>,
    /// How streams the host connects are secured (a client's; a server connects none).
    credentials: TunnelCredentials,
    tls: Option<ClientTlsConfig>,
    /// Bound of one connect and TLS handshake.
    timeout: Duration,
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

impl Io {
    /// No socket or stream yet; streams are connected with `credentials` and `tls` (the
    /// tunnel's settings), each within `timeout`.
    pub(crate) fn new(
        credentials: TunnelCredentials,
        tls: Option<ClientTlsConfig>,
        timeout: Duration,
    ) -> Self {
        Self {
            sockets: HashMap::new(),
            streams: HashMap::new(),
            credentials,
            tls,
            timeout,
        }
    }

    /// Shuts down every stream's socket, so that its threads end.
    pub(crate) fn shutdown_streams(&self) {
        for slot in self.streams.values() {
            if let Some(sock) = &slot.sock {
                let _ = sock.shutdown(Shutdown::Both);
            }
            slot.ready.notify_all();
        }
    }
}

impl<H, X> Shared<H, X>
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    pub(crate) fn new(host: H, io: Io, extra: X) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                host,
                io,
                extra,
                buf: Vec::new(),
                armed: None,
                stopped: false,
            }),
            timer: Condvar::new(),
            changed: Condvar::new(),
        })
    }

    /// Runs `input` on the state at the current time, then drains the host.
    pub(crate) fn drive<R>(
        self: &Arc<Self>,
        input: impl FnOnce(&mut State<H, X>, Instant) -> R,
    ) -> R {
        let mut state = lock(&self.state);
        let now = Instant::now();
        let r = input(&mut state, now);
        self.drain(&mut state, now);
        r
    }

    /// Drains the host after an input at `now`, then wakes the timer and the waiters.
    pub(crate) fn drain(self: &Arc<Self>, state: &mut State<H, X>, now: Instant) {
        let State {
            host,
            io,
            extra,
            buf,
            ..
        } = state;
        let mut acting = Acting {
            shared: self,
            io,
            extra,
        };
        io::drain(host, &mut acting, now, buf);
        self.rearm(state);
        self.changed.notify_all();
    }

    /// Wakes the timer thread if the host's next deadline is now earlier than the one it
    /// sleeps to. Call after anything that may have moved it.
    pub(crate) fn rearm(&self, state: &State<H, X>) {
        let due = state.host.poll_timeout();
        if due.is_some_and(|d| state.armed.is_none_or(|a| d < a)) || state.stopped {
            self.timer.notify_all();
        }
    }

    /// Waits on `changed` until `done` holds or `deadline` passes; false on the deadline.
    pub(crate) fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State<H, X>>,
        deadline: Instant,
        mut done: impl FnMut(&State<H, X>) -> bool,
    ) -> (MutexGuard<'a, State<H, X>>, bool) {
        loop {
            if done(&state) {
                return (state, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (state, false);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The timer thread's body.
    pub(crate) fn run_timer(self: &Arc<Self>) {
        let mut state = lock(&self.state);
        loop {
            if state.stopped {
                return;
            }
            let now = Instant::now();
            let wait = match state.host.poll_timeout() {
                Some(at) if at <= now => {
                    state.host.handle_timeout(now);
                    self.drain(&mut state, now);
                    continue;
                }
                Some(at) => at - now,
                None => IDLE_WAIT,
            };
            state.armed = Some(now + wait);
            state = self
                .timer
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            state.armed = None;
        }
    }

    /// Stops the timer thread and every thread that checks `stopped`.
    pub(crate) fn stop(&self, state: &mut State<H, X>) {
        state.stopped = true;
        state.io.shutdown_streams();
        self.timer.notify_all();
        self.changed.notify_all();
    }
}

/// What the drain does with the host's output.
struct Acting<'a, H, X> {
    shared: &'a Arc<Shared<H, X>>,
    io: &'a mut Io,
    extra: &'a mut X,
}

impl<H, X> Driver<H> for Acting<'_, H, X>
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    fn send(&mut self, transmit: Transmit, bytes: &[u8]) -> bool {
        match transmit {
            Transmit::Datagram { socket, to } => self
                .io
                .sockets
                .get(&socket)
                .is_some_and(|s| s.send_to(bytes, to).is_ok()),
            // No QUIC here: a host told so never asks for it.
            Transmit::QuicDatagram { .. } | Transmit::PeerSession { .. } => false,
        }
    }

    fn act(&mut self, host: &mut H, now: Instant, event: H::Event) {
        let Some(io) = H::io_event(&event) else {
            self.extra.on_event(host, event);
            return;
        };
        match io {
            IoEvent::Connect {
                stream,
                to,
                security,
            } => self.connect(host, now, stream, to, security),
            IoEvent::StreamReady { stream } => {
                if let Some(slot) = self.io.streams.get(&stream) {
                    slot.ready.notify_all();
                }
            }
            IoEvent::CloseStream { stream, abort } => {
                if let Some(slot) = self.io.streams.get_mut(&stream) {
                    slot.closing = true;
                    if let (true, Some(sock)) = (abort, &slot.sock) {
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                    slot.ready.notify_all();
                }
            }
            IoEvent::BindSocket { socket, remote } => {
                match UdpSocket::bind(unspecified_for(remote)).and_then(|s| {
                    let local = s.local_addr()?;
                    Ok((Arc::new(s), local))
                }) {
                    Ok((sock, local)) => {
                        self.io.sockets.insert(socket, sock.clone());
                        let shared = self.shared.clone();
                        let spawned = thread::Builder::new()
                            .name("tscf-udp".to_owned())
                            .spawn(move || net::run_udp(&shared, socket, &sock));
                        match spawned {
                            Ok(_) => host.handle_input(now, Input::SocketBound { socket, local }),
                            Err(e) => {
                                self.io.sockets.remove(&socket);
                                let error = e.to_string();
                                host.handle_input(
                                    now,
                                    Input::SocketFailed {
                                        socket,
                                        error: &error,
                                    },
                                );
                            }
                        }
                    }
                    Err(e) => {
                        let error = e.to_string();
                        host.handle_input(
                            now,
                            Input::SocketFailed {
                                socket,
                                error: &error,
                            },
                        );
                    }
                }
            }
            IoEvent::CloseSocket { socket } => {
                self.io.sockets.remove(&socket);
            }
        }
    }
}

impl<H, X> Acting<'_, H, X>
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    /// Starts connecting `stream` in a thread of its own.
    fn connect(
        &mut self,
        host: &mut H,
        now: Instant,
        stream: StreamId,
        to: SocketAddr,
        security: Security,
    ) {
        let tls = match security {
            Security::Tcp => Ok(None),
            Security::Tls(verify) => self
                .io
                .credentials
                .connect_config(verify, to, self.io.tls.as_ref(), OS)
                .map(Some)
                .map_err(|e| e.to_string()),
            Security::Quic(_) => Err("QUIC is not supported by tscf-runtime-std".to_owned()),
        };
        let spawned = tls.and_then(|tls| {
            let shared = self.shared.clone();
            let timeout = self.io.timeout;
            thread::Builder::new()
                .name("tscf-stream".to_owned())
                .spawn(move || net::connect(&shared, stream, to, tls, timeout))
                .map_err(|e| e.to_string())
        });
        match spawned {
            Ok(_) => {
                self.io.streams.insert(stream, Slot::new(None));
            }
            Err(why) => {
                tracing::debug!(%to, %why, "stream not connected");
                host.handle_input(
                    now,
                    Input::StreamClosed {
                        stream,
                        error: Some(StreamError::Connect),
                    },
                );
            }
        }
    }
}
