//! What a [`ServerHost`](super::ServerHost) counts.

use crate::director::DirectorStats;

/// Counters of a server's transports (the director keeps its own in [`DirectorStats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct TransportCounters {
    /// Stream connections accepted (TCP, TLS, QUIC).
    pub streams_accepted: u64,
    /// Stream connections closed at accept because `max_stream_connections` were open, and
    /// DTLS associations closed at the end of their handshake for the same reason.
    pub streams_refused: u64,
    /// Stream connections closed at accept because their source held
    /// `max_unconfigured_per_source` unconfigured ones.
    pub streams_refused_per_source: u64,
    /// Unconfigured stream connections closed to make room for a new one when
    /// `max_stream_connections` were open.
    pub streams_evicted: u64,
    /// Envelopes for a connection that was closing or gone, dropped.
    pub sent_to_closed: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: u64,
    /// Streams closed because they lost framing (`docs/PROTOCOL.md` §2.1).
    pub framing_errors: u64,
    /// Envelopes dropped because a stream connection's writer queue was full.
    pub stream_queue_full: u64,
    /// Stream connections cut because their writer made no progress within
    /// `stream_write_timeout` (a peer that does not read).
    pub stream_write_timeouts: u64,
    /// Stream connections cut because they did not close within `close_grace` of the server
    /// closing them.
    pub stream_close_timeouts: u64,
    /// STUN Binding requests answered.
    pub stun_answered: u64,
    /// Datagrams dropped on a UDP listener: neither STUN nor tscf (§2.4), or invalid STUN.
    pub udp_dropped: u64,
    /// Datagrams that could not be sent.
    pub udp_send_errors: u64,
    /// QUIC handshakes that failed or timed out.
    pub quic_handshake_failures: u64,
    /// New QUIC clients sent a Retry to prove their address (see
    /// [`ServerConfig::quic_retry_above`](super::ServerConfig::quic_retry_above)).
    pub quic_retries: u64,
    /// Data envelopes sent as QUIC datagrams (RFC 9221) rather than on the QUIC stream.
    pub quic_datagrams_sent: u64,
    /// QUIC datagrams received (each one envelope).
    pub quic_datagrams_received: u64,
    /// DTLS handshakes completed.
    pub dtls_handshakes: u64,
    /// DTLS handshakes that failed (a bad or unverified certificate, a fatal alert, a record
    /// the handshake could not take) or timed out; their state is dropped.
    pub dtls_handshake_failures: u64,
    /// Datagrams on a DTLS listener from a source with no DTLS state that are neither a
    /// ClientHello nor one with a valid cookie: dropped before any state is kept for the source.
    pub dtls_unknown_source: u64,
    /// DTLS records that an association refused (malformed, or failing to authenticate once
    /// the association is up) and application data that is not one envelope.
    pub dtls_bad_records: u64,
    /// Half-open DTLS handshakes evicted because `dtls_max_half_open` was reached.
    pub dtls_half_open_evicted: u64,
    /// HelloVerifyRequests sent, statelessly, to DTLS ClientHellos without a cookie.
    pub dtls_hello_verify_sent: u64,
    /// DTLS ClientHellos with a wrong or expired cookie.
    pub dtls_bad_cookies: u64,
}

/// A snapshot of a running server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct ServerStats {
    /// The director's statistics.
    pub director: DirectorStats,
    /// The transports' counters.
    pub transport: TransportCounters,
    /// Stream connections open now (TCP, TLS and QUIC, handshaking included).
    pub stream_connections: usize,
    /// UDP remote addresses mapped to a director connection now.
    pub udp_connections: usize,
    /// DTLS associations with completed handshakes now (each one director connection).
    pub dtls_associations: usize,
    /// DTLS handshakes in progress now, over all DTLS listeners (each bounded by
    /// `dtls_max_half_open`).
    pub dtls_half_open: usize,
    /// Octets of envelopes waiting for the stream connections' writers now, over all of them
    /// (each bounded by `stream_queue_bytes`).
    pub stream_queued_bytes: usize,
}
