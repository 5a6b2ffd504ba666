//! The data path and hostile input.

use super::*;

#[test]
fn data_round_trip_and_checks() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    let packet = udp_packet(ADDR, PEER, b"rtp");
    assert_eq!(
        h.client.send_ip(h.now, &packet),
        Err(SendError::NotConnected)
    );
    h.connect(30_000);

    h.client.send_ip(h.now, &packet).expect("valid packet");
    h.drain();
    assert_eq!(h.take_sent(), [data_envelope(&packet)]);
    assert_eq!(
        h.client.send_ip(h.now, &udp_packet(PEER, ADDR, b"x")),
        Err(SendError::WrongSource(PEER.into()))
    );
    assert!(matches!(
        h.client.send_ip(h.now, &packet[..packet.len() - 1]),
        Err(SendError::InvalidPacket(_))
    ));

    let inbound = udp_packet(PEER, ADDR, b"hello");
    h.deliver(&data_envelope(&inbound));
    h.deliver(&data_envelope(&udp_packet(ADDR, PEER, b"not for us")));
    h.deliver(&data_envelope(b"\x45garbage"));
    let mut out = b"stale".to_vec();
    assert!(h.client.recv_ip(&mut out));
    assert_eq!(out, inbound);
    assert!(!h.client.recv_ip(&mut out));
    let stats = h.client.stats();
    assert_eq!(stats.data_received, 1);
    assert_eq!(stats.dropped_wrong_destination, 1);
    assert_eq!(stats.dropped_bad_packet, 1);
}

#[test]
fn receive_queue_is_bounded() {
    let mut config = ClientConfig::new(vec![tcp()]);
    config.max_queued_packets = 3;
    let mut h = Harness::new(config);
    h.take_events();
    h.connect(30_000);
    let inbound = data_envelope(&udp_packet(PEER, ADDR, b"x"));
    for _ in 0..5 {
        h.deliver(&inbound);
    }
    assert_eq!(h.client.stats().dropped_receive_queue_full, 2);
    let mut out = Vec::new();
    let mut n = 0;
    while h.client.recv_ip(&mut out) {
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn packets_queue_while_reattaching_up_to_the_bound() {
    let mut config = ClientConfig::new(vec![tcp()]);
    config.max_queued_packets = 4;
    let mut h = Harness::new(config);
    h.take_events();
    h.connect(30_000);
    h.client.handle_input(h.now, Input::TransportLost);
    h.drain();
    h.take_events();
    let packets: Vec<Vec<u8>> = (0..5u8).map(|i| udp_packet(ADDR, PEER, &[i])).collect();
    for p in &packets[..4] {
        h.client.send_ip(h.now, p).expect("queued");
    }
    assert_eq!(
        h.client.send_ip(h.now, &packets[4]),
        Err(SendError::QueueFull)
    );
    assert_eq!(h.client.stats().send_queue_full, 1);
    h.drain();
    assert!(h.sent.is_empty(), "nothing goes out without a transport");

    h.open();
    let request = h.take_control();
    let seq = decode(&request).header.sequence;
    h.deliver(&config_response(seq, TUNNEL, ADDR, 30_000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Reattached(_)]
    ));
    let expected: Vec<Vec<u8>> = packets[..4].iter().map(|p| data_envelope(p)).collect();
    assert_eq!(h.take_sent(), expected);
}

#[test]
fn garbage_is_counted_and_never_fatal() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    let mut rng = ChaCha20Rng::seed_from_u64(0x6a7b);
    let mut garbage = |h: &mut Harness| {
        for _ in 0..500 {
            let len = (rng.next_u32() % 64) as usize;
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            // Half of them look like control envelopes of the right length.
            if len >= 3 && rng.next_u32() % 2 == 0 {
                bytes[0] = 5;
                bytes[1..3].copy_from_slice(&(len as u16).to_be_bytes());
                if len > 3 {
                    bytes[3] = 1;
                }
            }
            h.deliver(&bytes);
        }
    };
    // While opening, configuring and connected.
    garbage(&mut h);
    h.open();
    h.take_sent();
    garbage(&mut h);
    h.take_sent();
    assert!(h
        .take_events()
        .iter()
        .all(|e| !matches!(e, ClientEvent::Terminated { .. })));
    assert_eq!(h.client.state(), ClientState::Connecting);
    h.advance(ms(250));
    let request = h.sent.last().expect("retransmission").1.clone();
    let seq = decode(&request).header.sequence;
    h.deliver(&config_response(seq, TUNNEL, ADDR, 30_000));
    assert!(h
        .take_events()
        .iter()
        .any(|e| matches!(e, ClientEvent::Connected(_))));
    h.take_sent();
    garbage(&mut h);
    h.take_sent();
    assert_eq!(h.client.state(), ClientState::Connected);

    let before = *h.client.stats();
    // Truncated: a control envelope too short for a header; and a datagram cut short.
    h.deliver(&[5, 0, 5, 1, 7]);
    let keepalive = encode(&Message::new(MessageType::KEEPALIVE, 0x8000_0100, TUNNEL));
    h.deliver(&keepalive[..keepalive.len() - 1]);
    // Wrong version: a keepalive of version 2 is dropped, not answered.
    let mut v2 = keepalive.clone();
    v2[3] = 2;
    h.deliver(&v2);
    // Unknown envelope type.
    h.deliver(&[9, 0, 3]);
    let stats = *h.client.stats();
    assert_eq!(stats.dropped_bad_control, before.dropped_bad_control + 2);
    assert_eq!(stats.dropped_bad_envelope, before.dropped_bad_envelope + 1);
    assert_eq!(
        stats.dropped_unknown_envelope,
        before.dropped_unknown_envelope + 1
    );
    assert!(h.take_sent().is_empty());

    // Unknown critical TLV in a request the director signed: answered with code 4 (unsigned,
    // it is not answered); in a response: dropped.
    let mut bad = keepalive.clone();
    bad.extend_from_slice(&[0x7e, 1, 0]);
    let len = bad.len() as u16;
    bad[1..3].copy_from_slice(&len.to_be_bytes());
    h.deliver_raw(&bad);
    assert!(h.take_sent().is_empty());
    let key = crate::wire::ControlKey::new(&super::KEY);
    crate::wire::append_integrity(&mut bad, 0, &key.director_to_client()).expect("fits");
    h.deliver_raw(&bad);
    let answer = h.take_control();
    let msg = decode(&answer);
    assert_eq!(msg.header.message_type, MessageType::KEEPALIVE_RESPONSE);
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::UNKNOWN_CRITICAL_TLV));
    assert_eq!(
        h.client.stats().error_responses_sent,
        before.error_responses_sent + 1
    );
    let mut bad_response = encode(&Message::response_to(
        &Message::new(MessageType::KEEPALIVE, 3, TUNNEL).header,
        ResultCode::SUCCESS,
    ));
    bad_response.extend_from_slice(&[0x7e, 0]);
    let len = bad_response.len() as u16;
    bad_response[1..3].copy_from_slice(&len.to_be_bytes());
    h.deliver(&bad_response);
    assert!(h.take_sent().is_empty());
    assert_eq!(
        h.client.stats().dropped_bad_control,
        before.dropped_bad_control + 4
    );
    assert_eq!(h.client.state(), ClientState::Connected);
}
