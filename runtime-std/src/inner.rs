//! Inner UDP datagrams as IP packets and the table of inner sockets: the part of an inner
//! socket that does not depend on how a runtime waits, shared by this crate's
//! [`InnerUdpSocket`](crate::InnerUdpSocket) and the smol runtime's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{
    IpNumber, Ipv4Header, Ipv6Header, NetSlice, SlicedPacket, TransportSlice, UdpHeader,
};
use rustc_hash::FxHashMap;
use tscf_core::client::{SendError, TunnelClient};

use crate::TunnelStats;

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
/// `port` to `dst`, and hands it to `client`. `packet` is scratch space for the packet, kept
/// by the caller so that a send allocates nothing. Errors as an inner socket reports them: no
/// tunnel yet is [`io::ErrorKind::NotConnected`], a full send queue
/// [`io::ErrorKind::WouldBlock`].
pub fn send_udp(
    client: &mut TunnelClient,
    now: Instant,
    port: u16,
    dst: SocketAddr,
    payload: &[u8],
    packet: &mut Vec<u8>,
) -> io::Result<()> {
    let from = match dst.ip() {
        IpAddr::V4(_) => client.internal_ipv4().map(IpAddr::V4),
        IpAddr::V6(_) => client.internal_ipv6().map(IpAddr::V6),
    };
    let from = SocketAddr::new(from.ok_or_else(no_tunnel)?, port);
    write_udp(packet, from, dst, payload)?;
    client.send_ip(now, packet).map_err(send_error)
}

/// Writes into `packet` (replacing what it held) the IPv4 or IPv6 UDP packet from `from` to
/// `to` that carries `payload`, with both checksums: what etherparse's `PacketBuilder` writes,
/// without its intermediate steps. `from` and `to` are of the same family.
fn write_udp(
    packet: &mut Vec<u8>,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
) -> io::Result<()> {
    let udp_len = u16::try_from(UdpHeader::LEN + payload.len())
        .map_err(|_| invalid("UDP payload too long"))?;
    packet.clear();
    match (from.ip(), to.ip()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let mut ip = Ipv4Header::new(
                udp_len,
                INNER_TTL,
                IpNumber::UDP,
                source.octets(),
                destination.octets(),
            )
            .map_err(invalid)?;
            ip.header_checksum = ip.calc_header_checksum();
            let udp = UdpHeader::with_ipv4_checksum(from.port(), to.port(), &ip, payload)
                .map_err(invalid)?;
            packet.reserve(Ipv4Header::MIN_LEN + usize::from(udp_len));
            packet.extend_from_slice(&ip.to_bytes());
            packet.extend_from_slice(&udp.to_bytes());
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: udp_len,
                next_header: IpNumber::UDP,
                hop_limit: INNER_TTL,
                source: source.octets(),
                destination: destination.octets(),
            };
            let udp = UdpHeader::with_ipv6_checksum(from.port(), to.port(), &ip, payload)
                .map_err(invalid)?;
            packet.reserve(Ipv6Header::LEN + usize::from(udp_len));
            packet.extend_from_slice(&ip.to_bytes());
            packet.extend_from_slice(&udp.to_bytes());
        }
        _ => return Err(invalid("source and destination of different families")),
    }
    packet.extend_from_slice(payload);
    Ok(())
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

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
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

/// The first port [`SocketTable::bind`] tries for port 0, and the range it picks from.
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 49_152..=65_535;

/// The receive queue of one inner socket, as a runtime builds it around its own wake-up
/// (a condition variable for threads, an event for tasks).
pub trait DatagramQueue {
    /// Queues `payload` from `from` and wakes a reader; false (and nothing queued) if the
    /// queue is full.
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool;
}

/// The inner sockets of a tunnel: the receive queue bound to each port, and which port 0
/// picks next.
#[derive(Debug)]
pub struct SocketTable<Q> {
    /// Keyed by the port of an inner socket of this tunnel, which the application binds: no
    /// one on the network picks these keys, so a fast unkeyed hash will do.
    queues: FxHashMap<u16, Arc<Q>>,
    next_port: u16,
}

impl<Q> Default for SocketTable<Q> {
    fn default() -> Self {
        Self {
            queues: FxHashMap::default(),
            next_port: *EPHEMERAL_PORTS.start(),
        }
    }
}

