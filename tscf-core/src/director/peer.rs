//! The peer service on the director (`docs/PROTOCOL.md` §7.3, §7.4, §7.6): it introduces two
//! clients to each other with fresh credentials, and tells a client when the other end of a
//! peer tunnel it introduced has lost its server tunnel.
//!
//! Its part in bounding probe reflection (§7.3): a token bucket of peer requests per tunnel,
//! another of introductions per initiator and destination, and no implausible candidate
//! forwarded. Every lookup on a request or a tunnel's close goes through an index, never a walk
//! of all negotiations.

use std::cmp::Reverse;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rand_core::RngCore;
use rustc_hash::FxHashMap;

use super::{ConnectionHandle, SessionDirector, Timer};
use arrayvec::ArrayVec;

use crate::rate::{self, TokenBucket};
use crate::wire::{
    Candidate, Capabilities, ConnectionInfo, Header, Message, MessageType, PeerCredentials,
    PeerServiceResult, ResultCode, ServiceAction, ServiceType, MAX_CANDIDATES,
};

/// The most peers one tunnel is remembered to have been introduced to; the oldest is forgotten
/// beyond it (it then gets no release notice).
pub(super) const MAX_PEERS_PER_TUNNEL: usize = 64;
/// Destinations whose introduction budget one initiator is remembered for; beyond, the one
/// closest to a full budget is forgotten.
const MAX_DESTINATIONS_PER_INITIATOR: usize = 16;

/// Peer service state of a director.
#[derive(Debug, Default)]
pub(super) struct PeerService {
    /// Requests forwarded to a destination and not yet answered, by the forwarded sequence.
    negotiations: FxHashMap<u32, Negotiation>,
    /// Pairs with a negotiation under way (smaller tunnel id first) → forwarded sequence.
    pending_pairs: FxHashMap<(u64, u64), u32>,
    /// The initiator's tunnel and request sequence → forwarded sequence, so that a
    /// retransmitted request is found at once.
    by_request: FxHashMap<(u64, u32), u32>,
    /// For each tunnel, the negotiations it takes part in (forwarded sequences).
    by_tunnel: FxHashMap<u64, Vec<u32>>,
    /// For each tunnel, the tunnels it was introduced to.
    introduced: FxHashMap<u64, Vec<u64>>,
    /// Release notices awaiting their response, by sequence.
    releases: FxHashMap<u32, Notice>,
    /// Release notices for tunnels that were persistent: the departed clients' addresses, sent
    /// when the tunnel is re-attached.
    held: FxHashMap<u64, Vec<IpAddr>>,
    /// The rate limits of each tunnel that made peer requests.
    requesters: FxHashMap<u64, Requester>,
}

#[cfg(test)]
impl PeerService {
    /// Sizes of the negotiations, their request index and their tunnel index.
    pub(super) fn indexed(&self) -> (usize, usize, usize) {
        (
            self.negotiations.len(),
            self.by_request.len(),
            self.by_tunnel.len(),
        )
    }
}

/// The rate limits of one initiator (§7.3).
#[derive(Debug, Default)]
struct Requester {
    requests: TokenBucket,
    /// Introductions towards each destination.
    towards: ArrayVec<(u64, TokenBucket), MAX_DESTINATIONS_PER_INITIATOR>,
}

/// What a client announced about its peer endpoint.
#[derive(Debug)]
pub(super) struct Announcement {
    candidates: ArrayVec<Candidate, MAX_CANDIDATES>,
    connection_info: Option<ConnectionInfo>,
    fingerprint: Option<[u8; 32]>,
}

#[derive(Debug)]
struct Negotiation {
    initiator: u64,
    responder: u64,
    /// The initiator's request header, to answer on its sequence number.
    request: Header,
    family_v6: bool,
    token: [u8; 16],
    /// The forwarded request, for retransmission on datagram transports.
    forwarded: Vec<u8>,
    sent: u32,
    deadline: Instant,
    /// The initiator was answered at once from the destination's announcement.
    answered: bool,
}

