//! Every hex vector of `docs/PROTOCOL.md` §8 (the ones that round-trip and the ones that are
//! rejected), plus a few messages from the core's encoder for what the vectors leave out, each
//! in a UDP datagram to the server's port: the dissector must show every header field and TLV
//! with the values the specification gives, and flag exactly the rejected ones.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tscf_core::wire::{Message, MessageType, ResultCode, TlvType};

use crate::capture::{sock, Capture};
use crate::pdml::Packet;
use crate::{bytes_shown, Tshark};

const PROTOCOL_MD: &str = include_str!("../../../docs/PROTOCOL.md");

/// What one message must decode to.
struct Expect {
    /// Fields (name, value as shown) in tree order.
    fields: Vec<(&'static str, String)>,
    /// Texts that displayed lines must contain: decoded names.
    shown: Vec<&'static str>,
    /// The expert information it must raise, and no other.
    experts: Vec<&'static str>,
}

impl Expect {
    fn new() -> Self {
        Self {
            fields: Vec::new(),
            shown: Vec::new(),
            experts: Vec::new(),
        }
    }

    fn field(mut self, name: &'static str, value: impl ToString) -> Self {
        self.fields.push((name, value.to_string()));
        self
    }

    fn shows(mut self, text: &'static str) -> Self {
        self.shown.push(text);
        self
    }

    fn expert(mut self, name: &'static str) -> Self {
        self.experts.push(name);
        self
    }

