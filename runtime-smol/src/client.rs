//! What this runtime adds to a client host: the channel of its notifications, and its QUIC
//! peer sessions (`docs/PROTOCOL.md` §7.5.1): one quinn endpoint on the tunnel's peer socket,
//! fed by the host with QUIC datagrams from authorised addresses only, accepting a connection
//! only from an address the host authorised and with the initiator's certificate, and pinning
//! the destination's certificate when it connects. Envelopes travel as QUIC datagrams, one
//! each; when the peer takes no datagram that large, on one bidirectional stream (§2.1
//! framing).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use async_channel::Sender;
use async_io::Async;
use bytes::Bytes;
use event_listener::Event;
use futures_lite::future;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tscf_core::io::{CloseReason, Input, QuicLimits, Sent};
use tscf_core::tls::{self, Fingerprint, PeerIdentity, TlsConfigError};
use tscf_core::tunnel::{ClientHost, Notification, TunnelEvent};
use tscf_core::wire::StreamDeframer;

use crate::drive::{Extra, Io, Shared};
use crate::net;
use crate::quic::{client_config, close, server_config, tls_error, try_send_datagram, READ_CHUNK};
use crate::socket::SocketQueue;

/// The ALPN protocol name of a QUIC peer session.
const PEER_ALPN: &[u8] = b"tscf-peer";

pub(crate) type TunnelShared = Shared<TunnelExtra>;
type TunnelIo = Io<TunnelExtra>;

/// What this runtime adds to a client host: the channel of notifications and the QUIC peer
/// sessions.
pub(crate) struct TunnelExtra {
    pub(crate) notifications: Sender<Notification>,
    pub(crate) quic: Option<PeerQuic>,
}

impl Extra for TunnelExtra {
    type Host = ClientHost<SocketQueue>;

    fn on_event(
        io: &mut TunnelIo,
        host: &mut ClientHost<SocketQueue>,
        now: Instant,
        event: TunnelEvent,
    ) {
        match event {
            TunnelEvent::Notification(note) => {
                tracing::debug!(?note, "tunnel");
                if io.extra.notifications.try_send(note).is_err() {
                    host.notification_dropped();
                }
            }
            TunnelEvent::QuicReadable => {
                if let Some(waker) = io.extra.quic.as_mut().and_then(|q| q.waker.take()) {
                    waker.wake();
                }
            }
            TunnelEvent::OpenQuicSession { path, fingerprint } => {
                let opened = match (io.me.upgrade(), io.extra.quic.as_mut()) {
                    (Some(shared), Some(quic)) => quic.open(shared, path, fingerprint),
                    _ => false,
                };
                if !opened {
                    let failed = Input::SessionClosed { path, failed: true };
                    host.handle_input(now, failed);
                }
            }
            TunnelEvent::CloseQuicSession { path } => {
                if let Some(quic) = io.extra.quic.as_mut() {
                    quic.close(path);
                }
            }
            // Routed to the driver before this is called.
            TunnelEvent::Io(_) => {}
        }
    }

    fn send_session(io: &mut TunnelIo, path: SocketAddr, bytes: &[u8]) -> Sent {
        match io.extra.quic.as_mut() {
            Some(quic) => quic.send(path, bytes),
            None => Sent::Failed,
        }
    }
}

// ---- QUIC peer sessions ----

/// The QUIC peer sessions of a tunnel: one quinn endpoint on the peer socket, and the open
/// sessions by path.
pub(crate) struct PeerQuic {
    endpoint: quinn::Endpoint,
    socket: Arc<PeerSocket>,
    identity: PeerIdentity,
    limits: QuicLimits,
    /// Envelopes waiting for a session's stream, at most.
    session_queue: usize,
    sessions: HashMap<SocketAddr, Session>,
    next_id: u64,
    /// Where quinn waits for datagrams from the host.
    pub(crate) waker: Option<Waker>,
}

/// One session: its id (so that a stale task stays quiet) and, once open, its connection and
/// what waits for its stream.
struct Session {
    id: u64,
    conn: Option<quinn::Connection>,
    queue: VecDeque<Vec<u8>>,
    wake: Arc<Event>,
}

