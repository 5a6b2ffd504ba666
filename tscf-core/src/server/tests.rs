//! Unit tests of the server host against scripted sockets and streams.

use super::*;
use crate::io::CloseReason;
use crate::stun::{decode_binding_response, encode_binding_request, TransactionId};
use crate::wire::{ControlKey, Envelope, Message, MessageType, ResultCode};

#[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
fn t0() -> Instant {
    Instant::now()
}

const CLIENT: &str = "198.51.100.7:40000";
const UDP_LISTENER: &str = "127.0.0.1:4440";

struct Harness {
    host: ServerHost,
    now: Instant,
    buf: Vec<u8>,
}

/// What the host wants done after an input.
#[derive(Debug, Default)]
struct Drained {
    datagrams: Vec<(SocketId, SocketAddr, Vec<u8>)>,
    quic: Vec<(StreamId, Vec<u8>)>,
    io: Vec<IoEvent>,
    director: Vec<DirectorEvent>,
    registry: Vec<(RequestId, RegistryRequest)>,
}

impl Harness {
    fn new(config: ServerConfig) -> Self {
        let local = LocalAddrs {
            udp: vec![UDP_LISTENER.parse().expect("addr")],
            tcp: vec!["127.0.0.1:4441".parse().expect("addr")],
            ..LocalAddrs::default()
        };
        let now = t0();
        Self {
            host: ServerHost::new(config, &local, None, now).expect("valid config"),
            now,
            buf: Vec::new(),
        }
    }

    fn drain(&mut self) -> Drained {
        let mut out = Drained::default();
        loop {
            while let Some(t) = self.host.poll_transmit(self.now, &mut self.buf) {
                match t {
                    Transmit::Datagram { socket, to } => {
                        out.datagrams.push((socket, to, self.buf.clone()));
                    }
                    Transmit::QuicDatagram { stream } => out.quic.push((stream, self.buf.clone())),
                    other => panic!("a server sends no {other:?}"),
                }
            }
            match self.host.poll_event() {
                Some(ServerEvent::Io(io)) => out.io.push(io),
                Some(ServerEvent::Director(event)) => out.director.push(event),
                Some(ServerEvent::Registry { id, request }) => out.registry.push((id, request)),
                None => return out,
            }
        }
    }

    fn input(&mut self, input: Input<'_>) -> Drained {
        self.host.handle_input(self.now, input);
        self.drain()
    }

    fn advance(&mut self, by: Duration) -> Drained {
        let until = self.now + by;
        let mut out = Drained::default();
        while let Some(at) = self.host.poll_timeout().filter(|at| *at <= until) {
            self.now = self.now.max(at);
            self.host.handle_timeout(self.now);
            let more = self.drain();
            out.datagrams.extend(more.datagrams);
            out.io.extend(more.io);
            out.director.extend(more.director);
        }
        self.now = until;
        out
    }

    /// Accepts and opens a stream of `transport`.
    fn open_stream(&mut self, transport: Transport) -> StreamId {
        let stream = self
            .host
            .accept_stream(self.now, transport, CLIENT.parse().expect("addr"))
            .expect("admitted");
        self.input(Input::StreamOpen {
            stream,
            verified_identity: false,
        });
        stream
    }
}

fn configuration_request(sequence: u32) -> Vec<u8> {
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, sequence, 0);
    request.tlvs.client_nonce = Some([sequence as u8; 16]);
    let mut bytes = Vec::new();
    request.encode_envelope(&mut bytes).expect("encodable");
    bytes
}

/// A keepalive for the tunnel a Configuration Response granted, signed as its client signs.
fn keepalive(response: &Message<'_>, sequence: u32) -> Vec<u8> {
    let key = ControlKey::new(&response.tlvs.control_key.expect("a fresh tunnel's key"));
    let mut bytes = Vec::new();
    Message::new(MessageType::KEEPALIVE, sequence, response.header.tunnel_id)
        .encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
        .expect("encodable");
    bytes
}