    fn check(&self, packet: &Packet, name: &str) {
        packet.assert_sequence(&self.fields, name);
        for text in &self.shown {
            assert!(
                packet.shows(text),
                "{name}: no line shows {text:?}\n{packet}"
            );
        }
        assert_eq!(
            packet.experts(),
            self.experts,
            "{name}: expert info\n{packet}"
        );
    }
}

const FINGERPRINT: [u8; 32] = [0xfb; 32];

/// The expectations for the document's vectors, by name.
fn document_expectations(name: &str) -> Option<Expect> {
    let fingerprint = bytes_shown(&FINGERPRINT);
    let token = bytes_shown(b"peer-pair-token!");
    let nonce = bytes_shown(b"a client's nonce");
    let control_key = bytes_shown(&(0..32).collect::<Vec<u8>>());
    let e = Expect::new();
    Some(match name {
        "configuration-request" => e
            .field("tscftun.tlv.type", "0x01")
            .field("tscftun.supported_version", 1)
            .field("tscftun.tlv.type", "0x07")
            .field("tscftun.keepalive_interval", 300_000)
            .field("tscftun.tlv.type", "0x0e")
            .field("tscftun.client_capabilities", "0x00000001")
            .field("tscftun.client_capabilities.peer_tunneling", 1)
            .field("tscftun.tlv.type", "0x10")
            .field("tscftun.auth_token", bytes_shown(b"s3cret"))
            .field("tscftun.tlv.type", "0x15")
            .field("tscftun.client_nonce", &nonce)
            .field("tscftun.tlv.type", "0x80")
            .field("tscftun.software", "tscf/0.1")
            .shows("Message Type: Configuration Request (0x01)")
            .shows("Peer Tunneling: Yes"),
        "configuration-request-reattach" => e
            .field("tscftun.tlv.type", "0x02")
            .field("tscftun.tunnel_id", "0x5a17c0de20240b01")
            .field("tscftun.tlv.type", "0x15")
            .field("tscftun.client_nonce", &nonce)
            .field("tscftun.tlv.type", "0x14"),
        "configuration-request-long-tlv" => e
            .field("tscftun.tlv.type", "0x10")
            .field("tscftun.tlv.len", 300)
            .field("tscftun.auth_token", bytes_shown(&[0x61; 300]))
            .shows("TLV Length: 300 (long form)"),
        "configuration-response" => e
            .field("tscftun.internal_ipv4", "10.77.0.2")
            .field("tscftun.internal_ipv4.prefix_len", 16)
            .field("tscftun.internal_ipv6", "fd77::2")
            .field("tscftun.internal_ipv6.prefix_len", 48)
            .field("tscftun.dns_server.ipv4", "10.77.0.1")
            .field("tscftun.keepalive_interval", 300_000)
            .field("tscftun.result_code", 0)
            .field("tscftun.observed_address.port", 40_000)
            .field("tscftun.observed_address.ipv4", "198.51.100.7")
            .field("tscftun.client_nonce", &nonce)
            .field("tscftun.control_key", &control_key)
            .field("tscftun.max_packet_size", 1400)
            .field("tscftun.stun_port", 4440)
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Configuration Response (0x02)")
            .shows("Result Code: Success (0)")
            .shows("Internal IPv4 Address: 10.77.0.2/16")
            .shows("Observed Address: 198.51.100.7:40000"),
        "configuration-response-error" => e
            .field("tscftun.supported_version", 1)
            .field("tscftun.result_code", 1)
            .field("tscftun.diagnostic", "speak version 1")
            .shows("Result Code: Version Not Supported (1)")
            .expert("tscftun.error_result"),
        "configuration-release-request" => e
            .field("tscftun.result_code", 0)
            .shows("Message Type: Configuration Release Request (0x03)"),
        "configuration-release-response" => e
            .field("tscftun.result_code", 0)
            .shows("Message Type: Configuration Release Response (0x04)"),
        "configuration-release-notification" => e
            .field("tscftun.msg.seq.director", 1)
            .field("tscftun.result_code", 15)
            .shows("Message Type: Configuration Release Notification (0x05)")
            .shows("Result Code: Shutdown (15)")
            .expert("tscftun.error_result"),
        "configuration-release-notification-response" => e
            .field("tscftun.msg.seq.director", 1)
            .field("tscftun.result_code", 0)
            .shows("Message Type: Configuration Release Notification Response (0x06)"),
        "keepalive" => e.shows("Message Type: Keepalive (0x07)"),
        "keepalive-response" => e
            .field("tscftun.result_code", 0)
            .shows("Message Type: Keepalive Response (0x08)"),
        "client-service-request-peer" => e
            .field("tscftun.service_type", 1)
            .field("tscftun.connection_info.transport", 1)
            .field("tscftun.connection_info.port", 50_000)
            .field("tscftun.connection_info.ipv4", "192.168.1.10")
            .field("tscftun.candidate.kind", 1)
            .field("tscftun.candidate.transport", 1)
            .field("tscftun.candidate.port", 50_000)
            .field("tscftun.candidate.ipv4", "192.168.1.10")
            .field("tscftun.candidate.kind", 2)
            .field("tscftun.candidate.transport", 1)
            .field("tscftun.candidate.port", 61_000)
            .field("tscftun.candidate.ipv4", "198.51.100.7")
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.3")
            .field("tscftun.service_action", 1)
            .field("tscftun.certificate_fingerprint", fingerprint)
            .shows("Message Type: Client Service Request (0x09)")
            .shows("Service Type: Peer (1)")
            .shows("Service Action: Establish (1)")
            .shows("Candidate: Server Reflexive UDP 198.51.100.7:61000"),
        "client-service-request-forwarded" => e
            .field("tscftun.msg.seq.director", 1)
            .field("tscftun.candidate.kind", 2)
            .field("tscftun.candidate.port", 61_000)
            .field("tscftun.peer_credentials.token", token)
            .field("tscftun.peer_credentials.fingerprint", fingerprint)
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.2")
            .field("tscftun.service_action", 1),
        "client-service-response-available-ipv6" => e
            .field("tscftun.result_code", 0)
            .field("tscftun.service_type", 1)
            .field("tscftun.connection_info.transport", 5)
            .field("tscftun.connection_info.port", 50_001)
            .field("tscftun.connection_info.ipv6", "2001:db8::10")
            .field("tscftun.peer_service_result", 1)
            .field("tscftun.candidate.kind", 1)
            .field("tscftun.candidate.transport", 5)
            .field("tscftun.candidate.port", 50_001)
            .field("tscftun.candidate.ipv6", "2001:db8::10")
            .field("tscftun.peer_credentials.token", token)
            .field("tscftun.peer_internal_address.ipv6", "fd77::3")
            .shows("Message Type: Client Service Response (0x0a)")
            .shows("Connection Info: QUIC [2001:db8::10]:50001")
            .shows("Peer Service Result: Available (1)"),
        "client-service-response-unavailable" => e
            .field("tscftun.result_code", 9)
            .field("tscftun.service_type", 1)
            .field("tscftun.peer_service_result", 2)
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.9")
            .shows("Result Code: Peer Unavailable (9)")
            .shows("Peer Service Result: Unavailable (2)")
            .expert("tscftun.error_result"),
        "peer-probe" => e
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.2")
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Peer Probe (0x0b)"),
        "peer-probe-response" => e
            .field("tscftun.result_code", 0)
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.3")
            .field("tscftun.observed_address.port", 61_000)
            .field("tscftun.observed_address.ipv4", "198.51.100.7")
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Peer Probe Response (0x0c)"),
        "keepalive-keyed" => e
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Keepalive (0x07)"),
        "keepalive-response-keyed" => e
            .field("tscftun.result_code", 0)
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Keepalive Response (0x08)"),
        "client-service-request-forwarded-keyed" => e
            .field("tscftun.msg.seq.director", 1)
            .field("tscftun.service_type", 1)
            .field("tscftun.peer_credentials.token", token.clone())
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.2")
            .field("tscftun.service_action", 1)
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Client Service Request (0x09)"),
        "keepalive-from-director" => e
            .field("tscftun.msg.seq.director", 1)
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Keepalive (0x07)"),
        "keepalive-response-to-director" => e
            .field("tscftun.msg.seq.director", 1)
            .field("tscftun.result_code", 0)
            .field("tscftun.tlv.type", "0x14")
            .shows("Message Type: Keepalive Response (0x08)"),
        "client-service-response-unknown-action" => e
            .field("tscftun.result_code", 5)
            .field("tscftun.service_type", 1)
            .field("tscftun.peer_internal_address.ipv4", "10.77.0.3")
            .field("tscftun.tlv.type", "0x14")
            .shows("Result Code: Illegal Value (5)")
            .expert("tscftun.error_result"),
        "data-ipv4-udp" => e
            .field("tscftun.type", "0x04")
            .field("ip.src", "10.77.0.2")
            .field("ip.dst", "10.77.0.3")
            .field("udp.srcport", 5004)
            .field("udp.dstport", 5004)
            .shows("Envelope Type: Data (0x04)"),
        "unknown-critical-tlv" => e
            .field("tscftun.tlv.type", "0x7e")
            .field("tscftun.tlv.value", "00")
            .shows("Unknown TLV 0x7e")
            .expert("tscftun.unknown_critical_tlv"),
        "duplicate-tlv" => e
            .field("tscftun.result_code", 0)
            .field("tscftun.result_code", 0)
            .shows("Result Code repeated more than allowed")
            .expert("tscftun.malformed"),
        "unknown-message" => e
            .field("tscftun.msg.type", "0x41")
            .shows("Message Type: Unknown (0x41)")
            .expert("tscftun.unknown_message"),
        "unsupported-version" => e.field("tscftun.msg.version", 2).expert("tscftun.version"),
        "tlv-overruns-message" => e
            .field("tscftun.tlv.type", "0x10")
            .field("tscftun.tlv.len", 5)
            .field("tscftun.tlv.value", "61:61")
            .shows("TLV value runs past the message")
            .expert("tscftun.malformed"),
        "illegal-prefix-length" => e
            .field("tscftun.internal_ipv4", "10.77.0.2")
            .field("tscftun.internal_ipv4.prefix_len", 33)
            .shows("prefix length longer than the address")
            .expert("tscftun.illegal_value"),
        _ => return None,
    })
}

/// Messages the vectors do not hold, from the core's encoder (and one raw TLV it cannot
/// write): IPv6 DNS server and observed address, an empty Software, an unknown optional TLV.
fn extra_messages() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let mut extras = Vec::new();

