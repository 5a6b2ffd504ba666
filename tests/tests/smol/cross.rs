//! Across runtimes, over each transport: blocking clients on a smol server, and smol clients
//! on a blocking server (configuration, relay and a short flow).

use tscf_core::client::ClientState;
use tscf_core::wire::Transport;

use crate::util::{
    config_for, smol_flow, smol_server, smol_tunnel, std_flow, std_server, tunnel_config,
    TRANSPORTS,
};

/// 1 s at 50 packets/s.
const PACKETS: u32 = 50;

fn std_clients_on_smol_server(transport: Transport) {
    let server = smol_server();
    let config = config_for(&server, transport);
    let a = tscf_runtime_std::Tunnel::connect(config.clone()).expect("std tunnel");
    let b = tscf_runtime_std::Tunnel::connect(config).expect("std tunnel");
    assert_eq!(a.state(), ClientState::Connected);
    assert_ne!(a.internal_ipv4(), b.internal_ipv4());
    let got = std_flow(&a, &b, PACKETS);
    assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "{transport}");
    assert!(server.stats().director.frames_relayed >= u64::from(PACKETS));
    a.close();
    b.close();
    smol::block_on(server.shutdown());
}

fn smol_clients_on_std_server(transport: Transport) {
    let server = std_server();
    let config = tunnel_config(server.local_addrs(), server.tls_fingerprint(), transport);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        assert_eq!(a.state(), ClientState::Connected);
        assert_ne!(a.internal_ipv4(), b.internal_ipv4());
        let got = smol_flow(&a, &b, PACKETS, false).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "{transport}");
        a.close().await;
        b.close().await;
    });
    assert!(server.stats().director.frames_relayed >= u64::from(PACKETS));
    server.shutdown();
}

#[test]
fn std_clients_on_smol_server_tcp() {
    std_clients_on_smol_server(TRANSPORTS[0]);
}

#[test]
fn std_clients_on_smol_server_tls() {
    std_clients_on_smol_server(TRANSPORTS[1]);
}

#[test]
fn std_clients_on_smol_server_udp() {
    std_clients_on_smol_server(TRANSPORTS[2]);
}

#[test]
fn smol_clients_on_std_server_tcp() {
    smol_clients_on_std_server(TRANSPORTS[0]);
}

#[test]
fn smol_clients_on_std_server_tls() {
    smol_clients_on_std_server(TRANSPORTS[1]);
}

#[test]
fn smol_clients_on_std_server_udp() {
    smol_clients_on_std_server(TRANSPORTS[2]);
}
