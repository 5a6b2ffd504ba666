//! Unit tests of the director against a scripted client that speaks the wire format.

use super::*;
use crate::wire::{Capabilities, ControlKey, Message, ResultCode};

const STREAM: Transport = Transport::TLS;
const DGRAM: Transport = Transport::UDP;

#[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
pub(super) fn t0() -> Instant {
    Instant::now()
}

fn info(transport: Transport) -> ConnectionInfo {
    ConnectionInfo {
        transport,
        remote: "198.51.100.7:40000".parse().expect("addr"),
        verified_identity: false,
    }
}

/// A scripted client side: it puts a Client Nonce in its Configuration Requests, learns each
/// tunnel's control key from the Configuration Response, and signs what it sends for a tunnel
/// whose key it knows, as a client does.
struct Harness {
    d: SessionDirector,
    now: Instant,
    seq: u32,
    keys: FxHashMap<u64, ControlKey>,
}

/// The Client Nonce of the scripted client's Configuration Requests.
const NONCE: [u8; 16] = *b"a client's nonce";

/// A decoded transmit: its connection and the owned envelope bytes.
struct Out {
    connection: ConnectionHandle,
    bytes: Vec<u8>,
}

impl Out {
    fn message(&self) -> Message<'_> {
        let env = Envelope::decode_datagram(&self.bytes).expect("director sends valid envelopes");
        assert_eq!(env.kind, EnvelopeType::CONTROL);
        Message::decode(env.payload).expect("director sends valid messages")
    }
}

impl Harness {
    fn new(config: DirectorConfig) -> Self {
        Self {
            d: SessionDirector::new(config).expect("valid config"),
            now: t0(),
            seq: 0,
            keys: FxHashMap::default(),
        }
    }

    fn connect(&mut self, c: u64, transport: Transport) -> ConnectionHandle {
        let h = ConnectionHandle(c);
        self.d
            .handle_connect(self.now, h, info(transport))
            .expect("new handle");
        h
    }

    /// Sends `m` as a client would: a Configuration Request with a Client Nonce, anything
    /// for a tunnel whose key it knows signed with it.
    fn send(&mut self, c: ConnectionHandle, m: &Message<'_>) -> Vec<Out> {
        let mut m = m.clone();
        let named = if m.header.message_type == MessageType::CONFIGURATION_REQUEST {
            m.tlvs.client_nonce.get_or_insert(NONCE);
            m.tlvs.tunnel_id
        } else {
            Some(m.header.tunnel_id)
        };
        match named.and_then(|id| self.keys.get(&id)).cloned() {
            Some(key) => self.send_signed(c, &m, &key.client_to_director()),
            None => self.send_unsigned(c, &m),
        }
    }

    /// Sends `m` exactly as given.
    fn send_unsigned(&mut self, c: ConnectionHandle, m: &Message<'_>) -> Vec<Out> {
        let mut bytes = Vec::new();
        m.encode_envelope(&mut bytes).expect("encodable");
        self.d.handle_datagram(self.now, c, &bytes);
        self.drain()
    }

    /// Sends `m` with Message Integrity under `key`.
    fn send_signed(&mut self, c: ConnectionHandle, m: &Message<'_>, key: &[u8]) -> Vec<Out> {
        let mut bytes = Vec::new();
        m.encode_envelope_with_integrity(key, &mut bytes)
            .expect("encodable");
        self.d.handle_datagram(self.now, c, &bytes);
        self.drain()
    }

    /// What the director sent, learning the keys of new tunnels on the way.
    fn drain(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = self.d.poll_transmit(self.now, &mut buf) {
            let o = Out {
                connection: t.connection,
                bytes: buf.clone(),
            };
            // An answer to a request of unknown type does not decode: nothing to learn there.
            let learned = Envelope::decode_datagram(&o.bytes)
                .ok()
                .filter(|e| e.kind == EnvelopeType::CONTROL)
                .and_then(|e| Message::decode(e.payload).ok())
                .and_then(|m| Some((m.header.tunnel_id, m.tlvs.control_key?)));
            if let Some((id, key)) = learned {
                self.keys.insert(id, ControlKey::new(&key));
            }
            out.push(o);
        }
        out
    }

    /// Whether everything the director sent for tunnel `id` carries its Message Integrity.
    fn signed_for(&self, id: u64, out: &[Out]) -> bool {
        let key = self.keys.get(&id).expect("a known tunnel");
        out.iter().all(|o| key.verify_from_director(&o.bytes[3..]))
    }

    fn events(&mut self) -> Vec<DirectorEvent> {
        std::iter::from_fn(|| self.d.poll_event()).collect()
    }

    fn advance(&mut self, by: Duration) -> Vec<Out> {
        let until = self.now + by;
        while let Some(at) = self.d.poll_timeout().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.d.handle_timeout(self.now);
        }
        self.now = until;
        self.drain()
    }

    fn request(&mut self, t: MessageType, tunnel: u64) -> Message<'static> {
        self.seq += 1;
        Message::new(t, self.seq, tunnel)
    }

    /// Configures a tunnel on connection `c`; returns (tunnel id, control key, IPv4 address).
    fn configure(
        &mut self,
        c: u64,
        transport: Transport,
    ) -> (ConnectionHandle, u64, [u8; 32], Ipv4Addr) {
        let h = self.connect(c, transport);
        let req = self.request(MessageType::CONFIGURATION_REQUEST, 0);
        let out = self.send(h, &req);
        assert_eq!(out.len(), 1);
        let m = out[0].message();
        assert_eq!(
            m.tlvs.result_code,
            Some(ResultCode::SUCCESS),
            "configure {c}"
        );
        let ip = m.tlvs.internal_ipv4.expect("IPv4 pool configured").addr;
        (
            h,
            m.header.tunnel_id,
            m.tlvs.control_key.expect("a key"),
            ip,
        )
    }
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(5004, 5004);
    let mut packet = Vec::new();
    builder
        .write(&mut packet, payload)
        .expect("writing to a Vec cannot fail");
    packet
}

fn data(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Envelope::encode(EnvelopeType::DATA, packet, &mut out).expect("fits");
    out
}

fn small_pool() -> DirectorConfig {
    DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 29)),
        ipv6_pool: None,
        ..DirectorConfig::default()
    }
}

#[test]
fn configuration_assigns_unique_tunnels_and_addresses() {
    let mut h = Harness::new(DirectorConfig::default());
    let h1 = h.connect(1, STREAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.keepalive_interval_ms = Some(1_000);
    req.tlvs.client_capabilities = Some(Capabilities::PEER_TUNNELING);
    let out = h.send(h1, &req);
    let m = out[0].message();
    assert_eq!(out[0].connection, h1);
    assert_eq!(m.header.message_type, MessageType::CONFIGURATION_RESPONSE);
    assert_eq!(m.header.sequence, req.header.sequence);
    assert_ne!(m.header.tunnel_id, 0);
    assert_eq!(
        m.tlvs.internal_ipv4.map(|a| (a.addr, a.prefix_len)),
        Some((Ipv4Addr::new(10, 77, 0, 2), 16))
    );
    assert_eq!(m.tlvs.internal_ipv6.map(|a| a.prefix_len), Some(48));
    // A 1 s proposal is clamped up to the 5 s minimum.
    assert_eq!(m.tlvs.keepalive_interval_ms, Some(5_000));
    assert_eq!(m.tlvs.observed_address, Some(info(STREAM).remote));
    assert_eq!(m.tlvs.max_packet_size, Some(1400));
    let (_, id2, _, ip2) = h.configure(2, DGRAM);
    assert_ne!(id2, m.header.tunnel_id);
    assert_eq!(ip2, Ipv4Addr::new(10, 77, 0, 3));
    let summary: Vec<_> = h.d.tunnels().collect();
    assert_eq!(summary.len(), 2);
    assert_eq!(h.d.stats().active_tunnels, 2);
    assert!(
        matches!(h.events()[0], DirectorEvent::TunnelOpened { connection, .. } if connection == h1)
    );
}

#[test]
fn short_admission_tokens_are_refused() {
    let mut config = DirectorConfig::default();
    config.admission.tokens = vec![b"secret".to_vec()];
    assert!(matches!(
        config.validate(),
        Err(DirectorConfigError::Invalid(_))
    ));
}

/// Guessing tokens: after 10 failures in a minute a source is answered Rate Limited without
/// its token being looked at, even a right one; other sources are not affected, and the
/// window ends.
#[test]
fn token_guessing_is_rate_limited_per_source() {
    let mut config = DirectorConfig::default();
    config.admission.tokens = vec![b"the-right-token!".to_vec()];
    let mut h = Harness::new(config);
    let c = h.connect(1, STREAM);
    let attempt = |h: &mut Harness, c, token: &'static [u8]| {
        let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
        req.tlvs.auth_token = Some(token);
        h.send(c, &req)[0].message().tlvs.result_code
    };
    for _ in 0..10 {
        assert_eq!(
            attempt(&mut h, c, b"a-wrong-guess..."),
            Some(ResultCode::UNAUTHORIZED)
        );
    }
    assert_eq!(
        attempt(&mut h, c, b"the-right-token!"),
        Some(ResultCode::RATE_LIMITED)
    );
    assert_eq!(h.d.stats().refused.rate_limited, 1);

    let mut other = info(STREAM);
    other.remote = "203.0.113.50:1".parse().expect("addr");
    let c2 = ConnectionHandle(2);
    h.d.handle_connect(h.now, c2, other).expect("new");
    assert_eq!(
        attempt(&mut h, c2, b"the-right-token!"),
        Some(ResultCode::SUCCESS)
    );

    h.advance(Duration::from_secs(61));
    let c3 = h.connect(3, STREAM);
    assert_eq!(
        attempt(&mut h, c3, b"the-right-token!"),
        Some(ResultCode::SUCCESS)
    );
}

