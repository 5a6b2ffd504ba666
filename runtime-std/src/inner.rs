//! Inner UDP datagrams as IP packets: the part of an inner socket that does not depend on how
//! a runtime waits, shared by this crate's [`InnerUdpSocket`](crate::InnerUdpSocket) and the
//! smol runtime's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tscf_core::client::{SendError, TunnelClient};

/// Hop limit of the inner packets sent.
const INNER_TTL: u8 = 64;

/// The tunnel's internal IPv4 address (IPv6 if it has none) and `port`.
pub fn local_addr(client: &TunnelClient, port: u16) -> io::Result<SocketAddr> {
    let ip = client
        .internal_ipv4()
        .map(IpAddr::V4)
        .or(client.internal_ipv6().map(IpAddr::V6))
        .ok_or_else(no_tunnel)?;
    Ok(SocketAddr::new(ip, port))
}

/// Wraps `payload` in a UDP packet from the tunnel's internal address of `dst`'s family and
/// `port` to `dst`, and hands it to `client`. Errors as an inner socket reports them: no
/// tunnel yet is [`io::ErrorKind::NotConnected`], a full send queue
/// [`io::ErrorKind::WouldBlock`].
pub fn send_udp(
    client: &mut TunnelClient,
    now: Instant,
    port: u16,
    dst: SocketAddr,
    payload: &[u8],
) -> io::Result<()> {
    let builder = match dst.ip() {
        IpAddr::V4(to) => {
            let from = client.internal_ipv4().ok_or_else(no_tunnel)?;
            PacketBuilder::ipv4(from.octets(), to.octets(), INNER_TTL)
        }
        IpAddr::V6(to) => {
            let from = client.internal_ipv6().ok_or_else(no_tunnel)?;
            PacketBuilder::ipv6(from.octets(), to.octets(), INNER_TTL)
        }
    }
    .udp(port, dst.port());
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut packet, payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    client.send_ip(now, &packet).map_err(send_error)
}

/// A UDP datagram received in the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// The sender's internal address and port.
    pub from: SocketAddr,
    /// The destination port: the inner socket it is for.
    pub port: u16,
    /// The UDP payload.
    pub payload: &'a [u8],
}

/// The UDP datagram an inner IP packet carries; `None` if it is not IPv4 or IPv6 UDP.
pub fn parse_udp(packet: &[u8]) -> Option<UdpDatagram<'_>> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let from_ip = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => IpAddr::V4(ip.header().source_addr()),
        Some(NetSlice::Ipv6(ip)) => IpAddr::V6(ip.header().source_addr()),
        _ => return None,
    };
    let Some(TransportSlice::Udp(udp)) = sliced.transport else {
        return None;
    };
    Some(UdpDatagram {
        from: SocketAddr::new(from_ip, udp.source_port()),
        port: udp.destination_port(),
        payload: udp.payload(),
    })
}

/// Checks a read timeout as std sockets do: zero is an error.
pub fn check_read_timeout(timeout: Option<Duration>) -> io::Result<()> {
    if timeout == Some(Duration::ZERO) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "zero read timeout",
        ));
    }
    Ok(())
}

fn no_tunnel() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no tunnel yet")
}

fn send_error(e: SendError) -> io::Error {
    let kind = match e {
        SendError::NotConnected => io::ErrorKind::NotConnected,
        SendError::Closed => io::ErrorKind::BrokenPipe,
        SendError::QueueFull => io::ErrorKind::WouldBlock,
        _ => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_finds_the_datagram_and_refuses_other_packets() {
        let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, 6000);
        let mut packet = Vec::new();
        builder.write(&mut packet, b"rtp").expect("a packet");
        let d = parse_udp(&packet).expect("a UDP packet");
        assert_eq!(d.from, SocketAddr::from(([10, 77, 0, 2], 5004)));
        assert_eq!(d.port, 6000);
        assert_eq!(d.payload, b"rtp");
        let builder = PacketBuilder::ipv6([1; 16], [2; 16], 64).tcp(1, 2, 0, 1024);
        let mut tcp = Vec::new();
        builder.write(&mut tcp, b"x").expect("a packet");
        assert_eq!(parse_udp(&tcp), None);
        assert_eq!(parse_udp(&packet[..10]), None);
        assert!(check_read_timeout(Some(Duration::ZERO)).is_err());
        assert!(check_read_timeout(None).is_ok());
    }
}
