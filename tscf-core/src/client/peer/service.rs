//! The agent and the director: NAT discovery and the Announce (§7.2), Establish requests and
//! their answers (§7.3, §7.4), and the director's forwarded requests and release notices.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arrayvec::ArrayVec;
use rand_core::RngCore;

use super::probe::delivered_octets;
use super::session::Agreement;
use super::{after, Cx, PeerAgent, PeerDownReason, Phase, Role};
use crate::client::ClientEvent;
use crate::stun::{self, NatDiscovery, NatDiscoveryConfig, NatEvent};
use crate::wire::{
    Candidate, CandidateKind, ConnectionInfo, Message, MessageType, PeerServiceResult, ResultCode,
    ServiceAction, ServiceType, Transport, MAX_CANDIDATES,
};

/// Transmissions of one Client Service Request on a datagram transport (§6.3).
const MAX_TRANSMISSIONS: u32 = 7;
const INITIAL_RTO: Duration = Duration::from_millis(250);
const MAX_RTO: Duration = Duration::from_secs(4);

/// NAT discovery of the peer socket.
#[derive(Debug)]
pub(super) enum Discovery {
    /// Not started (no server tunnel yet).
    Idle,
    Running {
        nat: Box<NatDiscovery>,
        deadline: Instant,
        /// The first mapping heard, used if the run is cut short.
        first: Option<SocketAddr>,
    },
    Done,
}

impl Discovery {
    pub(super) fn is_done(&self) -> bool {
        matches!(self, Self::Done)
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Running { nat, deadline, .. } => {
                Some(nat.poll_timeout().map_or(*deadline, |t| t.min(*deadline)))
            }
            _ => None,
        }
    }

    pub(super) fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        match self {
            Self::Running { nat, .. } => nat.poll_transmit(now, buf).map(|t| t.destination),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    Announce,
    Establish(std::net::IpAddr),
}

/// One outstanding Client Service Request of the agent.
#[derive(Debug)]
pub(super) struct ServiceRequest {
    pub(super) sequence: u32,
    kind: RequestKind,
    envelope: Vec<u8>,
    transmissions: u32,
    due: bool,
    /// Datagram transports: the next retransmission.
    next_at: Option<Instant>,
    /// The request fails here.
    deadline: Instant,
}

impl ServiceRequest {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        Some(self.next_at.map_or(self.deadline, |t| t.min(self.deadline)))
    }
}

impl PeerAgent {
    // ---- discovery and announce ----

    /// The server tunnel is up (fresh or re-attached): learn our server-reflexive address,
    /// then announce our candidates. The configured STUN servers are asked, or else the one
    /// the director `announced`.
    pub(super) fn start_discovery(&mut self, cx: &mut Cx<'_>, announced: Option<SocketAddr>) {
        // Requests sent on the old transport go out again on the new one.
        for r in &mut self.requests {
            r.due = true;
        }
        self.announced_stun = announced;
        self.run_discovery(cx);
    }

    /// Runs NAT discovery (again): the configured STUN servers, else the one the director
    /// announced. Negotiations started meanwhile wait for it.
    pub(super) fn run_discovery(&mut self, cx: &mut Cx<'_>) {
        let servers = match (self.config.stun_servers.is_empty(), self.announced_stun) {
            (false, _) => self.config.stun_servers.clone(),
            (true, Some(server)) => vec![server],
            (true, None) => {
                self.discovery = Discovery::Idle;
                return self.finish_discovery(cx, None, None);
            }
        };
        // Each run gets its own key from the agent's generator.
        let mut seed = [0; 32];
        self.rng.fill_bytes(&mut seed);
        let nat = NatDiscovery::new(NatDiscoveryConfig::new(servers), seed, cx.now);
        self.discovery = Discovery::Running {
            nat: Box::new(nat),
            deadline: after(cx.now, self.config.discovery_timeout),
            first: None,
        };
    }

    pub(super) fn handle_stun(&mut self, cx: &mut Cx<'_>, from: SocketAddr, datagram: &[u8]) {
        let Discovery::Running { nat, .. } = &mut self.discovery else {
            cx.stats.peer.dropped_stun += 1;
            return;
        };
        if !nat.handle_input(cx.now, from, datagram) {
            cx.stats.peer.dropped_stun += 1;
        }
        self.drain_discovery(cx);
    }

