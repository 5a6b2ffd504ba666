//! What a [`SessionDirector`](super::SessionDirector) is told at start.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;

use crate::cluster::ClusterConfig;
use crate::wire::{MAX_PAYLOAD_LEN, MIN_MAX_PACKET_SIZE};

/// The director's configuration. [`DirectorConfig::default`] is the embedded default: pools
/// `10.77.0.0/16` and `fd77::/48`, open admission (fit only for loopback; see
/// [`DirectorConfig::check_listeners`]).
#[derive(Clone, Debug)]
pub struct DirectorConfig {
    /// IPv4 pool for internal addresses; the network's first host address is the director's
    /// own and never assigned.
    pub ipv4_pool: Option<Ipv4Pool>,
    /// IPv6 pool for internal addresses.
    pub ipv6_pool: Option<Ipv6Pool>,
    /// DNS servers announced in Configuration Responses (at most 4 are sent).
    pub dns_servers: Vec<IpAddr>,
    /// Bounds and defaults of the keepalive interval.
    pub keepalive: KeepaliveConfig,
    /// A tunnel whose client sent nothing for this many keepalive intervals becomes persistent.
    pub idle_intervals: u32,
    /// How long a persistent tunnel waits for a re-attach before it is closed (default 330 s).
    pub persistence_timeout: Duration,
    /// How long a tunnel on UDP has to answer the director's Keepalive when a Configuration
    /// Request for a new tunnel comes from its address (default 1 s): a client that answers
    /// keeps its tunnel there; one that does not has left the address (it stopped, or its NAT
    /// gave the port to another host), and its tunnel goes persistent so that the newcomer's
    /// next request opens a tunnel (`docs/PROTOCOL.md` §3.3).
    pub address_check_timeout: Duration,
    /// Most tunnels held at once, active and persistent (default 200,000).
    pub max_tunnels: usize,
    /// Most connections that have not completed a Configuration exchange; beyond it the oldest
    /// is closed (default 4,096).
    pub max_pending_connections: usize,
    /// How long a connection may stay unconfigured before it is closed (default 10 s).
    pub pending_timeout: Duration,
    /// Who may open a tunnel.
    pub admission: Admission,
    /// Largest inner IP packet relayed, in octets (default 1400, at least 68); clients learn it
    /// from the Configuration Response and refuse larger packets themselves.
    pub max_packet_len: usize,
    /// Frames queued for one active tunnel before further frames are dropped (default 1024):
    /// the frames one input may bring for one destination before the runtime polls them, such
    /// as a 16 KiB stream read of small packets (528 at most).
    pub max_queued_frames: usize,
    /// Frames queued across all active tunnels before further frames are dropped (default
    /// 65,536). Frames for active tunnels leave the queue at the next poll; only those held
    /// for persistent tunnels stay, and they have bounds of their own, so that tunnels left
    /// persistent cannot fill this queue and stop all relaying.
    pub max_total_queued_frames: usize,
    /// Frames held for one persistent tunnel until it re-attaches (default 64, 1.3 s of a
    /// 50 packet/s stream); beyond, the oldest is dropped for each new one, so that the
    /// freshest reach the client.
    pub max_held_frames: usize,
    /// Frames held across all persistent tunnels (default 4,096); beyond, new frames for
    /// persistent tunnels are dropped.
    pub max_total_held_frames: usize,
    /// Offer the peer service (§7); when off, peer requests get Service Not Enabled.
    pub peer_tunneling: bool,
    /// The UDP port of the director's STUN responder, announced in the Configuration Response
    /// (STUN Port, PROTOCOL §3.3) so that clients on other transports can discover their NAT
    /// mapping: they ask the address they reached, on this port. The runtime sets it to its
    /// first UDP listener's port (default none).
    pub stun_port: Option<u16>,
    /// How long a destination has to answer a forwarded peer request (default 1 s).
    pub peer_answer_timeout: Duration,
    /// Peer requests one tunnel may make: a token bucket of this many, refilled at this many
    /// per `peer_request_window` (default 10, and 10 per 10 s: one per second). 0 refuses all.
    pub peer_request_limit: u16,
    /// The refill window of `peer_request_limit`.
    pub peer_request_window: Duration,
    /// Introductions of one initiator to one destination: a token bucket of this many,
    /// refilled at this many per `peer_introduction_window` (default 3, and 3 per 30 s: one
    /// every 10 s), so that one client cannot have another probe for it again and again.
    /// 0 refuses all.
    pub peer_introduction_limit: u16,
    /// The refill window of `peer_introduction_limit`.
    pub peer_introduction_window: Duration,
    /// Retransmission of director-originated requests on datagram transports (§6.3).
    pub retransmit: RetransmitConfig,
    /// Seed of the generator of tunnel ids, secrets and tokens. The runtime fills it from the
    /// operating system's secure source; tests fix it.
    pub rng_seed: [u8; 32],
    /// Membership of a cluster of directors sharing a registry (`docs/CLUSTER.md`); `None`
    /// (the default) runs the director alone.
    pub cluster: Option<ClusterConfig>,
}

