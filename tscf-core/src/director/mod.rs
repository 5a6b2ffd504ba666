//! The session director: the tunnel server's state machine (`docs/PROTOCOL.md` §3, §6).
//!
//! It assigns tunnels and internal addresses, keeps their life cycle (active → persistent →
//! closed), answers control messages and relays inner IP packets between tunnels. It never sees
//! a socket: the runtime names each transport connection with a [`ConnectionHandle`] of its
//! choosing and hands over whole envelopes.

mod cluster;
mod config;
mod control;
mod lifecycle;
mod mesh;
mod peer;
mod pool;
mod stats;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cluster;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use config::{
    Admission, DirectorConfig, DirectorConfigError, Ipv4Pool, Ipv6Pool, KeepaliveConfig,
    RetransmitConfig,
};
pub use stats::{
    ClusterCounters, DirectorStats, DropCounters, MeshDropCounters, PeerCounters, RefusalCounters,
    TransportTunnels,
};

use crate::cluster::{DirectorName, SALT_LEN};
use crate::wire::{
    Capabilities, ControlKey, Envelope, EnvelopeType, InnerPacket, Message, MessageType,
    ReplayWindow, ResultCode, Transport, ENVELOPE_HEADER_LEN,
};
use pool::AddressPool;

/// Names one transport connection (a TCP/TLS connection, a QUIC connection, or a UDP/DTLS
/// remote address). Chosen by the runtime; never reused while the director knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionHandle(pub u64);

/// A transport connection as the runtime describes it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo {
    /// Its transport.
    pub transport: Transport,
    /// The client's address as seen by the director (reported as Observed Address).
    pub remote: SocketAddr,
    /// Whether the runtime verified a client certificate on it (mutual TLS).
    pub verified_identity: bool,
}

/// One envelope for the runtime to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// The connection it goes out on.
    pub connection: ConnectionHandle,
}

/// What happened, for the runtime and the operator. Drained with
/// [`SessionDirector::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirectorEvent {
    /// A tunnel was created.
    TunnelOpened {
        /// Its id.
        tunnel_id: u64,
        /// Its internal IPv4 address.
        ipv4: Option<Ipv4Addr>,
        /// Its internal IPv6 address.
        ipv6: Option<Ipv6Addr>,
        /// The connection it runs on.
        connection: ConnectionHandle,
    },
    /// A persistent (or active) tunnel moved to a new connection.
    TunnelReattached {
        /// Its id.
        tunnel_id: u64,
        /// The new connection.
        connection: ConnectionHandle,
    },
    /// A tunnel followed its client to a new connection (on UDP: a new source address) on an
    /// authenticated request from there, without a Configuration exchange (roaming).
    TunnelMoved {
        /// Its id.
        tunnel_id: u64,
        /// The new connection.
        connection: ConnectionHandle,
    },
    /// A tunnel lost its transport and waits for a re-attach.
    TunnelPersistent {
        /// Its id.
        tunnel_id: u64,
    },
    /// A tunnel was closed and its addresses freed.
    TunnelClosed {
        /// Its id.
        tunnel_id: u64,
        /// Why: Success for a client release, Timeout, Administrative or Shutdown.
        reason: ResultCode,
    },
    /// The runtime must close this connection once the transmits queued before this event
    /// have been sent, and forget the handle.
    CloseConnection {
        /// The connection.
        connection: ConnectionHandle,
    },
    /// In a cluster: connect a mesh link to director `name` at `addr` (its mesh listener,
    /// mutually authenticated TLS, the name as the server name), then announce it with
    /// [`SessionDirector::handle_mesh_connect`]. Emitted once per director to link, and again
    /// at most once a heartbeat while it has no link.
    DialMesh {
        /// The director.
        name: DirectorName,
        /// Its mesh listener.
        addr: SocketAddr,
    },
    /// In a cluster: another director adopted this tunnel (its client re-attached there); it
    /// was dropped here without a Release Notification, and its connection closed.
    TunnelMovedAway {
        /// Its id.
        tunnel_id: u64,
        /// The director that holds it now.
        director: DirectorName,
    },
}

/// A tunnel the caller asked about does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no tunnel {0:#x}")]
pub struct UnknownTunnel(pub u64);

/// The runtime announced a connection handle twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("connection {0:?} is already known")]
pub struct DuplicateConnection(pub ConnectionHandle);

/// A read-only summary of one tunnel, for status output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSummary {
    /// Tunnel id.
    pub tunnel_id: u64,
    /// Internal IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Internal IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// The connection, or `None` while persistent.
    pub connection: Option<ConnectionHandle>,
    /// The transport it was last seen on.
    pub transport: Transport,
    /// Negotiated keepalive interval.
    pub keepalive: Duration,
    /// Capabilities the client announced.
    pub capabilities: Capabilities,
    /// Frames waiting to be sent to it.
    pub queued_frames: usize,
}