impl<Q> SocketTable<Q> {
    /// No socket bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `port` to a queue made by `queue`; port 0 picks a free one from 49152 up
    /// (round-robin, so that a port just unbound is not reused at once). A bound port is
    /// [`io::ErrorKind::AddrInUse`]. Returns the port and the queue.
    pub fn bind(&mut self, port: u16, queue: impl FnOnce() -> Q) -> io::Result<(u16, Arc<Q>)> {
        let port = if port == 0 {
            self.free_port()?
        } else if self.queues.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("inner port {port} is bound"),
            ));
        } else {
            port
        };
        let queue = Arc::new(queue());
        self.queues.insert(port, queue.clone());
        Ok((port, queue))
    }

    /// Unbinds `port`.
    pub fn remove(&mut self, port: u16) {
        self.queues.remove(&port);
    }

    /// Every bound queue.
    pub fn queues(&self) -> impl Iterator<Item = &Arc<Q>> {
        self.queues.values()
    }

    fn free_port(&mut self) -> io::Result<u16> {
        let span = EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start();
        for _ in 0..=span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                port + 1
            };
            if !self.queues.contains_key(&port) {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free inner port",
        ))
    }
}

impl<Q: DatagramQueue> SocketTable<Q> {
    /// Hands one inner packet received from the tunnel to the socket bound to its destination
    /// port, or counts in `stats` why not (`not_udp`, `unbound_port`, `socket_queue_full`).
    pub fn deliver(&self, packet: &[u8], stats: &mut TunnelStats) {
        let Some(datagram) = parse_udp(packet) else {
            stats.not_udp += 1;
            return;
        };
        let Some(queue) = self.queues.get(&datagram.port) else {
            stats.unbound_port += 1;
            return;
        };
        if !queue.push(datagram.payload, datagram.from) {
            stats.socket_queue_full += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

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

    #[test]
    fn packets_written_are_those_of_the_packet_builder() {
        let cases = [
            (
                SocketAddr::from(([10, 77, 0, 2], 49_152)),
                SocketAddr::from(([10, 77, 0, 3], 9000)),
            ),
            (
                SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 2], 5004)),
                SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 3], 6000)),
            ),
        ];
        let mut packet = b"left over from an earlier packet".to_vec();
        for (from, to) in cases {
            for payload in [&b""[..], b"rtp", &[0xa5; 1372], &[0xff; 1201]] {
                let builder = match (from.ip(), to.ip()) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                        PacketBuilder::ipv4(a.octets(), b.octets(), INNER_TTL)
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) => {
                        PacketBuilder::ipv6(a.octets(), b.octets(), INNER_TTL)
                    }
                    _ => unreachable!("one family per case"),
                }
                .udp(from.port(), to.port());
                let mut expected = Vec::new();
                builder.write(&mut expected, payload).expect("a packet");
                write_udp(&mut packet, from, to, payload).expect("a packet");
                assert_eq!(packet, expected, "{from} to {to}, {} octets", payload.len());
                let d = parse_udp(&packet).expect("a UDP packet");
                assert_eq!((d.from, d.port, d.payload), (from, to.port(), payload));
            }
        }
        let v6 = SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 3], 6000));
        let err = write_udp(&mut packet, cases[0].0, v6, b"x").expect_err("mixed families");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = write_udp(&mut packet, cases[0].0, cases[0].1, &[0; 65_528])
            .expect_err("too long for UDP");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// A queue of at most one datagram.
    #[derive(Debug, Default)]
    struct One(std::sync::Mutex<Option<(Vec<u8>, SocketAddr)>>);

    impl DatagramQueue for One {
        fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
            let mut slot = self.0.lock().expect("not poisoned");
            if slot.is_some() {
                return false;
            }
            *slot = Some((payload.to_vec(), from));
            true
        }
    }

    #[test]
    fn the_socket_table_binds_picks_free_ports_and_counts_what_it_cannot_deliver() {
        let mut table = SocketTable::<One>::new();
        let (port, _) = table.bind(0, One::default).expect("a free port");
        assert_eq!(port, 49_152);
        let (port, queue) = table.bind(6000, One::default).expect("port 6000");
        assert_eq!(port, 6000);
        let err = table
            .bind(6000, One::default)
            .expect_err("port 6000 is bound");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Port 0 goes on round-robin rather than reusing a port just unbound.
        table.remove(49_152);
        assert_eq!(table.bind(0, One::default).expect("a free port").0, 49_153);
        assert_eq!(table.queues().count(), 2);

        let mut stats = TunnelStats::default();
        let datagram = |to: u16| {
            let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, to);
            let mut packet = Vec::new();
            builder.write(&mut packet, b"rtp").expect("a packet");
            packet
        };
        table.deliver(&datagram(6000), &mut stats);
        let got = queue.0.lock().expect("not poisoned").clone();
        assert_eq!(
            got,
            Some((b"rtp".to_vec(), SocketAddr::from(([10, 77, 0, 2], 5004))))
        );
        table.deliver(&datagram(6000), &mut stats);
        table.deliver(&datagram(7000), &mut stats);
        table.deliver(b"not a packet", &mut stats);
        assert_eq!(
            (stats.socket_queue_full, stats.unbound_port, stats.not_udp),
            (1, 1, 1)
        );
    }
}
