//! Connectivity checks on the peer socket (`docs/PROTOCOL.md` §7.5), bounded the way ICE bounds
//! them (RFC 8445 §14, RFC 7675). The addresses a negotiation probes come from the other side,
//! through the director, and a malicious client chooses them; so:
//!
//! - remote candidates are checked for plausibility before any probe: no unspecified,
//!   multicast or broadcast address, no port 0, none of our own addresses, loopback only when
//!   our peer socket is on loopback, link-local only when we are on a link-local network, no
//!   duplicate, at most [`MAX_REMOTE_CANDIDATES`];
//! - each candidate gets a few probes on a doubling schedule until it answers, and the probes
//!   of one negotiation are paced;
//! - every probe is paid twice: from the client's token bucket
//!   ([`PeerConfig::probe_budget`](super::PeerConfig::probe_budget)), which no new request
//!   refills, and from the negotiation's credit, [`AMPLIFICATION`] octets per octet received
//!   for it (the request or answer the director delivered, less what the director added, and
//!   the peer's verified probes and responses). So the octets of probes a negotiation sends
//!   never exceed three times the octets its initiator (or the peer) sent;
//! - a response counts only from the address probed and with the sequence number of a probe
//!   sent there, a random number an off-path sender cannot guess: that is the candidate's
//!   consent, and it is not probed again.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use arrayvec::ArrayVec;
use rand_core::RngCore;

use super::{after, Cx, Peer, PeerAgent, Phase, Role, Via, MAX_REMOTE_CANDIDATES};
use super::{PeerConfig, MAX_STREAMS_PER_PEER};
use crate::wire::{
    Candidate, CandidateKind, Message, MessageType, ResultCode, Transport, ENVELOPE_HEADER_LEN,
};

/// Octets of probes a negotiation may send per octet received for it (§7.5).
pub(super) const AMPLIFICATION: usize = 3;
/// Credit a negotiation holds at most, in octets.
const MAX_CREDIT: usize = 8192;
/// Sequence numbers of probes remembered per candidate: all of them.
const MAX_SEQUENCES: usize = PeerConfig::MAX_PROBE_TRANSMISSIONS as usize;

/// One remote candidate of a negotiation and its connectivity check.
#[derive(Clone, Debug)]
pub(super) struct Check {
    pub(super) addr: SocketAddr,
    /// What the peer announced it as, or peer-reflexive when learned from its probe.
    pub(super) kind: CandidateKind,
    /// Our address as the peer saw it, from its answer to our probe (the Observed Address).
    pub(super) observed: Option<SocketAddr>,
    /// The sequence numbers of the probes sent to it.
    sequences: ArrayVec<u32, MAX_SEQUENCES>,
    /// When the next probe to it is due; `None` once it answered or had all its probes.
    due: Option<Instant>,
    /// It answered one of our probes: its consent (RFC 7675).
    answered: bool,
}

impl Check {
    fn new(addr: SocketAddr, kind: CandidateKind, due: Instant) -> Self {
        Self {
            addr,
            kind,
            observed: None,
            sequences: ArrayVec::new(),
            due: Some(due),
            answered: false,
        }
    }
}

impl PeerAgent {
    /// Takes the candidates of a request or answer for peer `i`: its plausible UDP candidates
    /// to probe, and its TCP and TLS host candidates for peer streams (§7.7; an unknown
    /// transport is ignored, §4.2). Counts the ones refused.
    pub(super) fn set_candidates(&mut self, cx: &mut Cx<'_>, i: usize, candidates: &[Candidate]) {
        let mut refused = 0;
        let mut checks = ArrayVec::<Check, MAX_REMOTE_CANDIDATES>::new();
        let mut streams = ArrayVec::<(Transport, SocketAddr), MAX_STREAMS_PER_PEER>::new();
        for c in candidates {
            let stream = matches!(c.transport, Transport::TCP | Transport::TLS);
            if c.transport != Transport::UDP && !(stream && c.kind == CandidateKind::HOST) {
                continue;
            }
            let duplicate =
                checks.iter().any(|k| k.addr == c.addr) || streams.contains(&(c.transport, c.addr));
            if duplicate || !self.plausible(c.addr) {
                refused += 1;
            } else if stream {
                if streams.try_push((c.transport, c.addr)).is_err() {
                    refused += 1;
                }
            } else if checks.try_push(Check::new(c.addr, c.kind, cx.now)).is_err() {
                refused += 1;
            }
        }
        cx.stats.peer.candidates_refused += refused;
        let p = &mut self.peers[i];
        p.checks = checks;
        p.stream_candidates = streams;
    }

