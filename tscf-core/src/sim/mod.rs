//! Deterministic network simulator: virtual clock, seeded RNG, lossy links, NAT boxes, UDP
//! datagrams and a simple reliable stream (TCP-like) model.
//!
//! It is the test bench for the sans-IO state machines: the test harness owns the machines, this
//! module owns only the network between them. Everything is reproducible: the same seed and the
//! same calls give the same deliveries at the same virtual instants.
//!
//! # Model
//!
//! ```text
//!   host ──access── site router [NAT] ──uplink── INTERNET ──uplink── [NAT] site router ──access── host
//!                                                   │
//!   host ──access───────────────────────────────────┘   (hosts directly on the internet)
//! ```
//!
//! - The **internet** routes by destination IP to public addresses: a host directly on it, a
//!   NAT's public IP, or a host of a site without NAT. Anything else is dropped as "no route".
//! - A **site** ([`Network::add_site`]) has an uplink and optionally a NAT box ([`NatConfig`],
//!   [`NatKind`]) with one public IP. Hosts of a site reach each other over their access links
//!   only (a LAN); other destinations go out through the router, the NAT and the uplink.
//! - A **host** ([`Network::add_host`]) has one IP address, unique in the whole network, and an
//!   access link. The simulator has no sockets: every datagram for the host's IP is delivered to
//!   the host, whatever the port, and the harness demultiplexes on [`NetEvent::Datagram::to`].
//! - Each **link** ([`LinkConfig`]) applies latency, jitter, loss, duplication, reordering, MTU
//!   and an up/down switch in both directions. A datagram is processed hop by hop: NAT mappings,
//!   filters, [block rules](Network::block) and link state are evaluated when the datagram gets
//!   there, not when it was sent.
//! - **Streams** ([`Network::connect_stream`]) are reliable and ordered, delayed by the path's
//!   latency and jitter, never lost. They may go out through a NAT but never in (connecting to a
//!   NAT's public address is refused). Cutting the path ([`Network::block`],
//!   [`Network::set_link_up`]) resets every stream over it at once.
//!
//! # Driving
//!
//! Time is virtual: [`Network::now`] starts at an arbitrary [`Instant`] and only moves when the
//! harness advances it. A typical loop:
//!
//! ```
//! # use std::net::SocketAddr;
//! # use std::time::Duration;
//! # use tscf_core::sim::{LinkConfig, NetEvent, Network};
//! let mut net = Network::new(7);
//! let a: SocketAddr = "203.0.113.1:4000".parse().unwrap();
//! let b: SocketAddr = "198.51.100.1:5000".parse().unwrap();
//! net.add_host(None, a.ip(), LinkConfig::with_latency(Duration::from_millis(10)));
//! net.add_host(None, b.ip(), LinkConfig::with_latency(Duration::from_millis(15)));
//! net.send_datagram(a, b, b"hello");
//!
//! let deadline = net.now() + Duration::from_secs(1);
//! // The harness would also take the minimum with its state machines' timeouts here.
//! while let Some(delivery) = net.next_delivery(deadline) {
//!     // Feed `delivery.event` to the state machine of `delivery.host` at `delivery.at`.
//!     if let NetEvent::Datagram { from, payload, .. } = delivery.event {
//!         assert_eq!((from, payload.as_slice()), (a, &b"hello"[..]));
//!         assert_eq!(delivery.at - net.start(), Duration::from_millis(25));
//!     }
//! }
//! // The clock is now at `deadline`: fire the machines' timers that are due.
//! assert_eq!(net.now(), deadline);
//! ```
//!
//! [`Network::poll_timeout`] is the next instant at which the network has work to do (a
//! datagram reaching a router or a host); the harness must call [`Network::next_delivery`] with
//! an `until` of at least the minimum of that and its own timeouts. Wrap every seeded run in a
//! [`SeedGuard`] (or use [`for_each_seed`]) so that a failing test prints its seed.

mod link;
mod nat;
mod stream;
#[cfg(test)]
mod tests;
pub mod world;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

pub use link::LinkConfig;
pub use nat::{NatConfig, NatKind};
pub use stream::{StreamError, StreamId};

use link::{Dir, Link, SimRng};
use nat::Nat;

/// Default bound on datagrams in flight, see [`Network::set_max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 100_000;

/// Identifies a site created by [`Network::add_site`]; meaningless (and may panic) elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId(u32);

/// Identifies a host created by [`Network::add_host`]; meaningless (and may panic) elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(u32);