#[test]
fn admission_requires_a_credential_when_configured() {
    let mut config = DirectorConfig::default();
    config.admission.tokens = vec![b"letmein-letmein!".to_vec()];
    let mut h = Harness::new(config);
    let c = h.connect(1, STREAM);
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    assert_eq!(
        h.send(c, &req)[0].message().tlvs.result_code,
        Some(ResultCode::UNAUTHORIZED)
    );
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.auth_token = Some(b"letmein-letmein?");
    assert_eq!(
        h.send(c, &req)[0].message().tlvs.result_code,
        Some(ResultCode::UNAUTHORIZED)
    );
    req.header.sequence += 1;
    req.tlvs.auth_token = Some(b"letmein-letmein!");
    assert_eq!(
        h.send(c, &req)[0].message().tlvs.result_code,
        Some(ResultCode::SUCCESS)
    );
    assert_eq!(h.d.stats().refused.unauthorized, 2);

    let mut config = DirectorConfig::default();
    config.admission.verified_identities = true;
    let mut h = Harness::new(config);
    let c = ConnectionHandle(1);
    h.d.handle_connect(
        h.now,
        c,
        ConnectionInfo {
            verified_identity: true,
            ..info(STREAM)
        },
    )
    .expect("new");
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    assert_eq!(
        h.send(c, &req)[0].message().tlvs.result_code,
        Some(ResultCode::SUCCESS)
    );
}

#[test]
fn open_admission_is_refused_beyond_loopback() {
    let config = DirectorConfig::default();
    assert!(config
        .check_listeners(&["127.0.0.1:4443".parse().expect("addr")])
        .is_ok());
    assert!(matches!(
        config.check_listeners(&["0.0.0.0:4443".parse().expect("addr")]),
        Err(DirectorConfigError::OpenRelay(_))
    ));
}

#[test]
fn the_stun_port_is_announced_while_the_peer_service_is_offered() {
    for (stun_port, peer_tunneling, announced) in [
        (Some(4440), true, Some(4440)),
        (Some(4440), false, None),
        (None, true, None),
    ] {
        let mut h = Harness::new(DirectorConfig {
            stun_port,
            peer_tunneling,
            ..DirectorConfig::default()
        });
        let c = h.connect(1, STREAM);
        let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
        let out = h.send(c, &req);
        assert_eq!(out[0].message().tlvs.stun_port, announced);
    }
}

#[test]
fn the_packet_limit_must_fit_the_maximum_packet_size_tlv() {
    for (len, ok) in [(67, false), (68, true), (65_532, true), (65_533, false)] {
        let config = DirectorConfig {
            max_packet_len: len,
            ..DirectorConfig::default()
        };
        assert_eq!(config.validate().is_ok(), ok, "max_packet_len {len}");
    }
}

#[test]
fn limits_give_server_full_and_no_address() {
    let mut h = Harness::new(DirectorConfig {
        max_tunnels: 2,
        ..DirectorConfig::default()
    });
    h.configure(1, STREAM);
    h.configure(2, STREAM);
    let c = h.connect(3, STREAM);
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    assert_eq!(
        h.send(c, &req)[0].message().tlvs.result_code,
        Some(ResultCode::SERVER_FULL)
    );

    // A /29 leaves .2 to .6 for clients.
    let mut h = Harness::new(small_pool());
    for c in 1..=5 {
        h.configure(c, STREAM);
    }
    let c = h.connect(6, STREAM);
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    let result = h.send(c, &req)[0].message().tlvs.result_code;
    assert_eq!(result, Some(ResultCode::NO_ADDRESS_AVAILABLE));
    assert_eq!(h.d.stats().refused.no_address, 1);
}

#[test]
fn an_exhausted_ipv4_pool_leaves_tunnels_their_ipv6_address() {
    let mut h = Harness::new(DirectorConfig {
        // A /30: one address to hand out.
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 30)),
        ..DirectorConfig::default()
    });
    let (_, _, _, ip) = h.configure(1, STREAM);
    assert_eq!(ip, Ipv4Addr::new(10, 9, 0, 2));
    let c = h.connect(2, STREAM);
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    let out = h.send(c, &req);
    let m = out[0].message();
    assert_eq!(m.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(m.tlvs.internal_ipv4, None, "no IPv4 address left");
    let v6 = m.tlvs.internal_ipv6.expect("an IPv6 address").addr;
    assert_eq!(
        h.d.tunnel_by_address(IpAddr::V6(v6)),
        Some(m.header.tunnel_id)
    );
    let stats = h.d.stats();
    assert_eq!((stats.one_family_only, stats.refused.no_address), (1, 0));
}

#[test]
fn relays_between_tunnels_and_drops_what_it_must() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, _, _, ip1) = h.configure(1, STREAM);
    let (c2, _, _, ip2) = h.configure(2, DGRAM);
    let pkt = udp_packet(ip1, ip2, b"hello");
    h.d.handle_datagram(h.now, c1, &data(&pkt));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].connection, c2);
    assert_eq!(out[0].bytes, data(&pkt));

    // Spoofed source, unknown destination, oversized, not an IP packet.
    h.d.handle_datagram(h.now, c1, &data(&udp_packet(ip2, ip2, b"x")));
    h.d.handle_datagram(
        h.now,
        c1,
        &data(&udp_packet(ip1, Ipv4Addr::new(10, 77, 9, 9), b"x")),
    );
    h.d.handle_datagram(h.now, c1, &data(&udp_packet(ip1, ip2, &[0; 1400])));
    h.d.handle_datagram(h.now, c1, &data(b"not ip"));
    // Data before configuration.
    let c3 = h.connect(3, STREAM);
    h.d.handle_datagram(h.now, c3, &data(&pkt));
    assert!(h.drain().is_empty());
    let s = h.d.stats();
    assert_eq!(
        (
            s.dropped.spoofed_source,
            s.dropped.unknown_destination,
            s.dropped.oversized
        ),
        (1, 1, 1)
    );
    assert_eq!((s.dropped.bad_packet, s.dropped.not_configured), (1, 1));
    assert_eq!((s.frames_relayed, s.bytes_relayed), (1, pkt.len() as u64));
}

#[test]
fn a_caller_that_keeps_each_frame_gets_it_in_one_exact_allocation() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, _, _, ip1) = h.configure(1, STREAM);
    let (_, _, _, ip2) = h.configure(2, STREAM);
    let mut buf = Vec::new();
    for size in [100, 1200, 7] {
        let envelope = data(&udp_packet(ip1, ip2, &vec![9; size]));
        h.d.handle_datagram(h.now, c1, &envelope);
        assert!(h.d.poll_transmit(h.now, &mut buf).is_some());
        // What a stream connection's queue does: keep the frame, leave an empty buffer.
        let frame = std::mem::take(&mut buf);
        assert_eq!(frame, envelope);
        assert_eq!(frame.capacity(), frame.len());
    }
}

#[test]
fn per_tunnel_queue_is_bounded() {
    let mut h = Harness::new(DirectorConfig {
        max_queued_frames: 4,
        ..DirectorConfig::default()
    });
    let (c1, _, _, ip1) = h.configure(1, STREAM);
    let (_, _, _, ip2) = h.configure(2, STREAM);
    for i in 0..10u8 {
        h.d.handle_datagram(h.now, c1, &data(&udp_packet(ip1, ip2, &[i])));
    }
    assert_eq!(h.drain().len(), 4);
    assert_eq!(h.d.stats().dropped.queue_full, 6);
    // Draining made room again.
    h.d.handle_datagram(h.now, c1, &data(&udp_packet(ip1, ip2, b"again")));
    assert_eq!(h.drain().len(), 1);
}

