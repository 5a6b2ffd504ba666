//! What a tunnel is told at start, and why it may not come up.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::client::{ClientConfig, ConfigError, PeerConfig, ServerEndpoint, TerminateReason};

use crate::dtls;
use crate::io::{Capture, QuicLimits};
use crate::tls::{
    self, ClientTlsConfig, LoadedIdentity, Os, PeerIdentity, ServerIdentity, ServerTlsConfig,
    TlsConfigError,
};
use crate::wire::Transport;

/// What a tunnel needs: the client state machine's configuration and the bounds and settings
/// of its transports.
///
/// # Peer tunneling
///
/// Peer tunneling is on by default, as it is on the server: [`TunnelConfig::new`] sets
/// `client.peer` to [`PeerConfig::new`] with no local address and, as STUN server, the first
/// UDP server endpoint (none if no server is on UDP; the director's announced responder is
/// asked then). The runtime fills in `local_addresses` when it is empty, from the tunnel's
/// peer UDP socket: its bound address, or for an unspecified bind the local address the
/// system routes to the first server from. Set `client.peer` to `None` to turn peer tunneling
/// off, or change its fields (STUN servers, timers, `default_opt_in`, the peer transport).
/// Even when it is on, only inner sockets opted in (or all, with `default_opt_in`) leave the
/// relay.
///
/// Peer tunnels are secured by default: the peer transport is DTLS, with a certificate the
/// runtime generates at connect, and [`PeerConfig::require_secure`] is set, so that a peer
/// tunnel never carries data another host could forge (plain peer tunnels authenticate their
/// control messages only; `docs/PROTOCOL.md` §2.6). Plain peer tunnels are there when asked
/// for: set the peer transport to [`Transport::UDP`] (and `require_secure` to false).
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// The client state machine's configuration: servers (tried in order), credential,
    /// timers, peer tunneling. Its `rng_seed` is replaced by one from the operating system
    /// unless [`keep_seed`](Self::keep_seed) is set.
    pub client: ClientConfig,
    /// Keep `client.rng_seed` as given.
    pub keep_seed: bool,
    /// TLS settings; required if any server uses TLS, DTLS or QUIC.
    pub tls: Option<ClientTlsConfig>,
    /// How long connecting waits for the first tunnel (default 10 s).
    pub connect_timeout: Duration,
    /// Bound of one transport attempt: a TCP connect plus TLS handshake, a DTLS or QUIC
    /// handshake (default 5 s).
    pub transport_timeout: Duration,
    /// Datagrams queued on one inner socket before further ones are dropped (default 256).
    pub socket_queue_len: usize,
    /// Octets of each inner TCP stream's receive buffer, and of its send buffer: the most a
    /// stream has in flight each way (default 64 KiB). A whole window can leave in one burst,
    /// which the UDP socket buffers on the path must hold: smoltcp has no selective
    /// acknowledgements, so a loss costs much (on loopback 128 KiB already overflowed them).
    pub tcp_buffer_bytes: usize,
    /// Connections an inner TCP listener holds before they are accepted; beyond, new ones are
    /// reset (default 16).
    pub tcp_backlog: usize,
    /// Inner TCP sockets of the tunnel at most: streams, listening sockets and streams still
    /// closing (default 256). Each stream holds up to twice `tcp_buffer_bytes`.
    pub max_tcp_sockets: usize,
    /// How long an inner TCP connection attempt waits for its handshake (default 10 s).
    pub tcp_connect_timeout: Duration,
    /// Octets of envelopes waiting for one stream's writer (the server transport or a peer
    /// stream); beyond, envelopes are dropped and counted (default 256 KiB).
    pub stream_queue_bytes: usize,
    /// How long closing a tunnel waits for the server to acknowledge the release (default
    /// 1 s).
    pub release_wait: Duration,
    /// The transport limits of QUIC connections: to the server, and of QUIC peer sessions.
    pub quic_limits: QuicLimits,
    /// Notifications waiting to be read; beyond, new ones are dropped and counted in
    /// [`TunnelStats::notifications_dropped`](super::TunnelStats::notifications_dropped)
    /// (default 256).
    pub notification_queue: usize,
    /// Envelopes waiting for the stream of a QUIC peer session (those too large for a QUIC
    /// datagram); beyond, they are dropped and counted as send errors (default 256).
    pub session_queue: usize,
    /// A listener for peer streams (`docs/PROTOCOL.md` §7.7; default none). With peer
    /// tunneling on, the runtime binds it and it is announced in
    /// `client.peer.stream_listeners` (an unspecified address is announced with the UDP host
    /// candidate's address); for TLS a self-signed certificate is generated whose fingerprint
    /// goes into `client.peer.certificate_fingerprint` unless that is set already.
    pub peer_streams: PeerStreamListen,
    /// The certificate presented on secured peer paths (DTLS or QUIC peer transport, TLS peer
    /// streams; `docs/PROTOCOL.md` §7.5.1). Generated at connect (self signed) when `None` and
    /// one is needed; its fingerprint goes into `client.peer.certificate_fingerprint`.
    pub peer_identity: Option<PeerIdentity>,
    /// Where the tunnel shows its inner packets and envelopes, for a packet capture (default
    /// none; see [`Capture`]). Captures hold plaintext.
    pub capture: Option<Capture>,
}

