//! The hex test vectors of `docs/PROTOCOL.md` §8 against the codec, in both directions.
//!
//! Every fenced block tagged `hex vector=NAME` must decode to the message built here under
//! NAME, and that message must encode to exactly the block's octets. Blocks tagged
//! `hex reject=NAME` must fail to decode with the error given here, and produce the given reply.
//! Editing a vector in the document without the code (or the reverse) fails this test.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tscf_core::wire::{
    Candidate, CandidateKind, Capabilities, ConnectionInfo, ControlKey, DecodeErrorKind, Envelope,
    EnvelopeType, InnerPacket, InternalAddress, Message, MessageType, PeerCredentials,
    PeerServiceResult, ResultCode, ServiceAction, ServiceType, TlvType, Transport,
};

const PROTOCOL_MD: &str = include_str!("../../docs/PROTOCOL.md");

const TUNNEL: u64 = 0x5a17_c0de_2024_0b01;
const TOKEN: [u8; 16] = *b"peer-pair-token!";
const NONCE: [u8; 16] = *b"a client's nonce";
/// The control key of the keyed vectors: the octets 0x00 to 0x1f.
const CONTROL_KEY: [u8; 32] = {
    let mut key = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        key[i] = i as u8;
        i += 1;
    }
    key
};
const FINGERPRINT: [u8; 32] = [0xfb; 32];
const LONG_TOKEN: [u8; 300] = [0x61; 300];

