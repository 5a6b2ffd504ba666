//! The attacks on control integrity, re-attach and plain transports, each against a live
//! server: what the attacker sends, and what must (not) happen.

use std::net::SocketAddr;

use tscf_runtime_std::{Server, ServerConfig};

/// A plain UDP or TCP listener on an address beyond loopback carries tunnels that anyone on
/// the path reads and changes: the server refuses to start one unless told that this is
/// meant, and a TLS listener there needs no such consent.
#[test]
fn plain_listener_beyond_loopback_needs_opt_in() {
    let anywhere = SocketAddr::from(([0, 0, 0, 0], 0));
    for (udp, tcp) in [(vec![anywhere], vec![]), (vec![], vec![anywhere])] {
        let mut config = ServerConfig {
            udp,
            tcp,
            tls: Vec::new(),
            ..ServerConfig::loopback()
        };
        // Not an open relay: admission by token.
        config.director.admission.tokens = vec![b"token".to_vec()];
        let refused = Server::start(config.clone()).expect_err("a plain listener beyond loopback");
        let text = refused.to_string();
        assert!(text.contains("0.0.0.0") && text.contains("plain"), "{text}");
        config.allow_plain_beyond_loopback = true;
        let server = Server::start(config).expect("started with the operator's consent");
        server.shutdown();
    }
    let mut config = ServerConfig {
        udp: Vec::new(),
        tcp: Vec::new(),
        tls: vec![anywhere],
        ..ServerConfig::loopback()
    };
    config.director.admission.tokens = vec![b"token".to_vec()];
    Server::start(config)
        .expect("TLS needs no consent")
        .shutdown();
}