/// The attack: many tunnels left persistent, then a flood of packets to them. Frames for
/// persistent tunnels used to count against the global queue until it was full, and then no
/// tunnel got anything relayed.
#[test]
fn persistent_tunnels_cannot_starve_relaying() {
    let mut h = Harness::new(DirectorConfig {
        max_total_queued_frames: 1024,
        ..DirectorConfig::default()
    });
    let (attacker, _, _, from) = h.configure(1, DGRAM);
    let mut held = Vec::new();
    for c in 0..64u64 {
        let (conn, _, _, ip) = h.configure(100 + c, STREAM);
        h.d.handle_disconnect(h.now, conn);
        held.push(ip);
    }
    assert_eq!(h.d.stats().persistent_tunnels, 64);
    for _ in 0..100 {
        for ip in &held {
            h.d.handle_datagram(h.now, attacker, &data(&udp_packet(from, *ip, &[0; 1000])));
        }
    }
    let stats = h.d.stats();
    assert_eq!(stats.dropped.queue_full, 0);
    assert_eq!(
        stats.dropped.held_full,
        64 * 100 - 64 * 64,
        "64 frames held per tunnel"
    );

    let (c2, _, _, ip2) = h.configure(2, DGRAM);
    let (c3, _, _, ip3) = h.configure(3, DGRAM);
    for i in 0..20u8 {
        h.d.handle_datagram(h.now, c2, &data(&udp_packet(ip2, ip3, &[i])));
    }
    let delivered = h.drain().iter().filter(|o| o.connection == c3).count();
    assert_eq!(delivered, 20, "an innocent pair is unaffected");
}

/// Held frames reach the tunnel once it re-attaches, and a tunnel going persistent keeps
/// only the held bound of what waited for it.
#[test]
fn held_frames_are_bounded_and_delivered_after_reattach() {
    let mut h = Harness::new(DirectorConfig {
        max_held_frames: 3,
        max_total_held_frames: 5,
        ..DirectorConfig::default()
    });
    let (src, _, _, ip_src) = h.configure(1, STREAM);
    let (c1, id1, _, ip1) = h.configure(2, STREAM);
    let (c2, _, _, ip2) = h.configure(3, STREAM);
    // Queued while active, then the transport goes: the last 3 of 4 are kept.
    for i in 0..4u8 {
        h.d.handle_datagram(h.now, src, &data(&udp_packet(ip_src, ip1, &[i])));
    }
    h.d.handle_disconnect(h.now, c1);
    assert_eq!(h.d.stats().dropped.held_full, 1);
    // The second persistent tunnel gets the 2 left of the total.
    h.d.handle_disconnect(h.now, c2);
    for i in 0..4u8 {
        h.d.handle_datagram(h.now, src, &data(&udp_packet(ip_src, ip2, &[i])));
    }
    assert_eq!(h.d.stats().dropped.held_full, 3);
    assert!(h.drain().is_empty());

    let c4 = h.connect(4, STREAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.tunnel_id = Some(id1);
    let out = h.send(c4, &req);
    let held: Vec<u8> = out
        .iter()
        .filter(|o| o.connection == c4 && o.bytes[0] == EnvelopeType::DATA.0)
        .map(|o| *o.bytes.last().expect("payload"))
        .collect();
    assert_eq!(held, [1, 2, 3], "the freshest are kept");
    // Room freed: the other tunnel may hold its full share now.
    h.d.handle_datagram(h.now, src, &data(&udp_packet(ip_src, ip2, b"more")));
    assert_eq!(h.d.stats().dropped.held_full, 3);
}

#[test]
fn reattach_keeps_tunnel_and_address_and_refuses_a_wrong_proof() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, id, key, ip) = h.configure(1, STREAM);
    let (c2, _, _, ip2) = h.configure(2, STREAM);
    h.events();
    h.d.handle_disconnect(h.now, c1);
    assert_eq!(
        h.events(),
        [DirectorEvent::TunnelPersistent { tunnel_id: id }]
    );
    assert_eq!(h.d.stats().persistent_tunnels, 1);
    // Frames for a persistent tunnel wait for it.
    h.d.handle_datagram(h.now, c2, &data(&udp_packet(ip2, ip, b"wait")));
    assert!(h.drain().is_empty());

    // Signed with another key, or not at all: Unauthorized, bound to the request.
    let c3 = h.connect(3, STREAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.tunnel_id = Some(id);
    req.tlvs.client_nonce = Some(NONCE);
    let wrong = ControlKey::new(&[0x77; 32]);
    let out = h.send_signed(c3, &req, &wrong.client_to_director());
    let m = out[0].message();
    assert_eq!(m.tlvs.result_code, Some(ResultCode::UNAUTHORIZED));
    assert_eq!(m.tlvs.client_nonce, Some(NONCE));
    req.header.sequence += 1;
    let m = h.send_unsigned(c3, &req)[0].message().tlvs.result_code;
    assert_eq!(m, Some(ResultCode::UNAUTHORIZED));
    assert_eq!(h.d.stats().refused.bad_reattach_secret, 2);
    assert_eq!(
        h.d.stats().persistent_tunnels,
        1,
        "a wrong proof leaves the tunnel alone"
    );

    req.header.sequence += 1;
    let out = h.send(c3, &req);
    let m = out[0].message();
    assert_eq!(m.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(m.header.tunnel_id, id);
    assert_eq!(m.tlvs.internal_ipv4.map(|a| a.addr), Some(ip));
    assert_eq!(m.tlvs.client_nonce, Some(NONCE));
    // The key is given once, when the tunnel is made, and a re-attach keeps it.
    assert_eq!((m.tlvs.control_key, m.tlvs.reattach_secret), (None, None));
    assert!(ControlKey::new(&key).verify_from_director(&out[0].bytes[3..]));
    // The waiting frame follows the response.
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[1].connection, &out[1].bytes),
        (c3, &data(&udp_packet(ip2, ip, b"wait")))
    );
    assert!(h.events().contains(&DirectorEvent::TunnelReattached {
        tunnel_id: id,
        connection: c3
    }));

    let c4 = h.connect(4, STREAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.tunnel_id = Some(id ^ 1);
    let out = h.send(c4, &req);
    let m = out[0].message();
    assert_eq!(m.tlvs.result_code, Some(ResultCode::TUNNEL_NOT_FOUND));
    assert_eq!(m.tlvs.client_nonce, Some(NONCE));
}

#[test]
fn a_replayed_reattach_moves_nothing() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, id, _, _) = h.configure(1, DGRAM);
    h.events();
    let c2 = h.connect(2, DGRAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.tunnel_id = Some(id);
    let out = h.send(c2, &req);
    assert_eq!(out[0].message().tlvs.result_code, Some(ResultCode::SUCCESS));
    assert!(h
        .events()
        .contains(&DirectorEvent::CloseConnection { connection: c1 }));
    // The client's retransmission on its new connection gets the same answer.
    assert_eq!(h.send(c2, &req)[0].bytes, out[0].bytes);
    // The same request from elsewhere gets nothing and moves nothing.
    let c3 = h.connect(3, DGRAM);
    assert!(h.send(c3, &req).is_empty());
    assert_eq!(h.d.stats().dropped.replayed, 1);
    assert_eq!(h.d.tunnels().next().and_then(|t| t.connection), Some(c2));
    assert_eq!(h.d.stats().reattaches, 1);
}

#[test]
fn reattach_while_active_moves_the_tunnel_and_closes_the_old_connection() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, id, _, _) = h.configure(1, DGRAM);
    h.events();
    let c2 = h.connect(2, DGRAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.tunnel_id = Some(id);
    assert_eq!(h.send(c2, &req)[0].message().header.tunnel_id, id);
    let events = h.events();
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c1 }));
    assert_eq!(h.d.stats().pending_connections, 0);
    assert_eq!(h.d.stats().active_tunnels, 1);
}

#[test]
fn a_configuration_request_without_a_client_nonce_is_refused_with_a_reason() {
    let mut h = Harness::new(DirectorConfig::default());
    let c = h.connect(1, DGRAM);
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    let out = h.send_unsigned(c, &req);
    let m = out[0].message();
    assert_eq!(m.tlvs.result_code, Some(ResultCode::UNAUTHORIZED));
    assert!(m
        .tlvs
        .diagnostic
        .is_some_and(|d| d.contains("Client Nonce")));
    assert_eq!(h.d.stats().refused.unkeyed, 1);
    assert_eq!(h.d.stats().tunnels_opened, 0);
}