fn sock(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// The messages the `vector=` blocks must hold, by name.
fn control_vectors() -> Vec<(&'static str, Message<'static>)> {
    let mut v = Vec::new();

    let mut m = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    m.tlvs.supported_versions = Some(&[1]);
    m.tlvs.keepalive_interval_ms = Some(300_000);
    m.tlvs.client_capabilities = Some(Capabilities::PEER_TUNNELING);
    m.tlvs.auth_token = Some(b"s3cret");
    m.tlvs.client_nonce = Some(NONCE);
    m.tlvs.software = Some("tscf/0.1");
    v.push(("configuration-request", m));

    let mut m = Message::new(MessageType::CONFIGURATION_REQUEST, 2, 0);
    m.tlvs.tunnel_id = Some(TUNNEL);
    m.tlvs.client_nonce = Some(NONCE);
    v.push(("configuration-request-reattach", m));

    let mut m = Message::new(MessageType::CONFIGURATION_REQUEST, 3, 0);
    m.tlvs.auth_token = Some(&LONG_TOKEN);
    v.push(("configuration-request-long-tlv", m));

    let mut m = Message::response_to(
        &Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0).header,
        ResultCode::SUCCESS,
    );
    m.header.tunnel_id = TUNNEL;
    m.tlvs.client_nonce = Some(NONCE);
    m.tlvs.control_key = Some(CONTROL_KEY);
    m.tlvs.internal_ipv4 = Some(InternalAddress {
        addr: Ipv4Addr::new(10, 77, 0, 2),
        prefix_len: 16,
    });
    m.tlvs.internal_ipv6 = Some(InternalAddress {
        addr: "fd77::2".parse().expect("v6"),
        prefix_len: 48,
    });
    m.tlvs
        .dns_servers
        .push(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)));
    m.tlvs.keepalive_interval_ms = Some(300_000);
    m.tlvs.observed_address = Some(sock("198.51.100.7:40000"));
    m.tlvs.max_packet_size = Some(1400);
    m.tlvs.stun_port = Some(4440);
    v.push(("configuration-response", m));

    let mut m = Message::new(MessageType::CONFIGURATION_RESPONSE, 1, 0);
    m.tlvs.supported_versions = Some(&[1]);
    m.tlvs.result_code = Some(ResultCode::VERSION_NOT_SUPPORTED);
    m.tlvs.diagnostic = Some("speak version 1");
    v.push(("configuration-response-error", m));

    let mut m = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, 7, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    v.push(("configuration-release-request", m));

    let mut m = Message::new(MessageType::CONFIGURATION_RELEASE_RESPONSE, 7, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    v.push(("configuration-release-response", m));

    let mut m = Message::new(
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION,
        0x8000_0001,
        TUNNEL,
    );
    m.tlvs.result_code = Some(ResultCode::SHUTDOWN);
    v.push(("configuration-release-notification", m));

    let mut m = Message::new(
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE,
        0x8000_0001,
        TUNNEL,
    );
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    v.push(("configuration-release-notification-response", m));

    v.push(("keepalive", Message::new(MessageType::KEEPALIVE, 8, TUNNEL)));

    let mut m = Message::new(MessageType::KEEPALIVE_RESPONSE, 8, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    v.push(("keepalive-response", m));

    let mut m = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 9, TUNNEL);
    m.tlvs.service_type = Some(ServiceType::PEER);
    m.tlvs.connection_info = Some(ConnectionInfo {
        transport: Transport::UDP,
        addr: sock("192.168.1.10:50000"),
    });
    m.tlvs.candidates.push(Candidate {
        kind: CandidateKind::HOST,
        transport: Transport::UDP,
        addr: sock("192.168.1.10:50000"),
    });
    m.tlvs.candidates.push(Candidate {
        kind: CandidateKind::SERVER_REFLEXIVE,
        transport: Transport::UDP,
        addr: sock("198.51.100.7:61000"),
    });
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 3)));
    m.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    m.tlvs.certificate_fingerprint = Some(FINGERPRINT);
    v.push(("client-service-request-peer", m));

    let mut m = Message::new(
        MessageType::CLIENT_SERVICE_REQUEST,
        0x8000_0002,
        0x0bad_cafe_0000_0003,
    );
    m.tlvs.service_type = Some(ServiceType::PEER);
    m.tlvs.candidates.push(Candidate {
        kind: CandidateKind::SERVER_REFLEXIVE,
        transport: Transport::UDP,
        addr: sock("198.51.100.7:61000"),
    });
    m.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: Some(FINGERPRINT),
    });
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)));
    m.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    v.push(("client-service-request-forwarded", m));

    let mut m = Message::new(MessageType::CLIENT_SERVICE_RESPONSE, 9, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    m.tlvs.service_type = Some(ServiceType::PEER);
    m.tlvs.connection_info = Some(ConnectionInfo {
        transport: Transport::QUIC,
        addr: sock("[2001:db8::10]:50001"),
    });
    m.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
    m.tlvs.candidates.push(Candidate {
        kind: CandidateKind::HOST,
        transport: Transport::QUIC,
        addr: sock("[2001:db8::10]:50001"),
    });
    m.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: None,
    });
    m.tlvs.peer_internal_address = Some(IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3)));
    v.push(("client-service-response-available-ipv6", m));

    let mut m = Message::new(MessageType::CLIENT_SERVICE_RESPONSE, 10, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::PEER_UNAVAILABLE);
    m.tlvs.service_type = Some(ServiceType::PEER);
    m.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9)));
    v.push(("client-service-response-unavailable", m));

    let mut m = Message::new(MessageType::PEER_PROBE, 1, 0);
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)));
    v.push(("peer-probe", m));

    let mut m = Message::new(MessageType::PEER_PROBE_RESPONSE, 1, 0);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 3)));
    m.tlvs.observed_address = Some(sock("198.51.100.7:61000"));
    v.push(("peer-probe-response", m));

    v.push((
        "keepalive-keyed",
        Message::new(MessageType::KEEPALIVE, 8, TUNNEL),
    ));

    let mut m = Message::new(MessageType::KEEPALIVE_RESPONSE, 8, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    v.push(("keepalive-response-keyed", m));

    let mut m = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0002, TUNNEL);
    m.tlvs.service_type = Some(ServiceType::PEER);
    m.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: None,
    });
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)));
    m.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    v.push(("client-service-request-forwarded-keyed", m));

    v.push((
        "keepalive-from-director",
        Message::new(MessageType::KEEPALIVE, 0x8000_0003, TUNNEL),
    ));

    let mut m = Message::new(MessageType::KEEPALIVE_RESPONSE, 0x8000_0003, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    v.push(("keepalive-response-to-director", m));

    let mut m = Message::new(MessageType::CLIENT_SERVICE_RESPONSE, 9, TUNNEL);
    m.tlvs.result_code = Some(ResultCode::ILLEGAL_VALUE);
    m.tlvs.service_type = Some(ServiceType::PEER);
    m.tlvs.peer_internal_address = Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 3)));
    v.push(("client-service-response-unknown-action", m));

    v
}

/// Vectors whose Message Integrity is keyed with [`TOKEN`] and checked as such.
const SIGNED: &[&str] = &["peer-probe", "peer-probe-response"];

/// Which way a vector keyed with the control key goes.
#[derive(Clone, Copy)]
enum Direction {
    FromClient,
    FromDirector,
}

/// Vectors whose Message Integrity is keyed with the key derived from [`CONTROL_KEY`] for
/// their direction (`docs/PROTOCOL.md` §4.4).
fn keyed(name: &str) -> Option<Direction> {
    match name {
        "configuration-request-reattach" | "keepalive-keyed" | "keepalive-response-to-director" => {
            Some(Direction::FromClient)
        }
        "configuration-response"
        | "keepalive-response-keyed"
        | "client-service-request-forwarded-keyed"
        | "keepalive-from-director"
        | "client-service-response-unknown-action" => Some(Direction::FromDirector),
        _ => None,
    }
}

