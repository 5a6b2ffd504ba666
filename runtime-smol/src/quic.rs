//! QUIC (quinn): the server's QUIC listeners and a client's QUIC transport, both a stream of
//! the host, and a client's QUIC peer sessions on its peer socket.
//!
//! A QUIC transport is one connection (ALPN `tscf`): one bidirectional stream, opened by the
//! client, carries what the host queues for the stream (control envelopes back to back, as on
//! TCP, `docs/PROTOCOL.md` §2.1), and each QUIC datagram (RFC 9221) one data envelope the host
//! sent as [`Transmit::QuicDatagram`](tscf_core::io::Transmit::QuicDatagram).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::IntoFuture;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use bytes::Bytes;
use event_listener::Event;
use futures_lite::future;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rustls::pki_types::{CertificateDer, ServerName};
use tscf_core::io::{Host, Input, StreamError, StreamId};
use tscf_core::server::{QuicAdmission, ServerHost};
use tscf_core::tls::{self, Fingerprint, PeerIdentity, TlsConfigError};
use tscf_core::wire::StreamDeframer;

use crate::drive::{Extra, Shared, Slot};
use crate::lock;
use crate::net::{self, Next};
use crate::tunnel::TunnelShared;

/// The ALPN protocol name of tscf over QUIC.
const ALPN: &[u8] = b"tscf";
/// The ALPN protocol name of a QUIC peer session.
const PEER_ALPN: &[u8] = b"tscf-peer";
/// Octets read from a stream at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long closing waits for the peer to acknowledge what the stream still holds.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Application error code of a connection closed by tscf (no error: the tunnel layer says why).
const CLOSE_CODE: u32 = 0;
/// QUIC keep-alive of a transport to the server, well within quinn's idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Keep-alive of a peer session: the core's own keepalives run every 500 ms; this only keeps
/// quinn's idle timer from firing if they stop.
const PEER_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Envelopes waiting for a peer session's stream, at most.
const SESSION_QUEUE: usize = 256;

