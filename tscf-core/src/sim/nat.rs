//! NAT boxes in RFC 4787 terms: mapping behaviour, filtering behaviour, mapping timeout,
//! port preservation and hairpinning.
//!
//! Only UDP is translated through the mapping table. Streams get a public port from a separate
//! pool that lives as long as the stream (a TCP mapping is kept alive by its connection).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use super::link::SimRng;
use super::DropReason;

/// NAT behaviour, named after the RFC 4787 mapping and filtering behaviours it combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering ("full cone"): once mapped, anyone may send in.
    EndpointIndependent,
    /// Endpoint-independent mapping, address-dependent filtering ("restricted cone"): inbound
    /// is accepted from any port of an IP address the host has sent to.
    AddressDependentFiltering,
    /// Endpoint-independent mapping, address-and-port-dependent filtering ("port-restricted
    /// cone"): inbound is accepted only from exact endpoints the host has sent to.
    AddressPortDependentFiltering,
    /// Address-and-port-dependent mapping and filtering: a new mapping, with a port drawn from the
    /// simulation RNG, per destination endpoint.
    Symmetric,
}

impl NatKind {
    /// All kinds, for table-driven tests.
    pub const ALL: [NatKind; 4] = [
        NatKind::EndpointIndependent,
        NatKind::AddressDependentFiltering,
        NatKind::AddressPortDependentFiltering,
        NatKind::Symmetric,
    ];

    /// Whether one mapping serves every destination (RFC 4787 "endpoint-independent mapping").
    pub fn endpoint_independent_mapping(self) -> bool {
        !matches!(self, NatKind::Symmetric)
    }
}

/// Configuration of a site's NAT box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// Mapping and filtering behaviour.
    pub kind: NatKind,
    /// The single public address of the NAT; it must be unique in the network.
    pub public_ip: IpAddr,
    /// A UDP mapping expires after this long without outbound traffic (inbound does not refresh).
    pub mapping_timeout: Duration,
    /// Whether a host may reach another host of the same site through the public address.
    pub hairpin: bool,
    /// Public ports handed out. Endpoint-independent kinds keep the internal port when it is in
    /// this range and free.
    pub port_range: RangeInclusive<u16>,
}

impl NatConfig {
    /// A NAT of `kind` on `public_ip` with a 30 s mapping timeout, no hairpinning and public ports
    /// `1024..=65535`.
    pub fn new(kind: NatKind, public_ip: IpAddr) -> Self {
        Self {
            kind,
            public_ip,
            mapping_timeout: Duration::from_secs(30),
            hairpin: false,
            port_range: 1024..=65535,
        }
    }
}

/// One UDP mapping.
#[derive(Debug)]
struct Mapping {
    /// The internal endpoint; with `remote` it is the key into `Nat::by_internal`.
    internal: SocketAddr,
    /// The destination this mapping is dedicated to (symmetric NAT only).
    remote: Option<SocketAddr>,
    /// Remote endpoints the host has sent to through this mapping; inbound filtering checks them.
    permits: BTreeSet<SocketAddr>,
    last_outbound: Instant,
}

type InternalKey = (SocketAddr, Option<SocketAddr>);

/// State of one NAT box.
#[derive(Debug)]
pub(super) struct Nat {
    pub(super) cfg: NatConfig,
    by_public: BTreeMap<u16, Mapping>,
    by_internal: BTreeMap<InternalKey, u16>,
    /// Public ports held by streams.
    stream_ports: BTreeSet<u16>,
    /// Expired mappings are removed lazily; a full sweep at most once per timeout bounds memory.
    next_sweep: Instant,
}

/// Random draws before falling back to a scan when looking for a free public port.
const RANDOM_PORT_TRIES: usize = 16;

impl Nat {
    pub(super) fn new(cfg: NatConfig, now: Instant) -> Self {
        Self {
            cfg,
            by_public: BTreeMap::new(),
            by_internal: BTreeMap::new(),
            stream_ports: BTreeSet::new(),
            next_sweep: now,
        }
    }

    fn expired(&self, m: &Mapping, now: Instant) -> bool {
        now.saturating_duration_since(m.last_outbound) >= self.cfg.mapping_timeout
    }

    fn key(&self, internal: SocketAddr, remote: SocketAddr) -> InternalKey {
        if self.cfg.kind.endpoint_independent_mapping() {
            (internal, None)
        } else {
            (internal, Some(remote))
        }
    }

    fn remove(&mut self, port: u16) {
        if let Some(m) = self.by_public.remove(&port) {
            self.by_internal.remove(&(m.internal, m.remote));
        }
    }

