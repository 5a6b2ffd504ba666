//! Inner TCP: stream sockets on the tunnel's internal addresses, over smoltcp.
//!
//! [`TcpStack`] is a smoltcp [`Interface`] (medium IP) whose device is the tunnel itself: the
//! inner TCP packets the client receives are its input, and what smoltcp sends goes straight
//! into [`TunnelClient::send_ip`]. It is sans-IO like the rest of the core: the time is an
//! argument, the seed of its sequence numbers comes from the client's, and
//! [`poll_at`](TcpStack::poll_at) joins the host's `poll_timeout`. The
//! [`ClientHost`](crate::tunnel::ClientHost) owns it; a runtime reaches it through
//! [`TcpHost`], implemented for the host behind the runtime's lock.
//!
//! Every socket's buffers are bounded (`TunnelConfig::tcp_buffer_bytes` each way), and so
//! are the sockets of the stack (`max_tcp_sockets`, listening ones included) and the
//! connections waiting to be accepted on a port (`tcp_backlog`). A listener keeps `backlog`
//! smoltcp sockets listening on its port (smoltcp has no accept queue): each that takes a
//! connection is replaced by a fresh one and waits in the listener's queue until accepted.
//! A stream the application drops is closed (a FIN after what it wrote, or a reset when
//! unread data remains, as Linux does) and forgotten once closed or after
//! [`ORPHAN_LINGER`].
//!
//! Readiness: each stream and listener carries the runtime's wake-up ([`Ready`]); after every
//! poll the stack wakes those whose readable, writable or open state changed, and a runtime's
//! reader or writer retries its operation then.
//!
//! **No network input makes any function here panic**, and none grows memory without bound.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use super::Ready;
use crate::client::TunnelClient;

/// The ports port 0 picks from for a connection or a listener.
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 49_152..=65_535;
/// Inbound TCP packets waiting for the next poll, at most; beyond, they are dropped (TCP
/// retransmits them).
const MAX_INBOUND: usize = 1024;
/// How long a stream the application dropped may take to close before it is reset.
pub const ORPHAN_LINGER: Duration = Duration::from_secs(30);
/// The MTU before the tunnel says its largest packet (the IPv6 minimum).
const DEFAULT_MTU: usize = 1280;

/// Identifies one inner TCP stream of a tunnel; never reused while the tunnel lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpId(pub u64);

/// The bounds of a [`TcpStack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLimits {
    /// Octets of each stream's receive buffer, and of its send buffer.
    pub buffer_bytes: usize,
    /// Connections a listener holds before they are accepted, and sockets it keeps listening.
    pub backlog: usize,
    /// Sockets of the stack at most: streams, listening sockets, streams closing.
    pub max_sockets: usize,
    /// How long a connection attempt waits for its handshake.
    pub connect_timeout: Duration,
}

/// What an application asks of the inner TCP stack of a tunnel, whichever runtime drives it:
/// the runtime implements it for whatever holds the tunnel's host (behind its lock, draining
/// after each call), so that its streams and listeners need not know that type. Operations
/// that would block return `Ok(None)`; the caller waits for its [`Ready`] and tries again.
pub trait TcpHost: Send + Sync {
    /// Starts a connection to `dst` from the tunnel's address of its family; the stream's
    /// wake-up is `ready`.
    fn connect(&self, dst: SocketAddr, ready: Arc<dyn Ready>) -> io::Result<TcpId>;
    /// Whether the connection is made: `Ok(None)` while its handshake runs.
    fn connected(&self, id: TcpId) -> io::Result<Option<()>>;
    /// Listens on `port` (0 picks a free one); the port, and the listener's wake-up `ready`.
    fn listen(&self, port: u16, ready: Arc<dyn Ready>) -> io::Result<u16>;
    /// The next connection waiting on `port`, with `ready` as its wake-up.
    fn accept(&self, port: u16, ready: Arc<dyn Ready>) -> io::Result<Option<TcpId>>;
    /// Stops listening on `port`; connections not accepted are reset.
    fn unlisten(&self, port: u16);
    /// Reads into `buf`: `Ok(Some(0))` at the end of the stream.
    fn recv(&self, id: TcpId, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Writes from `buf` what the send buffer takes.
    fn send(&self, id: TcpId, buf: &[u8]) -> io::Result<Option<usize>>;
    /// Shuts down reading, writing (a FIN after what was written) or both.
    fn shutdown(&self, id: TcpId, how: Shutdown) -> io::Result<()>;
    /// The stream's local and remote addresses.
    fn addrs(&self, id: TcpId) -> io::Result<(SocketAddr, SocketAddr)>;
    /// The application dropped the stream.
    fn close(&self, id: TcpId);
    /// Opts inner port `port` in or out of peer tunneling.
    fn set_peer_tunneling(&self, port: u16, enabled: bool);
    /// The tunnel's internal address (IPv4 first) with `port`.
    fn local_addr(&self, port: u16) -> io::Result<SocketAddr>;
}

/// What the stack counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Inbound packets dropped because too many waited for the stack.
    pub inbound_dropped: u64,
    /// Packets the stack sent that the client refused (a full send queue, no tunnel).
    pub send_errors: u64,
    /// Connections reset because the stack had no room (socket limit or a full backlog).
    pub refused: u64,
}

