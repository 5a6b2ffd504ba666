//! The checks an inner IP packet passes before it is routed (`docs/PROTOCOL.md` §2.2).
//!
//! Header parsing is etherparse's (no allocation, no `std`); this module adds only the rules
//! tscf imposes: the envelope carries exactly one whole packet, so the IP length fields must
//! account for every octet.

use core::net::IpAddr;

use etherparse::{IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice, UdpHeaderSlice};

/// Octets of an IPv6 fixed header.
const IPV6_HEADER_LEN: usize = 40;

/// A checked view of one inner IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InnerPacket<'a> {
    bytes: &'a [u8],
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    header_len: usize,
}

/// Why an envelope payload is not one whole IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InnerPacketError {
    /// Empty, or the version nibble is neither 4 nor 6.
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    /// The header is truncated or inconsistent.
    #[error("invalid IP header")]
    BadHeader,
    /// The IP length field disagrees with the envelope payload's size.
    #[error("IP length {declared} does not match the {actual}-octet payload")]
    LengthMismatch {
        /// What the IP header says.
        declared: usize,
        /// What the envelope holds.
        actual: usize,
    },
}

impl<'a> InnerPacket<'a> {
    /// Checks `bytes` as one whole IPv4 or IPv6 packet.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, InnerPacketError> {
        let (source, destination, protocol, header_len, declared) =
            match bytes.first().map(|b| b >> 4) {
                Some(4) => {
                    let h = Ipv4HeaderSlice::from_slice(bytes)
                        .map_err(|_| InnerPacketError::BadHeader)?;
                    let header_len = usize::from(h.ihl()) * 4;
                    let total = usize::from(h.total_len());
                    if total < header_len {
                        return Err(InnerPacketError::BadHeader);
                    }
                    let (src, dst) = (h.source_addr().into(), h.destination_addr().into());
                    (src, dst, h.protocol().0, header_len, total)
                }
                Some(6) => {
                    let h = Ipv6HeaderSlice::from_slice(bytes)
                        .map_err(|_| InnerPacketError::BadHeader)?;
                    let total = IPV6_HEADER_LEN + usize::from(h.payload_length());
                    let (src, dst) = (h.source_addr().into(), h.destination_addr().into());
                    (src, dst, h.next_header().0, IPV6_HEADER_LEN, total)
                }
                _ => return Err(InnerPacketError::NotIp),
            };
        if declared != bytes.len() {
            return Err(InnerPacketError::LengthMismatch {
                declared,
                actual: bytes.len(),
            });
        }
        Ok(Self {
            bytes,
            source,
            destination,
            protocol,
            header_len,
        })
    }

    /// The source address: must be the sending tunnel's internal address.
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// The destination address: selects the tunnel the director relays to.
    pub fn destination(&self) -> IpAddr {
        self.destination
    }

    /// The IP protocol number (IPv4) or first next-header (IPv6).
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Source and destination port when this is a UDP packet with a whole UDP header
    /// (an IPv6 packet with extension headers reports none).
    pub fn udp_ports(&self) -> Option<(u16, u16)> {
        if self.protocol != IpNumber::UDP.0 {
            return None;
        }
        let udp = UdpHeaderSlice::from_slice(self.bytes.get(self.header_len..)?).ok()?;
        Some((udp.source_port(), udp.destination_port()))
    }

    /// Source and destination port when this is a UDP or TCP packet whose transport header
    /// starts in it: not an IPv4 fragment other than the first (an IPv6 packet with extension
    /// headers reports none).
    pub fn ports(&self) -> Option<(u16, u16)> {
        if self.protocol != IpNumber::UDP.0 && self.protocol != IpNumber::TCP.0 {
            return None;
        }
        if self.bytes.first().map(|b| b >> 4) == Some(4) {
            let offset = u16::from_be_bytes([*self.bytes.get(6)?, *self.bytes.get(7)?]);
            if offset & 0x1fff != 0 {
                return None;
            }
        }
        // The two ports open both headers alike.
        let ports = self.bytes.get(self.header_len..self.header_len + 4)?;
        Some((
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ))
    }

    /// The whole packet.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn udp_v4(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, 6000);
        let mut out = Vec::new();
        builder.write(&mut out, payload).expect("vec write");
        out
    }

    #[test]
    fn ports_are_those_of_udp_and_tcp_but_not_of_later_fragments() {
        let v4 = udp_v4(b"rtp");
        let p = InnerPacket::parse(&v4).expect("valid");
        assert_eq!(p.ports(), Some((5004, 6000)));
        let builder = PacketBuilder::ipv6([1; 16], [2; 16], 64).tcp(40_000, 22, 1, 1024);
        let mut tcp = Vec::new();
        builder.write(&mut tcp, b"ssh").expect("vec write");
        let p = InnerPacket::parse(&tcp).expect("valid");
        assert_eq!((p.ports(), p.udp_ports()), (Some((40_000, 22)), None));
        let mut fragment = udp_v4(b"rtp");
        fragment[7] = 1;
        let p = InnerPacket::parse(&fragment).expect("an IPv4 header");
        assert_eq!(p.ports(), None);
    }

    #[test]
    fn accepts_whole_ipv4_and_ipv6_packets() {
        let v4 = udp_v4(b"rtp");
        let p = InnerPacket::parse(&v4).expect("valid");
        assert_eq!(p.source(), IpAddr::from([10, 77, 0, 2]));
        assert_eq!(p.destination(), IpAddr::from([10, 77, 0, 3]));
        assert_eq!(p.udp_ports(), Some((5004, 6000)));

        let src: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut dst = src;
        dst[15] = 3;
        let builder = PacketBuilder::ipv6(src, dst, 64).udp(1, 2);
        let mut v6 = Vec::new();
        builder.write(&mut v6, b"x").expect("vec write");
        let p = InnerPacket::parse(&v6).expect("valid");
        assert_eq!(p.destination(), IpAddr::from(dst));
        assert_eq!(p.udp_ports(), Some((1, 2)));
    }

    #[test]
    fn rejects_trailing_and_missing_octets() {
        let mut v4 = udp_v4(b"rtp");
        let len = v4.len();
        v4.push(0);
        assert_eq!(
            InnerPacket::parse(&v4),
            Err(InnerPacketError::LengthMismatch {
                declared: len,
                actual: len + 1
            })
        );
        assert!(InnerPacket::parse(&v4[..len - 1]).is_err());
        assert_eq!(InnerPacket::parse(&[]), Err(InnerPacketError::NotIp));
        assert_eq!(
            InnerPacket::parse(&[0x50; 40]),
            Err(InnerPacketError::NotIp)
        );
        assert_eq!(
            InnerPacket::parse(&[0x45; 10]),
            Err(InnerPacketError::BadHeader)
        );
    }
}