#[derive(Debug)]
struct Notice {
    tunnel: u64,
    /// The departed client's address, as the notice names it.
    departed: IpAddr,
    bytes: Vec<u8>,
    sent: u32,
}

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

/// Whether a candidate address may be forwarded at all (§7.3).
fn plausible(addr: SocketAddr, on_loopback: bool) -> bool {
    let ip = addr.ip().to_canonical();
    let broadcast = matches!(ip, IpAddr::V4(a) if a.is_broadcast());
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !broadcast
        && (on_loopback || !ip.is_loopback())
}

impl SessionDirector {
    /// A Client Service Request from tunnel `id` (not a duplicate of the last one answered).
    pub(super) fn handle_service_request(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        id: u64,
        request: &Message<'_>,
    ) {
        let header = request.header;
        let refuse = |d: &mut Self, result: ResultCode, peer: Option<PeerServiceResult>| {
            let mut reply = Message::response_to(&header, result);
            reply.tlvs.service_type = request.tlvs.service_type;
            reply.tlvs.peer_service_result = peer;
            reply.tlvs.peer_internal_address = request.tlvs.peer_internal_address;
            d.send_and_remember(connection, id, &header, &reply);
        };
        if request.tlvs.service_type != Some(ServiceType::PEER) || !self.config.peer_tunneling {
            return refuse(self, ResultCode::SERVICE_NOT_ENABLED, None);
        }
        let known = [
            ServiceAction::ESTABLISH,
            ServiceAction::RELEASE,
            ServiceAction::ANNOUNCE,
        ];
        if request
            .tlvs
            .service_action
            .is_some_and(|action| !known.contains(&action))
        {
            // An action this director does not know: not taken for an Establish (§7.3).
            self.stats.refused.protocol_errors += 1;
            return refuse(self, ResultCode::ILLEGAL_VALUE, None);
        }
        if request.tlvs.service_action == Some(ServiceAction::ANNOUNCE) {
            let candidates = self.forwardable(connection, &request.tlvs.candidates);
            if let Some(t) = self.tunnels.get_mut(&id) {
                t.announced = Some(Box::new(Announcement {
                    candidates,
                    connection_info: request.tlvs.connection_info,
                    fingerprint: request.tlvs.certificate_fingerprint,
                }));
            }
            return refuse(self, ResultCode::SUCCESS, None);
        }
        let Some(peer_addr) = request.tlvs.peer_internal_address else {
            return refuse(self, ResultCode::MALFORMED, None);
        };
        if request.tlvs.service_action == Some(ServiceAction::RELEASE) {
            match self.by_addr.get(&peer_addr) {
                Some(&other) => self.forget_introduction(id, other),
                None => self.remote_peer_released(id, peer_addr),
            }
            return refuse(self, ResultCode::SUCCESS, None);
        }
        // A retransmission of a request whose forward is still waiting for its answer.
        if self.peer.by_request.contains_key(&(id, header.sequence)) {
            return;
        }
        if !self.allow_peer_request(now, id) {
            return refuse(self, ResultCode::RATE_LIMITED, None);
        }
        let unavailable = Some(PeerServiceResult::UNAVAILABLE);
        if self.cluster.is_some() && !self.by_addr.contains_key(&peer_addr) {
            // Held by another director, perhaps.
            if !self.peer_request_across(now, connection, id, request) {
                return refuse(self, ResultCode::PEER_UNAVAILABLE, unavailable);
            }
            return;
        }
        let Some(&dest) = self.by_addr.get(&peer_addr).filter(|d| **d != id) else {
            return refuse(self, ResultCode::PEER_UNAVAILABLE, unavailable);
        };
        let Some(d) = self.tunnels.get(&dest) else {
            return refuse(self, ResultCode::PEER_UNAVAILABLE, unavailable);
        };
        let capable = d.capabilities.contains(Capabilities::PEER_TUNNELING);
        let Some(dest_connection) = d.connection.filter(|_| capable) else {
            return refuse(self, ResultCode::PEER_UNAVAILABLE, unavailable);
        };
        if self.peer.pending_pairs.contains_key(&pair(id, dest)) {
            // The other side asked first: it initiates, this client acts as destination.
            return refuse(
                self,
                ResultCode::SUCCESS,
                Some(PeerServiceResult::IN_PROGRESS),
            );
        }
        let family_v6 = peer_addr.is_ipv6();
        let Some(initiator_addr) = self.tunnel_address(id, family_v6) else {
            return refuse(self, ResultCode::PEER_UNAVAILABLE, unavailable);
        };
        if !self.allow_introduction(now, id, dest) {
            return refuse(self, ResultCode::RATE_LIMITED, None);
        }
        let sequence = self.next_director_sequence();
        let (forward, token) =
            self.establish_forward(connection, request, initiator_addr, sequence, dest);
        let mut bytes = Vec::new();
        if !self.encode_control(Some(dest), &forward, &mut bytes) {
            return refuse(self, ResultCode::INTERNAL_ERROR, None);
        }
        self.control_out.push_back((dest_connection, bytes.clone()));
        let deadline = now + self.config.peer_answer_timeout;
        let rto = now + self.config.retransmit.rto(1);
        self.timers
            .push(Reverse((deadline.min(rto), Timer::PeerAnswer(sequence))));
        self.peer.pending_pairs.insert(pair(id, dest), sequence);
        self.peer.by_request.insert((id, header.sequence), sequence);
        for t in [id, dest] {
            self.peer.by_tunnel.entry(t).or_default().push(sequence);
        }
        // Fast path (§7.3): a destination that announced its candidates is known to be able to
        // answer, so the initiator hears them now and both sides start probing about one server
        // round trip after the request instead of two.
        let answered = self.answer_from_announcement(id, dest, &header, family_v6, token);
        self.peer.negotiations.insert(
            sequence,
            Negotiation {
                initiator: id,
                responder: dest,
                request: header,
                family_v6,
                token,
                forwarded: bytes,
                sent: 1,
                deadline,
                answered,
            },
        );
        self.stats.peer.requests_forwarded += 1;
    }

