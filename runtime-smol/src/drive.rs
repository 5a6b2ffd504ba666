//! The one drive loop of this runtime: a host behind a lock held only for its synchronous
//! calls, never across an `.await` ([`Driven`]), the timer task, and the tasks of the sockets
//! and streams the host asks for.
//!
//! Every input goes through [`Shared::drive`]: lock, hand the input to the host and drain it
//! ([`Driven::run`]: send its datagrams without waiting, act on its events), wake the timer
//! task if the next deadline moved forward, and wake whoever waits for a change.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use event_listener::Event;
use futures_lite::future;
use smol::Task;
use tscf_core::io::{
    Driven, Driver, Host, Input, IoEvent, Security, SocketId, StreamError, StreamId, Transmit,
};
use tscf_core::tls::ClientTlsConfig;
use tscf_core::tunnel::{unspecified_for, TunnelCredentials};
use tscf_core::wire::Transport;

use crate::{lock, net, quic};

/// Longest sleep of the timer task without a deadline, so that a stop is noticed even if a
/// wake-up is missed.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// What a runtime adds to a host of its own kind: what to do with the host's own events, and
/// how a listener's connection is admitted.
pub(crate) trait Extra<H: Host>: Send + Sized + 'static {
    /// Acts on an event of the host that is not socket or stream work.
    fn on_event(io: &mut Io<H, Self>, host: &mut H, now: Instant, event: H::Event);
    /// A listener accepted a connection of `transport` from `remote`: its stream id, or
    /// `None` to close it.
    fn accept(
        host: &mut H,
        now: Instant,
        transport: Transport,
        remote: SocketAddr,
    ) -> Option<StreamId>;
    /// Sends one envelope inside the QUIC peer session on `path`; what to report to the host
    /// about it (a send with no session open fails).
    fn send_session(
        io: &mut Io<H, Self>,
        path: SocketAddr,
        bytes: &[u8],
    ) -> Option<Input<'static>> {
        let _ = (io, path, bytes);
        Some(Input::SendFailed)
    }
}

/// A host and its driver behind a lock, with the wake-ups of the tasks that drive it.
pub(crate) struct Shared<H, X> {
    pub(crate) state: Mutex<Driven<H, Io<H, X>>>,
    timer: Event,
    /// Notified after every drain, for tasks that wait on the host's state.
    pub(crate) changed: Event,
}

/// The guarded state.
pub(crate) type State<H, X> = Driven<H, Io<H, X>>;

/// The sockets and streams the host asked for, and what the runtime adds to the host.
pub(crate) struct Io<H, X> {
    pub(crate) me: Weak<Shared<H, X>>,
    pub(crate) sockets: HashMap<SocketId, Arc<Async<UdpSocket>>>,
    /// The task of each socket; dropping it ends the task.
    pub(crate) socket_tasks: HashMap<SocketId, Task<()>>,
    pub(crate) streams: HashMap<StreamId, Slot>,
    pub(crate) extra: X,
    pub(crate) stopped: bool,
    /// How streams the host connects are secured (a client's; a server connects none).
    pub(crate) credentials: TunnelCredentials,
    pub(crate) tls: Option<ClientTlsConfig>,
    /// Bound of one connect and handshake.
    pub(crate) timeout: Duration,
}

/// One stream: its task's wake-up, what the host asked of it, and for QUIC the connection
/// (datagrams go straight to it) with the envelopes that did not fit one.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) wake: Arc<Event>,
    pub(crate) closing: bool,
    pub(crate) abort: bool,
    pub(crate) quic: Option<quinn::Connection>,
    pub(crate) fallback: VecDeque<Vec<u8>>,
}