fn key_for(direction: Direction) -> [u8; 32] {
    let key = ControlKey::new(&CONTROL_KEY);
    match direction {
        Direction::FromClient => key.client_to_director(),
        Direction::FromDirector => key.director_to_client(),
    }
}

/// What each `reject=` block must fail with, and the reply the receiver rules give.
fn reject_vectors() -> Vec<(&'static str, DecodeErrorKind, Option<Message<'static>>)> {
    let reply = |t, seq, tunnel, code| {
        let mut m = Message::new(t, seq, tunnel);
        m.tlvs.result_code = Some(code);
        m
    };
    let mut version_reply = reply(
        MessageType::CONFIGURATION_RESPONSE,
        1,
        0,
        ResultCode::VERSION_NOT_SUPPORTED,
    );
    version_reply.tlvs.supported_versions = Some(&[1]);
    vec![
        (
            "unknown-critical-tlv",
            DecodeErrorKind::UnknownCriticalTlv(TlvType(0x7e)),
            Some(reply(
                MessageType::KEEPALIVE_RESPONSE,
                8,
                TUNNEL,
                ResultCode::UNKNOWN_CRITICAL_TLV,
            )),
        ),
        (
            "duplicate-tlv",
            DecodeErrorKind::Malformed("TLV repeated more than allowed"),
            None,
        ),
        (
            "unknown-message",
            DecodeErrorKind::UnknownMessage(MessageType(0x41)),
            Some(reply(
                MessageType(0x42),
                5,
                TUNNEL,
                ResultCode::UNKNOWN_MESSAGE,
            )),
        ),
        (
            "unsupported-version",
            DecodeErrorKind::UnsupportedVersion(2),
            Some(version_reply),
        ),
        (
            "tlv-overruns-message",
            DecodeErrorKind::Malformed("TLV value runs past the message"),
            Some(reply(
                MessageType::CONFIGURATION_RESPONSE,
                4,
                0,
                ResultCode::MALFORMED,
            )),
        ),
        (
            "illegal-prefix-length",
            DecodeErrorKind::IllegalValue("prefix length longer than the address"),
            None,
        ),
    ]
}

/// The data vector: one IPv4/UDP packet from 10.77.0.2:5004 to 10.77.0.3:5004.
fn data_packet() -> Vec<u8> {
    let mut ip = vec![
        0x45, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 10, 77, 0, 2, 10,
        77, 0, 3, // IPv4 header (checksum left 0: tscf does not check inner checksums)
        0x13, 0x8c, 0x13, 0x8c, 0x00, 0x0b, 0x00, 0x00, // UDP header
    ];
    ip.extend_from_slice(b"rtp");
    ip
}

struct Block {
    tag: String,
    name: String,
    bytes: Vec<u8>,
}

/// Fenced blocks whose info string is `hex vector=NAME` or `hex reject=NAME`.
fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = PROTOCOL_MD.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim().strip_prefix("```hex ") else {
            continue;
        };
        let (tag, name) = info.split_once('=').expect("hex block info is tag=name");
        let mut hex = String::new();
        for body in lines.by_ref() {
            if body.trim() == "```" {
                break;
            }
            hex.extend(body.chars().filter(|c| !c.is_whitespace()));
        }
        assert!(
            hex.len().is_multiple_of(2),
            "{name}: odd number of hex digits"
        );
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
            .collect();
        out.push(Block {
            tag: tag.to_owned(),
            name: name.to_owned(),
            bytes,
        });
    }
    out
}

fn encode(m: &Message<'_>, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if SIGNED.contains(&name) {
        m.encode_envelope_with_integrity(&TOKEN, &mut out)
            .expect("encodable");
    } else if let Some(direction) = keyed(name) {
        m.encode_envelope_with_integrity(&key_for(direction), &mut out)
            .expect("encodable");
    } else {
        m.encode_envelope(&mut out).expect("encodable");
    }
    out
}