impl Default for DirectorConfig {
    fn default() -> Self {
        Self {
            ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 77, 0, 0), 16)),
            ipv6_pool: Some(Ipv6Pool::new(
                Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0),
                48,
            )),
            dns_servers: Vec::new(),
            keepalive: KeepaliveConfig::default(),
            idle_intervals: 3,
            persistence_timeout: Duration::from_secs(330),
            address_check_timeout: Duration::from_secs(1),
            max_tunnels: 200_000,
            max_pending_connections: 4096,
            pending_timeout: Duration::from_secs(10),
            admission: Admission::default(),
            max_packet_len: 1400,
            max_queued_frames: 1024,
            max_total_queued_frames: 65_536,
            max_held_frames: 64,
            max_total_held_frames: 4096,
            peer_tunneling: true,
            stun_port: None,
            peer_answer_timeout: Duration::from_secs(1),
            peer_request_limit: 10,
            peer_request_window: Duration::from_secs(10),
            peer_introduction_limit: 3,
            peer_introduction_window: Duration::from_secs(30),
            retransmit: RetransmitConfig::default(),
            rng_seed: [0; 32],
            cluster: None,
        }
    }
}

/// A configuration the director refuses to run with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirectorConfigError {
    /// Neither pool is configured, or a pool's prefix is out of range.
    #[error("no usable address pool: {0}")]
    Pool(&'static str),
    /// A listener beyond loopback with open admission would be an open relay.
    #[error(
        "listener {0} is reachable beyond loopback but admission is open; \
         configure an auth token or client certificates"
    )]
    OpenRelay(SocketAddr),
    /// A bound is zero or the keepalive bounds are inverted.
    #[error("invalid setting: {0}")]
    Invalid(&'static str),
}

impl DirectorConfig {
    /// Allowed `max_packet_len` values: the smallest IPv4 MTU up to what one envelope holds
    /// (the bound goes to clients in a Maximum Packet Size TLV, PROTOCOL §3.3).
    pub const MAX_PACKET_LEN: core::ops::RangeInclusive<usize> =
        (MIN_MAX_PACKET_SIZE as usize)..=MAX_PAYLOAD_LEN;

    /// Checks the settings the director depends on.
    pub fn validate(&self) -> Result<(), DirectorConfigError> {
        if self.ipv4_pool.is_none() && self.ipv6_pool.is_none() {
            return Err(DirectorConfigError::Pool("configure an IPv4 or IPv6 pool"));
        }
        if let Some(p) = &self.ipv4_pool {
            if !(8..=30).contains(&p.prefix_len) {
                return Err(DirectorConfigError::Pool("IPv4 prefix must be /8 to /30"));
            }
        }
        if let Some(p) = &self.ipv6_pool {
            if !(16..=120).contains(&p.prefix_len) {
                return Err(DirectorConfigError::Pool("IPv6 prefix must be /16 to /120"));
            }
        }
        let k = &self.keepalive;
        if k.min.is_zero() || k.min > k.max {
            return Err(DirectorConfigError::Invalid(
                "keepalive min must be > 0 and <= max",
            ));
        }
        if self.max_tunnels == 0 || self.max_pending_connections == 0 || self.idle_intervals == 0 {
            return Err(DirectorConfigError::Invalid(
                "tunnel and connection limits must be > 0",
            ));
        }
        if self
            .admission
            .tokens
            .iter()
            .any(|t| !Admission::TOKEN_LEN.contains(&t.len()))
        {
            return Err(DirectorConfigError::Invalid(
                "auth tokens must be 16 to 255 octets long",
            ));
        }
        if self.max_queued_frames == 0 {
            return Err(DirectorConfigError::Invalid(
                "max_queued_frames must be > 0",
            ));
        }
        if !Self::MAX_PACKET_LEN.contains(&self.max_packet_len) {
            return Err(DirectorConfigError::Invalid(
                "max_packet_len must be 68 to 65,532 octets",
            ));
        }
        Ok(())
    }

