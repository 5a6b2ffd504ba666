//! QUIC peer sessions (`docs/PROTOCOL.md` §7.5.1) on the tunnel's shared peer UDP socket.
//!
//! One quinn [`Endpoint`](quinn::Endpoint) per tunnel runs on a [`SharedSocket`]: it sends on
//! the tunnel's UDP socket, and receives only what the UDP task hands it, which is QUIC
//! datagrams (first octet 64–127 or 192–255, §2.4) from addresses the client authorised or
//! opened a session to. Everything else keeps its route (server tunnel, STUN, plain peer
//! traffic); unauthorised QUIC is counted and dropped before quinn sees it. The core decides
//! which sessions exist ([`ClientEvent::OpenPeerSession`](tscf_core::client::ClientEvent),
//! `AcceptPeerSession`, `ClosePeerSession`); this module only runs them: the initiator
//! connects as QUIC client pinning the destination's certificate fingerprint, the destination
//! accepts a connection only from an authorised address and only with a client certificate of
//! the initiator's fingerprint. Envelopes travel as QUIC datagrams, one each; when the peer
//! takes no datagram that large, on one bidirectional stream (§2.1 framing).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_channel::Sender;
use async_io::Async;
use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tscf_core::client::Input;
use tscf_core::tls::{self, Fingerprint, PeerIdentity, TlsConfigError};

use crate::lock;
use crate::quic::{self, Side};
use crate::stream::{Outgoing, StreamError};
use crate::timer::Shared;
use crate::tunnel::ClientCore;

/// The ALPN protocol name of a QUIC peer session.
pub(crate) const PEER_ALPN: &[u8] = b"tscf-peer";
/// QUIC datagrams waiting for the endpoint, at most; beyond, they are dropped and counted.
const INBOX: usize = 512;
/// Envelopes waiting for a session's stream, at most.
const SESSION_QUEUE: usize = 256;
/// Bound of one handshake (the core's establishment timeout is the real limit).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive of a session: the core's own keepalives run every 500 ms; this only keeps
/// quinn's idle timer from firing if they stop.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The tunnel's UDP socket as quinn sees it: sends go straight out, receives come from the
/// bounded inbox the UDP task fills.
pub(crate) struct SharedSocket {
    udp: Arc<Async<UdpSocket>>,
    inbox: Mutex<Inbox>,
    /// Test hook: drop every send (see `Tunnel::block_peer_traffic`).
    blocked: AtomicBool,
}

#[derive(Default)]
struct Inbox {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

impl SharedSocket {
    pub(crate) fn new(udp: Arc<Async<UdpSocket>>) -> Self {
        Self {
            udp,
            inbox: Mutex::new(Inbox::default()),
            blocked: AtomicBool::new(false),
        }
    }

    /// Hands one received QUIC datagram to the endpoint; false (dropped) when the inbox is full.
    pub(crate) fn push(&self, from: SocketAddr, datagram: &[u8]) -> bool {
        let mut inbox = lock(&self.inbox);
        if inbox.queue.len() >= INBOX {
            return false;
        }
        inbox.queue.push_back((from, datagram.to_vec()));
        if let Some(waker) = inbox.waker.take() {
            waker.wake();
        }
        true
    }

    pub(crate) fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }
}

impl fmt::Debug for SharedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSocket")
            .field("local", &self.udp.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for SharedSocket {
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
        let mut inbox = lock(&self.inbox);
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((from, datagram)) = inbox.queue.pop_front() else {
                break;
            };
            let len = datagram.len().min(buf.len());
            buf[..len].copy_from_slice(&datagram[..len]);
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
        inbox.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.get_ref().local_addr()
    }
}

/// Write readiness of the shared socket.
#[derive(Debug)]
struct Writable(Arc<Async<UdpSocket>>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_writable(cx)
    }
}

/// The QUIC peer sessions of one tunnel.
#[derive(Debug)]
pub(crate) struct PeerSessions {
    endpoint: quinn::Endpoint,
    pub(crate) socket: Arc<SharedSocket>,
    identity: PeerIdentity,
    /// Addresses the client authorised for a handshake, with the fingerprint to require.
    authorised: HashMap<SocketAddr, Fingerprint>,
    sessions: HashMap<SocketAddr, Session>,
    next_id: u64,
}

/// How [`PeerSessions::send`] sent an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// As one QUIC datagram.
    Datagram,
    /// Queued for the session's stream: the peer takes no datagram that large, or none.
    Stream,
    /// Dropped: the session's stream queue is full.
    StreamFull,
    /// Dropped: no open session on that path.
    NotOpen,
}

/// One session: its id (so that a stale task stays quiet), its connection once the handshake
/// is done, and its task's queue for envelopes that go on the stream.
#[derive(Debug)]
struct Session {
    id: u64,
    conn: Option<(quinn::Connection, Sender<Outgoing>)>,
}