/// The tunnel server's state machine.
///
/// It has the shape of every state machine of the crate (see [the crate docs](crate)). Call
/// order: feed inputs with [`handle_connect`](Self::handle_connect),
/// [`handle_datagram`](Self::handle_datagram) / [`handle_envelope`](Self::handle_envelope),
/// [`handle_disconnect`](Self::handle_disconnect), [`handle_timeout`](Self::handle_timeout)
/// (when [`poll_timeout`](Self::poll_timeout) is reached) and the operator's commands
/// ([`close_tunnel`](Self::close_tunnel), [`shutdown`](Self::shutdown)). **After any input,
/// drain [`poll_transmit`](Self::poll_transmit) and then [`poll_event`](Self::poll_event) until
/// both return `None`** (in a cluster, [`poll_registry`](Self::poll_registry) too); a [`DirectorEvent::CloseConnection`] applies after the transmits
/// drained before it. Randomness (tunnel ids, secrets, tokens) comes from
/// [`DirectorConfig::rng_seed`].
///
/// Hostile input never panics and never fails the director: it is answered with a result code
/// or dropped, and counted in [`stats`](Self::stats).
///
/// Control messages are keyed (`docs/PROTOCOL.md` §3.3, §4.4): each tunnel gets a control key
/// in its Configuration Response, and from then on every control message of the tunnel, both
/// ways, carries Message Integrity under the key of its direction. A message that names a
/// tunnel and does not verify is dropped and counted, never answered; a request whose sequence
/// number the director accepted before is a retransmission (answered from memory) or a replay
/// (dropped). A verified request with a fresh sequence number that arrives on another
/// connection than its tunnel's moves the tunnel there (roaming, §3.4).
///
/// With [`DirectorConfig::cluster`] the director is one of a cluster (`docs/CLUSTER.md`): it
/// asks the registry through [`poll_registry`](Self::poll_registry) and
/// [`handle_registry`](Self::handle_registry), takes mesh links to the other directors with
/// [`handle_mesh_connect`](Self::handle_mesh_connect) (their envelopes come through
/// [`handle_datagram`](Self::handle_datagram) / [`handle_envelope`](Self::handle_envelope) and
/// their end through [`handle_disconnect`](Self::handle_disconnect), as any connection's), and
/// asks for the links it lacks with [`DirectorEvent::DialMesh`].
#[derive(Debug)]
pub struct SessionDirector {
    config: DirectorConfig,
    rng: ChaCha20Rng,
    connections: FxHashMap<ConnectionHandle, Connection>,
    /// Unconfigured connections, oldest first (may hold handles since configured or gone,
    /// at most about as many as there are unconfigured ones).
    pending: VecDeque<ConnectionHandle>,
    pending_count: usize,
    tunnels: FxHashMap<u64, Tunnel>,
    by_addr: FxHashMap<IpAddr, u64>,
    ipv4_pool: Option<AddressPool>,
    ipv6_pool: Option<AddressPool>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Control messages to send, in order.
    control_out: VecDeque<(ConnectionHandle, Vec<u8>)>,
    /// Tunnels with queued frames, served round-robin.
    ready: VecDeque<u64>,
    /// Frames queued for active tunnels.
    queued_frames: usize,
    /// Frames held for persistent tunnels.
    held_frames: usize,
    /// Spare frame buffers, so that relaying does not allocate in steady state.
    spare: Vec<Vec<u8>>,
    events: VecDeque<DirectorEvent>,
    peer: peer::PeerService,
    /// Sequence numbers of director-originated requests (top bit set, §3.1).
    next_sequence: u32,
    /// SHA-256 of each admission token.
    token_digests: Vec<[u8; 32]>,
    /// Failed admissions per source address: the start of its window and the count.
    failures: FxHashMap<IpAddr, (Instant, u16)>,
    /// Connections with a Release Notification awaiting its acknowledgement.
    outstanding_notifications: usize,
    /// The director's part in its cluster, if it is in one.
    cluster: Option<Box<cluster::Cluster>>,
    stats: DirectorStats,
}

#[derive(Debug)]
struct Connection {
    info: ConnectionInfo,
    tunnel: Option<u64>,
    /// Has completed a Configuration exchange (so no longer counts as pending).
    configured: bool,
    /// A Release Notification awaiting its response (datagram transports).
    notification: Option<Outstanding>,
}

#[derive(Debug)]
struct Outstanding {
    sequence: u32,
    bytes: Vec<u8>,
    sent: u32,
    /// The closed tunnel's key, which its client's acknowledgement carries.
    key: Option<ControlKey>,
}

