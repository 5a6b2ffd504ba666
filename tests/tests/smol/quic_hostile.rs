//! Hostile input on the QUIC listener: UDP noise and forged long-header packets, a wrong ALPN,
//! a connection that never configures, and garbage on the control stream. Each is dropped or
//! closed and counted; a QUIC tunnel next to them keeps relaying. Also mutual TLS over QUIC,
//! and a client without QUIC datagram support, whose data goes on the stream.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tscf_core::client::TerminateReason;
use tscf_core::wire::{ControlKey, Message, MessageType, Transport};
use tscf_runtime_smol::tls::{self, ClientTlsConfig, ServerVerification};
use tscf_runtime_smol::{
    ConnectError, Server, ServerHandle, ServerIdentity, ServerTlsConfig, Tunnel,
};

use crate::bad_input::{eventually, hostile_server};
use crate::pki::pki;
use crate::util::{config_for, server_config, smol_flow, smol_tunnel, tunnel_config};

/// A raw quinn client endpoint that pins `server`'s certificate and speaks `alpn`.
fn raw_client(server: &ServerHandle, alpn: &[u8]) -> (quinn::Endpoint, quinn::ClientConfig) {
    let pinned = ClientTlsConfig::pinned(server.tls_fingerprint().unwrap());
    let mut rustls_config = (*tls::client_config(&pinned, tscf_runtime_smol::OS).unwrap()).clone();
    rustls_config.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_config).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

fn quic_addr(server: &ServerHandle) -> SocketAddr {
    server.local_addrs().quic[0]
}

