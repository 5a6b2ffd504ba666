//! The tunnel's life cycle on a live server (`docs/PROTOCOL.md` §3.5): the director's own
//! keepalives, and a shutdown that retransmits its release notifications on UDP.

use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use tscf_core::wire::{ControlKey, Envelope, Message, MessageType, ResultCode, Transport};
use tscf_runtime_std::Notification;

use crate::util::{server, tunnel_config, wait_for};

/// A client that only sends (media to a receiver that never answers) hears the director's
/// keepalives and answers them: over many intervals (200 ms here) it never loses its
/// transport. On UDP its own roaming probe is off, so that only the director's keepalives
/// can keep it.
#[test]
fn a_send_only_client_keeps_its_transport_through_the_directors_keepalives() {
    let server = server(|c| c.director.keepalive.min = Duration::from_millis(100));
    for transport in [Transport::TCP, Transport::UDP] {
        let config = || {
            let mut c = tunnel_config(&server, transport);
            c.client.keepalive_interval = Some(Duration::from_millis(200));
            c.client.roaming_probe_after = None;
            c
        };
        let sender = tscf_runtime_std::Tunnel::connect(config()).unwrap();
        let receiver = tscf_runtime_std::Tunnel::connect(config()).unwrap();
        let socket = sender.bind(0).unwrap();
        let to = SocketAddr::new(receiver.internal_ipv4().unwrap().into(), 5004);
        let before = server.stats().director.keepalives_sent;
        // Fifteen intervals of the director's keepalives (one per interval to the sender).
        wait_for(
            "the director kept the sender alive for 15 intervals",
            || {
                socket.send_to(b"media", to).unwrap();
                thread::sleep(Duration::from_millis(20));
                server.stats().director.keepalives_sent >= before + 15
            },
        );
        let stats = sender.stats().client;
        assert_eq!(
            (stats.transports_lost, stats.reattaches),
            (0, 0),
            "{transport}"
        );
        let notes: Vec<Notification> = sender.notifications().try_iter().collect();
        assert!(
            !notes
                .iter()
                .any(|n| matches!(n, Notification::TransportLost)),
            "{transport}: {notes:?}"
        );
    }
    assert_eq!(server.stats().director.reattaches, 0);
}

/// Shut down, the server sends a UDP client a Release Notification and retransmits it while
/// unacknowledged (the client here loses the first); once acknowledged the shutdown returns,
/// well before its grace of a minute.
#[test]
fn shutdown_retransmits_a_lost_release_notification_until_acknowledged() {
    let server = server(|c| c.shutdown_grace = Duration::from_secs(60));
    let udp = server.local_addrs().udp[0];
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let receive = || {
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    };
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    request.tlvs.client_nonce = Some([7; 16]);
    let mut bytes = Vec::new();
    request.encode_envelope(&mut bytes).unwrap();
    socket.send_to(&bytes, udp).unwrap();
    let response = receive();
    let response = Message::decode(Envelope::decode_datagram(&response).unwrap().payload).unwrap();
    let key = ControlKey::new(&response.tlvs.control_key.unwrap());

    let stopping = thread::spawn(move || server.shutdown());
    let first = receive();
    let again = receive();
    assert_eq!(first, again, "the same notification, retransmitted");
    let note = Message::decode(Envelope::decode_datagram(&again).unwrap().payload).unwrap();
    assert_eq!(
        note.header.message_type,
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION
    );
    assert_eq!(note.tlvs.result_code, Some(ResultCode::SHUTDOWN));
    let mut ack = Vec::new();
    Message::response_to(&note.header, ResultCode::SUCCESS)
        .encode_envelope_with_integrity(&key.client_to_director(), &mut ack)
        .unwrap();
    socket.send_to(&ack, udp).unwrap();
    wait_for("the shutdown returns once acknowledged", || {
        stopping.is_finished()
    });
    stopping.join().unwrap();
}
