//! What a tunnel server listens on, the bounds of its transports, and why it may not start.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::DtlsListenerConfig;
use crate::director::{DirectorConfig, DirectorConfigError};
use crate::dtls::{self, ClientCheck};
use crate::io::{Capture, ClientTls, QuicLimits};
use crate::tls::{self, Fingerprint, Os, ServerIdentity, ServerTlsConfig, TlsConfigError};
use crate::wire::Transport;

/// What a server listens on, how it runs its director, and the bounds of its transports.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The director's configuration. Its `rng_seed` is replaced by one from the operating
    /// system unless [`keep_seed`](Self::keep_seed) is set.
    pub director: DirectorConfig,
    /// Keep `director.rng_seed` as given (reproducible tunnel ids, for tests).
    pub keep_seed: bool,
    /// Plain TCP listeners.
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners; they need [`tls_config`](Self::tls_config).
    pub tls: Vec<SocketAddr>,
    /// UDP listeners (tscf envelopes and STUN Binding requests share them).
    pub udp: Vec<SocketAddr>,
    /// QUIC listeners (UDP), with the certificate of [`tls_config`](Self::tls_config) and ALPN
    /// `tscf`. Only runtimes with a QUIC stack run them (`tscf-runtime-smol`); others refuse to
    /// start with any.
    pub quic: Vec<SocketAddr>,
    /// DTLS 1.2 listeners (UDP), with the certificate of [`tls_config`](Self::tls_config);
    /// each DTLS record carries one envelope.
    pub dtls: Vec<SocketAddr>,
    /// Most DTLS handshakes in progress at once on one DTLS listener (default 256); only a
    /// client that returned the listener's stateless cookie gets one. A handshake from a new
    /// source beyond it evicts the oldest one, counted in
    /// [`TransportCounters::dtls_half_open_evicted`](super::TransportCounters::dtls_half_open_evicted).
    pub dtls_max_half_open: usize,
    /// How long a DTLS handshake may take before its state is dropped (default 5 s).
    pub dtls_handshake_timeout: Duration,
    /// How long a DTLS listener accepts the stateless cookie it handed out: between this and
    /// twice this (default 30 s); a ClientHello with an older cookie is refused, counted in
    /// [`TransportCounters::dtls_bad_cookies`](super::TransportCounters::dtls_bad_cookies).
    pub dtls_cookie_lifetime: Duration,
    /// QUIC handshakes in progress at once beyond which a new client must first prove its
    /// address with a Retry (RFC 9000 §8.1), so that spoofed Initial packets cannot hold
    /// handshake state (default 64; 0 validates every client). Counted in
    /// [`TransportCounters::quic_retries`](super::TransportCounters::quic_retries).
    pub quic_retry_above: usize,
    /// Certificate, key and optional client CA of the TLS, QUIC and DTLS listeners.
    pub tls_config: Option<ServerTlsConfig>,
    /// Most stream connections (TCP, TLS and QUIC, configured or not, handshaking included)
    /// at once; beyond it new connections are closed at accept (default 1024). DTLS
    /// associations count against it too: one beyond is closed when its handshake completes.
    pub max_stream_connections: usize,
    /// Octets of envelopes waiting for one stream connection's writer; beyond, envelopes for
    /// that connection are dropped and counted in
    /// [`TransportCounters::stream_queue_full`](super::TransportCounters::stream_queue_full)
    /// (default 256 KiB).
    pub stream_queue_bytes: usize,
    /// How long a stream connection's writer may take to write what it took before the
    /// connection is cut as stalled (default 10 s): a client that stops reading cannot hold
    /// its slot.
    pub stream_write_timeout: Duration,
    /// How long a stream connection the server closes may take to write its last envelopes
    /// before it is cut (default 1 s).
    pub close_grace: Duration,
    /// How long a shutdown waits at most (default 2 s): for the clients on datagram
    /// transports to acknowledge their Release Notifications, which are retransmitted
    /// meanwhile (`docs/PROTOCOL.md` §3.5, §6.3), and for the stream connections to write
    /// theirs and close. It ends as soon as all have (see [`ServerHost::is_drained`](super::ServerHost::is_drained)).
    pub shutdown_grace: Duration,
    /// Stream connections (TCP, TLS, QUIC) from one source not yet configured (in their
    /// handshake, or open without a Configuration exchange) at once: one IPv4 address, or one
    /// IPv6 /64 (default 16). Beyond, new connections from it are closed at accept, counted in
    /// [`TransportCounters::streams_refused_per_source`](super::TransportCounters::streams_refused_per_source).
    /// With [`max_stream_connections`](Self::max_stream_connections) reached, a new
    /// connection takes the slot of the oldest unconfigured one, so that idle connections
    /// cannot lock clients out.
    pub max_unconfigured_per_source: usize,
    /// The transport limits of QUIC listeners.
    pub quic_limits: QuicLimits,
    /// Where the server shows the packets it relays and the envelopes it exchanges, for a
    /// packet capture (default none; see [`Capture`]). Captures hold plaintext.
    pub capture: Option<Capture>,
    /// Run plain TCP and UDP listeners on addresses beyond loopback (default false). A plain
    /// transport protects its tunnels from no one who sees their traffic: such an observer
    /// reads the inner packets and the tunnel's control key, and with the key can act as the
    /// client; off the path, keyed control messages (`docs/PROTOCOL.md` §4.4) still hold, but
    /// data can be injected (§2.6). Without this [`check`](Self::check) refuses such a
    /// listener; with it, [`prepare`](Self::prepare) logs a warning for each.
    pub allow_plain_beyond_loopback: bool,
    /// In a cluster (`director.cluster`): the mesh listeners, where the other directors
    /// connect (TLS with a client certificate the runtime verifies as a director's; each
    /// accepted connection goes to [`ServerHost::accept_mesh`](super::ServerHost::accept_mesh)).
    /// Default none.
    pub mesh: Vec<SocketAddr>,
    /// In a cluster: how mesh links to the other directors are dialed (the TLS client
    /// settings, with this director's client certificate; the server name of each link is
    /// the other director's name, which its certificate must carry). Without it the director
    /// dials nobody and waits to be dialed. Default none.
    pub mesh_client: Option<ClientTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            director: DirectorConfig::default(),
            keep_seed: false,
            tcp: Vec::new(),
            tls: Vec::new(),
            udp: Vec::new(),
            quic: Vec::new(),
            dtls: Vec::new(),
            dtls_max_half_open: 256,
            dtls_handshake_timeout: Duration::from_secs(5),
            dtls_cookie_lifetime: Duration::from_secs(30),
            quic_retry_above: 64,
            tls_config: None,
            max_stream_connections: 1024,
            stream_queue_bytes: 256 * 1024,
            stream_write_timeout: Duration::from_secs(10),
            close_grace: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(2),
            max_unconfigured_per_source: 16,
            quic_limits: QuicLimits::default(),
            capture: None,
            allow_plain_beyond_loopback: false,
            mesh: Vec::new(),
            mesh_client: None,
        }
    }
}