    let mut m = Message::new(
        MessageType::CONFIGURATION_RESPONSE,
        4,
        0x0123_4567_89ab_cdef,
    );
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    m.tlvs
        .dns_servers
        .push(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)));
    m.tlvs
        .dns_servers
        .push(IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1)));
    m.tlvs.observed_address = Some("[2001:db8::7]:40000".parse().unwrap());
    let mut bytes = Vec::new();
    m.encode_envelope(&mut bytes).unwrap();
    let e = Expect::new()
        .field("tscftun.msg.tunnel_id", "0x0123456789abcdef")
        .field("tscftun.dns_server.ipv4", "10.77.0.1")
        .field("tscftun.dns_server.ipv6", "fd77::1")
        .field("tscftun.result_code", 0)
        .field("tscftun.observed_address.port", 40_000)
        .field("tscftun.observed_address.ipv6", "2001:db8::7")
        .shows("Observed Address: [2001:db8::7]:40000");
    extras.push(("configuration-response-ipv6", bytes, e));

    // The retired Re-attach Secret of earlier revisions still shows (§3.4).
    let mut m = Message::new(MessageType::CONFIGURATION_REQUEST, 6, 0);
    m.tlvs.tunnel_id = Some(0x0123_4567_89ab_cdef);
    m.tlvs.reattach_secret = Some(*b"re-attach secret");
    let mut bytes = Vec::new();
    m.encode_envelope(&mut bytes).unwrap();
    let e = Expect::new()
        .field("tscftun.tunnel_id", "0x0123456789abcdef")
        .field("tscftun.tlv.type", "0x03")
        .field("tscftun.reattach_secret", bytes_shown(b"re-attach secret"));
    extras.push(("configuration-request-retired-secret", bytes, e));

    let mut m = Message::new(MessageType::KEEPALIVE, 9, 0x0123_4567_89ab_cdef);
    m.tlvs.software = Some("");
    let mut bytes = Vec::new();
    m.encode_envelope(&mut bytes).unwrap();
    // An optional TLV this version does not know, after the others: skipped, not malformed.
    let bytes = with_tlvs(bytes, &[&[0x9e, 0x02, b'h', b'i']]);
    let e = Expect::new()
        .field("tscftun.tlv.type", "0x80")
        .field("tscftun.tlv.len", 0)
        .field("tscftun.software", "")
        .field("tscftun.tlv.type", "0x9e")
        .field("tscftun.tlv.value", "68:69")
        .shows("Unknown TLV 0x9e")
        .expert("tscftun.unknown_optional_tlv");
    extras.push(("keepalive-unknown-optional-tlv", bytes, e));

    // Syntax rules (§4.3 step 5): a TLV the message may not carry, a wrong fixed length, and
    // anything after Message Integrity.
    let m = Message::new(MessageType::KEEPALIVE, 10, 0x0123_4567_89ab_cdef);
    let mut bytes = Vec::new();
    m.encode_envelope_with_integrity(b"peer-pair-token!", &mut bytes)
        .unwrap();
    let integrity = bytes_shown(&bytes[bytes.len() - 32..]);
    let bytes = with_tlvs(
        bytes,
        &[&[0x08, 0x02, 0x00, 0x00], &[0x07, 0x03, 0x00, 0x00, 0x01]],
    );
    let e = Expect::new()
        .field("tscftun.message_integrity", integrity)
        .field("tscftun.result_code", 0)
        .field("tscftun.tlv.type", "0x07")
        .field("tscftun.tlv.value", "00:00:01")
        .shows("Result Code not allowed in Keepalive")
        .shows("Keepalive Interval: length 3 not allowed")
        .shows("TLV after Message Integrity")
        .expert("tscftun.malformed")
        .expert("tscftun.malformed")
        .expert("tscftun.malformed")
        .expert("tscftun.malformed");
    extras.push(("keepalive-breaking-syntax-rules", bytes, e));

    // Illegal values (§4.3 step 6).
    let mut m = Message::new(
        MessageType::CONFIGURATION_RESPONSE,
        5,
        0x0123_4567_89ab_cdef,
    );
    m.tlvs.result_code = Some(ResultCode::SUCCESS);
    let mut bytes = Vec::new();
    m.encode_envelope(&mut bytes).unwrap();
    let bytes = with_tlvs(
        bytes,
        &[
            &[0x07, 0x04, 0x00, 0x00, 0x00, 0x0a],
            &[0x13, 0x06, 0x00, 0x00, 198, 51, 100, 7],
            &[0x82, 0x02, 0x00, 0x10],
            &[0x83, 0x02, 0x00, 0x00],
        ],
    );
    let e = Expect::new()
        .field("tscftun.keepalive_interval", 10)
        .field("tscftun.observed_address.port", 0)
        .field("tscftun.max_packet_size", 16)
        .field("tscftun.stun_port", 0)
        .shows("Keepalive Interval out of range")
        .shows("Illegal value: port 0")
        .shows("Maximum Packet Size below 68")
        .expert("tscftun.illegal_value")
        .expert("tscftun.illegal_value")
        .expert("tscftun.illegal_value")
        .expert("tscftun.illegal_value");
    extras.push(("configuration-response-illegal-values", bytes, e));

    extras
}

