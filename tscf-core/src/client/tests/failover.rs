//! Failing over between servers on a datagram transport when the tunnel's server goes silent.

use super::*;

fn a() -> ServerEndpoint {
    server(1, Transport::UDP)
}

fn b() -> ServerEndpoint {
    server(2, Transport::UDP)
}

/// A client connected at time 0 over UDP to the first of `servers`, which is silent from then
/// on, sends a packet every 100 ms. Every transport it asks for opens at once; its re-attach
/// request is answered with success when `answers(server, time)` says so. Returns the events
/// with their times, up to `Reattached` or `limit`, and the times of the control messages
/// sent after the connection.
fn silent_home(
    servers: Vec<ServerEndpoint>,
    answers: &dyn Fn(ServerEndpoint, Duration) -> bool,
    limit: Duration,
) -> (Harness, Vec<(Duration, ClientEvent)>, Vec<Duration>) {
    let mut h = Harness::with_servers(servers);
    h.take_events();
    h.connect(30_000);
    h.take_sent();
    let packet = udp_packet(ADDR, PEER, b"media");
    let mut events = Vec::new();
    let mut control = Vec::new();
    let mut server = h.client.config().servers[0];
    while h.now - h.start < limit {
        h.advance(ms(1));
        let at = h.now - h.start;
        if at.as_millis().is_multiple_of(100) {
            h.client.send_ip(h.now, &packet).expect("queued");
            h.drain();
        }
        loop {
            let (new_events, sent) = (h.take_events(), h.take_sent_with_times());
            if new_events.is_empty() && sent.is_empty() {
                break;
            }
            for event in new_events {
                let open = match event {
                    ClientEvent::OpenTransport { server: s } => Some(s),
                    _ => None,
                };
                let done = matches!(event, ClientEvent::Reattached(_));
                events.push((at, event));
                if done {
                    return (h, events, control);
                }
                if let Some(s) = open {
                    server = s;
                    h.open();
                }
            }
            for (t, bytes) in sent {
                let is_control = Envelope::decode_datagram(&bytes)
                    .is_ok_and(|e| e.kind == EnvelopeType::CONTROL);
                if !is_control {
                    continue;
                }
                control.push(t);
                let msg = decode(&bytes);
                if msg.header.message_type == MessageType::CONFIGURATION_REQUEST
                    && answers(server, at)
                {
                    let seq = msg.header.sequence;
                    h.deliver(&config_response(seq, TUNNEL, ADDR, 30_000));
                }
            }
        }
    }
    (h, events, control)
}

impl Harness {
    fn take_sent_with_times(&mut self) -> Vec<(Duration, Vec<u8>)> {
        self.sent.drain(..).collect()
    }
}

#[test]
fn with_two_servers_a_silent_home_is_left_for_the_other_within_two_short_series() {
    let (h, events, control) = silent_home(vec![a(), b()], &|s, _| s == b(), ms(60_000));
    // The roaming probe goes out with the first packet 500 ms into the silence and gets three
    // transmissions (250, 500 and 1000 ms apart): lost at 2.25 s. One attempt at home, three
    // transmissions again: failed at 4 s, and B is tried at once.
    let times: Vec<u64> = control.iter().map(|t| t.as_millis() as u64).collect();
    assert_eq!(times, [500, 750, 1250, 2250, 2500, 3000, 4000]);
    let kinds: Vec<(u64, ClientEvent)> = events
        .iter()
        .map(|(t, e)| (t.as_millis() as u64, e.clone()))
        .collect();
    assert_eq!(
        kinds[..6],
        [
            (2250, ClientEvent::TransportLost),
            (2250, ClientEvent::CloseTransport),
            (2250, ClientEvent::OpenTransport { server: a() }),
            (
                4000,
                ClientEvent::ConnectFailed {
                    server: a(),
                    result: None
                }
            ),
            (4000, ClientEvent::CloseTransport),
            (4000, ClientEvent::OpenTransport { server: b() }),
        ]
    );
    assert!(matches!(
        &kinds[6..],
        [(4000, ClientEvent::Reattached(info))] if info.tunnel_id == TUNNEL && info.server == b()
    ));
    assert_eq!(h.client.state(), ClientState::Connected);
    assert_eq!(h.client.tunnel_id(), Some(TUNNEL));
    // The 22 packets of the first 2.2 s went to A; the 18 queued while re-attaching go to B.
    assert_eq!(h.client.queued_packets(), 0);
    assert_eq!(h.client.stats().data_sent, 40);
}

