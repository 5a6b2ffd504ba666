//! Configuration of the peer tunneling agent of a [`TunnelClient`](super::super::TunnelClient).

use core::net::SocketAddr;
use core::time::Duration;

use super::super::ConfigError;
use crate::wire::Transport;

/// Peer tunneling settings (`docs/PROTOCOL.md` §7). Present in
/// [`ClientConfig::peer`](super::super::ClientConfig::peer) to turn peer tunneling on; the
/// client then announces the `PEER_TUNNELING` capability, answers the director's peer requests
/// and moves opted-in flows onto direct peer tunnels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Local addresses of the client's peer UDP socket: its host candidates (1 to
    /// [`MAX_LOCAL_ADDRESSES`](Self::MAX_LOCAL_ADDRESSES)). The runtime fills them in.
    pub local_addresses: Vec<SocketAddr>,
    /// STUN servers asked for the server-reflexive candidate (at most 8; usually the director's
    /// UDP endpoint). Empty: host candidates only.
    pub stun_servers: Vec<SocketAddr>,
    /// Whether inner UDP sockets are opted in unless
    /// [`set_peer_tunneling`](super::super::TunnelClient::set_peer_tunneling) says otherwise
    /// (default false).
    pub default_opt_in: bool,
    /// Whether to announce our candidates to the director once the server tunnel is up
    /// (default true), so that peer requests for us are answered at once.
    pub announce: bool,
    /// Wait before the second Peer Probe to a remote candidate that has not answered; it
    /// doubles for each further probe (default 50 ms: probes at 0, 50, 150, 350 and 750 ms).
    pub probe_interval: Duration,
    /// Peer Probes sent to one remote candidate in one negotiation, at most (default 5, at
    /// most [`MAX_PROBE_TRANSMISSIONS`](Self::MAX_PROBE_TRANSMISSIONS)).
    pub probe_transmissions: u8,
    /// Pacing of one negotiation's Peer Probes, RFC 8445's Ta: at most one probe per interval
    /// (default 10 ms).
    pub probe_pacing: Duration,
    /// The client's probe budget, across all its negotiations, which no new request refills
    /// (default 100 probes, then 20 per second). See [`ProbeBudget`].
    pub probe_budget: ProbeBudget,
    /// Bound of the whole setup, from the first opted-in packet (or the forwarded request) to
    /// the Configuration Response (default 3 s).
    pub establish_timeout: Duration,
    /// How long a peer request waits for the director's answer, or an In Progress answer for
    /// the forwarded request (default 3 s).
    pub answer_timeout: Duration,
    /// How long peer requests wait for NAT discovery before going out with what is known
    /// (default 1 s).
    pub discovery_timeout: Duration,
    /// Keepalive interval on an up peer tunnel (default 500 ms).
    pub keepalive_interval: Duration,
    /// Silence after which a peer tunnel is down and its flows return to the relay (default
    /// 1.5 s).
    pub silence_timeout: Duration,
    /// Wait before asking again for a peer that failed or went down: initial and maximum
    /// (defaults 2 s and 60 s); doubles on each failure, resets when a tunnel comes up.
    pub retry_backoff: (Duration, Duration),
    /// Keep a peer tunnel when the director reports that the peer's server tunnel closed
    /// (default false: the tunnel goes with it, as `docs/PROTOCOL.md` §7.6 says). A policy for
    /// deployments that value an established call over the director's view of the peer.
    pub keep_on_peer_server_tunnel_loss: bool,
    /// Listeners of the runtime for peer streams (`docs/PROTOCOL.md` §7.7): announced as host
    /// candidates with transport TCP or TLS (at most
    /// [`MAX_STREAM_LISTENERS`](Self::MAX_STREAM_LISTENERS); default none). The runtime fills
    /// them in and reports accepted streams with
    /// [`Input::PeerStreamAccepted`](super::super::Input::PeerStreamAccepted).
    pub stream_listeners: Vec<(Transport, SocketAddr)>,
    /// SHA-256 of the certificate the runtime presents on secured peer paths (its TLS peer
    /// stream listener, its DTLS or QUIC peer sessions), sent as the Certificate Fingerprint
    /// TLV; required with a TLS listener and with a DTLS or QUIC [`transport`](Self::transport).
    pub certificate_fingerprint: Option<[u8; 32]>,
    /// The peer transport this client offers on its peer UDP socket, sent as the transport of
    /// its Connection Info (`docs/PROTOCOL.md` §7.5): [`Transport::UDP`] (the default, plain
    /// signed envelopes), [`Transport::DTLS`] or [`Transport::QUIC`] (a session the runtime
    /// runs, see [`ClientEvent::OpenPeerSession`](super::super::ClientEvent::OpenPeerSession)).
    /// A peer tunnel runs secured only when both sides offer the same secure transport and
    /// both certificate fingerprints are known; otherwise it runs over plain UDP, unless
    /// [`require_secure`](Self::require_secure) is set.
    pub transport: Transport,
    /// Refuse peer tunnels that would not be secured (default false): such a negotiation ends
    /// at once, its flows stay on the relay, and it is counted in
    /// [`PeerStats::insecure_refused`](super::PeerStats::insecure_refused). Needs a DTLS or
    /// QUIC [`transport`](Self::transport).
    pub require_secure: bool,
    /// How long the initiator probes UDP candidates without an answer before it opens a
    /// stream to one of the peer's TCP or TLS candidates (default 500 ms).
    pub stream_fallback_delay: Duration,
    /// Peers with state at most (default 32, at most [`MAX_PEERS_LIMIT`](Self::MAX_PEERS_LIMIT));
    /// beyond, the one idle longest is forgotten.
    pub max_peers: usize,
}