/// `envelope` with raw TLVs appended (ones the encoder would refuse to write), its Length
/// updated.
fn with_tlvs(mut envelope: Vec<u8>, tlvs: &[&[u8]]) -> Vec<u8> {
    for tlv in tlvs {
        envelope.extend_from_slice(tlv);
    }
    let len = u16::try_from(envelope.len()).unwrap();
    envelope[1..3].copy_from_slice(&len.to_be_bytes());
    envelope
}

/// Fenced blocks whose info string is `hex vector=NAME` or `hex reject=NAME`, as
/// `tscf-core/tests/vectors.rs` reads them: (name, octets).
fn document_blocks() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = PROTOCOL_MD.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim().strip_prefix("```hex ") else {
            continue;
        };
        let (tag, name) = info.split_once('=').expect("hex block info is tag=name");
        // The keys of §8.3 are no envelopes.
        if tag == "key" {
            continue;
        }
        let hex: String = lines
            .by_ref()
            .take_while(|body| body.trim() != "```")
            .flat_map(|body| body.chars().filter(|c| !c.is_whitespace()))
            .collect();
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
            .collect();
        out.push((name.to_owned(), bytes));
    }
    out
}

/// The header fields of a whole envelope, as the dissector must show them.
fn header_fields(bytes: &[u8]) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("tscftun.type", format!("0x{:02x}", bytes[0])),
        (
            "tscftun.len",
            u16::from_be_bytes([bytes[1], bytes[2]]).to_string(),
        ),
    ];
    if bytes[0] == 0x05 {
        fields.extend([
            ("tscftun.msg.version", bytes[3].to_string()),
            ("tscftun.msg.type", format!("0x{:02x}", bytes[4])),
            (
                "tscftun.msg.seq",
                u32::from_be_bytes(bytes[5..9].try_into().unwrap()).to_string(),
            ),
            (
                "tscftun.msg.tunnel_id",
                format!(
                    "0x{:016x}",
                    u64::from_be_bytes(bytes[9..17].try_into().unwrap())
                ),
            ),
        ]);
    }
    fields
}