/// Identifies a link, for [`Network::set_link_up`] and [`Network::set_link_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkId {
    /// The access link of a host (to its site router, or to the internet).
    Access(HostId),
    /// The uplink of a site (between its router or NAT and the internet).
    Uplink(SiteId),
}

/// Configuration of a site.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SiteConfig {
    /// The site's NAT box, or `None` for a site whose hosts have public addresses.
    pub nat: Option<NatConfig>,
    /// The link between the site router and the internet.
    pub uplink: LinkConfig,
}

/// Something the network hands to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Virtual time of the delivery.
    pub at: Instant,
    /// The receiving host.
    pub host: HostId,
    /// What arrived.
    pub event: NetEvent,
}

/// An event at a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// A UDP datagram arrived.
    Datagram {
        /// Source as seen by the receiver, after any NAT translation.
        from: SocketAddr,
        /// Destination, the receiver's local address.
        to: SocketAddr,
        /// The datagram payload.
        payload: Vec<u8>,
    },
    /// A listener accepted an incoming stream.
    StreamAccepted {
        /// The receiver's handle for the new stream.
        stream: StreamId,
        /// The listening address.
        local: SocketAddr,
        /// The connecting peer as seen by the receiver (after NAT).
        remote: SocketAddr,
    },
    /// A stream opened with [`Network::connect_stream`] is established.
    StreamConnected {
        /// The connector's handle.
        stream: StreamId,
        /// The connector's local address.
        local: SocketAddr,
        /// The address connected to.
        remote: SocketAddr,
    },
    /// Bytes arrived on a stream, in order.
    StreamData {
        /// The receiver's handle.
        stream: StreamId,
        /// The bytes, exactly as one [`Network::stream_send`] call passed them.
        data: Vec<u8>,
    },
    /// The peer closed the stream; nothing more will arrive and sending fails.
    StreamClosed {
        /// The receiver's handle.
        stream: StreamId,
    },
    /// The stream was refused or reset (nobody listening, inbound through a NAT, path cut).
    StreamReset {
        /// The receiver's handle.
        stream: StreamId,
    },
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Random loss on a link.
    Loss,
    /// Larger than a link's MTU.
    Mtu,
    /// Inbound at a NAT without a matching mapping, or refused by its filter (also hairpinning
    /// when the NAT does not support it).
    NatFiltered,
    /// The NAT had no free public port for a new mapping.
    NatPortsExhausted,
    /// No host or NAT owns the destination address.
    NoRoute,
    /// A [block rule](Network::block) matched.
    Blocked,
    /// A link on the path was down.
    LinkDown,
    /// Too many datagrams in flight ([`Network::set_max_in_flight`]).
    QueueFull,
}

/// Counters of a simulation run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to [`Network::send_datagram`].
    pub sent: u64,
    /// Datagrams delivered to hosts (duplicates included).
    pub delivered: u64,
    /// Extra copies created by link duplication.
    pub duplicated: u64,
    /// Drops by random loss.
    pub dropped_loss: u64,
    /// Drops by MTU.
    pub dropped_mtu: u64,
    /// Drops by NAT filtering (no mapping, filtered, no hairpinning).
    pub dropped_nat_filtered: u64,
    /// Drops because a NAT ran out of public ports.
    pub dropped_nat_ports_exhausted: u64,
    /// Drops for lack of a route.
    pub dropped_no_route: u64,
    /// Drops by block rules.
    pub dropped_blocked: u64,
    /// Drops by down links.
    pub dropped_link_down: u64,
    /// Drops by the in-flight bound.
    pub dropped_queue_full: u64,
    /// Streams opened with [`Network::connect_stream`].
    pub streams_opened: u64,
    /// Streams refused (nobody listening, inbound through a NAT, no route, path cut at connect).
    pub streams_refused: u64,
    /// Established or connecting streams reset by a path cut.
    pub streams_reset: u64,
}

