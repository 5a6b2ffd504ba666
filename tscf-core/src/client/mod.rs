//! The tunnel client: gets a tunnel from a session director, keeps it alive, re-attaches it
//! after a transport loss, carries inner IP packets, and releases it (`docs/PROTOCOL.md` §3,
//! §6).
//!
//! [`TunnelClient`] is sans-IO: the runtime opens and closes transports when told to by
//! [`ClientEvent`]s, reports how they fare and what they carry with
//! [`handle_input`](TunnelClient::handle_input), sends what
//! [`poll_transmit`](TunnelClient::poll_transmit) writes, and calls
//! [`handle_timeout`](TunnelClient::handle_timeout) at [`poll_timeout`](TunnelClient::poll_timeout).
//!
//! **Panic contract: no network input makes any function here panic.** Malformed or unexpected
//! input is dropped and counted in [`ClientStats`] (or answered with a protocol error code);
//! memory is bounded by [`ClientConfig`].

mod config;
mod event;
mod input;
mod peer;
mod queue;
mod server;
mod timer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arrayvec::ArrayVec;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::wire::{
    append_integrity, Capabilities, ControlKey, Envelope, EnvelopeType, InnerPacket, Message,
    MessageType, ReplayWindow, ResultCode, Transport, CLIENT_NONCE_LEN, VERSION,
};

pub use config::{ClientConfig, ConfigError, ServerEndpoint};
pub use event::{
    ClientEvent, ClientState, ClientStats, Destination, PeerStreamId, SendError, TerminateReason,
    Transmit, TunnelInfo,
};
pub use input::Input;
pub use peer::{
    PeerConfig, PeerDownReason, PeerPath, PeerStats, PeerTunnelInfo, PeerTunnelState, ProbeBudget,
};

use peer::PeerAgent;
use queue::{BufferPool, PacketQueue};
use timer::{Timer, TimerTable};