#[derive(Debug)]
struct Tunnel {
    id: u64,
    ipv4: Option<(Ipv4Addr, u128)>,
    ipv6: Option<(Ipv6Addr, u128)>,
    /// `None` while persistent.
    connection: Option<ConnectionHandle>,
    transport: Transport,
    /// Keys Message Integrity on every control message of the tunnel (§4.4).
    key: ControlKey,
    /// In a cluster, the salt its key derives from (`cluster::control_key`); zero outside.
    salt: [u8; SALT_LEN],
    /// Sequence numbers of the client's requests accepted lately (§6.2).
    replay: ReplayWindow,
    keepalive: Duration,
    capabilities: Capabilities,
    last_heard: Instant,
    /// While active: when the director last sent it anything (the keepalive of §3.5 is due
    /// one interval later). While persistent: since when it is. One field for both keeps an
    /// idle tunnel small.
    since: Instant,
    /// A [`Timer::Liveness`] entry for it is in the heap.
    liveness_armed: bool,
    /// A [`Timer::AddressCheck`] entry for it is in the heap: someone else asked for a tunnel
    /// from its address, and it was sent a Keepalive.
    address_check: bool,
    /// The sequence number of the director's last Keepalive on it, whose response is
    /// expected (0: none; the director's numbers have the top bit set).
    keepalive_sequence: u32,
    /// The last request answered and its encoded response, for duplicates (§6.2). Client
    /// Service Requests have their own slot: a client may have one outstanding beside a
    /// keepalive, and a late retransmission must not start a second negotiation.
    last_answer: [Option<(MessageType, u32, Vec<u8>)>; 2],
    /// The sequence number of the Configuration Request that created the tunnel (true) or
    /// last re-attached it (false). Its answer is made again for a retransmission rather than
    /// kept: it is the largest one, and with the control key in it.
    configuration: (u32, bool),
    /// Peer candidates the client announced (§7.2); boxed so that tunnels that never announce
    /// pay one pointer.
    announced: Option<Box<peer::Announcement>>,
    queue: VecDeque<Vec<u8>>,
    in_ready: bool,
}

/// Timers; one heap serves all tunnels. Entries are checked against the state when they fire,
/// so that activity never has to find and move them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The keepalive the director sends (§3.5) and the idle deadline of an active tunnel.
    Liveness(u64),
    Persistence(u64),
    Pending(ConnectionHandle),
    Notification(ConnectionHandle),
    /// A forwarded peer service request: retransmission and answer deadline.
    PeerAnswer(u32),
    /// A release notice awaiting its response.
    PeerRelease(u32),
    /// The end of a tunnel's address check (see [`DirectorConfig::address_check_timeout`]).
    AddressCheck(u64),
    /// In a cluster: the registry heartbeat.
    Heartbeat,
    /// A peer request sent to another director: its answer deadline.
    MeshPeer(u32),
    /// A peer request forwarded for another director: retransmission and deadline.
    MeshForward(u32),
}

/// Internal addresses given to one tunnel, with their offsets in the pools.
type Assigned = (Option<(Ipv4Addr, u128)>, Option<(Ipv6Addr, u128)>);

/// Sources whose failed admissions are tracked, at most.
const MAX_FAILING_SOURCES: usize = 4096;
/// Spare frame buffers kept for reuse.
const MAX_SPARE_BUFFERS: usize = 1024;
/// Bit set in the sequence numbers of director-originated requests.
const DIRECTOR_SEQUENCE_BIT: u32 = 0x8000_0000;

impl SessionDirector {
    /// A director with `config`, which must pass [`DirectorConfig::validate`].
    pub fn new(config: DirectorConfig) -> Result<Self, DirectorConfigError> {
        config.validate()?;
        let cap = config.max_tunnels;
        let ipv4_pool = config
            .ipv4_pool
            .map(|p| AddressPool::for_prefix(32, p.prefix_len, true, cap));
        let ipv6_pool = config
            .ipv6_pool
            .map(|p| AddressPool::for_prefix(128, p.prefix_len, false, cap));
        let cluster = config
            .cluster
            .clone()
            .map(|c| Box::new(cluster::Cluster::new(c)));
        let mut director = Self {
            rng: ChaCha20Rng::from_seed(config.rng_seed),
            connections: FxHashMap::default(),
            pending: VecDeque::new(),
            pending_count: 0,
            tunnels: FxHashMap::default(),
            by_addr: FxHashMap::default(),
            ipv4_pool,
            ipv6_pool,
            timers: BinaryHeap::new(),
            control_out: VecDeque::new(),
            ready: VecDeque::new(),
            queued_frames: 0,
            held_frames: 0,
            spare: Vec::new(),
            events: VecDeque::new(),
            peer: peer::PeerService::default(),
            next_sequence: DIRECTOR_SEQUENCE_BIT,
            token_digests: config
                .admission
                .tokens
                .iter()
                .map(|t| Sha256::digest(t).into())
                .collect(),
            failures: FxHashMap::default(),
            outstanding_notifications: 0,
            cluster,
            stats: DirectorStats::default(),
            config,
        };
        director.cluster_start();
        Ok(director)
    }