#[test]
fn control_messages_of_a_tunnel_are_signed_and_must_be() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, id, _, _) = h.configure(1, DGRAM);
    let ka = h.request(MessageType::KEEPALIVE, id);
    let out = h.send(c, &ka);
    assert_eq!(out[0].message().tlvs.result_code, Some(ResultCode::SUCCESS));
    assert!(h.signed_for(id, &out));
    // Unsigned, or signed with the director's own key (reflected): dropped, not answered.
    let ka = h.request(MessageType::KEEPALIVE, id);
    assert!(h.send_unsigned(c, &ka).is_empty());
    let reflected = h.keys[&id].director_to_client();
    let mut release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, id);
    release.tlvs.result_code = Some(ResultCode::SUCCESS);
    assert!(h.send_signed(c, &release, &reflected).is_empty());
    assert_eq!(h.d.stats().dropped.unauthenticated, 2);
    assert_eq!(
        h.d.stats().active_tunnels,
        1,
        "a forged release closes nothing"
    );
    // A fresh request on a connection that carries a tunnel is not its client's: it gets no
    // answer, and the tunnel is asked whether it is still there (a Keepalive to it).
    let fresh = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    let out = h.send(c, &fresh);
    assert!(out
        .iter()
        .all(|o| o.message().header.message_type == MessageType::KEEPALIVE));
    assert_eq!(h.d.stats().tunnels_opened, 1);
    // A replayed keepalive (accepted before, answer forgotten) gets nothing.
    let first = h.request(MessageType::KEEPALIVE, id);
    h.send(c, &first);
    let svc = {
        let mut m = h.request(MessageType::KEEPALIVE, id);
        m.header.sequence += 100;
        m
    };
    h.send(c, &svc);
    assert!(h.send(c, &first).is_empty());
    assert_eq!(h.d.stats().dropped.replayed, 1);
}

#[test]
fn an_authenticated_request_from_a_new_address_moves_the_tunnel_there() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, id, _, ip) = h.configure(1, DGRAM);
    let (c2, _, _, ip2) = h.configure(2, DGRAM);
    h.events();
    // The client's NAT gave it a new port: data from there first is dropped.
    let rebound = h.connect(3, DGRAM);
    h.d.handle_datagram(h.now, rebound, &data(&udp_packet(ip, ip2, b"early")));
    assert!(h.drain().is_empty());
    // Unsigned, or a replay of an earlier request: no move, and no Tunnel Not Found either.
    let ka = h.request(MessageType::KEEPALIVE, id);
    assert!(h.send_unsigned(rebound, &ka).is_empty());
    let old = h.request(MessageType::KEEPALIVE, id);
    h.send(c1, &old);
    assert!(h.send(rebound, &old).is_empty());
    assert_eq!(h.d.stats().moves, 0);
    // Its next keepalive moves the tunnel, and is answered there.
    let ka = h.request(MessageType::KEEPALIVE, id);
    let out = h.send(rebound, &ka);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].connection, rebound);
    assert_eq!(out[0].message().tlvs.result_code, Some(ResultCode::SUCCESS));
    let events = h.events();
    assert!(events.contains(&DirectorEvent::TunnelMoved {
        tunnel_id: id,
        connection: rebound
    }));
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c1 }));
    assert_eq!((h.d.stats().moves, h.d.stats().reattaches), (1, 0));
    // The relay follows at once, both ways.
    h.d.handle_datagram(h.now, c2, &data(&udp_packet(ip2, ip, b"to the new port")));
    assert_eq!(h.drain()[0].connection, rebound);
    h.d.handle_datagram(h.now, rebound, &data(&udp_packet(ip, ip2, b"from it")));
    assert_eq!(h.drain()[0].connection, c2);
}

#[test]
fn a_persistent_tunnel_is_moved_back_not_answered_tunnel_not_found() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, id, _, _) = h.configure(1, DGRAM);
    h.advance(Duration::from_secs(91));
    let events = h.events();
    assert!(events.contains(&DirectorEvent::TunnelPersistent { tunnel_id: id }));
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c }));
    // The same address again is a new connection for the director.
    let again = h.connect(2, DGRAM);
    let ka = h.request(MessageType::KEEPALIVE, id);
    let out = h.send(again, &ka);
    assert_eq!(out[0].message().tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(h.d.stats().persistent_tunnels, 0);
    assert_eq!(h.d.stats().moves, 1);
    // A tunnel the director does not hold is Tunnel Not Found.
    let ka = h.request(MessageType::KEEPALIVE, id ^ 1);
    let out = h.send(again, &ka);
    assert_eq!(
        out[0].message().tlvs.result_code,
        Some(ResultCode::TUNNEL_NOT_FOUND)
    );
}

#[test]
fn persistence_timeout_closes_and_the_address_is_reused() {
    let mut h = Harness::new(small_pool());
    let mut first = None;
    for c in 1..=5 {
        let (conn, id, _, ip) = h.configure(c, STREAM);
        first.get_or_insert((conn, id, ip));
    }
    let (conn, id, ip) = first.expect("configured");
    h.d.handle_disconnect(h.now, conn);
    h.advance(Duration::from_secs(329));
    assert_eq!(h.d.stats().persistent_tunnels, 1);
    h.advance(Duration::from_secs(2));
    assert!(h.events().contains(&DirectorEvent::TunnelClosed {
        tunnel_id: id,
        reason: ResultCode::TIMEOUT
    }));
    assert_eq!(h.d.tunnel_by_address(IpAddr::V4(ip)), None);
    let (_, new_id, _, new_ip) = h.configure(9, STREAM);
    assert_eq!(new_ip, ip, "the freed address is handed out again");
    assert_ne!(new_id, id);
}

#[test]
fn an_idle_tunnel_becomes_persistent() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, id, _, _) = h.configure(1, DGRAM);
    h.events();
    // Keepalives keep it active: 30 s interval, 3 intervals of silence allowed.
    for _ in 0..5 {
        h.advance(Duration::from_secs(60));
        let ka = h.request(MessageType::KEEPALIVE, id);
        assert_eq!(
            h.send(c, &ka)[0].message().tlvs.result_code,
            Some(ResultCode::SUCCESS)
        );
    }
    assert_eq!(h.d.stats().active_tunnels, 1);
    h.advance(Duration::from_secs(91));
    let events = h.events();
    assert!(events.contains(&DirectorEvent::TunnelPersistent { tunnel_id: id }));
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c }));
}

#[test]
fn the_director_sends_keepalives_to_a_tunnel_it_has_sent_nothing_for_an_interval() {
    let mut h = Harness::new(DirectorConfig::default());
    // A only sends (data to B) and answers what it is asked; B sends its own keepalives.
    let (a, id_a, _, ip_a) = h.configure(1, DGRAM);
    let (b, id_b, _, ip_b) = h.configure(2, DGRAM);
    h.events();
    let packet = data(&udp_packet(ip_a, ip_b, b"media"));
    let mut to_a = Vec::new();
    let mut to_b = 0;
    // Ten minutes at 30 s intervals, A sending every 5 s.
    for step in 1..=120 {
        let mut out = h.advance(Duration::from_secs(5));
        h.d.handle_datagram(h.now, a, &packet);
        out.extend(h.drain());
        if step % 6 == 0 {
            let ka = h.request(MessageType::KEEPALIVE, id_b);
            h.send(b, &ka);
        }
        for o in out {
            if o.bytes[0] != EnvelopeType::CONTROL.0 {
                continue;
            }
            let m = o.message();
            if m.header.message_type != MessageType::KEEPALIVE {
                continue;
            }
            if o.connection == b {
                to_b += 1;
                continue;
            }
            assert_eq!((o.connection, m.header.tunnel_id), (a, id_a));
            assert!(m.header.sequence & DIRECTOR_SEQUENCE_BIT != 0);
            assert!(h.signed_for(id_a, std::slice::from_ref(&o)));
            let answer = Message::response_to(&m.header, ResultCode::SUCCESS);
            let header = m.header;
            to_a.push(header.sequence);
            assert!(h.send(a, &answer).is_empty(), "a response is not answered");
        }
    }
    // One every interval (the first 30 s after the Configuration Response), none to B, which
    // got frames all along.
    assert_eq!(to_a.len(), 20);
    assert_eq!(to_b, 0);
    let stats = h.d.stats();
    assert_eq!(stats.keepalives_sent, 20);
    assert_eq!(stats.active_tunnels, 2);
    assert_eq!(
        stats.dropped.unexpected_message, 0,
        "the responses are taken"
    );
    assert!(!h
        .events()
        .iter()
        .any(|e| matches!(e, DirectorEvent::TunnelPersistent { .. })));
}