#[test]
fn document_vectors_match_the_codec_both_ways() {
    let blocks = blocks();
    let mut expected: BTreeMap<_, _> = control_vectors().into_iter().collect();
    let mut seen_data = false;
    let mut checked = 0;
    for block in blocks.iter().filter(|b| b.tag == "vector") {
        checked += 1;
        if block.name == "data-ipv4-udp" {
            let env = Envelope::decode_datagram(&block.bytes).expect("data vector decodes");
            assert_eq!(env.kind, EnvelopeType::DATA);
            let p = InnerPacket::parse(env.payload).expect("whole IP packet");
            assert_eq!(
                (p.source(), p.destination()),
                (
                    "10.77.0.2".parse().expect("ip"),
                    "10.77.0.3".parse().expect("ip")
                )
            );
            assert_eq!(p.udp_ports(), Some((5004, 5004)));
            let mut out = Vec::new();
            Envelope::encode(EnvelopeType::DATA, &data_packet(), &mut out).expect("fits");
            assert_eq!(out, block.bytes, "data vector encodes");
            seen_data = true;
            continue;
        }
        let message = expected.remove(block.name.as_str()).unwrap_or_else(|| {
            panic!(
                "document has vector {:?} the test does not know",
                block.name
            )
        });
        let encoded = encode(&message, &block.name);
        assert_eq!(
            hex(&encoded),
            hex(&block.bytes),
            "{}: encode(message) != document",
            block.name
        );
        let env = Envelope::decode_datagram(&block.bytes).expect("envelope");
        assert_eq!(env.kind, EnvelopeType::CONTROL, "{}", block.name);
        let mut decoded = Message::decode(env.payload)
            .unwrap_or_else(|e| panic!("{}: document vector does not decode: {e}", block.name));
        if SIGNED.contains(&block.name.as_str()) {
            assert!(
                Message::verify_integrity(env.payload, &TOKEN),
                "{}: integrity",
                block.name
            );
            decoded.tlvs.message_integrity = None;
        }
        if let Some(direction) = keyed(&block.name) {
            assert!(
                Message::verify_integrity(env.payload, &key_for(direction)),
                "{}: keyed integrity",
                block.name
            );
            decoded.tlvs.message_integrity = None;
        }
        assert_eq!(
            decoded, message,
            "{}: decode(document) != message",
            block.name
        );
    }
    assert!(
        expected.is_empty(),
        "vectors missing from the document: {:?}",
        expected.keys()
    );
    assert!(seen_data, "the data vector is missing from the document");
    assert!(
        checked >= 12,
        "the document must hold at least 12 vectors, has {checked}"
    );
}

#[test]
fn document_reject_vectors_fail_as_specified() {
    let blocks = blocks();
    let mut expected: BTreeMap<_, _> = reject_vectors()
        .into_iter()
        .map(|(n, k, r)| (n, (k, r)))
        .collect();
    for block in blocks.iter().filter(|b| b.tag == "reject") {
        let (kind, reply) = expected.remove(block.name.as_str()).unwrap_or_else(|| {
            panic!(
                "document has reject vector {:?} the test does not know",
                block.name
            )
        });
        let env = Envelope::decode_datagram(&block.bytes).expect("envelope");
        let err = Message::decode(env.payload).expect_err(&block.name);
        assert_eq!(err.kind, kind, "{}", block.name);
        assert_eq!(err.response(), reply, "{}: reply", block.name);
    }
    assert!(
        expected.is_empty(),
        "reject vectors missing from the document: {:?}",
        expected.keys()
    );
}

/// The `hex key=NAME` blocks: the control key of the keyed vectors and the keys derived from
/// it, which an implementation checks its derivation against.
#[test]
fn document_control_keys_derive_as_specified() {
    let blocks = blocks();
    let key = |name: &str| {
        blocks
            .iter()
            .find(|b| b.tag == "key" && b.name == name)
            .unwrap_or_else(|| panic!("docs/PROTOCOL.md has no key block {name:?}"))
            .bytes
            .clone()
    };
    assert_eq!(key("control-key"), CONTROL_KEY);
    let derived = ControlKey::new(&CONTROL_KEY);
    assert_eq!(key("client-to-director"), derived.client_to_director());
    assert_eq!(key("director-to-client"), derived.director_to_client());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prints the vectors in the document's layout; run with `--ignored --nocapture` after a
/// deliberate change to the wire format, and paste the output into `docs/PROTOCOL.md`.
#[test]
#[ignore]
fn print_vectors() {
    let print = |tag: &str, name: &str, bytes: &[u8]| {
        println!("```hex {tag}={name}");
        for line in bytes.chunks(16) {
            let words: Vec<_> = line.iter().map(|b| format!("{b:02x}")).collect();
            println!("{}", words.join(" "));
        }
        println!("```\n");
    };
    for (name, m) in control_vectors() {
        print("vector", name, &encode(&m, name));
    }
    let derived = ControlKey::new(&CONTROL_KEY);
    print("key", "control-key", &CONTROL_KEY);
    print("key", "client-to-director", &derived.client_to_director());
    print("key", "director-to-client", &derived.director_to_client());
    let mut out = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &data_packet(), &mut out).expect("fits");
    print("vector", "data-ipv4-udp", &out);
}
