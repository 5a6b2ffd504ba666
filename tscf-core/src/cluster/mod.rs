//! A cluster of session directors (`docs/CLUSTER.md`): the vocabulary between a director and
//! the registry the directors share, the records kept there, and the in-memory registry the
//! simulator and the tests use.
//!
//! The registry holds the cluster-wide state: which director lives where (its mesh address,
//! under a lease it renews), which addresses of the pools are taken and by whom (claimed one at
//! a time, atomically), and a record of every tunnel: its id, its internal addresses, the salt
//! its control key derives from, and its owning director, under a lease its owner renews. A
//! director never blocks on the registry: it queues [`RegistryRequest`]s that the runtime
//! executes (against Redis or Valkey in `tscf-runtime-smol`, against [`MemoryRegistry`] in the
//! simulator) and feeds each [`RegistryResponse`] back, like any other input.
//!
//! No secret is stored there. A tunnel's control key is derived from the cluster secret, which
//! only the directors hold, and the salt of its record ([`control_key`]): whoever reads the
//! registry can neither re-attach a tunnel nor sign its messages.

mod memory;
mod mesh;

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::CONTROL_KEY_LEN;

pub use memory::MemoryRegistry;
pub use mesh::{BadMeshMessage, MeshMessage, MAX_PEER_GONE_PARTNERS};

/// The length of a tunnel record's salt.
pub const SALT_LEN: usize = 16;

/// The name of a director in its cluster: 1 to 63 octets of lowercase ASCII letters, digits
/// and `-`, so that it can be a key of the registry and a DNS name of its certificate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirectorName(String);

impl DirectorName {
    /// Longest name.
    pub const MAX_LEN: usize = 63;

    /// `name`, if it is one.
    pub fn new(name: &str) -> Result<Self, BadName> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(BadName)
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DirectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DirectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A director name that is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a director name is 1 to 63 characters of a-z, 0-9 and '-'")]
pub struct BadName;

/// How a director takes part in a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    /// This director's name, unique in the cluster.
    pub name: DirectorName,
    /// The secret every director of the cluster shares; tunnels' control keys derive from it.
    pub secret: [u8; 32],
    /// Where the other directors reach this one's mesh listener.
    pub mesh: SocketAddr,
    /// How often the director renews its lease and learns the others (default 1 s).
    pub heartbeat: Duration,
    /// A director that did not renew its lease for this long is taken for dead (default 3 s).
    pub director_lease: Duration,
    /// The lease of tunnel records and address claims, renewed by their owner every
    /// `heartbeat`; a record outlives its dead owner by this long (default: the director's
    /// persistence timeout), which is how long its client has to re-attach elsewhere.
    pub tunnel_lease: Duration,
    /// Addresses of each family claimed ahead of need (default 32), so that a Configuration
    /// Request never waits for the registry.
    pub address_stock: usize,
    /// How long a route learned from the registry (the director that holds an address) is
    /// used before it is asked again (default 10 s); also the life of a negative answer.
    pub route_ttl: Duration,
    /// Registry requests in flight at most (default 1024); beyond, lookups wait or are
    /// refused, counted.
    pub max_in_flight: usize,
    /// Registry lookups a second, at most, for re-attaches of tunnels this director does not
    /// hold (default 20,000, in bursts of as many): what anyone who can send a Configuration
    /// Request can make the registry do is bounded (a lookup costs Redis about 6 µs, so at
    /// most about 12 % of a core), while the tunnels of a dead director at its 200,000 still
    /// come over within about ten seconds. A re-attach beyond it is dropped unanswered,
    /// counted; its client retransmits.
    pub max_lookup_rate: u32,
}

impl ClusterConfig {
    /// A configuration with the defaults.
    pub fn new(name: DirectorName, secret: [u8; 32], mesh: SocketAddr) -> Self {
        Self {
            name,
            secret,
            mesh,
            heartbeat: Duration::from_secs(1),
            director_lease: Duration::from_secs(3),
            tunnel_lease: Duration::from_secs(330),
            address_stock: 32,
            route_ttl: Duration::from_secs(10),
            max_in_flight: 1024,
            max_lookup_rate: 20_000,
        }
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("secret", &"…")
            .field("mesh", &self.mesh)
            .field("heartbeat", &self.heartbeat)
            .field("director_lease", &self.director_lease)
            .field("tunnel_lease", &self.tunnel_lease)
            .field("address_stock", &self.address_stock)
            .field("route_ttl", &self.route_ttl)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_lookup_rate", &self.max_lookup_rate)
            .finish()
    }
}

/// The control key of tunnel `id` whose record has `salt`, under the cluster's `secret`:
/// HMAC-SHA256(secret, "tscf cluster control key" ‖ id ‖ salt), truncated.
pub fn control_key(secret: &[u8; 32], id: u64, salt: &[u8; SALT_LEN]) -> [u8; CONTROL_KEY_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(b"tscf cluster control key");
    mac.update(&id.to_be_bytes());
    mac.update(salt);
    let full = mac.finalize().into_bytes();
    let mut key = [0u8; CONTROL_KEY_LEN];
    key.copy_from_slice(&full[..CONTROL_KEY_LEN]);
    key
}

/// Names one registry request, so that its response finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What the registry keeps of a tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelRecord {
    /// The tunnel id.
    pub id: u64,
    /// Its internal IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Its internal IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// The salt its control key derives from ([`control_key`]).
    pub salt: [u8; SALT_LEN],
    /// The director that holds it.
    pub owner: DirectorName,
}