/// The application error code a connection was closed with by the other side.
fn application_code(reason: &quinn::ConnectionError) -> Option<u64> {
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

/// A server that shuts down closes its QUIC connections with the shutdown code (2), and a
/// tunnel released in order is closed with code 0.
#[test]
fn quic_close_codes_tell_a_release_from_a_shutdown() {
    let server = hostile_server();
    smol::block_on(async {
        let (endpoint, client) = raw_client(&server, b"tscf");
        let released = endpoint
            .connect_with(client.clone(), quic_addr(&server), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = released.open_bi().await.unwrap();
        let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        request.tlvs.client_nonce = Some([3; 16]);
        let mut bytes = Vec::new();
        request.encode_envelope(&mut bytes).unwrap();
        send.write_all(&bytes).await.unwrap();
        let mut header = [0u8; 3];
        recv.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; usize::from(u16::from_be_bytes([header[1], header[2]])) - 3];
        recv.read_exact(&mut body).await.unwrap();
        let response = Message::decode(&body).unwrap();
        let key = ControlKey::new(&response.tlvs.control_key.unwrap());
        let release = Message::new(
            MessageType::CONFIGURATION_RELEASE_REQUEST,
            2,
            response.header.tunnel_id,
        );
        let mut bytes = Vec::new();
        release
            .encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
            .unwrap();
        send.write_all(&bytes).await.unwrap();
        let reason = released.closed().await;
        assert_eq!(application_code(&reason), Some(0), "{reason}");

        let waiting = endpoint
            .connect_with(client, quic_addr(&server), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = waiting.open_bi().await.unwrap();
        send.write_all(&[]).await.unwrap();
        let closed = smol::spawn(async move { waiting.closed().await });
        server.shutdown().await;
        let reason = closed.await;
        assert_eq!(application_code(&reason), Some(2), "{reason}");
    });
}

#[test]
fn noise_forged_packets_wrong_alpn_idle_and_garbage_streams_leave_a_tunnel_working() {
    let server = hostile_server();
    let addrs = server.local_addrs().clone();
    let config = tunnel_config(&addrs, server.tls_fingerprint(), Transport::QUIC);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;

        // Noise from 64 source ports: short datagrams, QUIC long headers with absurd
        // lengths, an Initial with a random connection id and no valid protection.
        let mut forged = vec![0xc0, 0, 0, 0, 1, 20];
        forged.extend_from_slice(&[0x5a; 20]);
        forged.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x44, 0xd0]);
        forged.resize(1200, 0x33);
        for i in 0..64u8 {
            let noise = UdpSocket::bind("127.0.0.1:0").unwrap();
            noise.send_to(&[i], quic_addr(&server)).unwrap();
            noise.send_to(&[0xff; 1300], quic_addr(&server)).unwrap();
            noise.send_to(&forged, quic_addr(&server)).unwrap();
            noise.send_to(&forged[..40], quic_addr(&server)).unwrap();
        }

        // A TLS handshake that offers another application protocol.
        let (endpoint, client) = raw_client(&server, b"h3");
        let refused = endpoint
            .connect_with(client, quic_addr(&server), "127.0.0.1")
            .unwrap()
            .await;
        assert!(refused.is_err(), "a wrong ALPN is refused");

        // A connection that never sends a Configuration Request is closed at the pending
        // timeout.
        let (endpoint, client) = raw_client(&server, b"tscf");
        let idle = endpoint
            .connect_with(client.clone(), quic_addr(&server), "127.0.0.1")
            .unwrap()
            .await
            .expect("the handshake itself succeeds");
        let started = Instant::now();
        let reason = idle.closed().await;
        assert_eq!(
            application_code(&reason),
            Some(3),
            "the server reclaimed it, not an idle timeout: {reason}"
        );
        println!(
            "idle QUIC connection closed after {:?}: {reason}",
            started.elapsed()
        );

        // Garbage on the control stream loses framing: the connection is closed.
        let garbage = endpoint
            .connect_with(client, quic_addr(&server), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = garbage.open_bi().await.unwrap();
        send.write_all(&[5, 0, 1, 9, 9, 9, 9, 9]).await.unwrap();
        let reason = garbage.closed().await;
        assert_eq!(
            application_code(&reason),
            Some(1),
            "the server closed it for a protocol error: {reason}"
        );

        // The tunnel keeps relaying.
        let got = smol_flow(&a, &b, 20, false).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        a.close().await;
        b.close().await;
    });
    let stats = server.stats();
    assert!(
        stats.transport.quic_handshake_failures >= 1,
        "the wrong ALPN is counted: {stats:?}"
    );
    assert!(
        stats.transport.framing_errors >= 1,
        "the garbage stream is counted: {stats:?}"
    );
    eventually("only the closed tunnels' connections are gone", || {
        server.stats().stream_connections == 0
    });
    smol::block_on(server.shutdown());
}

