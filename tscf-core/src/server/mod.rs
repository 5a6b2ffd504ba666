//! The tunnel server, sans-IO: a [`SessionDirector`] behind its listeners.
//!
//! [`ServerHost`] makes every decision a server takes about its sockets, so that a runtime
//! only moves bytes (the contract is in [`crate::io`]):
//!
//! - **UDP listeners** (`docs/PROTOCOL.md` §2.4): a STUN Binding request is answered, a tscf
//!   envelope goes to the director connection of its source address (a new address becomes a
//!   new connection), anything else is dropped and counted.
//! - **DTLS listeners**: one [`DtlsEndpoint`] each, with a stateless cookie exchange before
//!   any state is kept; each association is one director connection, and each record's
//!   payload one envelope.
//! - **Stream connections** (TCP, TLS, QUIC): admission at accept (at most
//!   [`ServerConfig::max_stream_connections`] held, handshakes included), a handshake deadline
//!   (the director's pending timeout), the stream cut into envelopes (lost framing closes it),
//!   a bounded queue of envelopes per connection that the runtime's writer takes in one piece,
//!   a deadline on each write (a peer that stops reading loses its slot), and a grace period
//!   after the server closes a connection. On QUIC, data envelopes go as QUIC datagrams and
//!   control envelopes on the stream; past [`ServerConfig::quic_retry_above`] handshakes in
//!   progress, new clients must prove their address with a Retry first.
//!
//! - **In a cluster** (`DirectorConfig::cluster`, `docs/CLUSTER.md`): the director's registry
//!   requests leave as [`ServerEvent::Registry`] and their answers come back through
//!   [`handle_registry`](ServerHost::handle_registry); a mesh link it asks for is dialed as a
//!   TLS stream ([`ServerConfig::mesh_client`], the other director's name as server name), and
//!   one a mesh listener accepted enters through [`accept_mesh`](ServerHost::accept_mesh).
//!   Mesh links are streams like the others, save that they count against no source's bound,
//!   are never evicted as unconfigured, and have no pending timeout once open.
//!
//! Drive it as every host: after any input (`handle_input`, `accept_stream`, `accept_quic`,
//! `handle_timeout`, `shutdown`, `cut_connection`), drain [`poll_transmit`](ServerHost::poll_transmit)
//! and [`poll_event`](ServerHost::poll_event) until both return `None`, then arm a timer for
//! [`poll_timeout`](ServerHost::poll_timeout).
//!
//! **No network input makes any function here panic**, and none grows memory without bound.

mod config;
mod remotes;
mod stats;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use rustc_hash::FxHashMap;

pub use config::{LocalAddrs, ServerConfig, ServerCredentials, StartError};
pub use stats::{ServerStats, TransportCounters};

use crate::cluster::{DirectorName, RegistryRequest, RegistryResponse, RequestId};
use crate::director::{
    ConnectionHandle, ConnectionInfo, DirectorConfigError, DirectorEvent, SessionDirector,
    TunnelSummary,
};
use crate::dtls::{self, DtlsEndpoint, DtlsEvent, DtlsLimits};
use crate::io::{
    Capture, CapturedEnvelope, ClientTls, CloseReason, Connect, Direction, Input, IoEvent,
    Security, SocketId, StreamError, StreamId, StreamOutput, Transmit,
};
use crate::stun;
use crate::wire::{DatagramKind, EnvelopeType, StreamDeframer, Transport, ENVELOPE_HEADER_LEN};
use remotes::Remotes;

/// STUN answers waiting to be sent, at most; beyond, requests are dropped and counted.
const MAX_ANSWERS: usize = 256;

/// What a [`ServerHost`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// Something for the runtime's sockets and streams to do.
    Io(IoEvent),
    /// What the director did (for the log); the host has already acted on it.
    Director(DirectorEvent),
    /// In a cluster: a request for the registry. Execute it and hand the answer to
    /// [`ServerHost::handle_registry`] with the same `id` (a `Failed` answer if the registry
    /// cannot be reached); answers may come in any order.
    Registry {
        /// Names the request.
        id: RequestId,
        /// The request.
        request: RegistryRequest,
    },
}

/// What [`ServerHost::accept_quic`] decides for a QUIC client whose Initial arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicAdmission {
    /// Run the handshake; the connection is this stream.
    Accept(StreamId),
    /// Send a Retry: the client must prove its address first.
    Retry,
    /// Refuse it (too many connections, or the server is stopping).
    Refuse,
}

/// The certificate DTLS listeners present, and how they check client certificates.
#[derive(Clone)]
pub struct DtlsListenerConfig {
    /// The certificate and its key.
    pub certificate: dtls::Certificate,
    /// How a client certificate is checked (none without a client CA).
    pub client_check: dtls::ClientCheck,
}

impl std::fmt::Debug for DtlsListenerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsListenerConfig").finish_non_exhaustive()
    }
}

