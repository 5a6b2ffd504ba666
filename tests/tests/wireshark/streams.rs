//! Envelopes on the wire: Data envelopes with IPv4 and IPv6 inside, several envelopes in one
//! TCP segment and one split over two (on the server's port and, found by the heuristic, on
//! another), peer probes on a peer path, and STUN on the same UDP ports as tscf.

use std::net::SocketAddrV6;

use tscf_core::wire::{Envelope, EnvelopeType};

use crate::capture::{inner_ipv4_udp, inner_ipv6_udp, sock, Capture, Side};
use crate::pdml::Packet;
use crate::Tshark;

/// Vectors of `docs/PROTOCOL.md` §8 used here, by name.
fn vector(name: &str) -> Vec<u8> {
    let doc = include_str!("../../../docs/PROTOCOL.md");
    let start = doc
        .find(&format!("```hex vector={name}\n"))
        .unwrap_or_else(|| panic!("vector {name} is in the document"));
    let body = doc[start..].lines().skip(1);
    let hex: String = body
        .take_while(|l| l.trim() != "```")
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn data_envelope(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Envelope::encode(EnvelopeType::DATA, packet, &mut out).unwrap();
    out
}

fn v6(text: &str) -> SocketAddrV6 {
    text.parse().unwrap()
}

/// A STUN Binding request (RFC 8489 §5: type 0x0001, no attributes, the magic cookie).
fn stun_binding_request() -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(b"tscf-txn-id1");
    m
}

/// The Binding success response to it, with XOR-MAPPED-ADDRESS 198.51.100.7:61000.
fn stun_binding_response() -> Vec<u8> {
    let mut m = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(b"tscf-txn-id1");
    let port = 61_000u16 ^ 0x2112;
    let addr = u32::from_be_bytes([198, 51, 100, 7]) ^ 0x2112_a442;
    m.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01]);
    m.extend_from_slice(&port.to_be_bytes());
    m.extend_from_slice(&addr.to_be_bytes());
    m
}

fn assert_stun(p: &Packet, stun_type: &str) {
    assert!(p.protocols().ends_with(":stun"), "STUN expected\n{p}");
    assert_eq!(p.one("stun.type"), stun_type, "\n{p}");
    assert!(!p.has("tscftun"), "STUN taken for tscf\n{p}");
}

#[test]
fn data_envelopes_hand_inner_ipv4_and_ipv6_packets_to_wireshark() {
    let Some(tshark) = Tshark::find() else { return };
    let mut capture = Capture::default();
    let (client, server) = (sock([192, 0, 2, 10], 40_000), sock([192, 0, 2, 1], 4440));
    let inner4 = inner_ipv4_udp(
        sock([10, 77, 0, 2], 5004),
        sock([10, 77, 0, 3], 5006),
        b"rtp over ipv4",
    );
    let inner6 = inner_ipv6_udp(v6("[fd77::2]:5004"), v6("[fd77::3]:6000"), b"rtp over ipv6");
    capture.udp(client, server, &data_envelope(&inner4));
    capture.udp(server, client, &data_envelope(&inner6));
    capture.udp(client, server, &data_envelope(b"not a packet"));
    let file = capture.write(tshark.dir(), "data.pcap");
    let packets = tshark.dissect(&file, &[]);

    let p = &packets[0];
    assert_eq!(p.protocols(), "raw:ip:udp:tscftun:ip:udp:data", "\n{p}");
    assert_eq!(p.one("tscftun.type"), "0x04");
    assert_eq!(p.one("tscftun.len"), (inner4.len() + 3).to_string());
    assert_eq!(p.all("ip.src"), ["192.0.2.10", "10.77.0.2"]);
    assert_eq!(p.all("ip.dst"), ["192.0.2.1", "10.77.0.3"]);
    assert_eq!(p.all("udp.srcport"), ["40000", "5004"]);
    assert_eq!(p.all("udp.dstport"), ["4440", "5006"]);
    assert!(p.experts().is_empty(), "\n{p}");

    let p = &packets[1];
    assert_eq!(p.protocols(), "raw:ip:udp:tscftun:ipv6:udp:data", "\n{p}");
    assert_eq!(p.one("ipv6.src"), "fd77::2");
    assert_eq!(p.one("ipv6.dst"), "fd77::3");
    assert_eq!(p.all("udp.srcport"), ["4440", "5004"]);
    assert_eq!(p.all("udp.dstport"), ["40000", "6000"]);
    assert!(p.experts().is_empty(), "\n{p}");

    let p = &packets[2];
    assert_eq!(p.protocols(), "raw:ip:udp:tscftun", "\n{p}");
    assert_eq!(p.one("tscftun.data"), crate::bytes_shown(b"not a packet"));
    assert_eq!(p.experts(), ["tscftun.data.not_ip"], "\n{p}");
}