/// The inner TCP stack of a tunnel. See the [module documentation](self).
pub struct TcpStack {
    iface: Option<Interface>,
    sockets: SocketSet<'static>,
    inbound: VecDeque<Vec<u8>>,
    /// Buffers of inbound packets already processed, for reuse.
    spare: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    epoch: Instant,
    seed: u64,
    streams: FxHashMap<TcpId, Stream>,
    listeners: FxHashMap<u16, Listener>,
    next_id: u64,
    next_port: u16,
    limits: TcpLimits,
    addrs: (Option<IpCidr>, Option<IpCidr>),
    /// Something changed since the last poll.
    due: bool,
    next_poll: Option<Instant>,
    closed: bool,
    counters: TcpCounters,
}

/// A stream: its smoltcp socket, its wake-up, and what it looked like at the last wake-up.
struct Stream {
    handle: SocketHandle,
    ready: Arc<dyn Ready>,
    seen: u8,
    /// When the application dropped it.
    orphaned: Option<Instant>,
    /// Reading was shut down: what arrives is discarded.
    read_shut: bool,
    /// The other end's FIN came: once closed, the stream ended cleanly rather than by a reset.
    finished: bool,
}

struct Listener {
    ready: Arc<dyn Ready>,
    /// Sockets listening on the port.
    listening: Vec<SocketHandle>,
    /// Sockets that took a connection, oldest first, until accepted.
    incoming: VecDeque<SocketHandle>,
    /// How many of them had finished their handshake at the last poll.
    acceptable: usize,
}