/// A tunnel server's director and everything it decides about its sockets. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct ServerHost {
    director: SessionDirector,
    bounds: Bounds,
    /// The datagram listeners, indexed by [`SocketId`].
    listeners: Vec<Listener>,
    remotes: Remotes,
    /// Keyed by handles the host hands out itself, so a fast unkeyed hash will do.
    routes: FxHashMap<ConnectionHandle, Route>,
    next_handle: u64,
    /// Stream connections held: accepted and not yet reported closed.
    streams: usize,
    udp_remotes: usize,
    dtls_remotes: usize,
    quic_handshaking: usize,
    /// Unconfigured stream connections, oldest first (may hold handles since configured or
    /// gone, at most about as many as there are unconfigured ones).
    unconfigured: VecDeque<ConnectionHandle>,
    /// Unconfigured stream connections per source ([`source_of`]).
    by_source: FxHashMap<IpAddr, u32>,
    unconfigured_count: usize,
    timers: BinaryHeap<Reverse<(Instant, StreamTimer)>>,
    answers: VecDeque<(SocketId, SocketAddr, Vec<u8>)>,
    events: VecDeque<ServerEvent>,
    counters: TransportCounters,
    /// Whether DTLS client certificates are checked against a CA (so that one presented is
    /// a verified identity).
    dtls_verifies_clients: bool,
    /// Where relayed packets and envelopes are shown, if anywhere.
    capture: Option<Capture>,
    /// The local address of each datagram listener, indexed by [`SocketId`] (for captures).
    datagram_local: Vec<SocketAddr>,
    stopped: bool,
    /// Latest time seen.
    now: Instant,
    /// How mesh links to other directors are dialed (TLS client settings; the peer's name is
    /// the server name).
    mesh_client: Option<ClientTls>,
}

/// The bounds of [`ServerConfig`] the host enforces.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    max_streams: usize,
    stream_queue_bytes: usize,
    handshake_timeout: Duration,
    write_timeout: Duration,
    close_grace: Duration,
    shutdown_grace: Duration,
    quic_retry_above: usize,
    max_unconfigured_per_source: usize,
}

#[derive(Debug)]
enum Listener {
    Udp,
    Dtls(Box<DtlsEndpoint>),
}

/// How envelopes reach a connection.
#[derive(Debug)]
enum Route {
    Udp {
        socket: SocketId,
        remote: SocketAddr,
    },
    Dtls {
        socket: SocketId,
        remote: SocketAddr,
    },
    Stream(Box<Stream>),
}

#[derive(Debug)]
struct Stream {
    transport: Transport,
    remote: SocketAddr,
    state: StreamState,
    deframer: StreamDeframer,
    output: StreamOutput,
    /// When the runtime took the bytes it is writing now.
    write_started: Option<Instant>,
    /// A write timer is in the heap.
    write_timer: bool,
    /// Not configured yet: counted in its source's unconfigured connections.
    unconfigured: bool,
    /// What the stream carries.
    role: Role,
}

/// What a stream connection carries.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    /// A client's tunnel.
    Client,
    /// A mesh link this server dialed to the director named.
    MeshDialed(DirectorName),
    /// A mesh link another director dialed (named by its Hello).
    MeshAccepted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamState {
    /// Accepted; the TLS or QUIC handshake runs. The director does not know it yet.
    Handshaking,
    /// A director connection.
    Open,
    /// Closed by the host; the director has forgotten it and the runtime has not reported
    /// it closed yet.
    Closing,
}

/// Deadlines of stream connections; checked against the stream's state when they fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum StreamTimer {
    Handshake(ConnectionHandle),
    Write(ConnectionHandle),
    Close(ConnectionHandle),
}

impl ServerHost {
    /// A host for the listeners bound at `local` (their ports resolved), with `dtls` for the
    /// DTLS listeners (required when there are any). The director's seed also keys the table
    /// of remote addresses and the DTLS cookies, from generator streams of their own.
    pub fn new(
        config: ServerConfig,
        local: &LocalAddrs,
        dtls: Option<&DtlsListenerConfig>,
        now: Instant,
    ) -> Result<Self, StartError> {
        let director = SessionDirector::new(local.director_config(&config.director))?;
        let mut rng = ChaCha20Rng::from_seed(config.director.rng_seed);
        // The director draws from stream 0 of the same seed; the host's keys come from stream 1.
        rng.set_stream(1);
        let limits = DtlsLimits {
            max_half_open: config.dtls_max_half_open.max(1),
            handshake_timeout: config.dtls_handshake_timeout,
            cookie_lifetime: config.dtls_cookie_lifetime,
        };
        let mut listeners: Vec<Listener> = local.udp.iter().map(|_| Listener::Udp).collect();
        for addr in &local.dtls {
            let dtls = dtls.ok_or(StartError::MissingTls)?;
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            let acceptor =
                dtls::Acceptor::new(dtls.certificate.clone(), dtls.client_check.clone(), secret)
                    .map_err(|e| StartError::Tls(e.into()))?;
            let mut endpoint = DtlsEndpoint::new(*addr, limits);
            endpoint.set_acceptor(Some(acceptor));
            listeners.push(Listener::Dtls(Box::new(endpoint)));
        }
        let keys = (rng.next_u64(), rng.next_u64());
        if config.max_stream_connections == 0 || config.stream_queue_bytes == 0 {
            return Err(StartError::Director(DirectorConfigError::Invalid(
                "max_stream_connections and stream_queue_bytes must be positive",
            )));
        }
        Ok(Self {
            bounds: Bounds {
                max_streams: config.max_stream_connections,
                stream_queue_bytes: config.stream_queue_bytes,
                handshake_timeout: config.director.pending_timeout,
                write_timeout: config.stream_write_timeout,
                close_grace: config.close_grace,
                shutdown_grace: config.shutdown_grace,
                quic_retry_above: config.quic_retry_above,
                max_unconfigured_per_source: config.max_unconfigured_per_source.max(1),
            },
            now,
            director,
            listeners,
            remotes: Remotes::new(keys),
            routes: FxHashMap::default(),
            next_handle: 0,
            streams: 0,
            udp_remotes: 0,
            dtls_remotes: 0,
            quic_handshaking: 0,
            unconfigured: VecDeque::new(),
            by_source: FxHashMap::default(),
            unconfigured_count: 0,
            timers: BinaryHeap::new(),
            answers: VecDeque::new(),
            events: VecDeque::new(),
            counters: TransportCounters::default(),
            dtls_verifies_clients: dtls
                .is_some_and(|d| matches!(d.client_check, dtls::ClientCheck::Roots(_))),
            capture: config.capture,
            datagram_local: local.udp.iter().chain(&local.dtls).copied().collect(),
            stopped: false,
            mesh_client: config.mesh_client,
        })
    }

