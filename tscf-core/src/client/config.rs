//! Configuration of a [`TunnelClient`](super::TunnelClient).

use core::net::SocketAddr;
use core::time::Duration;

use super::peer::PeerConfig;
use crate::wire::{
    Capabilities, Transport, KEEPALIVE_INTERVAL_RANGE_MS, MAX_AUTH_TOKEN_LEN, MAX_TEXT_LEN,
};

/// A tunnel server (session director) the client may use: where it listens and over what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerEndpoint {
    /// The server's address and port.
    pub addr: SocketAddr,
    /// The transport the runtime opens to it. Datagram transports ([`Transport::is_datagram`])
    /// get retransmissions (`docs/PROTOCOL.md` §6.3); stream transports a response timeout.
    pub transport: Transport,
}

/// Configuration of a [`TunnelClient`](super::TunnelClient). Build it with [`ClientConfig::new`]
/// and change the fields that matter; [`TunnelClient::new`](super::TunnelClient::new) checks
/// every bound and refuses a configuration it cannot honour with a [`ConfigError`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Servers tried in order (1 to [`MAX_SERVERS`](Self::MAX_SERVERS)).
    pub servers: Vec<ServerEndpoint>,
    /// Admission credential sent as Auth Token (1 to 1024 octets), if the server wants one.
    pub auth_token: Option<Vec<u8>>,
    /// Keepalive interval proposed in the Configuration Request (100 ms to one day); the server
    /// answers with the one it will use, within its bounds (tscf's: 5 s to 600 s). `None`
    /// proposes [`NAT_KEEPALIVE_INTERVAL`](super::NAT_KEEPALIVE_INTERVAL) (20 s) on UDP and
    /// DTLS, so that the NAT mapping of the server transport outlives a silence in the
    /// many NATs that keep one-way UDP mappings 30 s (WebRTC keeps its mappings with 15 s,
    /// Tailscale with 25 s), and lets the server choose on stream transports and QUIC. The
    /// keepalive goes out only after an interval in which the client sent nothing to the
    /// server; peer tunnels keep their own mappings with their own keepalives
    /// ([`PeerConfig::keepalive_interval`]).
    pub keepalive_interval: Option<Duration>,
    /// Capability bits announced in the Configuration Request. Empty by default;
    /// `PEER_TUNNELING` is added when [`peer`](Self::peer) is set.
    pub capabilities: Capabilities,
    /// First retransmission timeout of a request on a datagram transport (default 250 ms).
    pub initial_rto: Duration,
    /// Cap on the doubling retransmission timeout (default 4 s).
    pub max_rto: Duration,
    /// Transmissions of one request on a datagram transport, the first included (default 7,
    /// at most [`MAX_TRANSMISSIONS_LIMIT`](Self::MAX_TRANSMISSIONS_LIMIT)). The request fails
    /// one (capped) timeout after the last.
    pub max_transmissions: u32,
    /// With more than one server, transmissions of a request on a datagram transport that
    /// tell whether the tunnel's server is still there: the Keepalive of a connected tunnel
    /// (the roaming probe among them) and the Configuration Request of each attempt to
    /// re-attach (default 3, 1 to [`MAX_TRANSMISSIONS_LIMIT`](Self::MAX_TRANSMISSIONS_LIMIT),
    /// never more than [`max_transmissions`](Self::max_transmissions)). At the default
    /// timeouts three transmissions fail 1.75 s after the first (250 + 500 + 1000 ms)
    /// instead of 15.75 s, so that a client of a cluster whose director died silently
    /// re-attaches to another in a few seconds. With one server, whose return is all the
    /// client can wait for, every request gets `max_transmissions`.
    pub failover_transmissions: u32,
    /// On a stream transport, how long a request waits for its response (default 10 s).
    pub response_timeout: Duration,
    /// Wait before a new round of connection attempts: initial and maximum (defaults 100 ms
    /// and 10 s); it doubles on every round that fails and resets on success.
    pub reconnect_backoff: (Duration, Duration),
    /// Keepalive intervals of silence from the server after which the transport counts as lost
    /// (default 3, `docs/PROTOCOL.md` §3.5).
    pub silence_intervals: u32,
    /// On a UDP transport, how long a silence from the server makes the client send a
    /// Keepalive before its next data (default 500 ms; `None` never does): if the client's
    /// address changed meanwhile (a NAT rebinding, a new network), that authenticated request
    /// moves its tunnel to the new address at once, so that the data after it goes through
    /// (`docs/PROTOCOL.md` §3.4). A client that only sends pays one keepalive per interval.
    /// On DTLS too when more than one server is listed: there the Keepalive tells a server
    /// that went silent (see [`failover_transmissions`](Self::failover_transmissions)).
    pub roaming_probe_after: Option<Duration>,
    /// Bound of each packet queue: packets waiting to be sent (for instance while re-attaching)
    /// and packets received but not yet read (default 256, at most
    /// [`MAX_QUEUED_PACKETS_LIMIT`](Self::MAX_QUEUED_PACKETS_LIMIT)).
    pub max_queued_packets: usize,
    /// Seed of the ChaCha20 generator everything the client draws comes from: its first
    /// sequence number and, with peer tunneling, STUN transaction ids and tie-breakers. The
    /// runtime fills it from the operating system's secure source, so that off-path senders
    /// cannot guess the sequence of a request on UDP; tests fix it.
    pub rng_seed: [u8; 32],
    /// Sent as the Software TLV (at most 255 octets of UTF-8).
    pub software: Option<String>,
    /// Peer tunneling (`docs/PROTOCOL.md` §7); `None` (the default) turns it off, and the
    /// client then refuses the director's peer requests with Peer Unavailable.
    pub peer: Option<PeerConfig>,
}