/// Responses to server requests waiting for `poll_transmit`, at most.
const MAX_CONTROL_QUEUE: usize = 16;
/// Answers to the server's last requests remembered for their retransmissions (§6.2).
const MAX_ANSWERS: usize = 4;
/// Events waiting for `poll_event`, at most; beyond, the oldest is dropped.
const MAX_EVENTS: usize = 256;
/// Timer actions one `handle_timeout` call runs, at most.
const MAX_TIMER_STEPS: usize = 16;
/// Client sequence numbers keep the top bit clear; the director's have it set (§3.1).
const SEQUENCE_MASK: u32 = 0x7fff_ffff;
/// Keepalive interval when neither the server nor the configuration gives one (§3.3).
const DEFAULT_KEEPALIVE_DATAGRAM: Duration = Duration::from_secs(30);
const DEFAULT_KEEPALIVE_STREAM: Duration = Duration::from_secs(300);
/// Keepalive interval proposed on UDP and DTLS when the configuration names none (see
/// [`ClientConfig::keepalive_interval`]): NAT mappings of UDP that only see one direction
/// live 30 s in many NATs (Linux's conntrack among them), and 20 s leaves room for a lost
/// keepalive's retransmissions within them.
pub const NAT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// A sans-IO TSC tunnel client.
///
/// # Driving it
///
/// It has the shape of every state machine of the crate (see [the crate docs](crate)).
/// Construct it with [`new`](Self::new): it asks at once for a transport to the first server
/// ([`ClientEvent::OpenTransport`]). Inputs are [`handle_input`](Self::handle_input) with an
/// [`Input`] for whatever the runtime reports, [`handle_timeout`](Self::handle_timeout) when
/// [`poll_timeout`](Self::poll_timeout) is reached, and the application's commands
/// ([`send_ip`](Self::send_ip), [`release`](Self::release),
/// [`set_peer_tunneling`](Self::set_peer_tunneling),
/// [`release_peer_tunnel`](Self::release_peer_tunnel)). **After construction and after any
/// input, drain [`poll_transmit`](Self::poll_transmit) and then
/// [`poll_event`](Self::poll_event) until both return `None`**: send each envelope where its
/// [`Transmit`] says, act on each event, then arm a timer for `poll_timeout`. Draining
/// transmits before events matters: a transmit polled before a [`ClientEvent::CloseTransport`]
/// belongs to the transport about to be closed.
///
/// The runtime reports on the transport it was asked to open with [`Input::TransportOpen`],
/// [`Input::TransportFailed`] and [`Input::TransportLost`]; it does not report on a transport
/// the client told it to close. Each whole envelope received (one datagram, or one envelope cut
/// from a stream by [`StreamDeframer`](crate::wire::StreamDeframer)) is an
/// [`Input::Envelope`].
///
/// # Peer tunneling
///
/// With [`ClientConfig::peer`] set, the client also owns a peer UDP socket's protocol
/// (`docs/PROTOCOL.md` §7, see [`PeerConfig`]): transmits with [`Destination::Peer`] go out of
/// that socket to the given address, and every datagram it receives is an
/// [`Input::PeerDatagram`]; peer streams and peer sessions the client asks for are reported
/// with the other `Input::Peer*` variants. Applications opt inner UDP sockets in
/// with [`set_peer_tunneling`](Self::set_peer_tunneling); their packets take the relay until a
/// peer tunnel is up ([`ClientEvent::PeerTunnelUp`]) and return to it when the tunnel goes down
/// ([`ClientEvent::PeerTunnelDown`]). Nothing waits for a negotiation.
///
/// # Behaviour where the protocol leaves a choice
///
/// - **Attempts.** A round of attempts tries every server in order. A round to re-attach
///   starts at the server that held the tunnel, tries it a second time after the backoff, then
///   the others; when that server stopped answering (a Keepalive unanswered, or the silence
///   timeout) and others are listed, it is tried once, then the others at once. With more than
///   one server, a Keepalive and a re-attaching Configuration Request on a datagram transport
///   fail after [`failover_transmissions`](ClientConfig::failover_transmissions) (1.75 s at
///   the defaults) rather than `max_transmissions` (15.75 s), so that a client whose director
///   died silently finds another within seconds. Between rounds the client waits the
///   reconnect backoff, which doubles up to its maximum and resets on success. An attempt fails on a transport failure, a request timeout
///   or an error Result Code ([`ClientEvent::ConnectFailed`]); a fresh Configuration Request
///   refused with Unauthorized terminates the client instead.
/// - **Requests.** At most one request of the client is outstanding: the Configuration
///   Request, a Keepalive or the Configuration Release Request. On a datagram transport it is
///   retransmitted as in §6.3 and fails one (capped) timeout after its last transmission; on a
///   stream transport it fails after `response_timeout`. A failed Keepalive counts as a lost
///   transport; a failed release still terminates ([`TerminateReason::Released`]).
/// - **Keyed control** (§3.3, §4.4). Each Configuration Request carries a fresh Client Nonce;
///   an answer that does not echo it is dropped and counted, except the Unknown Critical TLV
///   or Version Not Supported of a director that does not know the nonce, which ends the
///   attempt. A fresh tunnel comes with its Control Key, and from then on the client signs
///   every control message it sends on the tunnel and drops (and counts) every one from the
///   server without the director's Message Integrity, whatever it asks: a forged peer
///   introduction, release or keepalive changes nothing. A server request accepted before is
///   answered from memory (the last four answers) or dropped as a replay.
/// - **Re-attach.** The request names the tunnel and carries our Message Integrity over a
///   sequence number the director has not seen; no secret crosses the wire. Success with the
///   same tunnel id and addresses gives [`ClientEvent::Reattached`] and the queued packets go
///   out; with other addresses the queued packets, whose source is no longer ours, are
///   discarded and it is reported as [`ClientEvent::Connected`]. Tunnel Not Found or
///   Unauthorized gives [`ClientEvent::TunnelClosed`], then a plain Configuration Request on
///   the same transport.
/// - **Tunnel Not Found.** A Keepalive answered Tunnel Not Found (signed or not: a director
///   that lost the tunnel has no key to sign with) makes the client re-attach on the same
///   transport at once, keeping its tunnel; only if that re-attach is refused does it give the
///   tunnel up, as above.
/// - **Roaming.** On UDP, a data packet sent after
///   [`roaming_probe_after`](ClientConfig::roaming_probe_after) of silence from the server
///   goes out after a Keepalive, so that an address that changed meanwhile (a NAT rebinding)
///   is proven to the director by that authenticated request and the tunnel follows it
///   (§3.4). On DTLS too when several servers are listed, so that a director gone silent is
///   noticed while the client sends.
/// - **Server release.** A Configuration Release Notification (or Request) for our tunnel is
///   acknowledged and terminates the client, except Shutdown: then the client reports
///   [`ClientEvent::TunnelClosed`] and gets a fresh tunnel after the backoff, as the director
///   may come back.
/// - **Release.** [`release`](Self::release) sends the queued packets, then the Configuration
///   Release Request. Without a tunnel on an open transport it terminates at once.
/// - **Liveness.** Any valid control message or data packet from the server restarts the
///   silence timer.
#[derive(Debug)]
pub struct TunnelClient {
    config: ClientConfig,
    next_sequence: u32,
    phase: Phase,
    link: Link,
    /// Index of the server of the current (or last) attempt.
    server: usize,
    round: ArrayVec<Attempt, { ClientConfig::MAX_SERVERS + 1 }>,
    round_pos: usize,
    backoff: Duration,
    tunnel: Option<Tunnel>,
    request: Option<Request>,
    /// Sequence numbers and encoded envelopes of the last server requests answered (§6.2).
    answers: VecDeque<(u32, Vec<u8>)>,
    /// Draws the Client Nonce of each Configuration Request.
    rng: ChaCha20Rng,
    /// When the server was last heard: a valid control message, or data.
    heard_at: Instant,
    control_out: VecDeque<Vec<u8>>,
    outbound: PacketQueue,
    inbound: PacketQueue,
    pool: BufferPool,
    timers: TimerTable,
    events: VecDeque<ClientEvent>,
    stats: ClientStats,
    /// Peer tunneling, when configured.
    peer: Option<PeerAgent>,
    /// Peer tunnels gone down (`stats.peer.fallbacks`) when the server path was last looked
    /// at: one more makes the client refresh it ([`server_path_refresh_due`](Self::server_path_refresh_due)).
    fallbacks_seen: u64,
    /// Latest time seen; a clock going backwards does not move deadlines back.
    now: Instant,
}

