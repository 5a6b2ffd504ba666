//! Counters a director keeps; every drop has a reason.

use crate::wire::Transport;

/// Statistics of a [`SessionDirector`](super::SessionDirector).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct DirectorStats {
    /// Tunnels with a live transport.
    pub active_tunnels: usize,
    /// Tunnels waiting for a re-attach.
    pub persistent_tunnels: usize,
    /// Connections that have not completed a Configuration exchange.
    pub pending_connections: usize,
    /// Tunnels opened since start.
    pub tunnels_opened: u64,
    /// Tunnels closed since start.
    pub tunnels_closed: u64,
    /// Successful re-attaches.
    pub reattaches: u64,
    /// Tunnels opened with an address of one family only, the other family's pool being
    /// exhausted (`docs/PROTOCOL.md` §3.3).
    pub one_family_only: u64,
    /// Tunnels that followed their client to another connection (a new address) on an
    /// authenticated request from there (roaming).
    pub moves: u64,
    /// Tunnels on UDP that left their address to a new client: a Configuration Request for a
    /// new tunnel came from it and the tunnel did not answer the director's Keepalive within
    /// `address_check_timeout`, so it went persistent.
    pub address_takeovers: u64,
    /// Data frames relayed to another tunnel (less those its transport could not take).
    pub frames_relayed: u64,
    /// Octets of inner packets relayed.
    pub bytes_relayed: u64,
    /// Control messages answered (the answers the transports delivered or are delivering).
    pub control_answered: u64,
    /// Answers the transport could not deliver (a stream connection's queue was full, or it
    /// was closing): not in `control_answered`.
    pub answers_undelivered: u64,
    /// Keepalives the director sent on tunnels it had sent nothing for one keepalive interval
    /// (`docs/PROTOCOL.md` §3.5).
    pub keepalives_sent: u64,
    /// Data frames waiting in the tunnels' queues now (bounded by `max_total_queued_frames`).
    pub queued_frames: usize,
    /// Tunnels held now, by the transport each was last seen on, in transport order.
    #[cfg_attr(feature = "serde", serde(skip_deserializing))]
    pub tunnels_by_transport: Vec<TransportTunnels>,
    /// Configuration Requests refused, by reason.
    pub refused: RefusalCounters,
    /// Inputs dropped, by reason.
    pub dropped: DropCounters,
    /// Peer service activity.
    pub peer: PeerCounters,
    /// Cluster activity (all zero outside a cluster).
    pub cluster: ClusterCounters,
}

/// What a director of a cluster did with its registry and its mesh links
/// (`docs/CLUSTER.md`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct ClusterCounters {
    /// Registry requests issued.
    pub registry_requests: u64,
    /// Registry requests answered Failed.
    pub registry_failures: u64,
    /// Responses naming no request in flight (late, duplicate or unknown).
    pub registry_unexpected: u64,
    /// Registry requests not issued: `max_in_flight` were in flight.
    pub registry_saturated: u64,
    /// Times the director put every record it holds again after the registry failed.
    pub registry_recoveries: u64,
    /// Addresses the registry granted to the stock.
    pub addresses_claimed: u64,
    /// Addresses the registry refused (another director holds them): kept out of the pool.
    pub addresses_refused: u64,
    /// Configuration Requests for a new tunnel dropped unanswered while the stock of
    /// addresses was empty and a refill was under way.
    pub stock_empty: u64,
    /// Re-attach requests for tunnels held elsewhere parked while the registry is asked.
    pub parked: u64,
    /// Re-attach requests not parked: too many were.
    pub parked_full: u64,
    /// Re-attach requests not parked: their registry lookup would have gone beyond
    /// `max_lookup_rate`.
    pub lookups_limited: u64,
    /// Tunnels adopted from another director (their client re-attached here).
    pub adoptions: u64,
    /// Tunnels dropped because another director adopted them.
    pub moved_away: u64,
    /// Mesh links opened.
    pub mesh_links: u64,
    /// `DialMesh` events emitted.
    pub mesh_dials: u64,
    /// Envelopes received on mesh links.
    pub mesh_frames_in: u64,
    /// Envelopes queued for mesh links.
    pub mesh_frames_out: u64,
    /// Route lookups sent to the registry.
    pub route_lookups: u64,
    /// Peer requests forwarded to another director, or answered for one.
    pub peer_requests_relayed: u64,
    /// Peer Gone messages sent: a closed tunnel's partners held by other directors.
    pub peer_gone_sent: u64,
    /// What the mesh dropped, by reason.
    pub mesh_dropped: MeshDropCounters,
}