#[test]
fn mutual_tls_over_quic_admits_a_client_certificate_and_refuses_without() {
    let dir = std::env::temp_dir().join(format!("tscf-smol-{}-mtls-quic", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki(&dir);
    let mut config = server_config();
    config.director.admission.verified_identities = true;
    config.tls_config = Some(ServerTlsConfig {
        identity: ServerIdentity::PemFiles {
            cert: pki.server.0.clone(),
            key: pki.server.1.clone(),
        },
        client_ca: Some(pki.ca.clone()),
    });
    let server = smol::block_on(Server::start(config)).unwrap();
    let mut tunnel = tunnel_config(server.local_addrs(), None, Transport::QUIC);
    let tls = |client_identity| ClientTlsConfig {
        verification: ServerVerification::CaFile(pki.ca.clone()),
        server_name: None,
        client_identity,
    };
    smol::block_on(async {
        tunnel.tls = Some(tls(Some(pki.client.clone())));
        let t = Tunnel::connect(tunnel.clone()).await.expect("admitted");
        assert!(t.internal_ipv4().is_some());
        t.close().await;

        tunnel.tls = Some(tls(None));
        let err = Tunnel::connect(tunnel.clone()).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Refused(TerminateReason::Unauthorized)),
            "{err}"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
    smol::block_on(server.shutdown());
}

/// Reads from `recv` until one whole envelope is there and returns it; fails after 5 s.
async fn next_envelope(
    recv: &mut quinn::RecvStream,
    deframer: &mut tscf_core::wire::StreamDeframer,
) -> Vec<u8> {
    let read = async {
        loop {
            if let Some(envelope) = deframer.next_raw().expect("framed") {
                return envelope.to_vec();
            }
            let mut chunk = [0u8; 2048];
            let n = recv
                .read(&mut chunk)
                .await
                .expect("readable")
                .expect("the stream stays open");
            deframer.push(&chunk[..n]).expect("bounded");
        }
    };
    futures_lite::future::or(read, async {
        smol::Timer::after(Duration::from_secs(5)).await;
        panic!("no envelope on the stream within 5 s");
    })
    .await
}

#[test]
fn a_client_without_quic_datagrams_gets_its_data_on_the_stream() {
    use tscf_core::sim::world::{data_envelope, udp_packet_ports, udp_payload};
    use tscf_core::wire::{EnvelopeType, Message, MessageType};

    let server = hostile_server();
    let config = config_for(&server, Transport::QUIC);
    smol::block_on(async {
        let b = smol_tunnel(config).await;
        let (endpoint, mut client) = raw_client(&server, b"tscf");
        let mut transport = quinn::TransportConfig::default();
        transport.datagram_receive_buffer_size(None);
        client.transport_config(Arc::new(transport));
        let conn = endpoint
            .connect_with(client, quic_addr(&server), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut request = Vec::new();
        let mut configuration = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        configuration.tlvs.client_nonce = Some([1; 16]);
        configuration.encode_envelope(&mut request).unwrap();
        send.write_all(&request).await.unwrap();
        let mut deframer = tscf_core::wire::StreamDeframer::new();
        let response = next_envelope(&mut recv, &mut deframer).await;
        let message = Message::decode(&response[3..]).unwrap();
        assert_eq!(
            message.header.message_type,
            MessageType::CONFIGURATION_RESPONSE
        );
        let me = message.tlvs.internal_ipv4.expect("an address").addr;

        // Relay from a tunnel on datagrams to the one without: on the stream.
        let rx = b.bind(5004).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let tx = b.bind(6000).unwrap();
        tx.send_to(b"to the stream", SocketAddr::new(me.into(), 7000))
            .await
            .unwrap();
        let envelope = next_envelope(&mut recv, &mut deframer).await;
        assert_eq!(envelope[0], EnvelopeType::DATA.0);
        assert_eq!(udp_payload(&envelope[3..]), b"to the stream");

        // And back, on the stream too.
        let to_b = b.internal_ipv4().unwrap();
        let packet = udp_packet_ports(me, 7000, to_b, 5004, b"from the stream");
        send.write_all(&data_envelope(&packet)).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = rx.recv_from(&mut buf).await.expect("relayed");
        assert_eq!(&buf[..n], b"from the stream");
        assert_eq!(from, SocketAddr::new(me.into(), 7000));
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn past_the_threshold_new_quic_clients_prove_their_address_with_a_retry() {
    // The default threshold: one client handshakes at once.
    let server = hostile_server();
    let config = config_for(&server, Transport::QUIC);
    smol::block_on(async {
        let a = smol_tunnel(config).await;
        a.close().await;
    });
    assert_eq!(server.stats().transport.quic_retries, 0);
    smol::block_on(server.shutdown());

    // Threshold 0: every client is sent a Retry first, and still gets its tunnel.
    let mut config = server_config();
    config.quic_retry_above = 0;
    let server = smol::block_on(Server::start(config)).unwrap();
    let config = config_for(&server, Transport::QUIC);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        assert_eq!(
            smol_flow(&a, &b, 10, false).await,
            (0..10).collect::<Vec<_>>()
        );
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        server.stats().transport.quic_retries,
        2,
        "one Retry per client"
    );
    smol::block_on(server.shutdown());
}