impl ServerConfig {
    /// TCP, TLS and UDP listeners on ephemeral ports of 127.0.0.1, with a self-signed
    /// certificate for "127.0.0.1" and the default director (open admission, which loopback
    /// allows): the setup of examples, tests and local experiments.
    pub fn loopback() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            tcp: vec![any],
            tls: vec![any],
            udp: vec![any],
            tls_config: Some(ServerTlsConfig {
                identity: ServerIdentity::SelfSigned {
                    names: vec!["127.0.0.1".into()],
                },
                client_ca: None,
            }),
            ..Self::default()
        }
    }

    /// Every listener address, in the order of the fields.
    pub fn listeners(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.tcp
            .iter()
            .chain(&self.tls)
            .chain(&self.udp)
            .chain(&self.quic)
            .chain(&self.dtls)
            .copied()
    }

    /// The plain (TCP and UDP) listeners on addresses beyond loopback.
    pub fn plain_listeners_beyond_loopback(
        &self,
    ) -> impl Iterator<Item = (Transport, SocketAddr)> + '_ {
        let tcp = self.tcp.iter().map(|a| (Transport::TCP, *a));
        let udp = self.udp.iter().map(|a| (Transport::UDP, *a));
        tcp.chain(udp).filter(|(_, a)| !a.ip().is_loopback())
    }

    /// Checks what must hold before anything is bound: a listener at all, a valid director
    /// configuration, no open admission beyond loopback, no plain listener beyond loopback
    /// unless [`allow_plain_beyond_loopback`](Self::allow_plain_beyond_loopback), and TLS
    /// settings where a listener needs them.
    pub fn check(&self) -> Result<(), StartError> {
        let all: Vec<SocketAddr> = self.listeners().collect();
        if all.is_empty() {
            return Err(StartError::NoListener);
        }
        self.director.validate()?;
        self.director.check_listeners(&all)?;
        if !self.allow_plain_beyond_loopback {
            if let Some((transport, addr)) = self.plain_listeners_beyond_loopback().next() {
                return Err(StartError::PlainBeyondLoopback { transport, addr });
            }
        }
        if self.needs_certificate() && self.tls_config.is_none() {
            return Err(StartError::MissingTls);
        }
        Ok(())
    }

    /// What a runtime does before it binds anything: [`check`](Self::check), the director's
    /// seed from `os` (unless [`keep_seed`](Self::keep_seed)), and the certificate loaded.
    pub fn prepare(mut self, os: Os) -> Result<(Self, Option<ServerCredentials>), StartError> {
        self.check()?;
        for (transport, addr) in self.plain_listeners_beyond_loopback() {
            tracing::warn!(
                "plain {transport} listener {addr} is reachable beyond loopback: anyone on the \
                 path reads its tunnels and can take them over; use TLS, DTLS or QUIC there"
            );
        }
        if !self.keep_seed {
            self.director.rng_seed = os.seed().map_err(StartError::Randomness)?;
        }
        let credentials = ServerCredentials::load(&self, os)?;
        Ok((self, credentials))
    }

    /// Whether a TLS, QUIC or DTLS listener is configured.
    pub fn needs_certificate(&self) -> bool {
        !self.tls.is_empty() || !self.quic.is_empty() || !self.dtls.is_empty()
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The director refused its configuration, or open admission on a listener beyond
    /// loopback.
    #[error(transparent)]
    Director(#[from] DirectorConfigError),
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// TLS, QUIC or DTLS listeners are configured without TLS settings.
    #[error("TLS, QUIC or DTLS listeners configured without tls_config")]
    MissingTls,
    /// A plain TCP or UDP listener on an address beyond loopback, without
    /// [`ServerConfig::allow_plain_beyond_loopback`].
    #[error(
        "plain {transport} listener {addr} is reachable beyond loopback: anyone on the path \
         reads its tunnels and can take them over; use TLS, DTLS or QUIC there, or allow plain \
         listeners explicitly"
    )]
    PlainBeyondLoopback {
        /// TCP or UDP.
        transport: Transport,
        /// The listener's address.
        addr: SocketAddr,
    },
    /// The configuration asks for something this runtime does not run (QUIC listeners in
    /// `tscf-runtime-std`).
    #[error("not supported by this runtime: {0}")]
    Unsupported(&'static str),
    /// No listener is configured.
    #[error("no listener configured")]
    NoListener,
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// A thread or task could not be started, or a local address not read.
    #[error("cannot start: {0}")]
    Io(io::Error),
    /// The operating system gave no secure randomness for tunnel ids and secrets.
    #[error("{0}")]
    Randomness(io::Error),
}

