//! What a [`TunnelClient`](super::TunnelClient) reports: events, transmits, its state, its
//! counters, and the errors of [`send_ip`](super::TunnelClient::send_ip).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;

use super::config::ServerEndpoint;
use super::peer::{PeerDownReason, PeerStats};
use crate::wire::{CandidateKind, InnerPacketError, InternalAddress, ResultCode};

/// What [`TunnelClient::poll_event`](super::TunnelClient::poll_event) reports, in the order it
/// happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Open a transport to `server`, then report
    /// [`Input::TransportOpen`](super::Input::TransportOpen) or
    /// [`Input::TransportFailed`](super::Input::TransportFailed) to
    /// [`handle_input`](super::TunnelClient::handle_input). Any transport open before is no
    /// longer used.
    OpenTransport {
        /// Where to, and over what.
        server: ServerEndpoint,
    },
    /// Close the current transport. Emitted whenever the client gives up a transport the
    /// runtime has not itself reported failed or lost. Send the transmits polled before this
    /// event first: a last response may be among them.
    CloseTransport,
    /// A fresh tunnel is up: new tunnel id and internal addresses. Follows the first
    /// connection, and any case where the old tunnel could not be kept (a re-attach refused
    /// with Tunnel Not Found or Unauthorized, a server shutdown).
    Connected(TunnelInfo),
    /// The tunnel moved to a new transport and kept its id and addresses; packets queued
    /// meanwhile are being sent.
    Reattached(TunnelInfo),
    /// The transport to the server was lost (reported by the runtime, or the server fell
    /// silent); the client re-attaches by itself and packets sent meanwhile are queued.
    TransportLost,
    /// The server closed the tunnel (Shutdown release notification), or it does not hold it
    /// any more (a re-attach answered Tunnel Not Found or Unauthorized, after a keepalive was
    /// answered Tunnel Not Found, or after a transport loss): its addresses are no longer ours.
    /// The client gets a fresh tunnel by itself and reports it with
    /// [`Connected`](Self::Connected).
    TunnelClosed {
        /// The reason the server gave.
        reason: ResultCode,
    },
    /// One attempt at a server failed; the client goes on to the next.
    ConnectFailed {
        /// The server tried.
        server: ServerEndpoint,
        /// The server's Result Code, or `None` for a transport failure or a timeout.
        result: Option<ResultCode>,
    },
    /// NAT discovery of the peer socket finished (peer tunneling only).
    NatDiscovered {
        /// Our server-reflexive address, if a STUN server answered.
        public: Option<SocketAddr>,
        /// Whether the NAT maps per destination (symmetric); `None` when fewer than two
        /// servers answered.
        varies_by_destination: Option<bool>,
    },
    /// A peer tunnel is up: opted-in flows to `peer` now take it.
    PeerTunnelUp {
        /// The peer's internal address.
        peer: IpAddr,
        /// The peer's address on the direct path; send its transmits there.
        path: SocketAddr,
        /// From the first opted-in packet (or the forwarded request) to up.
        setup: Duration,
        /// Whether this client initiated the negotiation.
        initiator: bool,
        /// The kind of our candidate on the path (host, server-reflexive or peer-reflexive),
        /// as the peer's answer to our probe showed it; `None` when no answer of the peer
        /// named it, or on a peer stream.
        local_kind: Option<CandidateKind>,
        /// The kind of the peer's candidate on the path: as it announced it, or
        /// peer-reflexive when learned from its probe; `None` on a peer stream.
        remote_kind: Option<CandidateKind>,
    },
    /// A peer tunnel went down, or a negotiation failed: flows to `peer` take the relay.
    PeerTunnelDown {
        /// The peer's internal address.
        peer: IpAddr,
        /// Why.
        reason: PeerDownReason,
    },
    /// Open a peer stream to `addr` (TCP, or TLS verifying that the server certificate's
    /// SHA-256 is `fingerprint`), then report it with
    /// [`Input::PeerStreamOpen`](super::Input::PeerStreamOpen) or
    /// [`Input::PeerStreamFailed`](super::Input::PeerStreamFailed), its envelopes with
    /// [`Input::PeerStreamEnvelope`](super::Input::PeerStreamEnvelope) and its end with
    /// [`Input::PeerStreamLost`](super::Input::PeerStreamLost).
    OpenPeerStream {
        /// The peer's internal address.
        peer: IpAddr,
        /// The id of the new stream.
        stream: PeerStreamId,
        /// Where to connect.
        addr: SocketAddr,
        /// [`Transport::TCP`](crate::wire::Transport::TCP) or
        /// [`Transport::TLS`](crate::wire::Transport::TLS).
        transport: crate::wire::Transport,
        /// The pinned certificate fingerprint (TLS).
        fingerprint: Option<[u8; 32]>,
    },
    /// Close this peer stream (opened or accepted) and forget it; nothing more is reported
    /// about it.
    ClosePeerStream {
        /// The stream.
        stream: PeerStreamId,
    },
    /// Initiator: run a peer session handshake (`docs/PROTOCOL.md` §7.5) as its client, from
    /// the peer UDP socket to `path`, and accept it only if the SHA-256 of the peer's
    /// end-entity certificate (DER) is `fingerprint`; present our own certificate (the one
    /// whose fingerprint is [`PeerConfig::certificate_fingerprint`](super::PeerConfig::certificate_fingerprint)).
    /// Then report it with [`Input::PeerSessionOpen`](super::Input::PeerSessionOpen) or
    /// [`Input::PeerSessionFailed`](super::Input::PeerSessionFailed), send
    /// [`Destination::PeerSession`] transmits in it and report what it carries with
    /// [`Input::PeerSessionDatagram`](super::Input::PeerSessionDatagram).
    OpenPeerSession {
        /// The peer's internal address.
        peer: IpAddr,
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// [`Transport::DTLS`](crate::wire::Transport::DTLS) or
        /// [`Transport::QUIC`](crate::wire::Transport::QUIC).
        transport: crate::wire::Transport,
        /// The pinned fingerprint of the peer's certificate.
        fingerprint: [u8; 32],
    },
    /// Destination: accept a peer session handshake from `path` (a verified probe came from
    /// there), and only with a client certificate whose SHA-256 is `fingerprint`. Handshakes
    /// from addresses not authorised this way are refused, and their datagrams dropped before
    /// the session layer sees them. Report the outcome and the traffic as for
    /// [`OpenPeerSession`](Self::OpenPeerSession).
    AcceptPeerSession {
        /// The peer's internal address.
        peer: IpAddr,
        /// The address authorised.
        path: SocketAddr,
        /// [`Transport::DTLS`](crate::wire::Transport::DTLS) or
        /// [`Transport::QUIC`](crate::wire::Transport::QUIC).
        transport: crate::wire::Transport,
        /// The initiator's certificate fingerprint.
        fingerprint: [u8; 32],
    },
    /// Close the peer session on `path` (opened, accepted or in its handshake) and withdraw the
    /// authorisation of `path`; nothing more is reported about it.
    ClosePeerSession {
        /// The peer's address on the direct path.
        path: SocketAddr,
    },
    /// The client is finished; nothing more happens. Always the last event.
    Terminated {
        /// Why.
        reason: TerminateReason,
    },
}