/// The control message in one envelope.
fn message(envelope: &[u8]) -> Message<'_> {
    let env = Envelope::decode_datagram(envelope).expect("an envelope");
    Message::decode(env.payload).expect("a message")
}

#[test]
fn a_udp_listener_answers_stun_maps_each_remote_to_a_connection_and_drops_noise() {
    let mut h = Harness::new(ServerConfig::default());
    let from: SocketAddr = CLIENT.parse().expect("addr");
    let mut request = Vec::new();
    encode_binding_request(TransactionId([7; 12]), &mut request);
    let out = h.input(Input::Datagram {
        socket: SocketId(0),
        from,
        data: &request,
    });
    assert_eq!(out.datagrams.len(), 1);
    let (socket, to, answer) = &out.datagrams[0];
    assert_eq!((*socket, *to), (SocketId(0), from));
    assert_eq!(decode_binding_response(answer).expect("STUN").mapped, from);

    let out = h.input(Input::Datagram {
        socket: SocketId(0),
        from,
        data: &configuration_request(1),
    });
    assert_eq!(out.datagrams.len(), 1, "the Configuration Response");
    assert_eq!(out.datagrams[0].1, from);
    let response = message(&out.datagrams[0].2);
    assert_eq!(response.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(h.host.stats().udp_connections, 1);

    for noise in [&[9u8, 1, 2][..], &[1, 2, 3], &[]] {
        let out = h.input(Input::Datagram {
            socket: SocketId(0),
            from,
            data: noise,
        });
        assert!(out.datagrams.is_empty());
    }
    let stats = h.host.stats();
    assert_eq!(stats.transport.stun_answered, 1);
    assert_eq!(stats.transport.udp_dropped, 3);
}

#[test]
fn a_stream_is_cut_into_envelopes_and_answered_through_its_output() {
    let mut h = Harness::new(ServerConfig::default());
    let stream = h.open_stream(Transport::TCP);
    let request = configuration_request(1);
    // Split over two reads: the host reassembles the envelope.
    let (a, b) = request.split_at(5);
    let out = h.input(Input::StreamData { stream, data: a });
    assert!(out.io.is_empty());
    let out = h.input(Input::StreamData { stream, data: b });
    assert_eq!(out.io, [IoEvent::StreamReady { stream }]);
    let mut written = Vec::new();
    assert!(h.host.take_output(h.now, stream, &mut written));
    let response = message(&written);
    assert_eq!(response.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert!(
        !h.host.take_output(h.now, stream, &mut written),
        "nothing more"
    );
    assert_eq!(h.host.stats().director.active_tunnels, 1);
    // The client goes away: the tunnel becomes persistent and the slot is free.
    h.input(Input::StreamClosed {
        stream,
        error: Some(StreamError::Io),
        detail: None,
    });
    let stats = h.host.stats();
    assert_eq!(stats.stream_connections, 0);
    assert_eq!(stats.director.persistent_tunnels, 1);
}

#[test]
fn lost_framing_aborts_the_stream_and_is_counted() {
    let mut h = Harness::new(ServerConfig::default());
    let stream = h.open_stream(Transport::TLS);
    let out = h.input(Input::StreamData {
        stream,
        data: &[5, 0, 1, 0],
    });
    assert_eq!(
        out.io,
        [IoEvent::CloseStream {
            stream,
            abort: true,
            reason: CloseReason::ProtocolError,
        }]
    );
    assert_eq!(h.host.stats().transport.framing_errors, 1);
    // What the stream carries after that is ignored.
    let out = h.input(Input::StreamData {
        stream,
        data: &configuration_request(1),
    });
    assert!(out.io.is_empty() && out.datagrams.is_empty());
    h.input(Input::StreamClosed {
        stream,
        error: None,
        detail: None,
    });
    assert_eq!(h.host.stats().stream_connections, 0);
}

#[test]
fn a_handshake_still_running_at_the_pending_timeout_is_cut() {
    let mut h = Harness::new(ServerConfig::default());
    let stream = h
        .host
        .accept_stream(h.now, Transport::TLS, CLIENT.parse().expect("addr"))
        .expect("admitted");
    let pending = h.host.director().config().pending_timeout;
    let out = h.advance(pending - Duration::from_millis(1));
    assert!(out.io.is_empty(), "not yet");
    let out = h.advance(Duration::from_millis(1));
    assert_eq!(
        out.io,
        [IoEvent::CloseStream {
            stream,
            abort: true,
            reason: CloseReason::Reclaimed,
        }]
    );
    h.input(Input::StreamClosed {
        stream,
        error: Some(StreamError::Handshake),
        detail: None,
    });
    let stats = h.host.stats();
    assert_eq!(stats.transport.tls_handshake_failures, 1);
    assert_eq!(stats.stream_connections, 0);
}

#[test]
fn a_writer_that_makes_no_progress_loses_its_slot() {
    let config = ServerConfig {
        stream_write_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let stream = h.open_stream(Transport::TCP);
    h.input(Input::StreamData {
        stream,
        data: &configuration_request(1),
    });
    let mut written = Vec::new();
    assert!(h.host.take_output(h.now, stream, &mut written));
    // The runtime never comes back: its write is blocked by a peer that does not read.
    let out = h.advance(Duration::from_millis(1999));
    assert!(out.io.is_empty());
    let out = h.advance(Duration::from_millis(1));
    assert_eq!(
        out.io,
        [IoEvent::CloseStream {
            stream,
            abort: true,
            reason: CloseReason::Reclaimed,
        }]
    );
    let stats = h.host.stats();
    assert_eq!(stats.transport.stream_write_timeouts, 1);
    assert_eq!(stats.director.persistent_tunnels, 1, "its tunnel waits");
}

#[test]
fn a_writer_that_keeps_writing_keeps_its_slot() {
    let config = ServerConfig {
        stream_write_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let stream = h.open_stream(Transport::TCP);
    let mut written = Vec::new();
    h.input(Input::StreamData {
        stream,
        data: &configuration_request(1),
    });
    assert!(h.host.take_output(h.now, stream, &mut written));
    let configured = written.clone();
    let response = message(&configured);
    assert!(!h.host.take_output(h.now, stream, &mut written));
    for sequence in 2..=5 {
        h.input(Input::StreamData {
            stream,
            data: &keepalive(&response, sequence),
        });
        assert!(h.host.take_output(h.now, stream, &mut written));
        let out = h.advance(Duration::from_millis(1500));
        assert!(out.io.is_empty(), "each write finishes in time");
        assert!(!h.host.take_output(h.now, stream, &mut written));
    }
    assert_eq!(h.host.stats().transport.stream_write_timeouts, 0);
}

#[test]
fn admission_stops_at_max_stream_connections_of_configured_tunnels() {
    let config = ServerConfig {
        max_stream_connections: 2,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let remote: SocketAddr = CLIENT.parse().expect("addr");
    let a = h.open_stream(Transport::TCP);
    let b = h.open_stream(Transport::TLS);
    for stream in [a, b] {
        h.input(Input::StreamData {
            stream,
            data: &configuration_request(1),
        });
    }
    assert_eq!(h.host.accept_stream(h.now, Transport::TCP, remote), None);
    assert_eq!(
        h.host.accept_quic(h.now, remote, true),
        QuicAdmission::Refuse
    );
    let stats = h.host.stats();
    assert_eq!(stats.transport.streams_refused, 2);
    assert_eq!(stats.stream_connections, 2);
    h.input(Input::StreamClosed {
        stream: a,
        error: None,
        detail: None,
    });
    assert!(h
        .host
        .accept_stream(h.now, Transport::TCP, remote)
        .is_some());
}

/// Unconfigured connections cannot lock a full server: a new one takes the slot of the
/// oldest, which is cut at once.
#[test]
fn a_full_server_evicts_its_oldest_unconfigured_connection() {
    let config = ServerConfig {
        max_stream_connections: 2,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let configured = h.open_stream(Transport::TCP);
    h.input(Input::StreamData {
        stream: configured,
        data: &configuration_request(1),
    });
    let idle = h.open_stream(Transport::TLS);
    let other: SocketAddr = "203.0.113.9:5000".parse().expect("addr");
    assert!(h.host.accept_stream(h.now, Transport::TCP, other).is_some());
    let out = h.drain();
    assert_eq!(
        out.io,
        [IoEvent::CloseStream {
            stream: idle,
            abort: true,
            reason: CloseReason::Reclaimed,
        }]
    );
    assert_eq!(h.host.stats().transport.streams_evicted, 1);
    // The configured one is never evicted.
    h.input(Input::StreamClosed {
        stream: idle,
        error: None,
        detail: None,
    });
    let third: SocketAddr = "203.0.113.10:5000".parse().expect("addr");
    assert!(h.host.accept_stream(h.now, Transport::TCP, third).is_some());
    assert_eq!(h.host.stats().transport.streams_evicted, 2);
    assert_eq!(h.host.stats().director.active_tunnels, 1);
}

/// One source holds a bounded number of unconfigured connections (IPv6: per /64); once one
/// is configured, the source may open another.
#[test]
fn one_source_holds_a_bounded_number_of_unconfigured_connections() {
    let config = ServerConfig {
        max_unconfigured_per_source: 2,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let first = h.open_stream(Transport::TCP);
    h.open_stream(Transport::TCP);
    let same: SocketAddr = "198.51.100.7:1".parse().expect("addr");
    assert_eq!(h.host.accept_stream(h.now, Transport::TCP, same), None);
    assert_eq!(h.host.accept_quic(h.now, same, true), QuicAdmission::Refuse);
    assert_eq!(h.host.stats().transport.streams_refused_per_source, 2);
    let v6: Vec<SocketAddr> = ["[2001:db8::1]:1", "[2001:db8::2]:1", "[2001:db8:0:1::1]:1"]
        .iter()
        .map(|a| a.parse().expect("addr"))
        .collect();
    assert!(h.host.accept_stream(h.now, Transport::TCP, v6[0]).is_some());
    assert!(h.host.accept_stream(h.now, Transport::TCP, v6[1]).is_some());
    assert_eq!(
        h.host.accept_stream(h.now, Transport::TCP, v6[0]),
        None,
        "same /64"
    );
    assert!(h.host.accept_stream(h.now, Transport::TCP, v6[2]).is_some());

    h.input(Input::StreamData {
        stream: first,
        data: &configuration_request(1),
    });
    assert!(h.host.accept_stream(h.now, Transport::TCP, same).is_some());
}

#[test]
fn quic_clients_must_prove_their_address_past_the_retry_threshold() {
    let config = ServerConfig {
        quic_retry_above: 1,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let remote: SocketAddr = CLIENT.parse().expect("addr");
    let QuicAdmission::Accept(first) = h.host.accept_quic(h.now, remote, false) else {
        panic!("the first handshake needs no Retry");
    };
    assert_eq!(
        h.host.accept_quic(h.now, remote, false),
        QuicAdmission::Retry
    );
    assert!(matches!(
        h.host.accept_quic(h.now, remote, true),
        QuicAdmission::Accept(_)
    ));
    assert_eq!(h.host.stats().transport.quic_retries, 1);
    // Once the first handshake is done, a new client needs no Retry again... after the
    // second one finishes too.
    h.input(Input::StreamOpen {
        stream: first,
        verified_identity: false,
    });
    assert_eq!(
        h.host.accept_quic(h.now, remote, false),
        QuicAdmission::Retry
    );
}

#[test]
fn quic_data_envelopes_go_as_datagrams_and_control_on_the_stream() {
    let mut h = Harness::new(ServerConfig::default());
    let a = h.open_stream(Transport::QUIC);
    let b = h.open_stream(Transport::QUIC);
    let mut written = Vec::new();
    let mut addresses = Vec::new();
    for stream in [a, b] {
        let out = h.input(Input::StreamData {
            stream,
            data: &configuration_request(1),
        });
        assert_eq!(out.io, [IoEvent::StreamReady { stream }]);
        assert!(h.host.take_output(h.now, stream, &mut written));
        addresses.push(message(&written).tlvs.internal_ipv4.expect("IPv4").addr);
    }
    // A data envelope from a to b, sent as a QUIC datagram.
    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(addresses[0].octets(), addresses[1].octets(), 64)
        .udp(5004, 5004)
        .write(&mut packet, b"rtp")
        .expect("a packet");
    let mut envelope = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &packet, &mut envelope).expect("fits");
    let out = h.input(Input::StreamDatagram {
        stream: a,
        data: &envelope,
    });
    assert_eq!(out.quic, [(b, envelope.clone())]);
    assert!(out.io.is_empty(), "nothing on the stream");
    let stats = h.host.stats().transport;
    assert_eq!(
        (stats.quic_datagrams_received, stats.quic_datagrams_sent),
        (1, 1)
    );
    // Too large for a datagram now: queued on b's stream, within its bound.
    assert!(
        !h.host.take_output(h.now, b, &mut written),
        "b's last write is done"
    );
    let out = h.input(Input::QuicFallback {
        stream: b,
        envelope: &envelope,
    });
    assert_eq!(h.host.stats().transport.quic_datagrams_sent, 0);
    assert_eq!(out.io, [IoEvent::StreamReady { stream: b }]);
    written.clear();
    assert!(h.host.take_output(h.now, b, &mut written));
    assert_eq!(written, envelope);
}

#[test]
fn a_connection_the_director_closes_writes_its_last_envelopes_then_closes() {
    let config = ServerConfig {
        close_grace: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let stream = h.open_stream(Transport::TCP);
    h.input(Input::StreamData {
        stream,
        data: &configuration_request(1),
    });
    let mut written = Vec::new();
    assert!(h.host.take_output(h.now, stream, &mut written));
    assert!(!h.host.take_output(h.now, stream, &mut written));
    h.host.shutdown(h.now);
    let out = h.drain();
    // The release notification is queued before the close, so the writer sends it first.
    assert_eq!(
        out.io,
        [
            IoEvent::StreamReady { stream },
            IoEvent::CloseStream {
                stream,
                abort: false,
                reason: CloseReason::Shutdown,
            }
        ]
    );
    assert!(h.host.take_output(h.now, stream, &mut written));
    assert_eq!(
        message(&written).header.message_type,
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION
    );
    assert!(h
        .host
        .accept_stream(h.now, Transport::TCP, CLIENT.parse().expect("addr"))
        .is_none());
    // The peer never lets the connection close: it is cut after the grace period.
    let out = h.advance(Duration::from_secs(1));
    assert_eq!(
        out.io,
        [IoEvent::CloseStream {
            stream,
            abort: true,
            reason: CloseReason::Reclaimed,
        }]
    );
    assert_eq!(h.host.stats().transport.stream_close_timeouts, 1);
    h.input(Input::StreamClosed {
        stream,
        error: None,
        detail: None,
    });
    assert_eq!(h.host.stats().stream_connections, 0);
    let out = h.advance(Duration::from_secs(5));
    assert!(
        out.io.is_empty(),
        "a closed stream has no more timers to act on"
    );
}

#[test]
fn a_shutdown_retransmits_release_notifications_on_udp_until_acknowledged() {
    let mut h = Harness::new(ServerConfig::default());
    fn udp(data: &[u8]) -> Input<'_> {
        Input::Datagram {
            socket: SocketId(0),
            from: CLIENT.parse().expect("addr"),
            data,
        }
    }
    let request = configuration_request(1);
    let out = h.input(udp(&request));
    let response = out.datagrams[0].2.clone();
    let response = message(&response);
    let key = ControlKey::new(&response.tlvs.control_key.expect("a key"));
    assert!(!h.host.is_drained(), "still running");

    h.host.shutdown(h.now);
    let first = h.drain().datagrams;
    assert_eq!(first.len(), 1);
    let note = message(&first[0].2);
    assert_eq!(
        note.header.message_type,
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION
    );
    assert_eq!(note.tlvs.result_code, Some(ResultCode::SHUTDOWN));
    assert!(!h.host.is_drained(), "the notification is not acknowledged");
    // The first is lost: the same notification again after 250 ms.
    let again = h.advance(Duration::from_millis(250)).datagrams;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].2, first[0].2);
    assert_eq!(h.host.director().notifications_outstanding(), 1);

    let mut ack = Vec::new();
    let answer = Message::response_to(&note.header, ResultCode::SUCCESS);
    answer
        .encode_envelope_with_integrity(&key.client_to_director(), &mut ack)
        .expect("encodable");
    let out = h.input(udp(&ack));
    assert!(out.datagrams.is_empty());
    assert!(h.host.is_drained(), "acknowledged: the runtime may stop");
    assert_eq!(h.host.stats().udp_connections, 0);
    assert!(h.advance(Duration::from_secs(20)).datagrams.is_empty());
    assert_eq!(h.host.shutdown_grace(), Duration::from_secs(2));
}

#[test]
fn an_unacknowledged_release_notification_is_given_up_after_its_last_transmission() {
    let mut h = Harness::new(ServerConfig::default());
    let from: SocketAddr = CLIENT.parse().expect("addr");
    h.input(Input::Datagram {
        socket: SocketId(0),
        from,
        data: &configuration_request(1),
    });
    h.host.shutdown(h.now);
    let mut sent = h.drain().datagrams.len();
    while !h.host.is_drained() {
        sent += h.advance(Duration::from_millis(250)).datagrams.len();
    }
    // Seven transmissions (§6.3), then the connection is forgotten.
    assert_eq!(sent, 7);
    assert_eq!(h.host.director().notifications_outstanding(), 0);
    assert_eq!(h.host.stats().udp_connections, 0);
}

#[test]
fn answers_a_full_stream_queue_drops_are_counted_as_undelivered_not_answered() {
    let mut h = Harness::new(ServerConfig {
        stream_queue_bytes: 16 * 1024,
        ..ServerConfig::default()
    });
    let stream = h.open_stream(Transport::TCP);
    h.input(Input::StreamData {
        stream,
        data: &configuration_request(1),
    });
    let mut written = Vec::new();
    assert!(h.host.take_output(h.now, stream, &mut written));
    let answered_before = h.host.stats().director.control_answered;
    // 5,000 keepalives in one write of the client, read in the runtime's 16 KiB pieces, while
    // the writer is stalled.
    let mut pipelined = Vec::new();
    {
        let response = message(&written);
        for sequence in 2..5002 {
            pipelined.extend(keepalive(&response, sequence));
        }
    }
    for piece in pipelined.chunks(16 * 1024) {
        h.input(Input::StreamData {
            stream,
            data: piece,
        });
    }
    let mut delivered = 0;
    while h.host.take_output(h.now, stream, &mut written) {
        let mut rest = &written[..];
        while let Some(len) = rest.get(1..3).map(|l| u16::from_be_bytes([l[0], l[1]])) {
            let answer = message(&rest[..usize::from(len)]);
            assert_eq!(answer.header.message_type, MessageType::KEEPALIVE_RESPONSE);
            rest = &rest[usize::from(len)..];
            delivered += 1;
        }
    }
    let stats = h.host.stats();
    let d = &stats.director;
    assert!(delivered < 5000, "the queue bound dropped some");
    assert_eq!(d.control_answered - answered_before, delivered);
    assert_eq!(d.answers_undelivered, 5000 - delivered);
    assert_eq!(stats.transport.stream_queue_full, 5000 - delivered);
}

#[test]
fn a_full_stream_queue_drops_and_counts_envelopes() {
    let config = ServerConfig {
        stream_queue_bytes: 300,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let stream = h.open_stream(Transport::TCP);
    // Keepalives pipelined in one read: each answer is a short envelope.
    let mut reads = Vec::new();
    reads.extend(configuration_request(1));
    let out = h.input(Input::StreamData {
        stream,
        data: &reads,
    });
    assert_eq!(out.io.len(), 1);
    let mut written = Vec::new();
    assert!(h.host.take_output(h.now, stream, &mut written));
    let configured = written.clone();
    let response = message(&configured);
    let mut keepalives = Vec::new();
    for sequence in 2..40 {
        keepalives.extend(keepalive(&response, sequence));
    }
    h.input(Input::StreamData {
        stream,
        data: &keepalives,
    });
    let queued = {
        let mut all = Vec::new();
        assert!(h.host.take_output(h.now, stream, &mut all) || all.is_empty());
        all.len()
    };
    assert!(queued <= 300, "{queued} octets queued");
    assert!(h.host.stats().transport.stream_queue_full > 0);
}

/// What a capture sink was shown: (inner packet or envelope, direction, transport, local,
/// remote, bytes); packets have no transport or addresses.
type Shown = Vec<(
    bool,
    Direction,
    Option<Transport>,
    Option<SocketAddr>,
    Option<SocketAddr>,
    Vec<u8>,
)>;

#[derive(Default)]
struct Recorder(std::sync::Mutex<Shown>);

impl crate::io::CaptureSink for Recorder {
    fn inner_packet(&self, _: Instant, direction: Direction, packet: &[u8]) {
        let mut shown = self.0.lock().expect("not poisoned");
        shown.push((true, direction, None, None, None, packet.to_vec()));
    }

    fn envelope(&self, _: Instant, e: &CapturedEnvelope<'_>) {
        let mut shown = self.0.lock().expect("not poisoned");
        let record = (
            false,
            e.direction,
            Some(e.transport),
            e.local,
            Some(e.remote),
        );
        shown.push((
            record.0,
            record.1,
            record.2,
            record.3,
            record.4,
            e.envelope.to_vec(),
        ));
    }
}

#[test]
fn a_capture_sees_envelopes_both_ways_and_each_relayed_packet_once() {
    let recorder = std::sync::Arc::new(Recorder::default());
    let config = ServerConfig {
        capture: Some(Capture(recorder.clone())),
        ..ServerConfig::default()
    };
    let mut h = Harness::new(config);
    let udp_client: SocketAddr = CLIENT.parse().expect("addr");
    let listener: SocketAddr = UDP_LISTENER.parse().expect("addr");
    // One tunnel over UDP, one over TCP.
    let request = configuration_request(1);
    let out = h.input(Input::Datagram {
        socket: SocketId(0),
        from: udp_client,
        data: &request,
    });
    let response = out.datagrams[0].2.clone();
    let a = message(&response).tlvs.internal_ipv4.expect("IPv4").addr;
    let stream = h.open_stream(Transport::TCP);
    h.input(Input::StreamData {
        stream,
        data: &configuration_request(1),
    });
    let mut written = Vec::new();
    assert!(h.host.take_output(h.now, stream, &mut written));
    let b = message(&written).tlvs.internal_ipv4.expect("IPv4").addr;
    {
        let shown = recorder.0.lock().expect("not poisoned");
        let udp = (Some(Transport::UDP), Some(listener), Some(udp_client));
        assert_eq!(
            shown[0],
            (
                false,
                Direction::Received,
                udp.0,
                udp.1,
                udp.2,
                request.clone()
            )
        );
        assert_eq!(
            shown[1],
            (false, Direction::Sent, udp.0, udp.1, udp.2, response)
        );
        // A stream's local address is the runtime's to know.
        let tcp = (Some(Transport::TCP), None, Some(udp_client));
        assert_eq!(
            shown[2],
            (false, Direction::Received, tcp.0, tcp.1, tcp.2, request)
        );
        assert_eq!(
            shown[3],
            (false, Direction::Sent, tcp.0, tcp.1, tcp.2, written.clone())
        );
        assert_eq!(shown.len(), 4, "{shown:?}");
    }
    // A packet from the UDP tunnel to the TCP one: the envelope in, the envelope out, and the
    // inner packet once.
    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(a.octets(), b.octets(), 64)
        .udp(5004, 5004)
        .write(&mut packet, b"rtp")
        .expect("a packet");
    let mut envelope = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &packet, &mut envelope).expect("fits");
    h.input(Input::Datagram {
        socket: SocketId(0),
        from: udp_client,
        data: &envelope,
    });
    let shown = recorder.0.lock().expect("not poisoned");
    let relayed: Vec<_> = shown[4..].iter().map(|s| (s.0, s.1, s.2, &s.5)).collect();
    assert_eq!(
        relayed,
        [
            (false, Direction::Received, Some(Transport::UDP), &envelope),
            (false, Direction::Sent, Some(Transport::TCP), &envelope),
            (true, Direction::Sent, None, &packet),
        ]
    );
}

// ---- cluster ----

mod cluster {
    use super::*;
    use crate::cluster::{ClusterConfig, MeshMessage};
    use crate::tls::{self, Fingerprint};

    fn clustered() -> ServerConfig {
        let name = DirectorName::new("dir-a").expect("a name");
        let mesh = "127.0.0.1:4450".parse().expect("addr");
        let director = crate::director::DirectorConfig {
            cluster: Some(ClusterConfig::new(name, [7; 32], mesh)),
            ..crate::director::DirectorConfig::default()
        };
        let config = tls::pinned_client_config(Fingerprint::of(b"a director")).expect("config");
        let name = rustls::pki_types::ServerName::try_from("unused").expect("a name");
        ServerConfig {
            director,
            keep_seed: true,
            mesh: vec![mesh],
            mesh_client: Some(ClientTls { config, name }),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn registry_requests_leave_as_events_and_mesh_links_are_dialed_and_accepted() {
        let mut h = Harness::new(clustered());
        let out = h.drain();
        let (id, request) = out.registry.first().cloned().expect("a heartbeat");
        assert!(matches!(request, RegistryRequest::Heartbeat { .. }));
        let other = DirectorName::new("dir-b").expect("a name");
        let other_mesh: SocketAddr = "192.0.2.2:4450".parse().expect("addr");
        let me = DirectorName::new("dir-a").expect("a name");
        let members = vec![
            (me, "127.0.0.1:4450".parse().expect("addr")),
            (other.clone(), other_mesh),
        ];
        h.host
            .handle_registry(h.now, id, RegistryResponse::Directors(members));
        let out = h.drain();
        assert!(out
            .director
            .iter()
            .any(|e| matches!(e, DirectorEvent::DialMesh { name, .. } if *name == other)));
        let Some(IoEvent::Connect(connect)) = out.io.first().cloned() else {
            panic!("a connect, not {:?}", out.io);
        };
        assert_eq!(connect.to, other_mesh);
        let Security::Tls(tls) = &connect.security else {
            panic!("a TLS link");
        };
        assert_eq!(
            tls.name,
            rustls::pki_types::ServerName::try_from("dir-b").expect("a name")
        );
        let out = h.input(Input::StreamOpen {
            stream: connect.stream,
            verified_identity: true,
        });
        assert!(out
            .io
            .iter()
            .any(|e| matches!(e, IoEvent::StreamReady { stream } if *stream == connect.stream)));
        assert_eq!(h.host.stats().director.cluster.mesh_links, 1);
        assert_eq!(h.host.stats().director.pending_connections, 0);

        // Accepted: named by its Hello, not a pending client connection.
        let remote = "192.0.2.3:50000".parse().expect("addr");
        let stream = h.host.accept_mesh(h.now, remote).expect("admitted");
        h.input(Input::StreamOpen {
            stream,
            verified_identity: true,
        });
        let mut hello = Vec::new();
        MeshMessage::Hello(DirectorName::new("dir-0").expect("a name"))
            .encode_envelope(&mut hello)
            .expect("fits");
        h.input(Input::StreamData {
            stream,
            data: &hello,
        });
        assert_eq!(h.host.stats().director.cluster.mesh_links, 2);
        assert_eq!(h.host.stats().director.pending_connections, 0);
        // The pending timeout does not close it.
        let out = h.advance(Duration::from_secs(30));
        assert!(!out
            .io
            .iter()
            .any(|e| matches!(e, IoEvent::CloseStream { stream: s, .. } if *s == stream)));
    }
}