/// A quinn server configuration from a rustls one (ring provider), with ALPN `tscf`.
pub(crate) fn server_config(
    tls: &rustls::ServerConfig,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A quinn client configuration from a rustls one (ring provider), with ALPN `tscf`.
fn client_config(
    tls: &rustls::ClientConfig,
    alpn: &[u8],
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn tls_error(e: impl fmt::Display) -> TlsConfigError {
    TlsConfigError::Rustls(rustls::Error::General(e.to_string()))
}

/// Sends `envelope` as a QUIC datagram if the connection takes one that large now; false if
/// it must go on the stream instead.
pub(crate) fn try_send_datagram(conn: &quinn::Connection, envelope: &[u8]) -> bool {
    let fits = conn
        .max_datagram_size()
        .is_some_and(|max| envelope.len() <= max);
    fits && conn.send_datagram(Bytes::copy_from_slice(envelope)).is_ok()
}

/// Closes `conn` at once (what a network failure or a host's close looks like).
fn close(conn: &quinn::Connection) {
    conn.close(quinn::VarInt::from_u32(CLOSE_CODE), b"closed");
}

/// A QUIC listener's task: each new connection is admitted, retried or refused as the host
/// says, and an admitted one gets a task of its own.
pub(crate) async fn accept<X>(shared: Arc<Shared<ServerHost, X>>, endpoint: quinn::Endpoint)
where
    X: Extra<ServerHost>,
{
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let admission = shared.drive(|host, io, now| {
            if io.stopped {
                return QuicAdmission::Refuse;
            }
            let admission = host.accept_quic(now, remote, validated);
            if let QuicAdmission::Accept(stream) = admission {
                io.streams.insert(stream, Slot::default());
            }
            admission
        });
        match admission {
            QuicAdmission::Accept(stream) => {
                let shared = shared.clone();
                smol::spawn(async move {
                    let conn = net::abortable(&shared, stream, incoming.into_future()).await;
                    let error = match conn {
                        Some(Ok(conn)) => {
                            let verified = conn
                                .peer_identity()
                                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                                .is_some_and(|chain| !chain.is_empty());
                            serve(&shared, stream, conn, false, verified).await
                        }
                        Some(Err(e)) => net::failed(StreamError::Handshake, e),
                        None => net::failed(StreamError::Handshake, "cut"),
                    };
                    net::closed(&shared, stream, error);
                })
                .detach();
            }
            QuicAdmission::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            QuicAdmission::Refuse => incoming.refuse(),
        }
    }
}

/// A QUIC transport the host asked for: connects from an endpoint of its own (a new port per
/// attempt) within `timeout`, then runs it.
pub(crate) async fn connect<H, X>(
    shared: &Arc<Shared<H, X>>,
    stream: StreamId,
    to: SocketAddr,
    (tls, name): (Arc<rustls::ClientConfig>, ServerName<'static>),
    timeout: Duration,
) where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    let deadline = Instant::now() + timeout;
    let error = async {
        let config = match client_config(&tls, ALPN, KEEP_ALIVE) {
            Ok(config) => config,
            Err(e) => return net::failed(StreamError::Connect, e),
        };
        let endpoint = match quinn::Endpoint::client(tscf_core::tunnel::unspecified_for(to)) {
            Ok(endpoint) => endpoint,
            Err(e) => return net::failed(StreamError::Connect, e),
        };
        let name = match &name {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            _ => to.ip().to_string(),
        };
        let connecting = match endpoint.connect_with(config, to, &name) {
            Ok(connecting) => connecting,
            Err(e) => return net::failed(StreamError::Connect, e),
        };
        let handshake = net::bounded(deadline, async {
            connecting.await.map_err(io::Error::from)
        });
        match net::abortable(shared, stream, handshake).await {
            Some(Ok(conn)) => serve(shared, stream, conn, true, false).await,
            Some(Err(e)) => net::failed(StreamError::Handshake, e),
            None => net::failed(StreamError::Handshake, "cut"),
        }
    }
    .await;
    net::closed(shared, stream, error);
}

/// Runs an established QUIC transport: the stream (opened here on the client's side, accepted
/// on the server's) and the datagrams, until either side closes it.
async fn serve<H, X>(
    shared: &Arc<Shared<H, X>>,
    stream: StreamId,
    conn: quinn::Connection,
    client: bool,
    verified_identity: bool,
) -> net::Ended
where
    H: Host + Send + 'static,
    X: Extra<H>,
{
    let wake = {
        let mut state = lock(&shared.state);
        let slot = state.driver.streams.get_mut(&stream)?;
        slot.quic = Some(conn.clone());
        slot.wake.clone()
    };
    net::opened(shared, stream, verified_identity);
    // Opening a stream costs no round trip; the server sees it with the first bytes.
    let streams = if client {
        net::abortable(shared, stream, conn.open_bi()).await
    } else {
        net::abortable(shared, stream, conn.accept_bi()).await
    };
    let Some(Ok((mut send, mut recv))) = streams else {
        close(&conn);
        return net::failed(StreamError::Io, "no stream");
    };
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    let error = loop {
        let woken = wake.listen();
        match net::next(shared, stream, &mut out) {
            Next::Abort => break net::failed(StreamError::Io, "cut"),
            Next::Close => {
                // Let the peer read what the stream still holds before the close.
                if send.finish().is_ok() {
                    let stopped = send.stopped();
                    future::or(
                        async {
                            let _ = stopped.await;
                        },
                        async {
                            Timer::after(CLOSE_GRACE).await;
                        },
                    )
                    .await;
                }
                break None;
            }
            Next::Write => match net::abortable(shared, stream, send.write_all(&out)).await {
                Some(Ok(())) => continue,
                Some(Err(e)) => break net::failed(StreamError::Io, e),
                None => break net::failed(StreamError::Io, "cut"),
            },
            Next::Idle => {}
        }
        enum Step {
            Read(Result<Option<usize>, quinn::ReadError>),
            Datagram(Result<Bytes, quinn::ConnectionError>),
            Woken,
        }
        let read = async { Step::Read(recv.read(&mut chunk).await) };
        let datagram = async { Step::Datagram(conn.read_datagram().await) };
        let step = future::or(
            read,
            future::or(datagram, async {
                woken.await;
                Step::Woken
            }),
        )
        .await;
        match step {
            Step::Read(Ok(Some(n))) => {
                let data = &chunk[..n];
                shared.drive(|host, _, now| {
                    host.handle_input(now, Input::StreamData { stream, data })
                });
            }
            Step::Datagram(Ok(datagram)) => {
                let data = &datagram[..];
                shared.drive(|host, _, now| {
                    host.handle_input(now, Input::StreamDatagram { stream, data });
                });
            }
            Step::Woken => {}
            Step::Read(Ok(None)) => break None,
            Step::Read(Err(e)) => break net::failed(StreamError::Io, e),
            Step::Datagram(Err(e)) => break net::failed(StreamError::Io, e),
        }
    };
    close(&conn);
    error
}

// ---- QUIC peer sessions ----

/// The QUIC peer sessions of a tunnel: one quinn endpoint on the peer socket, and the open
/// sessions by path.
pub(crate) struct PeerQuic {
    endpoint: quinn::Endpoint,
    socket: Arc<PeerSocket>,
    identity: PeerIdentity,
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
    ) -> Result<Self, TlsConfigError> {
        let socket = Arc::new(PeerSocket {
            udp,
            shared,
            blocked: AtomicBool::new(false),
        });
        // Every connection is accepted with a configuration pinned to its initiator; this
        // default pins our own certificate, which no peer presents.
        let default = peer_server_config(&identity, identity.fingerprint)?;
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
            .and_then(|tls| client_config(&tls, PEER_ALPN, PEER_KEEP_ALIVE));
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
        let config = match peer_server_config(&self.identity, Fingerprint(fingerprint)) {
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
                close(&conn);
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
        self.endpoint
            .close(quinn::VarInt::from_u32(CLOSE_CODE), b"closed");
    }

    /// Sends one envelope inside the session on `path`: a QUIC datagram when it fits, else on
    /// the session's stream. What to report to the host about it, or `Err` when no session is
    /// open there.
    pub(crate) fn send(
        &mut self,
        path: SocketAddr,
        envelope: &[u8],
    ) -> Result<Option<Input<'static>>, ()> {
        let session = self.sessions.get_mut(&path).ok_or(())?;
        let conn = session.conn.as_ref().ok_or(())?;
        if try_send_datagram(conn, envelope) {
            return Ok(None);
        }
        let dropped = session.queue.len() >= SESSION_QUEUE;
        if !dropped {
            session.queue.push_back(envelope.to_vec());
            session.wake.notify(usize::MAX);
        }
        Ok(Some(Input::SessionStream { path, dropped }))
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
                close(&conn);
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
        let mut state = lock(&shared.state);
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
    let timeout = lock(&shared.state).driver.timeout;
    let conn = net::bounded(Instant::now() + timeout, async {
        connecting.await.map_err(io::Error::from)
    })
    .await;
    let Ok(conn) = conn else {
        return ended(&shared, path, id, true);
    };
    let wake = {
        let mut state = lock(&shared.state);
        let Some(session) = state
            .driver
            .extra
            .quic
            .as_mut()
            .and_then(|q| q.current(path, id))
        else {
            return close(&conn);
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
                let mut state = lock(&shared.state);
                match state
                    .driver
                    .extra
                    .quic
                    .as_mut()
                    .and_then(|q| q.current(path, id))
                {
                    Some(session) => session.queue.pop_front(),
                    None => return close(&conn),
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
                let mut state = lock(&shared.state);
                let now = Instant::now();
                while let Ok(Some(data)) = deframer.next_raw() {
                    state
                        .host
                        .handle_input(now, Input::SessionData { path, data });
                }
                let behind = state.drain(now);
                shared.wake(behind);
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
    close(&conn);
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
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let mut tls = tls::peer_server_config(identity, peer)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(PEER_KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    Ok(config)
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
        let mut state = lock(&shared.state);
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