    /// The configuration in force.
    pub fn config(&self) -> &DirectorConfig {
        &self.config
    }

    /// A transport connection was accepted (stream) or a datagram came from a new remote
    /// address (datagram transports). It must complete a Configuration exchange within
    /// `pending_timeout`; beyond `max_pending_connections` the oldest unconfigured connection is
    /// closed.
    pub fn handle_connect(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        info: ConnectionInfo,
    ) -> Result<(), DuplicateConnection> {
        if self.connections.contains_key(&connection) {
            return Err(DuplicateConnection(connection));
        }
        self.connections.insert(
            connection,
            Connection {
                info,
                tunnel: None,
                configured: false,
                notification: None,
            },
        );
        // Handles configured or gone since are dropped from the queue once they are most of
        // it, so that it holds O(pending) entries however many connections come and go.
        if self.pending.len() >= 2 * self.pending_count + 64 {
            let connections = &self.connections;
            self.pending
                .retain(|c| connections.get(c).is_some_and(|c| !c.configured));
        }
        self.pending.push_back(connection);
        self.pending_count += 1;
        self.timers.push(Reverse((
            now + self.config.pending_timeout,
            Timer::Pending(connection),
        )));
        while self.pending_count > self.config.max_pending_connections {
            let Some(oldest) = self.pending.pop_front() else {
                break;
            };
            if self.is_pending(oldest) {
                self.drop_connection(oldest);
            }
        }
        Ok(())
    }

    /// The transport of `connection` closed or failed. Its tunnel, if any, becomes persistent.
    pub fn handle_disconnect(&mut self, now: Instant, connection: ConnectionHandle) {
        if self.is_mesh(connection) {
            return self.mesh_disconnected(connection);
        }
        let Some(conn) = self.connections.remove(&connection) else {
            return;
        };
        self.forgot(&conn);
        if let Some(id) = conn.tunnel {
            self.make_persistent(now, id);
        }
    }

    /// One datagram from a datagram transport (UDP, a DTLS record's payload, a QUIC
    /// datagram): exactly one envelope.
    pub fn handle_datagram(&mut self, now: Instant, connection: ConnectionHandle, datagram: &[u8]) {
        match Envelope::decode_datagram(datagram) {
            Ok(envelope) => self.handle_envelope(now, connection, envelope),
            Err(_) => self.stats.dropped.bad_envelope += 1,
        }
    }

    /// One envelope, cut from a stream by a [`StreamDeframer`](crate::wire::StreamDeframer)
    /// or decoded from a datagram.
    pub fn handle_envelope(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        envelope: Envelope<'_>,
    ) {
        if self.is_mesh(connection) {
            return self.handle_mesh_envelope(now, connection, envelope);
        }
        if !self.connections.contains_key(&connection) {
            self.stats.dropped.unknown_connection += 1;
            return;
        }
        match envelope.kind {
            EnvelopeType::DATA => self.relay(now, connection, envelope.payload),
            EnvelopeType::CONTROL => self.handle_control(now, connection, envelope.payload),
            _ => self.stats.dropped.unknown_envelope_type += 1,
        }
    }

