//! Tests of the DTLS endpoint: handshakes in memory, pinning, the cookie exchange and the bounds
//! on state.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::PrivateKeyDer;

use super::*;
use crate::tls::{Fingerprint, PeerIdentity};

const SECRET: [u8; 32] = [7; 32];
const LIMITS: DtlsLimits = DtlsLimits {
    max_half_open: 8,
    handshake_timeout: Duration::from_secs(5),
    cookie_lifetime: Duration::from_secs(30),
};

/// An origin for the time the tests pass by hand.
#[allow(clippy::disallowed_methods)]
fn start() -> Instant {
    Instant::now()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn server_identity() -> (Certificate, Fingerprint) {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .expect("a certificate is generated");
    let der = generated.cert.der().clone();
    let fingerprint = Fingerprint::of(&der);
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let cert = certificate(vec![der], &key).expect("the key imports");
    (cert, fingerprint)
}

/// Delivers everything `from` wants to send to `to`, as if over loopback.
fn transfer(now: Instant, from: &mut DtlsEndpoint, to: &mut DtlsEndpoint) -> usize {
    let mut n = 0;
    while let Some((dest, datagram)) = from.poll_transmit() {
        if dest == to.local {
            to.handle_datagram(now, from.local, &datagram);
            n += 1;
        }
    }
    n
}

fn events(endpoint: &mut DtlsEndpoint) -> Vec<DtlsEvent> {
    std::iter::from_fn(|| endpoint.poll_event()).collect()
}

fn pair(check: PeerCheck) -> (DtlsEndpoint, DtlsEndpoint, Vec<DtlsEvent>, Vec<DtlsEvent>) {
    let (cert, _) = server_identity();
    let now = start();
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    server.set_acceptor(Some(
        Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
    ));
    let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
    let config = client_config(addr(4445), check, None).expect("client config");
    client.connect(now, server.local, config).expect("connect");
    let (mut server_events, mut client_events) = (Vec::new(), Vec::new());
    for _ in 0..16 {
        let moved =
            transfer(now, &mut client, &mut server) + transfer(now, &mut server, &mut client);
        server_events.extend(events(&mut server));
        client_events.extend(events(&mut client));
        if moved == 0 {
            break;
        }
    }
    (server, client, server_events, client_events)
}

#[test]
fn a_pinned_handshake_carries_data_both_ways() {
    let (_, fingerprint) = server_identity();
    // A different certificate per call: pin the one the server really has.
    let (cert, fingerprint_real) = server_identity();
    assert_ne!(fingerprint, fingerprint_real);
    let now = start();
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    server.set_acceptor(Some(
        Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
    ));
    let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
    let config =
        client_config(server.local, PeerCheck::Pinned(fingerprint_real), None).expect("config");
    client.connect(now, server.local, config).expect("connect");
    let mut done = (false, false);
    for _ in 0..16 {
        transfer(now, &mut client, &mut server);
        transfer(now, &mut server, &mut client);
        for e in events(&mut server) {
            done.0 |= matches!(e, DtlsEvent::HandshakeDone { .. });
        }
        for e in events(&mut client) {
            done.1 |= matches!(e, DtlsEvent::HandshakeDone { .. });
        }
    }
    assert_eq!(done, (true, true));
    assert_eq!((server.established(), server.half_open()), (1, 0));
    client.send(now, server.local, b"up").expect("send");
    transfer(now, &mut client, &mut server);
    let got: Vec<_> = events(&mut server)
        .into_iter()
        .filter_map(|e| match e {
            DtlsEvent::Data { payload, .. } => Some(payload.to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![b"up".to_vec()]);
    server.send(now, client.local, b"down").expect("send");
    transfer(now, &mut server, &mut client);
    assert!(events(&mut client)
        .iter()
        .any(|e| matches!(e, DtlsEvent::Data { payload, .. } if &payload[..] == b"down")));
    // Closing tells the other side, which forgets the association.
    client.close(now, server.local);
    transfer(now, &mut client, &mut server);
    assert!(events(&mut server)
        .iter()
        .any(|e| matches!(e, DtlsEvent::Closed { .. })));
    assert_eq!(server.established(), 0);
}

#[test]
fn an_authorised_address_with_a_pinned_client_certificate_and_no_acceptor() {
    let (server_cert, server_fp) = server_identity();
    let (client_cert, client_fp) = server_identity();
    let (_, other_fp) = server_identity();
    let now = start();
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
    let mut stranger = DtlsEndpoint::new(addr(50_001), LIMITS);
    let pinned = |fp| server_config(server_cert.clone(), ClientCheck::Pinned(fp));
    // Without an acceptor, only the authorised address gets state.
    server.authorise(client.local, pinned(client_fp).expect("config"));
    let check = PeerCheck::Pinned(server_fp);
    let config = client_config(server.local, check, Some(client_cert.clone()));
    client
        .connect(now, server.local, config.expect("config"))
        .expect("connect");
    let config = client_config(server.local, PeerCheck::Pinned(server_fp), None);
    stranger
        .connect(now, server.local, config.expect("config"))
        .expect("connect");
    let mut done = false;
    for _ in 0..16 {
        transfer(now, &mut client, &mut server);
        transfer(now, &mut stranger, &mut server);
        transfer(now, &mut server, &mut client);
        for e in events(&mut server) {
            if let DtlsEvent::HandshakeDone {
                peer,
                peer_certificate,
            } = e
            {
                assert_eq!(peer, client.local);
                let der = peer_certificate.expect("the client's certificate");
                assert_eq!(Fingerprint::of(&der), client_fp);
                done = true;
            }
        }
    }
    assert!(done, "the authorised client completed");
    assert_eq!((server.established(), server.half_open()), (1, 0));
    assert!(
        server.counters().unknown_source > 0,
        "the stranger was dropped"
    );

    // A client whose certificate is not the pinned one is refused.
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
    server.authorise(client.local, pinned(other_fp).expect("config"));
    let config = client_config(
        server.local,
        PeerCheck::Pinned(server_fp),
        Some(client_cert),
    );
    client
        .connect(now, server.local, config.expect("config"))
        .expect("connect");
    for _ in 0..16 {
        transfer(now, &mut client, &mut server);
        transfer(now, &mut server, &mut client);
    }
    assert!(events(&mut server)
        .iter()
        .any(|e| matches!(e, DtlsEvent::HandshakeFailed { .. })));
    assert_eq!(server.established() + server.half_open(), 0);
}

#[test]
fn a_wrong_pin_fails_the_handshake_and_leaves_no_state() {
    let (_, wrong) = server_identity();
    let (server, client, _, client_events) = pair(PeerCheck::Pinned(wrong));
    assert!(client_events
        .iter()
        .any(|e| matches!(e, DtlsEvent::HandshakeFailed { .. })));
    assert!(!client_events
        .iter()
        .any(|e| matches!(e, DtlsEvent::HandshakeDone { .. })));
    assert_eq!(client.half_open() + client.established(), 0);
    assert_eq!(client.counters().handshake_failures, 1);
    assert_eq!(server.established(), 0);
}

#[test]
fn plaintext_records_are_bounded_per_association() {
    let (mut server, client, _, _) = pair(PeerCheck::Insecure);
    let now = start();
    // Epoch-0 handshake records of ever new message sequence numbers, which rtc-dtls would
    // buffer (an attacker spoofing the client's address can send them).
    let mut record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let body = [0u8; 1000];
    let mut fragment = vec![2, 0, 0x10, 0];
    for seq in 0..200u16 {
        record.truncate(13);
        record[5..11].copy_from_slice(&u64::from(1_000 + seq).to_be_bytes()[2..]);
        fragment.truncate(4);
        fragment.extend_from_slice(&(seq + 10).to_be_bytes());
        fragment.extend_from_slice(&[0, 0, 0, 0, 0x03, 0xe8]);
        fragment.extend_from_slice(&body);
        let length = u16::try_from(fragment.len()).expect("small");
        record[11..13].copy_from_slice(&length.to_be_bytes());
        record.extend_from_slice(&fragment);
        server.handle_datagram(now, client.local, &record);
    }
    let dropped = server.counters().bad_records;
    assert!(dropped >= 200 - 64, "{dropped} dropped");
    assert_eq!(server.established(), 1, "the association is kept");
}

#[test]
fn garbage_from_many_sources_keeps_no_state() {
    let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
    let now = start();
    let before = server.counters();
    for port in 1_000..3_000u16 {
        server.handle_datagram(now, addr(port), &[22, 0xfe, 0xfd, 0, 0, 1, 2, 3]);
        server.handle_datagram(now, addr(port), &[23; 40]);
        server.handle_datagram(now, addr(port), b"\x04not dtls");
    }
    assert_eq!(server.half_open(), 0);
    assert_eq!(server.established(), 1);
    let after = server.counters();
    assert_eq!(after.unknown_source - before.unknown_source, 4_000);
    assert_eq!(after.bad_records - before.bad_records, 2_000);
}

/// The first datagram of a client endpoint at `from`: a ClientHello without a cookie.
fn first_hello(now: Instant, from: SocketAddr, server: SocketAddr) -> (DtlsEndpoint, Vec<u8>) {
    let mut client = DtlsEndpoint::new(from, LIMITS);
    let config = client_config(server, PeerCheck::Insecure, None).expect("config");
    client.connect(now, server, config).expect("connect");
    let (_, hello) = client.poll_transmit().expect("a ClientHello");
    (client, hello.to_vec())
}

#[test]
fn client_hellos_without_a_cookie_are_answered_without_state() {
    let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
    let now = start();
    let (_, hello) = first_hello(now, addr(50_001), server.local);
    let before = server.counters();
    for port in 1_000..3_000u16 {
        // Replayed from spoofed sources, and truncated.
        server.handle_datagram(now, addr(port), &hello);
        server.handle_datagram(now, addr(port), &hello[..30]);
        assert_eq!(server.half_open(), 0);
    }
    let after = server.counters();
    assert_eq!(after.hello_verify_sent - before.hello_verify_sent, 2_000);
    assert_eq!(after.unknown_source - before.unknown_source, 2_000);
    assert_eq!(server.established(), 1);
    // One answer each, to the source, as large as the ClientHello at most (no
    // amplification).
    let answers: Vec<_> = std::iter::from_fn(|| server.poll_transmit()).collect();
    assert_eq!(answers.len(), 2_000);
    assert!(answers.iter().all(|(_, d)| d.len() <= hello.len()));
}

#[test]
fn a_cookie_is_bound_to_the_source_address() {
    let (cert, _) = server_identity();
    let now = start();
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    server.set_acceptor(Some(
        Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
    ));
    let (mut client, hello) = first_hello(now, addr(50_000), server.local);
    server.handle_datagram(now, client.local, &hello);
    transfer(now, &mut server, &mut client);
    let (_, second) = client
        .poll_transmit()
        .expect("a ClientHello with the cookie");
    // From another address the cookie is worthless.
    server.handle_datagram(now, addr(50_001), &second);
    assert_eq!(server.half_open(), 0);
    assert_eq!(server.counters().unknown_source, 1);
    // From the right one, the handshake goes on and completes.
    server.handle_datagram(now, client.local, &second);
    assert_eq!(server.half_open(), 1);
    for _ in 0..8 {
        transfer(now, &mut server, &mut client);
        transfer(now, &mut client, &mut server);
    }
    assert_eq!((server.established(), client.established()), (1, 1));
}

/// A ClientHello with a cookie used to be accepted for ever: each replay cost the server a
/// flight and a half-open slot. A cookie now lives one to two cookie periods.
#[test]
fn replayed_cookie_expires() {
    let (cert, _) = server_identity();
    let now = start();
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    server.set_acceptor(Some(
        Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
    ));
    let (mut client, hello) = first_hello(now, addr(50_000), server.local);
    server.handle_datagram(now, client.local, &hello);
    transfer(now, &mut server, &mut client);
    let (_, second) = client
        .poll_transmit()
        .expect("a ClientHello with the cookie");
    // Within its period and the next, the cookie admits.
    let later = now + LIMITS.cookie_lifetime + Duration::from_secs(1);
    server.handle_datagram(later, client.local, &second);
    assert_eq!(server.half_open(), 1);
    // Two periods on, a replay of it is refused and counted.
    let mut server2 = DtlsEndpoint::new(addr(4446), LIMITS);
    let (cert, _) = server_identity();
    server2.set_acceptor(Some(
        Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
    ));
    server2.handle_datagram(now, client.local, &hello);
    let expired = now + 2 * LIMITS.cookie_lifetime;
    server2.handle_datagram(expired, client.local, &second);
    assert_eq!(server2.half_open(), 0);
    assert_eq!(server2.counters().bad_cookies, 1);
}

#[test]
fn half_open_handshakes_stay_within_the_cap_and_time_out() {
    let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
    let now = start();
    let sources = 3 * LIMITS.max_half_open as u16;
    for port in 0..sources {
        // Clients that answer the cookie and then go silent.
        let (mut client, hello) = first_hello(now, addr(51_000 + port), server.local);
        server.handle_datagram(now, client.local, &hello);
        while let Some((to, datagram)) = server.poll_transmit() {
            if to == client.local {
                client.handle_datagram(now, server.local, &datagram);
            }
        }
        let (_, second) = client.poll_transmit().expect("a second ClientHello");
        server.handle_datagram(now, client.local, &second);
        assert!(server.half_open() <= LIMITS.max_half_open);
    }
    let counters = server.counters();
    assert_eq!(server.half_open(), LIMITS.max_half_open);
    assert_eq!(
        counters.half_open_evicted,
        u64::from(sources) - LIMITS.max_half_open as u64
    );
    assert_eq!(server.established(), 1);
    // The survivors are given up at their deadline.
    let deadline = server.poll_timeout().expect("a deadline");
    assert!(deadline <= now + LIMITS.handshake_timeout);
    server.handle_timeout(now + LIMITS.handshake_timeout);
    assert_eq!(server.half_open(), 0);
    assert_eq!(server.established(), 1);
}

/// A small deterministic generator for the mutation test (xorshift64*).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutations of real handshake datagrams (flipped octets, truncations, spliced tails), fed to
/// a server from a few addresses and from its client's, and to the client from the server's:
/// nothing panics, the state stays within its bounds, and the association that was up still
/// carries data both ways.
#[test]
fn mutated_handshake_datagrams_keep_the_endpoints_within_bounds() {
    let now = start();
    let (cert, _) = server_identity();
    let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
    server.set_acceptor(Some(
        Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
    ));
    // Record a real exchange, both directions.
    let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
    let config = client_config(server.local, PeerCheck::Insecure, None).expect("config");
    client.connect(now, server.local, config).expect("connect");
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    for _ in 0..16 {
        while let Some((_, d)) = client.poll_transmit() {
            corpus.push(d.to_vec());
            server.handle_datagram(now, client.local, &d);
        }
        while let Some((_, d)) = server.poll_transmit() {
            corpus.push(d.to_vec());
            client.handle_datagram(now, server.local, &d);
        }
    }
    assert_eq!((server.established(), client.established()), (1, 1));
    let seed = std::env::var("DTLS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d715);
    let mut noise = Noise(seed);
    for round in 0..20_000 {
        let mut d = corpus[noise.below(corpus.len())].clone();
        match noise.below(4) {
            0 => {
                let i = noise.below(d.len());
                d[i] ^= 1 << noise.below(8);
            }
            1 => d.truncate(noise.below(d.len() + 1)),
            2 => {
                let tail = corpus[noise.below(corpus.len())].clone();
                let at = noise.below(d.len());
                d.truncate(at);
                d.extend_from_slice(&tail[noise.below(tail.len())..]);
            }
            _ => {
                let i = noise.below(d.len());
                d[i] = noise.next() as u8;
            }
        }
        // From strangers, and from the peers' own addresses (as a spoofer would send them).
        let from = match noise.below(3) {
            0 => client.local,
            _ => addr(40_000 + noise.below(8) as u16),
        };
        server.handle_datagram(now, from, &d);
        client.handle_datagram(now, server.local, &d);
        while server.poll_transmit().is_some() {}
        while client.poll_transmit().is_some() {}
        let _ = events(&mut server);
        let _ = events(&mut client);
        assert!(
            server.half_open() <= LIMITS.max_half_open,
            "seed {seed}, round {round}"
        );
        if round % 5_000 == 0 {
            server.handle_timeout(now + LIMITS.handshake_timeout);
        }
    }
    assert_eq!(
        (server.established(), client.established()),
        (1, 1),
        "seed {seed}"
    );
    client.send(now, server.local, b"still up").expect("send");
    transfer(now, &mut client, &mut server);
    assert!(
        events(&mut server)
            .iter()
            .any(|e| matches!(e, DtlsEvent::Data { payload, .. } if &payload[..] == b"still up")),
        "seed {seed}"
    );
    server.send(now, client.local, b"and back").expect("send");
    transfer(now, &mut server, &mut client);
    assert!(
        events(&mut client)
            .iter()
            .any(|e| matches!(e, DtlsEvent::Data { payload, .. } if &payload[..] == b"and back")),
        "seed {seed} (DTLS_SEED reruns it)"
    );
    eprintln!(
        "after 20,000 mutated datagrams: server {:?}, client {:?}",
        server.counters(),
        client.counters()
    );
}

/// rtc-dtls does not authenticate ChangeCipherSpec records: one of the current epoch, which
/// anyone who can spoof the peer's address can send, would move the association to the next
/// epoch for good. The endpoint drops it.
#[test]
fn a_forged_change_cipher_spec_cannot_end_an_association() {
    let (mut server, mut client, _, _) = pair(PeerCheck::Insecure);
    let now = start();
    let forged = [20, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 1, 1];
    client.handle_datagram(now, server.local, &forged);
    server.handle_datagram(now, client.local, &forged);
    assert_eq!(client.counters().bad_records, 1);
    assert_eq!(server.counters().bad_records, 1);
    server.send(now, client.local, b"down").expect("send");
    transfer(now, &mut server, &mut client);
    assert!(events(&mut client)
        .iter()
        .any(|e| matches!(e, DtlsEvent::Data { payload, .. } if &payload[..] == b"down")));
    client.send(now, server.local, b"up").expect("send");
    transfer(now, &mut client, &mut server);
    assert!(events(&mut server)
        .iter()
        .any(|e| matches!(e, DtlsEvent::Data { payload, .. } if &payload[..] == b"up")));
}

/// Keys from rcgen; no files.
const OS: crate::tls::Os = crate::tls::Os {
    read_file: |_| Err(std::io::ErrorKind::NotFound.into()),
    generate_key: rcgen::KeyPair::generate,
    fill_random: |_| Err(std::io::ErrorKind::Unsupported.into()),
};

/// Delivers what `from` queued to `to` if `to` admits its address, as a runtime's UDP task does.
fn deliver(
    now: Instant,
    from: (&mut PeerSessions, SocketAddr),
    to: (&mut PeerSessions, SocketAddr),
) {
    while let Some((dest, datagram)) = from.0.poll_transmit() {
        if dest == to.1 && to.0.admits(from.1) {
            to.0.handle_datagram(now, from.1, &datagram);
        }
    }
}

fn session_events(sessions: &mut PeerSessions, now: Instant) -> Vec<PeerSessionEvent> {
    std::iter::from_fn(|| sessions.poll_event(now)).collect()
}

#[test]
fn peer_sessions_open_with_both_pins_and_carry_envelopes() {
    let now = start();
    let timeout = Duration::from_secs(3);
    let (a_addr, b_addr) = (addr(40_001), addr(40_002));
    let a_id = PeerIdentity::generate(OS).expect("a");
    let b_id = PeerIdentity::generate(OS).expect("b");
    let mut a = PeerSessions::new(a_addr, a_id.clone(), timeout).expect("a");
    let mut b = PeerSessions::new(b_addr, b_id.clone(), timeout).expect("b");
    assert!(!b.admits(a_addr));
    b.authorise(a_addr, a_id.fingerprint.0).expect("authorise");
    a.open(now, b_addr, b_id.fingerprint.0).expect("open");
    let (mut opened_a, mut opened_b) = (false, false);
    for _ in 0..16 {
        deliver(now, (&mut a, a_addr), (&mut b, b_addr));
        deliver(now, (&mut b, b_addr), (&mut a, a_addr));
        opened_a |= session_events(&mut a, now)
            .iter()
            .any(|e| matches!(e, PeerSessionEvent::Open { path } if *path == b_addr));
        opened_b |= session_events(&mut b, now)
            .iter()
            .any(|e| matches!(e, PeerSessionEvent::Open { path } if *path == a_addr));
    }
    assert!(opened_a && opened_b);
    assert!(a.send(now, b_addr, b"envelope"));
    deliver(now, (&mut a, a_addr), (&mut b, b_addr));
    assert!(session_events(&mut b, now).iter().any(|e| matches!(
        e,
        PeerSessionEvent::Envelope { path, envelope } if *path == a_addr && &envelope[..] == b"envelope"
    )));
    // Closing withdraws the authorisation; the other side sees the session end.
    b.close(now, a_addr);
    assert!(!b.admits(a_addr));
    while let Some((_, datagram)) = b.poll_transmit() {
        a.handle_datagram(now, b_addr, &datagram);
    }
    assert!(session_events(&mut a, now).iter().any(|e| matches!(
        e,
        PeerSessionEvent::Failed { path, handshake: false } if *path == b_addr
    )));
    assert!(!a.admits(b_addr));
    assert!(!a.send(now, b_addr, b"gone"));
}

#[test]
fn a_peer_session_with_the_wrong_certificate_fails_and_is_forgotten() {
    let now = start();
    let timeout = Duration::from_secs(3);
    let (a_addr, b_addr) = (addr(40_001), addr(40_002));
    let a_id = PeerIdentity::generate(OS).expect("a");
    let b_id = PeerIdentity::generate(OS).expect("b");
    let liar = PeerIdentity::generate(OS).expect("liar");
    let mut a = PeerSessions::new(a_addr, a_id.clone(), timeout).expect("a");
    let mut b = PeerSessions::new(b_addr, b_id.clone(), timeout).expect("b");
    // b presents a certificate other than the one a was told of.
    b.set_identity(liar).expect("identity");
    b.authorise(a_addr, a_id.fingerprint.0).expect("authorise");
    a.open(now, b_addr, b_id.fingerprint.0).expect("open");
    let mut failed = false;
    for _ in 0..16 {
        deliver(now, (&mut a, a_addr), (&mut b, b_addr));
        deliver(now, (&mut b, b_addr), (&mut a, a_addr));
        for e in session_events(&mut a, now) {
            assert!(!matches!(e, PeerSessionEvent::Open { .. }), "{e:?}");
            failed |=
                matches!(e, PeerSessionEvent::Failed { path, handshake: true } if path == b_addr);
        }
        let _ = session_events(&mut b, now);
    }
    assert!(failed);
    assert!(!a.admits(b_addr));
    assert_eq!(a.counters().handshake_failures, 1);
}

#[test]
fn an_unanswered_peer_session_gives_up_at_its_handshake_timeout() {
    let now = start();
    let timeout = Duration::from_millis(1_500);
    let b_addr = addr(40_002);
    let mut a = PeerSessions::new(
        addr(40_001),
        PeerIdentity::generate(OS).expect("a"),
        timeout,
    )
    .expect("a");
    a.open(now, b_addr, [9; 32]).expect("open");
    while a.poll_transmit().is_some() {}
    let due = a.poll_timeout().expect("a timer");
    assert!(due <= now + timeout);
    a.handle_timeout(now + timeout - Duration::from_millis(1));
    assert!(session_events(&mut a, now).is_empty());
    a.handle_timeout(now + timeout);
    assert!(matches!(
        session_events(&mut a, now + timeout)[..],
        [PeerSessionEvent::Failed {
            handshake: true,
            ..
        }]
    ));
    assert!(a.poll_timeout().is_none());
}

#[test]
fn client_settings_pin_the_server_or_take_its_certificate_as_it_comes() {
    let (cert, fingerprint) = server_identity();
    let now = start();
    let server_at = addr(4445);
    let handshake = |verification| {
        let settings = ClientSettings::new(
            &crate::tls::ClientTlsConfig {
                verification,
                server_name: None,
                client_identity: None,
            },
            OS,
        )
        .expect("settings");
        let mut server = DtlsEndpoint::new(server_at, LIMITS);
        server.set_acceptor(Some(
            Acceptor::new(cert.clone(), ClientCheck::None, SECRET).expect("acceptor"),
        ));
        let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
        let config = settings.handshake_config(server_at).expect("config");
        client.connect(now, server_at, config).expect("connect");
        for _ in 0..16 {
            transfer(now, &mut client, &mut server);
            transfer(now, &mut server, &mut client);
        }
        client.established()
    };
    use crate::tls::ServerVerification;
    assert_eq!(handshake(ServerVerification::Pinned(fingerprint)), 1);
    assert_eq!(
        handshake(ServerVerification::Pinned(Fingerprint([3; 32]))),
        0
    );
    assert_eq!(handshake(ServerVerification::Insecure), 1);
    // A CA file that cannot be read is an error when the settings are made, not per attempt.
    let missing = crate::tls::ClientTlsConfig {
        verification: ServerVerification::CaFile("ca.pem".into()),
        server_name: None,
        client_identity: None,
    };
    assert!(matches!(
        ClientSettings::new(&missing, OS),
        Err(crate::tls::TlsConfigError::Pem { .. })
    ));
}