#[test]
fn every_message_type_and_tlv_of_the_specification_decodes() {
    let Some(tshark) = Tshark::find() else { return };
    let mut cases: Vec<(String, Vec<u8>, Expect)> = document_blocks()
        .into_iter()
        .map(|(name, bytes)| {
            let expect = document_expectations(&name).unwrap_or_else(|| {
                panic!("docs/PROTOCOL.md has vector {name:?}; add what it must decode to")
            });
            (name, bytes, expect)
        })
        .collect();
    let from_document = cases.len();
    assert!(from_document >= 24, "the document's vectors went missing");
    cases.extend(
        extra_messages()
            .into_iter()
            .map(|(name, bytes, e)| (name.to_owned(), bytes, e)),
    );

    let mut capture = Capture::default();
    let (client, server) = (sock([192, 0, 2, 10], 40_000), sock([192, 0, 2, 1], 4440));
    for (_, bytes, _) in &cases {
        capture.udp(client, server, bytes);
    }
    let file = capture.write(tshark.dir(), "vectors.pcap");
    let packets = tshark.dissect(&file, &[]);
    assert_eq!(packets.len(), cases.len());

    let mut message_types = BTreeSet::new();
    let mut tlv_types = BTreeSet::new();
    for (i, ((name, bytes, expect), packet)) in cases.iter().zip(&packets).enumerate() {
        assert_eq!(packet.count("tscftun"), 1, "{name}: one envelope\n{packet}");
        packet.assert_sequence(&header_fields(bytes), name);
        expect.check(packet, name);
        if i < from_document && packet.has("tscftun.message_integrity") {
            // The last TLV: the HMAC is the message's last 32 octets.
            let hmac = bytes_shown(&bytes[bytes.len() - 32..]);
            assert_eq!(packet.one("tscftun.message_integrity"), hmac, "{name}");
        }
        message_types.extend(packet.all("tscftun.msg.type").into_iter().map(hex_code));
        tlv_types.extend(packet.all("tscftun.tlv.type").into_iter().map(hex_code));
    }

    let specified_messages: BTreeSet<u8> =
        (0..=255).filter(|&c| MessageType(c).is_known()).collect();
    let specified_tlvs: BTreeSet<u8> = (0..=255).filter(|&c| TlvType(c).is_known()).collect();
    assert_eq!(specified_messages.len(), 12);
    assert_eq!(specified_tlvs.len(), 26);
    assert!(
        message_types.is_superset(&specified_messages),
        "message types not covered: {:?}",
        specified_messages.difference(&message_types)
    );
    assert!(
        tlv_types.is_superset(&specified_tlvs),
        "TLVs not covered: {:?}",
        specified_tlvs.difference(&tlv_types)
    );
}

