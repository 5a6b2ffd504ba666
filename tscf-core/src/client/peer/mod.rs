//! Peer tunneling, client side (`docs/PROTOCOL.md` §7): the [`PeerAgent`] a
//! [`TunnelClient`](super::TunnelClient) owns when [`ClientConfig::peer`](super::ClientConfig)
//! is set.
//!
//! The agent discovers the client's candidates (host addresses and a STUN server-reflexive
//! one) and announces them to the director; notices opted-in UDP flows to other clients and
//! asks the director for a peer tunnel; answers the director's forwarded requests; probes,
//! nominates and configures the direct path with Message Integrity under the pair's token;
//! keeps the tunnel alive; and falls back to the relay whenever anything fails. Nothing ever
//! waits for a negotiation: packets take the relay until the peer tunnel is up.
//!
//! Its state lives here; the [`TunnelClient`](super::TunnelClient) methods that drive it are
//! in this module too, so that the client's own files stay about the server tunnel. Network
//! input is hostile: it is verified, and dropped and counted in [`PeerStats`] when it fails.

mod config;
mod path;
mod probe;
mod release;
mod service;
mod session;
mod stream;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use arrayvec::ArrayVec;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

pub use config::{PeerConfig, ProbeBudget};

use super::event::PeerStreamId;
use super::queue::{BufferPool, PacketQueue};
use super::timer::earliest;
use super::{after, push_event, ClientEvent, ClientStats, Destination, Transmit, TunnelClient};
use crate::histogram::DurationHistogram;
use crate::rate::TokenBucket;
use crate::wire::{CandidateKind, InnerPacket, ResultCode, Transport};
use service::{Discovery, ServiceRequest};

/// Outstanding Client Service Requests of the agent, at most (§6.3).
const MAX_SERVICE_REQUESTS: usize = 8;
/// Remote candidates kept per peer: the 8 announced and two learned from probes.
const MAX_REMOTE_CANDIDATES: usize = 10;
/// Envelopes waiting for the peer socket, at most; beyond, data falls back to the relay and
/// control messages are dropped (and counted).
const MAX_PEER_OUT: usize = 512;
/// Explicit per-socket opt-in settings kept, at most.
const MAX_OPT_SETTINGS: usize = 4096;
/// Retransmission interval of the Configuration Request on a peer path.
const NOMINATION_RTO: Duration = Duration::from_millis(250);
/// Peer streams per peer at most: stream candidates tried in one negotiation, and streams
/// held for one peer.
const MAX_STREAMS_PER_PEER: usize = 4;
/// Accepted peer streams not yet identified by a valid Configuration Request, at most.
const MAX_PENDING_STREAMS: usize = 16;
/// Addresses a destination authorises for a peer session handshake, per peer, at most.
const MAX_AUTHORISED: usize = 4;

/// The way to a peer: its UDP address, a peer stream, or a peer session (DTLS or QUIC) with
/// its UDP address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Via {
    Udp(SocketAddr),
    Stream(PeerStreamId),
    Session(SocketAddr),
}

/// Where packets to a peer go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerPath {
    /// Through the server tunnel.
    Relay,
    /// Over the peer tunnel, to this address.
    Peer(SocketAddr),
    /// Over the peer tunnel on a peer stream (TCP or TLS) with this remote address.
    Stream {
        /// The stream.
        stream: PeerStreamId,
        /// Its remote address.
        addr: SocketAddr,
    },
    /// Over the peer tunnel inside a peer session (DTLS or QUIC) with this address.
    Session {
        /// The peer's address on the direct path.
        addr: SocketAddr,
        /// [`Transport::DTLS`] or [`Transport::QUIC`].
        transport: Transport,
    },
}

/// The state of a peer tunnel, as [`TunnelClient::peer_tunnels`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerTunnelState {
    /// The request waits for NAT discovery.
    Discovering,
    /// Asked the director; waiting for its answer.
    Requesting,
    /// The other side initiates; waiting for the director's forwarded request.
    AwaitingPeer,
    /// Probing the peer's candidates.
    Probing,
    /// The initiator waits for the runtime's peer session handshake on the chosen path.
    Handshaking,
    /// The Configuration Request is out on the chosen path.
    Nominating,
    /// Up: opted-in flows to the peer take it.
    Up,
    /// On the relay after a failure, a removal or a loss; a new attempt may follow the backoff.
    Fallback,
}

/// One peer the agent holds state for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTunnelInfo {
    /// The peer's internal address.
    pub peer: IpAddr,
    /// The direct path's remote address, once chosen.
    pub path: Option<SocketAddr>,
    /// The peer stream the path runs on, if it is not UDP.
    pub stream: Option<PeerStreamId>,
    /// The session transport (DTLS or QUIC) securing the path, once agreed
    /// (`docs/PROTOCOL.md` §7.5); `None` for plain UDP and for streams.
    pub session: Option<Transport>,
    /// Where the tunnel is.
    pub state: PeerTunnelState,
    /// Time from the first opted-in packet (or the forwarded request) to Up, once up.
    pub setup: Option<Duration>,
    /// Whether this client initiated the current (or last) negotiation.
    pub initiator: bool,
}