    /// A peer Establish of tunnel `id` for an address no local tunnel holds: sent to the
    /// director that holds it, within the same limits as a local one. False when it cannot
    /// be (then answered Peer Unavailable); answered otherwise, now or when the other
    /// director answers.
    fn peer_request_across(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        id: u64,
        request: &Message<'_>,
    ) -> bool {
        let header = request.header;
        let Some(peer_addr) = request.tlvs.peer_internal_address else {
            return false;
        };
        let family_v6 = peer_addr.is_ipv6();
        let Some(initiator_addr) = self.tunnel_address(id, family_v6) else {
            return false;
        };
        // The introduction budget is kept per destination address here (its tunnel id is
        // the other director's), folded into the id space with the top bit set.
        let dest_key = match peer_addr {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        } | (1 << 63);
        if !self.allow_introduction(now, id, dest_key) {
            let mut reply = Message::response_to(&header, ResultCode::RATE_LIMITED);
            reply.tlvs.service_type = request.tlvs.service_type;
            reply.tlvs.peer_internal_address = Some(peer_addr);
            self.send_and_remember(connection, id, &header, &reply);
            return true;
        }
        // Sequence and tunnel id are the other director's to set.
        let (forward, token) = self.establish_forward(connection, request, initiator_addr, 0, 0);
        self.peer_request_to_mesh(now, id, header, peer_addr, forward, token)
    }