    /// Whether a remote candidate may be probed (or connected to) at all.
    fn plausible(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        let broadcast = matches!(ip, IpAddr::V4(a) if a.is_broadcast());
        if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() || broadcast {
            return false;
        }
        let own = &self.config.local_addresses;
        if own.contains(&addr) || self.srflx == Some(addr) {
            return false;
        }
        let we_are = |kind: fn(IpAddr) -> bool| own.iter().any(|a| kind(a.ip().to_canonical()));
        if ip.is_loopback() {
            return we_are(|a| a.is_loopback());
        }
        if is_link_local(ip) {
            return we_are(is_link_local);
        }
        true
    }

    /// Starts the checks of peer `i` with the credit of `received` octets.
    pub(super) fn start_checks(&mut self, cx: &mut Cx<'_>, i: usize, received: usize) {
        let p = &mut self.peers[i];
        p.credit = 0;
        p.last_probe = None;
        self.earn(cx, i, received);
    }

    /// Peer `i` received `octets` for its negotiation: credit for more probes, which go out if
    /// some were waiting for it.
    pub(super) fn earn(&mut self, cx: &mut Cx<'_>, i: usize, octets: usize) {
        let p = &mut self.peers[i];
        p.credit = p
            .credit
            .saturating_add(octets.saturating_mul(AMPLIFICATION))
            .min(MAX_CREDIT);
        p.next_probe = Some(cx.now);
        self.probe(cx, i);
    }

    /// Sends peer `i`'s next due probe if pacing, the budget and the credit allow, and says
    /// when to come back.
    pub(super) fn probe(&mut self, cx: &mut Cx<'_>, i: usize) {
        let now = cx.now;
        let (pacing, rto, max) = (
            self.config.probe_pacing,
            self.config.probe_interval,
            self.config.probe_transmissions,
        );
        let p = &mut self.peers[i];
        if p.phase != Phase::Probing {
            p.next_probe = None;
            return;
        }
        if p.next_probe.is_none_or(|t| t > now) {
            return;
        }
        let paced = p.last_probe.map(|t| after(t, pacing)).filter(|t| *t > now);
        let due = p.checks.iter().filter_map(|c| c.due).min();
        p.next_probe = match (paced, due) {
            (_, None) => None,
            (Some(at), Some(due)) => Some(at.max(due)),
            (None, Some(due)) if due > now => Some(due),
            (None, Some(_)) => Some(now),
        };
        if p.next_probe != Some(now) {
            return;
        }
        let (Some(own), Some(token)) = (cx.own_for(p.addr), p.token) else {
            p.next_probe = None;
            return;
        };
        let sequence = self.rng.next_u32();
        let mut msg = Message::new(MessageType::PEER_PROBE, sequence, 0);
        msg.tlvs.peer_internal_address = Some(own);
        let mut bytes = Vec::new();
        // A header, an address and Message Integrity: far below 2048 octets.
        if msg
            .encode_envelope_with_integrity(&token, &mut bytes)
            .is_err()
        {
            return;
        }
        let budget = self.config.probe_budget;
        let p = &mut self.peers[i];
        if p.credit < bytes.len() {
            // Until the peer sends something that verifies.
            p.next_probe = None;
            cx.stats.peer.probes_limited += 1;
            return;
        }
        if !self.probe_budget.take(now, budget.burst, budget.interval()) {
            let at = self
                .probe_budget
                .available_at(now, budget.burst, budget.interval());
            p.next_probe = Some(at);
            cx.stats.peer.probes_limited += 1;
            return;
        }
        // The check due first; one exists, as `due` was found.
        let Some(check) = p
            .checks
            .iter_mut()
            .filter(|c| c.due.is_some())
            .min_by_key(|c| c.due)
        else {
            return;
        };
        if check.sequences.is_full() {
            check.sequences.remove(0);
        }
        check.sequences.push(sequence);
        let sent = u32::try_from(check.sequences.len()).unwrap_or(u32::MAX);
        check.due = (sent < u32::from(max))
            .then(|| after(now, rto.saturating_mul(1 << (sent - 1).min(16))));
        let to = check.addr;
        p.credit -= bytes.len();
        p.last_probe = Some(now);
        let next = p.checks.iter().filter_map(|c| c.due).min();
        p.next_probe = next.map(|due| due.max(after(now, pacing)));
        self.queue_control(cx, Via::Udp(to), &bytes);
        cx.stats.peer.probes_sent += 1;
    }