/// Why a [`TunnelClient`](super::TunnelClient) terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TerminateReason {
    /// The application called [`release`](super::TunnelClient::release).
    Released,
    /// The server ended the tunnel with a Configuration Release Notification (or Request)
    /// carrying this reason (Administrative, Timeout, …).
    ReleasedByServer(ResultCode),
    /// A fresh Configuration Request was refused with Unauthorized: the credential is wrong,
    /// and asking again would not change that.
    Unauthorized,
}

/// The configuration the server gave the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The tunnel id (never 0).
    pub tunnel_id: u64,
    /// Internal IPv4 address and prefix, if assigned.
    pub ipv4: Option<InternalAddress<Ipv4Addr>>,
    /// Internal IPv6 address and prefix, if assigned.
    pub ipv6: Option<InternalAddress<Ipv6Addr>>,
    /// DNS servers of the inner network.
    pub dns_servers: Vec<IpAddr>,
    /// The keepalive interval in use: the server's, else the one proposed (see
    /// [`ClientConfig::keepalive_interval`](super::ClientConfig::keepalive_interval)), else
    /// the default of `docs/PROTOCOL.md` §3.3 for the transport (30 s datagram, 300 s
    /// stream).
    pub keepalive_interval: Duration,
    /// This client's transport address as the server saw it (behind a NAT: the NAT's mapping).
    pub observed_address: Option<SocketAddr>,
    /// The largest inner IP packet the tunnel carries, in octets: the server's Maximum Packet
    /// Size, else what one envelope holds. Larger packets are refused by
    /// [`TunnelClient::send_ip`](super::TunnelClient::send_ip) on every path, so that a flow
    /// behaves the same on a peer tunnel and on the relay.
    pub max_packet_len: usize,
    /// The director's STUN responder, when it announced one (STUN Port, at the server's
    /// address): NAT discovery asks it when the peer configuration names no STUN server.
    pub stun_server: Option<SocketAddr>,
    /// The server holding the tunnel.
    pub server: ServerEndpoint,
}

