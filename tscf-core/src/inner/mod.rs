//! The client's inner UDP stack: datagrams between internal addresses, carried as IPv4 or IPv6
//! packets in the tunnel and handed to inner sockets by destination port.
//!
//! The table of bound ports and the building and parsing of packets live here; the receive
//! queue of each socket is the runtime's, built around its own way of waking a reader (a
//! condition variable for threads, an event for tasks) over [`Datagrams`], which holds the
//! datagrams and reuses their buffers. A runtime's inner socket reads its queue without taking
//! the tunnel's lock, so a busy receiver does not slow the tunnel down.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etherparse::{IpNumber, IpSlice, Ipv4Header, Ipv6Header, UdpHeader, UdpSlice};
use rustc_hash::FxHashMap;

use crate::client::{SendError, TunnelClient};

pub mod fragment;
#[cfg(feature = "host")]
mod stream;
#[cfg(feature = "host")]
pub mod tcp;

#[cfg(feature = "host")]
pub use stream::{Listener, ListenerControl, Stream, StreamControl};

/// Hop limit of the inner packets sent.
const INNER_TTL: u8 = 64;
/// The largest UDP payload one IPv4 packet holds.
const MAX_UDP_PAYLOAD: usize = 65_507;
/// The ports port 0 picks from.
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 49_152..=65_535;
/// Buffers a queue keeps for reuse once their datagram is read, at most.
const SPARE_BUFFERS: usize = 64;
/// The largest buffer kept for reuse: a full-sized inner packet's payload fits, while a rare
/// large datagram's buffer is freed rather than kept.
const SPARE_CAPACITY: usize = 2048;

/// The tunnel's internal IPv4 address (IPv6 if it has none) and `port`.
pub fn local_addr(client: &TunnelClient, port: u16) -> io::Result<SocketAddr> {
    let ip = client
        .internal_ipv4()
        .map(IpAddr::V4)
        .or(client.internal_ipv6().map(IpAddr::V6))
        .ok_or_else(no_tunnel)?;
    Ok(SocketAddr::new(ip, port))
}

/// Wraps `payload` in a UDP packet from the tunnel's internal address of `dst`'s family and
/// `port` to `dst`, and hands it to `client`; an IPv4 packet larger than the tunnel carries
/// goes as IPv4 fragments ([`fragment`]), which the other end reassembles. `packet` is
/// scratch space for the packet, kept by the caller so that a send allocates nothing, as is
/// `fragmenter`. Errors as an inner socket reports them: no tunnel yet is
/// [`io::ErrorKind::NotConnected`], a full send queue [`io::ErrorKind::WouldBlock`], an IPv6
/// packet larger than the tunnel carries [`io::ErrorKind::InvalidInput`] (its text says that
/// IPv6 is not fragmented and how large a payload fits). Every refusal is counted in the
/// client's [`ClientStats`](crate::client::ClientStats) (`send_refused_*`, `send_queue_full`).
pub fn send_udp(
    client: &mut TunnelClient,
    now: Instant,
    port: u16,
    dst: SocketAddr,
    payload: &[u8],
    packet: &mut Vec<u8>,
    fragmenter: &mut fragment::Fragmenter,
) -> io::Result<()> {
    let from = match dst.ip() {
        IpAddr::V4(_) => client.internal_ipv4().map(IpAddr::V4),
        IpAddr::V6(_) => client.internal_ipv6().map(IpAddr::V6),
    };
    let Some(from) = from else {
        client.refused(SendError::NotConnected);
        return Err(no_tunnel());
    };
    let from = SocketAddr::new(from, port);
    if let Err(e) = write_udp(packet, from, dst, payload) {
        let len = payload.len();
        client.refused(SendError::TooLarge {
            len,
            max: MAX_UDP_PAYLOAD,
        });
        return Err(e);
    }
    let max = client
        .tunnel_info()
        .map_or(usize::MAX, |i| i.max_packet_len);
    if packet.len() <= max {
        return client.send_ip(now, packet).map_err(send_error);
    }
    if dst.is_ipv6() {
        // Inner IPv6 is not fragmented: say so, and how much fits.
        let len = packet.len();
        client.refused(SendError::TooLarge { len, max });
        let fits = max.saturating_sub(len - payload.len());
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "inner IPv6 packet of {len} octets exceeds the tunnel's maximum of {max}; IPv6 \
                 datagrams are not fragmented, so UDP payloads over IPv6 are limited to {fits} \
                 octets"
            ),
        ));
    }
    let mut failed = None;
    fragmenter.split(packet, max, |fragment| {
        match client.send_ip(now, fragment) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    failed.map_or(Ok(()), |e| Err(send_error(e)))
}

/// Writes into `packet` (replacing what it held) the IPv4 or IPv6 UDP packet from `from` to
/// `to` that carries `payload`, with both checksums: what etherparse's `PacketBuilder` writes,
/// without its intermediate steps. `from` and `to` are of the same family.
fn write_udp(
    packet: &mut Vec<u8>,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
) -> io::Result<()> {
    let udp_len = u16::try_from(UdpHeader::LEN + payload.len())
        .map_err(|_| invalid("UDP payload too long"))?;
    packet.clear();
    match (from.ip(), to.ip()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let mut ip = Ipv4Header::new(
                udp_len,
                INNER_TTL,
                IpNumber::UDP,
                source.octets(),
                destination.octets(),
            )
            .map_err(invalid)?;
            ip.header_checksum = ip.calc_header_checksum();
            let udp = UdpHeader::with_ipv4_checksum(from.port(), to.port(), &ip, payload)
                .map_err(invalid)?;
            packet.reserve(Ipv4Header::MIN_LEN + usize::from(udp_len));
            packet.extend_from_slice(&ip.to_bytes());
            packet.extend_from_slice(&udp.to_bytes());
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: udp_len,
                next_header: IpNumber::UDP,
                hop_limit: INNER_TTL,
                source: source.octets(),
                destination: destination.octets(),
            };
            let udp = UdpHeader::with_ipv6_checksum(from.port(), to.port(), &ip, payload)
                .map_err(invalid)?;
            packet.reserve(Ipv6Header::LEN + usize::from(udp_len));
            packet.extend_from_slice(&ip.to_bytes());
            packet.extend_from_slice(&udp.to_bytes());
        }
        _ => return Err(invalid("source and destination of different families")),
    }
    packet.extend_from_slice(payload);
    Ok(())
}

