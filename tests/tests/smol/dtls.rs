//! DTLS: a smol server and smol clients over DTLS 1.2 (one envelope per record); fingerprint
//! pinning; a cut association and the re-attach that follows; hostile datagrams from many
//! source ports beside a live tunnel; CA verification and client certificates. Prints the
//! handshake time and the relay round trip over DTLS and over UDP.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use futures_lite::future;
use tscf_core::client::TerminateReason;
use tscf_core::client::{ClientState, ServerEndpoint};
use tscf_core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, ConnectError, Fingerprint, Notification, ServerIdentity, ServerTlsConfig,
    ServerVerification, StartError, Tunnel, TunnelConfig,
};

use crate::util::{
    config_for, connect_with_a_wrong_pin, server_config, smol_flow, smol_server, smol_tunnel,
    tunnel_config,
};

/// 2 s at 50 packets/s.
const PACKETS: u32 = 100;

#[test]
fn dtls_configuration_relay_and_flow_both_ways() {
    let server = smol_server();
    let config = config_for(&server, Transport::DTLS);
    smol::block_on(async {
        let started = Instant::now();
        let a = smol_tunnel(config.clone()).await;
        println!(
            "DTLS: handshake and tunnel configuration on loopback took {:?}",
            started.elapsed()
        );
        let b = smol_tunnel(config).await;
        assert_eq!(a.state(), ClientState::Connected);
        let (ia, ib) = (a.internal_ipv4().unwrap(), b.internal_ipv4().unwrap());
        assert_ne!(ia, ib, "distinct internal addresses");
        assert!(a.observed_address().unwrap().ip().is_loopback());
        assert_eq!(a.info().unwrap().server.transport, Transport::DTLS);
        assert!(matches!(
            a.notifications().try_recv(),
            Ok(Notification::Connected(_))
        ));

        let got = smol_flow(&a, &b, PACKETS, false).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "a to b, complete");
        let got = smol_flow(&b, &a, PACKETS, false).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "b to a, complete");
        let stats = server.stats();
        assert_eq!(stats.director.active_tunnels, 2);
        assert_eq!(stats.dtls_associations, 2);
        assert_eq!(stats.transport.dtls_handshakes, 2);
        assert!(stats.director.frames_relayed >= u64::from(2 * PACKETS));
        // Every envelope went as a DTLS record.
        assert!(a.stats().dtls_records_sent >= u64::from(PACKETS));
        assert!(a.stats().dtls_records_received >= u64::from(PACKETS));

        a.close().await;
        b.close().await;
    });
    let stats = server.stats();
    assert_eq!(stats.director.active_tunnels, 0, "released over DTLS");
    smol::block_on(server.shutdown());
}

#[test]
fn dtls_wrong_fingerprint_is_refused() {
    let server = smol_server();
    let text = connect_with_a_wrong_pin(&server, Transport::DTLS);
    assert!(
        text.contains("DTLS") && text.contains("fingerprint"),
        "unclear error: {text}"
    );
    let stats = server.stats();
    assert_eq!(stats.director.active_tunnels, 0);
    assert_eq!(stats.dtls_associations, 0);
    smol::block_on(server.shutdown());
}

/// The first datagram a DTLS client sends (a ClientHello), caught by a socket posing as the
/// server.
fn captured_client_hello() -> Vec<u8> {
    let fake = UdpSocket::bind("127.0.0.1:0").unwrap();
    fake.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut config = TunnelConfig::new(vec![ServerEndpoint {
        addr: fake.local_addr().unwrap(),
        transport: Transport::DTLS,
    }]);
    config.tls = Some(ClientTlsConfig::pinned(Fingerprint([0; 32])));
    config.connect_timeout = Duration::from_millis(300);
    let mut buf = [0u8; 2048];
    let (result, n) = smol::block_on(future::zip(Tunnel::connect(config), async {
        fake.recv_from(&mut buf).unwrap().0
    }));
    assert!(result.is_err());
    assert_eq!(buf[0], 22, "a handshake record");
    buf[..n].to_vec()
}

