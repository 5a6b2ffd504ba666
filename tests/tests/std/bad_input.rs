//! Hostile input against a live server: each case has the outcome documented in the crate
//! docs of `tscf-runtime-std`; nothing panics, other tunnels keep working, memory stays bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use tscf_core::sim::world::udp_packet;
use tscf_core::wire::{Message, MessageType, ResultCode, Transport};
use tscf_runtime_std::{ServerHandle, Tunnel};

use crate::util::{rtp_flow, server, tunnel};

const PENDING: Duration = Duration::from_secs(1);

fn hostile_server() -> ServerHandle {
    server(|c| {
        c.director.pending_timeout = PENDING;
        c.director.max_pending_connections = 100;
    })
}

fn raw(server: &ServerHandle) -> TcpStream {
    let s = TcpStream::connect(server.local_addrs().tcp[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// A control envelope: header of `version` and `message_type`, sequence 7, tunnel id 0, TLVs.
fn control(version: u8, message_type: u8, tlvs: &[u8]) -> Vec<u8> {
    let len = 3 + 14 + tlvs.len();
    let mut out = vec![5, (len >> 8) as u8, len as u8, version, message_type];
    out.extend_from_slice(&7u32.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(tlvs);
    out
}

/// Reads one envelope; `None` on timeout or close.
fn read_envelope(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 3];
    s.read_exact(&mut header).ok()?;
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    let mut rest = vec![0u8; len.checked_sub(3)?];
    s.read_exact(&mut rest).ok()?;
    let mut out = header.to_vec();
    out.extend_from_slice(&rest);
    Some(out)
}

/// The message type and result code of a control answer.
fn answer(s: &mut TcpStream) -> Option<(MessageType, Option<ResultCode>)> {
    let env = read_envelope(s)?;
    assert_eq!(env[0], 5, "a control envelope");
    // Walk the short-form TLVs by hand: an answer to an unknown type does not decode.
    let mut tlvs = &env[3 + 14..];
    let mut result = None;
    while let [ty, len, rest @ ..] = tlvs {
        let value = &rest[..usize::from(*len)];
        if *ty == 0x08 {
            result = Some(ResultCode(u16::from_be_bytes([value[0], value[1]])));
        }
        tlvs = &rest[usize::from(*len)..];
    }
    Some((MessageType(env[4]), result))
}

/// Whether the server closes `s` within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// Two good tunnels still relay a flow.
fn still_serves(a: &Tunnel, b: &Tunnel) {
    let got = rtp_flow(a, b, 10, |_| {});
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

#[test]
fn malformed_streams_and_messages() {
    let server = hostile_server();
    let a = tunnel(&server, Transport::TCP);
    let b = tunnel(&server, Transport::UDP);

    // Random bytes: the first header has a length below 3: loss of framing, closed at once.
    let mut s = raw(&server);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let junk: Vec<u8> = (0..600)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    s.write_all(&[0x05, 0x00, 0x01]).unwrap();
    let _ = s.write_all(&junk);
    assert!(closed_within(&mut s, Duration::from_millis(500)));
    assert!(server.stats().transport.framing_errors >= 1);

    // Truncated envelope: waits for the rest, closed at the pending timeout.
    let mut s = raw(&server);
    s.write_all(&[0x05, 0x00, 0x64, 0x01, 0x01]).unwrap();
    assert!(!closed_within(&mut s, PENDING / 2));
    assert!(closed_within(&mut s, PENDING * 2));

    // Oversized control message (3,000-octet Software TLV, above 2,048): Malformed.
    let mut s = raw(&server);
    let mut tlv = vec![0x80, 0xff, 0x0b, 0xb8];
    tlv.resize(4 + 3000, b'x');
    s.write_all(&control(1, 0x01, &tlv)).unwrap();
    assert_eq!(
        answer(&mut s),
        Some((
            MessageType::CONFIGURATION_RESPONSE,
            Some(ResultCode::MALFORMED)
        ))
    );

    // Wrong version: a version-1 answer with Version Not Supported.
    s.write_all(&control(2, 0x01, &[])).unwrap();
    assert_eq!(
        answer(&mut s),
        Some((
            MessageType::CONFIGURATION_RESPONSE,
            Some(ResultCode::VERSION_NOT_SUPPORTED)
        ))
    );

    // Unknown message type 0x41: answered 0x42, Unknown Message.
    s.write_all(&control(1, 0x41, &[])).unwrap();
    assert_eq!(
        answer(&mut s),
        Some((MessageType(0x42), Some(ResultCode::UNKNOWN_MESSAGE)))
    );

    // Unknown critical TLV 0x7e: Unknown Critical TLV.
    s.write_all(&control(1, 0x01, &[0x7e, 0x01, 0x00])).unwrap();
    assert_eq!(
        answer(&mut s),
        Some((
            MessageType::CONFIGURATION_RESPONSE,
            Some(ResultCode::UNKNOWN_CRITICAL_TLV)
        ))
    );

    // Duplicate TLV (two Keepalive Intervals): Malformed.
    let ka = [0x07, 0x04, 0x00, 0x00, 0x75, 0x30];
    s.write_all(&control(1, 0x01, &[ka, ka].concat())).unwrap();
    assert_eq!(
        answer(&mut s),
        Some((
            MessageType::CONFIGURATION_RESPONSE,
            Some(ResultCode::MALFORMED)
        ))
    );

    // Data before configuration: dropped and counted, no answer.
    let before = server.stats().director.dropped.not_configured;
    let packet = udp_packet([10, 77, 0, 2].into(), [10, 77, 0, 3].into(), b"early");
    let mut env = vec![4, 0, (packet.len() + 3) as u8];
    env.extend_from_slice(&packet);
    s.write_all(&env).unwrap();
    assert_eq!(answer(&mut s), None);
    assert_eq!(server.stats().director.dropped.not_configured, before + 1);

    // Still answers on the same connection until the pending timeout closes it.
    assert!(closed_within(&mut s, PENDING * 2));

    // The same junk over UDP: not tscf by its first octet, or a bad envelope; dropped.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.send_to(&junk, server.local_addrs().udp[0]).unwrap();
    u.send_to(&[0x04, 0xff, 0xff, 1], server.local_addrs().udp[0])
        .unwrap();

    still_serves(&a, &b);
    let stats = server.stats();
    assert!(stats.director.refused.protocol_errors >= 5, "{stats:?}");
    assert!(stats.director.dropped.bad_envelope >= 1, "{stats:?}");
}

#[test]
fn spoofed_inner_source_is_dropped() {
    let server = hostile_server();
    let a = tunnel(&server, Transport::TCP);
    let b = tunnel(&server, Transport::TCP);
    // A raw client configures itself, then sends with b's address as source.
    let mut s = raw(&server);
    let mut request = Vec::new();
    let mut configuration = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    configuration.tlvs.client_nonce = Some([1; 16]);
    configuration.encode_envelope(&mut request).unwrap();
    s.write_all(&request).unwrap();
    let env = read_envelope(&mut s).unwrap();
    let msg = Message::decode(&env[3..]).unwrap();
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::SUCCESS));
    let victim = b.internal_ipv4().unwrap();
    let target = a.internal_ipv4().unwrap();
    let rx = a.bind(5004).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut packet = udp_packet(victim, target, b"spoof");
    packet[20..22].copy_from_slice(&5004u16.to_be_bytes());
    packet[22..24].copy_from_slice(&5004u16.to_be_bytes());
    let mut env = vec![4, 0, (packet.len() + 3) as u8];
    env.extend_from_slice(&packet);
    s.write_all(&env).unwrap();
    let mut buf = [0u8; 64];
    assert!(rx.recv_from(&mut buf).is_err(), "spoofed packet relayed");
    assert_eq!(server.stats().director.dropped.spoofed_source, 1);
    drop(rx);
    still_serves(&b, &a);
}

#[test]
fn garbage_instead_of_a_client_hello() {
    let server = hostile_server();
    let a = tunnel(&server, Transport::TLS);
    let b = tunnel(&server, Transport::TLS);
    let mut s = TcpStream::connect(server.local_addrs().tls[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: tscf\r\n\r\n");
    assert!(closed_within(&mut s, Duration::from_secs(1)));
    assert_eq!(server.stats().transport.tls_handshake_failures, 1);
    still_serves(&a, &b);
}

#[test]
fn one_byte_per_second_is_closed_at_the_pending_timeout() {
    let server = hostile_server();
    let a = tunnel(&server, Transport::TCP);
    let b = tunnel(&server, Transport::TCP);
    for addr in [server.local_addrs().tcp[0], server.local_addrs().tls[0]] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let request = control(1, 0x01, &[]);
        let start = Instant::now();
        let mut closed = false;
        for byte in &request {
            if s.write_all(&[*byte]).is_err() || closed_within(&mut s, Duration::from_millis(900)) {
                closed = true;
                break;
            }
        }
        let took = start.elapsed();
        assert!(closed, "{addr}: still open after {took:?}");
        assert!(took < PENDING * 3, "{addr}: closed after {took:?}");
    }
    still_serves(&a, &b);
}

#[test]
fn a_thousand_silent_connections() {
    let server = hostile_server();
    let a = tunnel(&server, Transport::TCP);
    let b = tunnel(&server, Transport::UDP);
    let addr: SocketAddr = server.local_addrs().tcp[0];
    let mut silent: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // Let the server accept them all.
    thread::sleep(Duration::from_millis(300));
    let stats = server.stats();
    assert!(stats.director.pending_connections <= 100, "{stats:?}");
    assert!(stats.stream_connections <= 1024, "{stats:?}");
    // The oldest were closed to make room.
    let first = &mut silent[0];
    first
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(closed_within(first, Duration::from_secs(1)));
    // A good client still gets a tunnel and the old ones still relay.
    let c = tunnel(&server, Transport::TCP);
    assert!(c.internal_ipv4().is_some());
    still_serves(&a, &b);
    drop(silent);
    // After the pending timeout everything unconfigured is gone.
    thread::sleep(PENDING * 2);
    let stats = server.stats();
    assert_eq!(stats.director.pending_connections, 0, "{stats:?}");
    assert!(stats.stream_connections <= 2, "{stats:?}");
}