/// A UDP datagram received in the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// The sender's internal address and port.
    pub from: SocketAddr,
    /// The destination port: the inner socket it is for.
    pub port: u16,
    /// The UDP payload.
    pub payload: &'a [u8],
}

/// The UDP datagram an inner IP packet carries; `None` if it is not IPv4 or IPv6 UDP.
pub fn parse_udp(packet: &[u8]) -> Option<UdpDatagram<'_>> {
    // The IP layer and then UDP only: every received datagram passes here, and slicing the
    // whole packet (`SlicedPacket`) costs several times as much for the same checks.
    let ip = IpSlice::from_slice(packet).ok()?;
    let carried = ip.payload();
    if carried.fragmented || carried.ip_number != IpNumber::UDP {
        return None;
    }
    let udp = UdpSlice::from_slice(carried.payload).ok()?;
    Some(UdpDatagram {
        from: SocketAddr::new(ip.source_addr(), udp.source_port()),
        port: udp.destination_port(),
        payload: udp.payload(),
    })
}

/// Checks a read timeout as std sockets do: zero is an error.
pub fn check_read_timeout(timeout: Option<Duration>) -> io::Result<()> {
    if timeout == Some(Duration::ZERO) {
        return Err(invalid("zero read timeout"));
    }
    Ok(())
}

/// The error of a read on an inner socket whose tunnel is gone.
pub fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the tunnel is closed")
}

/// The error of a read that waited its whole timeout.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, "read timed out")
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

fn no_tunnel() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no tunnel yet")
}

