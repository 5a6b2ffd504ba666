//! What the client does for the NATs on its path, and how it accounts for what it refuses.

use super::*;

/// The Keepalive Interval the first Configuration Request to `server` proposes.
fn proposed(server: ServerEndpoint, configured: Option<Duration>) -> Option<u32> {
    let mut config = ClientConfig::new(vec![server]);
    config.keepalive_interval = configured;
    let mut h = Harness::new(config);
    h.open();
    decode(&h.take_control()).tlvs.keepalive_interval_ms
}

#[test]
fn on_udp_the_client_proposes_a_keepalive_short_enough_for_nats() {
    assert_eq!(proposed(udp(), None), Some(20_000));
    assert_eq!(proposed(server(4002, Transport::DTLS), None), Some(20_000));
    // Stream transports carry their own keepalives below the NAT; the server chooses.
    assert_eq!(proposed(tcp(), None), None);
    assert_eq!(proposed(server(4003, Transport::QUIC), None), None);
    // A configured interval is proposed on every transport.
    let five = Some(Duration::from_secs(5));
    assert_eq!(proposed(udp(), five), Some(5000));
    assert_eq!(proposed(tcp(), five), Some(5000));
}

#[test]
fn a_server_that_grants_no_interval_leaves_the_proposed_one() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.open();
    let seq = decode(&h.take_control()).header.sequence;
    let mut response = Message::new(MessageType::CONFIGURATION_RESPONSE, seq, TUNNEL);
    response.tlvs.result_code = Some(ResultCode::SUCCESS);
    response.tlvs.internal_ipv4 = Some(InternalAddress {
        addr: ADDR,
        prefix_len: 16,
    });
    h.deliver(&encode(&response));
    match h.take_events().as_slice() {
        [ClientEvent::Connected(info)] => {
            assert_eq!(info.keepalive_interval, NAT_KEEPALIVE_INTERVAL);
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    // An idle client keeps its mapping with a keepalive at that interval.
    h.advance(NAT_KEEPALIVE_INTERVAL);
    let keepalive = h.take_control();
    assert_eq!(
        decode(&keepalive).header.message_type,
        MessageType::KEEPALIVE
    );
}

#[test]
fn every_refused_send_is_counted_by_reason() {
    let mut config = ClientConfig::new(vec![udp()]);
    config.max_queued_packets = 2;
    let mut h = Harness::new(config);
    h.take_events();
    let packet = udp_packet(ADDR, PEER, b"media");
    assert_eq!(
        h.client.send_ip(h.now, &packet),
        Err(SendError::NotConnected)
    );
    assert_eq!(h.client.stats().send_refused_not_connected, 1);

    h.connect(30_000);
    let too_big = udp_packet(ADDR, PEER, &[0; 1400]);
    assert!(matches!(
        h.client.send_ip(h.now, &too_big),
        Err(SendError::TooLarge { .. })
    ));
    assert_eq!(h.client.stats().send_refused_too_large, 1);
    let spoofed = udp_packet(PEER, PEER, b"media");
    assert!(matches!(
        h.client.send_ip(h.now, &spoofed),
        Err(SendError::WrongSource(_))
    ));
    assert!(matches!(
        h.client.send_ip(h.now, b"not a packet"),
        Err(SendError::InvalidPacket(_))
    ));
    assert_eq!(h.client.stats().send_refused_invalid, 2);
    // Not drained: the queue of two fills.
    h.client.send_ip(h.now, &packet).expect("queued");
    h.client.send_ip(h.now, &packet).expect("queued");
    assert_eq!(h.client.send_ip(h.now, &packet), Err(SendError::QueueFull));
    assert_eq!(h.client.stats().send_queue_full, 1);
    h.drain();
    h.client.release(h.now);
    assert_eq!(h.client.send_ip(h.now, &packet), Err(SendError::Closed));
    assert_eq!(h.client.stats().send_refused_closed, 1);
}

#[test]
fn configuration_requests_are_counted_with_their_retransmissions() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.open();
    h.advance(ms(250 + 500 + 1000));
    assert_eq!(h.take_sent().len(), 4);
    assert_eq!(h.client.stats().configuration_requests_sent, 4);
    assert_eq!(h.client.stats().envelopes_received, 0);
}
