//! The director in a cluster (`docs/CLUSTER.md`): its registry requests and what it does with
//! their answers — the heartbeat and the lease renewals, the stock of addresses claimed ahead,
//! the records of its tunnels, and the adoption of a tunnel whose client re-attaches here after
//! its director died.
//!
//! The director never waits on the registry: requests queue in an outbox that the runtime
//! drains with [`SessionDirector::poll_registry`], and each answer comes back through
//! [`SessionDirector::handle_registry`]. What needs an answer before it can go on (a re-attach
//! of a tunnel held elsewhere) is parked, bounded, and picked up when the answer comes.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::cmp::Reverse;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand_core::RngCore;
use rustc_hash::FxHashMap;

use super::mesh::Mesh;
use super::{Assigned, ConnectionHandle, SessionDirector, Timer, Tunnel};
use crate::cluster::{
    control_key, ClusterConfig, DirectorName, RegistryRequest, RegistryResponse, RequestId,
    TunnelRecord, SALT_LEN,
};
use crate::rate::{self, TokenBucket};
use crate::wire::{ControlKey, Message, ResultCode, CONTROL_KEY_LEN};

/// Re-attach requests parked while the registry is asked for their tunnel, at most.
const MAX_PARKED: usize = 256;
/// Tunnels named in one Renew, at most (their addresses with them).
const RENEW_BATCH: usize = 512;
/// Upkeep rounds per tunnel lease: in each round every tunnel's lease is renewed and its record
/// checked, a share of the tunnels at each heartbeat, so that the registry's work per tunnel is
/// a few operations per `tunnel_lease / 4` (not per heartbeat), and a record that outlives a
/// missed round still has three quarters of its lease.
const ROUNDS_PER_LEASE: u32 = 4;

/// A director's part in its cluster.
#[derive(Debug)]
pub(super) struct Cluster {
    pub(super) config: ClusterConfig,
    next_request: u64,
    /// Requests the runtime has not taken yet.
    outbox: VecDeque<(RequestId, RegistryRequest)>,
    /// Requests issued and not answered, with what their answer is for (the outbox's
    /// included): at most `max_in_flight`.
    in_flight: FxHashMap<RequestId, Purpose>,
    /// The directors alive, as the last heartbeat's answer listed them.
    pub(super) members: Vec<(DirectorName, SocketAddr)>,
    /// The heartbeat timer is armed.
    beating: bool,
    /// A request that keeps the registry's picture of this director failed since the last
    /// heartbeat answered: the next one that is answered puts everything again.
    dirty: bool,
    /// Tunnels whose records are still to be checked in the current resync round.
    resync: Vec<u64>,
    /// Tunnels whose leases are still to be renewed in the current upkeep round.
    renewal: Vec<u64>,
    /// The round checks as fast as the in-flight bound allows (after the registry failed),
    /// not a share a heartbeat.
    hurry: bool,
    /// Addresses the registry granted and no tunnel has yet, by family (IPv4, IPv6), with
    /// their pool offsets.
    stock: [VecDeque<(IpAddr, u128)>; 2],
    /// Claims in flight, by family.
    claiming: [usize; 2],
    /// The local pool of the family had nothing left to claim.
    exhausted: [bool; 2],
    /// Re-attach requests for tunnels this director does not hold, by tunnel id.
    parked: FxHashMap<u64, Parked>,
    /// The registry lookups those may cause ([`ClusterConfig::max_lookup_rate`]).
    lookups: TokenBucket,
    pub(super) mesh: Mesh,
}

/// What a registry request's answer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Heartbeat,
    /// A Renew, Put or Remove: only a failure matters.
    Upkeep,
    /// A claim for the stock: the address and its offset in the local pool.
    Claim(IpAddr, u128),
    /// A stock address claimed again after the registry failed.
    Reclaim(IpAddr),
    GetTunnel(u64),
    /// A held tunnel's record, read to check it: put again if missing, and the tunnel
    /// dropped if another director owns it now.
    Verify(u64),
    GetAddress(IpAddr),
}

#[derive(Debug)]
struct Parked {
    connection: ConnectionHandle,
    /// The Configuration Request, as it came.
    bytes: Vec<u8>,
}

/// What the stock gives a new tunnel.
pub(super) enum Stocked {
    /// Its addresses.
    Granted(Assigned),
    /// Nothing now: a refill is under way.
    Empty,
    /// Nothing at all: every pool is dry.
    Dry,
}