#[test]
fn envelopes_are_split_and_joined_across_tcp_segments() {
    let Some(tshark) = Tshark::find() else { return };
    // The server's port (the port table) and another one (the TCP heuristic).
    for port in [4440, 50_123] {
        let mut capture = Capture::default();
        let mut flow = capture.tcp(sock([192, 0, 2, 10], 40_000), sock([192, 0, 2, 1], port));
        let request = vector("configuration-request");
        let keepalive = vector("keepalive");
        let response = vector("configuration-response");
        let keepalive_response = vector("keepalive-response");
        // An envelope type this version does not know: skipped by its length.
        let unknown = [0x09, 0x00, 0x05, b'x', b'y'];
        let to_server = inner_ipv6_udp(v6("[fd77::2]:5004"), v6("[fd77::3]:6000"), b"ipv6");
        let to_client = inner_ipv4_udp(
            sock([10, 77, 0, 3], 5006),
            sock([10, 77, 0, 2], 5004),
            b"ipv4",
        );

        // Four envelopes in one segment.
        let segment = [
            request.clone(),
            unknown.to_vec(),
            keepalive,
            data_envelope(&to_server),
        ]
        .concat();
        let a = flow.send(&mut capture, Side::Client, &segment);
        // The Configuration Response split over two segments, the second with two more.
        let (head, tail) = response.split_at(40);
        let b = flow.send(&mut capture, Side::Server, head);
        let rest = [tail.to_vec(), data_envelope(&to_client), keepalive_response].concat();
        let c = flow.send(&mut capture, Side::Server, &rest);
        // A segment no heuristic would take (it starts with an unknown envelope type): the
        // connection is known to carry tscf by now.
        let segment = [unknown.to_vec(), vector("keepalive")].concat();
        let d = flow.send(&mut capture, Side::Client, &segment);

        let file = capture.write(tshark.dir(), "tcp.pcap");
        let packets = tshark.dissect(&file, &[]);
        let context = format!("port {port}");

        let p = &packets[a - 1];
        assert_eq!(p.count("tscftun"), 4, "{context}\n{p}");
        assert_eq!(
            p.all("tscftun.type"),
            ["0x05", "0x09", "0x05", "0x04"],
            "{context}"
        );
        assert_eq!(p.all("tscftun.msg.type"), ["0x01", "0x07"], "{context}");
        assert_eq!(p.experts(), ["tscftun.unknown_envelope"], "{context}\n{p}");
        assert_eq!(p.one("ipv6.src"), "fd77::2", "{context}");
        assert_eq!(p.all("udp.dstport"), ["6000"], "{context}");
        // Both requests are answered in the last segment.
        assert_eq!(
            p.all("tscftun.response_in"),
            [c.to_string(), c.to_string()],
            "{context}\n{p}"
        );

        let p = &packets[b - 1];
        assert!(!p.has("tscftun"), "{context}: half an envelope\n{p}");

        let p = &packets[c - 1];
        assert_eq!(p.all("tscftun.type"), ["0x05", "0x04", "0x05"], "{context}");
        assert_eq!(p.all("tscftun.msg.type"), ["0x02", "0x08"], "{context}");
        assert_eq!(p.all("tscftun.result_code"), ["0", "0"], "{context}");
        assert_eq!(p.all("tscftun.len"), ["161", "35", "21"], "{context}");
        assert_eq!(p.one("tscftun.internal_ipv4"), "10.77.0.2", "{context}");
        assert_eq!(p.one("tscftun.stun_port"), "4440", "{context}");
        assert_eq!(p.all("udp.srcport"), ["5006"], "{context}");
        assert_eq!(
            p.all("tscftun.request_in"),
            [a.to_string(), a.to_string()],
            "{context}\n{p}"
        );
        assert_eq!(p.count("tscftun.response_time"), 2, "{context}");
        assert!(p.experts().is_empty(), "{context}\n{p}");

        let p = &packets[d - 1];
        assert_eq!(p.all("tscftun.type"), ["0x09", "0x05"], "{context}\n{p}");
        assert_eq!(p.all("tscftun.msg.type"), ["0x07"], "{context}");
    }
}

