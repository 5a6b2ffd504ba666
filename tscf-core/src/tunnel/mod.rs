//! A tunnel client, sans-IO: a [`TunnelClient`] behind its sockets.
//!
//! [`ClientHost`] makes every decision a tunnel takes about its sockets, so that a runtime
//! only moves bytes (the contract is in [`crate::io`]):
//!
//! - **The peer UDP socket** ([`PEER_SOCKET`]) is shared by the server tunnel over UDP, NAT
//!   discovery, probes, plain peer tunnels and the DTLS and QUIC peer sessions. A datagram
//!   from the server's UDP endpoint that is not STUN is the server's; every other one is sorted
//!   by its first octet (`docs/PROTOCOL.md` §2.4): DTLS and QUIC reach a session layer only
//!   from addresses the client authorised or opened a session to (the rest is counted and
//!   dropped before any session state sees it), and the rest goes to the peer agent.
//! - **The server transport**: UDP on the peer socket; TCP, TLS and QUIC as a stream the
//!   runtime connects ([`IoEvent::Connect`]); DTLS as an association of a [`DtlsEndpoint`] on
//!   a socket of its own, a new one per attempt ([`IoEvent::BindSocket`]).
//! - **Peer streams** (TCP or TLS, `docs/PROTOCOL.md` §7.7): opened as streams, accepted from
//!   the runtime's listener (a bounded number in their handshake at once).
//! - **Peer sessions**: DTLS ones run here, on a [`dtls::PeerSessions`] of the peer socket;
//!   QUIC ones in the runtime's QUIC stack, fed from a bounded inbox of QUIC datagrams from
//!   authorised addresses ([`take_quic_datagram`](ClientHost::take_quic_datagram)).
//! - **Inner UDP sockets**: the port table, and the packets built and parsed here
//!   ([`crate::inner`]); each socket's queue is the runtime's, so that readers do not take the
//!   tunnel's lock.
//! - **The packet tap** (a TUN device's, say): with one set, every inner packet that no inner
//!   socket, TCP stream or listener claims goes to the tap's queue whole, and the runtime sends
//!   what it reads from the device with [`send_packet`](ClientHost::send_packet). Inner
//!   sockets and the tap share the tunnel: a UDP packet goes to the socket bound to its
//!   destination port if there is one, a TCP packet to the stack if a stream or listener uses
//!   its destination port, and everything else to the tap.
//! - **Inner TCP**: a smoltcp stack ([`crate::inner::tcp`]) fed with the inner TCP packets
//!   received and sending into the client; streams and listeners wait on the runtime's
//!   wake-ups, and their data stays in the stack's bounded buffers.
//!
//! Drive it as every host: after any input, drain [`poll_transmit`](ClientHost::poll_transmit)
//! and [`poll_event`](ClientHost::poll_event) until both return `None`, then arm a timer for
//! [`poll_timeout`](ClientHost::poll_timeout). `poll_transmit` is where the host acts on what
//! the client state machine asked for, in order: a transmit polled before an event belongs to
//! the transport or socket that event closes.
//!
//! **No network input makes any function here panic**, and none grows memory without bound.

mod config;
mod notification;
mod stats;
/// Logs at warn the first send refused for each reason (each is counted in
/// [`ClientStats`](crate::client::ClientStats) and returned as `e` to the caller): one line
/// per reason for the life of the tunnel, so that a stream that loses every datagram does not
/// flood the log.
fn warn_first_refusal(before: &client::ClientStats, after: &client::ClientStats, e: &io::Error) {
    let counters = |s: &client::ClientStats| {
        [
            s.send_refused_not_connected,
            s.send_refused_closed,
            s.send_refused_too_large,
            s.send_refused_invalid,
            s.send_queue_full,
        ]
    };
    let first = counters(before)
        .iter()
        .zip(counters(after))
        .any(|(b, a)| *b == 0 && a == 1);
    if first {
        tracing::warn!(error = %e, "inner datagram refused (first of its kind; all are counted)");
    }
}

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use rustls::pki_types::ServerName;

pub use config::{ConnectError, PeerStreamListen, TunnelConfig, TunnelCredentials};
pub use notification::Notification;
pub use stats::TunnelStats;

use crate::client::{
    self, ClientEvent, ClientState, Destination, PeerPath, PeerStreamId, PeerTunnelInfo,
    ServerEndpoint, TerminateReason, TunnelClient, TunnelInfo,
};
use crate::dtls::{self, DtlsEndpoint, DtlsEvent, DtlsLimits};
use crate::inner::fragment::{self, Fragmenter, Reassembly};
use crate::inner::tcp::{TcpHost, TcpId, TcpLimits, TcpStack};
use crate::inner::{self, DatagramQueue, Delivery, SocketHost, SocketTable};
use crate::io::{
    Capture, CapturedEnvelope, ClientTls, CloseReason, Connect, Direction, Driver, Input, IoEvent,
    QuicLimits, Runtime, Security, Shared, SocketId, StreamError, StreamId, StreamOutput, Transmit,
};
use crate::stun;
use crate::tls::{self, ClientTlsConfig, Fingerprint, PeerIdentity};
use crate::wire::{DatagramKind, EnvelopeType, StreamDeframer, Transport};

/// The peer UDP socket: the one socket every tunnel has from the start.
pub const PEER_SOCKET: SocketId = SocketId(0);

/// QUIC datagrams waiting for the runtime's QUIC endpoint, at most; beyond, they are dropped
/// and counted.
const QUIC_INBOX: usize = 512;
/// Accepted peer streams still in their handshake, at most; beyond, new ones are closed at
/// once.
const MAX_HANDSHAKING_PEER_STREAMS: usize = 16;
/// Datagrams of closed sockets still to send (a DTLS `close_notify`), at most.
const MAX_PENDING: usize = 64;

/// What a [`ClientHost`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelEvent {
    /// Something for the runtime's sockets and streams to do.
    Io(IoEvent),
    /// QUIC datagrams wait for the runtime's QUIC peer endpoint: take them with
    /// [`ClientHost::take_quic_datagram`].
    QuicReadable,
    /// Initiator: open a QUIC peer session to `path` from the peer socket, accepting only the
    /// certificate whose SHA-256 is `fingerprint` and presenting the tunnel's peer identity;
    /// report [`Input::SessionOpen`] or [`Input::SessionClosed`], send
    /// [`Transmit::PeerSession`] transmits in it and report what it carries as
    /// [`Input::SessionData`].
    OpenQuicSession {
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// The pinned fingerprint of the peer's certificate.
        fingerprint: [u8; 32],
    },
    /// Close the QUIC peer session on `path`, opened or accepted; nothing more is reported
    /// about it.
    CloseQuicSession {
        /// The peer's address on the direct path.
        path: SocketAddr,
    },
    /// For the application.
    Notification(Notification),
}

/// What the runtime set up before the host starts.
#[derive(Debug)]
pub struct Setup {
    /// The local address of the peer socket ([`PEER_SOCKET`]).
    pub peer_socket: SocketAddr,
    /// When the peer socket is bound to the unspecified address: the local address the
    /// system routes to [`TunnelConfig::route_probe`] from, for the host candidate.
    pub route_source: Option<IpAddr>,
    /// The local address of the peer stream listener the runtime bound, if configured.
    pub stream_listener: Option<SocketAddr>,
    /// The certificate presented on secured peer paths (DTLS and QUIC peer sessions, TLS
    /// peer streams), when one is needed.
    pub peer_identity: Option<PeerIdentity>,
    /// How a DTLS transport to the server checks it (from the tunnel's TLS settings).
    pub dtls: Option<dtls::ClientSettings>,
    /// How TLS and QUIC transports to the server check it.
    pub server_tls: Option<Arc<rustls::ClientConfig>>,
    /// Whether the runtime runs QUIC (server transports and peer sessions).
    pub quic: bool,
}

impl Setup {
    /// What a runtime bound: the peer socket at `peer_socket` (and the source of its route
    /// to the first server, when it is bound to the unspecified address), the peer stream
    /// listener at `stream_listener`; the TLS material it takes from `credentials`; and
    /// whether it runs QUIC.
    pub fn new(
        credentials: &mut TunnelCredentials,
        peer_socket: SocketAddr,
        route_source: Option<IpAddr>,
        stream_listener: Option<SocketAddr>,
        quic: bool,
    ) -> Self {
        Self {
            peer_socket,
            route_source,
            stream_listener,
            peer_identity: credentials.peer_identity.clone(),
            dtls: credentials.dtls.take(),
            server_tls: credentials.server.take(),
            quic,
        }
    }
}