    /// Refuses open admission on any listener reachable beyond loopback: a director open to
    /// anyone is an open relay.
    pub fn check_listeners(&self, listeners: &[SocketAddr]) -> Result<(), DirectorConfigError> {
        if self.admission.is_open() {
            if let Some(addr) = listeners.iter().find(|a| !a.ip().is_loopback()) {
                return Err(DirectorConfigError::OpenRelay(*addr));
            }
        }
        Ok(())
    }
}

/// Who may open a tunnel. Open (no token, no certificates) when both are empty.
#[derive(Clone, Debug)]
pub struct Admission {
    /// Auth Tokens that admit a client, each [`Self::TOKEN_LEN`] octets long. The director
    /// compares the SHA-256 of the token presented with each one's in constant time, so that
    /// neither a token's content nor its length leaks through timing.
    pub tokens: Vec<Vec<u8>>,
    /// Admit a client whose TLS certificate the runtime verified (mutual TLS).
    pub verified_identities: bool,
    /// Failed admissions (a wrong or missing token, a wrong re-attach secret) one source IP
    /// address may make per [`failure_window`](Self::failure_window) (default 10); beyond,
    /// its Configuration Requests are answered Rate Limited (12) unchecked until the window
    /// ends.
    pub failure_limit: u16,
    /// The window of `failure_limit` (default 60 s).
    pub failure_window: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            verified_identities: false,
            failure_limit: 10,
            failure_window: Duration::from_secs(60),
        }
    }
}

impl Admission {
    /// Allowed lengths of an Auth Token: at least 16 octets, so that guessing one is out of
    /// reach (a random 22-character base64 string is 132 bits), and at most what one TLV
    /// holds comfortably.
    pub const TOKEN_LEN: core::ops::RangeInclusive<usize> = 16..=255;

    /// Whether anyone may open a tunnel.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && !self.verified_identities
    }
}

/// Keepalive interval bounds (§3.3).
#[derive(Clone, Copy, Debug)]
pub struct KeepaliveConfig {
    /// Shortest interval granted (default 5 s).
    pub min: Duration,
    /// Longest interval granted (default 600 s).
    pub max: Duration,
    /// Granted on stream transports when the client proposes none (default 300 s).
    pub default_stream: Duration,
    /// Granted on datagram transports when the client proposes none (default 30 s: NAT
    /// mappings of UDP expire quickly).
    pub default_datagram: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(5),
            max: Duration::from_secs(600),
            default_stream: Duration::from_secs(300),
            default_datagram: Duration::from_secs(30),
        }
    }
}

/// Retransmission of requests on datagram transports (§6.3).
#[derive(Clone, Copy, Debug)]
pub struct RetransmitConfig {
    /// First retransmission timeout (default 250 ms).
    pub initial_rto: Duration,
    /// Cap of the doubling timeout (default 4 s).
    pub max_rto: Duration,
    /// Transmissions in all, the first included (default 7).
    pub max_transmissions: u32,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        Self {
            initial_rto: Duration::from_millis(250),
            max_rto: Duration::from_secs(4),
            max_transmissions: 7,
        }
    }
}

impl RetransmitConfig {
    /// The timeout after transmission number `sent` (1-based).
    pub fn rto(&self, sent: u32) -> Duration {
        let doublings = sent.saturating_sub(1).min(16);
        self.initial_rto
            .saturating_mul(1 << doublings)
            .min(self.max_rto)
    }
}

/// An IPv4 network from which internal addresses are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Pool {
    /// The network address.
    pub network: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

impl Ipv4Pool {
    /// The pool `network/prefix_len` (host bits of `network` are ignored).
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Self {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len.min(32)))
            .unwrap_or(0);
        Self {
            network: Ipv4Addr::from(u32::from(network) & mask),
            prefix_len,
        }
    }
}

/// An IPv6 network from which internal addresses are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Pool {
    /// The network address.
    pub network: Ipv6Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

impl Ipv6Pool {
    /// The pool `network/prefix_len` (host bits of `network` are ignored).
    pub fn new(network: Ipv6Addr, prefix_len: u8) -> Self {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(prefix_len.min(128)))
            .unwrap_or(0);
        Self {
            network: Ipv6Addr::from(u128::from(network) & mask),
            prefix_len,
        }
    }
}