impl PeerSessions {
    /// The endpoint on `udp`, presenting `identity`.
    pub(crate) fn new(
        udp: Arc<Async<UdpSocket>>,
        identity: PeerIdentity,
    ) -> Result<Self, TlsConfigError> {
        let socket = Arc::new(SharedSocket::new(udp));
        // Every connection is accepted with a configuration pinned to its initiator (see
        // `accept`); this default pins our own certificate, which no peer presents.
        let default = server_config(&identity, identity.fingerprint)?;
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
        .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(Self {
            endpoint,
            socket,
            identity,
            authorised: HashMap::new(),
            sessions: HashMap::new(),
            next_id: 0,
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

    /// Whether a QUIC datagram from `from` may reach the endpoint.
    pub(crate) fn admits(&self, from: SocketAddr) -> bool {
        self.authorised.contains_key(&from) || self.sessions.contains_key(&from)
    }

    pub(crate) fn authorise(&mut self, path: SocketAddr, fingerprint: [u8; 32]) {
        self.authorised.insert(path, Fingerprint(fingerprint));
    }

    /// Closes the session on `path` and withdraws its authorisation.
    pub(crate) fn close(&mut self, path: SocketAddr) {
        self.authorised.remove(&path);
        if let Some(Session {
            conn: Some((conn, tx)),
            ..
        }) = self.sessions.remove(&path)
        {
            tx.close();
            quic::close(&conn);
        }
    }

    /// Closes everything (the tunnel stops).
    pub(crate) fn close_all(&mut self) {
        let paths: Vec<SocketAddr> = self.sessions.keys().copied().collect();
        for path in paths {
            self.close(path);
        }
        self.authorised.clear();
        self.endpoint.close(quinn::VarInt::from_u32(0), b"closed");
    }

    /// Sends one envelope inside the session on `path`: a QUIC datagram when it fits, else on
    /// the session's stream. Nothing when the session is not open (the core notices loss).
    pub(crate) fn send(&self, path: SocketAddr, envelope: &[u8]) -> Sent {
        let Some(Session {
            conn: Some((conn, tx)),
            ..
        }) = self.sessions.get(&path)
        else {
            return Sent::NotOpen;
        };
        let fits = conn
            .max_datagram_size()
            .is_some_and(|max| envelope.len() <= max);
        if fits && conn.send_datagram(Bytes::copy_from_slice(envelope)).is_ok() {
            return Sent::Datagram;
        }
        match tx.try_send(Outgoing::Envelope(envelope.to_vec())) {
            Ok(()) => Sent::Stream,
            Err(_) => Sent::StreamFull,
        }
    }

    /// Initiator: connects to `path`, accepting only the certificate `fingerprint`. The
    /// session task reports the outcome to the client.
    pub(crate) fn open(
        &mut self,
        shared: Arc<Shared<ClientCore>>,
        path: SocketAddr,
        fingerprint: [u8; 32],
    ) -> Result<(), String> {
        let config =
            client_config(&self.identity, Fingerprint(fingerprint)).map_err(|e| e.to_string())?;
        let connecting = self
            .endpoint
            .connect_with(config, path, "tscf-peer")
            .map_err(|e| e.to_string())?;
        let id = self.insert(path);
        let task = SessionTask {
            shared,
            path,
            id,
            side: Side::Client,
        };
        smol::spawn(task.run(connecting)).detach();
        Ok(())
    }

    /// Destination: an incoming connection. Accepted only from an authorised address, pinned
    /// to the fingerprint authorised for it, and only while no session on that address is
    /// open (a new handshake from the address of an open session is someone replaying or
    /// spoofing it: the initiator never opens a second one); refused (and counted) otherwise.
    /// A handshake still in progress is replaced by a newer one from its address.
    pub(crate) fn accept(
        &mut self,
        shared: Arc<Shared<ClientCore>>,
        incoming: quinn::Incoming,
    ) -> bool {
        let path = incoming.remote_address();
        if self.sessions.get(&path).is_some_and(|s| s.conn.is_some()) {
            incoming.refuse();
            return false;
        }
        let Some(fingerprint) = self.authorised.get(&path).copied() else {
            incoming.refuse();
            return false;
        };
        let config = match server_config(&self.identity, fingerprint) {
            Ok(config) => config,
            Err(_) => {
                incoming.refuse();
                return false;
            }
        };
        let Ok(connecting) = incoming.accept_with(Arc::new(config)) else {
            return false;
        };
        let id = self.insert(path);
        let task = SessionTask {
            shared,
            path,
            id,
            side: Side::Server,
        };
        smol::spawn(task.run(connecting)).detach();
        true
    }

    fn insert(&mut self, path: SocketAddr) -> u64 {
        self.next_id += 1;
        if let Some(Session {
            conn: Some((conn, _)),
            ..
        }) = self.sessions.insert(
            path,
            Session {
                id: self.next_id,
                conn: None,
            },
        ) {
            quic::close(&conn);
        }
        self.next_id
    }

    /// Whether session `id` on `path` is still the one held.
    pub(crate) fn current(&self, path: SocketAddr, id: u64) -> bool {
        self.sessions.get(&path).is_some_and(|s| s.id == id)
    }
}

/// One session, from its handshake to its end.
struct SessionTask {
    shared: Arc<Shared<ClientCore>>,
    path: SocketAddr,
    id: u64,
    side: Side,
}

impl SessionTask {
    async fn run(self, connecting: quinn::Connecting) {
        let conn = crate::tunnel::bounded(Instant::now() + HANDSHAKE_TIMEOUT, async {
            connecting.await.map_err(io::Error::from)
        })
        .await;
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(path = %self.path, error = %e, "peer session handshake failed");
                return self.ended(true);
            }
        };
        let (tx, rx) = async_channel::bounded(SESSION_QUEUE);
        {
            let mut core = lock(&self.shared.state);
            let Some(sessions) = core.peer_sessions.as_mut() else {
                return quic::close(&conn);
            };
            if !sessions.current(self.path, self.id) {
                return quic::close(&conn);
            }
            if let Some(s) = sessions.sessions.get_mut(&self.path) {
                s.conn = Some((conn.clone(), tx));
            }
            core.stats.peer_sessions_open += 1;
            core.client
                .handle_input(Instant::now(), Input::PeerSessionOpen(self.path));
            core.drain();
            self.shared.rearm(&mut core);
        }
        let mut deframer = tscf_core::wire::StreamDeframer::new();
        let result = quic::serve(
            &conn,
            self.side,
            &rx,
            |bytes| {
                let pushed = deframer.push(bytes);
                let mut core = lock(&self.shared.state);
                if !core.holds_peer_session(self.path, self.id) {
                    return Err(StreamError::Stale);
                }
                let mut outcome = pushed.map_err(StreamError::from);
                while outcome.is_ok() {
                    match deframer.next_raw() {
                        Ok(Some(envelope)) => {
                            core.client.handle_input(
                                Instant::now(),
                                Input::PeerSessionDatagram {
                                    path: self.path,
                                    datagram: envelope,
                                },
                            );
                        }
                        Ok(None) => break,
                        Err(e) => outcome = Err(e.into()),
                    }
                }
                core.drain();
                self.shared.rearm(&mut core);
                outcome
            },
            |datagram| {
                let mut core = lock(&self.shared.state);
                if !core.holds_peer_session(self.path, self.id) {
                    return Err(StreamError::Stale);
                }
                core.client.handle_input(
                    Instant::now(),
                    Input::PeerSessionDatagram {
                        path: self.path,
                        datagram,
                    },
                );
                core.drain();
                self.shared.rearm(&mut core);
                Ok(())
            },
        )
        .await;
        quic::close(&conn);
        if !matches!(result, Err(StreamError::Stale)) {
            self.ended(false);
        }
    }

    /// The handshake failed (`failed`) or the session ended: tell the client, if it still
    /// holds this session.
    fn ended(&self, failed: bool) {
        let mut core = lock(&self.shared.state);
        if core.stopped() {
            return;
        }
        let Some(sessions) = core.peer_sessions.as_mut() else {
            return;
        };
        if !sessions.current(self.path, self.id) {
            return;
        }
        sessions.sessions.remove(&self.path);
        sessions.authorised.remove(&self.path);
        if failed {
            core.stats.peer_session_failures += 1;
        }
        core.client
            .handle_input(Instant::now(), Input::PeerSessionFailed(self.path));
        core.drain();
        self.shared.rearm(&mut core);
    }
}

/// The accept task: hands each incoming connection to [`PeerSessions::accept`].
pub(crate) async fn run_accept(shared: Arc<Shared<ClientCore>>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let mut core = lock(&shared.state);
        if core.stopped() {
            incoming.refuse();
            return;
        }
        let accepted = match core.peer_sessions.as_mut() {
            Some(sessions) => sessions.accept(shared.clone(), incoming),
            None => {
                incoming.refuse();
                false
            }
        };
        if !accepted {
            core.stats.peer_sessions_refused += 1;
        }
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    Arc::new(transport)
}

fn client_config(
    identity: &PeerIdentity,
    peer: Fingerprint,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let mut tls = tls::peer_client_config(identity, peer)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

fn server_config(
    identity: &PeerIdentity,
    peer: Fingerprint,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let mut tls = tls::peer_server_config(identity, peer)?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}