/// A tunnel client and everything it decides about its sockets. `Q` is the runtime's receive
/// queue of an inner socket. See the [module documentation](self).
#[derive(Debug)]
pub struct ClientHost<Q> {
    client: TunnelClient,
    sockets: SocketTable<Q>,
    tcp: TcpStack,
    fragmenter: Fragmenter,
    reassembly: Reassembly,
    /// Where unclaimed inner packets go, if anywhere.
    tap: Option<Arc<Q>>,
    /// The datagram reassembled last, kept for its capacity.
    whole: Vec<u8>,
    /// The inner packet received last, kept for its capacity.
    packet: Vec<u8>,
    link: Link,
    streams: FxHashMap<StreamId, Stream>,
    next_stream: u64,
    next_socket: u32,
    next_accepted: u64,
    peer: PeerSide,
    /// Datagrams still to send on sockets already given up, each before its close.
    pending: VecDeque<(SocketId, SocketAddr, Vec<u8>)>,
    events: VecDeque<TunnelEvent>,
    stats: TunnelStats,
    settings: Settings,
    last_failure: Option<String>,
    terminated: Option<TerminateReason>,
    /// Where inner packets and envelopes are shown, if anywhere.
    capture: Option<Capture>,
    /// The peer socket's local address, for captures.
    peer_local: SocketAddr,
    now: Instant,
}

/// What the host keeps of the configuration.
#[derive(Debug)]
struct Settings {
    default_opt_in: bool,
    /// The transport of accepted peer streams (TCP or TLS).
    listener_transport: Transport,
    socket_queue_len: usize,
    stream_queue_bytes: usize,
    transport_timeout: Duration,
    dtls: Option<dtls::ClientSettings>,
    quic: bool,
    /// The tunnel's TLS settings and how TLS and QUIC transports check the server.
    tls: Option<(ClientTlsConfig, Arc<rustls::ClientConfig>)>,
    quic_limits: QuicLimits,
}

/// The transport to the server, as far as the host is concerned.
#[derive(Debug)]
enum Link {
    None,
    /// On the peer socket.
    Udp(SocketAddr),
    /// TCP, TLS or QUIC.
    Stream {
        stream: StreamId,
        server: SocketAddr,
        quic: bool,
    },
    /// A DTLS association on a socket of its own; no endpoint until the socket is bound.
    Dtls {
        socket: SocketId,
        server: SocketAddr,
        endpoint: Option<Box<DtlsEndpoint>>,
    },
}

#[derive(Debug)]
struct Stream {
    role: Role,
    transport: Transport,
    open: bool,
    /// Closed by the host; ignored until the runtime reports it closed.
    closing: bool,
    deframer: StreamDeframer,
    output: StreamOutput,
    remote: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The transport to the server.
    Server,
    /// A peer stream the client asked for.
    PeerOpened(PeerStreamId),
    /// A peer stream the listener accepted; its id is given once it is open.
    PeerAccepted(Option<PeerStreamId>),
}

/// The peer socket's session layers and the test hook that cuts it.
#[derive(Debug, Default)]
struct PeerSide {
    enabled: bool,
    blocked: bool,
    dtls: Option<dtls::PeerSessions>,
    quic: Option<QuicPeers>,
    /// Accepted peer streams in their handshake.
    handshaking: usize,
}

/// QUIC peer sessions, as far as the host is concerned: which addresses may reach the
/// runtime's QUIC endpoint, and what waits for it.
#[derive(Debug, Default)]
struct QuicPeers {
    /// Addresses authorised for an incoming session, with the fingerprint to require.
    authorised: HashMap<SocketAddr, [u8; 32]>,
    /// Paths with a session opened, accepted or being set up.
    sessions: HashMap<SocketAddr, bool>,
    inbox: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Bound of a session's handshake: the peer tunnel's establishment bound.
    handshake_timeout: Duration,
}

impl QuicPeers {
    fn admits(&self, from: SocketAddr) -> bool {
        self.authorised.contains_key(&from) || self.sessions.contains_key(&from)
    }
}