impl TunnelInfo {
    /// Whether `addr` is one of the tunnel's internal addresses.
    pub fn owns(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4.is_some_and(|i| i.addr == a),
            IpAddr::V6(a) => self.ipv6.is_some_and(|i| i.addr == a),
        }
    }
}

/// Where the envelope written by [`poll_transmit`](super::TunnelClient::poll_transmit) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The destination.
    pub destination: Destination,
}

/// The path a transmit takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Destination {
    /// The current transport to the server.
    Server,
    /// From the peer UDP socket to this address: STUN requests and peer tunnel traffic.
    Peer(SocketAddr),
    /// On this peer stream, as one whole envelope (`docs/PROTOCOL.md` §7.7).
    PeerStream(PeerStreamId),
    /// Inside the peer session (DTLS or QUIC) with this address, as one whole envelope
    /// (`docs/PROTOCOL.md` §7.5).
    PeerSession(SocketAddr),
}

/// A peer stream (TCP or TLS, `docs/PROTOCOL.md` §7.7). Ids of streams the client asks to open
/// ([`ClientEvent::OpenPeerStream`]) have the top bit set; the runtime picks the ids of the
/// streams it accepts ([`Input::PeerStreamAccepted`](super::Input::PeerStreamAccepted)) with
/// the top bit clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerStreamId(pub u64);

impl PeerStreamId {
    /// The bit that marks ids the client chose.
    pub const CLIENT_CHOSEN: u64 = 1 << 63;
}

/// The client's life cycle, as seen from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientState {
    /// Getting a fresh tunnel: waiting to retry, opening a transport, or configuring.
    Connecting,
    /// The tunnel is up; data flows.
    Connected,
    /// The tunnel exists but its transport was lost; the client is getting it back.
    Reattaching,
    /// A Configuration Release Request is under way.
    Releasing,
    /// Finished (see [`ClientEvent::Terminated`]).
    Terminated,
}

/// Why [`TunnelClient::send_ip`](super::TunnelClient::send_ip) refused a packet. Nothing was
/// queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No tunnel yet (or the old one is gone and a fresh one is being set up): there is no
    /// source address to send from.
    #[error("no tunnel yet")]
    NotConnected,
    /// The client is releasing or terminated.
    #[error("the tunnel is closed")]
    Closed,
    /// The bytes are not one whole IPv4 or IPv6 packet (`docs/PROTOCOL.md` §2.2).
    #[error("invalid packet: {0}")]
    InvalidPacket(#[from] InnerPacketError),
    /// The packet's source is not an internal address of the tunnel; the server would drop it.
    #[error("source {0} is not an internal address of the tunnel")]
    WrongSource(IpAddr),
    /// The packet is larger than the tunnel carries ([`TunnelInfo::max_packet_len`]).
    #[error("inner packet of {len} octets exceeds the tunnel's maximum of {max}")]
    TooLarge {
        /// The packet's size.
        len: usize,
        /// The tunnel's maximum.
        max: usize,
    },
    /// [`max_queued_packets`](super::ClientConfig::max_queued_packets) packets are waiting
    /// already (while re-attaching, or because `poll_transmit` is not being drained).
    #[error("send queue full")]
    QueueFull,
}