#[test]
fn with_one_server_a_silent_home_gets_full_series_and_a_second_attempt() {
    let (h, events, control) = silent_home(vec![a()], &|_, at| at >= ms(32_000), ms(60_000));
    // Seven transmissions of the probe (lost at 16.25 s), seven of the re-attach (failed at
    // 32 s), then the same server again after the backoff.
    let times: Vec<u64> = control.iter().map(|t| t.as_millis() as u64).collect();
    let series = [0, 250, 750, 1750, 3750, 7750, 11_750];
    let expected: Vec<u64> = series
        .iter()
        .map(|t| 500 + t)
        .chain(series.iter().map(|t| 16_250 + t))
        .chain([32_100])
        .collect();
    assert_eq!(times, expected);
    let kinds: Vec<(u64, ClientEvent)> = events
        .iter()
        .map(|(t, e)| (t.as_millis() as u64, e.clone()))
        .collect();
    assert_eq!(
        kinds[..5],
        [
            (16_250, ClientEvent::TransportLost),
            (16_250, ClientEvent::CloseTransport),
            (16_250, ClientEvent::OpenTransport { server: a() }),
            (
                32_000,
                ClientEvent::ConnectFailed {
                    server: a(),
                    result: None
                }
            ),
            (32_000, ClientEvent::CloseTransport),
        ]
    );
    assert_eq!(
        kinds[5],
        (32_100, ClientEvent::OpenTransport { server: a() })
    );
    assert!(matches!(
        &kinds[6..],
        [(32_100, ClientEvent::Reattached(info))] if info.server == a()
    ));
    assert_eq!(h.client.tunnel_id(), Some(TUNNEL));
}

#[test]
fn with_two_servers_a_home_that_answers_again_keeps_the_tunnel() {
    let (h, events, _) = silent_home(vec![a(), b()], &|s, _| s == a(), ms(60_000));
    let kinds: Vec<(u64, ClientEvent)> = events
        .iter()
        .map(|(t, e)| (t.as_millis() as u64, e.clone()))
        .collect();
    assert_eq!(
        kinds[..3],
        [
            (2250, ClientEvent::TransportLost),
            (2250, ClientEvent::CloseTransport),
            (2250, ClientEvent::OpenTransport { server: a() }),
        ]
    );
    assert!(matches!(
        &kinds[3..],
        [(2250, ClientEvent::Reattached(info))] if info.server == a() && info.tunnel_id == TUNNEL
    ));
    assert_eq!(h.client.stats().reattaches, 1);
}

#[test]
fn with_two_servers_a_fresh_tunnel_still_gets_the_full_series() {
    let mut h = Harness::with_servers(vec![a(), b()]);
    h.take_events();
    h.open();
    h.advance(ms(15_749));
    let times: Vec<u64> = h.sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    assert_eq!(times, [0, 250, 750, 1750, 3750, 7750, 11_750]);
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: a(),
                result: None
            },
            ClientEvent::CloseTransport,
            ClientEvent::OpenTransport { server: b() },
        ]
    );
}

#[test]
fn failover_transmissions_is_bounded() {
    let mut config = ClientConfig::new(vec![a(), b()]);
    config.failover_transmissions = 0;
    assert_eq!(
        TunnelClient::new(config.clone(), base()).err(),
        Some(ConfigError::FailoverTransmissions(0))
    );
    config.failover_transmissions = ClientConfig::MAX_TRANSMISSIONS_LIMIT + 1;
    assert_eq!(
        TunnelClient::new(config, base()).err(),
        Some(ConfigError::FailoverTransmissions(17))
    );
}

#[test]
fn a_dtls_client_probes_a_silent_server_only_with_others_to_fail_over_to() {
    let dtls = |port| server(port, Transport::DTLS);
    for (servers, probes) in [(vec![dtls(1)], 0), (vec![dtls(1), dtls(2)], 1)] {
        let mut h = Harness::with_servers(servers);
        h.take_events();
        h.connect(30_000);
        let packet = udp_packet(ADDR, PEER, b"media");
        h.advance(ms(500));
        h.client.send_ip(h.now, &packet).expect("queued");
        h.drain();
        let sent = h.take_sent();
        assert_eq!(sent.len(), 1 + probes as usize);
        if probes == 1 {
            assert_eq!(decode(&sent[0]).header.message_type, MessageType::KEEPALIVE);
        }
        assert_eq!(sent.last(), Some(&data_envelope(&packet)));
        assert_eq!(h.client.stats().roaming_probes, probes);
    }
}