impl Stats {
    /// Datagram drops for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Loss => self.dropped_loss,
            DropReason::Mtu => self.dropped_mtu,
            DropReason::NatFiltered => self.dropped_nat_filtered,
            DropReason::NatPortsExhausted => self.dropped_nat_ports_exhausted,
            DropReason::NoRoute => self.dropped_no_route,
            DropReason::Blocked => self.dropped_blocked,
            DropReason::LinkDown => self.dropped_link_down,
            DropReason::QueueFull => self.dropped_queue_full,
        }
    }

    /// Datagram drops for all reasons.
    pub fn total_dropped(&self) -> u64 {
        self.dropped_loss
            + self.dropped_mtu
            + self.dropped_nat_filtered
            + self.dropped_nat_ports_exhausted
            + self.dropped_no_route
            + self.dropped_blocked
            + self.dropped_link_down
            + self.dropped_queue_full
    }

    fn count_drop(&mut self, reason: DropReason) {
        let c = match reason {
            DropReason::Loss => &mut self.dropped_loss,
            DropReason::Mtu => &mut self.dropped_mtu,
            DropReason::NatFiltered => &mut self.dropped_nat_filtered,
            DropReason::NatPortsExhausted => &mut self.dropped_nat_ports_exhausted,
            DropReason::NoRoute => &mut self.dropped_no_route,
            DropReason::Blocked => &mut self.dropped_blocked,
            DropReason::LinkDown => &mut self.dropped_link_down,
            DropReason::QueueFull => &mut self.dropped_queue_full,
        };
        *c += 1;
    }
}

/// Prints `sim seed = N` to stderr if dropped while the thread panics, so that every failing
/// seeded run names the seed that reproduces it.
#[derive(Debug)]
pub struct SeedGuard(pub u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("sim seed = {}", self.0);
        }
    }
}

/// Runs `f` once per seed, each under a [`SeedGuard`].
pub fn for_each_seed(seeds: Range<u64>, f: impl Fn(u64)) {
    for seed in seeds {
        let _guard = SeedGuard(seed);
        f(seed);
    }
}

/// A datagram on its way, with its current (possibly translated) header.
#[derive(Debug)]
struct Packet {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

impl Packet {
    /// Size of the IP packet carrying the payload, for MTU checks.
    fn ip_len(&self) -> usize {
        let headers = if self.dst.is_ipv4() { 20 + 8 } else { 40 + 8 };
        self.payload.len() + headers
    }
}

/// Where a datagram arrives next.
#[derive(Debug, Clone, Copy)]
enum Node {
    Host(HostId),
    /// A site router, reached over a host's access link.
    RouterInside(SiteId),
    /// A site router, reached over its uplink.
    RouterOutside(SiteId),
    Internet,
}

#[derive(Debug)]
enum Event {
    Datagram { packet: Packet, node: Node },
    Stream(stream::Segment),
}

/// A queue entry; the heap pops the earliest `(at, seq)` first.
#[derive(Debug)]
struct Scheduled {
    at: Instant,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: `BinaryHeap` is a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug)]
struct Site {
    uplink: Link,
    nat: Option<Nat>,
}

#[derive(Debug)]
struct Host {
    ip: IpAddr,
    site: Option<SiteId>,
    access: Link,
}

/// Owner of a publicly routed address.
#[derive(Debug, Clone, Copy)]
enum PublicOwner {
    Host(HostId),
    Site(SiteId),
}

/// The simulated network. See the [module documentation](self).
#[derive(Debug)]
pub struct Network {
    seed: u64,
    rng: SimRng,
    start: Instant,
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    /// Deliveries that fell due during [`Network::advance_to`], handed out first.
    ready: VecDeque<Delivery>,
    in_flight: usize,
    max_in_flight: usize,
    sites: Vec<Site>,
    hosts: Vec<Host>,
    host_by_ip: BTreeMap<IpAddr, HostId>,
    public: BTreeMap<IpAddr, PublicOwner>,
    /// Blocked address pairs, stored with the smaller address first.
    blocked: BTreeSet<(IpAddr, IpAddr)>,
    streams: stream::Streams,
    stats: Stats,
}