#[test]
fn a_silent_client_that_answers_the_directors_keepalives_stays_active() {
    let mut h = Harness::new(DirectorConfig::default());
    let c = h.connect(1, STREAM);
    let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    req.tlvs.keepalive_interval_ms = Some(5000);
    let id = h.send(c, &req)[0].message().header.tunnel_id;
    h.events();
    let mut answered = 0;
    for _ in 0..60 {
        for o in h.advance(Duration::from_secs(1)) {
            let m = o.message();
            assert_eq!(m.header.message_type, MessageType::KEEPALIVE);
            let answer = Message::response_to(&m.header, ResultCode::SUCCESS);
            h.send(c, &answer);
            answered += 1;
        }
    }
    assert_eq!(answered, 12, "one per 5 s interval");
    assert_eq!(h.d.stats().active_tunnels, 1);

    // Unanswered, they do not keep it: persistent three intervals after the last answer.
    let out = h.advance(Duration::from_secs(15));
    assert_eq!(out.len(), 2, "at 5 s and 10 s; at 15 s it is persistent");
    let events = h.events();
    assert!(events.contains(&DirectorEvent::TunnelPersistent { tunnel_id: id }));
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c }));
}

#[test]
fn duplicate_requests_get_the_remembered_response() {
    let mut h = Harness::new(DirectorConfig::default());
    let c = h.connect(1, DGRAM);
    let req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    let first = h.send(c, &req);
    let again = h.send(c, &req);
    assert_eq!(first[0].bytes, again[0].bytes);
    assert_eq!(h.d.stats().tunnels_opened, 1);
    let id = first[0].message().header.tunnel_id;
    let release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, id);
    let out = h.send(c, &release);
    assert_eq!(
        out[0].message().header.message_type,
        MessageType::CONFIGURATION_RELEASE_RESPONSE
    );
    let events = h.events();
    assert!(events.contains(&DirectorEvent::TunnelClosed {
        tunnel_id: id,
        reason: ResultCode::SUCCESS
    }));
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c }));
    assert_eq!(h.d.stats().active_tunnels, 0);
}

#[test]
fn administrative_close_notifies_with_retransmission_on_datagram_transports() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, id, _, _) = h.configure(1, DGRAM);
    h.d.close_tunnel(h.now, id, ResultCode::ADMINISTRATIVE)
        .expect("exists");
    let out = h.drain();
    let note = out[0].message();
    assert_eq!(
        note.header.message_type,
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION
    );
    assert_eq!(note.tlvs.result_code, Some(ResultCode::ADMINISTRATIVE));
    assert!(note.header.sequence & DIRECTOR_SEQUENCE_BIT != 0);
    // Unanswered: retransmitted after 250 ms and 500 ms more.
    assert!(h.advance(Duration::from_millis(249)).is_empty());
    assert_eq!(h.advance(Duration::from_millis(1)).len(), 1);
    assert_eq!(h.advance(Duration::from_millis(500)).len(), 1);
    let mut ack = Message::new(
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE,
        note.header.sequence,
        id,
    );
    ack.tlvs.result_code = Some(ResultCode::SUCCESS);
    assert!(h.send(c, &ack).is_empty());
    assert!(h
        .events()
        .contains(&DirectorEvent::CloseConnection { connection: c }));
    assert!(
        h.advance(Duration::from_secs(20)).is_empty(),
        "no retransmission after the ack"
    );

    // On a stream: one notification, then the connection is closed.
    let (c, id, _, _) = h.configure(2, STREAM);
    h.events();
    h.d.shutdown(h.now);
    assert_eq!(
        h.drain()[0].message().tlvs.result_code,
        Some(ResultCode::SHUTDOWN)
    );
    let events = h.events();
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c }));
    assert!(events.contains(&DirectorEvent::TunnelClosed {
        tunnel_id: id,
        reason: ResultCode::SHUTDOWN
    }));
}

#[test]
fn unconfigured_connections_are_bounded_in_number_and_time() {
    let mut h = Harness::new(DirectorConfig {
        max_pending_connections: 3,
        ..DirectorConfig::default()
    });
    for c in 1..=5 {
        h.connect(c, STREAM);
    }
    let closed: Vec<_> = h.events();
    assert_eq!(
        closed,
        [1, 2].map(|c| DirectorEvent::CloseConnection {
            connection: ConnectionHandle(c)
        })
    );
    assert_eq!(h.d.stats().pending_connections, 3);
    h.configure(6, STREAM);
    h.advance(Duration::from_secs(11));
    assert_eq!(h.d.stats().pending_connections, 0);
    assert_eq!(
        h.d.stats().active_tunnels,
        1,
        "the configured connection stays"
    );
    assert_eq!(
        h.events().len(),
        3 + 1,
        "3 pending closed, plus the earlier TunnelOpened"
    );
}

#[test]
fn protocol_errors_are_answered_per_the_receiver_rules() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, id, _, _) = h.configure(1, STREAM);
    // A request naming another tunnel.
    let ka = h.request(MessageType::KEEPALIVE, id ^ 7);
    assert_eq!(
        h.send(c, &ka)[0].message().tlvs.result_code,
        Some(ResultCode::TUNNEL_NOT_FOUND)
    );
    // Client Service Request for a service this director does not offer.
    let mut svc = h.request(MessageType::CLIENT_SERVICE_REQUEST, id);
    svc.tlvs.service_type = Some(crate::wire::ServiceType::DDT);
    assert_eq!(
        h.send(c, &svc)[0].message().tlvs.result_code,
        Some(ResultCode::SERVICE_NOT_ENABLED)
    );
    // Unknown critical TLV in a keepalive its client signed; unsigned, it is not answered.
    let mut bytes = Vec::new();
    h.request(MessageType::KEEPALIVE, id)
        .encode(&mut bytes)
        .expect("fits");
    bytes.extend([0x7e, 0]);
    let mut env = Vec::new();
    Envelope::encode(EnvelopeType::CONTROL, &bytes, &mut env).expect("fits");
    h.d.handle_datagram(h.now, c, &env);
    assert!(h.drain().is_empty());
    let key = h.keys[&id].client_to_director();
    crate::wire::append_integrity(&mut env, 0, &key).expect("fits");
    h.d.handle_datagram(h.now, c, &env);
    let out = h.drain();
    assert_eq!(
        out[0].message().tlvs.result_code,
        Some(ResultCode::UNKNOWN_CRITICAL_TLV)
    );
    // An unexpected response is dropped.
    let resp = Message::response_to(
        &h.request(MessageType::KEEPALIVE, id).header,
        ResultCode::SUCCESS,
    );
    assert!(h.send(c, &resp).is_empty());
    assert_eq!(h.d.stats().dropped.unexpected_message, 1);
}

#[test]
fn hostile_bytes_never_panic_and_leave_other_tunnels_working() {
    use rand_core::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let mut h = Harness::new(DirectorConfig::default());
    let (c1, _, _, ip1) = h.configure(1, DGRAM);
    let (c2, _, _, ip2) = h.configure(2, STREAM);
    let evil = h.connect(3, DGRAM);
    let (c4, _, _, _) = h.configure(4, DGRAM);
    let mut buf = [0u8; 128];
    for i in 0..20_000 {
        let len = (rng.next_u32() % 128) as usize;
        rng.fill_bytes(&mut buf[..len]);
        // Make many of them look like envelopes so they reach the deeper layers.
        if len >= 3 && i % 2 == 0 {
            buf[0] = 4 + (i % 4 == 0) as u8;
            buf[1..3].copy_from_slice(&(len as u16).to_be_bytes());
        }
        let from = [evil, c4][i % 2];
        h.d.handle_datagram(h.now, from, &buf[..len]);
        h.drain();
        h.events();
    }
    let pkt = udp_packet(ip1, ip2, b"still here");
    h.d.handle_datagram(h.now, c1, &data(&pkt));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].connection, c2);
    assert!(h.d.stats().active_tunnels >= 2);
}

// ---- peer service ----

mod peer {
    use super::*;
    use crate::wire::{Candidate, CandidateKind, PeerServiceResult, ServiceAction, ServiceType};

    fn capable(h: &mut Harness, c: u64, transport: Transport) -> (ConnectionHandle, u64, Ipv4Addr) {
        let conn = h.connect(c, transport);
        let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
        req.tlvs.client_capabilities = Some(Capabilities::PEER_TUNNELING);
        let out = h.send(conn, &req);
        let m = out[0].message();
        (
            conn,
            m.header.tunnel_id,
            m.tlvs.internal_ipv4.expect("v4").addr,
        )
    }