impl<H, X> Shared<H, X>
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    /// `host` driven by this runtime, with `extra`; streams it connects are secured with
    /// `credentials` and `tls` (the tunnel's settings), each within `timeout`.
    pub(crate) fn new(
        host: H,
        extra: X,
        credentials: TunnelCredentials,
        tls: Option<ClientTlsConfig>,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| {
            let io = Io {
                me: me.clone(),
                sockets: HashMap::new(),
                socket_tasks: HashMap::new(),
                streams: HashMap::new(),
                extra,
                stopped: false,
                credentials,
                tls,
                timeout,
            };
            Self {
                state: Mutex::new(Driven::new(host, io)),
                timer: Event::new(),
                changed: Event::new(),
            }
        })
    }

    /// Runs `input` on the host at the current time, then drains it.
    pub(crate) fn drive<R>(&self, input: impl FnOnce(&mut H, &mut Io<H, X>, Instant) -> R) -> R {
        let mut state = lock(&self.state);
        let (r, behind) = state.run(Instant::now(), input);
        self.wake(behind);
        r
    }

    /// Drains the host after an input at `now` made with the lock held.
    pub(crate) fn drain(&self, state: &mut State<H, X>, now: Instant) {
        let behind = state.drain(now);
        self.wake(behind);
    }

    /// Wakes the timer task if it sleeps past the host's next deadline (`behind`), and the
    /// tasks that wait for a change.
    pub(crate) fn wake(&self, behind: bool) {
        if behind {
            self.timer.notify(usize::MAX);
        }
        self.changed.notify(usize::MAX);
    }

    /// Waits until `done` holds or `deadline` passes.
    pub(crate) async fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&State<H, X>) -> bool,
    ) {
        loop {
            let changed = self.changed.listen();
            if done(&lock(&self.state)) || Instant::now() >= deadline {
                return;
            }
            future::or(changed, async {
                Timer::at(deadline).await;
            })
            .await;
        }
    }

    /// The timer task's body.
    pub(crate) async fn run_timer(&self) {
        loop {
            let wake = self.timer.listen();
            let until = {
                let mut state = lock(&self.state);
                if state.driver.stopped {
                    return;
                }
                let now = Instant::now();
                let until = state.on_timer(now);
                self.changed.notify(usize::MAX);
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
    pub(crate) fn stop(&self, state: &mut State<H, X>) {
        state.driver.stopped = true;
        state.driver.socket_tasks.clear();
        for slot in state.driver.streams.values_mut() {
            slot.abort = true;
            slot.wake.notify(usize::MAX);
        }
        self.timer.notify(usize::MAX);
        self.changed.notify(usize::MAX);
    }
}

impl<H, X> Driver<H> for Io<H, X>
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    fn send(&mut self, transmit: Transmit, bytes: &[u8]) -> Option<Input<'static>> {
        let sent = match transmit {
            // Non-blocking: a full socket buffer is a loss, as on the wire.
            Transmit::Datagram { socket, to } => self
                .sockets
                .get(&socket)
                .is_some_and(|s| s.get_ref().send_to(bytes, to).is_ok()),
            Transmit::QuicDatagram { stream } => {
                let Some(slot) = self.streams.get_mut(&stream) else {
                    return Some(Input::SendFailed);
                };
                let Some(conn) = &slot.quic else {
                    return Some(Input::SendFailed);
                };
                if quic::try_send_datagram(conn, bytes) {
                    return None;
                }
                // Too large for a datagram now: the stream takes it, and the host counts it.
                slot.fallback.push_back(bytes.to_vec());
                slot.wake.notify(usize::MAX);
                return Some(Input::QuicFallback { stream });
            }
            Transmit::PeerSession { path } => return X::send_session(self, path, bytes),
        };
        (!sent).then_some(Input::SendFailed)
    }

    fn act(&mut self, host: &mut H, now: Instant, event: H::Event) {
        let Some(io) = H::io_event(&event) else {
            X::on_event(self, host, now, event);
            return;
        };
        match io {
            IoEvent::Connect {
                stream,
                to,
                security,
            } => self.connect(host, now, stream, to, security),
            IoEvent::StreamReady { stream } => {
                if let Some(slot) = self.streams.get(&stream) {
                    slot.wake.notify(usize::MAX);
                }
            }
            IoEvent::CloseStream { stream, abort } => {
                if let Some(slot) = self.streams.get_mut(&stream) {
                    slot.closing = true;
                    slot.abort |= abort;
                    slot.wake.notify(usize::MAX);
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
                self.socket_tasks.remove(&socket);
            }
        }
    }
}

impl<H, X> Io<H, X>
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    /// A new UDP socket for `socket` and its task; its local address.
    fn bind(&mut self, socket: SocketId, remote: SocketAddr) -> std::io::Result<SocketAddr> {
        let sock = Arc::new(Async::<UdpSocket>::bind(unspecified_for(remote))?);
        let local = sock.get_ref().local_addr()?;
        self.add_socket(socket, sock)?;
        Ok(local)
    }

    /// Adds `sock` as `socket` with its task (replacing one held under that id).
    pub(crate) fn add_socket(
        &mut self,
        socket: SocketId,
        sock: Arc<Async<UdpSocket>>,
    ) -> std::io::Result<()> {
        let shared = self.me.upgrade().ok_or(std::io::ErrorKind::NotConnected)?;
        self.sockets.insert(socket, sock.clone());
        let task = smol::spawn(async move { net::run_udp(&shared, socket, &sock).await });
        self.socket_tasks.insert(socket, task);
        Ok(())
    }

    /// Starts connecting `stream` in a task of its own.
    fn connect(
        &mut self,
        host: &mut H,
        now: Instant,
        stream: StreamId,
        to: SocketAddr,
        security: Security,
    ) {
        let (Some(shared), false) = (self.me.upgrade(), self.stopped) else {
            let error = Some(StreamError::Connect);
            return host.handle_input(
                now,
                Input::StreamClosed {
                    stream,
                    error,
                    detail: None,
                },
            );
        };
        let verify = match security {
            Security::Tcp => None,
            Security::Tls(verify) | Security::Quic(verify) => Some(verify),
        };
        let config = verify.map(|verify| {
            self.credentials
                .connect_config(verify, to, self.tls.as_ref(), crate::OS)
        });
        let config = match config.transpose() {
            Ok(config) => config,
            Err(e) => {
                tracing::debug!(%to, error = %e, "stream not connected");
                let error = Some(StreamError::Connect);
                return host.handle_input(
                    now,
                    Input::StreamClosed {
                        stream,
                        error,
                        detail: None,
                    },
                );
            }
        };
        self.streams.insert(stream, Slot::default());
        let timeout = self.timeout;
        let quic = security.transport() == Transport::QUIC;
        smol::spawn(async move {
            match (config, quic) {
                (Some(config), true) => quic::connect(&shared, stream, to, config, timeout).await,
                (config, _) => net::connect(&shared, stream, to, config, timeout).await,
            }
        })
        .detach();
    }
}