    fn sweep(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        let timeout = self.cfg.mapping_timeout;
        let dead: Vec<u16> = self
            .by_public
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_outbound) >= timeout)
            .map(|(&p, _)| p)
            .collect();
        for p in dead {
            self.remove(p);
        }
        self.next_sweep = now.checked_add(timeout).unwrap_or(now);
    }

    /// Translates an outbound datagram, creating or refreshing its mapping; returns the public
    /// source endpoint.
    pub(super) fn outbound(
        &mut self,
        internal: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        rng: &mut SimRng,
    ) -> Result<SocketAddr, DropReason> {
        self.sweep(now);
        let key = self.key(internal, remote);
        let existing = self.by_internal.get(&key).copied();
        let port = match existing {
            Some(p)
                if self
                    .by_public
                    .get(&p)
                    .is_some_and(|m| !self.expired(m, now)) =>
            {
                p
            }
            _ => {
                if let Some(p) = existing {
                    self.remove(p);
                }
                let preferred = self
                    .cfg
                    .kind
                    .endpoint_independent_mapping()
                    .then_some(internal.port());
                let p = self
                    .allocate(preferred, now, rng, false)
                    .ok_or(DropReason::NatPortsExhausted)?;
                self.by_public.insert(
                    p,
                    Mapping {
                        internal,
                        remote: key.1,
                        permits: BTreeSet::new(),
                        last_outbound: now,
                    },
                );
                self.by_internal.insert(key, p);
                p
            }
        };
        if let Some(m) = self.by_public.get_mut(&port) {
            m.last_outbound = now;
            m.permits.insert(remote);
        }
        Ok(SocketAddr::new(self.cfg.public_ip, port))
    }

    /// Filters and translates an inbound datagram to `public_port`; returns the internal
    /// destination endpoint.
    pub(super) fn inbound(
        &mut self,
        remote: SocketAddr,
        public_port: u16,
        now: Instant,
    ) -> Result<SocketAddr, DropReason> {
        let Some(m) = self.by_public.get(&public_port) else {
            return Err(DropReason::NatFiltered);
        };
        if self.expired(m, now) {
            self.remove(public_port);
            return Err(DropReason::NatFiltered);
        }
        let allowed = match self.cfg.kind {
            NatKind::EndpointIndependent => true,
            NatKind::AddressDependentFiltering => m.permits.iter().any(|p| p.ip() == remote.ip()),
            NatKind::AddressPortDependentFiltering | NatKind::Symmetric => {
                m.permits.contains(&remote)
            }
        };
        if allowed {
            Ok(m.internal)
        } else {
            Err(DropReason::NatFiltered)
        }
    }

    /// Removes every UDP mapping (a NAT reboot or an aggressive timeout mid-call).
    pub(super) fn flush(&mut self) {
        self.by_public.clear();
        self.by_internal.clear();
    }

    /// Number of unexpired UDP mappings.
    pub(super) fn active_mappings(&self, now: Instant) -> usize {
        self.by_public
            .values()
            .filter(|m| !self.expired(m, now))
            .count()
    }

    /// Public port of the unexpired mapping that `internal` would use towards `remote`.
    pub(super) fn mapping(
        &self,
        internal: SocketAddr,
        remote: SocketAddr,
        now: Instant,
    ) -> Option<u16> {
        let port = *self.by_internal.get(&self.key(internal, remote))?;
        let m = self.by_public.get(&port)?;
        (!self.expired(m, now)).then_some(port)
    }

    /// Takes a public port for a stream, preferring the internal port.
    pub(super) fn allocate_stream_port(
        &mut self,
        preferred: u16,
        now: Instant,
        rng: &mut SimRng,
    ) -> Option<u16> {
        let p = self.allocate(Some(preferred), now, rng, true)?;
        self.stream_ports.insert(p);
        Some(p)
    }

    /// Returns a stream's public port to the pool.
    pub(super) fn release_stream_port(&mut self, port: u16) {
        self.stream_ports.remove(&port);
    }

    /// Finds a free public port (UDP and stream ports are separate namespaces, like UDP and TCP).
    fn allocate(
        &mut self,
        preferred: Option<u16>,
        now: Instant,
        rng: &mut SimRng,
        stream: bool,
    ) -> Option<u16> {
        let (lo, hi) = (*self.cfg.port_range.start(), *self.cfg.port_range.end());
        if lo > hi {
            return None;
        }
        let free = |nat: &Self, p: u16| {
            if stream {
                !nat.stream_ports.contains(&p)
            } else {
                nat.by_public.get(&p).is_none_or(|m| nat.expired(m, now))
            }
        };
        let size = u64::from(hi - lo) + 1;
        let pick = preferred
            .filter(|p| self.cfg.port_range.contains(p) && free(self, *p))
            .or_else(|| {
                (0..RANDOM_PORT_TRIES)
                    .map(|_| offset_port(lo, rng.below(size)))
                    .find(|&p| free(self, p))
            })
            .or_else(|| {
                let start = rng.below(size);
                (0..size)
                    .map(|i| offset_port(lo, (start + i) % size))
                    .find(|&p| free(self, p))
            })?;
        if !stream {
            // The port may still hold an expired mapping; reusing it retires that mapping.
            self.remove(pick);
        }
        Some(pick)
    }
}

/// `lo + off`, where `off` is below the size of a `u16` range starting at `lo`.
fn offset_port(lo: u16, off: u64) -> u16 {
    u16::try_from(u64::from(lo) + off).unwrap_or(u16::MAX)
}