/// A send the client refused, as an inner socket reports it.
pub fn send_error(e: SendError) -> io::Error {
    let kind = match e {
        SendError::NotConnected => io::ErrorKind::NotConnected,
        SendError::Closed => io::ErrorKind::BrokenPipe,
        SendError::QueueFull => io::ErrorKind::WouldBlock,
        _ => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}

/// The receive queue of one inner socket, as a runtime builds it around its own wake-up over
/// [`Datagrams`].
pub trait DatagramQueue {
    /// Queues `payload` from `from`; false (and nothing queued) if the queue is full. It
    /// wakes no reader: [`wake`](Self::wake) does, once for all that a batch of packets
    /// queued.
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool;
    /// Wakes readers for `pushed` (at least one) datagrams queued since the last wake-up.
    fn wake(&self, pushed: usize);
    /// The tunnel is gone: wake every reader for good.
    fn close(&self);
}

/// What a runtime's inner socket asks of the tunnel it belongs to: the runtime implements it
/// for whatever holds the tunnel's host (behind its lock, draining after each call), so that
/// its sockets need not know that type.
pub trait SocketHost: Send + Sync {
    /// Sends `payload` from inner port `port` to `dst` (see [`send_udp`]).
    fn send_to(&self, port: u16, dst: SocketAddr, payload: &[u8]) -> io::Result<()>;
    /// Sends each of `payloads` from inner port `port` to `dst` under one lock, and drains
    /// once, so that the datagrams leave together; how many were sent. It stops at the first
    /// that fails, whose error it returns when it is the first.
    fn send_many(
        &self,
        port: u16,
        dst: SocketAddr,
        payloads: &mut dyn Iterator<Item = &[u8]>,
    ) -> io::Result<usize>;
    /// Opts inner port `port` in or out of peer tunneling.
    fn set_peer_tunneling(&self, port: u16, enabled: bool);
    /// The tunnel's internal address with `port` (see [`local_addr`]).
    fn local_addr(&self, port: u16) -> io::Result<SocketAddr>;
    /// Unbinds `port` (the socket is dropped).
    fn unbind(&self, port: u16);
}

/// How a runtime wakes the readers of an inner socket's queue (a condition variable for
/// threads, an event for tasks).
pub trait Ready: Send + Sync {
    /// Wakes one reader: a datagram came.
    fn one(&self);
    /// Wakes every reader: the tunnel is gone.
    fn all(&self);
}

impl Ready for std::sync::Condvar {
    fn one(&self) {
        self.notify_one();
    }

    fn all(&self) {
        self.notify_all();
    }
}

/// The receive queue of one inner socket: its [`Datagrams`] behind a lock of their own (a
/// reader never takes the tunnel's), and the runtime's way of waking its readers.
#[derive(Debug)]
pub struct SocketQueue<W> {
    datagrams: Mutex<Datagrams>,
    /// The readers' wake-up; a reader with nothing to read waits on it.
    pub ready: W,
}

impl<W: Ready + Default> SocketQueue<W> {
    /// An empty queue of at most `limit` datagrams.
    pub fn new(limit: usize) -> Self {
        Self {
            datagrams: Mutex::new(Datagrams::new(limit)),
            ready: W::default(),
        }
    }
}

impl<W> SocketQueue<W> {
    /// The datagrams, locked (going on if a reader panicked while holding them).
    pub fn lock(&self) -> MutexGuard<'_, Datagrams> {
        self.datagrams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<W: Ready> DatagramQueue for SocketQueue<W> {
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
        self.lock().push(payload, from)
    }

    fn wake(&self, pushed: usize) {
        // One datagram is for one reader; several may be for several.
        if pushed == 1 {
            self.ready.one();
        } else {
            self.ready.all();
        }
    }

    fn close(&self) {
        self.lock().close();
        self.ready.all();
    }
}

/// What an application steers of an inner UDP socket, whichever runtime drives it: each
/// runtime's `InnerUdpSocket` dereferences to it and adds `send_to` and `recv_from` in its own
/// style (blocking or async).
pub trait SocketControl: Send + Sync {
    /// The local port.
    fn port(&self) -> u16;
    /// The tunnel's internal IPv4 address (IPv6 if it has none) and this socket's port.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Opts this socket in or out of peer tunneling (the `tsc_setsockopt` of the TSC API). An
    /// opted-in socket's datagrams to another tunnel take the relay until a peer tunnel with
    /// it is up, then go straight to it, and back to the relay if that tunnel goes down.
    /// Without peer tunneling in the tunnel's configuration it does nothing. The default is
    /// the configuration's `default_opt_in` (false unless changed); it comes back when the
    /// socket is dropped.
    fn set_peer_tunneling(&self, enabled: bool);
    /// How long `recv_from` waits; `None` waits until a datagram comes. A zero duration is
    /// an error, as for std sockets.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// An inner UDP socket, as both runtimes hold it: its port, its receive queue, its way to the
/// tunnel and its read timeout. Dropping it unbinds the port.
pub struct Socket<W> {
    port: u16,
    queue: Arc<SocketQueue<W>>,
    tunnel: Arc<dyn SocketHost>,
    read_timeout: Mutex<Option<Duration>>,
}

impl<W> Socket<W> {
    /// The socket bound to `port` with `queue`, in `tunnel`.
    pub fn new(port: u16, queue: Arc<SocketQueue<W>>, tunnel: Arc<dyn SocketHost>) -> Self {
        Self {
            port,
            queue,
            tunnel,
            read_timeout: Mutex::new(None),
        }
    }

    /// Its receive queue, where a runtime's `recv_from` takes datagrams and waits.
    pub fn queue(&self) -> &SocketQueue<W> {
        &self.queue
    }

    /// Sends `payload` to `dst` through the tunnel; its length.
    pub fn send(&self, payload: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.tunnel.send_to(self.port, dst, payload)?;
        Ok(payload.len())
    }

    /// Sends each of `payloads` to `dst` as its own datagram, together (as `sendmmsg` does):
    /// the tunnel takes them all under one lock and its runtime sends them in as few system
    /// calls as the system allows. How many were sent; an error only if none was.
    pub fn send_many<B: AsRef<[u8]>>(&self, payloads: &[B], dst: SocketAddr) -> io::Result<usize> {
        let mut payloads = payloads.iter().map(AsRef::as_ref);
        self.tunnel.send_many(self.port, dst, &mut payloads)
    }

    /// How long a read waits; `None` waits until a datagram comes. A runtime reads its clock
    /// only when there is a timeout.
    pub fn read_timeout(&self) -> Option<Duration> {
        *self.read_timeout.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<W: Send + Sync> SocketControl for Socket<W> {
    fn port(&self) -> u16 {
        self.port
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tunnel.local_addr(self.port)
    }

    fn set_peer_tunneling(&self, enabled: bool) {
        self.tunnel.set_peer_tunneling(self.port, enabled);
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        check_read_timeout(timeout)?;
        *self.read_timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
        Ok(())
    }
}

impl<W> std::fmt::Debug for Socket<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl<W> Drop for Socket<W> {
    fn drop(&mut self) {
        self.tunnel.unbind(self.port);
    }
}

/// What [`SocketTable::deliver`] did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the socket bound to its port.
    Queued,
    /// Not an IPv4 or IPv6 UDP packet.
    NotUdp,
    /// No socket is bound to its destination port.
    Unbound,
    /// The socket's queue is full.
    QueueFull,
}

/// The inner sockets of a tunnel: the receive queue bound to each port, and which port 0
/// picks next.
#[derive(Debug)]
pub struct SocketTable<Q> {
    /// Keyed by the port of an inner socket of this tunnel, which the application binds: no
    /// one on the network picks these keys, so a fast unkeyed hash will do.
    queues: FxHashMap<u16, Arc<Q>>,
    next_port: u16,
    /// The ports whose queues took datagrams since the last [`wake`](Self::wake), and how
    /// many each took.
    unwoken: Vec<(u16, usize)>,
}

impl<Q> Default for SocketTable<Q> {
    fn default() -> Self {
        Self {
            queues: FxHashMap::default(),
            next_port: *EPHEMERAL_PORTS.start(),
            unwoken: Vec::new(),
        }
    }
}

impl<Q: DatagramQueue> SocketTable<Q> {
    /// No socket bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `port` to a queue made by `queue`; port 0 picks a free one from 49152 up
    /// (round-robin, so that a port just unbound is not reused at once). A bound port is
    /// [`io::ErrorKind::AddrInUse`]. Returns the port and the queue.
    pub fn bind(&mut self, port: u16, queue: impl FnOnce() -> Q) -> io::Result<(u16, Arc<Q>)> {
        let port = if port == 0 {
            self.free_port()?
        } else if self.queues.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("inner port {port} is bound"),
            ));
        } else {
            port
        };
        let queue = Arc::new(queue());
        self.queues.insert(port, queue.clone());
        Ok((port, queue))
    }

    /// Unbinds `port`.
    pub fn remove(&mut self, port: u16) {
        self.queues.remove(&port);
    }

    /// Closes every queue: their readers see the tunnel gone.
    pub fn close_all(&self) {
        for queue in self.queues.values() {
            queue.close();
        }
    }

    /// Hands one inner packet received from the tunnel to the socket bound to its destination
    /// port, and says what became of it. Its reader is woken by the next [`wake`](Self::wake),
    /// which the caller makes once it has delivered what it had.
    pub fn deliver(&mut self, packet: &[u8]) -> Delivery {
        let Some(datagram) = parse_udp(packet) else {
            return Delivery::NotUdp;
        };
        let Some(queue) = self.queues.get(&datagram.port) else {
            return Delivery::Unbound;
        };
        if !queue.push(datagram.payload, datagram.from) {
            return Delivery::QueueFull;
        }
        match self.unwoken.iter_mut().find(|(p, _)| *p == datagram.port) {
            Some((_, pushed)) => *pushed += 1,
            None => self.unwoken.push((datagram.port, 1)),
        }
        Delivery::Queued
    }

    /// Wakes the readers of every socket that [`deliver`](Self::deliver) queued datagrams
    /// for since the last call: once a socket, however many came.
    pub fn wake(&mut self) {
        for (port, pushed) in self.unwoken.drain(..) {
            if let Some(queue) = self.queues.get(&port) {
                queue.wake(pushed);
            }
        }
    }

    fn free_port(&mut self) -> io::Result<u16> {
        let span = EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start();
        for _ in 0..=span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                port + 1
            };
            if !self.queues.contains_key(&port) {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free inner port",
        ))
    }
}