/// Where the client is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the Reconnect timer.
    Waiting,
    /// OpenTransport emitted; waiting for the runtime.
    Opening,
    /// Configuration Request outstanding on the open transport.
    Configuring,
    Connected,
    Releasing,
    Terminated,
}

/// The transport, as far as the client knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    None,
    Opening,
    Open,
    /// CloseTransport emitted; responses queued before it may still be polled.
    Closing,
}

#[derive(Debug)]
struct Tunnel {
    info: TunnelInfo,
    /// Keys Message Integrity on every control message of the tunnel (§4.4).
    key: ControlKey,
    /// Sequence numbers of the director's requests accepted lately (§6.2).
    replay: ReplayWindow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestKind {
    Configuration { reattach: bool },
    Keepalive,
    Release,
}

impl RequestKind {
    fn response_type(self) -> MessageType {
        match self {
            Self::Configuration { .. } => MessageType::CONFIGURATION_RESPONSE,
            Self::Keepalive => MessageType::KEEPALIVE_RESPONSE,
            Self::Release => MessageType::CONFIGURATION_RELEASE_RESPONSE,
        }
    }
}

/// The outstanding request; retransmissions send `envelope` again unchanged.
#[derive(Debug)]
struct Request {
    kind: RequestKind,
    sequence: u32,
    envelope: Vec<u8>,
    transmissions: u32,
    /// A (re)transmission waits for `poll_transmit`.
    due: bool,
    /// The Client Nonce of a Configuration Request, which its answer must echo.
    nonce: Option<[u8; CLIENT_NONCE_LEN]>,
}

/// One step of a round of connection attempts.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    server: usize,
    /// Wait the reconnect backoff before it.
    wait: bool,
}