impl TunnelConfig {
    /// The defaults for these servers.
    pub fn new(servers: Vec<ServerEndpoint>) -> Self {
        let stun_servers = servers
            .iter()
            .find(|s| s.transport == Transport::UDP)
            .map(|s| s.addr)
            .into_iter()
            .collect();
        let mut client = ClientConfig::new(servers);
        client.peer = Some(PeerConfig {
            transport: Transport::DTLS,
            require_secure: true,
            ..PeerConfig::new(Vec::new(), stun_servers)
        });
        Self {
            client,
            keep_seed: false,
            tls: None,
            connect_timeout: Duration::from_secs(10),
            transport_timeout: Duration::from_secs(5),
            socket_queue_len: 256,
            tcp_buffer_bytes: 64 * 1024,
            tcp_backlog: 16,
            max_tcp_sockets: 256,
            tcp_connect_timeout: Duration::from_secs(10),
            stream_queue_bytes: 256 * 1024,
            release_wait: Duration::from_secs(1),
            quic_limits: QuicLimits::default(),
            notification_queue: 256,
            session_queue: 256,
            peer_streams: PeerStreamListen::None,
            peer_identity: None,
            capture: None,
        }
    }

    /// Where the tunnel's peer UDP socket binds: loopback when the servers are on loopback,
    /// else the unspecified address of the first datagram (or first) server's family.
    pub fn udp_bind_addr(&self) -> SocketAddr {
        let servers = &self.client.servers;
        let first = servers
            .iter()
            .find(|s| s.transport.is_datagram())
            .or(servers.first());
        let ip = match first.map(|s| s.addr.ip()) {
            Some(ip) if ip.is_loopback() => ip,
            Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        SocketAddr::new(ip, 0)
    }

    /// The server whose route picks the host candidate's address when the peer socket is
    /// bound to the unspecified address.
    pub fn route_probe(&self) -> Option<SocketAddr> {
        self.client.servers.first().map(|s| s.addr)
    }

    /// What a runtime does before it binds anything: the client's seed from `os` (unless
    /// [`keep_seed`](Self::keep_seed)) and the TLS material loaded.
    pub fn prepare(mut self, os: Os) -> Result<(Self, TunnelCredentials), ConnectError> {
        if !self.keep_seed {
            self.client.rng_seed = os.seed()?;
        }
        let credentials = TunnelCredentials::load(&self, os)?;
        Ok((self, credentials))
    }
}

/// Whether and how a tunnel listens for peer streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerStreamListen {
    /// No listener (the default): peer tunnels to this client run over UDP (plain or inside
    /// a DTLS or QUIC session) only.
    #[default]
    None,
    /// Plain TCP on this address (port 0 picks one).
    Tcp(SocketAddr),
    /// TLS on this address, with a self-signed certificate generated for the tunnel.
    Tls(SocketAddr),
}

impl PeerStreamListen {
    /// The address to listen on and whether with TLS; `None` for no listener.
    pub fn listen(self) -> Option<(SocketAddr, bool)> {
        match self {
            Self::None => None,
            Self::Tcp(addr) => Some((addr, false)),
            Self::Tls(addr) => Some((addr, true)),
        }
    }
}