impl PeerConfig {
    /// Most local addresses: a Candidate list holds 8, one is kept for the server-reflexive one.
    pub const MAX_LOCAL_ADDRESSES: usize = 7;
    /// Largest allowed [`max_peers`](Self::max_peers).
    pub const MAX_PEERS_LIMIT: usize = 1024;
    /// Most STUN servers.
    pub const MAX_STUN_SERVERS: usize = 8;
    /// Most peer stream listeners.
    pub const MAX_STREAM_LISTENERS: usize = 2;
    /// Largest allowed [`probe_transmissions`](Self::probe_transmissions).
    pub const MAX_PROBE_TRANSMISSIONS: u8 = 8;

    /// Whether [`transport`](Self::transport) is a secure one (DTLS or QUIC).
    pub fn offers_secure(&self) -> bool {
        is_secure(self.transport)
    }

    /// The defaults for a peer socket bound at `local_addresses`, asking `stun_servers`.
    pub fn new(local_addresses: Vec<SocketAddr>, stun_servers: Vec<SocketAddr>) -> Self {
        Self {
            local_addresses,
            stun_servers,
            default_opt_in: false,
            announce: true,
            probe_interval: Duration::from_millis(50),
            probe_transmissions: 5,
            probe_pacing: Duration::from_millis(10),
            probe_budget: ProbeBudget::default(),
            establish_timeout: Duration::from_secs(3),
            answer_timeout: Duration::from_secs(3),
            discovery_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_millis(500),
            silence_timeout: Duration::from_millis(1500),
            retry_backoff: (Duration::from_secs(2), Duration::from_secs(60)),
            keep_on_peer_server_tunnel_loss: false,
            stream_listeners: Vec::new(),
            certificate_fingerprint: None,
            transport: Transport::UDP,
            require_secure: false,
            stream_fallback_delay: Duration::from_millis(500),
            max_peers: 32,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.local_addresses.is_empty() || self.local_addresses.len() > Self::MAX_LOCAL_ADDRESSES
        {
            return Err(ConfigError::PeerLocalAddresses(self.local_addresses.len()));
        }
        if self.stun_servers.len() > Self::MAX_STUN_SERVERS {
            return Err(ConfigError::PeerStunServers(self.stun_servers.len()));
        }
        let timer = |d: Duration| !d.is_zero() && d <= Duration::from_secs(3600);
        let (initial, max) = self.retry_backoff;
        let timers = [
            self.probe_interval,
            self.probe_pacing,
            self.establish_timeout,
            self.answer_timeout,
            self.discovery_timeout,
            self.keepalive_interval,
            self.silence_timeout,
            self.stream_fallback_delay,
            initial,
            max,
        ];
        if !timers.into_iter().all(timer) || max < initial {
            return Err(ConfigError::PeerTimers);
        }
        let listeners_ok = self.stream_listeners.len() <= Self::MAX_STREAM_LISTENERS
            && self.stream_listeners.iter().all(|(t, a)| {
                a.port() != 0
                    && (*t == Transport::TCP
                        || (*t == Transport::TLS && self.certificate_fingerprint.is_some()))
            });
        if !listeners_ok {
            return Err(ConfigError::PeerStreamListeners);
        }
        let transport_ok = match self.transport {
            Transport::UDP => !self.require_secure,
            Transport::DTLS | Transport::QUIC => self.certificate_fingerprint.is_some(),
            _ => false,
        };
        if !transport_ok {
            return Err(ConfigError::PeerTransport(self.transport));
        }
        if !(1..=Self::MAX_PEERS_LIMIT).contains(&self.max_peers) {
            return Err(ConfigError::PeerMaxPeers(self.max_peers));
        }
        let budget = self.probe_budget;
        if !(1..=Self::MAX_PROBE_TRANSMISSIONS).contains(&self.probe_transmissions)
            || budget.burst == 0
            || budget.per_second == 0
        {
            return Err(ConfigError::PeerProbeBudget);
        }
        Ok(())
    }
}

/// The token bucket every Peer Probe of a client is paid from (`docs/PROTOCOL.md` §7.5), across
/// all its negotiations: a new request does not refill it. A probe that finds it empty waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeBudget {
    /// Probes the bucket holds (default 100).
    pub burst: u32,
    /// Probes it regains per second (default 20).
    pub per_second: u32,
}

impl Default for ProbeBudget {
    fn default() -> Self {
        Self {
            burst: 100,
            per_second: 20,
        }
    }
}

impl ProbeBudget {
    /// The time the bucket takes to regain one probe.
    pub(super) fn interval(&self) -> Duration {
        crate::rate::interval(self.per_second, Duration::from_secs(1))
    }
}

/// Whether `transport` is a secure peer transport (DTLS or QUIC, `docs/PROTOCOL.md` §7.5).
pub(super) fn is_secure(transport: Transport) -> bool {
    matches!(transport, Transport::DTLS | Transport::QUIC)
}