impl Cluster {
    pub(super) fn new(config: ClusterConfig) -> Self {
        Self {
            config,
            next_request: 0,
            outbox: VecDeque::new(),
            in_flight: FxHashMap::default(),
            members: Vec::new(),
            beating: false,
            dirty: false,
            resync: Vec::new(),
            renewal: Vec::new(),
            hurry: false,
            stock: [VecDeque::new(), VecDeque::new()],
            claiming: [0, 0],
            exhausted: [false, false],
            parked: FxHashMap::default(),
            lookups: TokenBucket::default(),
            mesh: Mesh::default(),
        }
    }

    pub(super) fn name(&self) -> &DirectorName {
        &self.config.name
    }
}

/// Heartbeats in one upkeep round (at least one).
fn heartbeats_per_round(config: &ClusterConfig) -> usize {
    let round = config.tunnel_lease / ROUNDS_PER_LEASE;
    let beats = round.as_nanos() / config.heartbeat.as_nanos().max(1);
    usize::try_from(beats).unwrap_or(usize::MAX).max(1)
}

fn family(addr: IpAddr) -> usize {
    usize::from(addr.is_ipv6())
}

impl SessionDirector {
    /// The next request for the registry, and the id its answer must carry back to
    /// [`handle_registry`](Self::handle_registry). Drain it after every input, as the other
    /// polls; always `None` outside a cluster.
    #[must_use]
    pub fn poll_registry(&mut self) -> Option<(RequestId, RegistryRequest)> {
        self.cluster.as_deref_mut()?.outbox.pop_front()
    }

    /// The registry's answer to request `id`. An answer that names no request in flight, or
    /// that does not fit it, is counted and otherwise ignored; `Failed` is counted, and what
    /// it leaves undone is done again (see `docs/CLUSTER.md`).
    pub fn handle_registry(&mut self, now: Instant, id: RequestId, response: RegistryResponse) {
        let Some(c) = self.cluster.as_deref_mut() else {
            self.stats.cluster.registry_unexpected += 1;
            return;
        };
        let Some(purpose) = c.in_flight.remove(&id) else {
            self.stats.cluster.registry_unexpected += 1;
            return;
        };
        let failed = matches!(response, RegistryResponse::Failed(_));
        if failed {
            self.stats.cluster.registry_failures += 1;
            if !matches!(purpose, Purpose::GetTunnel(_) | Purpose::GetAddress(_)) {
                c.dirty = true;
            }
        }
        match purpose {
            Purpose::Heartbeat => {
                if !c.beating {
                    c.beating = true;
                    let at = now + c.config.heartbeat;
                    self.timers.push(Reverse((at, Timer::Heartbeat)));
                }
                if let RegistryResponse::Directors(members) = response {
                    self.members_changed(now, members);
                    self.recover();
                }
            }
            Purpose::Upkeep => {}
            Purpose::Claim(addr, offset) => {
                c.claiming[family(addr)] -= 1;
                match response {
                    RegistryResponse::Claimed(true) => {
                        c.stock[family(addr)].push_back((addr, offset));
                        self.stats.cluster.addresses_claimed += 1;
                    }
                    // Someone else's: it stays out of the local pool.
                    RegistryResponse::Claimed(false) => self.stats.cluster.addresses_refused += 1,
                    // Maybe granted, maybe not: not used, and not handed out again either.
                    _ => {}
                }
                self.refill_stock();
            }
            Purpose::Reclaim(addr) => {
                if response == RegistryResponse::Claimed(false) {
                    c.stock[family(addr)].retain(|(a, _)| *a != addr);
                    self.stats.cluster.addresses_refused += 1;
                    self.refill_stock();
                }
            }
            Purpose::GetTunnel(tunnel) => self.adopt(now, tunnel, response),
            Purpose::Verify(tunnel) => {
                self.verified(tunnel, response);
                self.hurry_resync();
            }
            Purpose::GetAddress(addr) => self.route_answer(now, addr, response),
        }
    }

    /// Queues `request` unless `max_in_flight` are in flight (counted).
    fn registry(&mut self, request: RegistryRequest, purpose: Purpose) -> bool {
        let Some(c) = self.cluster.as_deref_mut() else {
            return false;
        };
        if c.in_flight.len() >= c.config.max_in_flight {
            self.stats.cluster.registry_saturated += 1;
            // A claim or a lookup not made is made later; a record or a renewal not made
            // leaves the registry behind, until the recovery.
            if matches!(
                purpose,
                Purpose::Heartbeat | Purpose::Upkeep | Purpose::Reclaim(_)
            ) {
                c.dirty = true;
            }
            return false;
        }
        c.next_request += 1;
        let id = RequestId(c.next_request);
        c.in_flight.insert(id, purpose);
        c.outbox.push_back((id, request));
        self.stats.cluster.registry_requests += 1;
        true
    }

