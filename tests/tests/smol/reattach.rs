//! A connection cut by the smol server, as a network failure would cut it: the client
//! re-attaches with the same tunnel over a new connection and the relay works again.

use std::time::{Duration, Instant};

use tscf_core::wire::Transport;
use tscf_runtime_smol::Notification;

use crate::util::{config_for, smol_flow, smol_server, smol_tunnel};

fn cut_reattaches(transport: Transport) {
    let server = smol_server();
    let config = config_for(&server, transport);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        let (id, addr) = (a.tunnel_id().unwrap(), a.internal_ipv4().unwrap());
        assert!(
            server.cut_connection(id),
            "{transport}: a connection to cut"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut notes = Vec::new();
        while !notes
            .iter()
            .any(|n| matches!(n, Notification::Reattached(_)))
        {
            assert!(
                Instant::now() < deadline,
                "{transport}: no re-attach: {notes:?}"
            );
            if let Ok(n) = a.notifications().recv().await {
                notes.push(n);
            }
        }
        assert!(notes.contains(&Notification::TransportLost), "{notes:?}");
        assert_eq!(a.tunnel_id(), Some(id), "{transport}: same tunnel id");
        assert_eq!(a.internal_ipv4(), Some(addr), "{transport}: same address");
        assert_eq!(server.stats().director.reattaches, 1);
        let got = smol_flow(&a, &b, 20, false).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "{transport}");
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn tcp_connection_cut_reattaches_with_the_same_tunnel() {
    cut_reattaches(Transport::TCP);
}

#[test]
fn tls_connection_cut_reattaches_with_the_same_tunnel() {
    cut_reattaches(Transport::TLS);
}

#[test]
fn quic_connection_cut_reattaches_with_the_same_tunnel() {
    cut_reattaches(Transport::QUIC);
}

#[test]
fn dtls_association_cut_reattaches_with_the_same_tunnel() {
    cut_reattaches(Transport::DTLS);
}

#[test]
fn udp_tunnels_have_no_connection_to_cut() {
    let server = smol_server();
    let config = config_for(&server, Transport::UDP);
    smol::block_on(async {
        let a = smol_tunnel(config).await;
        assert!(!server.cut_connection(a.tunnel_id().unwrap()));
        assert!(!server.cut_connection(u64::MAX), "an unknown tunnel");
        a.close().await;
    });
    smol::block_on(server.shutdown());
}