impl<Q: DatagramQueue> ClientHost<Q> {
    /// A host for `config`, whose peer socket and listeners the runtime set up as `setup`
    /// says. It asks at once for a transport to the first server.
    pub fn new(mut config: TunnelConfig, setup: Setup, now: Instant) -> Result<Self, ConnectError> {
        let mut peer = PeerSide {
            enabled: config.client.peer.is_some(),
            ..PeerSide::default()
        };
        let mut default_opt_in = false;
        if let Some(p) = &mut config.client.peer {
            if p.local_addresses.is_empty() {
                p.local_addresses = host_candidates(setup.peer_socket, setup.route_source);
            }
            default_opt_in = p.default_opt_in;
            if let Some(identity) = &setup.peer_identity {
                p.certificate_fingerprint
                    .get_or_insert(identity.fingerprint.0);
            }
            if let (Some(mut addr), Some((_, tls))) =
                (setup.stream_listener, config.peer_streams.listen())
            {
                if addr.ip().is_unspecified() {
                    if let Some(host) = p.local_addresses.first() {
                        addr.set_ip(host.ip());
                    }
                }
                let transport = if tls { Transport::TLS } else { Transport::TCP };
                p.stream_listeners.push((transport, addr));
            }
            match p.transport {
                Transport::UDP => {}
                Transport::DTLS => {
                    let identity = setup.peer_identity.clone().ok_or_else(|| {
                        unsupported("a DTLS peer transport needs a peer identity")
                    })?;
                    let sessions =
                        dtls::PeerSessions::new(setup.peer_socket, identity, p.establish_timeout)
                            .map_err(|e| ConnectError::Tls(e.into()))?;
                    peer.dtls = Some(sessions);
                }
                Transport::QUIC if setup.quic => {
                    peer.quic = Some(QuicPeers {
                        handshake_timeout: p.establish_timeout,
                        ..QuicPeers::default()
                    });
                }
                other => {
                    return Err(unsupported(&format!(
                        "peer transport {other} is not supported by this runtime"
                    )));
                }
            }
        }
        let client = TunnelClient::new(config.client.clone(), now)?;
        let listener_transport = match config.peer_streams.listen() {
            Some((_, true)) => Transport::TLS,
            _ => Transport::TCP,
        };
        let limits = TcpLimits {
            buffer_bytes: config.tcp_buffer_bytes,
            backlog: config.tcp_backlog,
            max_sockets: config.max_tcp_sockets,
            connect_timeout: config.tcp_connect_timeout,
        };
        // The stack's sequence numbers draw from the client's seed, apart from its own draws.
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&config.client.rng_seed[24..]);
        let seed = u64::from_le_bytes(seed) ^ 0x7463_7073_7461_636b;
        Ok(Self {
            client,
            sockets: SocketTable::new(),
            tcp: TcpStack::new(limits, seed, now),
            fragmenter: Fragmenter::default(),
            tap: None,
            reassembly: Reassembly::new(),
            whole: Vec::new(),
            packet: Vec::new(),
            link: Link::None,
            streams: FxHashMap::default(),
            next_stream: 0,
            // Socket 0 is the peer socket.
            next_socket: 0,
            next_accepted: 0,
            peer,
            pending: VecDeque::new(),
            events: VecDeque::new(),
            stats: TunnelStats::default(),
            settings: Settings {
                default_opt_in,
                listener_transport,
                socket_queue_len: config.socket_queue_len.max(1),
                stream_queue_bytes: config.stream_queue_bytes.max(1),
                transport_timeout: config.transport_timeout,
                dtls: setup.dtls,
                quic: setup.quic,
                tls: config.tls.clone().zip(setup.server_tls),
                quic_limits: config.quic_limits,
            },
            last_failure: None,
            terminated: None,
            capture: config.capture,
            peer_local: setup.peer_socket,
            now,
        })
    }

    // ---- runtime → host ----

    /// Something happened on a socket, stream or QUIC peer session; see [`Input`].
    pub fn handle_input(&mut self, now: Instant, input: Input<'_>) {
        self.advance(now);
        match input {
            Input::Datagram { socket, from, data } if socket == PEER_SOCKET => {
                self.on_peer_socket(now, from, data);
            }
            Input::Datagram { socket, from, data } => self.on_dtls_socket(now, socket, from, data),
            Input::StreamOpen { stream, .. } => self.on_stream_open(now, stream),
            Input::StreamData { stream, data } => self.on_stream_data(now, stream, data),
            Input::StreamDatagram { stream, data } => {
                if let Link::Stream {
                    stream: s,
                    quic: true,
                    server,
                } = self.link
                {
                    if s != stream {
                        return;
                    }
                    self.captured(
                        now,
                        Direction::Received,
                        Transport::QUIC,
                        None,
                        server,
                        data,
                    );
                    self.stats.quic_datagrams_received += 1;
                    self.client.handle_input(now, client::Input::Envelope(data));
                }
            }
            Input::StreamClosed {
                stream,
                error,
                detail,
            } => self.on_stream_closed(now, stream, error, detail),
            Input::SocketBound { socket, local } => self.on_socket_bound(now, socket, local),
            Input::SocketFailed { socket, error } => {
                if matches!(self.link, Link::Dtls { socket: s, .. } if s == socket) {
                    let why = format!("{} (DTLS): {error}", self.server_addr());
                    self.fail_link(now, why);
                }
            }
            Input::SendFailed => self.stats.peer_send_errors += 1,
            Input::QuicFallback { stream, envelope } => {
                self.stats.quic_datagrams_sent = self.stats.quic_datagrams_sent.saturating_sub(1);
                self.queue_on_stream(stream, envelope);
            }
            Input::SessionOpen { path } => {
                if self.quic_session(path) {
                    self.stats.peer_sessions_open += 1;
                    self.client
                        .handle_input(now, client::Input::PeerSessionOpen(path));
                }
            }
            Input::SessionClosed { path, failed } => {
                let held = self
                    .peer
                    .quic
                    .as_mut()
                    .is_some_and(|q| q.sessions.remove(&path).is_some());
                if held {
                    if let Some(quic) = &mut self.peer.quic {
                        quic.authorised.remove(&path);
                    }
                    self.stats.peer_session_failures += u64::from(failed);
                    self.client
                        .handle_input(now, client::Input::PeerSessionFailed(path));
                }
            }
            Input::SessionStream { dropped, .. } => {
                if dropped {
                    self.stats.peer_quic_stream_full += 1;
                } else {
                    self.stats.peer_quic_stream_envelopes += 1;
                }
            }
            Input::SessionData { path, data } => {
                if self.quic_session(path) {
                    self.captured(
                        now,
                        Direction::Received,
                        Transport::QUIC,
                        Some(self.peer_local),
                        path,
                        data,
                    );
                    let datagram = client::Input::PeerSessionDatagram {
                        path,
                        datagram: data,
                    };
                    self.client.handle_input(now, datagram);
                }
            }
        }
    }

    /// The runtime's peer stream listener accepted a connection from `remote`: its stream id,
    /// or `None` if it must be closed at once (too many in their handshake, counted). Run the
    /// TLS handshake (for a TLS listener) and report [`Input::StreamOpen`] or
    /// [`Input::StreamClosed`].
    pub fn accept_peer_stream(&mut self, now: Instant, remote: SocketAddr) -> Option<StreamId> {
        self.advance(now);
        if !self.peer.enabled || self.peer.handshaking >= MAX_HANDSHAKING_PEER_STREAMS {
            self.stats.peer_streams_refused += 1;
            return None;
        }
        self.peer.handshaking += 1;
        let transport = self.settings.listener_transport;
        Some(self.new_stream(Role::PeerAccepted(None), transport, remote))
    }

    /// The transport limits of the tunnel's QUIC connections.
    pub fn quic_limits(&self) -> QuicLimits {
        self.settings.quic_limits
    }

    /// How long a QUIC peer session's handshake may take (the peer tunnel's establishment
    /// bound); zero without QUIC peer sessions.
    pub fn quic_handshake_timeout(&self) -> Duration {
        self.peer
            .quic
            .as_ref()
            .map_or(Duration::ZERO, |q| q.handshake_timeout)
    }

    /// An incoming QUIC peer connection from `remote` reached the runtime's QUIC endpoint: the
    /// fingerprint its client certificate must have, or `None` to refuse it (counted): the
    /// address is not authorised, or holds an open session already (a replayed Initial must
    /// not replace it).
    pub fn accept_quic_session(&mut self, remote: SocketAddr) -> Option<[u8; 32]> {
        let quic = self.peer.quic.as_mut()?;
        let fingerprint = match quic.sessions.get(&remote) {
            Some(_) => None,
            None => quic.authorised.get(&remote).copied(),
        };
        match fingerprint {
            Some(fp) => {
                quic.sessions.insert(remote, false);
                Some(fp)
            }
            None => {
                self.stats.peer_sessions_refused += 1;
                None
            }
        }
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        self.client.handle_timeout(now);
        if let Link::Dtls {
            endpoint: Some(endpoint),
            ..
        } = &mut self.link
        {
            endpoint.handle_timeout(now);
        }
        if let Some(dtls) = &mut self.peer.dtls {
            dtls.handle_timeout(now);
        }
    }

    /// Hands the runtime everything waiting for `stream` in `out` (its old contents are
    /// dropped), after [`IoEvent::StreamReady`] and again after each write completes; false
    /// when nothing waits.
    pub fn take_output(&mut self, stream: StreamId, out: &mut Vec<u8>) -> bool {
        match self.streams.get_mut(&stream) {
            Some(s) => s.output.take(out),
            None => {
                out.clear();
                false
            }
        }
    }

    /// The next QUIC datagram for the runtime's QUIC peer endpoint, copied into `buf`
    /// (truncated if short), with its source; `None` when none waits.
    pub fn take_quic_datagram(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let (from, datagram) = self.peer.quic.as_mut()?.inbox.pop_front()?;
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        Some((n, from))
    }

    // ---- application → host ----

    /// Binds an inner UDP socket to `port` (0 picks a free one from 49152 up) with a queue
    /// made by `queue` (given the configured length); its port and queue.
    pub fn bind(&mut self, port: u16, queue: impl FnOnce(usize) -> Q) -> io::Result<(u16, Arc<Q>)> {
        let len = self.settings.socket_queue_len;
        self.sockets.bind(port, || queue(len))
    }

    /// Unbinds `port`; its peer tunneling setting goes back to the default.
    pub fn unbind(&mut self, port: u16) {
        self.sockets.remove(port);
        self.client
            .set_peer_tunneling(port, self.settings.default_opt_in);
    }

    /// Sends `payload` from inner port `port` to `dst` (see [`inner::send_udp`]).
    pub fn send_to(
        &mut self,
        now: Instant,
        port: u16,
        dst: SocketAddr,
        payload: &[u8],
    ) -> io::Result<()> {
        self.advance(now);
        let before = *self.client.stats();
        let sent = inner::send_udp(
            &mut self.client,
            now,
            port,
            dst,
            payload,
            &mut self.packet,
            &mut self.fragmenter,
        );
        match &sent {
            Ok(()) => Capture::inner_packet(&self.capture, now, Direction::Sent, &self.packet),
            Err(e) => warn_first_refusal(&before, self.client.stats(), e),
        }
        sent
    }

    /// The tunnel's internal address of an inner socket on `port`.
    pub fn local_addr(&self, port: u16) -> io::Result<SocketAddr> {
        inner::local_addr(&self.client, port)
    }

    /// Sets the packet tap: from now on every inner packet no inner socket, stream or
    /// listener claims goes whole to a queue made by `queue` (given a length of at least
    /// 1,024 packets), until [`untap`](Self::untap). Refused while a tap is set.
    pub fn tap(&mut self, queue: impl FnOnce(usize) -> Q) -> io::Result<Arc<Q>> {
        if self.tap.is_some() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "a tap is set"));
        }
        let queue = Arc::new(queue(self.settings.socket_queue_len.max(1024)));
        self.tap = Some(queue.clone());
        Ok(queue)
    }

    /// Removes the packet tap.
    pub fn untap(&mut self) {
        self.tap = None;
    }

    /// Sends one whole inner IP packet from the tap's side (the kernel's, for a TUN device):
    /// its source must be the tunnel's internal address. An IPv4 packet larger than the
    /// tunnel carries goes as fragments. Errors as [`inner::send_udp`] reports them.
    pub fn send_packet(&mut self, now: Instant, packet: &[u8]) -> io::Result<()> {
        self.advance(now);
        let before = *self.client.stats();
        let sent = self.send_whole_packet(now, packet);
        if let Err(e) = &sent {
            warn_first_refusal(&before, self.client.stats(), e);
        }
        sent
    }

    /// Sends each of `packets` as [`send_packet`](Self::send_packet) does. Each is tried
    /// whatever became of the one before (a device mixes packets the tunnel refuses, such as
    /// IPv6 link-local ones, with those it carries): how many were sent, or the first error
    /// when none was.
    pub fn send_packets<'a>(
        &mut self,
        now: Instant,
        packets: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<usize> {
        let (mut sent, mut failed) = (0, None);
        for packet in packets {
            match self.send_packet(now, packet) {
                Ok(()) => sent += 1,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) if sent == 0 => Err(e),
            _ => Ok(sent),
        }
    }

    fn send_whole_packet(&mut self, now: Instant, packet: &[u8]) -> io::Result<()> {
        let max = self
            .client
            .tunnel_info()
            .map_or(usize::MAX, |i| i.max_packet_len);
        if packet.len() <= max || packet.first().map(|b| b >> 4) != Some(4) {
            return self.client.send_ip(now, packet).map_err(inner::send_error);
        }
        let (client, mut failed) = (&mut self.client, None);
        self.fragmenter
            .split(packet, max, |f| match client.send_ip(now, f) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            });
        failed.map_or(Ok(()), |e| Err(inner::send_error(e)))
    }

    /// Opts inner port `port` in or out of peer tunneling.
    pub fn set_peer_tunneling(&mut self, port: u16, enabled: bool) {
        self.client.set_peer_tunneling(port, enabled);
    }

    /// Removes the peer tunnel with `peer`; see [`TunnelClient::release_peer_tunnel`].
    pub fn release_peer_tunnel(&mut self, now: Instant, peer: IpAddr) {
        self.advance(now);
        self.client.release_peer_tunnel(now, peer);
    }

    /// Releases the tunnel; see [`TunnelClient::release`].
    pub fn release(&mut self, now: Instant) {
        self.advance(now);
        self.client.release(now);
    }

    /// The tunnel stops: every transport, stream, socket and session is closed, and every
    /// inner socket's reader sees the tunnel gone.
    pub fn stop(&mut self, now: Instant) {
        self.advance(now);
        self.close_link();
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for stream in ids {
            self.close_stream(stream, false);
        }
        if let Some(dtls) = &mut self.peer.dtls {
            dtls.close_all(now);
        }
        if let Some(quic) = &mut self.peer.quic {
            for path in quic.sessions.keys() {
                self.events
                    .push_back(TunnelEvent::CloseQuicSession { path: *path });
            }
            quic.sessions.clear();
            quic.authorised.clear();
        }
        self.sockets.close_all();
        self.tcp.close_all();
        if let Some(tap) = &self.tap {
            tap.close();
        }
    }

    // ---- test hooks ----

    /// While `blocked`, every datagram the peer socket would send or receive (STUN, probes,
    /// peer tunnels and sessions) is dropped and counted in [`TunnelStats::peer_blocked`], as
    /// if a firewall cut the direct path. The server tunnel is not affected.
    pub fn set_peer_blocked(&mut self, blocked: bool) {
        self.peer.blocked = blocked;
    }

    /// Whether the peer socket is blocked (see [`set_peer_blocked`](Self::set_peer_blocked)).
    pub fn peer_blocked(&self) -> bool {
        self.peer.blocked
    }

    /// Presents `identity` in the DTLS peer sessions opened or accepted from now on, while
    /// the fingerprint announced stays the one of the start, as if the certificate were
    /// swapped on the path.
    pub fn present_peer_identity(&mut self, identity: PeerIdentity) {
        if let Some(dtls) = &mut self.peer.dtls {
            // A key rtc-dtls cannot use leaves the identity as it was.
            let _ = dtls.set_identity(identity);
        }
    }

    /// Forgets the server transport without telling the server, and reports it lost: the
    /// client re-attaches. With `replaced`, the runtime has moved the peer socket to a new
    /// port (a UDP transport then re-attaches from it). False if no transport was held.
    pub fn lose_server_transport(&mut self, now: Instant) -> bool {
        self.advance(now);
        let server = self.server_addr();
        let held = match std::mem::replace(&mut self.link, Link::None) {
            Link::None => false,
            Link::Udp(_) => true,
            Link::Stream { stream, .. } => {
                self.close_stream(stream, true);
                true
            }
            Link::Dtls { socket, .. } => {
                self.events
                    .push_back(TunnelEvent::Io(IoEvent::CloseSocket { socket }));
                true
            }
        };
        if held {
            self.last_failure = Some(format!("{server}: transport dropped"));
            self.client.handle_input(now, client::Input::TransportLost);
        }
        held
    }

    /// Closes every peer stream at once and reports each lost to the client, as if the
    /// connections broke.
    pub fn drop_peer_streams(&mut self, now: Instant) {
        self.advance(now);
        let peer_streams: Vec<(StreamId, Option<PeerStreamId>)> = self
            .streams
            .iter()
            .filter_map(|(id, s)| match s.role {
                Role::PeerOpened(p) => Some((*id, Some(p))),
                Role::PeerAccepted(p) => Some((*id, p)),
                Role::Server => None,
            })
            .collect();
        for (stream, peer_stream) in peer_streams {
            self.close_stream(stream, true);
            if let Some(id) = peer_stream {
                self.client
                    .handle_input(now, client::Input::PeerStreamLost(id));
            }
        }
    }

    // ---- host → runtime ----

    /// Writes the next datagram to send into `buf` (replacing its contents) and says where it
    /// goes; `None` when nothing is due. This is also where the host acts on what the client
    /// asked for (transports, streams, sessions), in order, and hands received inner packets
    /// to their sockets.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.advance(now);
        loop {
            if let Some((socket, to, datagram)) = self.pending.pop_front() {
                *buf = datagram;
                return Some(Transmit::Datagram { socket, to });
            }
            if let Some(transmit) = self.poll_dtls_transmit(buf) {
                return Some(transmit);
            }
            if self.dtls_events(now) {
                continue;
            }
            if let Some(t) = self.client.poll_transmit(now, buf) {
                match self.route(now, t.destination, buf) {
                    Some(transmit) => return Some(transmit),
                    None => continue,
                }
            }
            self.deliver_inner(now);
            if self.tcp.poll(now, &mut self.client) {
                continue;
            }
            match self.client.poll_event() {
                Some(event) => self.on_client_event(now, event),
                None => return None,
            }
        }
    }

    /// The next event, in order; see [`poll_transmit`](Self::poll_transmit) for where the
    /// host acts on the client's own.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.client.poll_timeout();
        if let Link::Dtls {
            endpoint: Some(endpoint),
            ..
        } = &self.link
        {
            at = earliest(at, endpoint.poll_timeout());
        }
        if let Some(dtls) = &self.peer.dtls {
            at = earliest(at, dtls.poll_timeout());
        }
        earliest(at, self.tcp.poll_at())
    }

    // ---- observability ----

    /// The client state machine, for what the host does not pass through.
    pub fn client(&self) -> &TunnelClient {
        &self.client
    }

    /// Where the client is in its life cycle.
    pub fn state(&self) -> ClientState {
        self.client.state()
    }

    /// The configuration the server gave the tunnel.
    pub fn info(&self) -> Option<&TunnelInfo> {
        self.client.tunnel_info()
    }

    /// Where packets to `peer` (an internal address) go now.
    pub fn peer_path(&self, peer: IpAddr) -> PeerPath {
        self.client.peer_path(peer)
    }

    /// Every peer the client holds peer tunneling state for.
    pub fn peer_tunnels(&self) -> Vec<PeerTunnelInfo> {
        self.client.peer_tunnels()
    }

    /// Counters so far.
    pub fn stats(&self) -> TunnelStats {
        let mut stats = self.stats;
        stats.client = *self.client.stats();
        stats.send_queue = self.client.queued_packets();
        stats.stream_queued_bytes = self.streams.values().map(|s| s.output.len()).sum();
        stats.tcp = self.tcp.counters();
        stats.fragments_dropped = self.reassembly.dropped;
        if let Some(dtls) = &self.peer.dtls {
            let counters = dtls.counters();
            stats.peer_dtls_bad_records = counters.bad_records;
            stats.peer_dtls_unknown_source = counters.unknown_source;
        }
        stats
    }

    /// Counts a notification the runtime could not hand to the application.
    pub fn notification_dropped(&mut self) {
        self.stats.notifications_dropped += 1;
    }

    /// The last transport or server failure, as text (for [`ConnectError::TimedOut`]).
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// How waiting for the first tunnel ends: `None` while the client is still getting it,
    /// `Some(Ok(()))` once connected, else why not (refused for good, or `timed_out` after
    /// `waited`).
    pub fn connect_result(
        &self,
        waited: Duration,
        timed_out: bool,
    ) -> Option<Result<(), ConnectError>> {
        match self.client.state() {
            ClientState::Connected => Some(Ok(())),
            ClientState::Terminated => Some(Err(ConnectError::Refused(
                self.terminated.unwrap_or(TerminateReason::Released),
            ))),
            _ if timed_out => {
                let stats = self.client.stats();
                Some(Err(ConnectError::TimedOut {
                    waited,
                    last_failure: self.last_failure.clone(),
                    requests_sent: stats.configuration_requests_sent,
                    answered: stats.envelopes_received > 0,
                    servers: self.client.config().servers.clone(),
                }))
            }
            _ => None,
        }
    }

    /// Why the client terminated, once it has.
    pub fn terminated(&self) -> Option<TerminateReason> {
        self.terminated
    }

    // ---- the peer socket ----

    fn on_peer_socket(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if matches!(self.link, Link::Udp(server) if server == from) && !stun::is_stun(data) {
            self.captured(
                now,
                Direction::Received,
                Transport::UDP,
                Some(self.peer_local),
                from,
                data,
            );
            self.client.handle_input(now, client::Input::Envelope(data));
            return;
        }
        if self.peer.blocked {
            self.stats.peer_blocked += 1;
            return;
        }
        match DatagramKind::of(data) {
            DatagramKind::Quic if self.peer.quic.is_some() => self.on_quic_datagram(from, data),
            DatagramKind::Dtls if self.peer.dtls.is_some() => {
                // Only from addresses the client authorised or opened a session to.
                match self.peer.dtls.as_mut().filter(|d| d.admits(from)) {
                    Some(dtls) => dtls.handle_datagram(now, from, data),
                    None => self.stats.peer_dtls_unauthorised += 1,
                }
            }
            _ if self.peer.enabled => {
                if DatagramKind::of(data) == DatagramKind::Envelope {
                    self.captured(
                        now,
                        Direction::Received,
                        Transport::UDP,
                        Some(self.peer_local),
                        from,
                        data,
                    );
                }
                let input = client::Input::PeerDatagram {
                    from,
                    datagram: data,
                };
                self.client.handle_input(now, input);
            }
            _ => self.stats.udp_dropped += 1,
        }
    }

    /// QUIC reaches the runtime's endpoint only from addresses the client authorised or
    /// opened a session to.
    fn on_quic_datagram(&mut self, from: SocketAddr, data: &[u8]) {
        let Some(quic) = &mut self.peer.quic else {
            return;
        };
        if !quic.admits(from) {
            self.stats.peer_quic_unauthorised += 1;
            return;
        }
        if quic.inbox.len() >= QUIC_INBOX {
            self.stats.peer_quic_inbox_full += 1;
            return;
        }
        if quic.inbox.is_empty() {
            self.events.push_back(TunnelEvent::QuicReadable);
        }
        quic.inbox.push_back((from, data.to_vec()));
    }

    fn quic_session(&self, path: SocketAddr) -> bool {
        self.peer
            .quic
            .as_ref()
            .is_some_and(|q| q.sessions.contains_key(&path))
    }

    // ---- the server transport ----

    /// Opens the transport the client asked for.
    fn open_link(&mut self, now: Instant, server: ServerEndpoint) {
        self.close_link();
        let security = match server.transport {
            Transport::UDP => {
                self.link = Link::Udp(server.addr);
                self.client.handle_input(now, client::Input::TransportOpen);
                return;
            }
            Transport::DTLS => {
                if self.settings.dtls.is_none() {
                    return self.fail_link(now, format!("{} (DTLS): no TLS settings", server.addr));
                }
                self.next_socket += 1;
                let socket = SocketId(self.next_socket);
                self.link = Link::Dtls {
                    socket,
                    server: server.addr,
                    endpoint: None,
                };
                let bind = IoEvent::BindSocket {
                    socket,
                    remote: server.addr,
                };
                self.events.push_back(TunnelEvent::Io(bind));
                return;
            }
            Transport::TCP => Security::Tcp,
            Transport::QUIC if !self.settings.quic => {
                return self.fail_link(
                    now,
                    format!("{}: QUIC is not supported by this runtime", server.addr),
                );
            }
            Transport::TLS | Transport::QUIC => {
                let Some((settings, config)) = &self.settings.tls else {
                    return self.fail_link(now, format!("{}: no TLS settings", server.addr));
                };
                let name = match tls::server_name(settings, server.addr) {
                    Ok(name) => name,
                    Err(e) => return self.fail_link(now, format!("{}: {e}", server.addr)),
                };
                let tls = ClientTls {
                    config: config.clone(),
                    name,
                };
                match server.transport {
                    Transport::TLS => Security::Tls(tls),
                    _ => Security::Quic(tls, self.settings.quic_limits),
                }
            }
            other => {
                return self.fail_link(
                    now,
                    format!("{}: transport {other} is not supported", server.addr),
                );
            }
        };
        let stream = self.new_stream(Role::Server, security.transport(), server.addr);
        self.link = Link::Stream {
            stream,
            server: server.addr,
            quic: security.transport() == Transport::QUIC,
        };
        let connect = IoEvent::Connect(Connect {
            stream,
            to: server.addr,
            security,
            timeout: self.settings.transport_timeout,
        });
        self.events.push_back(TunnelEvent::Io(connect));
    }

    /// Gives up the current transport (after the transmits polled before).
    fn close_link(&mut self) {
        match std::mem::replace(&mut self.link, Link::None) {
            Link::Stream { stream, .. } => self.close_stream(stream, false),
            Link::Dtls {
                socket,
                server,
                endpoint,
            } => {
                if let Some(mut endpoint) = endpoint {
                    endpoint.close(self.now, server);
                    while let Some((to, datagram)) = endpoint.poll_transmit() {
                        if self.pending.len() < MAX_PENDING {
                            self.pending.push_back((socket, to, datagram.to_vec()));
                        }
                    }
                }
                self.events
                    .push_back(TunnelEvent::Io(IoEvent::CloseSocket { socket }));
            }
            Link::None | Link::Udp(_) => {}
        }
    }

    /// The transport being opened failed.
    fn fail_link(&mut self, now: Instant, why: String) {
        self.close_link();
        self.last_failure = Some(why);
        self.client
            .handle_input(now, client::Input::TransportFailed);
    }

    /// The open transport ended.
    fn lose_link(&mut self, now: Instant, why: String) {
        self.close_link();
        self.last_failure = Some(why);
        self.client.handle_input(now, client::Input::TransportLost);
    }

    fn on_socket_bound(&mut self, now: Instant, socket: SocketId, local: SocketAddr) {
        let Link::Dtls {
            socket: s, server, ..
        } = self.link
        else {
            return;
        };
        if s != socket {
            return;
        }
        let Some(settings) = &self.settings.dtls else {
            return;
        };
        let limits = DtlsLimits {
            max_half_open: 1,
            handshake_timeout: self.settings.transport_timeout,
            // No acceptor: no cookies.
            cookie_lifetime: self.settings.transport_timeout,
        };
        let mut endpoint = DtlsEndpoint::new(local, limits);
        let started = settings
            .handshake_config(server)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                endpoint
                    .connect(now, server, config)
                    .map_err(|e| e.to_string())
            });
        match started {
            Ok(()) => {
                if let Link::Dtls { endpoint: slot, .. } = &mut self.link {
                    *slot = Some(Box::new(endpoint));
                }
            }
            Err(why) => self.fail_link(now, format!("{server} (DTLS): {why}")),
        }
    }

    fn on_dtls_socket(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        if let Link::Dtls {
            socket: s,
            endpoint: Some(endpoint),
            ..
        } = &mut self.link
        {
            if *s == socket {
                endpoint.handle_datagram(now, from, data);
            }
        }
    }

    /// Acts on what the DTLS transport and the DTLS peer sessions report; false if they
    /// reported nothing.
    fn dtls_events(&mut self, now: Instant) -> bool {
        if let Link::Dtls {
            endpoint: Some(endpoint),
            server,
            ..
        } = &mut self.link
        {
            let server = *server;
            if let Some(event) = endpoint.poll_event() {
                match event {
                    DtlsEvent::HandshakeDone { .. } => {
                        self.client.handle_input(now, client::Input::TransportOpen);
                    }
                    DtlsEvent::Data { payload, .. } => {
                        let envelope = CapturedEnvelope {
                            direction: Direction::Received,
                            transport: Transport::DTLS,
                            local: None,
                            remote: server,
                            envelope: &payload,
                        };
                        Capture::envelope(&self.capture, now, envelope);
                        self.stats.dtls_records_received += 1;
                        self.client
                            .handle_input(now, client::Input::Envelope(&payload));
                    }
                    DtlsEvent::HandshakeFailed { reason, .. } => {
                        self.fail_link(now, format!("{server} (DTLS): {reason}"));
                    }
                    DtlsEvent::Closed { .. } => {
                        self.lose_link(now, format!("{server} (DTLS): closed by the server"));
                    }
                }
                return true;
            }
        }
        let Some(event) = self.peer.dtls.as_mut().and_then(|d| d.poll_event(now)) else {
            return false;
        };
        match event {
            dtls::PeerSessionEvent::Open { path } => {
                self.stats.peer_sessions_open += 1;
                self.client
                    .handle_input(now, client::Input::PeerSessionOpen(path));
            }
            dtls::PeerSessionEvent::Failed { path, handshake } => {
                self.stats.peer_session_failures += u64::from(handshake);
                self.client
                    .handle_input(now, client::Input::PeerSessionFailed(path));
            }
            dtls::PeerSessionEvent::Envelope { path, envelope } => {
                self.captured(
                    now,
                    Direction::Received,
                    Transport::DTLS,
                    Some(self.peer_local),
                    path,
                    &envelope,
                );
                let input = client::Input::PeerSessionDatagram {
                    path,
                    datagram: &envelope,
                };
                self.client.handle_input(now, input);
            }
        }
        true
    }

    /// The next datagram a DTLS endpoint queued.
    fn poll_dtls_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Link::Dtls {
            socket,
            endpoint: Some(endpoint),
            ..
        } = &mut self.link
        {
            if let Some((to, datagram)) = endpoint.poll_transmit() {
                buf.clear();
                buf.extend_from_slice(&datagram);
                return Some(Transmit::Datagram {
                    socket: *socket,
                    to,
                });
            }
        }
        let dtls = self.peer.dtls.as_mut()?;
        while let Some((to, datagram)) = dtls.poll_transmit() {
            if self.peer.blocked {
                self.stats.peer_blocked += 1;
                continue;
            }
            buf.clear();
            buf.extend_from_slice(&datagram);
            return Some(Transmit::Datagram {
                socket: PEER_SOCKET,
                to,
            });
        }
        None
    }

    /// Sends the envelope the client wrote into `buf` where it goes; the transmit for the
    /// runtime, or `None` when the host took it (a stream's queue, a DTLS record) or dropped
    /// it.
    fn route(&mut self, now: Instant, to: Destination, buf: &[u8]) -> Option<Transmit> {
        // NAT discovery's STUN requests leave here too; a capture shows envelopes only.
        if self.capture.is_some() && DatagramKind::of(buf) == DatagramKind::Envelope {
            if let Some((transport, local, remote)) = self.capture_ends(to) {
                self.captured(now, Direction::Sent, transport, local, remote, buf);
            }
        }
        match to {
            Destination::Server => match &mut self.link {
                Link::Udp(server) => Some(Transmit::Datagram {
                    socket: PEER_SOCKET,
                    to: *server,
                }),
                Link::Stream {
                    stream, quic: true, ..
                } if buf.first() == Some(&EnvelopeType::DATA.0) => {
                    self.stats.quic_datagrams_sent += 1;
                    Some(Transmit::QuicDatagram { stream: *stream })
                }
                Link::Stream { stream, .. } => {
                    let stream = *stream;
                    self.queue_on_stream(stream, buf);
                    None
                }
                Link::Dtls {
                    endpoint: Some(endpoint),
                    server,
                    ..
                } => {
                    // A failed send drops the association and reports it as closed.
                    if endpoint.send(now, *server, buf).is_ok() {
                        self.stats.dtls_records_sent += 1;
                    }
                    None
                }
                // Loss while no transport is up is the client's to repair.
                Link::Dtls { endpoint: None, .. } | Link::None => None,
            },
            Destination::Peer(_) | Destination::PeerSession(_) if self.peer.blocked => {
                self.stats.peer_blocked += 1;
                None
            }
            // Loss on a peer path is the core's to notice.
            Destination::Peer(to) => Some(Transmit::Datagram {
                socket: PEER_SOCKET,
                to,
            }),
            Destination::PeerStream(id) => {
                let stream = self.streams.iter().find_map(|(stream, s)| {
                    let ours = matches!(s.role, Role::PeerOpened(p) | Role::PeerAccepted(Some(p)) if p == id);
                    ours.then_some(*stream)
                });
                if let Some(stream) = stream {
                    self.queue_on_stream(stream, buf);
                }
                None
            }
            Destination::PeerSession(path) => {
                if let Some(dtls) = &mut self.peer.dtls {
                    // A failed send ends the session and is reported as such.
                    let _ = dtls.send(now, path, buf);
                    None
                } else if self.quic_session(path) {
                    Some(Transmit::PeerSession { path })
                } else {
                    None
                }
            }
        }
    }

    // ---- the client's instructions ----

    fn on_client_event(&mut self, now: Instant, event: ClientEvent) {
        match event {
            ClientEvent::OpenTransport { server } => self.open_link(now, server),
            ClientEvent::CloseTransport => self.close_link(),
            ClientEvent::OpenPeerStream {
                stream: id,
                addr,
                transport,
                fingerprint,
                ..
            } => {
                let pinned = |fp| tls::pinned_client_config(Fingerprint(fp));
                let security = match (transport, fingerprint.map(pinned)) {
                    (Transport::TLS, Some(Ok(config))) => Security::Tls(ClientTls {
                        config,
                        name: ServerName::IpAddress(addr.ip().into()),
                    }),
                    (Transport::TCP, _) => Security::Tcp,
                    _ => {
                        self.client
                            .handle_input(now, client::Input::PeerStreamFailed(id));
                        return;
                    }
                };
                let stream = self.new_stream(Role::PeerOpened(id), transport, addr);
                let connect = IoEvent::Connect(Connect {
                    stream,
                    to: addr,
                    security,
                    timeout: self.settings.transport_timeout,
                });
                self.events.push_back(TunnelEvent::Io(connect));
            }
            ClientEvent::ClosePeerStream { stream: id } => {
                let stream = self.streams.iter().find_map(|(stream, s)| {
                    let ours = matches!(s.role, Role::PeerOpened(p) | Role::PeerAccepted(Some(p)) if p == id);
                    ours.then_some(*stream)
                });
                if let Some(stream) = stream {
                    self.close_stream(stream, false);
                }
            }
            ClientEvent::OpenPeerSession {
                path,
                transport,
                fingerprint,
                ..
            } => self.open_session(now, path, transport, fingerprint),
            ClientEvent::AcceptPeerSession {
                path,
                transport,
                fingerprint,
                ..
            } => self.authorise_session(now, path, transport, fingerprint),
            ClientEvent::ClosePeerSession { path } => {
                if let Some(dtls) = &mut self.peer.dtls {
                    dtls.close(now, path);
                }
                if let Some(quic) = &mut self.peer.quic {
                    quic.authorised.remove(&path);
                    if quic.sessions.remove(&path).is_some() {
                        self.events
                            .push_back(TunnelEvent::CloseQuicSession { path });
                    }
                }
            }
            event => {
                let Some(note) = Notification::of(event, &mut self.last_failure) else {
                    return;
                };
                if let Notification::Terminated { reason } = &note {
                    self.terminated = Some(*reason);
                }
                self.events.push_back(TunnelEvent::Notification(note));
            }
        }
    }

    fn open_session(
        &mut self,
        now: Instant,
        path: SocketAddr,
        transport: Transport,
        fingerprint: [u8; 32],
    ) {
        let opened = match (transport, &mut self.peer.dtls, &mut self.peer.quic) {
            (Transport::DTLS, Some(dtls), _) => {
                dtls.open(now, path, fingerprint).map_err(|e| e.to_string())
            }
            (Transport::QUIC, _, Some(quic)) => {
                quic.sessions.insert(path, true);
                self.events
                    .push_back(TunnelEvent::OpenQuicSession { path, fingerprint });
                Ok(())
            }
            _ => Err(format!("no {transport} peer sessions")),
        };
        if opened.is_err() {
            self.stats.peer_session_failures += 1;
            self.client
                .handle_input(now, client::Input::PeerSessionFailed(path));
        }
    }

    fn authorise_session(
        &mut self,
        now: Instant,
        path: SocketAddr,
        transport: Transport,
        fingerprint: [u8; 32],
    ) {
        let authorised = match (transport, &mut self.peer.dtls, &mut self.peer.quic) {
            (Transport::DTLS, Some(dtls), _) => {
                dtls.authorise(path, fingerprint).map_err(|e| e.to_string())
            }
            (Transport::QUIC, _, Some(quic)) => {
                quic.authorised.insert(path, fingerprint);
                Ok(())
            }
            _ => Err(format!("no {transport} peer sessions")),
        };
        if authorised.is_err() {
            self.stats.peer_session_failures += 1;
            self.client
                .handle_input(now, client::Input::PeerSessionFailed(path));
        }
    }

    // ---- streams ----

    fn new_stream(&mut self, role: Role, transport: Transport, remote: SocketAddr) -> StreamId {
        self.next_stream += 1;
        let stream = StreamId(self.next_stream);
        self.streams.insert(
            stream,
            Stream {
                role,
                transport,
                open: false,
                closing: false,
                deframer: StreamDeframer::new(),
                output: StreamOutput::default(),
                remote,
            },
        );
        stream
    }

    fn queue_on_stream(&mut self, stream: StreamId, envelope: &[u8]) {
        let Some(s) = self
            .streams
            .get_mut(&stream)
            .filter(|s| s.open && !s.closing)
        else {
            return;
        };
        let was_idle = s.output.is_empty() && !s.output.in_flight();
        if !s.output.push(envelope, self.settings.stream_queue_bytes) {
            self.stats.stream_queue_full += 1;
        } else if was_idle {
            self.events
                .push_back(TunnelEvent::Io(IoEvent::StreamReady { stream }));
        }
    }

    /// Asks the runtime to close `stream`; what it reports about it from now on is ignored.
    fn close_stream(&mut self, stream: StreamId, abort: bool) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.closing && !abort {
            return;
        }
        s.closing = true;
        self.events.push_back(TunnelEvent::Io(IoEvent::CloseStream {
            stream,
            abort,
            reason: CloseReason::Closed,
        }));
    }

    fn on_stream_open(&mut self, now: Instant, stream: StreamId) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.open || s.closing {
            return;
        }
        s.open = true;
        match s.role {
            Role::Server => self.client.handle_input(now, client::Input::TransportOpen),
            Role::PeerOpened(id) => self
                .client
                .handle_input(now, client::Input::PeerStreamOpen(id)),
            Role::PeerAccepted(_) => {
                self.peer.handshaking = self.peer.handshaking.saturating_sub(1);
                // Ids the host picks for accepted streams keep the top bit clear.
                self.next_accepted = (self.next_accepted + 1) & !PeerStreamId::CLIENT_CHOSEN;
                let id = PeerStreamId(self.next_accepted);
                s.role = Role::PeerAccepted(Some(id));
                let remote = s.remote;
                let input = client::Input::PeerStreamAccepted { stream: id, remote };
                self.client.handle_input(now, input);
            }
        }
    }

    fn on_stream_data(&mut self, now: Instant, stream: StreamId, data: &[u8]) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if !s.open || s.closing {
            return;
        }
        let (role, transport, remote) = (s.role, s.transport, s.remote);
        let mut framed = s.deframer.push(data).is_ok();
        while framed {
            match s.deframer.next_raw() {
                Ok(Some(envelope)) => {
                    let captured = CapturedEnvelope {
                        direction: Direction::Received,
                        transport,
                        local: None,
                        remote,
                        envelope,
                    };
                    Capture::envelope(&self.capture, now, captured);
                    match role {
                        Role::Server => self
                            .client
                            .handle_input(now, client::Input::Envelope(envelope)),
                        Role::PeerOpened(id) | Role::PeerAccepted(Some(id)) => {
                            let input = client::Input::PeerStreamEnvelope {
                                stream: id,
                                envelope,
                            };
                            self.client.handle_input(now, input);
                        }
                        Role::PeerAccepted(None) => {}
                    }
                }
                Ok(None) => break,
                Err(_) => framed = false,
            }
        }
        if !framed {
            // Lost framing ends the stream as a failure would.
            self.close_stream(stream, true);
            self.stream_ended(now, stream, Some(StreamError::Io), "lost framing");
        }
    }

    fn on_stream_closed(
        &mut self,
        now: Instant,
        stream: StreamId,
        error: Option<StreamError>,
        detail: Option<&str>,
    ) {
        let why = match (detail, error) {
            (Some(detail), _) => detail.to_owned(),
            (None, Some(e)) => e.to_string(),
            (None, None) => "closed by the server".to_owned(),
        };
        self.stream_ended(now, stream, error, &why);
        self.streams.remove(&stream);
    }

    /// Tells the client that `stream` ended, unless the host gave it up already.
    fn stream_ended(
        &mut self,
        now: Instant,
        stream: StreamId,
        error: Option<StreamError>,
        why: &str,
    ) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let (was_open, role) = (s.open, s.role);
        if s.closing && !matches!(error, Some(StreamError::Io)) {
            return;
        }
        s.closing = true;
        match role {
            Role::Server => {
                let Link::Stream {
                    stream: current,
                    quic,
                    ..
                } = self.link
                else {
                    return;
                };
                if current != stream {
                    return;
                }
                self.link = Link::None;
                let server = s.remote;
                let text = match quic {
                    true => format!("{server} (QUIC): {why}"),
                    false => format!("{server}: {why}"),
                };
                self.last_failure = Some(text);
                let input = if was_open {
                    client::Input::TransportLost
                } else {
                    client::Input::TransportFailed
                };
                self.client.handle_input(now, input);
            }
            Role::PeerOpened(id) => {
                let input = if was_open {
                    client::Input::PeerStreamLost(id)
                } else {
                    client::Input::PeerStreamFailed(id)
                };
                self.client.handle_input(now, input);
            }
            Role::PeerAccepted(Some(id)) => {
                self.client
                    .handle_input(now, client::Input::PeerStreamLost(id));
            }
            Role::PeerAccepted(None) => {
                self.peer.handshaking = self.peer.handshaking.saturating_sub(1);
            }
        }
    }

    // ---- inner sockets ----

    /// Hands the packets the client received to the inner sockets, TCP ones to the stack,
    /// after reassembling IPv4 fragments.
    /// Hands every inner packet received to its socket, the stack or the tap, then wakes
    /// their readers: once each, however many packets the batch held.
    fn deliver_inner(&mut self, now: Instant) {
        let mut tapped = 0;
        while self.client.recv_ip(&mut self.packet) {
            Capture::inner_packet(&self.capture, now, Direction::Received, &self.packet);
            let packet = if fragment::is_fragment(&self.packet) {
                if !self.reassembly.push(now, &self.packet, &mut self.whole) {
                    continue;
                }
                &self.whole
            } else {
                &self.packet
            };
            let delivery = self.sockets.deliver(packet);
            let tcp_port = match delivery {
                Delivery::NotUdp => tcp_port(packet),
                _ => None,
            };
            // Only a tap competes with the stack for TCP packets.
            let claimed = self.tap.is_none() || tcp_port.is_some_and(|p| self.tcp.uses_port(p));
            let tap = match delivery {
                Delivery::Unbound | Delivery::NotUdp if !claimed => self.tap.as_ref(),
                _ => None,
            };
            if let Some(tap) = tap {
                if tap.push(packet, TAPPED) {
                    tapped += 1;
                } else {
                    self.stats.tap_queue_full += 1;
                }
                continue;
            }
            match delivery {
                Delivery::Queued => {}
                Delivery::NotUdp if tcp_port.is_some() => self.tcp.receive(packet),
                Delivery::NotUdp => self.stats.not_udp += 1,
                Delivery::Unbound => self.stats.unbound_port += 1,
                Delivery::QueueFull => self.stats.socket_queue_full += 1,
            }
        }
        self.sockets.wake();
        if let Some(tap) = self.tap.as_ref().filter(|_| tapped > 0) {
            tap.wake(tapped);
        }
    }

    // ---- helpers ----

    fn server_addr(&self) -> String {
        match &self.link {
            Link::Udp(server) | Link::Stream { server, .. } | Link::Dtls { server, .. } => {
                server.to_string()
            }
            Link::None => "server".to_owned(),
        }
    }

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Shows an envelope exchanged with `remote` to the capture, if there is one.
    fn captured(
        &self,
        now: Instant,
        direction: Direction,
        transport: Transport,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        envelope: &[u8],
    ) {
        let envelope = CapturedEnvelope {
            direction,
            transport,
            local,
            remote,
            envelope,
        };
        Capture::envelope(&self.capture, now, envelope);
    }

    /// The transport and the two ends of an envelope for `to`, for a capture; `None` when it
    /// goes nowhere (no transport, or the peer socket blocked by the test hook).
    fn capture_ends(&self, to: Destination) -> Option<(Transport, Option<SocketAddr>, SocketAddr)> {
        let on_peer_socket = Some(self.peer_local);
        match to {
            Destination::Server => match &self.link {
                Link::Udp(server) => Some((Transport::UDP, on_peer_socket, *server)),
                Link::Stream { stream, server, .. } => {
                    let transport = self.streams.get(stream)?.transport;
                    Some((transport, None, *server))
                }
                Link::Dtls { server, .. } => Some((Transport::DTLS, None, *server)),
                Link::None => None,
            },
            _ if self.peer.blocked => None,
            Destination::Peer(path) => Some((Transport::UDP, on_peer_socket, path)),
            Destination::PeerStream(id) => self.streams.values().find_map(|s| {
                let ours =
                    matches!(s.role, Role::PeerOpened(p) | Role::PeerAccepted(Some(p)) if p == id);
                ours.then_some((s.transport, None, s.remote))
            }),
            Destination::PeerSession(path) => {
                let transport = match self.peer.dtls {
                    Some(_) => Transport::DTLS,
                    None => Transport::QUIC,
                };
                Some((transport, on_peer_socket, path))
            }
        }
    }
}