    pub(super) fn discovery_timeout(&mut self, cx: &mut Cx<'_>) {
        let Discovery::Running {
            nat,
            deadline,
            first,
        } = &mut self.discovery
        else {
            return;
        };
        if *deadline <= cx.now {
            let first = *first;
            return self.finish_discovery(cx, first, None);
        }
        if nat.poll_timeout().is_some_and(|t| t <= cx.now) {
            nat.handle_timeout(cx.now);
        }
        self.drain_discovery(cx);
    }

    fn drain_discovery(&mut self, cx: &mut Cx<'_>) {
        loop {
            let Discovery::Running { nat, first, .. } = &mut self.discovery else {
                return;
            };
            match nat.poll_event() {
                Some(NatEvent::Mapped { mapped, .. }) => {
                    first.get_or_insert(mapped);
                }
                Some(NatEvent::Finished(report)) => {
                    let public = report.public_address();
                    let varies = report.mapping_varies_by_destination();
                    return self.finish_discovery(cx, public, varies);
                }
                Some(_) => {}
                None => return,
            }
        }
    }

    fn finish_discovery(
        &mut self,
        cx: &mut Cx<'_>,
        public: Option<SocketAddr>,
        varies_by_destination: Option<bool>,
    ) {
        self.discovery = Discovery::Done;
        self.srflx = public;
        cx.event(ClientEvent::NatDiscovered {
            public,
            varies_by_destination,
        });
        if self.config.announce {
            self.send_announce(cx);
        }
        for i in 0..self.peers.len() {
            if self.peers[i].phase == Phase::Discovering {
                self.send_establish(cx, i);
            }
        }
    }

    /// Our candidates: UDP host addresses, the server-reflexive one, then the host candidates
    /// of the stream listeners (§7.7).
    fn candidates(&self) -> ArrayVec<Candidate, MAX_CANDIDATES> {
        let mut out = ArrayVec::new();
        let hosts = self
            .config
            .local_addresses
            .iter()
            .map(|a| (CandidateKind::HOST, Transport::UDP, *a));
        let srflx = self
            .srflx
            .filter(|s| !self.config.local_addresses.contains(s))
            .map(|a| (CandidateKind::SERVER_REFLEXIVE, Transport::UDP, a));
        let streams = self
            .config
            .stream_listeners
            .iter()
            .map(|(t, a)| (CandidateKind::HOST, *t, *a));
        for (kind, transport, addr) in hosts.chain(srflx).chain(streams) {
            if out.len() < MAX_CANDIDATES {
                out.push(Candidate {
                    kind,
                    transport,
                    addr,
                });
            }
        }
        out
    }

    fn connection_info(&self) -> Option<ConnectionInfo> {
        self.config
            .local_addresses
            .first()
            .map(|&addr| ConnectionInfo {
                transport: self.config.transport,
                addr,
            })
    }

    fn send_announce(&mut self, cx: &mut Cx<'_>) {
        self.requests.retain(|r| r.kind != RequestKind::Announce);
        let sequence = cx.take_sequence();
        let mut msg = Message::new(MessageType::CLIENT_SERVICE_REQUEST, sequence, cx.tunnel_id);
        msg.tlvs.service_type = Some(ServiceType::PEER);
        msg.tlvs.service_action = Some(ServiceAction::ANNOUNCE);
        msg.tlvs.candidates = self.candidates();
        msg.tlvs.connection_info = self.connection_info();
        msg.tlvs.certificate_fingerprint = self.config.certificate_fingerprint;
        if self.push_request(cx, RequestKind::Announce, &msg) {
            cx.stats.peer.announces_sent += 1;
        }
    }

    /// Asks the director for a peer tunnel to peer `i`.
    pub(super) fn send_establish(&mut self, cx: &mut Cx<'_>, i: usize) {
        let peer = self.peers[i].addr;
        let sequence = cx.take_sequence();
        let mut msg = Message::new(MessageType::CLIENT_SERVICE_REQUEST, sequence, cx.tunnel_id);
        msg.tlvs.service_type = Some(ServiceType::PEER);
        msg.tlvs.service_action = Some(ServiceAction::ESTABLISH);
        msg.tlvs.peer_internal_address = Some(peer);
        msg.tlvs.candidates = self.candidates();
        msg.tlvs.connection_info = self.connection_info();
        msg.tlvs.certificate_fingerprint = self.config.certificate_fingerprint;
        if !self.push_request(cx, RequestKind::Establish(peer), &msg) {
            return self.down(cx, i, PeerDownReason::Unavailable(ResultCode::RATE_LIMITED));
        }
        cx.stats.peer.requests_sent += 1;
        let p = &mut self.peers[i];
        p.phase = Phase::Requesting;
        p.request = Some(sequence);
    }

