//! QUIC: a smol server and two smol clients over QUIC, with data as QUIC datagrams and control
//! on the stream; fingerprint pinning.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tscf_core::client::ClientState;
use tscf_core::wire::Transport;
use tscf_runtime_smol::{Notification, StartError};

use crate::util::{
    config_for, connect_with_a_wrong_pin, server_config, smol_flow, smol_server, smol_tunnel,
};

/// 2 s at 50 packets/s.
const PACKETS: u32 = 100;

#[test]
fn quic_configuration_relay_and_flow_as_datagrams() {
    let server = smol_server();
    let config = config_for(&server, Transport::QUIC);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        assert_eq!(a.state(), ClientState::Connected);
        let (ia, ib) = (a.internal_ipv4().unwrap(), b.internal_ipv4().unwrap());
        assert_ne!(ia, ib, "distinct internal addresses");
        assert_ne!(a.tunnel_id(), b.tunnel_id());
        assert!(a.observed_address().unwrap().ip().is_loopback());
        assert_eq!(a.info().unwrap().server.transport, Transport::QUIC);
        assert!(matches!(
            a.notifications().try_recv(),
            Ok(Notification::Connected(_))
        ));

        let got = smol_flow(&a, &b, PACKETS, false).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "complete, in order");
        let stats = server.stats();
        assert_eq!(stats.director.active_tunnels, 2);
        assert!(stats.director.frames_relayed >= u64::from(PACKETS));
        // Data went as QUIC datagrams both ways, not on the stream.
        assert!(
            a.stats().quic_datagrams_sent >= u64::from(PACKETS),
            "{:?}",
            a.stats()
        );
        assert!(stats.transport.quic_datagrams_received >= u64::from(PACKETS));
        assert!(stats.transport.quic_datagrams_sent >= u64::from(PACKETS));
        assert!(b.stats().quic_datagrams_received >= u64::from(PACKETS));

        a.close().await;
        b.close().await;
    });
    let stats = server.stats();
    assert_eq!(stats.director.active_tunnels, 0, "released over QUIC");
    smol::block_on(server.shutdown());
}

/// A QUIC tunnel silent for several of the connection's idle timeouts (shortened to 1 s here)
/// survives: the server's PINGs keep it open although the client sends none of its own. Drops
/// of data that came as QUIC datagrams are counted as on any transport.
#[test]
fn a_silent_quic_tunnel_outlives_the_idle_timeout_and_its_drops_are_counted() {
    let short = tscf_core::io::QuicLimits {
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_millis(250),
        ..tscf_core::io::QuicLimits::default()
    };
    let mut config = server_config();
    config.quic_limits = short;
    let server = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap();
    let mut client = config_for(&server, Transport::QUIC);
    client.quic_limits = tscf_core::io::QuicLimits {
        // The client would PING only after the connection timed out: the server's keep it.
        keep_alive: Duration::from_secs(60),
        ..short
    };
    smol::block_on(async {
        let a = smol_tunnel(client.clone()).await;
        let b = smol_tunnel(client).await;
        // Silence (the subject of the test): three idle timeouts.
        smol::Timer::after(Duration::from_secs(3)).await;
        let got = smol_flow(&a, &b, 20, false).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "complete, in order");
        for t in [&a, &b] {
            let stats = t.stats().client;
            assert_eq!((stats.transports_lost, stats.reattaches), (0, 0));
        }

        // A packet for an address nobody holds, sent as a QUIC datagram, is counted.
        let before = server.stats();
        let socket = a.bind(0).unwrap();
        let nobody: SocketAddr = "10.77.255.254:5004".parse().unwrap();
        socket.send_to(b"anyone?", nobody).await.unwrap();
        let started = Instant::now();
        while server.stats().director.dropped.unknown_destination == 0 {
            assert!(started.elapsed() < Duration::from_secs(15), "not counted");
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        let after = server.stats();
        assert!(after.transport.quic_datagrams_received > before.transport.quic_datagrams_received);
        a.close().await;
        b.close().await;
    });
    let stats = server.stats().director;
    assert_eq!((stats.tunnels_opened, stats.reattaches), (2, 0));
    smol::block_on(server.shutdown());
}

#[test]
fn quic_wrong_fingerprint_is_refused_with_a_clear_error() {
    let server = smol_server();
    let text = connect_with_a_wrong_pin(&server, Transport::QUIC);
    assert!(
        text.contains("QUIC")
            && text.contains("invalid peer certificate")
            && text.contains("FingerprintMismatch")
            && text.contains("abababab"),
        "unclear error: {text}"
    );
    assert_eq!(server.stats().director.active_tunnels, 0);
    smol::block_on(server.shutdown());
}

#[test]
fn quic_listeners_need_tls_settings_and_the_std_runtime_refuses_them() {
    let mut config = server_config();
    config.tls_config = None;
    config.tls.clear();
    let err = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap_err();
    assert!(matches!(err, StartError::MissingTls), "{err}");
    let err = tscf_runtime_std::Server::start(server_config()).unwrap_err();
    assert!(matches!(err, StartError::Unsupported(_)), "{err}");
}
