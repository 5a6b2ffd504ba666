//! What the runtime reports to a [`TunnelClient`](super::TunnelClient): the [`Input`]s of
//! [`handle_input`](super::TunnelClient::handle_input).

use core::net::SocketAddr;

use super::event::PeerStreamId;

/// What the runtime reports to a [`TunnelClient`](super::TunnelClient); see
/// [`TunnelClient::handle_input`](super::TunnelClient::handle_input).
///
/// The server transport's inputs answer
/// [`ClientEvent::OpenTransport`](super::ClientEvent::OpenTransport); the runtime does not
/// report on a transport the client told it to close
/// ([`ClientEvent::CloseTransport`](super::ClientEvent::CloseTransport)). The peer inputs matter
/// only with [`ClientConfig::peer`](super::ClientConfig::peer) set; without it, what they carry
/// is dropped and counted, and an accepted peer stream is closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input<'a> {
    /// The transport asked for by [`ClientEvent::OpenTransport`](super::ClientEvent::OpenTransport)
    /// is up.
    TransportOpen,
    /// The transport asked for by [`ClientEvent::OpenTransport`](super::ClientEvent::OpenTransport)
    /// could not be opened.
    TransportFailed,
    /// The open transport closed or was reset.
    TransportLost,
    /// One whole envelope from the server transport: one datagram, or one envelope cut from a
    /// stream by [`StreamDeframer`](crate::wire::StreamDeframer).
    Envelope(&'a [u8]),
    /// A datagram received on the peer UDP socket: STUN answers, probes, the peer tunnels'
    /// control messages and data. Anything else is dropped and counted.
    PeerDatagram {
        /// The address it came from.
        from: SocketAddr,
        /// The datagram.
        datagram: &'a [u8],
    },
    /// A peer stream accepted by the runtime's listener (for TLS, after its handshake), with
    /// an id of its choosing (top bit clear, unique among its open streams). The client may
    /// close it at once ([`ClientEvent::ClosePeerStream`](super::ClientEvent::ClosePeerStream)):
    /// too many pending, a bad id, or peer tunneling off; and closes it if nothing valid arrives
    /// within the establishment timeout.
    PeerStreamAccepted {
        /// The id the runtime gave it.
        stream: PeerStreamId,
        /// Its remote address.
        remote: SocketAddr,
    },
    /// The peer stream asked for by
    /// [`ClientEvent::OpenPeerStream`](super::ClientEvent::OpenPeerStream) is connected (for
    /// TLS, its handshake done with the pinned fingerprint verified).
    PeerStreamOpen(PeerStreamId),
    /// The peer stream asked for by
    /// [`ClientEvent::OpenPeerStream`](super::ClientEvent::OpenPeerStream) could not be opened
    /// (refused, timed out, or a TLS certificate that does not match the fingerprint).
    PeerStreamFailed(PeerStreamId),
    /// An open peer stream (opened or accepted) ended or broke.
    PeerStreamLost(PeerStreamId),
    /// One whole envelope from a peer stream, as [`StreamDeframer`](crate::wire::StreamDeframer)
    /// yields it.
    PeerStreamEnvelope {
        /// The stream.
        stream: PeerStreamId,
        /// The envelope.
        envelope: &'a [u8],
    },
    /// The peer session on this path finished its handshake: for the initiator, the one asked
    /// for with [`ClientEvent::OpenPeerSession`](super::ClientEvent::OpenPeerSession), with the
    /// peer's certificate verified against the pinned fingerprint; for the destination, a
    /// handshake from an address authorised with
    /// [`ClientEvent::AcceptPeerSession`](super::ClientEvent::AcceptPeerSession), with the
    /// initiator's certificate verified. A session the client does not want is closed at once
    /// ([`ClientEvent::ClosePeerSession`](super::ClientEvent::ClosePeerSession)).
    PeerSessionOpen(SocketAddr),
    /// The peer session on this path failed its handshake (a certificate that does not match
    /// the fingerprint, refused, timed out) or, once open, ended or broke. The negotiation or
    /// tunnel with that peer ends and its flows stay on (or return to) the relay.
    PeerSessionFailed(SocketAddr),
    /// One envelope carried by the peer session on `path`, decrypted: one datagram of the
    /// session is one whole envelope, as
    /// [`Destination::PeerSession`](super::Destination::PeerSession) transmits are.
    PeerSessionDatagram {
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// The datagram the session carried.
        datagram: &'a [u8],
    },
}