impl std::fmt::Debug for TcpStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStack")
            .field("streams", &self.streams.len())
            .field("listeners", &self.listeners.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl TcpStack {
    /// An empty stack within `limits`; `seed` keys its initial sequence numbers and `now`
    /// is its epoch.
    pub fn new(limits: TcpLimits, seed: u64, now: Instant) -> Self {
        Self {
            iface: None,
            sockets: SocketSet::new(Vec::new()),
            inbound: VecDeque::new(),
            spare: Vec::new(),
            scratch: Vec::new(),
            epoch: now,
            seed,
            streams: FxHashMap::default(),
            listeners: FxHashMap::default(),
            next_id: 0,
            next_port: *EPHEMERAL_PORTS.start(),
            limits: TcpLimits {
                buffer_bytes: limits.buffer_bytes.max(1024),
                backlog: limits.backlog.max(1),
                max_sockets: limits.max_sockets.max(1),
                connect_timeout: limits.connect_timeout,
            },
            addrs: (None, None),
            due: false,
            next_poll: None,
            closed: false,
            counters: TcpCounters::default(),
        }
    }

    /// What it counted.
    pub fn counters(&self) -> TcpCounters {
        self.counters
    }

    /// Whether a TCP packet for local port `port` belongs to this stack: a listener or a
    /// stream uses the port.
    pub fn uses_port(&self, port: u16) -> bool {
        self.listeners.contains_key(&port)
            || self.streams.values().any(|s| {
                let socket = self.sockets.get::<tcp::Socket<'_>>(s.handle);
                socket.local_endpoint().is_some_and(|e| e.port == port)
            })
    }

    /// Queues one inbound TCP packet for the next poll.
    pub fn receive(&mut self, packet: &[u8]) {
        if self.inbound.len() >= MAX_INBOUND {
            self.counters.inbound_dropped += 1;
            return;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.inbound.push_back(buf);
        self.due = true;
    }

    /// When [`poll`](Self::poll) is next due, if a timer of the stack runs.
    pub fn poll_at(&self) -> Option<Instant> {
        if self.due {
            return Some(self.epoch);
        }
        self.next_poll
    }

    /// Runs the stack at `now` if something changed or a timer is due: processes the inbound
    /// packets, sends what the sockets have to send through `client`, updates the listeners
    /// and wakes the streams whose state changed. True if it sent anything.
    pub fn poll(&mut self, now: Instant, client: &mut TunnelClient) -> bool {
        if !self.due && self.next_poll.is_none_or(|at| at > now) {
            return false;
        }
        self.due = false;
        self.sync_addresses(now, client);
        let at = self.epoch_time(now);
        let Some(iface) = &mut self.iface else {
            // No tunnel yet: nothing can be addressed.
            self.inbound.clear();
            self.next_poll = None;
            return false;
        };
        let mut device = Wire {
            inbound: &mut self.inbound,
            spare: &mut self.spare,
            scratch: &mut self.scratch,
            client,
            now,
            mtu: 0,
            sent: 0,
            errors: 0,
        };
        device.mtu = device
            .client
            .tunnel_info()
            .map_or(DEFAULT_MTU, |i| i.max_packet_len);
        iface.poll(at, &mut device, &mut self.sockets);
        let (sent, errors) = (device.sent, device.errors);
        self.counters.send_errors += errors;
        self.after_poll(now);
        let epoch = self.epoch;
        let stack_due = self.iface.as_mut().and_then(|iface| {
            let t = iface.poll_at(at, &self.sockets)?;
            Some(epoch + Duration::from_micros(t.total_micros().max(0) as u64))
        });
        // Streams the application dropped are reset when their linger ends.
        let orphans_due = self
            .streams
            .values()
            .filter_map(|s| s.orphaned)
            .min()
            .map(|since| since + ORPHAN_LINGER);
        self.next_poll = match (stack_due, orphans_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        sent > 0
    }

    /// The tunnel is gone: every stream and listener sees it at once.
    pub fn close_all(&mut self) {
        self.closed = true;
        for stream in self.streams.values() {
            stream.ready.all();
        }
        for listener in self.listeners.values() {
            listener.ready.all();
        }
    }

    // ---- application → stack ----

    /// Starts a connection to `dst` from a free port of `client`'s internal address of its
    /// family.
    pub fn connect(
        &mut self,
        now: Instant,
        client: &TunnelClient,
        dst: SocketAddr,
        ready: Arc<dyn Ready>,
    ) -> io::Result<TcpId> {
        self.check_open()?;
        self.sync_addresses(now, client);
        self.check_room(1)?;
        let local = match dst.ip() {
            IpAddr::V4(_) => self.addrs.0,
            IpAddr::V6(_) => self.addrs.1,
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no tunnel address"))?;
        let iface = self
            .iface
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no tunnel yet"))?;
        let port = free_port(&mut self.next_port, |p| {
            self.listeners.contains_key(&p)
                || self.streams.values().any(|s| {
                    let socket = self.sockets.get::<tcp::Socket<'_>>(s.handle);
                    socket.local_endpoint().is_some_and(|e| e.port == p)
                })
        })?;
        let mut socket = new_socket(self.limits.buffer_bytes);
        socket.set_timeout(Some(self.limits.connect_timeout.into()));
        let local = IpListenEndpoint {
            addr: Some(local.address()),
            port,
        };
        socket
            .connect(iface.context(), endpoint(dst), local)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let handle = self.sockets.add(socket);
        self.due = true;
        Ok(self.insert(handle, ready))
    }

    /// Whether the connection `id` is made: `Ok(None)` during the handshake, an error if it
    /// was refused, reset or timed out.
    pub fn connected(&mut self, id: TcpId) -> io::Result<Option<()>> {
        self.check_open()?;
        let socket = self.socket(id)?;
        match socket.state() {
            State::SynSent | State::SynReceived => Ok(None),
            State::Closed => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "inner connection refused or timed out",
            )),
            _ => {
                // The handshake is done: no more bound on waiting for acknowledgements.
                self.socket_mut(id)?.set_timeout(None);
                Ok(Some(()))
            }
        }
    }

    /// Listens on `port` (0 picks a free one).
    pub fn listen(&mut self, port: u16, ready: Arc<dyn Ready>) -> io::Result<u16> {
        self.check_open()?;
        let port = if port == 0 {
            free_port(&mut self.next_port, |p| self.listeners.contains_key(&p))?
        } else if self.listeners.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("inner TCP port {port} is listening"),
            ));
        } else {
            port
        };
        self.check_room(1)?;
        let mut listener = Listener {
            ready,
            listening: Vec::new(),
            incoming: VecDeque::new(),
            acceptable: 0,
        };
        self.refill(port, &mut listener);
        self.listeners.insert(port, listener);
        Ok(port)
    }

    /// The oldest connection waiting on `port`, now a stream with wake-up `ready`.
    pub fn accept(&mut self, port: u16, ready: Arc<dyn Ready>) -> io::Result<Option<TcpId>> {
        self.check_open()?;
        let listener = self
            .listeners
            .get_mut(&port)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not listening"))?;
        // Connections still in their handshake wait; the first one done is taken.
        let sockets = &self.sockets;
        let Some(i) = listener.incoming.iter().position(|h| {
            !matches!(
                sockets.get::<tcp::Socket<'_>>(*h).state(),
                State::SynReceived | State::Listen
            )
        }) else {
            return Ok(None);
        };
        let Some(handle) = listener.incoming.remove(i) else {
            return Ok(None);
        };
        listener.acceptable = listener.acceptable.saturating_sub(1);
        self.due = true;
        Ok(Some(self.insert(handle, ready)))
    }

    /// Stops listening on `port`; connections not accepted are reset.
    pub fn unlisten(&mut self, port: u16) {
        let Some(listener) = self.listeners.remove(&port) else {
            return;
        };
        for handle in listener.listening.into_iter().chain(listener.incoming) {
            self.abort_later(handle);
        }
    }

    /// Reads what the stream `id` received into `buf`: `Ok(Some(0))` at its end, `Ok(None)`
    /// when nothing waits yet.
    pub fn recv(&mut self, id: TcpId, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let (read_shut, finished) = self
            .streams
            .get(&id)
            .map_or((false, false), |s| (s.read_shut, s.finished));
        let closed = self.closed;
        let socket = self.socket_mut(id)?;
        if read_shut || buf.is_empty() {
            return Ok(Some(0));
        }
        if socket.can_recv() {
            let n = socket.recv_slice(buf).map_err(recv_error)?;
            self.due = true;
            return Ok(Some(n));
        }
        if !socket.may_recv() {
            return match socket.state() {
                // Reset, or timed out: not a clean end.
                State::Closed if !closed && !finished => Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "inner connection reset",
                )),
                State::SynSent | State::SynReceived => Ok(None),
                _ => Ok(Some(0)),
            };
        }
        if closed {
            return Err(super::closed());
        }
        Ok(None)
    }

    /// Writes into the stream `id`'s send buffer what it takes of `buf`; `Ok(None)` when it
    /// is full.
    pub fn send(&mut self, id: TcpId, buf: &[u8]) -> io::Result<Option<usize>> {
        if self.closed {
            return Err(super::closed());
        }
        let socket = self.socket_mut(id)?;
        if !socket.may_send() {
            return match socket.state() {
                State::SynSent | State::SynReceived => Ok(None),
                _ => Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "inner connection closed for writing",
                )),
            };
        }
        if buf.is_empty() {
            return Ok(Some(0));
        }
        if !socket.can_send() {
            return Ok(None);
        }
        let n = socket
            .send_slice(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        self.due = true;
        Ok(Some(n))
    }

    /// Shuts down reading (what arrives is discarded), writing (a FIN after what was
    /// written) or both.
    pub fn shutdown(&mut self, id: TcpId, how: Shutdown) -> io::Result<()> {
        let socket = self.socket_mut(id)?;
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            socket.close();
        }
        if let (Shutdown::Read | Shutdown::Both, Some(stream)) = (how, self.streams.get_mut(&id)) {
            stream.read_shut = true;
        }
        self.due = true;
        Ok(())
    }

    /// The local and remote addresses of stream `id`.
    pub fn addrs(&self, id: TcpId) -> io::Result<(SocketAddr, SocketAddr)> {
        let socket = self.socket(id)?;
        match (socket.local_endpoint(), socket.remote_endpoint()) {
            (Some(local), Some(remote)) => Ok((socket_addr(local), socket_addr(remote))),
            _ => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "inner connection closed",
            )),
        }
    }

    /// The application dropped stream `id`: it closes (reset if unread data remains) and is
    /// forgotten once closed, or after [`ORPHAN_LINGER`] at the latest.
    pub fn close(&mut self, now: Instant, id: TcpId) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.orphaned = Some(now);
        let socket = self.sockets.get_mut::<tcp::Socket<'_>>(stream.handle);
        if socket.can_recv() || stream.read_shut && socket.may_recv() {
            socket.abort();
        } else {
            socket.close();
        }
        self.due = true;
    }

    // ---- helpers ----

    fn insert(&mut self, handle: SocketHandle, ready: Arc<dyn Ready>) -> TcpId {
        self.next_id += 1;
        let id = TcpId(self.next_id);
        self.streams.insert(
            id,
            Stream {
                handle,
                ready,
                seen: 0,
                orphaned: None,
                read_shut: false,
                finished: false,
            },
        );
        id
    }

    fn socket(&self, id: TcpId) -> io::Result<&tcp::Socket<'static>> {
        let stream = self.streams.get(&id).ok_or_else(gone)?;
        Ok(self.sockets.get::<tcp::Socket<'static>>(stream.handle))
    }

    fn socket_mut(&mut self, id: TcpId) -> io::Result<&mut tcp::Socket<'static>> {
        let stream = self.streams.get(&id).ok_or_else(gone)?;
        Ok(self.sockets.get_mut::<tcp::Socket<'static>>(stream.handle))
    }

    fn check_open(&self) -> io::Result<()> {
        match self.closed {
            true => Err(super::closed()),
            false => Ok(()),
        }
    }

    fn check_room(&self, n: usize) -> io::Result<()> {
        let used = self.sockets.iter().count();
        if used + n > self.limits.max_sockets {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "too many inner TCP sockets",
            ));
        }
        Ok(())
    }

    /// Tops `listener` up to `backlog` listening sockets, within the socket limit.
    fn refill(&mut self, port: u16, listener: &mut Listener) {
        let waiting = listener.listening.len() + listener.incoming.len();
        let want = self.limits.backlog.saturating_sub(waiting).max(
            // At least one listens while the backlog is full, so that the next connection
            // is refused only once the stack is out of room.
            usize::from(listener.listening.is_empty() && listener.incoming.is_empty()),
        );
        for _ in 0..want {
            if self.check_room(1).is_err() {
                return;
            }
            let mut socket = new_socket(self.limits.buffer_bytes);
            if socket.listen(port).is_err() {
                return;
            }
            listener.listening.push(self.sockets.add(socket));
        }
    }

    fn abort_later(&mut self, handle: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket<'_>>(handle).abort();
        self.due = true;
        // A stream entry with no wake-up that is reaped once the reset is out.
        self.next_id += 1;
        self.streams.insert(
            TcpId(self.next_id),
            Stream {
                handle,
                ready: Arc::new(()),
                seen: 0,
                orphaned: Some(self.epoch),
                read_shut: true,
                finished: false,
            },
        );
    }

    /// Moves connected sockets of the listeners to their queues, reaps what closed, and
    /// wakes what changed.
    fn after_poll(&mut self, now: Instant) {
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let Some(mut listener) = self.listeners.remove(&port) else {
                continue;
            };
            let mut woken = false;
            let sockets = &self.sockets;
            let (busy, idle): (Vec<_>, Vec<_>) = listener
                .listening
                .iter()
                .partition(|h| sockets.get::<tcp::Socket<'_>>(**h).state() != State::Listen);
            listener.listening = idle;
            for handle in busy {
                woken = true;
                listener.incoming.push_back(handle);
            }
            // A handshake that was reset goes back to listening, or away.
            let mut kept = VecDeque::new();
            for handle in std::mem::take(&mut listener.incoming) {
                match self.sockets.get::<tcp::Socket<'_>>(handle).state() {
                    State::Listen => listener.listening.push(handle),
                    State::Closed => {
                        self.sockets.remove(handle);
                    }
                    _ => kept.push_back(handle),
                }
            }
            listener.incoming = kept;
            // Beyond the backlog, the newest connections are reset.
            while listener.incoming.len() > self.limits.backlog {
                if let Some(handle) = listener.incoming.pop_back() {
                    self.counters.refused += 1;
                    self.abort_later(handle);
                }
            }
            self.refill(port, &mut listener);
            // A handshake finished since the last poll: one may be accepted now.
            let sockets = &self.sockets;
            let acceptable = listener
                .incoming
                .iter()
                .filter(|h| sockets.get::<tcp::Socket<'_>>(**h).state() != State::SynReceived)
                .count();
            woken |= acceptable > listener.acceptable;
            listener.acceptable = acceptable;
            if woken {
                listener.ready.all();
            }
            self.listeners.insert(port, listener);
        }
        let mut reaped = Vec::new();
        for (id, stream) in &mut self.streams {
            let socket = self.sockets.get::<tcp::Socket<'_>>(stream.handle);
            if let Some(since) = stream.orphaned {
                let done = matches!(socket.state(), State::Closed | State::TimeWait);
                if done || now.saturating_duration_since(since) >= ORPHAN_LINGER {
                    reaped.push(*id);
                }
                continue;
            }
            stream.finished |= matches!(
                socket.state(),
                State::CloseWait | State::LastAck | State::Closing | State::TimeWait
            );
            let seen = readiness(socket);
            if seen != stream.seen {
                stream.seen = seen;
                stream.ready.all();
            }
        }
        for id in reaped {
            if let Some(stream) = self.streams.remove(&id) {
                let socket = self.sockets.get_mut::<tcp::Socket<'_>>(stream.handle);
                if socket.state() != State::Closed {
                    socket.abort();
                }
                self.sockets.remove(stream.handle);
            }
        }
    }

    /// Gives the interface the tunnel's addresses (made when it first has one).
    fn sync_addresses(&mut self, now: Instant, client: &TunnelClient) {
        let Some(info) = client.tunnel_info() else {
            return;
        };
        let v4 = info
            .ipv4
            .map(|a| IpCidr::new(IpAddress::Ipv4(a.addr), a.prefix_len.min(32)));
        let v6 = info
            .ipv6
            .map(|a| IpCidr::new(IpAddress::Ipv6(a.addr), a.prefix_len.min(128)));
        if (v4, v6) == self.addrs && self.iface.is_some() {
            return;
        }
        self.addrs = (v4, v6);
        let at = self.epoch_time(now);
        let iface = self.iface.get_or_insert_with(|| {
            let mut config = Config::new(HardwareAddress::Ip);
            config.random_seed = self.seed;
            let mut device = Caps(info.max_packet_len);
            Interface::new(config, &mut device, at)
        });
        iface.update_ip_addrs(|addrs| {
            addrs.clear();
            for cidr in [v4, v6].into_iter().flatten() {
                let _ = addrs.push(cidr);
            }
        });
        // Every other internal address is on the link: medium IP needs no neighbour.
        let routes = iface.routes_mut();
        routes.update(|r| r.clear());
        if let Some(IpCidr::Ipv4(c)) = v4 {
            let _ = routes.add_default_ipv4_route(c.address());
        }
        if let Some(IpCidr::Ipv6(c)) = v6 {
            let _ = routes.add_default_ipv6_route(c.address());
        }
    }

    fn epoch_time(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }
}