    /// Adds a request to the table; false when the table is full.
    fn push_request(&mut self, cx: &mut Cx<'_>, kind: RequestKind, msg: &Message<'_>) -> bool {
        if self.requests.is_full() {
            return false;
        }
        let mut envelope = Vec::new();
        // At most 8 candidates and a few fixed-size TLVs: far below 2048 octets.
        if msg.encode_envelope(&mut envelope).is_err() {
            return false;
        }
        self.requests.push(ServiceRequest {
            sequence: msg.header.sequence,
            kind,
            envelope,
            transmissions: 0,
            due: true,
            next_at: None,
            deadline: after(cx.now, self.config.answer_timeout),
        });
        true
    }

    /// Writes the next due request for the server into `buf`; false when none is due.
    pub(in crate::client) fn poll_server(
        &mut self,
        cx: &mut Cx<'_>,
        buf: &mut Vec<u8>,
        datagram: bool,
    ) -> bool {
        let Some(r) = self.requests.iter_mut().find(|r| r.due) else {
            return false;
        };
        buf.extend_from_slice(&r.envelope);
        r.due = false;
        r.transmissions += 1;
        if r.transmissions > 1 {
            cx.stats.peer.request_retransmissions += 1;
        }
        r.next_at = (datagram && r.transmissions < MAX_TRANSMISSIONS).then(|| {
            let doublings = r.transmissions.saturating_sub(1).min(16);
            after(
                cx.now,
                INITIAL_RTO.saturating_mul(1 << doublings).min(MAX_RTO),
            )
        });
        true
    }

    pub(super) fn requests_timeout(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        for r in &mut self.requests {
            if r.next_at.is_some_and(|t| t <= now) {
                r.next_at = None;
                r.due = true;
            }
        }
        while let Some(pos) = self.requests.iter().position(|r| r.deadline <= now) {
            let r = self.requests.remove(pos);
            cx.stats.peer.requests_timed_out += 1;
            if let RequestKind::Establish(peer) = r.kind {
                let waiting = self
                    .find(peer)
                    .filter(|i| self.peers[*i].request == Some(r.sequence));
                if let Some(i) = waiting {
                    self.down(cx, i, PeerDownReason::Unavailable(ResultCode::PEER_TIMEOUT));
                }
            }
        }
    }

    /// A Client Service Response from the server: true when it answered one of our requests.
    pub(in crate::client) fn on_service_response(
        &mut self,
        cx: &mut Cx<'_>,
        msg: &Message<'_>,
    ) -> bool {
        let Some(pos) = self
            .requests
            .iter()
            .position(|r| r.sequence == msg.header.sequence && r.transmissions > 0)
        else {
            return false;
        };
        let request = self.requests.remove(pos);
        let RequestKind::Establish(peer) = request.kind else {
            return true;
        };
        let Some(i) = self
            .find(peer)
            .filter(|i| self.peers[*i].request == Some(request.sequence))
        else {
            // The negotiation moved on (a forwarded request replaced it).
            return true;
        };
        self.peers[i].request = None;
        if self.peers[i].phase != Phase::Requesting {
            return true;
        }
        let result = msg.tlvs.result_code.unwrap_or(ResultCode::MALFORMED);
        match (
            result,
            msg.tlvs.peer_service_result,
            msg.tlvs.peer_credentials,
        ) {
            (ResultCode::SUCCESS, Some(PeerServiceResult::AVAILABLE), Some(credentials)) => {
                let offer = msg.tlvs.connection_info.map(|c| c.transport);
                let agreement = self.agree(offer, credentials.fingerprint);
                if agreement == Agreement::Refused {
                    cx.stats.peer.insecure_refused += 1;
                    self.down(cx, i, PeerDownReason::InsecureRefused);
                    return true;
                }
                let p = &mut self.peers[i];
                p.role = Role::Initiator;
                p.token = Some(credentials.token);
                p.fingerprint = credentials.fingerprint;
                p.secure = match agreement {
                    Agreement::Secure(t) => Some(t),
                    _ => None,
                };
                p.phase = Phase::Probing;
                self.set_candidates(cx, i, &msg.tlvs.candidates);
                let p = &mut self.peers[i];
                p.next_stream_at = (!p.stream_candidates.is_empty())
                    .then(|| after(cx.now, self.config.stream_fallback_delay));
                self.start_checks(cx, i, delivered_octets(msg));
            }
            (ResultCode::SUCCESS, Some(PeerServiceResult::IN_PROGRESS), _) => {
                let p = &mut self.peers[i];
                p.role = Role::Destination;
                p.phase = Phase::AwaitingForward;
                let wait = after(cx.now, self.config.answer_timeout);
                p.deadline = Some(p.deadline.map_or(wait, |d| d.max(wait)));
            }
            (ResultCode::SUCCESS, _, _) => {
                self.down(
                    cx,
                    i,
                    PeerDownReason::Unavailable(ResultCode::PEER_UNAVAILABLE),
                );
            }
            _ => self.down(cx, i, PeerDownReason::Unavailable(result)),
        }
        true
    }