    /// The Establish forwarded to destination tunnel `dest` as director request `sequence`:
    /// the initiator's candidates worth forwarding, its connection info and fingerprint, and a
    /// fresh token for the pair, which it returns too.
    fn establish_forward(
        &mut self,
        connection: ConnectionHandle,
        request: &Message<'_>,
        initiator_addr: IpAddr,
        sequence: u32,
        dest: u64,
    ) -> (Message<'static>, [u8; 16]) {
        let mut token = [0u8; 16];
        self.rng.fill_bytes(&mut token);
        let mut forward = Message::new(MessageType::CLIENT_SERVICE_REQUEST, sequence, dest);
        forward.tlvs.service_type = Some(ServiceType::PEER);
        forward.tlvs.service_action = Some(ServiceAction::ESTABLISH);
        forward.tlvs.peer_internal_address = Some(initiator_addr);
        forward.tlvs.connection_info = request.tlvs.connection_info;
        forward.tlvs.candidates = self.forwardable(connection, &request.tlvs.candidates);
        forward.tlvs.peer_credentials = Some(PeerCredentials {
            token,
            fingerprint: request.tlvs.certificate_fingerprint,
        });
        (forward, token)
    }

    /// Whether tunnel `id`'s request `sequence` was forwarded and waits for its answer.
    pub(super) fn peer_request_waiting(&self, id: u64, sequence: u32) -> bool {
        self.peer
            .negotiations
            .values()
            .any(|n| n.initiator == id && n.request.sequence == sequence)
            || self.peer_request_asked(id, sequence)
    }

    /// Tunnel `id` left for another director: its peer state goes without a word to anyone
    /// (its client is still there, elsewhere).
    pub(super) fn peer_forget(&mut self, id: u64) {
        for sequence in self.peer.by_tunnel.remove(&id).unwrap_or_default() {
            self.take_negotiation(sequence);
        }
        self.peer.held.remove(&id);
        self.peer.requesters.remove(&id);
        self.remote_peers_forget(id);
        for other in self.peer.introduced.remove(&id).unwrap_or_default() {
            if let Some(list) = self.peer.introduced.get_mut(&other) {
                list.retain(|t| *t != id);
            }
        }
    }

    /// A Client Service Response from tunnel `id`: a destination's answer, or the ack of a
    /// release notice.
    pub(super) fn handle_service_response(&mut self, id: u64, response: &Message<'_>) {
        let sequence = response.header.sequence;
        if self
            .peer
            .releases
            .get(&sequence)
            .is_some_and(|n| n.tunnel == id)
        {
            self.peer.releases.remove(&sequence);
            return;
        }
        if self.mesh_peer_answered(id, response) {
            return;
        }
        let Some(n) = self.peer.negotiations.get(&sequence) else {
            self.stats.dropped.unexpected_message += 1;
            return;
        };
        if n.responder != id {
            self.stats.dropped.unexpected_message += 1;
            return;
        }
        let Some(n) = self.take_negotiation(sequence) else {
            return;
        };
        if n.answered {
            // The initiator already has the announced candidates; a refusal here shows up as
            // a failed probe on its side, and the flows stay on the relay.
            return;
        }
        let available = response.tlvs.result_code == Some(ResultCode::SUCCESS)
            && response.tlvs.peer_service_result == Some(PeerServiceResult::AVAILABLE);
        let responder_addr = self.tunnel_address(id, n.family_v6);
        let mut reply = if available {
            let mut reply = Message::response_to(&n.request, ResultCode::SUCCESS);
            reply.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
            reply.tlvs.connection_info = response.tlvs.connection_info;
            reply.tlvs.candidates = response.tlvs.candidates.clone();
            reply.tlvs.peer_credentials = Some(PeerCredentials {
                token: n.token,
                fingerprint: response.tlvs.certificate_fingerprint,
            });
            self.remember_introduction(n.initiator, n.responder);
            self.stats.peer.introductions += 1;
            reply
        } else {
            self.stats.peer.refused_by_destination += 1;
            let mut reply = Message::response_to(&n.request, ResultCode::PEER_UNAVAILABLE);
            reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
            reply
        };
        reply.tlvs.service_type = Some(ServiceType::PEER);
        reply.tlvs.peer_internal_address = responder_addr;
        self.answer_initiator(n.initiator, &n.request, &reply);
    }