    /// At start: the first heartbeat, and claims for the stock.
    pub(super) fn cluster_start(&mut self) {
        let Some(c) = self.cluster.as_deref() else {
            return;
        };
        let beat = RegistryRequest::Heartbeat {
            name: c.config.name.clone(),
            mesh: c.config.mesh,
            lease: c.config.director_lease,
        };
        self.registry(beat, Purpose::Heartbeat);
        self.refill_stock();
    }

    /// The heartbeat timer: renew this director's lease and those of its tunnels and stock,
    /// and top the stock up.
    pub(super) fn heartbeat(&mut self, now: Instant) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let at = now + c.config.heartbeat;
        self.timers.push(Reverse((at, Timer::Heartbeat)));
        let (name, lease) = (c.config.name.clone(), c.config.tunnel_lease);
        let beat = RegistryRequest::Heartbeat {
            name: name.clone(),
            mesh: c.config.mesh,
            lease: c.config.director_lease,
        };
        // A new round renews the stock too (its claims have the tunnels' lease).
        let round_starts = c.renewal.is_empty();
        if round_starts {
            c.renewal.extend(self.tunnels.keys());
        }
        let mut stock: Vec<IpAddr> = match round_starts {
            true => c.stock.iter().flatten().map(|(a, _)| *a).collect(),
            false => Vec::new(),
        };
        let share = self.tunnels.len().div_ceil(heartbeats_per_round(&c.config));
        let at = c.renewal.len().saturating_sub(share);
        let due: Vec<u64> = c.renewal.drain(at..).collect();
        self.registry(beat, Purpose::Heartbeat);
        let mut batches = due.chunks(RENEW_BATCH);
        // The stock goes with the first batch, which is sent even without tunnels.
        let mut first = true;
        loop {
            let batch = match batches.next() {
                Some(batch) => batch,
                None if first && !stock.is_empty() => &[],
                None => break,
            };
            first = false;
            let mut addresses = std::mem::take(&mut stock);
            let mut tunnels = Vec::with_capacity(batch.len());
            for id in batch {
                // Tunnels closed or moved away since the round began are skipped.
                if let Some(t) = self.tunnels.get(id) {
                    addresses.extend(t.addresses());
                    tunnels.push(*id);
                }
            }
            let renew = RegistryRequest::Renew {
                owner: name.clone(),
                tunnels,
                addresses,
                lease,
            };
            self.registry(renew, Purpose::Upkeep);
        }
        self.resync_some();
        self.refill_stock();
    }

    /// Checks the records of a share of the tunnels, so that each is checked once an upkeep
    /// round ([`ROUNDS_PER_LEASE`]): a Renew leaves a record the registry lost missing, and
    /// says nothing of one another director took over.
    fn resync_some(&mut self) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        if c.hurry {
            return self.hurry_resync();
        }
        if c.resync.is_empty() {
            c.resync.extend(self.tunnels.keys());
        }
        let share = self.tunnels.len().div_ceil(heartbeats_per_round(&c.config));
        let at = c.resync.len().saturating_sub(share);
        let due: Vec<u64> = c.resync.drain(at..).collect();
        for id in due {
            self.verify_record(id);
        }
    }

    /// While hurrying, checks records until half the in-flight bound is in flight; each
    /// answer checks the next.
    fn hurry_resync(&mut self) {
        loop {
            let Some(c) = self.cluster.as_deref_mut() else {
                return;
            };
            if !c.hurry || c.in_flight.len() >= (c.config.max_in_flight / 2).max(1) {
                return;
            }
            let Some(id) = c.resync.pop() else {
                c.hurry = false;
                return;
            };
            self.verify_record(id);
        }
    }

    /// Reads tunnel `id`'s record, if it is still held here.
    fn verify_record(&mut self, id: u64) {
        if self.tunnels.contains_key(&id) {
            self.registry(RegistryRequest::GetTunnel { id }, Purpose::Verify(id));
        }
    }

    /// The record of tunnel `id`, held here: put again if the registry lost it; if another
    /// director owns it, that director adopted it while no mesh link said so, and the tunnel
    /// goes as on an Adopted message.
    fn verified(&mut self, id: u64, response: RegistryResponse) {
        let Some(c) = self.cluster.as_deref() else {
            return;
        };
        if !self.tunnels.contains_key(&id) {
            return;
        }
        match response {
            RegistryResponse::Tunnel(None) => self.put_record(id),
            RegistryResponse::Tunnel(Some(record)) if record.owner != c.config.name => {
                self.moved_away(id, record.owner);
            }
            _ => {}
        }
    }

    /// After the registry failed: once it answers a heartbeat again, every tunnel's record is
    /// checked at once (a registry that lost its data learns them back) and the stock claimed
    /// again (an address another director took meanwhile leaves it).
    fn recover(&mut self) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        if !std::mem::take(&mut c.dirty) {
            return;
        }
        self.stats.cluster.registry_recoveries += 1;
        let (owner, lease) = (c.config.name.clone(), c.config.tunnel_lease);
        let stock: Vec<IpAddr> = c.stock.iter().flatten().map(|(a, _)| *a).collect();
        c.resync.clear();
        c.resync.extend(self.tunnels.keys());
        c.hurry = true;
        for addr in stock {
            let claim = RegistryRequest::Claim {
                addr,
                owner: owner.clone(),
                lease,
            };
            self.registry(claim, Purpose::Reclaim(addr));
        }
        self.hurry_resync();
    }

    /// Claims addresses from the local pools until the stock and the claims in flight make
    /// `address_stock` of each family.
    pub(super) fn refill_stock(&mut self) {
        for f in 0..2 {
            loop {
                let Some(c) = self.cluster.as_deref() else {
                    return;
                };
                let (have, want) = (c.stock[f].len() + c.claiming[f], c.config.address_stock);
                if have >= want || c.exhausted[f] {
                    break;
                }
                let (owner, lease) = (c.config.name.clone(), c.config.tunnel_lease);
                let Some((addr, offset)) = self.allocate_one(f == 1) else {
                    if let Some(c) = self.cluster.as_deref_mut() {
                        c.exhausted[f] = true;
                    }
                    break;
                };
                if self.by_addr.contains_key(&addr) {
                    // An adopted tunnel's: not the pool's to give.
                    continue;
                }
                let claim = RegistryRequest::Claim { addr, owner, lease };
                if !self.registry(claim, Purpose::Claim(addr, offset)) {
                    self.release_offset(f == 1, offset);
                    break;
                }
                if let Some(c) = self.cluster.as_deref_mut() {
                    c.claiming[f] += 1;
                }
            }
        }
    }

    /// One address of the IPv4 (or IPv6) pool and its offset.
    fn allocate_one(&mut self, v6: bool) -> Option<(IpAddr, u128)> {
        if v6 {
            let (pool, prefix) = (self.ipv6_pool.as_mut()?, self.config.ipv6_pool?);
            let offset = pool.allocate()?;
            let addr = Ipv6Addr::from(u128::from(prefix.network).wrapping_add(offset));
            Some((IpAddr::V6(addr), offset))
        } else {
            let (pool, prefix) = (self.ipv4_pool.as_mut()?, self.config.ipv4_pool?);
            let offset = pool.allocate()?;
            let base = u128::from(u32::from(prefix.network));
            let addr = u32::try_from(base + offset).ok()?;
            Some((IpAddr::V4(Ipv4Addr::from(addr)), offset))
        }
    }

    fn release_offset(&mut self, v6: bool, offset: u128) {
        let pool = if v6 {
            self.ipv6_pool.as_mut()
        } else {
            self.ipv4_pool.as_mut()
        };
        if let Some(pool) = pool {
            pool.release(offset);
        }
        if let Some(c) = self.cluster.as_deref_mut() {
            c.exhausted[usize::from(v6)] = false;
        }
    }

    /// Addresses for a new tunnel from the stock: one of each family whose pool has any left,
    /// as [`allocate_addresses`](Self::allocate_addresses) does outside a cluster.
    pub(super) fn take_from_stock(&mut self) -> Stocked {
        let Some(c) = self.cluster.as_deref_mut() else {
            return Stocked::Dry;
        };
        let pools = [self.ipv4_pool.is_some(), self.ipv6_pool.is_some()];
        let mut waiting = false;
        let mut got: [Option<(IpAddr, u128)>; 2] = [None, None];
        for f in 0..2 {
            if !pools[f] {
                continue;
            }
            got[f] = c.stock[f].pop_front();
            if got[f].is_none() && (!c.exhausted[f] || c.claiming[f] > 0) {
                waiting = true;
            }
        }
        if waiting || got.iter().all(Option::is_none) {
            for (stock, entry) in c.stock.iter_mut().zip(got) {
                if let Some(entry) = entry {
                    stock.push_front(entry);
                }
            }
            self.refill_stock();
            return if waiting {
                Stocked::Empty
            } else {
                Stocked::Dry
            };
        }
        if got.iter().zip(pools).any(|(g, p)| p && g.is_none()) {
            self.stats.one_family_only += 1;
        }
        self.refill_stock();
        let ipv4 = got[0].and_then(|(a, o)| match a {
            IpAddr::V4(a) => Some((a, o)),
            IpAddr::V6(_) => None,
        });
        let ipv6 = got[1].and_then(|(a, o)| match a {
            IpAddr::V6(a) => Some((a, o)),
            IpAddr::V4(_) => None,
        });
        Stocked::Granted((ipv4, ipv6))
    }

    /// The control key of new tunnel `id`, and the salt of its record: derived from the
    /// cluster secret in a cluster (so that another director can take the tunnel over), drawn
    /// at random outside.
    pub(super) fn draw_key(&mut self, id: u64) -> ([u8; CONTROL_KEY_LEN], [u8; SALT_LEN]) {
        let mut salt = [0u8; SALT_LEN];
        match self.cluster.as_deref() {
            Some(c) => {
                self.rng.fill_bytes(&mut salt);
                (control_key(&c.config.secret, id, &salt), salt)
            }
            None => {
                let mut key = [0u8; CONTROL_KEY_LEN];
                self.rng.fill_bytes(&mut key);
                (key, salt)
            }
        }
    }

    /// Writes tunnel `id`'s record with this director as its owner.
    pub(super) fn put_record(&mut self, id: u64) {
        let (Some(c), Some(t)) = (self.cluster.as_deref(), self.tunnels.get(&id)) else {
            return;
        };
        let record = TunnelRecord {
            id,
            ipv4: t.ipv4.map(|(a, _)| a),
            ipv6: t.ipv6.map(|(a, _)| a),
            salt: t.salt,
            owner: c.config.name.clone(),
        };
        let lease = c.config.tunnel_lease;
        self.registry(RegistryRequest::Put { record, lease }, Purpose::Upkeep);
    }

    /// Tunnel `id` closed here: its record and addresses go (unless another director
    /// adopted it meanwhile; the registry checks).
    pub(super) fn remove_record(&mut self, id: u64, addresses: Vec<IpAddr>) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        for addr in &addresses {
            c.exhausted[family(*addr)] = false;
        }
        let owner = c.config.name.clone();
        let remove = RegistryRequest::Remove {
            id,
            addresses,
            owner,
        };
        self.registry(remove, Purpose::Upkeep);
    }

    /// A re-attach of tunnel `id`, which this director does not hold: parked while the
    /// registry is asked for its record. False outside a cluster.
    pub(super) fn park_reattach(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        id: u64,
        bytes: &[u8],
    ) -> bool {
        let Some(c) = self.cluster.as_deref_mut() else {
            return false;
        };
        let parked = Parked {
            connection,
            bytes: bytes.to_vec(),
        };
        if let Some(p) = c.parked.get_mut(&id) {
            // A retransmission, or another connection: the latest is answered.
            *p = parked;
            return true;
        }
        if c.parked.len() >= MAX_PARKED {
            self.stats.cluster.parked_full += 1;
            return true;
        }
        let rate = c.config.max_lookup_rate;
        let interval = rate::interval(rate, Duration::from_secs(1));
        if rate == 0 || !c.lookups.take(now, rate, interval) {
            self.stats.cluster.lookups_limited += 1;
            return true;
        }
        c.parked.insert(id, parked);
        self.stats.cluster.parked += 1;
        if !self.registry(RegistryRequest::GetTunnel { id }, Purpose::GetTunnel(id)) {
            if let Some(c) = self.cluster.as_deref_mut() {
                c.parked.remove(&id);
            }
        }
        true
    }

    /// The registry's record of tunnel `id`, which a parked re-attach asked for: no record
    /// is Tunnel Not Found, a request its key does not verify Unauthorized, as for a tunnel
    /// held here; a verified one adopts the tunnel and is answered as a re-attach.
    fn adopt(&mut self, now: Instant, id: u64, response: RegistryResponse) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(parked) = c.parked.remove(&id) else {
            return;
        };
        let secret = c.config.secret;
        let Some(info) = self.connections.get(&parked.connection).map(|c| c.info) else {
            return;
        };
        let Ok(request) = Message::decode(&parked.bytes) else {
            return;
        };
        let (header, nonce) = (request.header, request.tlvs.client_nonce);
        let record = match response {
            RegistryResponse::Tunnel(Some(record)) if record.id == id => record,
            RegistryResponse::Tunnel(_) => {
                // A failed admission of its source, as a bad secret is: whoever guesses tunnel
                // ids makes the registry work, and is soon rate limited.
                self.stats.refused.tunnel_not_found += 1;
                self.record_failure(now, info.remote.ip());
                let result = ResultCode::TUNNEL_NOT_FOUND;
                return self.answer_bound(parked.connection, &header, nonce, result);
            }
            // The client retransmits; the registry may answer then.
            _ => return,
        };
        if self.tunnels.contains_key(&id) {
            // Adopted by a re-attach parked on another connection meanwhile.
            return self.handle_control(now, parked.connection, &parked.bytes);
        }
        let key = ControlKey::new(&control_key(&secret, id, &record.salt));
        if !key.verify_from_client(&parked.bytes) {
            self.stats.refused.bad_reattach_secret += 1;
            self.record_failure(now, info.remote.ip());
            let result = ResultCode::UNAUTHORIZED;
            return self.answer_bound(parked.connection, &header, nonce, result);
        }
        let ipv4 = record.ipv4.and_then(|a| Some((a, self.ipv4_offset(a)?)));
        let ipv6 = record.ipv6.and_then(|a| Some((a, self.ipv6_offset(a)?)));
        let fits = ipv4.is_some() == record.ipv4.is_some()
            && ipv6.is_some() == record.ipv6.is_some()
            && (ipv4.is_some() || ipv6.is_some())
            && record.addresses().all(|a| !self.by_addr.contains_key(&a));
        if !fits || self.tunnels.len() >= self.config.max_tunnels {
            // Not one this director can hold: outside its pools, or clashing with its own.
            self.stats.refused.tunnel_not_found += 1;
            let result = ResultCode::TUNNEL_NOT_FOUND;
            return self.answer_bound(parked.connection, &header, nonce, result);
        }
        let keepalive = self.negotiate_keepalive(info.transport, None);
        let tunnel = Tunnel {
            capabilities: request.tlvs.client_capabilities.unwrap_or_default(),
            ..Tunnel::new(
                id,
                (ipv4, ipv6),
                info.transport,
                key,
                record.salt,
                keepalive,
                now,
            )
        };
        let addresses: Vec<IpAddr> = tunnel.addresses().collect();
        for addr in &addresses {
            self.by_addr.insert(*addr, id);
            if let Some(c) = self.cluster.as_deref_mut() {
                c.stock[family(*addr)].retain(|(a, _)| a != addr);
            }
        }
        self.tunnels.insert(id, tunnel);
        let at = now + self.config.persistence_timeout;
        self.timers.push(Reverse((at, Timer::Persistence(id))));
        self.stats.cluster.adoptions += 1;
        self.put_record(id);
        self.announce_adoption(id, addresses);
        // Answered as any re-attach: same id, addresses and key.
        self.handle_control(now, parked.connection, &parked.bytes);
    }

    fn ipv4_offset(&self, addr: Ipv4Addr) -> Option<u128> {
        let p = self.config.ipv4_pool?;
        let offset = u32::from(addr).checked_sub(u32::from(p.network))?;
        let host_bits = 32 - u32::from(p.prefix_len.min(32));
        (u64::from(offset) < (1u64 << host_bits) && offset >= 2).then_some(u128::from(offset))
    }

    fn ipv6_offset(&self, addr: Ipv6Addr) -> Option<u128> {
        let p = self.config.ipv6_pool?;
        let offset = u128::from(addr).checked_sub(u128::from(p.network))?;
        let host_bits = 128 - u32::from(p.prefix_len.min(128));
        let inside = host_bits >= 128 || offset < (1u128 << host_bits);
        (inside && offset >= 2).then_some(offset)
    }

    /// Asks the registry who holds `addr`; false if the request was not issued.
    pub(super) fn registry_lookup(&mut self, addr: IpAddr) -> bool {
        self.registry(
            RegistryRequest::GetAddress { addr },
            Purpose::GetAddress(addr),
        )
    }

    /// Whether `addr` is in one of the director's pools (and so may be a tunnel's).
    pub(super) fn in_pools(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4_offset(a).is_some(),
            IpAddr::V6(a) => self.ipv6_offset(a).is_some(),
        }
    }
}