/// What an application reads and steers of a tunnel, whichever runtime drives it: each
/// runtime's `Tunnel` dereferences to it, so that both offer these methods with the same names.
pub trait TunnelControl: Send + Sync {
    /// The tunnel's internal IPv4 address (kept across re-attaches).
    fn internal_ipv4(&self) -> Option<Ipv4Addr>;
    /// The tunnel's internal IPv6 address.
    fn internal_ipv6(&self) -> Option<Ipv6Addr>;
    /// The tunnel id.
    fn tunnel_id(&self) -> Option<u64>;
    /// This client's transport address as the server saw it (behind a NAT, the mapping).
    fn observed_address(&self) -> Option<SocketAddr>;
    /// The configuration the server gave the tunnel.
    fn info(&self) -> Option<TunnelInfo>;
    /// Where the client is in its life cycle.
    fn state(&self) -> ClientState;
    /// Counters so far.
    fn stats(&self) -> TunnelStats;
    /// Where packets to `peer` (an internal address) go now: the relay, or a peer tunnel.
    fn peer_path(&self, peer: IpAddr) -> PeerPath;
    /// Every peer the client holds peer tunneling state for.
    fn peer_tunnels(&self) -> Vec<PeerTunnelInfo>;
    /// Removes the peer tunnel with `peer` and puts its flows back on the relay; see
    /// [`TunnelClient::release_peer_tunnel`].
    fn release_peer_tunnel(&self, peer: IpAddr);
    /// Test hook: while `blocked`, every datagram the peer socket would send or receive
    /// (STUN, probes, peer tunnels and sessions) is dropped and counted in
    /// [`TunnelStats::peer_blocked`], as if a firewall cut the direct path. The server tunnel
    /// is not affected.
    #[doc(hidden)]
    fn block_peer_traffic(&self, blocked: bool);
    /// Test hook: closes every peer stream of this tunnel and reports each as lost to the
    /// client, as if the connections broke.
    #[doc(hidden)]
    fn drop_peer_streams(&self);
}