    /// A Peer Probe: answered (to its source, even one never announced: a peer-reflexive
    /// candidate), and for the initiator a triggered check back.
    pub(super) fn on_probe(
        &mut self,
        cx: &mut Cx<'_>,
        from: SocketAddr,
        msg: &Message<'_>,
        payload: &[u8],
    ) {
        let Some(i) = self.verified(cx, msg, payload) else {
            return;
        };
        let Some(own) = cx.own_for(self.peers[i].addr) else {
            return;
        };
        let mut reply = Message::response_to(&msg.header, ResultCode::SUCCESS);
        reply.tlvs.peer_internal_address = Some(own);
        reply.tlvs.observed_address = Some(from);
        self.send_signed(cx, i, Via::Udp(from), &reply);
        cx.stats.peer.probes_answered += 1;
        let p = &mut self.peers[i];
        if p.phase == Phase::Up && p.route() == Some(Via::Udp(from)) {
            p.last_heard = cx.now;
        }
        let known = p.checks.iter().any(|c| c.addr == from);
        let checking = matches!(p.phase, Phase::Probing | Phase::Nominating);
        if checking && !known && self.plausible(from) {
            // A peer-reflexive candidate: the peer's NAT mapping towards us.
            let p = &mut self.peers[i];
            if p.checks.is_full() {
                p.checks.pop();
            }
            p.checks
                .push(Check::new(from, CandidateKind::PEER_REFLEXIVE, cx.now));
        }
        let p = &mut self.peers[i];
        if p.role == Role::Initiator && p.phase == Phase::Probing {
            // A triggered check: the path just opened from the other side.
            if let Some(c) = p.checks.iter_mut().find(|c| c.addr == from && !c.answered) {
                c.due = Some(cx.now);
            }
        }
        let p = &self.peers[i];
        if p.role == Role::Destination && p.secure.is_some() {
            self.authorise(cx, i, from);
        }
        self.earn(cx, i, payload.len() + ENVELOPE_HEADER_LEN);
    }

    /// A Peer Probe Response: the consent of the candidate probed, and for the initiator the
    /// path to nominate.
    pub(super) fn on_probe_response(
        &mut self,
        cx: &mut Cx<'_>,
        from: SocketAddr,
        msg: &Message<'_>,
        payload: &[u8],
    ) {
        let Some(i) = self.verified(cx, msg, payload) else {
            return;
        };
        let sequence = msg.header.sequence;
        let Some(check) = self.peers[i]
            .checks
            .iter_mut()
            .find(|c| c.addr == from && c.sequences.contains(&sequence))
        else {
            cx.stats.peer.dropped_unmatched_response += 1;
            return;
        };
        check.due = None;
        check.answered = true;
        check.observed = msg.tlvs.observed_address.or(check.observed);
        cx.stats.peer.probe_responses += 1;
        self.earn(cx, i, payload.len() + ENVELOPE_HEADER_LEN);
        let p = &self.peers[i];
        if p.role == Role::Initiator
            && p.phase == Phase::Probing
            && msg.tlvs.result_code == Some(ResultCode::SUCCESS)
        {
            if p.secure.is_some() {
                self.start_session(cx, i, from);
            } else {
                self.nominate(cx, i, Via::Udp(from));
            }
        }
    }
}

impl Peer {
    /// Forgets the checks of the current negotiation.
    pub(super) fn reset_checks(&mut self) {
        self.checks.clear();
        self.credit = 0;
        self.last_probe = None;
        self.next_probe = None;
    }
}

/// Link-local: 169.254.0.0/16 or fe80::/10.
fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The octets a client received for a negotiation in the director's request or answer
/// `msg`: all of it but what the director added (its Peer Credentials, and Message Integrity
/// if any), so that no more is credited than the other client sent.
pub(super) fn delivered_octets(msg: &Message<'_>) -> usize {
    let credentials = msg
        .tlvs
        .peer_credentials
        .map_or(0, |c| 2 + 16 + if c.fingerprint.is_some() { 32 } else { 0 });
    let integrity = msg.tlvs.message_integrity.map_or(0, |_| 2 + 32);
    (msg.encoded_len() + ENVELOPE_HEADER_LEN).saturating_sub(credentials + integrity)
}
