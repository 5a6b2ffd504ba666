//! QUIC: a smol server and two smol clients over QUIC, with data as QUIC datagrams and control
//! on the stream; fingerprint pinning.

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