/// What a stream's reader and writer wait for: readable, writable, open.
fn readiness(socket: &tcp::Socket<'_>) -> u8 {
    u8::from(socket.can_recv() || !socket.may_recv())
        | u8::from(socket.can_send() || !socket.may_send()) << 1
        | u8::from(socket.is_open()) << 2
        | u8::from(matches!(
            socket.state(),
            State::SynSent | State::SynReceived
        )) << 3
}

fn new_socket(buffer_bytes: usize) -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0; buffer_bytes]);
    let tx = tcp::SocketBuffer::new(vec![0; buffer_bytes]);
    let mut socket = tcp::Socket::new(rx, tx);
    // Writes of a forwarder come in whatever sizes its reads had: send them at once.
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket
}

/// A free port from 49152 up, round-robin (a port just freed is not reused at once).
fn free_port(next: &mut u16, used: impl Fn(u16) -> bool) -> io::Result<u16> {
    let span = EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start();
    for _ in 0..=span {
        let port = *next;
        *next = if port == *EPHEMERAL_PORTS.end() {
            *EPHEMERAL_PORTS.start()
        } else {
            port + 1
        };
        if !used(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free inner TCP port",
    ))
}

fn endpoint(addr: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(IpAddress::from(addr.ip()), addr.port())
}