impl fmt::Debug for PeerQuic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerQuic")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl PeerQuic {
    /// The endpoint on the peer socket `udp`, presenting `identity`; it takes its datagrams
    /// from the host of `shared`.
    pub(crate) fn new(
        udp: Arc<Async<UdpSocket>>,
        shared: Weak<TunnelShared>,
        identity: PeerIdentity,
        limits: QuicLimits,
        session_queue: usize,
    ) -> Result<Self, TlsConfigError> {
        let socket = Arc::new(PeerSocket {
            udp,
            shared,
            blocked: AtomicBool::new(false),
        });
        // Every connection is accepted with a configuration pinned to its initiator; this
        // default pins our own certificate, which no peer presents.
        let default = peer_server_config(&identity, identity.fingerprint, &limits)?;
        // No greasing of the QUIC bit (RFC 9287): the peer socket tells QUIC from tscf and STUN
        // by the first octet (§2.4), so every QUIC packet must keep it set.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(default),
            socket.clone(),
            Arc::new(quinn::SmolRuntime),
        )
        .map_err(tls_error)?;
        Ok(Self {
            endpoint,
            socket,
            identity,
            limits,
            session_queue: session_queue.max(1),
            sessions: HashMap::new(),
            next_id: 0,
            waker: None,
        })
    }

    /// The endpoint, for the accept task.
    pub(crate) fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Presents `identity` in the sessions opened or accepted from now on (a test hook).
    pub(crate) fn set_identity(&mut self, identity: PeerIdentity) {
        self.identity = identity;
    }

    /// Drops what quinn sends while `blocked` (a test hook).
    pub(crate) fn set_blocked(&self, blocked: bool) {
        self.socket.blocked.store(blocked, Ordering::Relaxed);
    }

    /// Initiator: connects to `path`, accepting only the certificate `fingerprint`.
    pub(crate) fn open(
        &mut self,
        shared: Arc<TunnelShared>,
        path: SocketAddr,
        fingerprint: [u8; 32],
    ) -> bool {
        let config = tls::peer_client_config(&self.identity, Fingerprint(fingerprint))
            .and_then(|tls| client_config(&tls, PEER_ALPN, &self.limits));
        let Ok(config) = config else {
            return false;
        };
        let Ok(connecting) = self.endpoint.connect_with(config, path, "tscf-peer") else {
            return false;
        };
        let id = self.insert(path);
        smol::spawn(run_session(shared, path, id, connecting, true)).detach();
        true
    }

    /// Destination: an incoming connection the host authorised, pinned to `fingerprint`.
    fn accept(
        &mut self,
        shared: Arc<TunnelShared>,
        incoming: quinn::Incoming,
        fingerprint: [u8; 32],
    ) {
        let path = incoming.remote_address();
        let config =
            match peer_server_config(&self.identity, Fingerprint(fingerprint), &self.limits) {
                Ok(config) => config,
                Err(_) => return incoming.refuse(),
            };
        let Ok(connecting) = incoming.accept_with(Arc::new(config)) else {
            return;
        };
        let id = self.insert(path);
        smol::spawn(run_session(shared, path, id, connecting, false)).detach();
    }

    /// Closes the session on `path`.
    pub(crate) fn close(&mut self, path: SocketAddr) {
        if let Some(session) = self.sessions.remove(&path) {
            if let Some(conn) = session.conn {
                close(&conn, CloseReason::Closed);
            }
            session.wake.notify(usize::MAX);
        }
    }

    /// Closes everything (the tunnel stops).
    pub(crate) fn close_all(&mut self) {
        let paths: Vec<SocketAddr> = self.sessions.keys().copied().collect();
        for path in paths {
            self.close(path);
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(CloseReason::Closed.quic_code()),
            b"closed",
        );
    }

    /// Sends one envelope inside the session on `path`: a QUIC datagram when it fits, else on
    /// the session's stream (a send with no session open there fails).
    pub(crate) fn send(&mut self, path: SocketAddr, envelope: &[u8]) -> Sent {
        let Some(session) = self.sessions.get_mut(&path) else {
            return Sent::Failed;
        };
        let Some(conn) = &session.conn else {
            return Sent::Failed;
        };
        if try_send_datagram(conn, envelope) {
            return Sent::Done;
        }
        let dropped = session.queue.len() >= self.session_queue;
        if !dropped {
            session.queue.push_back(envelope.to_vec());
            session.wake.notify(usize::MAX);
        }
        Sent::SessionStream { dropped }
    }

    fn insert(&mut self, path: SocketAddr) -> u64 {
        self.next_id += 1;
        let session = Session {
            id: self.next_id,
            conn: None,
            queue: VecDeque::new(),
            wake: Arc::new(Event::new()),
        };
        if let Some(old) = self.sessions.insert(path, session) {
            if let Some(conn) = old.conn {
                close(&conn, CloseReason::Closed);
            }
        }
        self.next_id
    }

    fn current(&mut self, path: SocketAddr, id: u64) -> Option<&mut Session> {
        self.sessions.get_mut(&path).filter(|s| s.id == id)
    }
}

/// The accept task of the peer endpoint: the host says which incoming connections to take.
pub(crate) async fn accept_sessions(shared: Arc<TunnelShared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let mut state = shared.lock();
        let remote = incoming.remote_address();
        let fingerprint = state.host.accept_quic_session(remote);
        let stopped = state.driver.stopped;
        match (fingerprint, state.driver.extra.quic.as_mut()) {
            (Some(fp), Some(quic)) if !stopped => quic.accept(shared.clone(), incoming, fp),
            _ => incoming.refuse(),
        }
    }
}