impl TunnelClient {
    /// A client for `config`; it asks for a transport to the first server at once.
    pub fn new(config: ClientConfig, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut rng = ChaCha20Rng::from_seed(config.rng_seed);
        let next_sequence = rng.next_u32() & SEQUENCE_MASK;
        // The peer agent's generator is keyed with 32 octets drawn from the client's, so both
        // derive from `rng_seed` and neither repeats the other's draws.
        let peer = config.peer.clone().map(|p| {
            let mut seed = [0; 32];
            rng.fill_bytes(&mut seed);
            PeerAgent::new(p, seed)
        });
        let queue_limit = config.max_queued_packets;
        let mut client = Self {
            next_sequence,
            phase: Phase::Waiting,
            link: Link::None,
            server: 0,
            round: ArrayVec::new(),
            round_pos: 0,
            backoff: config.reconnect_backoff.0,
            tunnel: None,
            request: None,
            answers: VecDeque::new(),
            rng,
            heard_at: now,
            control_out: VecDeque::new(),
            outbound: PacketQueue::new(queue_limit),
            inbound: PacketQueue::new(queue_limit),
            pool: BufferPool::default(),
            timers: TimerTable::default(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
            peer,
            fallbacks_seen: 0,
            now,
            config,
        };
        client.new_round(false, false);
        Ok(client)
    }

    // ---- runtime → client ----

    /// What the runtime reports, at `now`: the server transport's fate and the envelopes it
    /// carries; with peer tunneling, what the peer UDP socket, the peer streams and the peer
    /// sessions receive and how they fare. See [`Input`] for each.
    ///
    /// Network input is hostile: what is malformed or unexpected is dropped and counted in
    /// [`stats`](Self::stats) (or answered with a protocol error code). A report about a
    /// transport, stream or session the client does not hold (any more) is ignored.
    pub fn handle_input(&mut self, now: Instant, input: Input<'_>) {
        self.advance_clock(now);
        match input {
            Input::TransportOpen => self.on_transport_open(),
            Input::TransportFailed => self.on_transport_failed(),
            Input::TransportLost => self.on_transport_lost(),
            Input::Envelope(envelope) => self.on_envelope(envelope),
            Input::PeerDatagram { from, datagram } => self.on_peer_datagram(from, datagram),
            Input::PeerStreamAccepted { stream, remote } => {
                self.on_peer_stream_accepted(stream, remote);
            }
            Input::PeerStreamOpen(stream) => self.on_peer_stream_open(stream),
            Input::PeerStreamFailed(stream) => self.on_peer_stream_failed(stream),
            Input::PeerStreamLost(stream) => self.on_peer_stream_lost(stream),
            Input::PeerStreamEnvelope { stream, envelope } => {
                self.on_peer_stream_envelope(stream, envelope);
            }
            Input::PeerSessionOpen(path) => self.on_peer_session_open(path),
            Input::PeerSessionFailed(path) => self.on_peer_session_failed(path),
            Input::PeerSessionDatagram { path, datagram } => {
                self.on_peer_session_datagram(path, datagram);
            }
        }
    }

    fn on_transport_open(&mut self) {
        if self.phase != Phase::Opening || self.link != Link::Opening {
            return;
        }
        self.link = Link::Open;
        self.send_configuration_request();
    }

    fn on_transport_failed(&mut self) {
        if self.phase == Phase::Opening && self.link == Link::Opening {
            self.forget_transport();
            self.fail_attempt(None);
        }
    }

    fn on_transport_lost(&mut self) {
        match (self.phase, self.link) {
            (_, Link::None) => {}
            (_, Link::Closing) => self.forget_transport(),
            (Phase::Opening | Phase::Configuring, _) => {
                self.forget_transport();
                self.fail_attempt(None);
            }
            (Phase::Connected, _) => {
                self.forget_transport();
                self.lose_transport(false);
            }
            (Phase::Releasing, _) => {
                self.forget_transport();
                self.terminate(TerminateReason::Released);
            }
            (Phase::Waiting | Phase::Terminated, _) => self.forget_transport(),
        }
    }

    fn on_envelope(&mut self, envelope: &[u8]) {
        self.stats.envelopes_received += 1;
        if self.phase == Phase::Terminated {
            self.stats.dropped_terminated += 1;
            return;
        }
        if self.link != Link::Open {
            self.stats.dropped_no_transport += 1;
            return;
        }
        // A stream envelope arrives whole too, so its length must match exactly as well.
        let Ok(envelope) = Envelope::decode_datagram(envelope) else {
            self.stats.dropped_bad_envelope += 1;
            return;
        };
        match envelope.kind {
            EnvelopeType::DATA => self.on_data(envelope.payload),
            EnvelopeType::CONTROL => self.on_control(envelope.payload),
            _ => self.stats.dropped_unknown_envelope += 1,
        }
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance_clock(now);
        self.peer_handle_timeout();
        for _ in 0..MAX_TIMER_STEPS {
            let Some(timer) = self.timers.pop_expired(self.now) else {
                return;
            };
            match timer {
                Timer::Retransmit => match &mut self.request {
                    Some(r) if r.transmissions < transmission_limit(&self.config, r.kind) => {
                        r.due = true;
                    }
                    Some(_) => self.request_failed(),
                    None => {}
                },
                Timer::ResponseTimeout => self.request_failed(),
                Timer::Keepalive => match (&self.request, &self.tunnel) {
                    (None, Some(_)) if self.phase == Phase::Connected => self.start_keepalive(),
                    // A keepalive (or re-attach) is still under way: look again an interval on.
                    (Some(_), Some(t)) if self.phase == Phase::Connected => {
                        let at = after(self.now, t.info.keepalive_interval);
                        self.timers.set(Timer::Keepalive, at);
                    }
                    _ => {}
                },
                Timer::Silence => {
                    if self.phase == Phase::Connected {
                        self.lose_transport(true);
                    }
                }
                Timer::Reconnect => {
                    if self.phase == Phase::Waiting {
                        self.begin_attempt();
                    }
                }
            }
        }
    }

    // ---- application → client ----

    /// Queues one inner IP packet for the server. Its source must be an internal address of
    /// the tunnel. While re-attaching, packets wait (up to
    /// [`max_queued_packets`](ClientConfig::max_queued_packets)) and go out after the
    /// re-attach.
    pub fn send_ip(&mut self, now: Instant, packet: &[u8]) -> Result<(), SendError> {
        self.advance_clock(now);
        self.try_send_ip(packet).map_err(|e| self.refused(e))
    }

    /// Counts a send refused for `e` in [`ClientStats`] (every refusal of `send_ip` is, and
    /// an inner socket counts the ones it makes before calling it), and gives `e` back.
    pub(crate) fn refused(&mut self, e: SendError) -> SendError {
        let counter = match e {
            SendError::NotConnected => &mut self.stats.send_refused_not_connected,
            SendError::Closed => &mut self.stats.send_refused_closed,
            SendError::TooLarge { .. } => &mut self.stats.send_refused_too_large,
            SendError::QueueFull => &mut self.stats.send_queue_full,
            SendError::InvalidPacket(_) | SendError::WrongSource(_) => {
                &mut self.stats.send_refused_invalid
            }
        };
        *counter += 1;
        e
    }

    fn try_send_ip(&mut self, packet: &[u8]) -> Result<(), SendError> {
        if matches!(self.phase, Phase::Releasing | Phase::Terminated) {
            return Err(SendError::Closed);
        }
        let tunnel = self.tunnel.as_ref().ok_or(SendError::NotConnected)?;
        let max = tunnel.info.max_packet_len;
        if packet.len() > max {
            return Err(SendError::TooLarge {
                len: packet.len(),
                max,
            });
        }
        let parsed = InnerPacket::parse(packet)?;
        if !tunnel.info.owns(parsed.source()) {
            return Err(SendError::WrongSource(parsed.source()));
        }
        if self.peer_route(&parsed) {
            return Ok(());
        }
        if !self.outbound.push(&mut self.pool, packet) {
            return Err(SendError::QueueFull);
        }
        Ok(())
    }

    /// Moves the next received inner packet into `out` (its old contents are discarded);
    /// false when none is waiting.
    pub fn recv_ip(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(mut packet) = self.inbound.pop() else {
            return false;
        };
        core::mem::swap(out, &mut packet);
        self.pool.give(packet);
        true
    }

    /// Ends the tunnel with a Configuration Release Request, after the packets already
    /// queued. Ends with [`TerminateReason::Released`] whether or not the server answers.
    pub fn release(&mut self, now: Instant) {
        self.advance_clock(now);
        match self.phase {
            Phase::Releasing | Phase::Terminated => {}
            Phase::Connected => {
                let tunnel_id = self.tunnel.as_ref().map_or(0, |t| t.info.tunnel_id);
                let sequence = self.take_sequence();
                let mut msg = Message::new(
                    MessageType::CONFIGURATION_RELEASE_REQUEST,
                    sequence,
                    tunnel_id,
                );
                msg.tlvs.result_code = Some(ResultCode::SUCCESS);
                self.start_request(RequestKind::Release, &msg);
                self.phase = Phase::Releasing;
                self.timers.stop(Timer::Keepalive);
                self.timers.stop(Timer::Silence);
            }
            Phase::Waiting | Phase::Opening | Phase::Configuring => {
                self.terminate(TerminateReason::Released);
            }
        }
    }

    // ---- client → runtime ----

    /// Writes the next envelope to send into `buf` (cleared first) and says where it goes;
    /// `None` when nothing is due.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.advance_clock(now);
        buf.clear();
        if let Some(transmit) = self.poll_server_transmit(buf) {
            return Some(transmit);
        }
        buf.clear();
        self.poll_peer_transmit(buf)
    }