    /// The answer timer of a forwarded request: retransmit it, or give up with Peer Timeout.
    pub(super) fn peer_answer_timer(&mut self, now: Instant, sequence: u32) {
        let Some(n) = self.peer.negotiations.get_mut(&sequence) else {
            return;
        };
        if now < n.deadline {
            let responder = self.tunnels.get(&n.responder);
            let connection =
                responder.and_then(|t| t.connection.filter(|_| t.transport.is_datagram()));
            if let Some(c) = connection {
                n.sent += 1;
                self.control_out.push_back((c, n.forwarded.clone()));
            }
            let next = now + self.config.retransmit.rto(n.sent);
            self.timers
                .push(Reverse((next.min(n.deadline), Timer::PeerAnswer(sequence))));
            return;
        }
        let Some(n) = self.take_negotiation(sequence) else {
            return;
        };
        if n.answered {
            return;
        }
        self.stats.peer.timeouts += 1;
        let mut reply = Message::response_to(&n.request, ResultCode::PEER_TIMEOUT);
        reply.tlvs.service_type = Some(ServiceType::PEER);
        reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
        reply.tlvs.peer_internal_address = self.tunnel_address(n.responder, n.family_v6);
        self.answer_initiator(n.initiator, &n.request, &reply);
    }

    /// Retransmits a release notice on a datagram transport until it is answered.
    pub(super) fn peer_release_timer(&mut self, now: Instant, sequence: u32) {
        let max = self.config.retransmit.max_transmissions;
        let Some(n) = self.peer.releases.get_mut(&sequence) else {
            return;
        };
        let tunnel = self.tunnels.get(&n.tunnel);
        match tunnel.map(|t| t.connection) {
            Some(Some(c)) if n.sent < max => {
                n.sent += 1;
                self.control_out.push_back((c, n.bytes.clone()));
                let at = now + self.config.retransmit.rto(n.sent);
                self.timers
                    .push(Reverse((at, Timer::PeerRelease(sequence))));
            }
            Some(None) => {
                // Persistent: the notice waits for the re-attach.
                if let Some(n) = self.peer.releases.remove(&sequence) {
                    self.hold_notice(n.tunnel, n.departed);
                }
            }
            _ => {
                self.peer.releases.remove(&sequence);
            }
        }
    }

    /// Tunnel `id` was re-attached: the release notices it missed while persistent go out.
    pub(super) fn peer_reattached(&mut self, now: Instant, id: u64) {
        for departed in self.peer.held.remove(&id).unwrap_or_default() {
            self.send_release_notice(now, id, departed);
        }
    }

    /// Tunnel `id` closed: fail the negotiations it was part of and tell the clients it was
    /// introduced to that their peer tunnel with it is gone.
    pub(super) fn peer_tunnel_closed(&mut self, now: Instant, id: u64, addresses: &[IpAddr]) {
        for sequence in self.peer.by_tunnel.remove(&id).unwrap_or_default() {
            let Some(n) = self.take_negotiation(sequence) else {
                continue;
            };
            if n.initiator != id {
                let mut reply = Message::response_to(&n.request, ResultCode::PEER_UNAVAILABLE);
                reply.tlvs.service_type = Some(ServiceType::PEER);
                reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
                self.answer_initiator(n.initiator, &n.request, &reply);
            }
        }
        // Its own pending notices die at their next timer; the held ones and its limits now.
        self.peer.held.remove(&id);
        self.peer.requesters.remove(&id);
        // Partners held by other directors hear it from them.
        self.remote_peers_gone(id, addresses);
        let Some(partners) = self.peer.introduced.remove(&id) else {
            return;
        };
        for other in partners {
            if let Some(list) = self.peer.introduced.get_mut(&other) {
                list.retain(|t| *t != id);
            }
            let Some(t) = self.tunnels.get(&other) else {
                continue;
            };
            // Name the departed client by the address family the partner uses.
            let Some(&addr) = addresses
                .iter()
                .find(|a| t.owns_family(a.is_ipv6()))
                .or(addresses.first())
            else {
                continue;
            };
            if t.connection.is_some() {
                self.send_release_notice(now, other, addr);
            } else {
                self.hold_notice(other, addr);
            }
        }
    }

