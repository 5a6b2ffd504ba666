//! A transport cut mid-flow: the client re-attaches with the same tunnel and the flow goes on.

use tscf_core::wire::Transport;
use tscf_runtime_std::Notification;

use crate::util::{rtp_flow, server, tunnel};

fn cut_mid_flow(transport: Transport) {
    let server = server(|_| {});
    let a = tunnel(&server, transport);
    let b = tunnel(&server, transport);
    let (id, addr) = (a.tunnel_id().unwrap(), a.internal_ipv4().unwrap());
    let got = rtp_flow(&a, &b, 100, |seq| {
        if seq == 40 {
            assert!(
                server.cut_connection(id),
                "{transport}: a connection to cut"
            );
        }
    });
    assert_eq!(a.tunnel_id(), Some(id), "{transport}: same tunnel id");
    assert_eq!(a.internal_ipv4(), Some(addr), "{transport}: same address");
    let notes: Vec<Notification> = a.notifications().try_iter().collect();
    assert!(notes.contains(&Notification::TransportLost), "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| matches!(n, Notification::Reattached(_))),
        "{transport}: {notes:?}"
    );
    // The flow goes on after the cut, in order; packets sent while re-attaching were queued.
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{transport}: in order");
    assert!(
        got.contains(&99),
        "{transport}: the flow continues: {got:?}"
    );
    assert!(got.len() >= 90, "{transport}: {} of 100 arrived", got.len());
    assert_eq!(server.stats().director.reattaches, 1);
}

#[test]
fn tcp_transport_cut_reattaches() {
    cut_mid_flow(Transport::TCP);
}

#[test]
fn tls_transport_cut_reattaches() {
    cut_mid_flow(Transport::TLS);
}

#[test]
fn udp_transport_loss_reattaches_from_a_new_port() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let (id, addr) = (a.tunnel_id().unwrap(), a.internal_ipv4().unwrap());
    let before = a.observed_address().expect("observed address");
    let got = rtp_flow(&a, &b, 100, |seq| {
        if seq == 40 {
            a.drop_server_transport().expect("a new UDP socket");
        }
    });
    assert_eq!(a.tunnel_id(), Some(id), "same tunnel id");
    assert_eq!(a.internal_ipv4(), Some(addr), "same address");
    let after = a.observed_address().expect("observed address");
    assert_ne!(before.port(), after.port(), "a new source port");
    let notes: Vec<Notification> = a.notifications().try_iter().collect();
    assert!(notes.contains(&Notification::TransportLost), "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| matches!(n, Notification::Reattached(_))),
        "{notes:?}"
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(got.contains(&99), "the flow continues: {got:?}");
    assert!(got.len() >= 90, "{} of 100 arrived", got.len());
    assert_eq!(server.stats().director.reattaches, 1);
}