/// The addresses a server listens on (ports resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// TCP listeners.
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners.
    pub tls: Vec<SocketAddr>,
    /// UDP listeners.
    pub udp: Vec<SocketAddr>,
    /// QUIC listeners (UDP).
    pub quic: Vec<SocketAddr>,
    /// DTLS listeners (UDP).
    pub dtls: Vec<SocketAddr>,
}

impl LocalAddrs {
    /// `config` with its STUN port set, unless set already, to the first UDP listener's: the
    /// STUN responder that clients on any transport are told of (PROTOCOL §3.3).
    pub fn director_config(&self, config: &DirectorConfig) -> DirectorConfig {
        let mut config = config.clone();
        config.stun_port = config.stun_port.or(self.udp.first().map(|a| a.port()));
        config
    }

    /// The datagram sockets of a [`ServerHost`](super::ServerHost), in the order their
    /// [`SocketId`](crate::io::SocketId)s count: the UDP listeners, then the DTLS listeners.
    pub fn datagram_sockets(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.udp.iter().chain(&self.dtls).copied()
    }
}

/// The certificate a server's TLS, QUIC and DTLS listeners present, loaded (or generated) once
/// so that one fingerprint pins them all.
#[derive(Debug)]
pub struct ServerCredentials {
    /// The rustls configuration of the TLS listeners (QUIC listeners take it with their ALPN).
    pub tls: Arc<rustls::ServerConfig>,
    /// The SHA-256 fingerprint of the certificate, for clients that pin it.
    pub fingerprint: Fingerprint,
    /// What the DTLS listeners present and how they check clients, when there are any.
    pub dtls: Option<DtlsListenerConfig>,
}

impl ServerCredentials {
    /// Loads the certificate of `config.tls_config` (through `os`: its files, or a fresh key
    /// for a self-signed one); `None` without TLS settings.
    pub fn load(config: &ServerConfig, os: Os) -> Result<Option<Self>, StartError> {
        let Some(settings) = &config.tls_config else {
            return Ok(None);
        };
        let identity = tls::load_identity(&settings.identity, os)?;
        let fingerprint = identity.fingerprint;
        let dtls = if config.dtls.is_empty() {
            None
        } else {
            let certificate = dtls::certificate(identity.chain.clone(), &identity.key)
                .map_err(TlsConfigError::from)?;
            let client_check = match &settings.client_ca {
                Some(path) => ClientCheck::Roots(tls::load_roots(path, os)?),
                None => ClientCheck::None,
            };
            Some(DtlsListenerConfig {
                certificate,
                client_check,
            })
        };
        let tls = tls::server_config_with(settings, identity, os)?;
        Ok(Some(Self {
            tls,
            fingerprint,
            dtls,
        }))
    }
}