    /// A Client Service Request of service type Peer from the director: a forwarded request
    /// (we are the destination) or a release notice. Returns the answer.
    pub(in crate::client) fn on_service_request(
        &mut self,
        cx: &mut Cx<'_>,
        msg: &Message<'_>,
    ) -> Message<'static> {
        let pia = msg.tlvs.peer_internal_address;
        let refuse = |result| {
            let mut reply = Message::response_to(&msg.header, result);
            reply.tlvs.service_type = Some(ServiceType::PEER);
            reply.tlvs.peer_internal_address = pia;
            if result != ResultCode::SUCCESS {
                reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
            }
            reply
        };
        match msg.tlvs.service_action {
            Some(ServiceAction::RELEASE) => {
                if let Some(i) = pia.and_then(|a| self.find(a)) {
                    let keep = self.config.keep_on_peer_server_tunnel_loss
                        && self.peers[i].phase == Phase::Up;
                    if self.peers[i].phase != Phase::Fallback && !keep {
                        // The peer may still be there (its own policy may keep the tunnel).
                        self.tell_release(cx, i);
                        self.down(cx, i, PeerDownReason::PeerServerTunnelGone);
                    }
                }
                refuse(ResultCode::SUCCESS)
            }
            Some(ServiceAction::ESTABLISH) => {
                let (Some(peer), Some(credentials)) = (pia, msg.tlvs.peer_credentials) else {
                    return refuse(ResultCode::PEER_UNAVAILABLE);
                };
                if cx.own_for(peer).is_none() || cx.owns(peer) {
                    return refuse(ResultCode::PEER_UNAVAILABLE);
                }
                cx.stats.peer.forwarded_requests += 1;
                let offer = msg.tlvs.connection_info.map(|c| c.transport);
                let agreement = self.agree(offer, credentials.fingerprint);
                if agreement == Agreement::Refused {
                    cx.stats.peer.insecure_refused += 1;
                    return refuse(ResultCode::PEER_UNAVAILABLE);
                }
                let i = self.find_or_insert(cx, peer);
                let p = &self.peers[i];
                let same = p.token == Some(credentials.token) && p.phase != Phase::Fallback;
                if !same {
                    self.become_destination(cx, i, credentials.token, msg);
                    let p = &mut self.peers[i];
                    p.fingerprint = credentials.fingerprint;
                    p.secure = match agreement {
                        Agreement::Secure(t) => Some(t),
                        _ => None,
                    };
                }
                let mut reply = refuse(ResultCode::SUCCESS);
                reply.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
                reply.tlvs.candidates = self.candidates();
                reply.tlvs.connection_info = self.connection_info();
                reply.tlvs.certificate_fingerprint = self.config.certificate_fingerprint;
                reply
            }
            _ => refuse(ResultCode::PEER_UNAVAILABLE),
        }
    }

    /// The director introduced us as destination with `token`: the newer negotiation replaces
    /// whatever we had (the director is authoritative), and probing starts at once.
    fn become_destination(
        &mut self,
        cx: &mut Cx<'_>,
        i: usize,
        token: [u8; 16],
        request: &Message<'_>,
    ) {
        if self.peers[i].phase == Phase::Up {
            self.down(cx, i, PeerDownReason::Replaced);
        }
        let establish = self.config.establish_timeout;
        let p = &mut self.peers[i];
        let pending = p.request;
        let keep_start = p.in_setup();
        p.reset();
        if !keep_start {
            p.started = cx.now;
            p.setup = None;
        }
        p.role = Role::Destination;
        p.token = Some(token);
        p.retry_at = None;
        p.last_used = cx.now;
        p.phase = Phase::Probing;
        p.deadline = Some(after(cx.now, establish));
        self.forget_request(pending);
        self.set_candidates(cx, i, &request.tlvs.candidates);
        self.start_checks(cx, i, delivered_octets(request));
    }
}

/// Whether `datagram` looks like STUN (§2.4), for the peer socket's demultiplexer.
pub(super) fn is_stun(datagram: &[u8]) -> bool {
    stun::is_stun(datagram)
}