fn hex_code(shown: &str) -> u8 {
    u8::from_str_radix(shown.trim_start_matches("0x"), 16).expect("a hex code")
}

/// Hostile input: every proper prefix of every vector (a datagram shorter than its Length
/// says) and every vector with one octet changed. The dissector must not throw (a Lua error
/// fails [`Tshark::dissect`]) and must flag every short datagram.
#[test]
fn truncated_and_corrupted_envelopes_are_flagged_without_lua_errors() {
    let Some(tshark) = Tshark::find() else { return };
    let mut capture = Capture::default();
    let (client, server) = (sock([192, 0, 2, 10], 40_000), sock([192, 0, 2, 1], 4440));
    let mut truncated = 0;
    for (_, bytes) in document_blocks() {
        for len in 3..bytes.len() {
            capture.udp(client, server, &bytes[..len]);
            truncated += 1;
        }
        for i in 3..bytes.len() {
            let mut corrupted = bytes.clone();
            corrupted[i] ^= 0xa5;
            capture.udp(client, server, &corrupted);
        }
    }
    let file = capture.write(tshark.dir(), "hostile.pcap");
    let packets = tshark.dissect(&file, &[]);
    let flagged = packets
        .iter()
        .filter(|p| p.experts().contains(&"tscftun.datagram_len"))
        .count();
    assert_eq!(flagged, truncated, "every truncated datagram is flagged");
    for p in &packets {
        assert_eq!(p.count("tscftun"), 1, "\n{p}");
    }
}