fn socket_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(e.addr), e.port)
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no such inner TCP stream")
}

fn recv_error(e: tcp::RecvError) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

/// A wake-up that wakes nobody: sockets the stack only reaps.
impl Ready for () {
    fn one(&self) {}
    fn all(&self) {}
}

/// The tunnel as smoltcp's device, for one poll: inbound packets are what the client
/// received, and every packet smoltcp sends goes to the client at once.
struct Wire<'a> {
    inbound: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
    scratch: &'a mut Vec<u8>,
    client: &'a mut TunnelClient,
    now: Instant,
    mtu: usize,
    sent: u64,
    errors: u64,
}

impl Device for Wire<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.inbound.pop_front()?;
        let rx = RxToken {
            packet,
            spare: self.spare,
        };
        let tx = TxToken {
            scratch: self.scratch,
            client: self.client,
            now: self.now,
            sent: &mut self.sent,
            errors: &mut self.errors,
        };
        Some((rx, tx))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken {
            scratch: self.scratch,
            client: self.client,
            now: self.now,
            sent: &mut self.sent,
            errors: &mut self.errors,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        Caps(self.mtu).capabilities()
    }
}

/// The capabilities of the tunnel as a device: IP packets up to `0` octets.
struct Caps(usize);

impl Caps {
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.0;
        caps
    }
}

impl Device for Caps {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        None
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        None
    }

    fn capabilities(&self) -> DeviceCapabilities {
        Caps::capabilities(self)
    }
}

struct RxToken<'a> {
    packet: Vec<u8>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(&self.packet);
        if self.spare.len() < 64 {
            self.spare.push(self.packet);
        }
        r
    }
}

struct TxToken<'a> {
    scratch: &'a mut Vec<u8>,
    client: &'a mut TunnelClient,
    now: Instant,
    sent: &'a mut u64,
    errors: &'a mut u64,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.scratch.clear();
        self.scratch.resize(len, 0);
        let r = f(self.scratch);
        match self.client.send_ip(self.now, self.scratch) {
            Ok(()) => *self.sent += 1,
            // Loss, as on a link: TCP repairs it.
            Err(_) => *self.errors += 1,
        }
        r
    }
}
