//! Inner UDP sockets: datagrams between internal addresses, carried as IPv4 or IPv6 packets
//! in the tunnel and handed to sockets by destination port.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tscf_core::client::SendError;

use crate::lock;
use crate::timer::Shared;
use crate::tunnel::ClientCore;

/// Hop limit of the inner packets sent.
const INNER_TTL: u8 = 64;

/// A UDP socket on the tunnel's internal address, like [`std::net::UdpSocket`]. Datagrams go
/// to other tunnels' internal addresses through the server; received datagrams wait in a
/// bounded queue. Dropping it unbinds the port.
#[derive(Debug)]
pub struct InnerUdpSocket {
    port: u16,
    queue: Arc<SocketQueue>,
    shared: Arc<Shared<ClientCore>>,
    read_timeout: Mutex<Option<Duration>>,
}

impl InnerUdpSocket {
    pub(crate) fn new(port: u16, queue: Arc<SocketQueue>, shared: Arc<Shared<ClientCore>>) -> Self {
        Self {
            port,
            queue,
            shared,
            read_timeout: Mutex::new(None),
        }
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The tunnel's internal IPv4 address (IPv6 if it has none) and this socket's port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let core = lock(&self.shared.state);
        let ip = core
            .client
            .internal_ipv4()
            .map(IpAddr::V4)
            .or(core.client.internal_ipv6().map(IpAddr::V6))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no tunnel"))?;
        Ok(SocketAddr::new(ip, self.port))
    }

    /// Sends `buf` to `dst`, an internal address and port of another tunnel. While the tunnel
    /// re-attaches the datagram waits in the client's bounded queue; a full queue is
    /// [`io::ErrorKind::WouldBlock`].
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        let mut core = lock(&self.shared.state);
        let builder = match dst.ip() {
            IpAddr::V4(to) => {
                let from = core.client.internal_ipv4().ok_or_else(no_tunnel)?;
                PacketBuilder::ipv4(from.octets(), to.octets(), INNER_TTL)
            }
            IpAddr::V6(to) => {
                let from = core.client.internal_ipv6().ok_or_else(no_tunnel)?;
                PacketBuilder::ipv6(from.octets(), to.octets(), INNER_TTL)
            }
        }
        .udp(self.port, dst.port());
        let mut packet = Vec::with_capacity(builder.size(buf.len()));
        builder
            .write(&mut packet, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        core.client
            .send_ip(Instant::now(), &packet)
            .map_err(send_error)?;
        core.drain();
        self.shared.rearm(&mut core);
        Ok(buf.len())
    }

    /// Opts this socket in or out of peer tunneling (the `tsc_setsockopt` of the TSC API). An
    /// opted-in socket's datagrams to another tunnel take the relay until a peer tunnel with it
    /// is up, then go straight to it, and back to the relay if that tunnel goes down. Without
    /// peer tunneling in the [`TunnelConfig`](crate::TunnelConfig) it does nothing. The
    /// default is the configuration's `default_opt_in` (false unless changed); it comes back
    /// when the socket is dropped.
    pub fn set_peer_tunneling(&self, enabled: bool) {
        let mut core = lock(&self.shared.state);
        core.client.set_peer_tunneling(self.port, enabled);
        core.drain();
        self.shared.rearm(&mut core);
    }

    /// Receives one datagram into `buf` (truncating it if `buf` is short, like UDP) and says
    /// who sent it. Blocks up to the read timeout, then fails with
    /// [`io::ErrorKind::WouldBlock`].
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let timeout = *lock(&self.read_timeout);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut packets = lock(&self.queue.packets);
        loop {
            if let Some((data, from)) = packets.pop_front() {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                return Ok((n, from));
            }
            if self.queue.closed.load(Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the tunnel is closed",
                ));
            }
            packets = match deadline {
                None => self
                    .queue
                    .ready
                    .wait(packets)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let now = Instant::now();
                    if now >= at {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "read timed out"));
                    }
                    self.queue
                        .ready
                        .wait_timeout(packets, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// How long [`recv_from`](Self::recv_from) blocks; `None` blocks until a datagram comes.
    /// A zero duration is an error, as for std sockets.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero read timeout",
            ));
        }
        *lock(&self.read_timeout) = timeout;
        Ok(())
    }
}

impl Drop for InnerUdpSocket {
    fn drop(&mut self) {
        let mut core = lock(&self.shared.state);
        core.sockets.remove(&self.port);
        let default = core.default_opt_in;
        core.client.set_peer_tunneling(self.port, default);
    }
}

/// Datagrams received for one inner socket.
#[derive(Debug)]
pub(crate) struct SocketQueue {
    packets: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    ready: Condvar,
    closed: AtomicBool,
    limit: usize,
}

impl SocketQueue {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            packets: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            limit,
        }
    }

    /// The tunnel is gone: wake the readers for good.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = lock(&self.packets);
        self.ready.notify_all();
    }
}

/// Hands one inner packet received from the tunnel to the socket bound to its destination
/// port, or counts why not.
pub(crate) fn deliver(core: &mut ClientCore, packet: Vec<u8>) {
    let Ok(sliced) = SlicedPacket::from_ip(&packet) else {
        core.stats.not_udp += 1;
        return;
    };
    let from_ip = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => IpAddr::V4(ip.header().source_addr()),
        Some(NetSlice::Ipv6(ip)) => IpAddr::V6(ip.header().source_addr()),
        _ => {
            core.stats.not_udp += 1;
            return;
        }
    };
    let Some(TransportSlice::Udp(udp)) = &sliced.transport else {
        core.stats.not_udp += 1;
        return;
    };
    let Some(queue) = core.sockets.get(&udp.destination_port()) else {
        core.stats.unbound_port += 1;
        return;
    };
    let from = SocketAddr::new(from_ip, udp.source_port());
    let mut packets = lock(&queue.packets);
    if packets.len() >= queue.limit {
        core.stats.socket_queue_full += 1;
        return;
    }
    packets.push_back((udp.payload().to_vec(), from));
    queue.ready.notify_one();
}

fn no_tunnel() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no tunnel yet")
}

fn send_error(e: SendError) -> io::Error {
    let kind = match e {
        SendError::NotConnected => io::ErrorKind::NotConnected,
        SendError::Closed => io::ErrorKind::BrokenPipe,
        SendError::QueueFull => io::ErrorKind::WouldBlock,
        _ => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, e)
}