    /// Fires the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, timer))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Liveness(id) => self.check_liveness(now, id),
                Timer::Persistence(id) => self.check_persistence(now, id),
                Timer::AddressCheck(id) => self.end_address_check(now, id),
                Timer::Pending(c) => {
                    if self.is_pending(c) {
                        self.drop_connection(c);
                    }
                }
                Timer::Notification(c) => self.retransmit_notification(now, c),
                Timer::PeerAnswer(seq) => self.peer_answer_timer(now, seq),
                Timer::PeerRelease(seq) => self.peer_release_timer(now, seq),
                Timer::Heartbeat => self.heartbeat(now),
                Timer::MeshPeer(exchange) => self.mesh_peer_timer(exchange),
                Timer::MeshForward(seq) => self.mesh_forward_timer(now, seq),
            }
        }
    }

    /// The next envelope to send, written into `buf` (which is replaced, not appended to).
    ///
    /// `now` is the time of the call, as for every poll that writes; the director dates its
    /// timers when it queues a message, so nothing here depends on it yet.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((connection, mut bytes)) = self.control_out.pop_front() {
            core::mem::swap(buf, &mut bytes);
            self.recycle(bytes);
            self.sent_on(now, connection);
            return Some(Transmit { connection });
        }
        if let Some((connection, mut frame)) = self.poll_mesh() {
            core::mem::swap(buf, &mut frame);
            self.recycle(frame);
            return Some(Transmit { connection });
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(tunnel) = self.tunnels.get_mut(&id) else {
                continue;
            };
            let Some(connection) = tunnel.connection else {
                // Persistent: frames wait for the re-attach.
                tunnel.in_ready = false;
                continue;
            };
            let Some(mut frame) = tunnel.queue.pop_front() else {
                tunnel.in_ready = false;
                continue;
            };
            if tunnel.queue.is_empty() {
                tunnel.in_ready = false;
            } else {
                self.ready.push_back(id);
            }
            self.queued_frames -= 1;
            tunnel.since = now;
            core::mem::swap(buf, &mut frame);
            self.recycle(frame);
            return Some(Transmit { connection });
        }
        None
    }

    /// The runtime could not deliver `envelope`, which [`poll_transmit`](Self::poll_transmit)
    /// gave it (a stream connection's queue was full, or the connection was closing): an
    /// answer counts as undelivered rather than answered, a frame as not relayed, so that
    /// the statistics say what reached the clients.
    pub fn undelivered(&mut self, envelope: &[u8]) {
        let payload_len = envelope.len().saturating_sub(ENVELOPE_HEADER_LEN);
        match envelope.first().map(|k| EnvelopeType(*k)) {
            Some(EnvelopeType::DATA) => {
                let s = &mut self.stats;
                s.frames_relayed = s.frames_relayed.saturating_sub(1);
                s.bytes_relayed = s.bytes_relayed.saturating_sub(payload_len as u64);
            }
            Some(EnvelopeType::CONTROL) => {
                // The message type is the second octet of the message header (§3.1).
                let kind = envelope
                    .get(ENVELOPE_HEADER_LEN + 1)
                    .map(|t| MessageType(*t));
                if kind.is_some_and(|t| !t.is_request()) {
                    let s = &mut self.stats;
                    s.control_answered = s.control_answered.saturating_sub(1);
                    s.answers_undelivered += 1;
                }
            }
            _ => {}
        }
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<DirectorEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called: at the latest one
    /// keepalive interval after the last envelope polled for an active tunnel, when the
    /// director sends it a Keepalive (§3.5).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Closes a tunnel administratively, telling its client with a Release Notification.
    pub fn close_tunnel(
        &mut self,
        now: Instant,
        tunnel_id: u64,
        reason: ResultCode,
    ) -> Result<(), UnknownTunnel> {
        let connection = self
            .tunnels
            .get(&tunnel_id)
            .ok_or(UnknownTunnel(tunnel_id))?
            .connection;
        if let Some(c) = connection {
            self.notify_release(now, c, tunnel_id, reason);
        }
        self.close(now, tunnel_id, reason);
        Ok(())
    }

    /// Release Notifications on datagram transports awaiting their acknowledgement, which the
    /// director retransmits (§3.5, §6.3) until it comes or the last transmission is sent.
    pub fn notifications_outstanding(&self) -> usize {
        self.outstanding_notifications
    }

    /// Closes every tunnel with reason Shutdown.
    pub fn shutdown(&mut self, now: Instant) {
        let ids: Vec<u64> = self.tunnels.keys().copied().collect();
        for id in ids {
            // The id was just listed, so it exists.
            let _ = self.close_tunnel(now, id, ResultCode::SHUTDOWN);
        }
    }

    /// Current statistics.
    pub fn stats(&self) -> DirectorStats {
        let mut stats = self.stats.clone();
        let mut by_transport: Vec<TransportTunnels> = Vec::new();
        for t in self.tunnels.values() {
            let i = match by_transport.iter().position(|b| b.transport == t.transport) {
                Some(i) => i,
                None => {
                    by_transport.push(TransportTunnels {
                        transport: t.transport,
                        active: 0,
                        persistent: 0,
                    });
                    by_transport.len() - 1
                }
            };
            match t.connection {
                Some(_) => by_transport[i].active += 1,
                None => by_transport[i].persistent += 1,
            }
        }
        by_transport.sort_by_key(|b| b.transport);
        stats.persistent_tunnels = by_transport.iter().map(|b| b.persistent).sum();
        stats.active_tunnels = self.tunnels.len() - stats.persistent_tunnels;
        stats.tunnels_by_transport = by_transport;
        stats.pending_connections = self.pending_count;
        stats.queued_frames = self.queued_frames;
        stats
    }

    /// The tunnels held, in no particular order.
    pub fn tunnels(&self) -> impl Iterator<Item = TunnelSummary> + '_ {
        self.tunnels.values().map(|t| TunnelSummary {
            tunnel_id: t.id,
            ipv4: t.ipv4.map(|(a, _)| a),
            ipv6: t.ipv6.map(|(a, _)| a),
            connection: t.connection,
            transport: t.transport,
            keepalive: t.keepalive,
            capabilities: t.capabilities,
            queued_frames: t.queue.len(),
        })
    }

    /// The tunnel holding internal address `addr`.
    pub fn tunnel_by_address(&self, addr: IpAddr) -> Option<u64> {
        self.by_addr.get(&addr).copied()
    }

    // ---- data path ----

    fn relay(&mut self, now: Instant, connection: ConnectionHandle, payload: &[u8]) {
        let Some(src_id) = self.connections.get(&connection).and_then(|c| c.tunnel) else {
            self.stats.dropped.not_configured += 1;
            return;
        };
        if payload.len() > self.config.max_packet_len {
            self.stats.dropped.oversized += 1;
            return;
        }
        let Ok(packet) = InnerPacket::parse(payload) else {
            self.stats.dropped.bad_packet += 1;
            return;
        };
        let Some(src) = self.tunnels.get_mut(&src_id) else {
            return;
        };
        src.last_heard = now;
        if !src.owns(packet.source()) {
            self.stats.dropped.spoofed_source += 1;
            return;
        }
        let Some(&dst_id) = self.by_addr.get(&packet.destination()) else {
            if self.cluster.is_some() {
                return self.relay_to_mesh(now, packet.destination(), payload);
            }
            self.stats.dropped.unknown_destination += 1;
            return;
        };
        self.deliver(dst_id, payload);
    }

    /// Queues `payload` for tunnel `dst_id` (held for it while it is persistent), within the
    /// queue bounds.
    fn deliver(&mut self, dst_id: u64, payload: &[u8]) {
        let Some(dst) = self.tunnels.get_mut(&dst_id) else {
            return;
        };
        let c = &self.config;
        let mut frame = match dst.connection {
            Some(_) => {
                if dst.queue.len() >= c.max_queued_frames
                    || self.queued_frames >= c.max_total_queued_frames
                {
                    self.stats.dropped.queue_full += 1;
                    return;
                }
                self.spare.pop().unwrap_or_default()
            }
            // Held for the re-attach: the freshest frames, within the held bounds.
            None if dst.queue.len() >= c.max_held_frames => {
                self.stats.dropped.held_full += 1;
                self.held_frames -= 1;
                dst.queue.pop_front().unwrap_or_default()
            }
            None if self.held_frames >= c.max_total_held_frames => {
                self.stats.dropped.held_full += 1;
                return;
            }
            None => self.spare.pop().unwrap_or_default(),
        };
        frame.clear();
        // The payload is at most max_packet_len, which validate() keeps below the envelope max.
        let Ok(header) = Envelope::header_bytes(EnvelopeType::DATA, payload.len()) else {
            return;
        };
        // One allocation of the exact size when the caller kept the last frame (a stream
        // connection's queue takes it) and left an empty buffer to recycle.
        frame.reserve_exact(header.len() + payload.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(payload);
        dst.queue.push_back(frame);
        if dst.connection.is_none() {
            self.held_frames += 1;
        } else {
            self.queued_frames += 1;
            if !dst.in_ready {
                dst.in_ready = true;
                self.ready.push_back(dst_id);
            }
        }
        self.stats.frames_relayed += 1;
        self.stats.bytes_relayed += payload.len() as u64;
    }

    fn recycle(&mut self, mut buf: Vec<u8>) {
        // An empty buffer (the caller took the frame) is not worth a slot.
        if self.spare.len() < MAX_SPARE_BUFFERS && (1..=2048).contains(&buf.capacity()) {
            buf.clear();
            self.spare.push(buf);
        }
    }

    // ---- helpers ----

    fn is_pending(&self, connection: ConnectionHandle) -> bool {
        self.connections
            .get(&connection)
            .is_some_and(|c| !c.configured)
    }

    /// Bookkeeping for a connection just removed from the table.
    fn forgot(&mut self, connection: &Connection) {
        if !connection.configured {
            self.unpend();
        }
        if connection.notification.is_some() {
            self.outstanding_notifications -= 1;
        }
    }

    fn unpend(&mut self) {
        debug_assert!(self.pending_count > 0, "pending connection count underflow");
        self.pending_count = self.pending_count.saturating_sub(1);
    }

    fn bind(&mut self, connection: ConnectionHandle, id: u64) {
        if let Some(c) = self.connections.get_mut(&connection) {
            c.tunnel = Some(id);
            if !c.configured {
                c.configured = true;
                self.unpend();
            }
        }
    }

    fn touch(&mut self, now: Instant, connection: ConnectionHandle) {
        let tunnel = self.connections.get(&connection).and_then(|c| c.tunnel);
        if let Some(t) = tunnel.and_then(|id| self.tunnels.get_mut(&id)) {
            t.last_heard = now;
        }
    }

    /// Arms the liveness timer of tunnel `id` unless it is armed: one entry per tunnel, which
    /// finds its next deadline from the tunnel's state when it fires.
    fn schedule_liveness(&mut self, id: u64) {
        if let Some(t) = self.tunnels.get_mut(&id) {
            if !t.liveness_armed {
                t.liveness_armed = true;
                let at = t.next_liveness(self.config.idle_intervals);
                self.timers.push(Reverse((at, Timer::Liveness(id))));
            }
        }
    }

    /// An envelope for `connection` was polled: its tunnel heard from the director.
    fn sent_on(&mut self, now: Instant, connection: ConnectionHandle) {
        let tunnel = self.connections.get(&connection).and_then(|c| c.tunnel);
        if let Some(t) = tunnel.and_then(|id| self.tunnels.get_mut(&id)) {
            t.since = now;
        }
    }

    fn admits(&self, info: &ConnectionInfo, token: Option<&[u8]>) -> bool {
        let admission = &self.config.admission;
        let token_ok = || {
            let digest: [u8; 32] = Sha256::digest(token.unwrap_or_default()).into();
            // Every digest is compared, so the time does not tell which one matched.
            let matches = self.token_digests.iter().map(|d| d.ct_eq(&digest));
            matches.fold(subtle::Choice::from(0), |a, b| a | b).into()
        };
        admission.is_open()
            || (admission.verified_identities && info.verified_identity)
            || (token.is_some() && token_ok())
    }

    /// Whether `source` has used up its failed admissions in the current window.
    fn failing(&self, now: Instant, source: IpAddr) -> bool {
        let admission = &self.config.admission;
        self.failures.get(&source).is_some_and(|(since, count)| {
            *count >= admission.failure_limit && now < *since + admission.failure_window
        })
    }

    /// Counts a failed admission of `source`. The table is bounded: when it is full, sources
    /// whose window ended are forgotten, and if none has, the new source is not tracked
    /// (spoofed sources must not lock out real ones by filling it).
    fn record_failure(&mut self, now: Instant, source: IpAddr) {
        let window = self.config.admission.failure_window;
        if self.failures.len() >= MAX_FAILING_SOURCES && !self.failures.contains_key(&source) {
            self.failures.retain(|_, (since, _)| now < *since + window);
            if self.failures.len() >= MAX_FAILING_SOURCES {
                return;
            }
        }
        let entry = self.failures.entry(source).or_insert((now, 0));
        if now >= entry.0 + window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// An address from each pool that has one left (§3.3: IPv4 and/or IPv6): a tunnel gets one
    /// family when the other's pool is exhausted, and `None` only when it would get none.
    fn allocate_addresses(&mut self) -> Option<Assigned> {
        let mut ipv4 = None;
        if let (Some(pool), Some(prefix)) = (self.ipv4_pool.as_mut(), self.config.ipv4_pool) {
            ipv4 = pool.allocate().and_then(|offset| {
                let base = u128::from(u32::from(prefix.network));
                let addr = u32::try_from(base + offset).map(Ipv4Addr::from).ok()?;
                Some((addr, offset))
            });
        }
        let mut ipv6 = None;
        if let (Some(pool), Some(prefix)) = (self.ipv6_pool.as_mut(), self.config.ipv6_pool) {
            ipv6 = pool
                .allocate()
                .map(|offset| (Ipv6Addr::from(u128::from(prefix.network) + offset), offset));
        }
        if ipv4.is_none() && ipv6.is_none() {
            return None;
        }
        if ipv4.is_none() != self.ipv4_pool.is_none() || ipv6.is_none() != self.ipv6_pool.is_none()
        {
            self.stats.one_family_only += 1;
        }
        Some((ipv4, ipv6))
    }

    /// The next sequence number for a director-originated request (top bit set, §3.1).
    fn next_director_sequence(&mut self) -> u32 {
        let sequence = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1) | DIRECTOR_SEQUENCE_BIT;
        sequence
    }

    fn fresh_tunnel_id(&mut self) -> u64 {
        loop {
            let id = self.rng.next_u64();
            if id != 0 && !self.tunnels.contains_key(&id) {
                return id;
            }
        }
    }

    fn negotiate_keepalive(&self, transport: Transport, proposal_ms: Option<u32>) -> Duration {
        negotiate(&self.config.keepalive, transport, proposal_ms)
    }

    /// Encodes `message` in a control envelope into `out`, with Message Integrity under the
    /// director's key of tunnel `id` when the director holds it: every message to a client on
    /// its tunnel is signed (§4.4). False if it does not encode.
    fn encode_control(&self, id: Option<u64>, message: &Message<'_>, out: &mut Vec<u8>) -> bool {
        match id.and_then(|id| self.tunnels.get(&id)) {
            Some(t) => message
                .encode_envelope_with_integrity(&t.key.director_to_client(), out)
                .is_ok(),
            None => message.encode_envelope(out).is_ok(),
        }
    }

    /// Whether `encoded` carries the Message Integrity of tunnel `id`'s client.
    fn verified_from_client(&self, id: u64, encoded: &[u8]) -> bool {
        self.tunnels
            .get(&id)
            .is_some_and(|t| t.key.verify_from_client(encoded))
    }

    /// Moves tunnel `id` to `connection`: frames waiting for it follow, its old connection is
    /// closed, and a tunnel `connection` carried becomes persistent (its client is no longer
    /// there). Addresses, key, keepalive and peer introductions stay.
    fn move_tunnel(&mut self, now: Instant, id: u64, connection: ConnectionHandle) {
        let previous = self.connections.get(&connection).and_then(|c| c.tunnel);
        if let Some(other) = previous.filter(|o| *o != id) {
            self.make_persistent(now, other);
        }
        let transport = self.connections.get(&connection).map(|c| c.info.transport);
        let Some(tunnel) = self.tunnels.get_mut(&id) else {
            return;
        };
        let old = tunnel.connection.replace(connection);
        if old.is_none() {
            // Held frames are queued again, for the new transport.
            self.held_frames -= tunnel.queue.len();
            self.queued_frames += tunnel.queue.len();
        }
        tunnel.transport = transport.unwrap_or(tunnel.transport);
        if old.is_none() {
            tunnel.since = now;
        }
        tunnel.last_heard = now;
        if !tunnel.queue.is_empty() && !tunnel.in_ready {
            tunnel.in_ready = true;
            self.ready.push_back(id);
        }
        if let Some(old) = old.filter(|o| *o != connection) {
            // The tunnel was still active elsewhere; that transport is stale.
            if let Some(c) = self.connections.get_mut(&old) {
                c.tunnel = None;
            }
            self.drop_connection(old);
        }
        self.bind(connection, id);
        self.schedule_liveness(id);
    }
}