    /// Tells tunnel `to` that the client at `departed` lost its server tunnel (§7.6), and
    /// retransmits on a datagram transport until answered.
    pub(super) fn send_release_notice(&mut self, now: Instant, to: u64, departed: IpAddr) {
        let Some(t) = self.tunnels.get(&to) else {
            return;
        };
        let Some(connection) = t.connection else {
            return self.hold_notice(to, departed);
        };
        let datagram = t.transport.is_datagram();
        let sequence = self.next_director_sequence();
        let mut notice = Message::new(MessageType::CLIENT_SERVICE_REQUEST, sequence, to);
        notice.tlvs.service_type = Some(ServiceType::PEER);
        notice.tlvs.service_action = Some(ServiceAction::RELEASE);
        notice.tlvs.peer_internal_address = Some(departed);
        let mut bytes = Vec::new();
        if !self.encode_control(Some(to), &notice, &mut bytes) {
            return;
        }
        self.control_out.push_back((connection, bytes.clone()));
        self.stats.peer.release_notices += 1;
        if datagram {
            self.peer.releases.insert(
                sequence,
                Notice {
                    tunnel: to,
                    departed,
                    bytes,
                    sent: 1,
                },
            );
            let at = now + self.config.retransmit.rto(1);
            self.timers
                .push(Reverse((at, Timer::PeerRelease(sequence))));
        }
    }

    /// Keeps a release notice for persistent tunnel `to` until it is re-attached.
    fn hold_notice(&mut self, to: u64, departed: IpAddr) {
        let held = self.peer.held.entry(to).or_default();
        if held.contains(&departed) {
            return;
        }
        if held.len() >= MAX_PEERS_PER_TUNNEL {
            held.remove(0);
        }
        held.push(departed);
        self.stats.peer.release_notices_held += 1;
    }

    /// Answers the initiator from the destination's announcement, if it made one.
    fn answer_from_announcement(
        &mut self,
        initiator: u64,
        dest: u64,
        request: &Header,
        family_v6: bool,
        token: [u8; 16],
    ) -> bool {
        let Some(a) = self.tunnels.get(&dest).and_then(|t| t.announced.as_deref()) else {
            return false;
        };
        let mut reply = Message::response_to(request, ResultCode::SUCCESS);
        reply.tlvs.service_type = Some(ServiceType::PEER);
        reply.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
        reply.tlvs.candidates = a.candidates.clone();
        reply.tlvs.connection_info = a.connection_info;
        reply.tlvs.peer_credentials = Some(PeerCredentials {
            token,
            fingerprint: a.fingerprint,
        });
        reply.tlvs.peer_internal_address = self.tunnel_address(dest, family_v6);
        self.remember_introduction(initiator, dest);
        self.stats.peer.introductions += 1;
        self.stats.peer.answered_from_announcement += 1;
        self.answer_initiator(initiator, request, &reply);
        true
    }

    /// Ends negotiation `sequence`, freeing its pair for a new one.
    fn take_negotiation(&mut self, sequence: u32) -> Option<Negotiation> {
        let n = self.peer.negotiations.remove(&sequence)?;
        self.peer
            .pending_pairs
            .remove(&pair(n.initiator, n.responder));
        self.peer
            .by_request
            .remove(&(n.initiator, n.request.sequence));
        for t in [n.initiator, n.responder] {
            if let Some(list) = self.peer.by_tunnel.get_mut(&t) {
                list.retain(|s| *s != sequence);
                if list.is_empty() {
                    self.peer.by_tunnel.remove(&t);
                }
            }
        }
        Some(n)
    }