impl<Q, D, R> TunnelControl for Shared<ClientHost<Q>, D, R>
where
    Q: DatagramQueue + Send + Sync,
    D: Driver<ClientHost<Q>> + Send,
    R: Runtime + Send + Sync,
{
    fn internal_ipv4(&self) -> Option<Ipv4Addr> {
        self.lock().host.client.internal_ipv4()
    }

    fn internal_ipv6(&self) -> Option<Ipv6Addr> {
        self.lock().host.client.internal_ipv6()
    }

    fn tunnel_id(&self) -> Option<u64> {
        self.lock().host.client.tunnel_id()
    }

    fn observed_address(&self) -> Option<SocketAddr> {
        self.lock().host.info()?.observed_address
    }

    fn info(&self) -> Option<TunnelInfo> {
        self.lock().host.info().cloned()
    }

    fn state(&self) -> ClientState {
        self.lock().host.state()
    }

    fn stats(&self) -> TunnelStats {
        self.lock().host.stats()
    }

    fn peer_path(&self, peer: IpAddr) -> PeerPath {
        self.lock().host.peer_path(peer)
    }

    fn peer_tunnels(&self) -> Vec<PeerTunnelInfo> {
        self.lock().host.peer_tunnels()
    }

    fn release_peer_tunnel(&self, peer: IpAddr) {
        self.drive(|host, _, now| host.release_peer_tunnel(now, peer));
    }

    fn block_peer_traffic(&self, blocked: bool) {
        self.lock().host.set_peer_blocked(blocked);
    }

    fn drop_peer_streams(&self) {
        self.drive(|host, _, now| host.drop_peer_streams(now));
    }
}

