//! What a datagram on a shared UDP socket is, by its first octet (`docs/PROTOCOL.md` §2.4,
//! after RFC 9443).

/// The protocol of a datagram on a shared UDP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatagramKind {
    /// STUN (first octet 0–3): NAT discovery.
    Stun,
    /// A tscf envelope (4–5).
    Envelope,
    /// A DTLS record (20–63).
    Dtls,
    /// QUIC (64–127 and 192–255).
    Quic,
    /// Anything else, the empty datagram included: dropped and counted.
    Unknown,
}

impl DatagramKind {
    /// Classifies `datagram` by its first octet. A `Stun` datagram may still fail to be one
    /// (see [`stun::is_stun`](crate::stun::is_stun)).
    pub fn of(datagram: &[u8]) -> Self {
        match datagram.first() {
            Some(0..=3) => Self::Stun,
            Some(4 | 5) => Self::Envelope,
            Some(20..=63) => Self::Dtls,
            Some(64..=127 | 192..=255) => Self::Quic,
            _ => Self::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edges_of_each_range_follow_the_table() {
        use DatagramKind::*;
        let table = [
            (0, Stun),
            (3, Stun),
            (4, Envelope),
            (5, Envelope),
            (6, Unknown),
            (19, Unknown),
            (20, Dtls),
            (63, Dtls),
            (64, Quic),
            (127, Quic),
            (128, Unknown),
            (191, Unknown),
            (192, Quic),
            (255, Quic),
        ];
        for (octet, kind) in table {
            assert_eq!(DatagramKind::of(&[octet, 0]), kind, "{octet}");
        }
        assert_eq!(DatagramKind::of(&[]), Unknown);
    }
}