/// Why a peer tunnel went down or could not be set up
/// ([`ClientEvent::PeerTunnelDown`](super::ClientEvent::PeerTunnelDown)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerDownReason {
    /// Removed with a Configuration Release Request, by us or by the peer.
    Released,
    /// Nothing heard on the path for the silence timeout.
    Silence,
    /// The director reported the peer's server tunnel closed.
    PeerServerTunnelGone,
    /// The director or the peer refused (or did not answer: Peer Timeout).
    Unavailable(ResultCode),
    /// The setup did not finish within the establishment timeout.
    EstablishTimeout,
    /// Our own server tunnel is gone for good.
    ServerTunnelLost,
    /// The director introduced the pair again with new credentials; the new negotiation
    /// replaces this tunnel.
    Replaced,
    /// The peer stream the tunnel ran on was closed or broke.
    StreamLost,
    /// The peer session handshake failed: a certificate that does not match the fingerprint,
    /// a refused or timed out handshake.
    SessionFailed,
    /// The peer session the tunnel ran on was closed or broke.
    SessionLost,
    /// The tunnel would not be secured and [`PeerConfig::require_secure`] is set.
    InsecureRefused,
}

/// Peer tunneling counters of a client, in [`ClientStats::peer`](super::ClientStats::peer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// Establish requests sent to the director (not counting retransmissions).
    pub requests_sent: u64,
    /// Announce requests sent to the director (not counting retransmissions).
    pub announces_sent: u64,
    /// Retransmitted Client Service Requests.
    pub request_retransmissions: u64,
    /// Requests the director did not answer in time.
    pub requests_timed_out: u64,
    /// Forwarded requests answered (as destination).
    pub forwarded_requests: u64,
    /// Peer Probes sent.
    pub probes_sent: u64,
    /// Peer Probes held back: the client's probe budget was spent, or the negotiation's
    /// credit (`docs/PROTOCOL.md` §7.5).
    pub probes_limited: u64,
    /// Remote candidates not probed: implausible (unspecified, multicast, broadcast, port 0,
    /// our own, loopback or link-local out of place), duplicate or beyond the limit.
    pub candidates_refused: u64,
    /// Peer Probes answered.
    pub probes_answered: u64,
    /// Valid Peer Probe Responses received.
    pub probe_responses: u64,
    /// Peer tunnels that came up.
    pub tunnels_up: u64,
    /// Negotiations or tunnels that ended on the relay (any [`PeerDownReason`]).
    pub fallbacks: u64,
    /// NAT discoveries run again because a peer tunnel fell silent (our mapping may have
    /// changed).
    pub rediscoveries: u64,
    /// Data envelopes sent on peer tunnels.
    pub data_sent: u64,
    /// Data envelopes received on peer tunnels and queued for `recv_ip`.
    pub data_received: u64,
    /// Opted-in packets that took the relay because the peer send queue was full.
    pub data_queue_full: u64,
    /// Keepalives sent on peer tunnels.
    pub keepalives_sent: u64,
    /// Peer tunnels we tore down and told the peer about with a Configuration Release
    /// Request on the path.
    pub releases_sent: u64,
    /// Retransmitted Configuration Release Requests (not answered in time).
    pub release_retransmissions: u64,
    /// Peers forgotten because `max_peers` was reached.
    pub evictions: u64,
    /// Dropped: a message whose Message Integrity is missing or wrong.
    pub integrity_failures: u64,
    /// Dropped: a verified Peer Probe Response that answers no probe we sent to its source.
    pub dropped_unmatched_response: u64,
    /// Dropped: a message naming a peer we hold no credentials for, or not on its tunnel.
    pub dropped_unknown_peer: u64,
    /// Dropped: a datagram that is neither STUN nor a tscf envelope, or a bad envelope.
    pub dropped_not_tscf: u64,
    /// Dropped: a control message that failed to decode, or one not expected now.
    pub dropped_bad_control: u64,
    /// Dropped: a data envelope that is not a packet from the peer to us on its path.
    pub dropped_bad_data: u64,
    /// Dropped: a STUN message no discovery asked for.
    pub dropped_stun: u64,
    /// Dropped: a control envelope for the peer socket because its queue was full.
    pub dropped_queue_full: u64,
    /// Dropped: a received packet because the receive queue was full.
    pub dropped_receive_queue_full: u64,
    /// Dropped: peer socket input while peer tunneling is off.
    pub dropped_disabled: u64,
    /// Peer streams asked for ([`ClientEvent::OpenPeerStream`]).
    pub streams_opened: u64,
    /// Peer streams that could not be opened.
    pub stream_failures: u64,
    /// Peer streams accepted and kept (until identified or closed).
    pub streams_accepted: u64,
    /// Accepted peer streams closed at once: too many pending, or a bad id.
    pub streams_refused: u64,
    /// Accepted peer streams closed because nothing valid came within the establishment
    /// timeout.
    pub streams_idle_closed: u64,
    /// Dropped: an envelope on a peer stream the agent does not hold.
    pub dropped_unknown_stream: u64,
    /// Peer sessions asked for as initiator ([`ClientEvent::OpenPeerSession`]).
    pub sessions_opened: u64,
    /// Addresses authorised for a peer session handshake as destination
    /// ([`ClientEvent::AcceptPeerSession`]).
    pub sessions_authorised: u64,
    /// Peer session handshakes that failed (wrong certificate, refused, timed out).
    pub session_failures: u64,
    /// Negotiations this client ended (as initiator) or refused (as destination) because the
    /// tunnel would not be secured and its [`PeerConfig::require_secure`] is set.
    pub insecure_refused: u64,
    /// Dropped: a plain datagram other than a probe from the path of a secured peer tunnel,
    /// or a plain Configuration Request for one.
    pub dropped_plain_on_secure: u64,
    /// Dropped: input from a peer session the agent does not hold.
    pub dropped_unknown_session: u64,
    /// Setup times of the peer tunnels that came up (as in
    /// [`ClientEvent::PeerTunnelUp`](super::ClientEvent::PeerTunnelUp)).
    pub setup_times: DurationHistogram,
    /// For peer tunnels that went down for silence: how long nothing had been heard on the
    /// path when their flows went back to the relay.
    pub silence_to_relay: DurationHistogram,
}