    fn peer_request(h: &mut Harness, id: u64, dest: Ipv4Addr) -> Message<'static> {
        let mut req = h.request(MessageType::CLIENT_SERVICE_REQUEST, id);
        req.tlvs.service_type = Some(ServiceType::PEER);
        req.tlvs.service_action = Some(ServiceAction::ESTABLISH);
        req.tlvs.peer_internal_address = Some(IpAddr::V4(dest));
        req.tlvs.candidates.push(Candidate {
            kind: CandidateKind::HOST,
            transport: Transport::UDP,
            addr: "192.168.1.10:50000".parse().expect("addr"),
        });
        req.tlvs.certificate_fingerprint = Some([0xa1; 32]);
        req
    }

    #[test]
    fn introduces_two_capable_clients_with_one_token() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let (cb, b, ipb) = capable(&mut h, 2, STREAM);
        let req = peer_request(&mut h, a, ipb);
        let out = h.send(ca, &req);
        assert_eq!(
            out.len(),
            1,
            "forwarded to the destination, nothing to the initiator yet"
        );
        assert_eq!(out[0].connection, cb);
        let fwd = out[0].message();
        assert_eq!(fwd.header.message_type, MessageType::CLIENT_SERVICE_REQUEST);
        assert_eq!(fwd.header.tunnel_id, b);
        assert_eq!(fwd.tlvs.peer_internal_address, Some(IpAddr::V4(ipa)));
        assert_eq!(fwd.tlvs.candidates, req.tlvs.candidates);
        let creds = fwd
            .tlvs
            .peer_credentials
            .expect("credentials for the destination");
        assert_eq!(creds.fingerprint, Some([0xa1; 32]));

        let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
        answer.tlvs.service_type = Some(ServiceType::PEER);
        answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
        answer.tlvs.candidates.push(Candidate {
            kind: CandidateKind::SERVER_REFLEXIVE,
            transport: Transport::UDP,
            addr: "198.51.100.9:61000".parse().expect("addr"),
        });
        answer.tlvs.certificate_fingerprint = Some([0xb2; 32]);
        let out = h.send(cb, &answer);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].connection, ca);
        let reply = out[0].message();
        assert_eq!(reply.header.sequence, req.header.sequence);
        assert_eq!(reply.tlvs.result_code, Some(ResultCode::SUCCESS));
        assert_eq!(
            reply.tlvs.peer_service_result,
            Some(PeerServiceResult::AVAILABLE)
        );
        assert_eq!(reply.tlvs.peer_internal_address, Some(IpAddr::V4(ipb)));
        assert_eq!(reply.tlvs.candidates, answer.tlvs.candidates);
        let a_creds = reply
            .tlvs
            .peer_credentials
            .expect("credentials for the initiator");
        assert_eq!(a_creds.token, creds.token, "both sides share one token");
        assert_eq!(a_creds.fingerprint, Some([0xb2; 32]));
        assert_eq!(h.d.stats().peer.introductions, 1);

        // Another pair gets another token.
        let (_, _, ipc) = capable(&mut h, 3, STREAM);
        let req = peer_request(&mut h, a, ipc);
        let out = h.send(ca, &req);
        let other = out[0].message().tlvs.peer_credentials.expect("creds").token;
        assert_ne!(other, creds.token);
    }

    #[test]
    fn answers_itself_when_the_destination_cannot_peer() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, _) = capable(&mut h, 1, STREAM);
        let (_, _, _, plain) = h.configure(2, STREAM);
        let (cp, _, gone) = capable(&mut h, 3, STREAM);
        h.d.handle_disconnect(h.now, cp);
        for (dest, why) in [
            (Ipv4Addr::new(10, 77, 99, 99), "not a tunnel"),
            (plain, "no capability"),
            (gone, "persistent"),
        ] {
            let req = peer_request(&mut h, a, dest);
            let out = h.send(ca, &req);
            let m = out[0].message();
            assert_eq!(
                m.tlvs.result_code,
                Some(ResultCode::PEER_UNAVAILABLE),
                "{why}"
            );
            assert_eq!(
                m.tlvs.peer_service_result,
                Some(PeerServiceResult::UNAVAILABLE),
                "{why}"
            );
        }
        let mut h = Harness::new(DirectorConfig {
            peer_tunneling: false,
            ..DirectorConfig::default()
        });
        let (ca, a, _) = capable(&mut h, 1, STREAM);
        let (_, _, ipb) = capable(&mut h, 2, STREAM);
        let req = peer_request(&mut h, a, ipb);
        let out = h.send(ca, &req);
        assert_eq!(
            out[0].message().tlvs.result_code,
            Some(ResultCode::SERVICE_NOT_ENABLED)
        );
    }

    #[test]
    fn simultaneous_requests_make_one_negotiation() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let (cb, b, ipb) = capable(&mut h, 2, STREAM);
        let req = peer_request(&mut h, a, ipb);
        let out = h.send(ca, &req);
        assert_eq!(out[0].connection, cb);
        let req = peer_request(&mut h, b, ipa);
        let out = h.send(cb, &req);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].connection, cb);
        let m = out[0].message();
        assert_eq!(m.tlvs.result_code, Some(ResultCode::SUCCESS));
        assert_eq!(
            m.tlvs.peer_service_result,
            Some(PeerServiceResult::IN_PROGRESS)
        );
        assert_eq!(h.d.stats().peer.requests_forwarded, 1);
    }

    #[test]
    fn a_silent_destination_times_out_and_datagram_forwards_are_retransmitted() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, _) = capable(&mut h, 1, DGRAM);
        let (cb, _, ipb) = capable(&mut h, 2, DGRAM);
        let req = peer_request(&mut h, a, ipb);
        assert_eq!(h.send(ca, &req).len(), 1);
        // The initiator retransmits: not forwarded twice.
        assert!(h.send(ca, &req).is_empty());
        let out = h.advance(Duration::from_millis(250));
        assert_eq!(
            (out.len(), out[0].connection),
            (1, cb),
            "retransmitted at 250 ms"
        );
        let out = h.advance(Duration::from_millis(500));
        assert_eq!((out.len(), out[0].connection), (1, cb), "and at 750 ms");
        let out = h.advance(Duration::from_millis(250));
        assert_eq!(
            out.len(),
            1,
            "at the 1 s deadline the initiator hears Peer Timeout"
        );
        let m = out[0].message();
        assert_eq!(out[0].connection, ca);
        assert_eq!(m.tlvs.result_code, Some(ResultCode::PEER_TIMEOUT));
        assert_eq!(h.d.stats().peer.timeouts, 1);
        // The initiator's retransmission now gets the remembered answer.
        assert_eq!(
            h.send(ca, &req)[0].message().tlvs.result_code,
            Some(ResultCode::PEER_TIMEOUT)
        );
    }

    #[test]
    fn peer_requests_are_rate_limited() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, _) = capable(&mut h, 1, STREAM);
        let mut results = Vec::new();
        for _ in 0..12 {
            let req = peer_request(&mut h, a, Ipv4Addr::new(10, 77, 50, 50));
            let out = h.send(ca, &req);
            results.push(out[0].message().tlvs.result_code);
        }
        assert_eq!(
            results
                .iter()
                .filter(|r| **r == Some(ResultCode::RATE_LIMITED))
                .count(),
            2
        );
        h.advance(Duration::from_secs(10));
        let req = peer_request(&mut h, a, Ipv4Addr::new(10, 77, 50, 50));
        let out = h.send(ca, &req);
        assert_eq!(
            out[0].message().tlvs.result_code,
            Some(ResultCode::PEER_UNAVAILABLE)
        );
    }

    #[test]
    fn malformed_unknown_and_self_peer_requests_are_answered_as_specified() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let (cb, _, ipb) = capable(&mut h, 2, STREAM);
        let ask = |h: &mut Harness, tweak: &dyn Fn(&mut Message<'static>)| {
            let mut req = peer_request(h, a, ipb);
            tweak(&mut req);
            let out = h.send(ca, &req);
            let m = out[0].message();
            (out[0].connection, m.header.message_type, m.tlvs.result_code)
        };
        let unknown = ask(&mut h, &|r| r.tlvs.service_action = Some(ServiceAction(9)));
        assert_eq!(
            unknown.2,
            Some(ResultCode::ILLEGAL_VALUE),
            "not an Establish"
        );
        let unaddressed = ask(&mut h, &|r| r.tlvs.peer_internal_address = None);
        assert_eq!(unaddressed.2, Some(ResultCode::MALFORMED));
        let oneself = ask(&mut h, &|r| {
            r.tlvs.peer_internal_address = Some(IpAddr::V4(ipa));
        });
        assert_eq!(oneself.2, Some(ResultCode::PEER_UNAVAILABLE));
        // Without a Service Action a request is an Establish: forwarded.
        let establish = ask(&mut h, &|r| r.tlvs.service_action = None);
        assert_eq!(
            (establish.0, establish.1),
            (cb, MessageType::CLIENT_SERVICE_REQUEST)
        );
    }

    #[test]
    fn closing_a_server_tunnel_tells_its_introduced_peer() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let (cb, _, ipb) = capable(&mut h, 2, DGRAM);
        let req = peer_request(&mut h, a, ipb);
        let out = h.send(ca, &req);
        let fwd = out[0].message();
        let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
        answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
        h.send(cb, &answer);
        let release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, a);
        let out = h.send(ca, &release);
        let first = out
            .iter()
            .find(|o| o.connection == cb)
            .expect("a notice to the peer");
        assert_eq!(
            first.message().tlvs.service_action,
            Some(ServiceAction::RELEASE)
        );
        let mut h2 = h;
        let notice_out = h2.advance(Duration::from_millis(250));
        assert_eq!(notice_out.len(), 1, "release notice retransmitted on UDP");
        let notice = notice_out[0].message();
        assert_eq!(notice_out[0].connection, cb);
        assert_eq!(notice.tlvs.service_action, Some(ServiceAction::RELEASE));
        assert_eq!(notice.tlvs.peer_internal_address, Some(IpAddr::V4(ipa)));
        let ack = Message::response_to(&notice.header, ResultCode::SUCCESS);
        assert!(h2.send(cb, &ack).is_empty());
        assert!(
            h2.advance(Duration::from_secs(10)).is_empty(),
            "acknowledged: no more"
        );
        assert_eq!(h2.d.stats().peer.release_notices, 1);
    }

    #[test]
    fn a_tunnel_that_moves_keeps_its_introductions() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let (_, b, ipb) = capable(&mut h, 2, DGRAM);
        let req = peer_request(&mut h, a, ipb);
        let fwd = h.send(ca, &req)[0].message().header;
        let mut answer = Message::response_to(&fwd, ResultCode::SUCCESS);
        answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
        h.send(ConnectionHandle(2), &answer);
        // B's NAT rebinds it; its next keepalive moves its tunnel.
        let moved = h.connect(3, DGRAM);
        let ka = h.request(MessageType::KEEPALIVE, b);
        h.send(moved, &ka);
        assert_eq!(h.d.stats().moves, 1);
        // A leaves: B hears of it at its new address.
        let release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, a);
        let out = h.send(ca, &release);
        let notice = out
            .iter()
            .find(|o| o.connection == moved)
            .expect("a release notice at the new address");
        assert!(h.signed_for(b, std::slice::from_ref(notice)));
        let notice = notice.message();
        assert_eq!(notice.tlvs.service_action, Some(ServiceAction::RELEASE));
        assert_eq!(notice.tlvs.peer_internal_address, Some(IpAddr::V4(ipa)));
    }

    #[test]
    fn an_announced_destination_lets_the_initiator_start_at_once() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let (cb, b, ipb) = capable(&mut h, 2, STREAM);
        let mut announce = h.request(MessageType::CLIENT_SERVICE_REQUEST, b);
        announce.tlvs.service_type = Some(ServiceType::PEER);
        announce.tlvs.service_action = Some(ServiceAction::ANNOUNCE);
        announce.tlvs.candidates.push(Candidate {
            kind: CandidateKind::SERVER_REFLEXIVE,
            transport: Transport::UDP,
            addr: "198.51.100.9:61000".parse().expect("addr"),
        });
        announce.tlvs.certificate_fingerprint = Some([0xb2; 32]);
        let out = h.send(cb, &announce);
        assert_eq!(out[0].message().tlvs.result_code, Some(ResultCode::SUCCESS));

        let req = peer_request(&mut h, a, ipb);
        let out = h.send(ca, &req);
        assert_eq!(
            out.len(),
            2,
            "the initiator's answer and the forward go out together"
        );
        let to_a = out
            .iter()
            .find(|o| o.connection == ca)
            .expect("answer")
            .message();
        assert_eq!(to_a.header.sequence, req.header.sequence);
        assert_eq!(
            to_a.tlvs.peer_service_result,
            Some(PeerServiceResult::AVAILABLE)
        );
        assert_eq!(to_a.tlvs.candidates, announce.tlvs.candidates);
        let token = to_a.tlvs.peer_credentials.expect("creds");
        assert_eq!(token.fingerprint, Some([0xb2; 32]));
        let fwd = out
            .iter()
            .find(|o| o.connection == cb)
            .expect("forward")
            .message();
        assert_eq!(fwd.tlvs.peer_internal_address, Some(IpAddr::V4(ipa)));
        assert_eq!(
            fwd.tlvs.peer_credentials.map(|c| c.token),
            Some(token.token)
        );
        // The destination's own answer is not relayed a second time.
        let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
        answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
        assert!(h.send(cb, &answer).is_empty());
        assert_eq!(h.d.stats().peer.answered_from_announcement, 1);
    }

    /// A fixed window of 10 per 10 s let 20 requests through in a tenth of a second around
    /// its edge; the token bucket lets 10 through and then one per second.
    #[test]
    fn doubled_peer_request_rate_at_a_window_edge_is_refused() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, _) = capable(&mut h, 1, STREAM);
        let allowed = |h: &mut Harness| {
            (0..10)
                .filter(|_| {
                    let req = peer_request(h, a, Ipv4Addr::new(10, 77, 50, 50));
                    let out = h.send(ca, &req);
                    out[0].message().tlvs.result_code != Some(ResultCode::RATE_LIMITED)
                })
                .count()
        };
        h.advance(Duration::from_millis(9_950));
        assert_eq!(allowed(&mut h), 10, "a full bucket");
        h.advance(Duration::from_millis(100));
        assert_eq!(allowed(&mut h), 0, "a tenth of a token since");
        h.advance(Duration::from_secs(3));
        assert_eq!(allowed(&mut h), 3, "one per second");
        assert_eq!(h.d.stats().peer.rate_limited, 17);
    }

    /// One client asks again and again for a peer tunnel to the same destination (each
    /// negotiation answered at once): the destination is introduced three times, then once
    /// every 10 s.
    #[test]
    fn repeated_introductions_to_one_destination_are_limited() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, _) = capable(&mut h, 1, STREAM);
        let (_, _, ipb) = capable(&mut h, 2, STREAM);
        let (_, _, ipc) = capable(&mut h, 3, STREAM);
        let ask = |h: &mut Harness, dest: Ipv4Addr| {
            let req = peer_request(h, a, dest);
            let out = h.send(ca, &req);
            // Forwarded, or refused with Rate Limited.
            match out.iter().find(|o| o.connection != ca) {
                Some(out) => {
                    let fwd = out.message();
                    let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
                    answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
                    h.send(out.connection, &answer);
                    true
                }
                None => false,
            }
        };
        let forwarded = (0..6).filter(|_| ask(&mut h, ipb)).count();
        assert_eq!(forwarded, 3);
        assert_eq!(h.d.stats().peer.introductions_limited, 3);
        assert!(ask(&mut h, ipc), "another destination is not limited by it");
        h.advance(Duration::from_secs(10));
        assert!(ask(&mut h, ipb), "one more after 10 s");
        assert!(!ask(&mut h, ipb));
    }

    /// An initiator names as candidates addresses no client can have: they are not forwarded
    /// (loopback only between clients that reach the director from loopback).
    #[test]
    fn implausible_candidates_are_not_forwarded() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, _) = capable(&mut h, 1, STREAM);
        let (cb, _, ipb) = capable(&mut h, 2, STREAM);
        let mut req = peer_request(&mut h, a, ipb);
        let good = req.tlvs.candidates[0];
        for addr in [
            "0.0.0.0:5000",
            "224.0.0.251:5353",
            "255.255.255.255:9",
            "127.0.0.1:53",
            "[::1]:53",
            "[ff02::1]:9",
            "192.168.1.10:50000",
        ] {
            req.tlvs.candidates.push(Candidate {
                kind: CandidateKind::HOST,
                transport: Transport::UDP,
                addr: addr.parse().expect("addr"),
            });
        }
        let out = h.send(ca, &req);
        let fwd = out.iter().find(|o| o.connection == cb).expect("forwarded");
        assert_eq!(fwd.message().tlvs.candidates.as_slice(), [good]);
        assert_eq!(h.d.stats().peer.candidates_dropped, 7);
    }

    /// The peer of a tunnel that closes is persistent at that moment (its transport broke):
    /// the release notice waits for its re-attach instead of being lost.
    #[test]
    fn release_notice_reaches_a_partner_that_was_persistent() {
        let mut h = Harness::new(DirectorConfig::default());
        let (ca, a, ipa) = capable(&mut h, 1, STREAM);
        let cb = h.connect(2, DGRAM);
        let mut req = h.request(MessageType::CONFIGURATION_REQUEST, 0);
        req.tlvs.client_capabilities = Some(Capabilities::PEER_TUNNELING);
        let m = h.send(cb, &req);
        let m = m[0].message();
        let b = m.header.tunnel_id;
        let ipb = m.tlvs.internal_ipv4.expect("v4").addr;
        let req = peer_request(&mut h, a, ipb);
        let fwd = h.send(ca, &req);
        let fwd = fwd[0].message();
        let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
        answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
        h.send(cb, &answer);

        h.d.handle_disconnect(h.now, cb);
        let release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, a);
        let out = h.send(ca, &release);
        assert!(out.iter().all(|o| o.connection == ca), "nobody to tell yet");
        assert!(h.advance(Duration::from_secs(20)).is_empty());

        let cb2 = h.connect(3, DGRAM);
        let mut reattach = h.request(MessageType::CONFIGURATION_REQUEST, 0);
        reattach.tlvs.tunnel_id = Some(b);
        let out = h.send(cb2, &reattach);
        assert_eq!(
            out[0].message().header.message_type,
            MessageType::CONFIGURATION_RESPONSE
        );
        let notice = out
            .get(1)
            .expect("the notice follows the configuration")
            .message();
        assert_eq!(notice.tlvs.service_action, Some(ServiceAction::RELEASE));
        assert_eq!(notice.tlvs.peer_internal_address, Some(IpAddr::V4(ipa)));
        assert_eq!(h.d.stats().peer.release_notices_held, 1);
    }

    /// Many negotiations under way at once: a retransmitted request, a tunnel's close and a
    /// destination's answer each find theirs through an index (no walk of all of them under
    /// the director's lock), and nothing is left behind once they end.
    #[test]
    fn a_flood_of_negotiations_is_looked_up_by_index() {
        const N: u64 = 300;
        let mut h = Harness::new(DirectorConfig::default());
        let (cd, d, ipd) = capable(&mut h, 1, DGRAM);
        let mut initiators = Vec::new();
        for c in 0..N {
            let (conn, id, _) = capable(&mut h, 10 + c, STREAM);
            let req = peer_request(&mut h, id, ipd);
            let out = h.send(conn, &req);
            assert_eq!(out[0].connection, cd);
            initiators.push((conn, id, req));
        }
        assert_eq!(h.d.peer.indexed(), (N as usize, N as usize, N as usize + 1));
        // A retransmission is recognised, whichever initiator sends it.
        for (conn, _, req) in initiators.iter().rev().take(5) {
            assert!(h.send(*conn, req).is_empty());
        }
        // One initiator leaves: only its negotiation ends.
        let (conn, id, _) = initiators.pop().expect("one");
        let release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, id);
        h.send(conn, &release);
        assert_eq!(
            h.d.peer.indexed(),
            (N as usize - 1, N as usize - 1, N as usize)
        );
        // The destination leaves: every initiator hears Peer Unavailable.
        let release = h.request(MessageType::CONFIGURATION_RELEASE_REQUEST, d);
        let out = h.send(cd, &release);
        let unavailable = out
            .iter()
            .filter(|o| o.connection != cd)
            .filter(|o| o.message().tlvs.result_code == Some(ResultCode::PEER_UNAVAILABLE))
            .count();
        assert_eq!(unavailable, N as usize - 1);
        assert_eq!(h.d.peer.indexed(), (0, 0, 0));
    }
}