/// Why a tunnel did not come up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The client configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS settings are unusable, or missing for a TLS server.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// A local socket, thread or task could not be set up.
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
    /// The server refused the tunnel for good (for instance Unauthorized).
    #[error("the server refused the tunnel: {0:?}")]
    Refused(TerminateReason),
    /// No tunnel within the connect timeout. Its text says what was tried and what came back,
    /// for instance "no tunnel after 10s: sent 5 Configuration Requests to 192.0.2.1:4440
    /// over UDP, no answer: is the server running, and can its answers reach this host?".
    #[error("no tunnel after {waited:?}: {}", timed_out_text(last_failure.as_deref(), *requests_sent, *answered, servers))]
    TimedOut {
        /// How long it waited.
        waited: Duration,
        /// The last transport or server failure, as text.
        last_failure: Option<String>,
        /// Configuration Requests sent, retransmissions included.
        requests_sent: u64,
        /// Whether anything at all came back from a server.
        answered: bool,
        /// The servers of the configuration.
        servers: Vec<ServerEndpoint>,
    },
}

/// What [`ConnectError::TimedOut`] says after "no tunnel after …".
fn timed_out_text(
    last_failure: Option<&str>,
    requests_sent: u64,
    answered: bool,
    servers: &[ServerEndpoint],
) -> String {
    let to: Vec<String> = servers
        .iter()
        .map(|s| format!("{} over {}", s.addr, s.transport))
        .collect();
    let to = to.join(", ");
    let requests = match requests_sent {
        1 => "1 Configuration Request".to_owned(),
        n => format!("{n} Configuration Requests"),
    };
    match (requests_sent, answered, last_failure) {
        (0, _, Some(failure)) => format!("no transport to {to} came up; last failure: {failure}"),
        (0, _, None) => format!("no transport to {to} came up"),
        (_, false, failure) => {
            let mut text = format!(
                "sent {requests} to {to}, no answer: is the server running, and can its \
                 answers reach this host?"
            );
            if let Some(failure) = failure {
                text.push_str(&format!(" (last failure: {failure})"));
            }
            text
        }
        (_, true, Some(failure)) => format!("sent {requests} to {to}; last failure: {failure}"),
        (_, true, None) => format!("sent {requests} to {to}; the answers granted no tunnel"),
    }
}

/// The TLS material of a tunnel, loaded once at start: how its TLS and QUIC transports check
/// the server, how its DTLS transports do, the certificate of its secured peer paths and the
/// configuration of its TLS peer stream listener.
#[derive(Debug, Default)]
pub struct TunnelCredentials {
    /// The rustls configuration of TLS and QUIC transports to the server.
    pub server: Option<Arc<rustls::ClientConfig>>,
    /// How DTLS transports to the server check it.
    pub dtls: Option<dtls::ClientSettings>,
    /// The certificate presented on secured peer paths, when one is needed: the configured
    /// one, or a fresh self-signed one.
    pub peer_identity: Option<PeerIdentity>,
    /// The rustls configuration of the TLS peer stream listener (it presents the peer
    /// identity; the other client pins its fingerprint).
    pub listener: Option<Arc<rustls::ServerConfig>>,
}

impl TunnelCredentials {
    /// Loads what `config` needs, through `os` (its files, fresh keys).
    pub fn load(config: &TunnelConfig, os: Os) -> Result<Self, ConnectError> {
        let mut credentials = Self::default();
        if let Some(settings) = &config.tls {
            credentials.server = Some(tls::client_config(settings, os)?);
            credentials.dtls = Some(dtls::ClientSettings::new(settings, os)?);
        }
        let Some(peer) = &config.client.peer else {
            return Ok(credentials);
        };
        let listener_tls = matches!(config.peer_streams, PeerStreamListen::Tls(_));
        if !peer.offers_secure() && !listener_tls {
            return Ok(credentials);
        }
        let identity = match &config.peer_identity {
            Some(identity) => identity.clone(),
            None => PeerIdentity::generate(os)?,
        };
        if listener_tls {
            let loaded = LoadedIdentity {
                chain: identity.chain.clone(),
                key: identity.key.clone_key(),
                fingerprint: identity.fingerprint,
            };
            // No client CA: the other client is known by the director's introduction, and it
            // pins this certificate.
            let settings = ServerTlsConfig {
                identity: ServerIdentity::SelfSigned { names: Vec::new() },
                client_ca: None,
            };
            credentials.listener = Some(tls::server_config_with(&settings, loaded, os)?);
        }
        credentials.peer_identity = Some(identity);
        Ok(credentials)
    }
}