    // ---- runtime → host ----

    /// A listener accepted a TCP connection from `remote`, for `transport` (TCP or TLS). Its
    /// stream id, or `None` if it must be closed at once (counted): the server holds
    /// `max_stream_connections` already, or is stopping. Run the TLS handshake, then report
    /// [`Input::StreamOpen`] (at once for plain TCP) or [`Input::StreamClosed`]; a handshake
    /// still running at the director's pending timeout is cut.
    pub fn accept_stream(
        &mut self,
        now: Instant,
        transport: Transport,
        remote: SocketAddr,
    ) -> Option<StreamId> {
        self.advance(now);
        if !self.admissible(remote) || !self.make_room(now) {
            return None;
        }
        Some(self.open_stream(now, transport, remote))
    }

    /// Whether a new stream connection from `remote` may be considered: the server runs, and
    /// the source holds fewer unconfigured connections than its bound. Counts a refusal.
    fn admissible(&mut self, remote: SocketAddr) -> bool {
        if self.stopped {
            self.counters.streams_refused += 1;
            return false;
        }
        let held = self.by_source.get(&source_of(remote)).copied().unwrap_or(0);
        if held as usize >= self.bounds.max_unconfigured_per_source {
            self.counters.streams_refused_per_source += 1;
            return false;
        }
        true
    }