impl<W, D, R> Shared<ClientHost<inner::SocketQueue<W>>, D, R>
where
    W: inner::Ready + Default + Send + Sync + 'static,
    D: Driver<ClientHost<inner::SocketQueue<W>>> + Send + 'static,
    R: Runtime + Send + Sync + 'static,
{
    /// An inner UDP socket on `port` of the tunnel's internal address (0 picks a free one
    /// from 49152 up).
    pub fn bind_socket(self: &Arc<Self>, port: u16) -> io::Result<inner::Socket<W>> {
        let (port, queue) = self.lock().host.bind(port, inner::SocketQueue::new)?;
        Ok(inner::Socket::new(port, queue, self.clone()))
    }
}

/// An inner socket's calls go to the tunnel's host behind the runtime's lock.
impl<Q, D, R> SocketHost for Shared<ClientHost<Q>, D, R>
where
    Q: DatagramQueue + Send + Sync,
    D: Driver<ClientHost<Q>> + Send,
    R: Runtime + Send + Sync,
{
    fn send_to(&self, port: u16, dst: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
        self.drive(|host, _, now| host.send_to(now, port, dst, payload))
    }

    fn send_many(
        &self,
        port: u16,
        dst: SocketAddr,
        payloads: &mut dyn Iterator<Item = &[u8]>,
    ) -> std::io::Result<usize> {
        self.drive(|host, _, now| {
            let mut sent = 0;
            for payload in payloads {
                match host.send_to(now, port, dst, payload) {
                    Ok(()) => sent += 1,
                    Err(e) if sent == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(sent)
        })
    }

    fn set_peer_tunneling(&self, port: u16, enabled: bool) {
        self.drive(|host, _, _| host.set_peer_tunneling(port, enabled));
    }

    fn local_addr(&self, port: u16) -> std::io::Result<SocketAddr> {
        self.lock().host.local_addr(port)
    }

    fn unbind(&self, port: u16) {
        self.lock().host.unbind(port);
    }
}

/// An inner stream's or listener's calls go to the tunnel's TCP stack behind the runtime's
/// lock; each is followed by a drain, which runs the stack.
impl<Q, D, R> TcpHost for Shared<ClientHost<Q>, D, R>
where
    Q: DatagramQueue + Send + Sync,
    D: Driver<ClientHost<Q>> + Send,
    R: Runtime + Send + Sync,
{
    fn connect(&self, dst: SocketAddr, ready: Arc<dyn inner::Ready>) -> io::Result<TcpId> {
        self.drive(|host, _, now| {
            host.advance(now);
            host.tcp.connect(now, &host.client, dst, ready)
        })
    }

    fn connected(&self, id: TcpId) -> io::Result<Option<()>> {
        self.lock().host.tcp.connected(id)
    }

    fn listen(&self, port: u16, ready: Arc<dyn inner::Ready>) -> io::Result<u16> {
        self.drive(|host, _, _| host.tcp.listen(port, ready))
    }

    fn accept(&self, port: u16, ready: Arc<dyn inner::Ready>) -> io::Result<Option<TcpId>> {
        self.drive(|host, _, _| host.tcp.accept(port, ready))
    }

    fn unlisten(&self, port: u16) {
        self.drive(|host, _, _| {
            host.tcp.unlisten(port);
            host.client
                .set_peer_tunneling(port, host.settings.default_opt_in);
        });
    }

    fn recv(&self, id: TcpId, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.drive(|host, _, _| host.tcp.recv(id, buf))
    }

    fn send(&self, id: TcpId, buf: &[u8]) -> io::Result<Option<usize>> {
        self.drive(|host, _, _| host.tcp.send(id, buf))
    }

    fn shutdown(&self, id: TcpId, how: std::net::Shutdown) -> io::Result<()> {
        self.drive(|host, _, _| host.tcp.shutdown(id, how))
    }

    fn addrs(&self, id: TcpId) -> io::Result<(SocketAddr, SocketAddr)> {
        self.lock().host.tcp.addrs(id)
    }

    fn close(&self, id: TcpId) {
        self.drive(|host, _, now| host.tcp.close(now, id));
    }

    fn set_peer_tunneling(&self, port: u16, enabled: bool) {
        self.drive(|host, _, _| host.set_peer_tunneling(port, enabled));
    }

    fn local_addr(&self, port: u16) -> io::Result<SocketAddr> {
        self.lock().host.local_addr(port)
    }
}

impl<Q, D, R> Shared<ClientHost<Q>, D, R>
where
    Q: DatagramQueue + Send + Sync + 'static,
    D: Driver<ClientHost<Q>> + Send + 'static,
    R: Runtime + Send + Sync + 'static,
{
    /// Starts an inner TCP connection to `dst`; the runtime waits for
    /// [`inner::Stream::try_connected`].
    pub fn tcp_connect<W: inner::Ready + Default + 'static>(
        self: &Arc<Self>,
        dst: SocketAddr,
    ) -> io::Result<inner::Stream<W>> {
        inner::Stream::connect(self.clone(), dst)
    }

    /// An inner TCP listener on `port` of the tunnel's internal addresses (0 picks a free
    /// one from 49152 up).
    pub fn tcp_listen<W: inner::Ready + Default + 'static>(
        self: &Arc<Self>,
        port: u16,
    ) -> io::Result<inner::Listener<W>> {
        inner::Listener::bind(self.clone(), port)
    }
}