/// Packets and messages the mesh dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct MeshDropCounters {
    /// A packet for an address whose director is being looked up.
    pub awaiting_route: u64,
    /// A packet, or a Peer Gone, for a director known but not linked.
    pub no_link: u64,
    /// The mesh link's queue was full.
    pub queue_full: u64,
    /// A packet from a mesh link for an address no local tunnel holds.
    pub not_here: u64,
    /// A packet from a mesh link whose source, or a Peer Gone whose departed client, is a
    /// local tunnel's or outside the pools.
    pub spoofed_source: u64,
    /// A partner named by a Peer Gone that no local tunnel holds, or that was not introduced
    /// to the departed client through that link (or released it since).
    pub not_introduced: u64,
    /// A packet from a mesh link larger than `max_packet_len`.
    pub oversized: u64,
    /// A payload from a mesh link that is not one IP packet.
    pub bad_packet: u64,
    /// A mesh message that does not decode or that the link may not send (before its Hello,
    /// an unknown envelope type).
    pub bad_message: u64,
}

/// Peer service activity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PeerCounters {
    /// Peer requests forwarded to their destination.
    pub requests_forwarded: u64,
    /// Pairs introduced (the destination answered Available, or had announced itself).
    pub introductions: u64,
    /// Initiators answered at once from the destination's announcement.
    pub answered_from_announcement: u64,
    /// Destinations that answered Unavailable.
    pub refused_by_destination: u64,
    /// Destinations that did not answer in time.
    pub timeouts: u64,
    /// Requests refused by the rate limit of the initiator's peer requests.
    pub rate_limited: u64,
    /// Requests refused by the limit of introductions of one initiator to one destination.
    pub introductions_limited: u64,
    /// Candidates not forwarded (implausible or duplicate).
    pub candidates_dropped: u64,
    /// Release notices sent because a server tunnel closed.
    pub release_notices: u64,
    /// Release notices held for a persistent tunnel, to be sent on its re-attach.
    pub release_notices_held: u64,
}

/// Configuration Requests refused, by result code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct RefusalCounters {
    /// No or wrong admission credential.
    pub unauthorized: u64,
    /// Re-attach whose proof (Message Integrity under the tunnel's key) did not verify.
    pub bad_reattach_secret: u64,
    /// Answered Rate Limited: the source made too many failed admissions.
    pub rate_limited: u64,
    /// Configuration Requests without a Client Nonce, from clients that do not key their
    /// control messages: answered Unauthorized.
    pub unkeyed: u64,
    /// Re-attach of a tunnel the director does not hold.
    pub tunnel_not_found: u64,
    /// At `max_tunnels`.
    pub server_full: u64,
    /// A pool ran dry.
    pub no_address: u64,
    /// Control messages answered with an error result (malformed, unknown, version…).
    pub protocol_errors: u64,
}

/// Inputs dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct DropCounters {
    /// The envelope header was invalid.
    pub bad_envelope: u64,
    /// An envelope of a type this version does not know.
    pub unknown_envelope_type: u64,
    /// Data on a connection without a tunnel.
    pub not_configured: u64,
    /// The data payload was not one whole IP packet.
    pub bad_packet: u64,
    /// The inner packet exceeded `max_packet_len`.
    pub oversized: u64,
    /// The inner source was not the sending tunnel's address.
    pub spoofed_source: u64,
    /// No live tunnel holds the inner destination.
    pub unknown_destination: u64,
    /// The destination's queue (or the global queue) was full.
    pub queue_full: u64,
    /// The destination is persistent and its held frames (or all held frames) reached their
    /// bound.
    pub held_full: u64,
    /// A control message that failed validation and is not answered.
    pub bad_control: u64,
    /// A message whose header names another tunnel than its connection's.
    pub tunnel_mismatch: u64,
    /// A control message for a tunnel without its client's valid Message Integrity (forged,
    /// or from a client that lost its key): never answered.
    pub unauthenticated: u64,
    /// A verified request the director had accepted before and does not remember the answer
    /// of, or one from another connection than its tunnel's that is not fresh: a replay.
    pub replayed: u64,
    /// A response matching no outstanding request, or a message not meant for a director.
    pub unexpected_message: u64,
    /// Data for a connection the director no longer knows.
    pub unknown_connection: u64,
}

/// The tunnels of one transport (the one each was last seen on), in
/// [`DirectorStats::tunnels_by_transport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct TransportTunnels {
    /// The transport.
    pub transport: Transport,
    /// Tunnels with a live connection.
    pub active: usize,
    /// Tunnels waiting for a re-attach.
    pub persistent: usize,
}
