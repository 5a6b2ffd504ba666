//! Captures made by the tests: raw IPv4 packets (pcap link type RAW) with UDP datagrams and TCP
//! segments built by etherparse, written with pcap-file.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

/// Packets in capture order; frame numbers count from 1.
#[derive(Default)]
pub struct Capture {
    packets: Vec<Vec<u8>>,
}

impl Capture {
    /// Adds a UDP datagram; returns its frame number.
    pub fn udp(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> usize {
        let builder = PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64)
            .udp(from.port(), to.port());
        let mut packet = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut packet, payload).expect("UDP packet");
        self.push(packet)
    }

    /// Starts a TCP connection (handshake included) from `client` to `server`.
    pub fn tcp(&mut self, client: SocketAddrV4, server: SocketAddrV4) -> TcpFlow {
        let mut flow = TcpFlow {
            client,
            server,
            client_next: 1_000,
            server_next: 50_000,
        };
        flow.control(self, Side::Client, true, false);
        flow.control(self, Side::Server, true, true);
        flow.control(self, Side::Client, false, true);
        flow
    }

    /// Writes the capture to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).expect("capture file");
        let header = PcapHeader {
            datalink: DataLink::RAW,
            ..PcapHeader::default()
        };
        let mut writer = PcapWriter::with_header(file, header).expect("pcap header");
        for (i, packet) in self.packets.iter().enumerate() {
            let time = Duration::from_millis(1_000 + 10 * i as u64);
            let len = u32::try_from(packet.len()).expect("packet size");
            writer
                .write_packet(&PcapPacket::new(time, len, packet))
                .expect("pcap packet");
        }
        path
    }

    fn push(&mut self, packet: Vec<u8>) -> usize {
        self.packets.push(packet);
        self.packets.len()
    }
}

/// Which end of a TCP connection sends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// One TCP connection's sequence numbers.
pub struct TcpFlow {
    client: SocketAddrV4,
    server: SocketAddrV4,
    client_next: u32,
    server_next: u32,
}

impl TcpFlow {
    /// Adds one segment carrying `payload` from `side`; returns its frame number.
    pub fn send(&mut self, capture: &mut Capture, side: Side, payload: &[u8]) -> usize {
        let (from, to, seq, ack) = self.direction(side);
        let builder = PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64)
            .tcp(from.port(), to.port(), seq, 65_535)
            .ack(ack)
            .psh();
        let mut packet = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut packet, payload).expect("TCP segment");
        self.advance(side, payload.len() as u32);
        capture.push(packet)
    }

    /// A segment without payload: SYN and/or ACK.
    fn control(&mut self, capture: &mut Capture, side: Side, syn: bool, ack: bool) {
        let (from, to, seq, ack_number) = self.direction(side);
        let mut builder = PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64).tcp(
            from.port(),
            to.port(),
            seq,
            65_535,
        );
        if syn {
            builder = builder.syn();
        }
        if ack {
            builder = builder.ack(ack_number);
        }
        let mut packet = Vec::with_capacity(builder.size(0));
        builder.write(&mut packet, &[]).expect("TCP segment");
        // A SYN takes one sequence number.
        self.advance(side, u32::from(syn));
        capture.push(packet);
    }

    fn direction(&self, side: Side) -> (SocketAddrV4, SocketAddrV4, u32, u32) {
        match side {
            Side::Client => (self.client, self.server, self.client_next, self.server_next),
            Side::Server => (self.server, self.client, self.server_next, self.client_next),
        }
    }

    fn advance(&mut self, side: Side, by: u32) {
        match side {
            Side::Client => self.client_next = self.client_next.wrapping_add(by),
            Side::Server => self.server_next = self.server_next.wrapping_add(by),
        }
    }
}

/// `a.b.c.d:port`.
pub fn sock(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

/// A whole IPv4/UDP packet, as a Data envelope carries it.
pub fn inner_ipv4_udp(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder =
        PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64).udp(from.port(), to.port());
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut packet, payload)
        .expect("inner IPv4 packet");
    packet
}

/// A whole IPv6/UDP packet, as a Data envelope carries it.
pub fn inner_ipv6_udp(
    from: std::net::SocketAddrV6,
    to: std::net::SocketAddrV6,
    payload: &[u8],
) -> Vec<u8> {
    let builder =
        PacketBuilder::ipv6(from.ip().octets(), to.ip().octets(), 64).udp(from.port(), to.port());
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut packet, payload)
        .expect("inner IPv6 packet");
    packet
}