/// The queue of unconfigured connections used to keep one entry per connection ever seen
/// (about 13 bytes each, never freed).
#[test]
fn pending_queue_does_not_grow_with_connections_ever_seen() {
    let mut h = Harness::new(DirectorConfig::default());
    for c in 0..10_000 {
        let (conn, ..) = h.configure(c, STREAM);
        h.d.handle_disconnect(h.now, conn);
        let id = h.d.tunnels().next().expect("one tunnel").tunnel_id;
        h.d.close_tunnel(h.now, id, ResultCode::ADMINISTRATIVE)
            .expect("held");
        h.drain();
        h.events();
    }
    assert!(h.d.pending.len() <= 64, "{} entries", h.d.pending.len());
}

/// A client restarts on the UDP port it had, or its NAT gives the port to another host, while
/// the director still holds the old tunnel there. The newcomer's Configuration Requests used
/// to be dropped until the old tunnel went persistent for silence (three keepalive intervals,
/// 60 s at 20 s). Now the old tunnel is asked (a Keepalive), gives the address up when it does
/// not answer, and the newcomer's next request opens a tunnel.
#[test]
fn a_new_client_on_a_silent_tunnels_address_gets_a_tunnel_within_the_check() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, old, _, old_ip) = h.configure(1, DGRAM);
    h.events();
    h.advance(Duration::from_secs(2));
    let mut newcomer = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    newcomer.tlvs.client_nonce = Some(*b"a restarted one.");
    let out = h.send(c, &newcomer);
    assert_eq!(
        out.len(),
        1,
        "a Keepalive to the old tunnel, nothing to the newcomer"
    );
    let m = out[0].message();
    assert_eq!(
        (m.header.message_type, m.header.tunnel_id),
        (MessageType::KEEPALIVE, old)
    );
    assert!(h.signed_for(old, &out));
    // Its retransmission during the check asks nothing more.
    assert!(h.send(c, &newcomer).is_empty());

    h.advance(DirectorConfig::default().address_check_timeout);
    let events = h.events();
    assert!(events.contains(&DirectorEvent::TunnelPersistent { tunnel_id: old }));
    assert!(events.contains(&DirectorEvent::CloseConnection { connection: c }));
    assert_eq!(h.d.stats().address_takeovers, 1);

    // The newcomer's next request, on the connection the runtime opens for the address again.
    let again = h.connect(2, DGRAM);
    let out = h.send(again, &newcomer);
    let m = out[0].message();
    assert_eq!(m.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_ne!(m.header.tunnel_id, old);
    let new_ip = m.tlvs.internal_ipv4.expect("an address").addr;
    assert_ne!(
        new_ip, old_ip,
        "the old tunnel keeps its address for its re-attach"
    );
    let held = h.d.tunnels().find(|t| t.tunnel_id == old).expect("held");
    assert_eq!(
        held.connection, None,
        "persistent, for its client to re-attach"
    );
}