impl ClientConfig {
    /// Most servers a configuration may list.
    pub const MAX_SERVERS: usize = 8;
    /// Most transmissions of one request.
    pub const MAX_TRANSMISSIONS_LIMIT: u32 = 16;
    /// Largest allowed [`max_queued_packets`](Self::max_queued_packets).
    pub const MAX_QUEUED_PACKETS_LIMIT: usize = 65_536;
    /// Largest allowed timer setting (RTOs, response timeout, backoff).
    pub const MAX_TIMER: Duration = Duration::from_secs(3600);

    /// The defaults of `docs/PROTOCOL.md` for the given servers.
    pub fn new(servers: Vec<ServerEndpoint>) -> Self {
        Self {
            servers,
            auth_token: None,
            keepalive_interval: None,
            capabilities: Capabilities::default(),
            initial_rto: Duration::from_millis(250),
            max_rto: Duration::from_secs(4),
            max_transmissions: 7,
            failover_transmissions: 3,
            response_timeout: Duration::from_secs(10),
            reconnect_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            silence_intervals: 3,
            roaming_probe_after: Some(Duration::from_millis(500)),
            max_queued_packets: 256,
            rng_seed: [0; 32],
            software: Some(concat!("tscf/", env!("CARGO_PKG_VERSION")).to_owned()),
            peer: None,
        }
    }

    /// Checks every bound.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::NoServers);
        }
        if self.servers.len() > Self::MAX_SERVERS {
            return Err(ConfigError::TooManyServers(self.servers.len()));
        }
        if let Some(token) = &self.auth_token {
            if token.is_empty() || token.len() > MAX_AUTH_TOKEN_LEN {
                return Err(ConfigError::AuthTokenLength(token.len()));
            }
        }
        if let Some(software) = &self.software {
            if software.len() > MAX_TEXT_LEN {
                return Err(ConfigError::SoftwareTooLong(software.len()));
            }
        }
        if let Some(interval) = self.keepalive_interval {
            let ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
            if !KEEPALIVE_INTERVAL_RANGE_MS.contains(&ms) {
                return Err(ConfigError::KeepaliveInterval(interval));
            }
        }
        let timer = |d: Duration| !d.is_zero() && d <= Self::MAX_TIMER;
        if !timer(self.initial_rto) || !timer(self.max_rto) || self.max_rto < self.initial_rto {
            return Err(ConfigError::Rto);
        }
        if !(1..=Self::MAX_TRANSMISSIONS_LIMIT).contains(&self.max_transmissions) {
            return Err(ConfigError::MaxTransmissions(self.max_transmissions));
        }
        if !(1..=Self::MAX_TRANSMISSIONS_LIMIT).contains(&self.failover_transmissions) {
            return Err(ConfigError::FailoverTransmissions(
                self.failover_transmissions,
            ));
        }
        if !timer(self.response_timeout) {
            return Err(ConfigError::ResponseTimeout(self.response_timeout));
        }
        let (initial, max) = self.reconnect_backoff;
        if !timer(initial) || !timer(max) || max < initial {
            return Err(ConfigError::ReconnectBackoff);
        }
        if !(1..=1000).contains(&self.silence_intervals) {
            return Err(ConfigError::SilenceIntervals(self.silence_intervals));
        }
        if self.roaming_probe_after.is_some_and(|d| !timer(d)) {
            return Err(ConfigError::RoamingProbe);
        }
        if !(1..=Self::MAX_QUEUED_PACKETS_LIMIT).contains(&self.max_queued_packets) {
            return Err(ConfigError::MaxQueuedPackets(self.max_queued_packets));
        }
        if let Some(peer) = &self.peer {
            peer.validate()?;
        }
        Ok(())
    }
}