#[test]
fn hostile_datagrams_from_many_ports_leave_no_state_and_the_tunnel_keeps_working() {
    const SOURCES: usize = 2_000;
    let hello = captured_client_hello();
    let server = smol_server();
    let dtls_addr = server.local_addrs().dtls[0];
    let config = config_for(&server, Transport::DTLS);
    let mut max_half_open = 0;
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        let flood = async {
            let garbage = [23u8; 64];
            for i in 0..SOURCES {
                // Each from a new source port.
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                let _ = s.send_to(&garbage[..8 + i % 56], dtls_addr);
                let _ = s.send_to(&hello[..hello.len().min(13 + i % 40)], dtls_addr);
                let _ = s.send_to(&hello, dtls_addr);
                max_half_open = max_half_open.max(server.stats().dtls_half_open);
                if i % 4 == 0 {
                    // Let the tunnels' tasks run.
                    smol::Timer::after(Duration::from_millis(1)).await;
                }
            }
        };
        let (got, ()) = future::zip(smol_flow(&a, &b, PACKETS, false), flood).await;
        // A flood may cost the tunnel a few packets (the listener's socket buffer overflows),
        // never the tunnel itself.
        println!(
            "DTLS flood: the live tunnel delivered {} of {PACKETS}",
            got.len()
        );
        assert!(
            got.len() >= PACKETS as usize * 8 / 10,
            "the live tunnel works: {got:?}"
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
        let stats = server.stats();
        println!("DTLS flood from {SOURCES} ports: {:?}", stats.transport);
        // No source that did not return a cookie got any state (the unit tests of the
        // endpoint check the cap on those that do).
        assert_eq!(max_half_open, 0);
        assert_eq!(stats.dtls_half_open, 0);
        assert_eq!(stats.transport.dtls_half_open_evicted, 0);
        assert_eq!(stats.dtls_associations, 2);
        // The kernel may drop some of the flood before the server reads it, so the counts
        // are not exact here (the unit tests of the endpoint check them exactly); each kind
        // of hostile datagram is seen and counted.
        assert!(stats.transport.dtls_unknown_source > SOURCES as u64 / 2);
        assert!(stats.transport.dtls_hello_verify_sent > (SOURCES / 2) as u64);
        let got = smol_flow(&b, &a, 20, false).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

/// Round trips of a small inner packet a → server → b → server → a.
async fn relay_rtt(a: &Tunnel, b: &Tunnel, rounds: usize) -> Vec<Duration> {
    let echo = b.bind(7).unwrap();
    let ping = a.bind(0).unwrap();
    ping.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let dst = SocketAddr::new(b.internal_ipv4().unwrap().into(), 7);
    let echoer = async {
        let mut buf = [0u8; 64];
        for _ in 0..rounds {
            match echo.recv_from(&mut buf).await {
                Ok((n, from)) => {
                    let _ = echo.send_to(&buf[..n], from).await;
                }
                Err(_) => break,
            }
        }
    };
    let pinger = async {
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..rounds {
            let started = Instant::now();
            let _ = ping.send_to(&(i as u32).to_be_bytes(), dst).await;
            if ping.recv_from(&mut buf).await.is_ok() {
                rtts.push(started.elapsed());
            }
        }
        rtts
    };
    let (_, mut rtts) = future::zip(echoer, pinger).await;
    rtts.sort();
    rtts
}

/// Prints numbers only: the time to connect and the relay round trip, over UDP and DTLS.
#[test]
fn dtls_and_udp_relay_round_trips_are_measured() {
    let server = smol_server();
    smol::block_on(async {
        for transport in [Transport::UDP, Transport::DTLS] {
            let config = config_for(&server, transport);
            let started = Instant::now();
            let a = smol_tunnel(config.clone()).await;
            println!(
                "{transport}: Tunnel::connect (transport handshake and configuration) took {:?}",
                started.elapsed()
            );
            let b = smol_tunnel(config).await;
            let rtts = relay_rtt(&a, &b, 200).await;
            assert!(rtts.len() >= 190, "{transport}: {} answers", rtts.len());
            println!(
                "{transport}: relay round trip of a 4-octet inner packet, 200 rounds: \
                 median {:?}, p90 {:?}",
                rtts[rtts.len() / 2],
                rtts[rtts.len() * 9 / 10]
            );
            a.close().await;
            b.close().await;
        }
    });
    smol::block_on(server.shutdown());
}

#[test]
fn dtls_listeners_need_tls_settings_in_both_runtimes() {
    let mut config = server_config();
    config.tls_config = None;
    config.tls.clear();
    config.quic.clear();
    let err = smol::block_on(tscf_runtime_smol::Server::start(config.clone())).unwrap_err();
    assert!(matches!(err, StartError::MissingTls), "{err}");
    let err = tscf_runtime_std::Server::start(config).unwrap_err();
    assert!(matches!(err, StartError::MissingTls), "{err}");
}

#[test]
fn dtls_verifies_the_server_by_ca_and_admits_a_client_certificate() {
    let dir = std::env::temp_dir().join(format!("tscf-dtls-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let crate::pki::Pki {
        ca,
        server: server_id,
        client: client_id,
    } = crate::pki::pki(&dir);
    let mut config = server_config();
    config.director.admission.verified_identities = true;
    config.tls_config = Some(ServerTlsConfig {
        identity: ServerIdentity::PemFiles {
            cert: server_id.0,
            key: server_id.1,
        },
        client_ca: Some(ca.clone()),
    });
    let server = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap();
    let mut config = tunnel_config(server.local_addrs(), None, Transport::DTLS);
    let tls = |client_identity, server_name| ClientTlsConfig {
        verification: ServerVerification::CaFile(ca.clone()),
        server_name,
        client_identity,
    };
    smol::block_on(async {
        config.tls = Some(tls(Some(client_id.clone()), None));
        let t = Tunnel::connect(config.clone()).await.unwrap();
        assert!(t.internal_ipv4().is_some());
        t.close().await;

        // Without a client certificate the director does not admit it.
        config.tls = Some(tls(None, None));
        let err = Tunnel::connect(config.clone()).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Refused(TerminateReason::Unauthorized)),
            "{err}"
        );

        // The wrong server name fails the chain check.
        config.tls = Some(tls(Some(client_id), Some("other.example".into())));
        config.connect_timeout = Duration::from_millis(1500);
        let err = Tunnel::connect(config).await.unwrap_err().to_string();
        assert!(
            err.contains("DTLS") && err.contains("not valid for name"),
            "{err}"
        );
    });
    assert!(server.stats().director.refused.unauthorized >= 1);
    smol::block_on(server.shutdown());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dtls_associations_count_against_max_stream_connections() {
    let mut config = server_config();
    config.max_stream_connections = 1;
    let server = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap();
    let mut config = config_for(&server, Transport::DTLS);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        config.connect_timeout = Duration::from_millis(1500);
        let err = Tunnel::connect(config).await.unwrap_err();
        assert!(matches!(err, ConnectError::TimedOut { .. }), "{err}");
        let stats = server.stats();
        assert_eq!(stats.dtls_associations, 1);
        assert!(
            stats.transport.streams_refused >= 1,
            "{:?}",
            stats.transport
        );
        assert_eq!(a.state(), ClientState::Connected);
        a.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn dtls_server_shutdown_notifies_tunnels() {
    let server = smol_server();
    let config = config_for(&server, Transport::DTLS);
    smol::block_on(async {
        let a = smol_tunnel(config).await;
        server.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "no TunnelClosed");
            match a.notifications().recv().await.unwrap() {
                Notification::TunnelClosed { .. } => break,
                _ => continue,
            }
        }
    });
}

#[test]
fn a_client_that_loses_its_dtls_association_reattaches() {
    let server = smol_server();
    let config = config_for(&server, Transport::DTLS);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        let id = a.tunnel_id().unwrap();
        a.drop_server_transport().expect("a new peer socket");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut notes = Vec::new();
        while !notes
            .iter()
            .any(|n| matches!(n, Notification::Reattached(_)))
        {
            assert!(Instant::now() < deadline, "no re-attach: {notes:?}");
            if let Ok(n) = a.notifications().recv().await {
                notes.push(n);
            }
        }
        assert_eq!(a.tunnel_id(), Some(id), "same tunnel id");
        // The server moved the tunnel to the new association and let the stale one go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().dtls_associations != 2 {
            assert!(
                Instant::now() < deadline,
                "{} associations",
                server.stats().dtls_associations
            );
            smol::Timer::after(Duration::from_millis(20)).await;
        }
        let got = smol_flow(&b, &a, 20, false).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}