/// An off-path sender forges a Configuration Request from a live client's UDP address: the
/// client answers the Keepalive that asks for it, and keeps its tunnel where it is.
#[test]
fn a_forged_request_from_a_live_tunnels_address_moves_nothing() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, id, _, _) = h.configure(1, DGRAM);
    h.events();
    for round in 0..3 {
        let mut forged = h.request(MessageType::CONFIGURATION_REQUEST, 0);
        forged.tlvs.client_nonce = Some(*b"an off-path one.");
        let out = h.send(c, &forged);
        assert_eq!(out.len(), 1, "round {round}: one Keepalive per check");
        let m = out[0].message();
        assert_eq!(m.header.message_type, MessageType::KEEPALIVE);
        // The answer comes a round trip later.
        let answer = Message::response_to(&m.header, ResultCode::SUCCESS);
        assert!(h.advance(Duration::from_millis(20)).is_empty());
        assert!(h.send(c, &answer).is_empty());
        h.advance(DirectorConfig::default().address_check_timeout);
        assert!(h.events().is_empty(), "round {round}");
    }
    let held = h.d.tunnels().find(|t| t.tunnel_id == id).expect("held");
    assert_eq!(held.connection, Some(c));
    assert_eq!(h.d.stats().address_takeovers, 0);
    assert_eq!(h.d.stats().active_tunnels, 1);
}

/// On a stream transport a connection is its client's: a second request there is dropped and
/// asks nothing of the tunnel.
#[test]
fn a_second_request_on_a_stream_asks_nothing() {
    let mut h = Harness::new(DirectorConfig::default());
    let (c, ..) = h.configure(1, STREAM);
    h.events();
    let mut second = h.request(MessageType::CONFIGURATION_REQUEST, 0);
    second.tlvs.client_nonce = Some(*b"another request.");
    assert!(h.send(c, &second).is_empty());
    h.advance(Duration::from_secs(2));
    assert!(h.events().is_empty());
    assert_eq!(h.d.stats().address_takeovers, 0);
}