/// The source address a tapped packet is queued with: the packet says it.
const TAPPED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// The destination port of an inner TCP packet (IPv4, or IPv6 without extension headers).
fn tcp_port(packet: &[u8]) -> Option<u16> {
    let packet = crate::wire::InnerPacket::parse(packet).ok()?;
    if packet.protocol() != etherparse::IpNumber::TCP.0 {
        return None;
    }
    packet.ports().map(|(_, dst)| dst)
}

/// The host candidates of a peer socket bound to `local`: its address, or when it is bound to
/// the unspecified address, the address the system routes from (`route_source`).
fn host_candidates(local: SocketAddr, route_source: Option<IpAddr>) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    route_source
        .map(|ip| SocketAddr::new(ip, local.port()))
        .into_iter()
        .collect()
}

fn unsupported(what: &str) -> ConnectError {
    ConnectError::Io(io::Error::new(io::ErrorKind::Unsupported, what.to_owned()))
}

/// The earlier of two deadlines, either of which may be unset.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The unspecified address of `addr`'s family, port 0: where a socket talking to `addr`
/// binds.
pub fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A fingerprint's octets, for the [`TunnelEvent`]s that carry them.
pub fn fingerprint_octets(fingerprint: Fingerprint) -> [u8; 32] {
    fingerprint.0
}

impl<Q: DatagramQueue> crate::io::Host for ClientHost<Q> {
    type Event = TunnelEvent;

    fn handle_input(&mut self, now: Instant, input: Input<'_>) {
        ClientHost::handle_input(self, now, input);
    }

    fn handle_timeout(&mut self, now: Instant) {
        ClientHost::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        ClientHost::poll_transmit(self, now, buf)
    }

    fn poll_event(&mut self) -> Option<TunnelEvent> {
        ClientHost::poll_event(self)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        ClientHost::poll_timeout(self)
    }

    fn take_output(&mut self, _now: Instant, stream: StreamId, out: &mut Vec<u8>) -> bool {
        ClientHost::take_output(self, stream, out)
    }

    fn io_event(event: TunnelEvent) -> Result<IoEvent, TunnelEvent> {
        match event {
            TunnelEvent::Io(io) => Ok(io),
            other => Err(other),
        }
    }

    fn accept(&mut self, now: Instant, _: Transport, remote: SocketAddr) -> Option<StreamId> {
        self.accept_peer_stream(now, remote)
    }
}