    /// Whether a stream slot is free, after closing the oldest unconfigured connection if
    /// all are taken. Counts a refusal.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.streams < self.bounds.max_streams {
            return true;
        }
        while let Some(oldest) = self.unconfigured.pop_front() {
            let evictable = matches!(
                self.routes.get(&oldest),
                Some(Route::Stream(s)) if s.unconfigured && s.state != StreamState::Closing
            );
            if evictable {
                self.counters.streams_evicted += 1;
                self.close_connection(now, oldest, true, CloseReason::Reclaimed);
                return true;
            }
        }
        self.counters.streams_refused += 1;
        false
    }

    fn open_stream(&mut self, now: Instant, transport: Transport, remote: SocketAddr) -> StreamId {
        let handle = self.insert_stream(now, transport, remote, Role::Client);
        *self.by_source.entry(source_of(remote)).or_default() += 1;
        self.unconfigured_count += 1;
        if self.unconfigured.len() >= 2 * self.unconfigured_count + 64 {
            let routes = &self.routes;
            self.unconfigured
                .retain(|h| matches!(routes.get(h), Some(Route::Stream(s)) if s.unconfigured));
        }
        self.unconfigured.push_back(handle);
        StreamId(handle.0)
    }

    /// A new stream in its handshake, under the handshake deadline: a client's, unconfigured
    /// until its tunnel is (the caller counts it against its source), or a mesh link, which
    /// never is.
    fn insert_stream(
        &mut self,
        now: Instant,
        transport: Transport,
        remote: SocketAddr,
        role: Role,
    ) -> ConnectionHandle {
        self.counters.streams_accepted += 1;
        self.streams += 1;
        let handle = self.fresh_handle();
        let unconfigured = matches!(role, Role::Client);
        self.routes.insert(
            handle,
            Route::Stream(Box::new(Stream {
                transport,
                remote,
                state: StreamState::Handshaking,
                deframer: StreamDeframer::new(),
                output: StreamOutput::default(),
                write_started: None,
                write_timer: false,
                unconfigured,
                role,
            })),
        );
        let at = after(now, self.bounds.handshake_timeout);
        self.timers
            .push(Reverse((at, StreamTimer::Handshake(handle))));
        handle
    }

    /// An unconfigured stream connection from `remote` is configured, or gone: it no longer
    /// counts against its source's bound.
    fn settle(&mut self, remote: SocketAddr) {
        self.unconfigured_count -= 1;
        let source = source_of(remote);
        if let Some(held) = self.by_source.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// A mesh listener accepted a TCP connection from another director at `remote`: its
    /// stream id, or `None` if it must be closed at once (the server is stopping, or all
    /// stream slots are taken by configured connections). Run the TLS handshake, verifying
    /// the client certificate as a director's, then report [`Input::StreamOpen`] or
    /// [`Input::StreamClosed`] as for any stream. A mesh link counts against no source's
    /// unconfigured connections, is never evicted as unconfigured, and has no pending timeout
    /// once open.
    pub fn accept_mesh(&mut self, now: Instant, remote: SocketAddr) -> Option<StreamId> {
        self.advance(now);
        if self.stopped {
            self.counters.streams_refused += 1;
            return None;
        }
        if !self.make_room(now) {
            return None;
        }
        Some(self.open_mesh_stream(now, remote, Role::MeshAccepted))
    }

    /// The registry's answer to request `id` ([`ServerEvent::Registry`]).
    pub fn handle_registry(&mut self, now: Instant, id: RequestId, response: RegistryResponse) {
        self.advance(now);
        self.director.handle_registry(now, id, response);
    }

    fn open_mesh_stream(&mut self, now: Instant, remote: SocketAddr, role: Role) -> StreamId {
        StreamId(self.insert_stream(now, Transport::TLS, remote, role).0)
    }

    /// Dials a mesh link to director `name` at `addr`, as the director asked.
    fn dial_mesh(&mut self, name: DirectorName, addr: SocketAddr) {
        let Some(tls) = self.mesh_client.clone() else {
            return;
        };
        let Ok(server_name) = rustls::pki_types::ServerName::try_from(name.as_str().to_owned())
        else {
            return;
        };
        if self.stopped || self.streams >= self.bounds.max_streams {
            self.counters.streams_refused += 1;
            return;
        }
        let stream = self.open_mesh_stream(self.now, addr, Role::MeshDialed(name));
        let security = Security::Tls(ClientTls {
            config: tls.config,
            name: server_name,
        });
        self.events
            .push_back(ServerEvent::Io(IoEvent::Connect(Connect {
                stream,
                to: addr,
                security,
                timeout: self.bounds.handshake_timeout,
            })));
    }

    /// A QUIC listener received the first packet of a new connection from `remote`;
    /// `validated` says whether the client has proved its address (a Retry token). On
    /// [`QuicAdmission::Accept`], run the handshake and report as for
    /// [`accept_stream`](Self::accept_stream).
    pub fn accept_quic(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        validated: bool,
    ) -> QuicAdmission {
        self.advance(now);
        if !self.admissible(remote) {
            return QuicAdmission::Refuse;
        }
        // Past the threshold a client must show it receives at its address before it gets
        // handshake state: a Retry costs the server nothing to remember.
        if !validated && self.quic_handshaking >= self.bounds.quic_retry_above {
            self.counters.quic_retries += 1;
            return QuicAdmission::Retry;
        }
        if !self.make_room(now) {
            return QuicAdmission::Refuse;
        }
        self.quic_handshaking += 1;
        QuicAdmission::Accept(self.open_stream(now, Transport::QUIC, remote))
    }

    /// Something happened on a socket or stream; see [`Input`].
    pub fn handle_input(&mut self, now: Instant, input: Input<'_>) {
        self.advance(now);
        match input {
            Input::Datagram { socket, from, data } => self.on_datagram(now, socket, from, data),
            Input::StreamOpen {
                stream,
                verified_identity,
            } => self.on_stream_open(now, stream, verified_identity),
            Input::StreamData { stream, data } => self.on_stream_data(now, stream, data),
            Input::StreamDatagram { stream, data } => {
                let handle = ConnectionHandle(stream.0);
                if self.is_open(handle) {
                    self.captured(now, Direction::Received, handle, data);
                    self.counters.quic_datagrams_received += 1;
                    self.director.handle_datagram(now, handle, data);
                }
            }
            Input::StreamClosed { stream, error, .. } => self.on_stream_closed(now, stream, error),
            Input::SendFailed => self.counters.udp_send_errors += 1,
            Input::QuicFallback { stream, envelope } => {
                self.counters.quic_datagrams_sent =
                    self.counters.quic_datagrams_sent.saturating_sub(1);
                self.queue_on_stream(ConnectionHandle(stream.0), envelope);
            }
            // A server binds all its sockets at start and runs no peer sessions.
            Input::SocketBound { .. }
            | Input::SocketFailed { .. }
            | Input::SessionOpen { .. }
            | Input::SessionClosed { .. }
            | Input::SessionStream { .. }
            | Input::SessionData { .. } => {}
        }
    }

    /// Runs what is due at `now`: the director's timers, the DTLS handshakes' and the
    /// streams' deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        self.director.handle_timeout(now);
        for i in 0..self.listeners.len() {
            if let Listener::Dtls(endpoint) = &mut self.listeners[i] {
                endpoint.handle_timeout(now);
                self.dtls_events(now, SocketId(i as u32));
            }
        }
        while let Some(&Reverse((at, timer))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.stream_timer(now, timer);
        }
    }

    /// Hands the runtime everything waiting for `stream` in `out` (its old contents are
    /// dropped), after [`IoEvent::StreamReady`] and again after each write completes; false
    /// when nothing waits (then wait for the next `StreamReady`, or close the stream if it is
    /// being closed). The time between taking bytes and asking again is the write the
    /// `stream_write_timeout` bounds.
    pub fn take_output(&mut self, now: Instant, stream: StreamId, out: &mut Vec<u8>) -> bool {
        self.advance(now);
        let handle = ConnectionHandle(stream.0);
        let Some(Route::Stream(s)) = self.routes.get_mut(&handle) else {
            out.clear();
            return false;
        };
        if !s.output.take(out) {
            s.write_started = None;
            return false;
        }
        s.write_started = Some(now);
        if !s.write_timer {
            s.write_timer = true;
            let at = after(now, self.bounds.write_timeout);
            self.timers.push(Reverse((at, StreamTimer::Write(handle))));
        }
        true
    }

    /// Closes every tunnel with reason Shutdown (`SessionDirector::shutdown`), which sends the
    /// release notifications and closes their connections once written (on datagram
    /// transports: once acknowledged, retransmitting meanwhile); closes every other
    /// connection, and refuses new ones. A runtime then keeps driving the host until
    /// [`is_drained`](Self::is_drained), for [`shutdown_grace`](Self::shutdown_grace) at most.
    pub fn shutdown(&mut self, now: Instant) {
        self.advance(now);
        self.stopped = true;
        let with_tunnel: Vec<ConnectionHandle> = self
            .director
            .tunnels()
            .filter_map(|t| t.connection)
            .collect();
        self.director.shutdown(now);
        let others: Vec<ConnectionHandle> = self
            .routes
            .keys()
            .filter(|h| !with_tunnel.contains(h))
            .copied()
            .collect();
        for handle in others {
            self.close_connection(now, handle, false, CloseReason::Shutdown);
        }
    }

    /// Cuts the connection that carries `tunnel_id`, as a network failure would: a stream is
    /// aborted (no TLS close_notify, nothing more written), a DTLS association dropped after a
    /// `close_notify` (so that the client notices at once). The tunnel becomes persistent.
    /// False if the tunnel is unknown, persistent, or on UDP. For tests and operators.
    pub fn cut_connection(&mut self, now: Instant, tunnel_id: u64) -> bool {
        self.advance(now);
        let Some(handle) = self
            .director
            .tunnels()
            .find(|t| t.tunnel_id == tunnel_id)
            .and_then(|t| t.connection)
        else {
            return false;
        };
        match self.routes.get(&handle) {
            Some(Route::Stream(_) | Route::Dtls { .. }) => {
                self.close_connection(now, handle, true, CloseReason::Closed);
                true
            }
            _ => false,
        }
    }

    // ---- host → runtime ----

    /// Writes the next datagram to send into `buf` (replacing its contents) and says where it
    /// goes; `None` when nothing is due. Envelopes for stream connections are queued for
    /// their writers here ([`IoEvent::StreamReady`]).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.advance(now);
        loop {
            if let Some((socket, to, answer)) = self.answers.pop_front() {
                *buf = answer;
                return Some(Transmit::Datagram { socket, to });
            }
            for (i, listener) in self.listeners.iter_mut().enumerate() {
                if let Listener::Dtls(endpoint) = listener {
                    if let Some((to, datagram)) = endpoint.poll_transmit() {
                        buf.clear();
                        buf.extend_from_slice(&datagram);
                        let socket = SocketId(i as u32);
                        return Some(Transmit::Datagram { socket, to });
                    }
                }
            }
            let transmit = self.director.poll_transmit(now, buf)?;
            if self.capture.is_some() {
                self.captured(now, Direction::Sent, transmit.connection, buf);
                if buf.first() == Some(&EnvelopeType::DATA.0) {
                    let packet = buf.get(ENVELOPE_HEADER_LEN..).unwrap_or_default();
                    Capture::inner_packet(&self.capture, now, Direction::Sent, packet);
                }
            }
            match self.routes.get_mut(&transmit.connection) {
                Some(Route::Udp { socket, remote }) => {
                    return Some(Transmit::Datagram {
                        socket: *socket,
                        to: *remote,
                    });
                }
                Some(Route::Dtls { socket, remote }) => {
                    let (socket, remote) = (*socket, *remote);
                    if let Some(Listener::Dtls(endpoint)) =
                        self.listeners.get_mut(socket.0 as usize)
                    {
                        // A failed send drops the association and reports it as closed.
                        let _ = endpoint.send(now, remote, buf);
                    }
                    self.dtls_events(now, socket);
                }
                Some(Route::Stream(s)) if s.state == StreamState::Open => {
                    if s.transport == Transport::QUIC && buf.first() == Some(&EnvelopeType::DATA.0)
                    {
                        self.counters.quic_datagrams_sent += 1;
                        let stream = StreamId(transmit.connection.0);
                        return Some(Transmit::QuicDatagram { stream });
                    }
                    self.queue_on_stream(transmit.connection, buf);
                }
                // Closing, or already gone: the frame has nowhere to go.
                Some(Route::Stream(_)) | None => {
                    self.counters.sent_to_closed += 1;
                    self.director.undelivered(buf);
                }
            }
        }
    }

    /// The next event. The director's are acted on as they are drained, after the transmits
    /// queued before them: a connection the director closes gets its last envelopes first.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        let Some(event) = self.director.poll_event() else {
            let (id, request) = self.director.poll_registry()?;
            return Some(ServerEvent::Registry { id, request });
        };
        match event {
            DirectorEvent::CloseConnection { connection } => {
                // A director closes a connection that never configured only to reclaim its
                // slot (the pending timeout, or too many pending).
                let unconfigured = matches!(
                    self.routes.get(&connection),
                    Some(Route::Stream(s)) if s.unconfigured
                );
                let reason = match () {
                    _ if self.stopped => CloseReason::Shutdown,
                    _ if unconfigured => CloseReason::Reclaimed,
                    _ => CloseReason::Closed,
                };
                self.close_connection(self.now, connection, false, reason);
            }
            DirectorEvent::TunnelOpened { connection, .. }
            | DirectorEvent::TunnelReattached { connection, .. } => {
                if let Some(Route::Stream(s)) = self.routes.get_mut(&connection) {
                    if std::mem::take(&mut s.unconfigured) {
                        let remote = s.remote;
                        self.settle(remote);
                    }
                }
            }
            DirectorEvent::DialMesh { ref name, addr } => self.dial_mesh(name.clone(), addr),
            _ => {}
        }
        Some(ServerEvent::Director(event))
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let dtls = self.listeners.iter().filter_map(|l| match l {
            Listener::Dtls(endpoint) => endpoint.poll_timeout(),
            Listener::Udp => None,
        });
        let streams = self.timers.peek().map(|Reverse((at, _))| *at);
        self.director
            .poll_timeout()
            .into_iter()
            .chain(streams)
            .chain(dtls)
            .min()
    }

    /// How long a closed stream connection may take to write its last envelopes.
    pub fn close_grace(&self) -> Duration {
        self.bounds.close_grace
    }

    /// How long a runtime shutting down drives the host at most, waiting for
    /// [`is_drained`](Self::is_drained) ([`ServerConfig::shutdown_grace`]).
    pub fn shutdown_grace(&self) -> Duration {
        self.bounds.shutdown_grace
    }

    /// After [`shutdown`](Self::shutdown): whether every stream connection has closed and every
    /// Release Notification on a datagram transport was acknowledged (or given up after its
    /// last retransmission), so that the runtime may stop.
    pub fn is_drained(&self) -> bool {
        self.stopped && self.streams == 0 && self.director.notifications_outstanding() == 0
    }

    // ---- observability ----

    /// Current statistics.
    pub fn stats(&self) -> ServerStats {
        let mut stats = ServerStats {
            director: self.director.stats(),
            transport: self.counters.clone(),
            stream_connections: self.streams,
            udp_connections: self.udp_remotes,
            ..ServerStats::default()
        };
        stats.stream_queued_bytes = self
            .routes
            .values()
            .map(|r| match r {
                Route::Stream(s) => s.output.len(),
                _ => 0,
            })
            .sum();
        for listener in &self.listeners {
            if let Listener::Dtls(endpoint) = listener {
                let c = endpoint.counters();
                let t = &mut stats.transport;
                t.dtls_handshakes += c.handshakes;
                t.dtls_handshake_failures += c.handshake_failures;
                t.dtls_unknown_source += c.unknown_source;
                t.dtls_bad_records += c.bad_records;
                t.dtls_half_open_evicted += c.half_open_evicted;
                t.dtls_hello_verify_sent += c.hello_verify_sent;
                t.dtls_bad_cookies += c.bad_cookies;
                stats.dtls_associations += endpoint.established();
                stats.dtls_half_open += endpoint.half_open();
            }
        }
        stats
    }

    /// The tunnels the director holds.
    pub fn tunnels(&self) -> impl Iterator<Item = TunnelSummary> + '_ {
        self.director.tunnels()
    }

    /// The director, for what the host does not pass through.
    pub fn director(&self) -> &SessionDirector {
        &self.director
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    // ---- datagrams ----

    fn on_datagram(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        match self.listeners.get_mut(socket.0 as usize) {
            Some(Listener::Udp) => self.on_udp(now, socket, from, data),
            Some(Listener::Dtls(endpoint)) => {
                endpoint.handle_datagram(now, from, data);
                self.dtls_events(now, socket);
            }
            None => self.counters.udp_dropped += 1,
        }
    }

    /// One datagram on a UDP listener: STUN, an envelope, or noise (§2.4).
    fn on_udp(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        match DatagramKind::of(data) {
            DatagramKind::Stun => {
                let mut answer = Vec::new();
                let answered = stun::is_stun(data)
                    && stun::answer_binding_request(data, from, &mut answer).is_ok();
                if answered && self.answers.len() < MAX_ANSWERS {
                    self.counters.stun_answered += 1;
                    self.answers.push_back((socket, from, answer));
                } else {
                    self.counters.udp_dropped += 1;
                }
            }
            DatagramKind::Envelope => {
                let handle = match self.remotes.get(socket, from) {
                    Some(handle) => handle,
                    None if self.stopped => return,
                    None => {
                        let handle = self.fresh_handle();
                        self.remotes.insert(socket, from, handle);
                        self.udp_remotes += 1;
                        let route = Route::Udp {
                            socket,
                            remote: from,
                        };
                        self.routes.insert(handle, route);
                        let info = ConnectionInfo {
                            transport: Transport::UDP,
                            remote: from,
                            verified_identity: false,
                        };
                        // Handles are fresh, so the director cannot know this one.
                        let _ = self.director.handle_connect(now, handle, info);
                        handle
                    }
                };
                self.captured(now, Direction::Received, handle, data);
                self.director.handle_datagram(now, handle, data);
            }
            _ => self.counters.udp_dropped += 1,
        }
    }

    /// Acts on what DTLS listener `socket` reports.
    fn dtls_events(&mut self, now: Instant, socket: SocketId) {
        loop {
            let Some(Listener::Dtls(endpoint)) = self.listeners.get_mut(socket.0 as usize) else {
                return;
            };
            let Some(event) = endpoint.poll_event() else {
                return;
            };
            match event {
                DtlsEvent::HandshakeDone { peer, .. }
                    if self.dtls_remotes >= self.bounds.max_streams =>
                {
                    endpoint.close(now, peer);
                    self.counters.streams_refused += 1;
                }
                DtlsEvent::HandshakeDone {
                    peer,
                    peer_certificate,
                } => {
                    let handle = self.fresh_handle();
                    self.remotes.insert(socket, peer, handle);
                    self.dtls_remotes += 1;
                    self.routes.insert(
                        handle,
                        Route::Dtls {
                            socket,
                            remote: peer,
                        },
                    );
                    let info = ConnectionInfo {
                        transport: Transport::DTLS,
                        remote: peer,
                        // Without a client CA a certificate is not checked, so it proves
                        // nothing.
                        verified_identity: peer_certificate.is_some() && self.dtls_verifies_clients,
                    };
                    // Handles are fresh, so the director cannot know this one.
                    let _ = self.director.handle_connect(now, handle, info);
                }
                DtlsEvent::Data { peer, payload } => match self.remotes.get(socket, peer) {
                    Some(handle) => {
                        self.captured(now, Direction::Received, handle, &payload);
                        self.director.handle_datagram(now, handle, &payload);
                    }
                    None => self.counters.udp_dropped += 1,
                },
                DtlsEvent::Closed { peer } => {
                    if let Some(handle) = self.remotes.get(socket, peer) {
                        self.forget_remote(handle);
                        self.director.handle_disconnect(now, handle);
                    }
                }
                // Counted by the endpoint.
                DtlsEvent::HandshakeFailed { .. } => {}
            }
        }
    }

    // ---- streams ----

    fn on_stream_open(&mut self, now: Instant, stream: StreamId, verified_identity: bool) {
        let handle = ConnectionHandle(stream.0);
        let Some(Route::Stream(s)) = self.routes.get_mut(&handle) else {
            return;
        };
        if s.state != StreamState::Handshaking {
            return;
        }
        s.state = StreamState::Open;
        let mesh = match &s.role {
            Role::Client => None,
            Role::MeshDialed(name) => Some(Some(name.clone())),
            Role::MeshAccepted => Some(None),
        };
        if let Some(peer) = mesh {
            // Handles are fresh, so the director cannot know this one.
            let _ = self.director.handle_mesh_connect(now, handle, peer);
            return;
        }
        let info = ConnectionInfo {
            transport: s.transport,
            remote: s.remote,
            verified_identity,
        };
        if s.transport == Transport::QUIC {
            self.quic_handshaking = self.quic_handshaking.saturating_sub(1);
        }
        // Handles are fresh, so the director cannot know this one.
        let _ = self.director.handle_connect(now, handle, info);
    }

    fn on_stream_data(&mut self, now: Instant, stream: StreamId, data: &[u8]) {
        let handle = ConnectionHandle(stream.0);
        let Some(Route::Stream(s)) = self.routes.get_mut(&handle) else {
            return;
        };
        if s.state != StreamState::Open {
            return;
        }
        let (transport, remote) = (s.transport, s.remote);
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
                    // A whole envelope, as the deframer cut it.
                    self.director.handle_datagram(now, handle, envelope);
                }
                Ok(None) => break,
                Err(_) => framed = false,
            }
        }
        if !framed {
            self.counters.framing_errors += 1;
            self.close_connection(now, handle, true, CloseReason::ProtocolError);
        }
    }

    fn on_stream_closed(&mut self, now: Instant, stream: StreamId, error: Option<StreamError>) {
        let handle = ConnectionHandle(stream.0);
        let Some(Route::Stream(s)) = self.routes.remove(&handle) else {
            return;
        };
        if s.unconfigured {
            self.settle(s.remote);
        }
        self.streams = self.streams.saturating_sub(1);
        match s.state {
            StreamState::Handshaking => {
                if s.transport == Transport::QUIC {
                    self.quic_handshaking = self.quic_handshaking.saturating_sub(1);
                    self.counters.quic_handshake_failures += 1;
                } else if s.transport == Transport::TLS || error == Some(StreamError::Handshake) {
                    self.counters.tls_handshake_failures += 1;
                }
            }
            StreamState::Open => self.director.handle_disconnect(now, handle),
            StreamState::Closing => {}
        }
    }

    fn stream_timer(&mut self, now: Instant, timer: StreamTimer) {
        match timer {
            StreamTimer::Handshake(handle) => {
                let handshaking = matches!(
                    self.routes.get(&handle),
                    Some(Route::Stream(s)) if s.state == StreamState::Handshaking
                );
                if handshaking {
                    self.count_handshake_failure(handle);
                    self.close_connection(now, handle, true, CloseReason::Reclaimed);
                }
            }
            StreamTimer::Write(handle) => {
                let Some(Route::Stream(s)) = self.routes.get_mut(&handle) else {
                    return;
                };
                s.write_timer = false;
                let Some(started) = s.write_started else {
                    return;
                };
                let due = after(started, self.bounds.write_timeout);
                if due > now {
                    s.write_timer = true;
                    self.timers.push(Reverse((due, StreamTimer::Write(handle))));
                } else if s.state != StreamState::Closing {
                    self.counters.stream_write_timeouts += 1;
                    self.close_connection(now, handle, true, CloseReason::Reclaimed);
                }
            }
            StreamTimer::Close(handle) => {
                if let Some(Route::Stream(_)) = self.routes.get(&handle) {
                    self.counters.stream_close_timeouts += 1;
                    let stream = StreamId(handle.0);
                    self.events.push_back(ServerEvent::Io(IoEvent::CloseStream {
                        stream,
                        abort: true,
                        reason: CloseReason::Reclaimed,
                    }));
                }
            }
        }
    }

    // ---- helpers ----

    /// Appends `envelope` to what waits for open stream connection `handle`, within its
    /// bound (dropped and counted beyond).
    fn queue_on_stream(&mut self, handle: ConnectionHandle, envelope: &[u8]) {
        let Some(Route::Stream(s)) = self.routes.get_mut(&handle) else {
            return;
        };
        if s.state != StreamState::Open {
            self.counters.sent_to_closed += 1;
            return self.director.undelivered(envelope);
        }
        let was_idle = s.output.is_empty() && !s.output.in_flight();
        if !s.output.push(envelope, self.bounds.stream_queue_bytes) {
            self.counters.stream_queue_full += 1;
            self.director.undelivered(envelope);
        } else if was_idle {
            let stream = StreamId(handle.0);
            self.events
                .push_back(ServerEvent::Io(IoEvent::StreamReady { stream }));
        }
    }

    /// Counts the handshake of stream connection `handle` as failed.
    fn count_handshake_failure(&mut self, handle: ConnectionHandle) {
        if let Some(Route::Stream(s)) = self.routes.get(&handle) {
            match s.transport {
                Transport::QUIC => self.counters.quic_handshake_failures += 1,
                _ => self.counters.tls_handshake_failures += 1,
            }
        }
    }

    /// Ends `handle` on the host's side: the director forgets it (if it still knows it), a
    /// stream is closed (at once with `abort`, else after its queued envelopes) for `reason`,
    /// a DTLS association closed, a UDP remote forgotten.
    fn close_connection(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        abort: bool,
        reason: CloseReason,
    ) {
        match self.routes.get_mut(&handle) {
            Some(Route::Stream(s)) => {
                if s.state == StreamState::Closing && !abort {
                    return;
                }
                let was_open = s.state == StreamState::Open;
                if s.state == StreamState::Handshaking && s.transport == Transport::QUIC {
                    self.quic_handshaking = self.quic_handshaking.saturating_sub(1);
                }
                s.state = StreamState::Closing;
                let stream = StreamId(handle.0);
                self.events.push_back(ServerEvent::Io(IoEvent::CloseStream {
                    stream,
                    abort,
                    reason,
                }));
                let at = after(now, self.bounds.close_grace);
                self.timers.push(Reverse((at, StreamTimer::Close(handle))));
                if was_open {
                    self.director.handle_disconnect(now, handle);
                }
            }
            Some(&mut Route::Dtls { socket, remote }) => {
                if let Some(Listener::Dtls(endpoint)) = self.listeners.get_mut(socket.0 as usize) {
                    endpoint.close(now, remote);
                }
                self.forget_remote(handle);
                self.director.handle_disconnect(now, handle);
            }
            Some(Route::Udp { .. }) => {
                self.forget_remote(handle);
                self.director.handle_disconnect(now, handle);
            }
            None => {}
        }
    }

    /// Forgets the route of a UDP or DTLS connection (a stream's stays until the runtime
    /// reports it closed).
    fn forget_remote(&mut self, handle: ConnectionHandle) {
        match self.routes.get(&handle) {
            Some(&Route::Udp { socket, remote }) => {
                self.remotes.remove(socket, remote);
                self.udp_remotes = self.udp_remotes.saturating_sub(1);
            }
            Some(&Route::Dtls { socket, remote }) => {
                self.remotes.remove(socket, remote);
                self.dtls_remotes = self.dtls_remotes.saturating_sub(1);
            }
            Some(Route::Stream(_)) | None => return,
        }
        self.routes.remove(&handle);
    }

    /// Shows an envelope exchanged on `handle` to the capture, if there is one.
    fn captured(
        &self,
        now: Instant,
        direction: Direction,
        handle: ConnectionHandle,
        envelope: &[u8],
    ) {
        let Some(capture) = &self.capture else {
            return;
        };
        let (transport, local, remote) = match self.routes.get(&handle) {
            Some(&Route::Udp { socket, remote }) => (Transport::UDP, socket, remote),
            Some(&Route::Dtls { socket, remote }) => (Transport::DTLS, socket, remote),
            Some(Route::Stream(s)) => {
                let envelope = CapturedEnvelope {
                    direction,
                    transport: s.transport,
                    local: None,
                    remote: s.remote,
                    envelope,
                };
                capture.0.envelope(now, &envelope);
                return;
            }
            None => return,
        };
        let envelope = CapturedEnvelope {
            direction,
            transport,
            local: self.datagram_local.get(local.0 as usize).copied(),
            remote,
            envelope,
        };
        capture.0.envelope(now, &envelope);
    }

    fn is_open(&self, handle: ConnectionHandle) -> bool {
        matches!(self.routes.get(&handle), Some(Route::Stream(s)) if s.state == StreamState::Open)
    }

    fn fresh_handle(&mut self) -> ConnectionHandle {
        self.next_handle += 1;
        ConnectionHandle(self.next_handle)
    }

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }
}