/// What the agent borrows from the client for one call.
pub(in crate::client) struct Cx<'a> {
    now: Instant,
    sequence: &'a mut u32,
    events: &'a mut VecDeque<ClientEvent>,
    stats: &'a mut ClientStats,
    pool: &'a mut BufferPool,
    inbound: &'a mut PacketQueue,
    own4: Option<Ipv4Addr>,
    own6: Option<Ipv6Addr>,
    /// The server tunnel's id, for requests to the server.
    tunnel_id: u64,
}

impl Cx<'_> {
    fn take_sequence(&mut self) -> u32 {
        super::take_sequence(self.sequence)
    }

    fn event(&mut self, event: ClientEvent) {
        push_event(self.events, event);
    }

    fn owns(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.own4 == Some(a),
            IpAddr::V6(a) => self.own6 == Some(a),
        }
    }

    /// Our internal address of the family of `peer`.
    fn own_for(&self, peer: IpAddr) -> Option<IpAddr> {
        match peer {
            IpAddr::V4(_) => self.own4.map(IpAddr::V4),
            IpAddr::V6(_) => self.own6.map(IpAddr::V6),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Initiator,
    Destination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Discovering,
    Requesting,
    AwaitingForward,
    Probing,
    Handshaking,
    Nominating,
    Up,
    Fallback,
}

/// State about one peer.
#[derive(Debug)]
struct Peer {
    addr: IpAddr,
    role: Role,
    phase: Phase,
    token: Option<[u8; 16]>,
    /// The peer's UDP candidates and their checks.
    checks: ArrayVec<probe::Check, MAX_REMOTE_CANDIDATES>,
    /// Octets of probes the negotiation may still send (§7.5).
    credit: usize,
    /// When the negotiation last sent a probe, for pacing.
    last_probe: Option<Instant>,
    path: Option<SocketAddr>,
    /// The peer stream the path runs on, when it is not UDP.
    stream: Option<PeerStreamId>,
    /// The peer's TCP and TLS candidates (initiator).
    stream_candidates: ArrayVec<(Transport, SocketAddr), MAX_STREAMS_PER_PEER>,
    /// The peer's certificate fingerprint, from the director's Peer Credentials.
    fingerprint: Option<[u8; 32]>,
    /// The agreed session transport (DTLS or QUIC), when the tunnel is to be secured.
    secure: Option<Transport>,
    /// Whether the current path is the peer session (`secure` is set and the path chosen).
    secured: bool,
    /// Destination: addresses authorised for the session handshake.
    authorised: ArrayVec<SocketAddr, MAX_AUTHORISED>,
    /// Stream candidates tried in this negotiation.
    streams_tried: usize,
    /// Initiator: when to try the next stream candidate.
    next_stream_at: Option<Instant>,
    tunnel_id: u64,
    /// Start of the current setup.
    started: Instant,
    setup: Option<Duration>,
    /// Deadline of the current phase (setup phases only).
    deadline: Option<Instant>,
    next_probe: Option<Instant>,
    /// Initiator: sequence and envelope of the Configuration Request on the path.
    nomination: Option<(u32, Vec<u8>)>,
    next_nomination: Option<Instant>,
    /// Destination: sequence and envelope of the Configuration Response given.
    answer: Option<(u32, Vec<u8>)>,
    last_heard: Instant,
    next_keepalive: Option<Instant>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Last opted-in packet to this peer, or last activity.
    last_used: Instant,
    /// Sequence of the outstanding Establish request.
    request: Option<u32>,
}

impl Peer {
    fn new(addr: IpAddr, now: Instant, backoff: Duration) -> Self {
        Self {
            addr,
            role: Role::Initiator,
            phase: Phase::Fallback,
            token: None,
            checks: ArrayVec::new(),
            credit: 0,
            last_probe: None,
            path: None,
            stream: None,
            stream_candidates: ArrayVec::new(),
            fingerprint: None,
            secure: None,
            secured: false,
            authorised: ArrayVec::new(),
            streams_tried: 0,
            next_stream_at: None,
            tunnel_id: 0,
            started: now,
            setup: None,
            deadline: None,
            next_probe: None,
            nomination: None,
            next_nomination: None,
            answer: None,
            last_heard: now,
            next_keepalive: None,
            backoff,
            retry_at: None,
            last_used: now,
            request: None,
        }
    }

    /// Forgets everything about the current negotiation or tunnel.
    fn reset(&mut self) {
        self.token = None;
        self.reset_checks();
        self.path = None;
        self.stream = None;
        self.stream_candidates.clear();
        self.fingerprint = None;
        self.secure = None;
        self.secured = false;
        self.authorised.clear();
        self.streams_tried = 0;
        self.next_stream_at = None;
        self.tunnel_id = 0;
        self.deadline = None;
        self.nomination = None;
        self.next_nomination = None;
        self.answer = None;
        self.next_keepalive = None;
        self.request = None;
    }

    /// The way to the peer on the current path.
    fn route(&self) -> Option<Via> {
        match (self.stream, self.secured) {
            (Some(id), _) => Some(Via::Stream(id)),
            (None, true) => self.path.map(Via::Session),
            (None, false) => self.path.map(Via::Udp),
        }
    }

    fn in_setup(&self) -> bool {
        !matches!(self.phase, Phase::Up | Phase::Fallback)
    }

    fn next_deadline(&self, silence: Duration) -> Option<Instant> {
        let silence_at = (self.phase == Phase::Up).then(|| after(self.last_heard, silence));
        [
            self.deadline,
            self.next_probe,
            self.next_nomination,
            self.next_keepalive,
            self.next_stream_at,
            silence_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The peer tunneling agent of a client.
#[derive(Debug)]
pub(in crate::client) struct PeerAgent {
    config: PeerConfig,
    rng: ChaCha20Rng,
    /// Every probe of every negotiation is paid from it (§7.5).
    probe_budget: TokenBucket,
    /// Explicit opt-in settings by inner UDP source port.
    opt: BTreeMap<u16, bool>,
    discovery: Discovery,
    srflx: Option<SocketAddr>,
    /// The STUN responder the director announced, for discoveries run again.
    announced_stun: Option<SocketAddr>,
    requests: ArrayVec<ServiceRequest, MAX_SERVICE_REQUESTS>,
    peers: Vec<Peer>,
    out: VecDeque<(Via, Vec<u8>)>,
    /// Peer streams opened or accepted.
    streams: Vec<stream::StreamSlot>,
    /// Tunnels we tore down whose peer has not acknowledged the release (§7.6).
    releasing: Vec<release::Releasing>,
    /// Counter for the ids of the streams we open.
    next_stream: u64,
    /// The destination, IPv4 identification and opt-in of the last fragmented datagram
    /// sent: its later fragments, which carry no port, take the path of the first.
    fragmented: Option<(IpAddr, u16, bool)>,
}

impl PeerAgent {
    pub(super) fn new(config: PeerConfig, rng_seed: [u8; 32]) -> Self {
        Self {
            config,
            rng: ChaCha20Rng::from_seed(rng_seed),
            probe_budget: TokenBucket::default(),
            opt: BTreeMap::new(),
            discovery: Discovery::Idle,
            srflx: None,
            announced_stun: None,
            requests: ArrayVec::new(),
            peers: Vec::new(),
            out: VecDeque::new(),
            streams: Vec::new(),
            releasing: Vec::new(),
            next_stream: 0,
            fragmented: None,
        }
    }

    fn opted_in(&self, port: u16) -> bool {
        self.opt
            .get(&port)
            .copied()
            .unwrap_or(self.config.default_opt_in)
    }

    fn set_opt(&mut self, port: u16, enabled: bool, now: Instant) {
        if enabled == self.config.default_opt_in {
            self.opt.remove(&port);
        } else if self.opt.len() < MAX_OPT_SETTINGS || self.opt.contains_key(&port) {
            self.opt.insert(port, enabled);
        }
        if enabled {
            // Opting in again lifts the wait after a removal or failure.
            for p in &mut self.peers {
                if p.phase == Phase::Fallback {
                    p.retry_at = Some(now);
                }
            }
        }
    }

    fn find(&self, addr: IpAddr) -> Option<usize> {
        self.peers.iter().position(|p| p.addr == addr)
    }

    /// The state for `addr`, made room for if need be.
    fn find_or_insert(&mut self, cx: &mut Cx<'_>, addr: IpAddr) -> usize {
        if let Some(i) = self.find(addr) {
            return i;
        }
        if self.peers.len() >= self.config.max_peers {
            // The least recently used, preferring peers without a live tunnel.
            let victim = self
                .peers
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| (p.phase == Phase::Up, p.last_used))
                .map(|(i, _)| i);
            if let Some(i) = victim {
                self.tell_release(cx, i);
                self.close_sessions(cx, i);
                if self.peers[i].phase == Phase::Up {
                    let peer = self.peers[i].addr;
                    cx.event(ClientEvent::PeerTunnelDown {
                        peer,
                        reason: PeerDownReason::Released,
                    });
                }
                self.forget_request(self.peers[i].request);
                self.peers.swap_remove(i);
                cx.stats.peer.evictions += 1;
            }
        }
        self.peers
            .push(Peer::new(addr, cx.now, self.config.retry_backoff.0));
        self.peers.len() - 1
    }

    fn forget_request(&mut self, sequence: Option<u32>) {
        if let Some(seq) = sequence {
            self.requests.retain(|r| r.sequence != seq);
        }
    }

    /// An opted-in packet (or not) for the relay: returns true when it went to the peer path
    /// instead. Starts a negotiation for a peer without state.
    fn route_outbound(&mut self, cx: &mut Cx<'_>, packet: &InnerPacket<'_>) -> bool {
        // UDP and TCP alike: the setting belongs to the local port.
        // A port opted in explicitly also takes flows to that port on the other side (a
        // service's clients, whose own ports vary).
        let fragment = fragment_id(packet);
        let opted = match (packet.ports(), fragment) {
            (Some((src, dst)), id) => {
                let opted = self.opted_in(src) || self.opt.get(&dst) == Some(&true);
                if let Some(id) = id {
                    self.fragmented = Some((packet.destination(), id, opted));
                }
                opted
            }
            (None, Some(id)) => match self.fragmented {
                Some((dst, i, opted)) => dst == packet.destination() && i == id && opted,
                None => false,
            },
            // Without ports (ICMP, say), the default decides: all flows, or none.
            (None, None) => self.config.default_opt_in,
        };
        if !opted {
            return false;
        }
        let dst = packet.destination();
        if cx.owns(dst) || dst.is_unspecified() || dst.is_multicast() || cx.own_for(dst).is_none() {
            return false;
        }
        let i = self.find_or_insert(cx, dst);
        let p = &mut self.peers[i];
        p.last_used = cx.now;
        match p.phase {
            Phase::Up => {
                let Some(path) = p.route() else {
                    return false;
                };
                self.queue_data(cx, path, packet.as_bytes())
            }
            Phase::Fallback if p.retry_at.is_none_or(|at| at <= cx.now) => {
                self.begin(cx, i);
                false
            }
            _ => false,
        }
    }

    /// Starts a negotiation as initiator for peer `i`.
    fn begin(&mut self, cx: &mut Cx<'_>, i: usize) {
        let p = &mut self.peers[i];
        p.reset();
        p.role = Role::Initiator;
        p.started = cx.now;
        p.setup = None;
        p.retry_at = None;
        p.deadline = Some(after(cx.now, self.config.establish_timeout));
        if self.discovery.is_done() {
            self.send_establish(cx, i);
        } else {
            self.peers[i].phase = Phase::Discovering;
        }
    }

    /// Points peer `i`'s path at `via`.
    fn set_route(&mut self, i: usize, via: Via) {
        let (path, stream) = match via {
            Via::Udp(addr) | Via::Session(addr) => (Some(addr), None),
            Via::Stream(id) => (self.stream_remote(id), Some(id)),
        };
        let p = &mut self.peers[i];
        p.path = path;
        p.stream = stream;
        p.secured = matches!(via, Via::Session(_));
    }

    /// The tunnel with peer `i` is up on `via`.
    fn up(&mut self, cx: &mut Cx<'_>, i: usize, via: Via, tunnel_id: u64) {
        let keepalive = self.config.keepalive_interval;
        let initial_backoff = self.config.retry_backoff.0;
        self.set_route(i, via);
        let (addr, keep) = (self.peers[i].addr, self.peers[i].stream);
        // Other streams to the peer are not needed any more, nor an old release.
        self.close_streams(cx, addr, keep);
        self.forget_release(addr);
        let p = &mut self.peers[i];
        let path = p.path.unwrap_or(SocketAddr::new(addr, 0));
        p.phase = Phase::Up;
        p.next_stream_at = None;
        p.tunnel_id = tunnel_id;
        p.deadline = None;
        p.next_probe = None;
        p.next_nomination = None;
        p.last_heard = cx.now;
        p.next_keepalive = Some(after(cx.now, keepalive));
        p.backoff = initial_backoff;
        let setup = cx.now.saturating_duration_since(p.started);
        p.setup = Some(setup);
        let (local_kind, remote_kind) = self.pair_kinds(i, via);
        let p = &self.peers[i];
        let event = ClientEvent::PeerTunnelUp {
            peer: p.addr,
            path,
            setup,
            initiator: p.role == Role::Initiator,
            local_kind,
            remote_kind,
        };
        cx.stats.peer.tunnels_up += 1;
        cx.stats.peer.setup_times.record(setup);
        cx.event(event);
    }

    /// The candidate kinds of the pair nominated for peer `i` (ICE's terms): ours, from the
    /// address the peer saw our probe come from (one of our host addresses, our
    /// server-reflexive one, or else a mapping only the peer learned: peer-reflexive), and the
    /// peer's, as it announced it or peer-reflexive when learned from its probe. `None` where
    /// it is not known: ours before the peer answered a probe of ours on that path, both on a
    /// peer stream.
    fn pair_kinds(&self, i: usize, via: Via) -> (Option<CandidateKind>, Option<CandidateKind>) {
        let (Via::Udp(path) | Via::Session(path)) = via else {
            return (None, None);
        };
        let check = self.peers[i].checks.iter().find(|c| c.addr == path);
        let remote = Some(check.map_or(CandidateKind::PEER_REFLEXIVE, |c| c.kind));
        let local = check.and_then(|c| c.observed).map(|seen| {
            if self.config.local_addresses.contains(&seen) {
                CandidateKind::HOST
            } else if self.srflx == Some(seen) {
                CandidateKind::SERVER_REFLEXIVE
            } else {
                CandidateKind::PEER_REFLEXIVE
            }
        });
        (local, remote)
    }

    /// Peer `i` is back on the relay; a new attempt may follow the backoff.
    fn down(&mut self, cx: &mut Cx<'_>, i: usize, reason: PeerDownReason) {
        let max = self.config.retry_backoff.1;
        let addr = self.peers[i].addr;
        self.close_streams(cx, addr, None);
        self.close_sessions(cx, i);
        let p = &mut self.peers[i];
        let request = p.request;
        p.reset();
        p.phase = Phase::Fallback;
        p.retry_at = Some(after(cx.now, p.backoff));
        p.backoff = p.backoff.saturating_mul(2).min(max);
        let peer = p.addr;
        self.forget_request(request);
        cx.stats.peer.fallbacks += 1;
        cx.event(ClientEvent::PeerTunnelDown { peer, reason });
        if reason == PeerDownReason::Silence && self.discovery.is_done() {
            // A silent path may be our NAT's doing: a new mapping (a rebinding) makes our
            // server-reflexive candidate stale, and a negotiation with it would fail. Learn
            // the mapping again before the next one (which waits for it).
            cx.stats.peer.rediscoveries += 1;
            self.run_discovery(cx);
        }
    }

    /// Our server tunnel is gone for good: every peer tunnel goes with it.
    fn drop_all(&mut self, cx: &mut Cx<'_>) {
        for (_, buf) in self.out.drain(..) {
            cx.pool.give(buf);
        }
        for i in 0..self.peers.len() {
            // Our peers hear it on the path before the director tells them.
            self.tell_release(cx, i);
            self.close_sessions(cx, i);
        }
        for p in std::mem::take(&mut self.peers) {
            if p.phase != Phase::Fallback {
                cx.stats.peer.fallbacks += 1;
                cx.event(ClientEvent::PeerTunnelDown {
                    peer: p.addr,
                    reason: PeerDownReason::ServerTunnelLost,
                });
            }
        }
        self.requests.clear();
        for s in std::mem::take(&mut self.streams) {
            cx.event(ClientEvent::ClosePeerStream { stream: s.id });
        }
        self.discovery = Discovery::Idle;
    }

    fn poll_timeout(&self) -> Option<Instant> {
        // Plain loops: the runtime asks after every input, and most of these are empty.
        let silence = self.config.silence_timeout;
        let mut at = self.discovery.poll_timeout();
        for p in &self.peers {
            at = earliest(at, p.next_deadline(silence));
        }
        for r in &self.requests {
            at = earliest(at, r.next_deadline());
        }
        for s in &self.streams {
            at = earliest(at, s.deadline);
        }
        earliest(at, self.releases_deadline())
    }

    fn handle_timeout(&mut self, cx: &mut Cx<'_>) {
        self.discovery_timeout(cx);
        self.requests_timeout(cx);
        self.peers_timeout(cx);
        self.streams_timeout(cx);
        self.releases_timeout(cx);
    }

    /// The next envelope for the peer socket or a peer stream.
    fn poll_transmit(&mut self, cx: &mut Cx<'_>, buf: &mut Vec<u8>) -> Option<Destination> {
        if let Some((to, bytes)) = self.out.pop_front() {
            buf.extend_from_slice(&bytes);
            cx.pool.give(bytes);
            return Some(match to {
                Via::Udp(addr) => Destination::Peer(addr),
                Via::Stream(id) => Destination::PeerStream(id),
                Via::Session(addr) => Destination::PeerSession(addr),
            });
        }
        self.discovery
            .poll_transmit(cx.now, buf)
            .map(Destination::Peer)
    }

    /// Queues a control envelope for the peer socket or a peer stream.
    fn queue_control(&mut self, cx: &mut Cx<'_>, to: Via, bytes: &[u8]) {
        if self.out.len() >= MAX_PEER_OUT {
            cx.stats.peer.dropped_queue_full += 1;
            return;
        }
        let mut buf = cx.pool.take();
        buf.extend_from_slice(bytes);
        self.out.push_back((to, buf));
    }

    /// Queues a data envelope for the peer path; false when the queue is full.
    fn queue_data(&mut self, cx: &mut Cx<'_>, to: Via, packet: &[u8]) -> bool {
        let Ok(header) =
            crate::wire::Envelope::header_bytes(crate::wire::EnvelopeType::DATA, packet.len())
        else {
            return false;
        };
        if self.out.len() >= MAX_PEER_OUT {
            cx.stats.peer.data_queue_full += 1;
            return false;
        }
        let mut buf = cx.pool.take();
        buf.extend_from_slice(&header);
        buf.extend_from_slice(packet);
        self.out.push_back((to, buf));
        cx.stats.peer.data_sent += 1;
        true
    }

    fn info(&self) -> Vec<PeerTunnelInfo> {
        self.peers
            .iter()
            .map(|p| PeerTunnelInfo {
                peer: p.addr,
                path: p.path,
                stream: p.stream,
                session: p.secure,
                state: match p.phase {
                    Phase::Discovering => PeerTunnelState::Discovering,
                    Phase::Requesting => PeerTunnelState::Requesting,
                    Phase::AwaitingForward => PeerTunnelState::AwaitingPeer,
                    Phase::Probing => PeerTunnelState::Probing,
                    Phase::Handshaking => PeerTunnelState::Handshaking,
                    Phase::Nominating => PeerTunnelState::Nominating,
                    Phase::Up => PeerTunnelState::Up,
                    Phase::Fallback => PeerTunnelState::Fallback,
                },
                setup: p.setup,
                initiator: p.role == Role::Initiator,
            })
            .collect()
    }
}

// ---- the client's side ----

impl TunnelClient {
    /// Opts the inner UDP socket or TCP stream bound to `local_port` in or out of peer
    /// tunneling (the `tsc_setsockopt` of the TSC API). Only opted-in flows (or all, with
    /// [`PeerConfig::default_opt_in`]) ever leave the relay; a port opted in explicitly also
    /// opts in the packets this client sends to that port on another client. Opting in also lifts the wait
    /// before a new attempt at peers that fell back. Without peer tunneling it does nothing.
    pub fn set_peer_tunneling(&mut self, local_port: u16, enabled: bool) {
        let now = self.now;
        if let Some(agent) = &mut self.peer {
            agent.set_opt(local_port, enabled, now);
        }
    }

    /// Handles [`Input::PeerDatagram`](super::Input::PeerDatagram).
    pub(super) fn on_peer_datagram(&mut self, from: SocketAddr, datagram: &[u8]) {
        let Some((agent, mut cx)) = self.peer_cx() else {
            self.stats.peer.dropped_disabled += 1;
            return;
        };
        agent.handle_datagram(&mut cx, from, datagram);
    }

    /// Handles [`Input::PeerStreamOpen`](super::Input::PeerStreamOpen).
    pub(super) fn on_peer_stream_open(&mut self, stream: PeerStreamId) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.stream_open(&mut cx, stream);
        }
    }

    /// Handles [`Input::PeerStreamFailed`](super::Input::PeerStreamFailed).
    pub(super) fn on_peer_stream_failed(&mut self, stream: PeerStreamId) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.stream_gone(&mut cx, stream, true);
        }
    }

    /// Handles [`Input::PeerStreamLost`](super::Input::PeerStreamLost).
    pub(super) fn on_peer_stream_lost(&mut self, stream: PeerStreamId) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.stream_gone(&mut cx, stream, false);
        }
    }

    /// Handles [`Input::PeerStreamAccepted`](super::Input::PeerStreamAccepted).
    pub(super) fn on_peer_stream_accepted(&mut self, stream: PeerStreamId, remote: SocketAddr) {
        match self.peer_cx() {
            Some((agent, mut cx)) => agent.stream_accepted(&mut cx, stream, remote),
            None => {
                self.stats.peer.streams_refused += 1;
                push_event(&mut self.events, ClientEvent::ClosePeerStream { stream });
            }
        }
    }

    /// Handles [`Input::PeerStreamEnvelope`](super::Input::PeerStreamEnvelope).
    pub(super) fn on_peer_stream_envelope(&mut self, stream: PeerStreamId, envelope: &[u8]) {
        let Some((agent, mut cx)) = self.peer_cx() else {
            self.stats.peer.dropped_disabled += 1;
            return;
        };
        agent.handle_stream_envelope(&mut cx, stream, envelope);
    }

    /// Handles [`Input::PeerSessionOpen`](super::Input::PeerSessionOpen).
    pub(super) fn on_peer_session_open(&mut self, path: SocketAddr) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.session_open(&mut cx, path);
        }
    }

    /// Handles [`Input::PeerSessionFailed`](super::Input::PeerSessionFailed).
    pub(super) fn on_peer_session_failed(&mut self, path: SocketAddr) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.session_failed(&mut cx, path);
        }
    }

    /// Handles [`Input::PeerSessionDatagram`](super::Input::PeerSessionDatagram).
    pub(super) fn on_peer_session_datagram(&mut self, path: SocketAddr, datagram: &[u8]) {
        let Some((agent, mut cx)) = self.peer_cx() else {
            self.stats.peer.dropped_disabled += 1;
            return;
        };
        agent.handle_session_datagram(&mut cx, path, datagram);
    }

    /// Removes the peer tunnel with `peer` (a Configuration Release Request on its path) and
    /// puts its flows back on the relay. No new attempt follows until the backoff has passed
    /// and opted-in traffic to the peer continues, or an application opts a socket in again.
    pub fn release_peer_tunnel(&mut self, now: Instant, peer: IpAddr) {
        self.advance_clock(now);
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.release(&mut cx, peer);
        }
    }

    /// Where packets to `peer` go now.
    pub fn peer_path(&self, peer: IpAddr) -> PeerPath {
        self.peer
            .as_ref()
            .and_then(|a| a.find(peer).map(|i| &a.peers[i]))
            .filter(|p| p.phase == Phase::Up)
            .and_then(|p| match (p.stream, p.path, p.secure) {
                (Some(stream), Some(addr), _) => Some(PeerPath::Stream { stream, addr }),
                (None, Some(addr), Some(transport)) if p.secured => {
                    Some(PeerPath::Session { addr, transport })
                }
                (None, Some(addr), _) => Some(PeerPath::Peer(addr)),
                _ => None,
            })
            .unwrap_or(PeerPath::Relay)
    }

    /// Every peer the client holds state for.
    pub fn peer_tunnels(&self) -> Vec<PeerTunnelInfo> {
        self.peer.as_ref().map(PeerAgent::info).unwrap_or_default()
    }

    /// The agent and what it borrows from the client, when peer tunneling is on.
    pub(super) fn peer_cx(&mut self) -> Option<(&mut PeerAgent, Cx<'_>)> {
        let own4 = self
            .tunnel
            .as_ref()
            .and_then(|t| t.info.ipv4)
            .map(|a| a.addr);
        let own6 = self
            .tunnel
            .as_ref()
            .and_then(|t| t.info.ipv6)
            .map(|a| a.addr);
        let tunnel_id = self.tunnel.as_ref().map_or(0, |t| t.info.tunnel_id);
        let agent = self.peer.as_mut()?;
        Some((
            agent,
            Cx {
                now: self.now,
                sequence: &mut self.next_sequence,
                events: &mut self.events,
                stats: &mut self.stats,
                pool: &mut self.pool,
                inbound: &mut self.inbound,
                own4,
                own6,
                tunnel_id,
            },
        ))
    }

    /// `send_ip` of a checked packet: true when the agent took it for a peer path.
    pub(super) fn peer_route(&mut self, packet: &InnerPacket<'_>) -> bool {
        match self.peer_cx() {
            Some((agent, mut cx)) => agent.route_outbound(&mut cx, packet),
            None => false,
        }
    }

    /// The server tunnel is (again) usable: discover and announce.
    pub(super) fn peer_server_up(&mut self) {
        let announced = self.tunnel.as_ref().and_then(|t| t.info.stun_server);
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.start_discovery(&mut cx, announced);
        }
    }

    /// The server tunnel is gone for good.
    pub(super) fn peer_server_lost(&mut self) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.drop_all(&mut cx);
        }
    }

    /// Peer socket transmits, after everything for the server.
    pub(super) fn poll_peer_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Transmit> {
        let (agent, mut cx) = self.peer_cx()?;
        let destination = agent.poll_transmit(&mut cx, buf)?;
        self.stats.envelopes_sent += 1;
        Some(Transmit { destination })
    }

    pub(super) fn peer_poll_timeout(&self) -> Option<Instant> {
        self.peer.as_ref()?.poll_timeout()
    }

    pub(super) fn peer_handle_timeout(&mut self) {
        if let Some((agent, mut cx)) = self.peer_cx() {
            agent.handle_timeout(&mut cx);
        }
    }
}

/// The identification of an IPv4 fragment (a piece of a larger datagram).
fn fragment_id(packet: &InnerPacket<'_>) -> Option<u16> {
    let bytes = packet.as_bytes();
    if !crate::inner::fragment::is_fragment(bytes) {
        return None;
    }
    Some(u16::from_be_bytes([*bytes.get(4)?, *bytes.get(5)?]))
}