/// The length and sender of one datagram a batch read took ([`Datagrams::pop_many`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvMeta {
    /// Its length in its buffer (shorter than the datagram if the buffer was).
    pub len: usize,
    /// Who sent it: an internal address and port.
    pub from: SocketAddr,
}

impl Default for RecvMeta {
    fn default() -> Self {
        Self {
            len: 0,
            from: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// The datagrams waiting on one inner socket, oldest first, at most `limit`, and the buffers
/// of datagrams already read, so that a steady flow reuses them instead of allocating one per
/// datagram. A runtime keeps it behind its own lock, beside its wake-up.
#[derive(Debug)]
pub struct Datagrams {
    queued: VecDeque<(Vec<u8>, SocketAddr)>,
    spare: Vec<Vec<u8>>,
    limit: usize,
    closed: bool,
}

impl Datagrams {
    /// An empty queue of at most `limit` datagrams (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            queued: VecDeque::new(),
            spare: Vec::new(),
            limit: limit.max(1),
            closed: false,
        }
    }

    /// Queues a copy of `payload` from `from`; false (nothing queued) when `limit` wait.
    pub fn push(&mut self, payload: &[u8], from: SocketAddr) -> bool {
        if self.queued.len() >= self.limit {
            return false;
        }
        let mut data = self.spare.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(payload);
        self.queued.push_back((data, from));
        true
    }

    /// Copies the oldest datagram into `buf` (truncating it, like UDP) and says its length and
    /// sender; `Ok(None)` if none waits, and [`closed`] if none waits and the tunnel is gone.
    pub fn pop(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        let Some((data, from)) = self.queued.pop_front() else {
            return if self.closed { Err(closed()) } else { Ok(None) };
        };
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        if self.spare.len() < SPARE_BUFFERS && data.capacity() <= SPARE_CAPACITY {
            self.spare.push(data);
        }
        Ok(Some((n, from)))
    }

    /// Copies the oldest datagrams into `bufs`, one each (truncating, like UDP), and their
    /// lengths and senders into `meta`, as `recvmmsg` does: as many as wait, up to the
    /// shorter of the two. Says how many; `Ok(0)` if none waits (or there is no room), and
    /// [`closed`] if none waits and the tunnel is gone.
    pub fn pop_many<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta) {
            match self.pop(buf.as_mut()) {
                Ok(Some((len, from))) => *meta = RecvMeta { len, from },
                Ok(None) => break,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
            n += 1;
        }
        Ok(n)
    }