/// `now + d`, saturating at `now` for instants near the end of time.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

/// What an operator reads and steers of a running server, whichever runtime drives it: each
/// runtime's `ServerHandle` dereferences to it.
pub trait ServerControl: Send + Sync {
    /// Current statistics.
    fn stats(&self) -> ServerStats;
    /// The tunnels the director holds.
    fn tunnels(&self) -> Vec<TunnelSummary>;
    /// Cuts the connection that carries `tunnel_id`, as a network failure would; see
    /// [`ServerHost::cut_connection`]. For tests and operators.
    fn cut_connection(&self, tunnel_id: u64) -> bool;
}

impl<D, R> ServerControl for crate::io::Shared<ServerHost, D, R>
where
    D: crate::io::Driver<ServerHost> + Send,
    R: crate::io::Runtime + Send + Sync,
{
    fn stats(&self) -> ServerStats {
        self.lock().host.stats()
    }

    fn tunnels(&self) -> Vec<TunnelSummary> {
        self.lock().host.tunnels().collect()
    }

    fn cut_connection(&self, tunnel_id: u64) -> bool {
        self.drive(|host, _, now| host.cut_connection(now, tunnel_id))
    }
}

impl crate::io::Host for ServerHost {
    type Event = ServerEvent;

    fn handle_input(&mut self, now: Instant, input: Input<'_>) {
        ServerHost::handle_input(self, now, input);
    }

    fn handle_timeout(&mut self, now: Instant) {
        ServerHost::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        ServerHost::poll_transmit(self, now, buf)
    }

    fn poll_event(&mut self) -> Option<ServerEvent> {
        ServerHost::poll_event(self)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        ServerHost::poll_timeout(self)
    }

    fn take_output(&mut self, now: Instant, stream: StreamId, out: &mut Vec<u8>) -> bool {
        ServerHost::take_output(self, now, stream, out)
    }

    fn io_event(event: ServerEvent) -> Result<IoEvent, ServerEvent> {
        match event {
            ServerEvent::Io(io) => Ok(io),
            other => Err(other),
        }
    }

    fn accept(
        &mut self,
        now: Instant,
        transport: Transport,
        remote: SocketAddr,
    ) -> Option<StreamId> {
        self.accept_stream(now, transport, remote)
    }
}

/// The source a connection from `remote` counts against: its IPv4 address, or the /64 of its
/// IPv6 address (one host or one site may hold a whole /64).
fn source_of(remote: SocketAddr) -> IpAddr {
    match remote.ip() {
        IpAddr::V4(ip) => IpAddr::V4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(ip) & !(u128::MAX >> 64)).into()),
        },
    }
}
