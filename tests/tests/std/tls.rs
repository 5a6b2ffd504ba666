//! TLS verification: pinned fingerprint, CA file, mutual TLS admission.

use std::time::Duration;

use tscf_core::client::TerminateReason;
use tscf_core::wire::Transport;
use tscf_runtime_std::{
    ClientTlsConfig, ConnectError, Fingerprint, ServerIdentity, ServerTlsConfig,
    ServerVerification, Tunnel,
};

use crate::pki::pki;
use crate::util::{server, temp_dir, tunnel_config};

#[test]
fn pinned_fingerprint_is_accepted() {
    let server = server(|_| {});
    let t = Tunnel::connect(tunnel_config(&server, Transport::TLS)).unwrap();
    assert!(t.internal_ipv4().is_some());
}

#[test]
fn wrong_fingerprint_is_refused_with_a_clear_error() {
    let server = server(|_| {});
    let mut config = tunnel_config(&server, Transport::TLS);
    config.tls = Some(ClientTlsConfig::pinned(Fingerprint([0xab; 32])));
    config.connect_timeout = Duration::from_millis(1500);
    let err = Tunnel::connect(config).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConnectError::TimedOut { .. }), "{text}");
    assert!(
        text.contains("does not match the pinned abababab"),
        "unclear error: {text}"
    );
    assert!(server.stats().transport.tls_handshake_failures >= 1);
}

#[test]
fn fingerprint_parses_from_hex() {
    let f = Fingerprint([0x0f; 32]);
    assert_eq!(Fingerprint::from_hex(&f.to_string()).unwrap(), f);
    assert!(Fingerprint::from_hex("0f:0f").is_err());
}

#[test]
fn ca_file_verification() {
    let dir = temp_dir("ca");
    let pki = pki(&dir);
    let server = server(|c| {
        c.tls_config = Some(ServerTlsConfig {
            identity: ServerIdentity::PemFiles {
                cert: pki.server.0.clone(),
                key: pki.server.1.clone(),
            },
            client_ca: None,
        });
    });
    let mut config = tunnel_config(&server, Transport::TLS);
    config.tls = Some(ClientTlsConfig {
        verification: ServerVerification::CaFile(pki.ca.clone()),
        server_name: None,
        client_identity: None,
    });
    let t = Tunnel::connect(config.clone()).unwrap();
    assert!(t.internal_ipv4().is_some());
    // The wrong name is refused.
    config.tls.as_mut().unwrap().server_name = Some("other.example".into());
    config.connect_timeout = Duration::from_millis(1500);
    let err = Tunnel::connect(config).unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn mutual_tls_admits_a_client_certificate_and_refuses_without() {
    let dir = temp_dir("mtls");
    let pki = pki(&dir);
    let server = server(|c| {
        c.director.admission.verified_identities = true;
        c.tls_config = Some(ServerTlsConfig {
            identity: ServerIdentity::PemFiles {
                cert: pki.server.0.clone(),
                key: pki.server.1.clone(),
            },
            client_ca: Some(pki.ca.clone()),
        });
    });
    let mut config = tunnel_config(&server, Transport::TLS);
    let tls = |client_identity| ClientTlsConfig {
        verification: ServerVerification::CaFile(pki.ca.clone()),
        server_name: None,
        client_identity,
    };
    config.tls = Some(tls(Some(pki.client.clone())));
    let t = Tunnel::connect(config.clone()).unwrap();
    assert!(t.internal_ipv4().is_some());

    config.tls = Some(tls(None));
    let err = Tunnel::connect(config.clone()).unwrap_err();
    assert!(
        matches!(err, ConnectError::Refused(TerminateReason::Unauthorized)),
        "{err}"
    );
    // Plain TCP gets no identity either.
    let mut tcp = tunnel_config(&server, Transport::TCP);
    tcp.tls = None;
    let err = Tunnel::connect(tcp).unwrap_err();
    assert!(matches!(
        err,
        ConnectError::Refused(TerminateReason::Unauthorized)
    ));
    assert!(server.stats().director.refused.unauthorized >= 2);
}

#[test]
fn open_admission_beyond_loopback_is_refused_at_start() {
    let config = tscf_runtime_std::ServerConfig {
        tcp: vec!["0.0.0.0:0".parse().unwrap()],
        ..Default::default()
    };
    let err = tscf_runtime_std::Server::start(config).unwrap_err();
    assert!(err.to_string().contains("beyond loopback"), "{err}");
}