/// Why [`TunnelClient::new`](super::TunnelClient::new) refused a [`ClientConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `servers` is empty.
    #[error("no server configured")]
    NoServers,
    /// More than [`ClientConfig::MAX_SERVERS`] servers.
    #[error("{0} servers configured, at most {max} allowed", max = ClientConfig::MAX_SERVERS)]
    TooManyServers(usize),
    /// The Auth Token is empty or longer than 1024 octets.
    #[error("auth token of {0} octets, must be 1 to {MAX_AUTH_TOKEN_LEN}")]
    AuthTokenLength(usize),
    /// The Software text is longer than 255 octets.
    #[error("software name of {0} octets, at most {MAX_TEXT_LEN} allowed")]
    SoftwareTooLong(usize),
    /// The proposed keepalive interval is outside 100 ms to one day.
    #[error("keepalive interval {0:?} outside 100 ms to one day")]
    KeepaliveInterval(Duration),
    /// `initial_rto` or `max_rto` is zero, above an hour, or `max_rto < initial_rto`.
    #[error("retransmission timeouts must satisfy 0 < initial_rto <= max_rto <= 1 h")]
    Rto,
    /// `max_transmissions` is 0 or above [`ClientConfig::MAX_TRANSMISSIONS_LIMIT`].
    #[error("max_transmissions {0} outside 1 to {max}", max = ClientConfig::MAX_TRANSMISSIONS_LIMIT)]
    MaxTransmissions(u32),
    /// `failover_transmissions` is 0 or above [`ClientConfig::MAX_TRANSMISSIONS_LIMIT`].
    #[error("failover_transmissions {0} outside 1 to {max}", max = ClientConfig::MAX_TRANSMISSIONS_LIMIT)]
    FailoverTransmissions(u32),
    /// `response_timeout` is zero or above an hour.
    #[error("response timeout {0:?} must be above zero and at most 1 h")]
    ResponseTimeout(Duration),
    /// The reconnect backoff is zero, above an hour, or its maximum is below its start.
    #[error("reconnect backoff must satisfy 0 < initial <= max <= 1 h")]
    ReconnectBackoff,
    /// `silence_intervals` is 0 or above 1000.
    #[error("silence_intervals {0} outside 1 to 1000")]
    SilenceIntervals(u32),
    /// `roaming_probe_after` is zero or above an hour.
    #[error("roaming_probe_after must be above zero and at most 1 h")]
    RoamingProbe,
    /// `max_queued_packets` is 0 or above [`ClientConfig::MAX_QUEUED_PACKETS_LIMIT`].
    #[error("max_queued_packets {0} outside 1 to {max}", max = ClientConfig::MAX_QUEUED_PACKETS_LIMIT)]
    MaxQueuedPackets(usize),
    /// [`PeerConfig::local_addresses`] is empty or longer than
    /// [`PeerConfig::MAX_LOCAL_ADDRESSES`].
    #[error("{0} peer socket addresses, must be 1 to {max}", max = PeerConfig::MAX_LOCAL_ADDRESSES)]
    PeerLocalAddresses(usize),
    /// More than [`PeerConfig::MAX_STUN_SERVERS`] STUN servers.
    #[error("{0} STUN servers, at most {max} allowed", max = PeerConfig::MAX_STUN_SERVERS)]
    PeerStunServers(usize),
    /// More than [`PeerConfig::MAX_STREAM_LISTENERS`] peer stream listeners, one whose
    /// transport is neither TCP nor TLS or whose port is 0, or a TLS one without
    /// [`PeerConfig::certificate_fingerprint`].
    #[error(
        "peer stream listeners: at most 2, TCP or TLS (with a certificate fingerprint), port != 0"
    )]
    PeerStreamListeners,
    /// A peer timer is zero or above an hour, or the retry backoff's maximum is below its start.
    #[error("peer timers must be above zero and at most 1 h, backoff start <= max")]
    PeerTimers,
    /// [`PeerConfig::max_peers`] is 0 or above [`PeerConfig::MAX_PEERS_LIMIT`].
    #[error("max_peers {0} outside 1 to {max}", max = PeerConfig::MAX_PEERS_LIMIT)]
    PeerMaxPeers(usize),
    /// [`PeerConfig::probe_transmissions`] is 0 or above
    /// [`PeerConfig::MAX_PROBE_TRANSMISSIONS`], or a [`PeerConfig::probe_budget`] figure is 0.
    #[error(
        "probe_transmissions must be 1 to {max}, the probe budget's burst and rate above 0",
        max = PeerConfig::MAX_PROBE_TRANSMISSIONS
    )]
    PeerProbeBudget,
    /// [`PeerConfig::transport`] is not UDP, DTLS or QUIC; or DTLS or QUIC without
    /// [`PeerConfig::certificate_fingerprint`]; or [`PeerConfig::require_secure`] with UDP.
    #[error(
        "peer transport {0}: must be UDP, DTLS or QUIC; DTLS and QUIC need a certificate \
         fingerprint, require_secure needs DTLS or QUIC"
    )]
    PeerTransport(crate::wire::Transport),
}