impl Tunnel {
    /// A tunnel just made or adopted: `id`, its addresses, the `transport` it comes on, its
    /// control key and salt, and its keepalive; persistent until a connection is given, with
    /// no request accepted and nothing queued.
    fn new(
        id: u64,
        (ipv4, ipv6): Assigned,
        transport: Transport,
        key: ControlKey,
        salt: [u8; SALT_LEN],
        keepalive: Duration,
        now: Instant,
    ) -> Self {
        Self {
            id,
            ipv4,
            ipv6,
            connection: None,
            transport,
            key,
            salt,
            replay: ReplayWindow::new(),
            keepalive,
            capabilities: Capabilities::default(),
            last_heard: now,
            since: now,
            liveness_armed: false,
            keepalive_sequence: 0,
            address_check: false,
            last_answer: [None, None],
            configuration: (0, false),
            announced: None,
            queue: VecDeque::new(),
            in_ready: false,
        }
    }

    /// When an active tunnel's liveness must next be checked: its idle deadline (three
    /// silent intervals by default) or the Keepalive the director owes it, whichever is first.
    fn next_liveness(&self, idle_intervals: u32) -> Instant {
        let idle = self.last_heard + self.keepalive * idle_intervals;
        idle.min(self.since + self.keepalive)
    }

    fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        let v4 = self.ipv4.map(|(a, _)| IpAddr::V4(a));
        let v6 = self.ipv6.map(|(a, _)| IpAddr::V6(a));
        v4.into_iter().chain(v6)
    }

    fn owns_family(&self, v6: bool) -> bool {
        if v6 {
            self.ipv6.is_some()
        } else {
            self.ipv4.is_some()
        }
    }

    fn owns(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4.is_some_and(|(mine, _)| mine == a),
            IpAddr::V6(a) => self.ipv6.is_some_and(|(mine, _)| mine == a),
        }
    }
}

fn negotiate(k: &KeepaliveConfig, transport: Transport, proposal_ms: Option<u32>) -> Duration {
    match proposal_ms {
        Some(ms) => Duration::from_millis(u64::from(ms)).clamp(k.min, k.max),
        None if transport.is_datagram() => k.default_datagram,
        None => k.default_stream,
    }
}