    /// The next envelope for the server transport.
    fn poll_server_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Transmit> {
        if !matches!(self.link, Link::Open | Link::Closing) {
            return None;
        }
        if let Some(answer) = self.control_out.pop_front() {
            buf.extend_from_slice(&answer);
            return Some(self.sent(false));
        }
        if self.link != Link::Open {
            return None;
        }
        if self.roaming_probe_due() {
            self.stats.roaming_probes += 1;
            self.start_keepalive();
        } else if self.server_path_refresh_due() {
            self.stats.server_path_refreshes += 1;
            self.start_keepalive();
        }
        self.fallbacks_seen = self.stats.peer.fallbacks;
        // Queued data goes before the release request, which ends the tunnel.
        let data_first = self
            .request
            .as_ref()
            .is_some_and(|r| r.kind == RequestKind::Release)
            && !self.outbound.is_empty();
        if !data_first {
            if let Some(request) = self.request.as_mut().filter(|r| r.due) {
                buf.extend_from_slice(&request.envelope);
                request.due = false;
                request.transmissions += 1;
                let transmissions = request.transmissions;
                if matches!(request.kind, RequestKind::Configuration { .. }) {
                    self.stats.configuration_requests_sent += 1;
                }
                if transmissions > 1 {
                    self.stats.retransmissions += 1;
                }
                if self.current_server().transport.is_datagram() {
                    let rto = self.rto(transmissions);
                    self.timers.set(Timer::Retransmit, after(self.now, rto));
                } else if transmissions == 1 {
                    let at = after(self.now, self.config.response_timeout);
                    self.timers.set(Timer::ResponseTimeout, at);
                }
                return Some(self.sent(false));
            }
        }
        if self.phase == Phase::Connected {
            let datagram = self.current_server().transport.is_datagram();
            if let Some((agent, mut cx)) = self.peer_cx() {
                if agent.poll_server(&mut cx, buf, datagram) {
                    // The agent's requests are encoded once and signed at each transmission.
                    if let Some(t) = &self.tunnel {
                        let _ = append_integrity(buf, 0, &t.key.client_to_director());
                    }
                    return Some(self.sent(false));
                }
            }
        }
        if matches!(self.phase, Phase::Connected | Phase::Releasing) {
            if let Some(packet) = self.outbound.pop() {
                // Packets were checked to fit in an envelope when queued.
                if let Ok(header) = Envelope::header_bytes(EnvelopeType::DATA, packet.len()) {
                    buf.extend_from_slice(&header);
                    buf.extend_from_slice(&packet);
                }
                self.pool.give(packet);
                return Some(self.sent(true));
            }
        }
        None
    }