/// Counters of a [`TunnelClient`](super::TunnelClient). Every input the client drops is counted
/// under exactly one `dropped_*` reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Envelopes written by `poll_transmit`.
    pub envelopes_sent: u64,
    /// Of those, data envelopes.
    pub data_sent: u64,
    /// Of those, retransmitted requests.
    pub retransmissions: u64,
    /// Keepalive requests started (not counting their retransmissions).
    pub keepalives_sent: u64,
    /// Envelopes reported with [`Input::Envelope`](super::Input::Envelope).
    pub envelopes_received: u64,
    /// Inner packets queued for `recv_ip`.
    pub data_received: u64,
    /// Server requests answered (duplicates and error responses included).
    pub requests_answered: u64,
    /// Of those, duplicates answered with the remembered response (§6.2).
    pub duplicate_requests: u64,
    /// Of those, requests that failed to decode and got an error response (§6.1).
    pub error_responses_sent: u64,
    /// Transports lost (reported by the runtime, or silent server, or failed keepalive).
    pub transports_lost: u64,
    /// Successful re-attaches.
    pub reattaches: u64,
    /// Re-attaches on the open transport because the server answered a keepalive with
    /// Tunnel Not Found (§3.4).
    pub tunnel_not_found_reattaches: u64,
    /// Keepalives sent before data after a silence from the server, so that a new address is
    /// proven to it (roaming, §3.4).
    pub roaming_probes: u64,
    /// Fresh tunnels obtained.
    pub connects: u64,
    /// Packets refused by `send_ip` because the send queue was full.
    pub send_queue_full: u64,
    /// Packets refused by `send_ip` (or an inner socket) because there was no tunnel, or none
    /// with an address of the destination's family.
    pub send_refused_not_connected: u64,
    /// Packets refused by `send_ip` because the client was releasing or terminated.
    pub send_refused_closed: u64,
    /// Packets refused because they were larger than the tunnel carries (IPv4 ones are
    /// fragmented by the inner sockets instead; IPv6 packets and datagrams past what IP holds
    /// are refused).
    pub send_refused_too_large: u64,
    /// Packets refused by `send_ip` because they were no whole IP packet or not from the
    /// tunnel's address.
    pub send_refused_invalid: u64,
    /// Configuration Requests written by `poll_transmit`, retransmissions included.
    pub configuration_requests_sent: u64,
    /// Keepalives sent at once after a peer tunnel went down, so that the relay reaches this
    /// client through its NAT again.
    pub server_path_refreshes: u64,
    /// Queued outbound packets discarded because their tunnel went away.
    pub send_queue_discarded: u64,
    /// Dropped: input while no transport is open.
    pub dropped_no_transport: u64,
    /// Dropped: not an envelope, or its length disagrees with its size.
    pub dropped_bad_envelope: u64,
    /// Dropped: an envelope of unknown type.
    pub dropped_unknown_envelope: u64,
    /// Dropped: a control message that failed to decode and gets no answer.
    pub dropped_bad_control: u64,
    /// Dropped: a response matching no outstanding request.
    pub dropped_unmatched_response: u64,
    /// Dropped: a successful Configuration Response without a tunnel id or an address, or
    /// without a verifying control key.
    pub dropped_invalid_configuration: u64,
    /// Dropped: a control message for our tunnel without the director's valid Message
    /// Integrity (forged, or not ours; §4.4).
    pub dropped_unauthenticated: u64,
    /// Dropped: a server request accepted before whose answer is no longer remembered, or
    /// older than the replay window (§6.2).
    pub dropped_replayed: u64,
    /// Dropped: a Configuration Response that does not echo our request's Client Nonce.
    pub dropped_unbound_response: u64,
    /// Dropped: a request this client does not accept from a server, or about another tunnel.
    pub dropped_unexpected_request: u64,
    /// Dropped: a data envelope that is not one whole IP packet.
    pub dropped_bad_packet: u64,
    /// Dropped: a data envelope whose destination is not one of our internal addresses.
    pub dropped_wrong_destination: u64,
    /// Dropped: a data envelope before the tunnel is up on this transport.
    pub dropped_data_not_connected: u64,
    /// Dropped: a received packet because the receive queue was full.
    pub dropped_receive_queue_full: u64,
    /// Dropped: a response to a server request because too many were waiting to be sent.
    pub dropped_control_queue_full: u64,
    /// Dropped: any input after termination.
    pub dropped_terminated: u64,
    /// Peer tunneling counters.
    pub peer: PeerStats,
}