impl TunnelRecord {
    /// Its internal addresses.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        let v4 = self.ipv4.map(IpAddr::V4);
        let v6 = self.ipv6.map(IpAddr::V6);
        v4.into_iter().chain(v6)
    }

    /// The record as the registry stores it: `owner ipv4 ipv6 salt`, space-separated, `-` for
    /// an address it does not have, the salt in hex.
    pub fn to_value(&self) -> String {
        let v4 = self.ipv4.map_or_else(|| "-".to_owned(), |a| a.to_string());
        let v6 = self.ipv6.map_or_else(|| "-".to_owned(), |a| a.to_string());
        let salt: String = self.salt.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {v4} {v6} {salt}", self.owner)
    }

    /// A record of tunnel `id` from what [`to_value`](Self::to_value) wrote; `None` if it is
    /// not one (a registry shared with something else, or damaged).
    pub fn from_value(id: u64, value: &str) -> Option<Self> {
        let mut parts = value.split(' ');
        let owner = DirectorName::new(parts.next()?).ok()?;
        let ipv4 = match parts.next()? {
            "-" => None,
            a => Some(a.parse().ok()?),
        };
        let ipv6 = match parts.next()? {
            "-" => None,
            a => Some(a.parse().ok()?),
        };
        let hex = parts.next()?;
        if parts.next().is_some() || hex.len() != 2 * SALT_LEN {
            return None;
        }
        let mut salt = [0u8; SALT_LEN];
        for (k, byte) in salt.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * k..2 * k + 2)?, 16).ok()?;
        }
        Some(Self {
            id,
            ipv4,
            ipv6,
            salt,
            owner,
        })
    }
}

/// Who holds an internal address, as the registry says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressHolder {
    /// The director that claimed it or holds its tunnel.
    pub owner: DirectorName,
    /// Its tunnel, once it has one (0: claimed, not yet given to a tunnel).
    pub tunnel: u64,
}

impl AddressHolder {
    /// As the registry stores it: `owner tunnel-id-in-hex`.
    pub fn to_value(&self) -> String {
        format!("{} {:x}", self.owner, self.tunnel)
    }

    /// From what [`to_value`](Self::to_value) wrote.
    pub fn from_value(value: &str) -> Option<Self> {
        let (owner, tunnel) = value.split_once(' ')?;
        Some(Self {
            owner: DirectorName::new(owner).ok()?,
            tunnel: u64::from_str_radix(tunnel, 16).ok()?,
        })
    }
}

/// One operation on the registry. Each is atomic on its own (one Redis transaction or
/// script); nothing spans two.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryRequest {
    /// Renew director `name`'s lease at mesh address `mesh` for `lease`; answered with
    /// [`RegistryResponse::Directors`], the directors whose lease runs.
    Heartbeat {
        /// This director.
        name: DirectorName,
        /// Its mesh address.
        mesh: SocketAddr,
        /// How long the lease runs from now.
        lease: Duration,
    },
    /// Take `addr` for `owner` if nobody holds it, for `lease`; answered with
    /// [`RegistryResponse::Claimed`].
    Claim {
        /// The address.
        addr: IpAddr,
        /// The claiming director.
        owner: DirectorName,
        /// How long the claim holds unless renewed or given to a tunnel.
        lease: Duration,
    },
    /// Write a tunnel's record and point its addresses at it, for `lease` (a director adopting
    /// a tunnel writes it with itself as owner); answered with [`RegistryResponse::Done`].
    Put {
        /// The record.
        record: TunnelRecord,
        /// How long it holds unless renewed.
        lease: Duration,
    },
    /// Renew the leases of `owner`'s tunnels and claims; ids and addresses that another
    /// director holds by now are left alone. Answered with [`RegistryResponse::Done`].
    Renew {
        /// The renewing director.
        owner: DirectorName,
        /// Its tunnels.
        tunnels: Vec<u64>,
        /// Its addresses (of its tunnels and its stock).
        addresses: Vec<IpAddr>,
        /// How long they hold from now.
        lease: Duration,
    },
    /// Remove tunnel `id` and free `addresses`, if `owner` still holds them (a tunnel adopted
    /// elsewhere stays). Answered with [`RegistryResponse::Done`].
    Remove {
        /// The tunnel.
        id: u64,
        /// Its addresses.
        addresses: Vec<IpAddr>,
        /// The director removing it.
        owner: DirectorName,
    },
    /// Tunnel `id`'s record; answered with [`RegistryResponse::Tunnel`].
    GetTunnel {
        /// The tunnel.
        id: u64,
    },
    /// Who holds `addr`; answered with [`RegistryResponse::Address`].
    GetAddress {
        /// The address.
        addr: IpAddr,
    },
}

/// The registry's answer to a [`RegistryRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryResponse {
    /// The directors alive, with their mesh addresses (the asking one included).
    Directors(Vec<(DirectorName, SocketAddr)>),
    /// Whether the address is now the claimant's.
    Claimed(bool),
    /// Done.
    Done,
    /// The tunnel's record, if there is one.
    Tunnel(Option<TunnelRecord>),
    /// The address's holder, if any.
    Address(Option<AddressHolder>),
    /// The registry could not be reached or refused; why, as text.
    Failed(String),
}