    /// [`pop_many`](Self::pop_many) for a reader that waits: `None` while nothing waits
    /// (and there is room), so that it waits; `Some(0)` at once when there is no room.
    pub fn pop_some<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<Option<usize>> {
        if bufs.is_empty() || meta.is_empty() {
            return Ok(Some(0));
        }
        Ok(Some(self.pop_many(bufs, meta)?).filter(|&n| n > 0))
    }

    /// Marks the tunnel gone: once drained, reads fail with [`closed`].
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Whether the tunnel is gone.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use std::sync::Mutex;

    #[test]
    fn parse_finds_the_datagram_and_refuses_other_packets() {
        let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, 6000);
        let mut packet = Vec::new();
        builder.write(&mut packet, b"rtp").expect("a packet");
        let d = parse_udp(&packet).expect("a UDP packet");
        assert_eq!(d.from, SocketAddr::from(([10, 77, 0, 2], 5004)));
        assert_eq!(d.port, 6000);
        assert_eq!(d.payload, b"rtp");
        let builder = PacketBuilder::ipv6([1; 16], [2; 16], 64).tcp(1, 2, 0, 1024);
        let mut tcp = Vec::new();
        builder.write(&mut tcp, b"x").expect("a packet");
        assert_eq!(parse_udp(&tcp), None);
        assert_eq!(parse_udp(&packet[..10]), None);
        assert!(check_read_timeout(Some(Duration::ZERO)).is_err());
        assert!(check_read_timeout(None).is_ok());
    }

    #[test]
    fn packets_written_are_those_of_the_packet_builder() {
        let cases = [
            (
                SocketAddr::from(([10, 77, 0, 2], 49_152)),
                SocketAddr::from(([10, 77, 0, 3], 9000)),
            ),
            (
                SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 2], 5004)),
                SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 3], 6000)),
            ),
        ];
        let mut packet = b"left over from an earlier packet".to_vec();
        for (from, to) in cases {
            for payload in [&b""[..], b"rtp", &[0xa5; 1372], &[0xff; 1201]] {
                let builder = match (from.ip(), to.ip()) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                        PacketBuilder::ipv4(a.octets(), b.octets(), INNER_TTL)
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) => {
                        PacketBuilder::ipv6(a.octets(), b.octets(), INNER_TTL)
                    }
                    _ => unreachable!("one family per case"),
                }
                .udp(from.port(), to.port());
                let mut expected = Vec::new();
                builder.write(&mut expected, payload).expect("a packet");
                write_udp(&mut packet, from, to, payload).expect("a packet");
                assert_eq!(packet, expected, "{from} to {to}, {} octets", payload.len());
                let d = parse_udp(&packet).expect("a UDP packet");
                assert_eq!((d.from, d.port, d.payload), (from, to.port(), payload));
            }
        }
        let v6 = SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 3], 6000));
        let err = write_udp(&mut packet, cases[0].0, v6, b"x").expect_err("mixed families");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = write_udp(&mut packet, cases[0].0, cases[0].1, &[0; 65_528])
            .expect_err("too long for UDP");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// A queue over [`Datagrams`] behind a plain mutex, as a runtime builds one, that
    /// records its wake-ups.
    #[derive(Debug)]
    struct Queue(Mutex<Datagrams>, Mutex<Vec<usize>>);

    impl Queue {
        fn new(limit: usize) -> Self {
            Self(Mutex::new(Datagrams::new(limit)), Mutex::default())
        }

        fn wakes(&self) -> Vec<usize> {
            self.1.lock().expect("not poisoned").clone()
        }
    }

    impl DatagramQueue for Queue {
        fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
            self.0.lock().expect("not poisoned").push(payload, from)
        }
        fn wake(&self, pushed: usize) {
            self.1.lock().expect("not poisoned").push(pushed);
        }
        fn close(&self) {
            self.0.lock().expect("not poisoned").close();
        }
    }

    fn udp_to(to: u16) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, to);
        let mut packet = Vec::new();
        builder.write(&mut packet, b"rtp").expect("a packet");
        packet
    }

    #[test]
    fn the_socket_table_binds_picks_free_ports_and_says_what_it_cannot_deliver() {
        let mut table = SocketTable::<Queue>::new();
        let one = || Queue::new(1);
        let (port, _) = table.bind(0, one).expect("a free port");
        assert_eq!(port, 49_152);
        let (port, queue) = table.bind(6000, one).expect("port 6000");
        assert_eq!(port, 6000);
        let err = table.bind(6000, one).expect_err("port 6000 is bound");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Port 0 goes on round-robin rather than reusing a port just unbound.
        table.remove(49_152);
        assert_eq!(table.bind(0, one).expect("a free port").0, 49_153);

        assert_eq!(table.deliver(&udp_to(6000)), Delivery::Queued);
        assert_eq!(table.deliver(&udp_to(6000)), Delivery::QueueFull);
        assert_eq!(table.deliver(&udp_to(7000)), Delivery::Unbound);
        assert_eq!(table.deliver(b"not a packet"), Delivery::NotUdp);
        let mut buf = [0u8; 16];
        let got = queue.0.lock().expect("not poisoned").pop(&mut buf);
        assert_eq!(
            got.expect("open"),
            Some((3, SocketAddr::from(([10, 77, 0, 2], 5004))))
        );
        assert_eq!(&buf[..3], b"rtp");
        table.close_all();
        let err = queue.0.lock().expect("not poisoned").pop(&mut buf);
        assert_eq!(err.expect_err("closed").kind(), io::ErrorKind::NotConnected);
    }

    /// What [`parse_udp`] must agree with: the whole packet sliced by etherparse.
    fn parse_udp_by_slicing(packet: &[u8]) -> Option<UdpDatagram<'_>> {
        use etherparse::{NetSlice, SlicedPacket, TransportSlice};
        let sliced = SlicedPacket::from_ip(packet).ok()?;
        let from_ip = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => IpAddr::V4(ip.header().source_addr()),
            Some(NetSlice::Ipv6(ip)) => IpAddr::V6(ip.header().source_addr()),
            _ => return None,
        };
        let Some(TransportSlice::Udp(udp)) = sliced.transport else {
            return None;
        };
        Some(UdpDatagram {
            from: SocketAddr::new(from_ip, udp.source_port()),
            port: udp.destination_port(),
            payload: udp.payload(),
        })
    }

    #[test]
    fn parse_udp_agrees_with_slicing_the_whole_packet_on_mangled_packets() {
        let mut seeds = Vec::new();
        for builder in [
            PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, 6000),
            PacketBuilder::ipv6([1; 16], [2; 16], 64).udp(5004, 6000),
        ] {
            let mut packet = Vec::new();
            builder.write(&mut packet, &[7; 40]).expect("a packet");
            seeds.push(packet);
        }
        let mut tcp = Vec::new();
        let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).tcp(1, 2, 0, 9);
        builder.write(&mut tcp, b"x").expect("a packet");
        seeds.push(tcp);
        // An IPv6 hop-by-hop option before UDP.
        let mut ext = seeds[1].clone();
        ext[6] = 0;
        ext.splice(40..40, [17, 0, 1, 4, 0, 0, 0, 0]);
        let len = u16::from_be_bytes([ext[4], ext[5]]) + 8;
        ext[4..6].copy_from_slice(&len.to_be_bytes());
        seeds.push(ext);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0;
        for round in 0..20_000 {
            let mut packet = seeds[round % seeds.len()].clone();
            for _ in 0..next() % 4 {
                let at = (next() % 56) as usize % packet.len();
                packet[at] = next() as u8;
            }
            if next() % 4 == 0 {
                packet.truncate((next() % 80) as usize);
            }
            let lean = parse_udp(&packet);
            assert_eq!(lean, parse_udp_by_slicing(&packet), "{packet:02x?}");
            parsed += usize::from(lean.is_some());
        }
        assert!(
            parsed > 1_000,
            "only {parsed} mangled packets were still UDP"
        );
    }

    #[test]
    fn a_batch_of_datagrams_wakes_each_socket_once_with_its_count() {
        let mut table = SocketTable::<Queue>::new();
        let (_, busy) = table.bind(6000, || Queue::new(64)).expect("port 6000");
        let (_, quiet) = table.bind(7000, || Queue::new(64)).expect("port 7000");
        let (_, idle) = table.bind(8000, || Queue::new(64)).expect("port 8000");
        for to in [6000, 7000, 6000, 6000] {
            assert_eq!(table.deliver(&udp_to(to)), Delivery::Queued);
        }
        assert!(
            busy.wakes().is_empty(),
            "no reader is woken before the batch ends"
        );
        table.wake();
        assert_eq!(busy.wakes(), [3]);
        assert_eq!(quiet.wakes(), [1]);
        assert!(idle.wakes().is_empty());
        // Each batch wakes anew; one with nothing for a socket wakes it not at all.
        assert_eq!(table.deliver(&udp_to(7000)), Delivery::Queued);
        table.wake();
        table.wake();
        assert_eq!(busy.wakes(), [3]);
        assert_eq!(quiet.wakes(), [1, 1]);
    }

    #[test]
    fn a_batch_read_takes_what_waits_up_to_its_room_and_then_sees_the_close() {
        let mut queue = Datagrams::new(16);
        let from = |port| SocketAddr::from(([10, 77, 0, 2], port));
        let mut bufs = [[0u8; 4]; 3];
        let mut meta = [RecvMeta::default(); 3];
        assert_eq!(queue.pop_many(&mut bufs, &mut meta).expect("open"), 0);
        for (i, payload) in [&b"one"[..], b"two", b"three", b"four"].iter().enumerate() {
            assert!(queue.push(payload, from(5000 + i as u16)));
        }
        assert_eq!(queue.pop_many(&mut bufs, &mut meta).expect("open"), 3);
        assert_eq!(&bufs[0][..meta[0].len], b"one");
        assert_eq!(&bufs[2][..meta[2].len], b"thre", "truncated, like UDP");
        assert_eq!(
            meta[1],
            RecvMeta {
                len: 3,
                from: from(5001)
            }
        );
        // No room reads nothing (and a waiting reader need not wait for it); nothing waiting
        // makes a reader wait; then the rest, then the close once all is read.
        assert_eq!(queue.pop_many(&mut bufs[..0], &mut meta).expect("open"), 0);
        assert_eq!(
            queue.pop_some(&mut bufs[..0], &mut meta).expect("open"),
            Some(0)
        );
        assert_eq!(queue.pop_some(&mut bufs, &mut meta).expect("open"), Some(1));
        assert_eq!(queue.pop_some(&mut bufs, &mut meta).expect("open"), None);
        assert!(queue.push(b"four", from(5003)));
        queue.close();
        assert_eq!(queue.pop_many(&mut bufs, &mut meta).expect("queued"), 1);
        assert_eq!(
            meta[0],
            RecvMeta {
                len: 4,
                from: from(5003)
            }
        );
        let err = queue.pop_many(&mut bufs, &mut meta).expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
        let err = queue.pop_some(&mut bufs, &mut meta).expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);
    }

    #[test]
    fn datagrams_keep_order_stop_at_their_limit_and_keep_few_small_buffers() {
        let limit = SPARE_BUFFERS + 4;
        let mut queue = Datagrams::new(limit);
        let from = SocketAddr::from(([10, 77, 0, 2], 5004));
        let mut buf = [0u8; 4096];
        assert_eq!(queue.pop(&mut buf).expect("open"), None);
        for round in 0..3u8 {
            for i in 0..limit {
                assert!(queue.push(&[round, i as u8, 7], from));
            }
            assert!(!queue.push(b"one too many", from), "the limit holds");
            for i in 0..limit {
                assert_eq!(queue.pop(&mut buf).expect("open"), Some((3, from)));
                assert_eq!(buf[..3], [round, i as u8, 7], "oldest first");
            }
            assert_eq!(queue.pop(&mut buf).expect("open"), None);
            assert_eq!(queue.spare.len(), SPARE_BUFFERS);
        }
        // A reused buffer holds the new datagram only, and a short read truncates.
        assert!(queue.push(b"x", from));
        assert_eq!(queue.pop(&mut buf).expect("open"), Some((1, from)));
        assert_eq!(&buf[..1], b"x");
        assert!(queue.push(b"truncated", from));
        assert_eq!(queue.pop(&mut buf[..5]).expect("open"), Some((5, from)));
        assert_eq!(&buf[..5], b"trunc");
        // A large datagram's buffer is not kept.
        queue.spare.clear();
        assert!(queue.push(&[1; SPARE_CAPACITY + 1], from));
        assert_eq!(
            queue.pop(&mut buf).expect("open"),
            Some((SPARE_CAPACITY + 1, from))
        );
        assert!(queue.spare.is_empty());
        // What is queued is still read after the close.
        assert!(queue.push(b"last", from));
        queue.close();
        assert_eq!(queue.pop(&mut buf).expect("queued"), Some((4, from)));
        assert_eq!(
            queue.pop(&mut buf).expect_err("closed").kind(),
            io::ErrorKind::NotConnected
        );
    }
}