#[test]
fn a_length_below_three_on_a_stream_is_lost_framing() {
    let Some(tshark) = Tshark::find() else { return };
    let mut capture = Capture::default();
    let mut flow = capture.tcp(sock([192, 0, 2, 10], 40_000), sock([192, 0, 2, 1], 4440));
    let segment = [vector("keepalive"), vec![0x05, 0x00, 0x01, 0xff, 0xff]].concat();
    let frame = flow.send(&mut capture, Side::Client, &segment);
    let file = capture.write(tshark.dir(), "framing.pcap");
    let packets = tshark.dissect(&file, &[]);
    let p = &packets[frame - 1];
    assert_eq!(p.all("tscftun.type"), ["0x05", "0x05"], "\n{p}");
    assert_eq!(p.all("tscftun.len"), ["17", "1"]);
    assert_eq!(p.experts(), ["tscftun.framing"], "\n{p}");
}

#[test]
fn stun_and_tscf_share_the_server_port() {
    let Some(tshark) = Tshark::find() else { return };
    let mut capture = Capture::default();
    let (client, server) = (sock([192, 0, 2, 10], 40_000), sock([192, 0, 2, 1], 4440));
    capture.udp(client, server, &stun_binding_request());
    capture.udp(server, client, &stun_binding_response());
    capture.udp(client, server, &vector("keepalive"));
    capture.udp(server, client, &vector("keepalive-response"));
    let file = capture.write(tshark.dir(), "stun.pcap");
    let packets = tshark.dissect(&file, &[]);

    assert_stun(&packets[0], "0x0001");
    assert_stun(&packets[1], "0x0101");
    assert_eq!(packets[1].one("stun.att.port"), "61000");
    assert_eq!(packets[2].one("tscftun.msg.type"), "0x07");
    assert_eq!(packets[2].one("tscftun.response_in"), "4");
    assert_eq!(packets[3].one("tscftun.msg.type"), "0x08");
    assert_eq!(packets[3].one("tscftun.request_in"), "3");
}

#[test]
fn peer_probes_on_a_peer_path_are_found_beside_stun() {
    let Some(tshark) = Tshark::find() else { return };
    let mut capture = Capture::default();
    // Two peer sockets on ports no table knows: the UDP heuristic finds tscf.
    let (a, b) = (
        sock([192, 168, 1, 10], 50_000),
        sock([198, 51, 100, 7], 61_000),
    );
    capture.udp(a, b, &stun_binding_request());
    capture.udp(a, b, &vector("peer-probe"));
    capture.udp(b, a, &vector("peer-probe-response"));
    let file = capture.write(tshark.dir(), "probes.pcap");
    let packets = tshark.dissect(&file, &[]);

    assert_stun(&packets[0], "0x0001");
    let probe = &packets[1];
    assert_eq!(probe.protocols(), "raw:ip:udp:tscftun", "\n{probe}");
    assert_eq!(probe.one("tscftun.msg.type"), "0x0b");
    assert_eq!(probe.one("tscftun.msg.tunnel_id"), "0x0000000000000000");
    assert_eq!(probe.one("tscftun.peer_internal_address.ipv4"), "10.77.0.2");
    assert!(probe.has("tscftun.message_integrity"));
    assert_eq!(probe.one("tscftun.response_in"), "3");
    let response = &packets[2];
    assert_eq!(response.one("tscftun.msg.type"), "0x0c");
    assert_eq!(response.one("tscftun.result_code"), "0");
    assert_eq!(response.one("tscftun.observed_address.port"), "61000");
    assert_eq!(response.one("tscftun.request_in"), "2");
}
