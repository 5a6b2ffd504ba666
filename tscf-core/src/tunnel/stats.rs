//! What a [`ClientHost`](super::ClientHost) counts.

use crate::client::ClientStats;
use crate::inner::tcp::TcpCounters;

/// Counters of a tunnel: the client state machine's and its host's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TunnelStats {
    /// The state machine's counters.
    pub client: ClientStats,
    /// Inner packets for a port no socket is bound to.
    pub unbound_port: u64,
    /// Inner packets that are neither UDP nor TCP (or not parseable).
    pub not_udp: u64,
    /// Inner packets dropped because the packet tap's queue was full.
    pub tap_queue_full: u64,
    /// Inner IPv4 fragments dropped: malformed, past the reassembly bounds, or of a datagram
    /// whose other fragments did not come in time.
    pub fragments_dropped: u64,
    /// What the inner TCP stack counted.
    pub tcp: TcpCounters,
    /// Inner datagrams dropped because the socket's queue was full.
    pub socket_queue_full: u64,
    /// Datagrams on the peer socket that were neither from the server tunnel nor for peer
    /// tunneling (which is off).
    pub udp_dropped: u64,
    /// Peer socket datagrams dropped by the `block_peer_traffic` test hook, both directions.
    pub peer_blocked: u64,
    /// Data envelopes sent to the server as QUIC datagrams (RFC 9221) rather than on the QUIC
    /// stream.
    pub quic_datagrams_sent: u64,
    /// QUIC datagrams received from the server.
    pub quic_datagrams_received: u64,
    /// Envelopes sent to the server as DTLS records.
    pub dtls_records_sent: u64,
    /// DTLS records received from the server, each one envelope.
    pub dtls_records_received: u64,
    /// Envelopes dropped because a stream's writer queue (server transport or peer stream)
    /// was full.
    pub stream_queue_full: u64,
    /// Notifications dropped because nobody read them.
    pub notifications_dropped: u64,
    /// QUIC or DTLS peer sessions whose handshake finished.
    pub peer_sessions_open: u64,
    /// QUIC or DTLS peer session handshakes that failed: a certificate that does not match the
    /// pinned fingerprint, a refusal, a timeout, a runtime without that transport.
    pub peer_session_failures: u64,
    /// Incoming QUIC peer connections refused: from an address not authorised, or one that
    /// holds an open session already.
    pub peer_sessions_refused: u64,
    /// QUIC datagrams on the peer socket from addresses not authorised for a peer session,
    /// dropped before the QUIC endpoint sees them.
    pub peer_quic_unauthorised: u64,
    /// QUIC datagrams on the peer socket dropped because the endpoint's inbox was full.
    pub peer_quic_inbox_full: u64,
    /// DTLS datagrams on the peer socket from addresses not authorised for a peer session,
    /// dropped before the DTLS endpoint sees them.
    pub peer_dtls_unauthorised: u64,
    /// Datagrams from an authorised address that the DTLS peer endpoint refused: records an
    /// established session could not authenticate, forged `ChangeCipherSpec` records, plaintext
    /// handshake records after the handshake or past its bound, and datagrams that are no DTLS
    /// record.
    pub peer_dtls_bad_records: u64,
    /// Datagrams from an authorised address without a DTLS session that do not start an
    /// allowed handshake.
    pub peer_dtls_unknown_source: u64,
    /// Datagrams the peer socket failed to send, each a counted loss: above all those larger
    /// than one UDP datagram may be (65 507 octets over IPv4), which a data envelope of the
    /// largest inner packets is inside a DTLS record (`docs/PROTOCOL.md` §7.5.1).
    pub peer_send_errors: u64,
    /// Envelopes a QUIC peer session sent on its stream because the peer takes no QUIC
    /// datagram that large, or none.
    pub peer_quic_stream_envelopes: u64,
    /// Envelopes dropped because a QUIC peer session's stream queue was full.
    pub peer_quic_stream_full: u64,
    /// Accepted peer streams closed at once because too many were in their handshake.
    pub peer_streams_refused: u64,
    /// Inner packets waiting in the client's send queue now, for a transport to the server
    /// (bounded by `max_queued_packets`).
    pub send_queue: usize,
    /// Octets of envelopes waiting for the stream writers now (the server transport and peer
    /// streams; each bounded by `stream_queue_bytes`).
    pub stream_queued_bytes: usize,
}