impl Network {
    /// An empty network whose randomness comes from `seed` only.
    pub fn new(seed: u64) -> Self {
        // The base only anchors virtual time; nothing depends on its value.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        Self {
            seed,
            rng: SimRng::new(seed),
            start,
            now: start,
            seq: 0,
            queue: BinaryHeap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            sites: Vec::new(),
            hosts: Vec::new(),
            host_by_ip: BTreeMap::new(),
            public: BTreeMap::new(),
            blocked: BTreeSet::new(),
            streams: stream::Streams::default(),
            stats: Stats::default(),
        }
    }

    /// The seed this network was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The virtual time at creation.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Virtual time elapsed since creation.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bounds the number of datagrams in flight; beyond it new ones (and duplicates) are dropped
    /// as [`DropReason::QueueFull`]. Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub fn set_max_in_flight(&mut self, max: usize) {
        self.max_in_flight = max;
    }

    /// Datagrams currently in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Adds a site.
    ///
    /// # Panics
    ///
    /// If the NAT's public IP is already used by a host or another NAT.
    pub fn add_site(&mut self, config: SiteConfig) -> SiteId {
        let id = SiteId(index_u32(self.sites.len()));
        if let Some(nat) = &config.nat {
            self.claim_ip(nat.public_ip);
            self.public.insert(nat.public_ip, PublicOwner::Site(id));
        }
        self.sites.push(Site {
            uplink: Link::new(config.uplink, self.now),
            nat: config.nat.map(|cfg| Nat::new(cfg, self.now)),
        });
        id
    }

    /// Adds a host with address `ip` on `site`, or directly on the internet with `None`. A host
    /// of a NAT site has a private address; any other host's address is publicly routed.
    ///
    /// # Panics
    ///
    /// If `ip` is already used by a host or a NAT, or `site` does not exist.
    pub fn add_host(&mut self, site: Option<SiteId>, ip: IpAddr, access: LinkConfig) -> HostId {
        let id = HostId(index_u32(self.hosts.len()));
        self.claim_ip(ip);
        match site {
            Some(s) => {
                assert!(self.site(s).is_some(), "sim: unknown site {s:?}");
                if self.sites[s.0 as usize].nat.is_none() {
                    self.public.insert(ip, PublicOwner::Site(s));
                }
            }
            None => {
                self.public.insert(ip, PublicOwner::Host(id));
            }
        }
        self.host_by_ip.insert(ip, id);
        self.hosts.push(Host {
            ip,
            site,
            access: Link::new(access, self.now),
        });
        id
    }

    fn claim_ip(&self, ip: IpAddr) {
        assert!(
            !self.host_by_ip.contains_key(&ip) && !self.public.contains_key(&ip),
            "sim: address {ip} is already in use"
        );
    }

    fn site(&self, id: SiteId) -> Option<&Site> {
        self.sites.get(id.0 as usize)
    }

    fn site_mut(&mut self, id: SiteId) -> &mut Site {
        &mut self.sites[id.0 as usize]
    }

    fn host(&self, id: HostId) -> &Host {
        &self.hosts[id.0 as usize]
    }

    /// The host owning `ip`, if any.
    pub fn host_by_ip(&self, ip: IpAddr) -> Option<HostId> {
        self.host_by_ip.get(&ip).copied()
    }

    /// The address of `host`.
    pub fn host_ip(&self, host: HostId) -> IpAddr {
        self.host(host).ip
    }

    /// The site of `host`, `None` for hosts directly on the internet.
    pub fn host_site(&self, host: HostId) -> Option<SiteId> {
        self.host(host).site
    }

    /// The public IP of `site`'s NAT, if it has one.
    pub fn nat_public_ip(&self, site: SiteId) -> Option<IpAddr> {
        self.site(site)?.nat.as_ref().map(|n| n.cfg.public_ip)
    }

    fn link_mut(&mut self, link: LinkId) -> &mut Link {
        match link {
            LinkId::Access(h) => &mut self.hosts[h.0 as usize].access,
            LinkId::Uplink(s) => &mut self.site_mut(s).uplink,
        }
    }

    /// The current configuration of `link`.
    pub fn link_config(&self, link: LinkId) -> &LinkConfig {
        match link {
            LinkId::Access(h) => &self.host(h).access.cfg,
            LinkId::Uplink(s) => &self.sites[s.0 as usize].uplink.cfg,
        }
    }

    /// Replaces the configuration of `link` from now on. Taking a link down resets the streams
    /// over it; datagrams already past it are unaffected.
    pub fn set_link_config(&mut self, link: LinkId, config: LinkConfig) {
        let up = config.up;
        self.link_mut(link).cfg = config;
        if !up {
            self.cut_streams();
        }
    }

    /// Brings `link` up or down.
    pub fn set_link_up(&mut self, link: LinkId, up: bool) {
        let mut cfg = self.link_config(link).clone();
        cfg.up = up;
        self.set_link_config(link, cfg);
    }

    /// Drops all traffic between `a` and `b`, both ways, from now on, and resets streams between
    /// them. A rule matches a datagram at any hop where its current source and destination IPs
    /// are the pair, so `a` and `b` may be private addresses, NAT public addresses or both.
    pub fn block(&mut self, a: IpAddr, b: IpAddr) {
        self.blocked.insert(ordered(a, b));
        self.cut_streams();
    }

    /// Removes a [block](Self::block) rule.
    pub fn unblock(&mut self, a: IpAddr, b: IpAddr) {
        self.blocked.remove(&ordered(a, b));
    }

    /// Whether traffic between `a` and `b` is blocked.
    pub fn is_blocked(&self, a: IpAddr, b: IpAddr) -> bool {
        !self.blocked.is_empty() && self.blocked.contains(&ordered(a, b))
    }

    /// Removes every UDP mapping of `site`'s NAT (streams keep theirs). No-op without a NAT.
    pub fn flush_nat(&mut self, site: SiteId) {
        if let Some(nat) = &mut self.site_mut(site).nat {
            nat.flush();
        }
    }

    /// Number of unexpired UDP mappings of `site`'s NAT.
    pub fn nat_mapping_count(&self, site: SiteId) -> usize {
        self.site(site)
            .and_then(|s| s.nat.as_ref())
            .map_or(0, |n| n.active_mappings(self.now))
    }

    /// The public endpoint `site`'s NAT currently maps `internal` to when sending to `remote`.
    pub fn nat_mapping(
        &self,
        site: SiteId,
        internal: SocketAddr,
        remote: SocketAddr,
    ) -> Option<SocketAddr> {
        let nat = self.site(site)?.nat.as_ref()?;
        let port = nat.mapping(internal, remote, self.now)?;
        Some(SocketAddr::new(nat.cfg.public_ip, port))
    }

    /// Sends a UDP datagram now from `from` (an address of the sending host) to `to`.
    ///
    /// # Panics
    ///
    /// If no host owns `from`'s IP: that is a bug in the harness, not a network condition.
    pub fn send_datagram(&mut self, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let host = self.host_by_ip(from.ip());
        let Some(host) = host else {
            panic!("sim: send_datagram from {from}, which no host owns");
        };
        self.stats.sent += 1;
        let packet = Packet {
            src: from,
            dst: to,
            payload: payload.to_vec(),
        };
        if self.drop_if_blocked(&packet) {
            return;
        }
        let next = match self.host(host).site {
            Some(s) => Node::RouterInside(s),
            None => Node::Internet,
        };
        self.forward(packet, LinkId::Access(host), Dir::Up, next);
    }

    /// The next instant at which the network has something to do, if anything is in flight.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return Some(self.now);
        }
        self.queue.peek().map(|s| s.at)
    }

    /// Processes the network up to `until` and returns the first delivery due by then, with the
    /// clock set to its time. Returns `None`, with the clock at `until` (if later than now), when
    /// nothing is delivered by then.
    pub fn next_delivery(&mut self, until: Instant) -> Option<Delivery> {
        loop {
            if let Some(d) = self.ready.pop_front() {
                return Some(d);
            }
            match self.queue.peek() {
                Some(s) if s.at <= until => {}
                _ => {
                    self.now = self.now.max(until);
                    return None;
                }
            }
            let Some(s) = self.queue.pop() else {
                continue;
            };
            self.now = self.now.max(s.at);
            if let Some(d) = self.process(s.event) {
                return Some(d);
            }
        }
    }

    /// Processes the network up to `to` and returns every delivery due by then, in order.
    pub fn advance(&mut self, to: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Some(d) = self.next_delivery(to) {
            out.push(d);
        }
        out
    }

    /// Moves the clock to `t` (no-op if earlier than now). Deliveries that fall due on the way
    /// are kept, with their times, and returned first by [`next_delivery`](Self::next_delivery).
    pub fn advance_to(&mut self, t: Instant) {
        let mut held = VecDeque::new();
        while let Some(d) = self.next_delivery(t) {
            held.push_back(d);
        }
        self.ready = held;
    }

    fn schedule(&mut self, at: Instant, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn process(&mut self, event: Event) -> Option<Delivery> {
        match event {
            Event::Datagram { packet, node } => {
                self.in_flight -= 1;
                self.on_datagram(packet, node)
            }
            Event::Stream(segment) => self.on_segment(segment),
        }
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.stats.count_drop(reason);
    }

    fn drop_if_blocked(&mut self, p: &Packet) -> bool {
        let blocked = self.is_blocked(p.src.ip(), p.dst.ip());
        if blocked {
            self.drop_packet(DropReason::Blocked);
        }
        blocked
    }

    /// Sends `packet` over `link` in `dir` towards `next`.
    fn forward(&mut self, packet: Packet, link: LinkId, dir: Dir, next: Node) {
        let now = self.now;
        let len = packet.ip_len();
        let result = match link {
            LinkId::Access(h) => {
                self.hosts[h.0 as usize]
                    .access
                    .traverse(dir, now, len, &mut self.rng)
            }
            LinkId::Uplink(s) => {
                self.sites[s.0 as usize]
                    .uplink
                    .traverse(dir, now, len, &mut self.rng)
            }
        };
        let t = match result {
            Ok(t) => t,
            Err(reason) => return self.drop_packet(reason),
        };
        if let Some(at) = t.duplicate {
            self.stats.duplicated += 1;
            let copy = Packet {
                src: packet.src,
                dst: packet.dst,
                payload: packet.payload.clone(),
            };
            self.enqueue(at, copy, next);
        }
        self.enqueue(t.exit, packet, next);
    }

    fn enqueue(&mut self, at: Instant, packet: Packet, node: Node) {
        if self.in_flight >= self.max_in_flight {
            return self.drop_packet(DropReason::QueueFull);
        }
        self.in_flight += 1;
        self.schedule(at, Event::Datagram { packet, node });
    }

    fn on_datagram(&mut self, mut p: Packet, node: Node) -> Option<Delivery> {
        if self.drop_if_blocked(&p) {
            return None;
        }
        match node {
            Node::Host(host) => {
                self.stats.delivered += 1;
                return Some(Delivery {
                    at: self.now,
                    host,
                    event: NetEvent::Datagram {
                        from: p.src,
                        to: p.dst,
                        payload: p.payload,
                    },
                });
            }
            Node::RouterInside(site) => self.route_from_inside(p, site),
            Node::Internet => match self.public.get(&p.dst.ip()).copied() {
                Some(PublicOwner::Host(h)) => {
                    self.forward(p, LinkId::Access(h), Dir::Down, Node::Host(h))
                }
                Some(PublicOwner::Site(s)) => {
                    self.forward(p, LinkId::Uplink(s), Dir::Down, Node::RouterOutside(s))
                }
                None => self.drop_packet(DropReason::NoRoute),
            },
            Node::RouterOutside(site) => {
                let now = self.now;
                if let Some(nat) = &mut self.sites[site.0 as usize].nat {
                    match nat.inbound(p.src, p.dst.port(), now) {
                        Ok(internal) => p.dst = internal,
                        Err(reason) => {
                            self.drop_packet(reason);
                            return None;
                        }
                    }
                }
                self.deliver_on_site(p, site);
            }
        }
        None
    }

    fn route_from_inside(&mut self, mut p: Packet, site: SiteId) {
        if self
            .host_by_ip(p.dst.ip())
            .is_some_and(|h| self.host(h).site == Some(site))
        {
            return self.deliver_on_site(p, site);
        }
        let now = self.now;
        let Some(nat) = &mut self.sites[site.0 as usize].nat else {
            return self.forward(p, LinkId::Uplink(site), Dir::Up, Node::Internet);
        };
        let hairpin = p.dst.ip() == nat.cfg.public_ip;
        let translated = if hairpin {
            if !nat.cfg.hairpin {
                return self.drop_packet(DropReason::NatFiltered);
            }
            // Hairpinning: translate out, then straight back in, without using the uplink.
            nat.outbound(p.src, p.dst, now, &mut self.rng)
                .and_then(|src| Ok((src, nat.inbound(src, p.dst.port(), now)?)))
        } else {
            nat.outbound(p.src, p.dst, now, &mut self.rng)
                .map(|src| (src, p.dst))
        };
        match translated {
            Ok((src, dst)) => {
                p.src = src;
                p.dst = dst;
            }
            Err(reason) => return self.drop_packet(reason),
        }
        if hairpin {
            self.deliver_on_site(p, site);
        } else {
            self.forward(p, LinkId::Uplink(site), Dir::Up, Node::Internet);
        }
    }

    /// Sends a packet from the router of `site` down the access link of its destination host.
    fn deliver_on_site(&mut self, p: Packet, site: SiteId) {
        match self.host_by_ip(p.dst.ip()) {
            Some(h) if self.host(h).site == Some(site) => {
                self.forward(p, LinkId::Access(h), Dir::Down, Node::Host(h))
            }
            _ => self.drop_packet(DropReason::NoRoute),
        }
    }
}

fn ordered(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Converts a table index to an id; more than 2^32 hosts or sites is a harness bug.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or_else(|_| panic!("sim: more than u32::MAX hosts or sites"))
}
