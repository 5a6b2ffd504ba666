//! Open newtypes for every code on the wire.
//!
//! A code is a newtype over its integer with named constants, so that values this version does
//! not know still decode, round-trip and print (in hex). Model: rustls `msgs/macros.rs`.

use core::fmt;

/// Declares an open code newtype with named constants and a `Debug` that prints the name, or
/// the value in hex when the code is unknown.
macro_rules! wire_code {
    (
        $(#[$meta:meta])*
        $name:ident($repr:ty) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        pub struct $name(pub $repr);

        impl $name {
            $( $(#[$vmeta])* pub const $variant: Self = Self($value); )*

            /// The registered name of this code, if this version knows it.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($text), )*
                    _ => None,
                }
            }

            /// Whether this version knows the code.
            pub fn is_known(self) -> bool {
                self.name().is_some()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }

        impl From<$repr> for $name {
            fn from(value: $repr) -> Self {
                Self(value)
            }
        }
    };
}

wire_code! {
    /// The type octet of an envelope (`docs/PROTOCOL.md` §2).
    EnvelopeType(u8) {
        /// One whole inner IPv4 or IPv6 packet.
        DATA = 0x04 => "Data",
        /// One control message.
        CONTROL = 0x05 => "Control",
        /// One director-to-director message, on a mesh link only (`docs/PROTOCOL.md` §9).
        MESH = 0x06 => "Mesh",
    }
}

wire_code! {
    /// The type of a control message (`docs/PROTOCOL.md` §3.2). Requests are odd; the response
    /// to request `t` is `t + 1`.
    MessageType(u8) {
        /// Client asks for a tunnel (or re-attaches one).
        CONFIGURATION_REQUEST = 0x01 => "Configuration Request",
        /// Server assigns the tunnel's configuration, or refuses.
        CONFIGURATION_RESPONSE = 0x02 => "Configuration Response",
        /// Either side tears the tunnel down.
        CONFIGURATION_RELEASE_REQUEST = 0x03 => "Configuration Release Request",
        /// Acknowledges a release request.
        CONFIGURATION_RELEASE_RESPONSE = 0x04 => "Configuration Release Response",
        /// Server tells the client its tunnel is closed (administrative close, shutdown).
        CONFIGURATION_RELEASE_NOTIFICATION = 0x05 => "Configuration Release Notification",
        /// Acknowledges a release notification.
        CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE = 0x06 => "Configuration Release Notification Response",
        /// Liveness check.
        KEEPALIVE = 0x07 => "Keepalive",
        /// Answer to a keepalive.
        KEEPALIVE_RESPONSE = 0x08 => "Keepalive Response",
        /// Asks for a service (peer tunneling, …).
        CLIENT_SERVICE_REQUEST = 0x09 => "Client Service Request",
        /// Answer to a client service request.
        CLIENT_SERVICE_RESPONSE = 0x0a => "Client Service Response",
        /// Connectivity check on a candidate peer path.
        PEER_PROBE = 0x0b => "Peer Probe",
        /// Answer to a peer probe.
        PEER_PROBE_RESPONSE = 0x0c => "Peer Probe Response",
    }
}

impl MessageType {
    /// Whether this is a request (odd code): a receiver answers it with [`Self::response`].
    pub fn is_request(self) -> bool {
        self.0 % 2 == 1
    }

    /// The response type that answers this request type, if this is a request and the
    /// response code exists (`0xff` has none).
    pub fn response(self) -> Option<MessageType> {
        if self.is_request() {
            self.0.checked_add(1).map(MessageType)
        } else {
            None
        }
    }
}

wire_code! {
    /// The type octet of a TLV (`docs/PROTOCOL.md` §4). Codes `0x01..=0x7f` are
    /// comprehension-required; `0x80..=0xff` may be skipped when unknown.
    TlvType(u8) {
        /// Protocol versions the sender supports, one octet each.
        SUPPORTED_VERSION = 0x01 => "Supported Version",
        /// The tunnel a Configuration Request wants to re-attach.
        TUNNEL_ID = 0x02 => "Tunnel Id",
        /// Retired: the bare secret that authorised a re-attach before control messages were
        /// keyed (`docs/PROTOCOL.md` §3.4). Still decoded; never sent.
        REATTACH_SECRET = 0x03 => "Re-attach Secret",
        /// Internal IPv4 address and prefix length.
        INTERNAL_IPV4 = 0x04 => "Internal IPv4 Address",
        /// Internal IPv6 address and prefix length.
        INTERNAL_IPV6 = 0x05 => "Internal IPv6 Address",
        /// A DNS server for the inner network.
        DNS_SERVER = 0x06 => "DNS Server",
        /// Keepalive interval in milliseconds.
        KEEPALIVE_INTERVAL = 0x07 => "Keepalive Interval",
        /// Outcome of a request.
        RESULT_CODE = 0x08 => "Result Code",
        /// The service a Client Service message is about.
        SERVICE_TYPE = 0x09 => "Service Type",
        /// Transport, address and port.
        CONNECTION_INFO = 0x0a => "Connection Info",
        /// Whether the peer can build a peer tunnel.
        PEER_SERVICE_RESULT = 0x0b => "Peer Service Result",
        /// A peer tunnel candidate address.
        CANDIDATE = 0x0c => "Candidate",
        /// One-time token and certificate fingerprint issued by the director for a peer pair.
        PEER_CREDENTIALS = 0x0d => "Peer Credentials",
        /// Capability bits the client announces at configuration.
        CLIENT_CAPABILITIES = 0x0e => "Client Capabilities",
        /// Internal address of the other end of a peer tunnel.
        PEER_INTERNAL_ADDRESS = 0x0f => "Peer Internal Address",
        /// Admission credential in a Configuration Request.
        AUTH_TOKEN = 0x10 => "Auth Token",
        /// What a Client Service Request asks for (establish, release).
        SERVICE_ACTION = 0x11 => "Service Action",
        /// SHA-256 fingerprint of the sender's peer tunnel certificate.
        CERTIFICATE_FINGERPRINT = 0x12 => "Certificate Fingerprint",
        /// Source transport address of a probe, as the receiver saw it.
        OBSERVED_ADDRESS = 0x13 => "Observed Address",
        /// HMAC-SHA-256 over the message, keyed with the peer token or the tunnel's control
        /// key; always last.
        MESSAGE_INTEGRITY = 0x14 => "Message Integrity",
        /// Random octets of a Configuration Request, echoed in its response, which they bind
        /// to the request.
        CLIENT_NONCE = 0x15 => "Client Nonce",
        /// The tunnel's control key, from which the keys of Message Integrity on the server
        /// tunnel derive.
        CONTROL_KEY = 0x16 => "Control Key",
        /// Free-text name and version of the sender's software.
        SOFTWARE = 0x80 => "Software",
        /// Free-text detail for a result code.
        DIAGNOSTIC = 0x81 => "Diagnostic",
        /// Largest inner IP packet the director relays for the tunnel, in octets.
        MAX_PACKET_SIZE = 0x82 => "Maximum Packet Size",
        /// UDP port of the director's STUN responder, at the address the client reached.
        STUN_PORT = 0x83 => "STUN Port",
    }
}

impl TlvType {
    /// Whether a receiver that does not know this type may skip it (`0x80..=0xff`).
    pub fn is_optional(self) -> bool {
        self.0 & 0x80 != 0
    }
}

wire_code! {
    /// The outcome carried in every response (`docs/PROTOCOL.md` §5).
    ResultCode(u16) {
        /// The request succeeded.
        SUCCESS = 0 => "Success",
        /// The header's version is not supported; see the Supported Version TLV.
        VERSION_NOT_SUPPORTED = 1 => "Version Not Supported",
        /// The message broke the encoding rules.
        MALFORMED = 2 => "Malformed",
        /// The message type is unknown to the receiver.
        UNKNOWN_MESSAGE = 3 => "Unknown Message",
        /// A comprehension-required TLV is unknown to the receiver.
        UNKNOWN_CRITICAL_TLV = 4 => "Unknown Critical TLV",
        /// A well-formed value is not allowed (out of range, wrong family, …).
        ILLEGAL_VALUE = 5 => "Illegal Value",
        /// The address pool is exhausted.
        NO_ADDRESS_AVAILABLE = 6 => "No Address Available",
        /// The tunnel id is not known (or no longer held) by the server.
        TUNNEL_NOT_FOUND = 7 => "Tunnel Not Found",
        /// The requested service is not enabled.
        SERVICE_NOT_ENABLED = 8 => "Service Not Enabled",
        /// The peer is not a live tunnel client or cannot build a peer tunnel.
        PEER_UNAVAILABLE = 9 => "Peer Unavailable",
        /// The peer did not answer in time.
        PEER_TIMEOUT = 10 => "Peer Timeout",
        /// Credentials are missing or wrong.
        UNAUTHORIZED = 11 => "Unauthorized",
        /// Too many requests; try later.
        RATE_LIMITED = 12 => "Rate Limited",
        /// The server holds its maximum number of tunnels.
        SERVER_FULL = 13 => "Server Full",
        /// Release reason: closed by an administrator.
        ADMINISTRATIVE = 14 => "Administrative",
        /// Release reason: the server is shutting down.
        SHUTDOWN = 15 => "Shutdown",
        /// Release reason: the tunnel was idle or persistent for too long.
        TIMEOUT = 16 => "Timeout",
        /// The receiver failed for a reason of its own.
        INTERNAL_ERROR = 17 => "Internal Error",
    }
}

wire_code! {
    /// A tunnel transport (`docs/PROTOCOL.md` §4.3).
    Transport(u8) {
        /// Plain UDP.
        UDP = 1 => "UDP",
        /// Plain TCP.
        TCP = 2 => "TCP",
        /// TLS over TCP.
        TLS = 3 => "TLS",
        /// DTLS over UDP.
        DTLS = 4 => "DTLS",
        /// QUIC over UDP.
        QUIC = 5 => "QUIC",
    }
}

/// A transport serializes as its name (`"UDP"`, `"QUIC"`…; an unknown one as its code in hex).
#[cfg(feature = "serde")]
impl serde::Serialize for Transport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Transport {
    /// Whether envelopes travel as datagrams (one envelope per datagram) on this transport.
    /// On QUIC, data travels as datagrams and control on a stream.
    pub fn is_datagram(self) -> bool {
        matches!(self, Self::UDP | Self::DTLS)
    }
}

wire_code! {
    /// A Client Service Request's service (`docs/PROTOCOL.md` §4.3).
    ServiceType(u8) {
        /// Peer tunneling.
        PEER = 1 => "Peer",
        /// Dynamic datagram tunnels (reserved).
        DDT = 2 => "DDT",
        /// Redundancy (reserved).
        REDUNDANCY = 3 => "Redundancy",
        /// Multipath (reserved).
        MULTIPATH = 4 => "Multipath",
    }
}

wire_code! {
    /// What a Client Service Request asks of the service.
    ServiceAction(u8) {
        /// Set the service up.
        ESTABLISH = 1 => "Establish",
        /// Tear the service down.
        RELEASE = 2 => "Release",
        /// Tell the director this client's peer candidates ahead of any request (§7.2).
        ANNOUNCE = 3 => "Announce",
    }
}

wire_code! {
    /// Whether the destination of a peer service request can build a peer tunnel.
    PeerServiceResult(u8) {
        /// The peer listens and probes; its candidates follow.
        AVAILABLE = 1 => "Available",
        /// The peer cannot or will not build a peer tunnel.
        UNAVAILABLE = 2 => "Unavailable",
        /// A negotiation for this pair is under way from the other side; act as destination.
        IN_PROGRESS = 3 => "In Progress",
    }
}

wire_code! {
    /// The kind of a peer tunnel candidate (ICE's terms, RFC 8445 §5.1.1).
    CandidateKind(u8) {
        /// An address on one of the client's own interfaces.
        HOST = 1 => "Host",
        /// The client's address as a STUN server saw it (its NAT's mapping).
        SERVER_REFLEXIVE = 2 => "Server Reflexive",
        /// An address learned from a peer's probe.
        PEER_REFLEXIVE = 3 => "Peer Reflexive",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_print_in_hex_and_round_trip() {
        assert_eq!(format!("{:?}", MessageType(0x42)), "MessageType(0x42)");
        assert_eq!(format!("{:?}", MessageType::KEEPALIVE), "Keepalive");
        assert_eq!(format!("{}", ResultCode(0x1234)), "ResultCode(0x1234)");
        assert!(!TlvType(0x7f).is_known());
        assert!(TlvType(0x90).is_optional() && !TlvType(0x10).is_optional());
    }

    #[test]
    fn requests_are_odd_and_answered_by_the_next_code() {
        assert_eq!(
            MessageType::CONFIGURATION_REQUEST.response(),
            Some(MessageType::CONFIGURATION_RESPONSE)
        );
        assert_eq!(
            MessageType::PEER_PROBE.response(),
            Some(MessageType::PEER_PROBE_RESPONSE)
        );
        assert_eq!(MessageType::KEEPALIVE_RESPONSE.response(), None);
        assert_eq!(MessageType(0xff).response(), None);
        assert_eq!(MessageType(0x41).response(), Some(MessageType(0x42)));
    }
}