    pub(super) fn answer_initiator(
        &mut self,
        initiator: u64,
        request: &Header,
        reply: &Message<'_>,
    ) {
        let Some(connection) = self.tunnels.get(&initiator).and_then(|t| t.connection) else {
            return;
        };
        self.send_and_remember(connection, initiator, request, reply);
    }

    /// The token bucket of peer requests of tunnel `id` (§7.3): false when it is empty.
    fn allow_peer_request(&mut self, now: Instant, id: u64) -> bool {
        let (limit, window) = (
            self.config.peer_request_limit,
            self.config.peer_request_window,
        );
        if !self.tunnels.contains_key(&id) {
            return false;
        }
        let bucket = &mut self.peer.requesters.entry(id).or_default().requests;
        let interval = rate::interval(u32::from(limit), window);
        if limit == 0 || !bucket.take(now, u32::from(limit), interval) {
            self.stats.peer.rate_limited += 1;
            return false;
        }
        true
    }

    /// The token bucket of introductions of initiator `id` to `dest` (§7.3): false when it is
    /// empty.
    fn allow_introduction(&mut self, now: Instant, id: u64, dest: u64) -> bool {
        let (limit, window) = (
            self.config.peer_introduction_limit,
            self.config.peer_introduction_window,
        );
        let interval = rate::interval(u32::from(limit), window);
        let towards = &mut self.peer.requesters.entry(id).or_default().towards;
        let k = match towards.iter().position(|(d, _)| *d == dest) {
            Some(k) => k,
            None => {
                if towards.is_full() {
                    // Forget the destination whose bucket is fullest (soonest full again).
                    let fullest = towards
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, b))| b.available_at(now, u32::from(limit), interval))
                        .map(|(k, _)| k);
                    if let Some(k) = fullest {
                        towards.swap_remove(k);
                    }
                }
                towards.push((dest, TokenBucket::default()));
                towards.len() - 1
            }
        };
        if limit == 0 || !towards[k].1.take(now, u32::from(limit), interval) {
            self.stats.peer.introductions_limited += 1;
            return false;
        }
        true
    }

    /// The candidates of a request or an announcement made on `connection` that are worth
    /// forwarding: no unspecified, multicast or broadcast address, no loopback address unless
    /// the client itself reaches us from loopback, no duplicate.
    fn forwardable(
        &mut self,
        connection: ConnectionHandle,
        candidates: &[Candidate],
    ) -> ArrayVec<Candidate, MAX_CANDIDATES> {
        let on_loopback = self
            .connections
            .get(&connection)
            .is_some_and(|c| c.info.remote.ip().to_canonical().is_loopback());
        let mut out = ArrayVec::new();
        for c in candidates {
            if plausible(c.addr, on_loopback) && !out.iter().any(|o: &Candidate| o.addr == c.addr) {
                out.push(*c);
            } else {
                self.stats.peer.candidates_dropped += 1;
            }
        }
        out
    }

    fn remember_introduction(&mut self, a: u64, b: u64) {
        for (x, y) in [(a, b), (b, a)] {
            let list = self.peer.introduced.entry(x).or_default();
            if !list.contains(&y) {
                if list.len() >= MAX_PEERS_PER_TUNNEL {
                    list.remove(0);
                }
                list.push(y);
            }
        }
    }

    fn forget_introduction(&mut self, a: u64, b: u64) {
        for (x, y) in [(a, b), (b, a)] {
            if let Some(list) = self.peer.introduced.get_mut(&x) {
                list.retain(|t| *t != y);
            }
        }
    }

    fn tunnel_address(&self, id: u64, v6: bool) -> Option<IpAddr> {
        let t = self.tunnels.get(&id)?;
        if v6 {
            t.ipv6.map(|(a, _)| IpAddr::V6(a))
        } else {
            t.ipv4.map(|(a, _)| IpAddr::V4(a))
        }
    }
}