    /// The next event, in the order they happened. At most 256 wait; a runtime that does not
    /// drain them loses the oldest.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called; `None` when no
    /// timer runs.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        timer::earliest(self.timers.next(), self.peer_poll_timeout())
    }

    // ---- observability ----

    /// Where the client is in its life cycle.
    pub fn state(&self) -> ClientState {
        match self.phase {
            Phase::Waiting | Phase::Opening | Phase::Configuring if self.tunnel.is_some() => {
                ClientState::Reattaching
            }
            Phase::Waiting | Phase::Opening | Phase::Configuring => ClientState::Connecting,
            Phase::Connected => ClientState::Connected,
            Phase::Releasing => ClientState::Releasing,
            Phase::Terminated => ClientState::Terminated,
        }
    }

    /// The tunnel id, while the client holds a tunnel (also while re-attaching it).
    pub fn tunnel_id(&self) -> Option<u64> {
        self.tunnel.as_ref().map(|t| t.info.tunnel_id)
    }

    /// The internal IPv4 address of the tunnel, if any.
    pub fn internal_ipv4(&self) -> Option<core::net::Ipv4Addr> {
        self.tunnel.as_ref()?.info.ipv4.map(|a| a.addr)
    }

    /// The internal IPv6 address of the tunnel, if any.
    pub fn internal_ipv6(&self) -> Option<core::net::Ipv6Addr> {
        self.tunnel.as_ref()?.info.ipv6.map(|a| a.addr)
    }

    /// The configuration of the tunnel, if the client holds one.
    pub fn tunnel_info(&self) -> Option<&TunnelInfo> {
        self.tunnel.as_ref().map(|t| &t.info)
    }

    /// Inner packets waiting in the send queue for a transport (bounded by
    /// [`max_queued_packets`](ClientConfig::max_queued_packets)).
    pub fn queued_packets(&self) -> usize {
        self.outbound.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    // ---- attempts ----

    /// Starts a round of attempts: every server from the first for a fresh tunnel; the
    /// tunnel's server twice, then the others, to re-attach. When the tunnel's server went
    /// silent (`home_silent`) and there are others, it is tried once before them: a transient
    /// loss still finds the tunnel at home, and a dead server costs one attempt, not two.
    fn new_round(&mut self, wait: bool, home_silent: bool) {
        let n = self.config.servers.len();
        self.round.clear();
        if self.tunnel.is_some() {
            let home = self.server;
            self.round.push(Attempt { server: home, wait });
            if !(home_silent && n > 1) {
                self.round.push(Attempt {
                    server: home,
                    wait: true,
                });
            }
            for k in 1..n {
                self.round.push(Attempt {
                    server: (home + k) % n,
                    wait: false,
                });
            }
        } else {
            for server in 0..n {
                self.round.push(Attempt {
                    server,
                    wait: server == 0 && wait,
                });
            }
        }
        self.round_pos = 0;
        self.step();
    }

    fn next_attempt(&mut self) {
        self.round_pos += 1;
        if self.round_pos >= self.round.len() {
            self.new_round(true, false);
        } else {
            self.step();
        }
    }

    fn step(&mut self) {
        let Some(attempt) = self.round.get(self.round_pos).copied() else {
            return;
        };
        self.server = attempt.server;
        if attempt.wait {
            self.phase = Phase::Waiting;
            self.timers
                .set(Timer::Reconnect, after(self.now, self.backoff));
            self.backoff = self
                .backoff
                .saturating_mul(2)
                .min(self.config.reconnect_backoff.1);
        } else {
            self.begin_attempt();
        }
    }

    fn begin_attempt(&mut self) {
        self.control_out.clear();
        self.link = Link::Opening;
        self.phase = Phase::Opening;
        let server = self.current_server();
        self.push_event(ClientEvent::OpenTransport { server });
    }

    /// A Configuration Request on the open transport: for a fresh tunnel, or with our tunnel's
    /// id and our Message Integrity to re-attach it (§3.3, §3.4). Its Client Nonce binds the
    /// answer to it.
    fn send_configuration_request(&mut self) {
        let sequence = self.take_sequence();
        let mut nonce = [0u8; CLIENT_NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        let mut msg = Message::new(MessageType::CONFIGURATION_REQUEST, sequence, 0);
        let versions = [VERSION];
        msg.tlvs.supported_versions = Some(&versions);
        msg.tlvs.tunnel_id = self.tunnel.as_ref().map(|t| t.info.tunnel_id);
        msg.tlvs.client_nonce = Some(nonce);
        msg.tlvs.keepalive_interval_ms = self
            .proposed_keepalive()
            .and_then(|d| u32::try_from(d.as_millis()).ok());
        let mut capabilities = self.config.capabilities;
        if self.peer.is_some() {
            capabilities.0 |= Capabilities::PEER_TUNNELING.0;
        }
        msg.tlvs.client_capabilities = Some(capabilities);
        msg.tlvs.auth_token = self.config.auth_token.as_deref();
        msg.tlvs.software = self.config.software.as_deref();
        let reattach = msg.tlvs.tunnel_id.is_some();
        // The configuration was validated, so every TLV fits its bound and the message 2048.
        let envelope = self.encode_signed(&msg).unwrap_or_default();
        self.install_request(RequestKind::Configuration { reattach }, sequence, envelope);
        if let Some(request) = &mut self.request {
            request.nonce = Some(nonce);
        }
        self.phase = Phase::Configuring;
    }

    /// The keepalive interval proposed to the current server: the configuration's, else on
    /// UDP and DTLS one short enough for NATs ([`NAT_KEEPALIVE_INTERVAL`]), else none (the
    /// server chooses).
    fn proposed_keepalive(&self) -> Option<Duration> {
        let datagram = self.current_server().transport.is_datagram();
        self.config
            .keepalive_interval
            .or(datagram.then_some(NAT_KEEPALIVE_INTERVAL))
    }

    /// The attempt at the current server failed.
    fn fail_attempt(&mut self, result: Option<ResultCode>) {
        let server = self.current_server();
        self.push_event(ClientEvent::ConnectFailed { server, result });
        self.close_transport();
        self.clear_request();
        self.timers.stop(Timer::Keepalive);
        self.timers.stop(Timer::Silence);
        self.next_attempt();
    }

    /// The transport of a connected tunnel is gone, `silent` when the server stopped
    /// answering (rather than the transport reporting its loss): re-attach.
    fn lose_transport(&mut self, silent: bool) {
        self.stats.transports_lost += 1;
        self.push_event(ClientEvent::TransportLost);
        self.close_transport();
        self.clear_request();
        self.timers.stop(Timer::Keepalive);
        self.timers.stop(Timer::Silence);
        self.new_round(false, silent);
    }

    /// The server no longer holds our tunnel; `fresh_here` asks for a new one on the current
    /// transport, else the transport is closed and a new round starts after the backoff.
    fn tunnel_gone(&mut self, reason: ResultCode, fresh_here: bool) {
        self.push_event(ClientEvent::TunnelClosed { reason });
        self.drop_tunnel();
        self.clear_request();
        self.timers.stop(Timer::Keepalive);
        self.timers.stop(Timer::Silence);
        if fresh_here {
            self.send_configuration_request();
        } else {
            self.close_transport();
            self.backoff = self.config.reconnect_backoff.0;
            self.new_round(true, false);
        }
    }

    fn terminate(&mut self, reason: TerminateReason) {
        self.peer_server_lost();
        self.close_transport();
        self.clear_request();
        self.timers.stop_all();
        self.stats.send_queue_discarded += self.outbound.clear(&mut self.pool) as u64;
        self.phase = Phase::Terminated;
        self.push_event(ClientEvent::Terminated { reason });
    }

    // ---- requests ----

    fn take_sequence(&mut self) -> u32 {
        take_sequence(&mut self.next_sequence)
    }

    fn start_request(&mut self, kind: RequestKind, msg: &Message<'_>) {
        // Messages the client builds hold a few fixed-size TLVs, far below 2048 octets.
        let envelope = self.encode_signed(msg).unwrap_or_default();
        self.install_request(kind, msg.header.sequence, envelope);
    }

    /// `msg` in a control envelope, with our Message Integrity once we hold a tunnel: every
    /// control message the client sends on its tunnel carries it (§4.4).
    fn encode_signed(&self, msg: &Message<'_>) -> Option<Vec<u8>> {
        let mut envelope = Vec::new();
        let encoded = match &self.tunnel {
            Some(t) => {
                msg.encode_envelope_with_integrity(&t.key.client_to_director(), &mut envelope)
            }
            None => msg.encode_envelope(&mut envelope),
        };
        encoded.ok().map(|()| envelope)
    }

    fn install_request(&mut self, kind: RequestKind, sequence: u32, envelope: Vec<u8>) {
        self.clear_request();
        self.request = Some(Request {
            kind,
            sequence,
            envelope,
            transmissions: 0,
            due: true,
            nonce: None,
        });
    }

    fn clear_request(&mut self) {
        self.request = None;
        self.timers.stop(Timer::Retransmit);
        self.timers.stop(Timer::ResponseTimeout);
    }

    fn start_keepalive(&mut self) {
        let tunnel_id = self.tunnel.as_ref().map_or(0, |t| t.info.tunnel_id);
        let sequence = self.take_sequence();
        let msg = Message::new(MessageType::KEEPALIVE, sequence, tunnel_id);
        self.start_request(RequestKind::Keepalive, &msg);
        self.stats.keepalives_sent += 1;
    }

    /// The outstanding request got no response in time.
    fn request_failed(&mut self) {
        let Some(request) = self.request.take() else {
            return;
        };
        self.clear_request();
        match request.kind {
            RequestKind::Configuration { .. } => self.fail_attempt(None),
            RequestKind::Keepalive => self.lose_transport(true),
            RequestKind::Release => self.terminate(TerminateReason::Released),
        }
    }

    /// Retransmission timeout after the `transmissions`-th transmission (§6.3).
    fn rto(&self, transmissions: u32) -> Duration {
        let doublings = transmissions.saturating_sub(1).min(31);
        self.config
            .initial_rto
            .saturating_mul(1 << doublings)
            .min(self.config.max_rto)
    }

    // ---- helpers ----

    fn heard_from_server(&mut self) {
        self.heard_at = self.now;
        if self.phase != Phase::Connected {
            return;
        }
        if let Some(tunnel) = &self.tunnel {
            let silence = tunnel
                .info
                .keepalive_interval
                .saturating_mul(self.config.silence_intervals);
            self.timers.set(Timer::Silence, after(self.now, silence));
        }
    }

    /// Whether a keepalive must go out before queued data to prove our address (§3.4): on UDP,
    /// after a silence from the server, the client's address may have changed (a NAT
    /// rebinding, a new network) and only an authenticated request moves the tunnel to it. On
    /// DTLS, whose session cannot roam, only with other servers to fail over to: the
    /// keepalive then tells a server gone silent within a few retransmissions, where a client
    /// that keeps sending would otherwise send no keepalive and wait for the silence timeout.
    fn roaming_probe_due(&self) -> bool {
        let Some(after_silence) = self.config.roaming_probe_after else {
            return false;
        };
        let transport = self.current_server().transport;
        let probes = transport == Transport::UDP
            || (transport.is_datagram() && self.config.servers.len() > 1);
        self.phase == Phase::Connected
            && self.request.is_none()
            && !self.outbound.is_empty()
            && probes
            && self.now.saturating_duration_since(self.heard_at) >= after_silence
    }

    /// Whether a keepalive must go out at once because a peer tunnel went down (§3.5): its
    /// flows take the relay now, and the relay reaches us only through the NAT mapping of our
    /// server transport, which may have expired while the peer tunnel carried everything (a
    /// NAT whose UDP timeout is shorter than the keepalive interval). The keepalive opens it
    /// again, or moves the tunnel to the new mapping, so that the relay reaches an idle
    /// receiver as soon as the peer tunnel's silence is noticed. Not when the server was heard
    /// within [`roaming_probe_after`](ClientConfig::roaming_probe_after) (the mapping works),
    /// nor when that is off.
    fn server_path_refresh_due(&self) -> bool {
        let Some(after_silence) = self.config.roaming_probe_after else {
            return false;
        };
        self.stats.peer.fallbacks != self.fallbacks_seen
            && self.phase == Phase::Connected
            && self.request.is_none()
            && self.current_server().transport.is_datagram()
            && self.now.saturating_duration_since(self.heard_at) >= after_silence
    }

    /// Bookkeeping for an envelope just written by `poll_transmit`.
    fn sent(&mut self, data: bool) -> Transmit {
        self.stats.envelopes_sent += 1;
        if data {
            self.stats.data_sent += 1;
        }
        if self.phase == Phase::Connected {
            if let Some(tunnel) = &self.tunnel {
                let at = after(self.now, tunnel.info.keepalive_interval);
                self.timers.set(Timer::Keepalive, at);
            }
        }
        Transmit {
            destination: Destination::Server,
        }
    }

    fn drop_tunnel(&mut self) {
        if self.tunnel.is_some() {
            self.peer_server_lost();
        }
        if self.tunnel.take().is_some() {
            self.stats.send_queue_discarded += self.outbound.clear(&mut self.pool) as u64;
            // The director's requests are answered per tunnel.
            self.answers.clear();
        }
    }

    /// Asks the runtime to close a transport it has not reported gone.
    fn close_transport(&mut self) {
        if matches!(self.link, Link::Opening | Link::Open) {
            self.push_event(ClientEvent::CloseTransport);
            self.link = Link::Closing;
        }
    }

    /// The runtime reported the transport gone.
    fn forget_transport(&mut self) {
        self.link = Link::None;
        self.control_out.clear();
    }

    fn current_server(&self) -> ServerEndpoint {
        // `server` is always an index of the validated, non-empty list.
        self.config.servers[self.server.min(self.config.servers.len() - 1)]
    }

    fn push_event(&mut self, event: ClientEvent) {
        push_event(&mut self.events, event);
    }

    fn advance_clock(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }
}

/// Transmissions of a `kind` request on a datagram transport before it fails: with several
/// servers, a Keepalive or a re-attach tells whether the tunnel's server is still there, and
/// another server is worth trying sooner ([`ClientConfig::failover_transmissions`]).
fn transmission_limit(config: &ClientConfig, kind: RequestKind) -> u32 {
    let probes_server = matches!(
        kind,
        RequestKind::Keepalive | RequestKind::Configuration { reattach: true }
    );
    if probes_server && config.servers.len() > 1 {
        config.failover_transmissions.min(config.max_transmissions)
    } else {
        config.max_transmissions
    }
}

/// Takes the next sequence number of a counter (§3.1).
fn take_sequence(counter: &mut u32) -> u32 {
    let sequence = *counter;
    *counter = sequence.wrapping_add(1) & SEQUENCE_MASK;
    sequence
}

/// Queues an event, dropping the oldest beyond [`MAX_EVENTS`].
fn push_event(events: &mut VecDeque<ClientEvent>, event: ClientEvent) {
    if events.len() >= MAX_EVENTS {
        events.pop_front();
    }
    events.push_back(event);
}

/// `now + d`, saturating at `now` for instants near the end of time.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}