/// One session, from its handshake to its end. The `initiator` opens the session's stream,
/// the destination accepts it.
async fn run_session(
    shared: Arc<TunnelShared>,
    path: SocketAddr,
    id: u64,
    connecting: quinn::Connecting,
    initiator: bool,
) {
    let timeout = shared.lock().host.quic_handshake_timeout();
    let conn = net::bounded(Instant::now() + timeout, async {
        connecting.await.map_err(io::Error::from)
    })
    .await;
    let Ok(conn) = conn else {
        return ended(&shared, path, id, true);
    };
    let wake = {
        let mut state = shared.lock();
        let Some(session) = state
            .driver
            .extra
            .quic
            .as_mut()
            .and_then(|q| q.current(path, id))
        else {
            return close(&conn, CloseReason::Closed);
        };
        session.conn = Some(conn.clone());
        session.wake.clone()
    };
    shared.drive(|host, _, now| host.handle_input(now, Input::SessionOpen { path }));
    let mut deframer = StreamDeframer::new();
    // Opening a stream costs no round trip; the destination sees it with the first bytes.
    let mut streams = match initiator {
        true => conn.open_bi().await.ok(),
        false => None,
    };
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let woken = wake.listen();
        // What waits for the session's stream (envelopes too large for a datagram).
        if let Some((send, _)) = &mut streams {
            let queued = {
                let mut state = shared.lock();
                match state
                    .driver
                    .extra
                    .quic
                    .as_mut()
                    .and_then(|q| q.current(path, id))
                {
                    Some(session) => session.queue.pop_front(),
                    None => return close(&conn, CloseReason::Closed),
                }
            };
            if let Some(envelope) = queued {
                if send.write_all(&envelope).await.is_err() {
                    break;
                }
                continue;
            }
        }
        enum Step {
            Opened(Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>),
            Read(Result<Option<usize>, quinn::ReadError>),
            Datagram(Result<Bytes, quinn::ConnectionError>),
            Woken,
        }
        let io = async {
            match &mut streams {
                Some((_, recv)) => Step::Read(recv.read(&mut chunk).await),
                None => Step::Opened(conn.accept_bi().await),
            }
        };
        let datagram = async { Step::Datagram(conn.read_datagram().await) };
        let step = future::or(
            io,
            future::or(datagram, async {
                woken.await;
                Step::Woken
            }),
        )
        .await;
        match step {
            Step::Opened(Ok(opened)) => streams = Some(opened),
            Step::Read(Ok(Some(n))) => {
                if deframer.push(&chunk[..n]).is_err() {
                    break;
                }
                let mut state = shared.lock();
                let now = Instant::now();
                while let Ok(Some(data)) = deframer.next_raw() {
                    state
                        .host
                        .handle_input(now, Input::SessionData { path, data });
                }
                let behind = state.drain(now);
                shared.woken(behind);
            }
            Step::Datagram(Ok(datagram)) => {
                let data = &datagram[..];
                shared.drive(|host, _, now| {
                    host.handle_input(now, Input::SessionData { path, data })
                });
            }
            Step::Woken => {}
            _ => break,
        }
    }
    close(&conn, CloseReason::Closed);
    ended(&shared, path, id, false);
}

/// The session's handshake failed (`failed`) or it ended: tell the host, if it still holds it.
fn ended(shared: &TunnelShared, path: SocketAddr, id: u64, failed: bool) {
    shared.drive(|host, io, now| {
        let held = io
            .extra
            .quic
            .as_mut()
            .and_then(|q| q.current(path, id))
            .is_some();
        if held && !io.stopped {
            if let Some(quic) = io.extra.quic.as_mut() {
                quic.sessions.remove(&path);
            }
            host.handle_input(now, Input::SessionClosed { path, failed });
        }
    });
}

fn peer_server_config(
    identity: &PeerIdentity,
    peer: Fingerprint,
    limits: &QuicLimits,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let tls = tls::peer_server_config(identity, peer)?;
    server_config(tls, PEER_ALPN, limits)
}

/// The tunnel's peer socket as quinn sees it: sends go straight out, receives come from the
/// host, which hands over QUIC datagrams from authorised addresses only.
struct PeerSocket {
    udp: Arc<Async<UdpSocket>>,
    shared: Weak<TunnelShared>,
    /// Test hook: drop every send (see `Tunnel::block_peer_traffic`).
    blocked: AtomicBool,
}

impl fmt::Debug for PeerSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSocket")
            .field("local", &self.udp.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for PeerSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if self.blocked.load(Ordering::Relaxed) {
            return Ok(());
        }
        // One datagram per transmit (`max_transmit_segments` is 1).
        self.udp
            .get_ref()
            .send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Some(shared) = self.shared.upgrade() else {
            return Poll::Pending;
        };
        let mut state = shared.lock();
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((len, from)) = state.host.take_quic_datagram(buf) else {
                break;
            };
            *meta = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        if let Some(quic) = state.driver.extra.quic.as_mut() {
            quic.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.get_ref().local_addr()
    }
}

/// Write readiness of the peer socket.
#[derive(Debug)]
struct Writable(Arc<Async<UdpSocket>>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_writable(cx)
    }
}
