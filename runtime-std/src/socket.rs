//! Inner UDP sockets: datagrams between internal addresses, carried as IPv4 or IPv6 packets
//! in the tunnel and handed to sockets by destination port.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::inner::{self, DatagramQueue};
use crate::lock;
use crate::timer::Shared;
use crate::tunnel::ClientCore;

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
        inner::local_addr(&lock(&self.shared.state).client, self.port)
    }

    /// Sends `buf` to `dst`, an internal address and port of another tunnel. While the tunnel
    /// re-attaches the datagram waits in the client's bounded queue; a full queue is
    /// [`io::ErrorKind::WouldBlock`].
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        let mut guard = lock(&self.shared.state);
        let core = &mut *guard;
        let now = Instant::now();
        inner::send_udp(&mut core.client, now, self.port, dst, buf, &mut core.packet)?;
        core.drain();
        self.shared.rearm(core);
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
        inner::check_read_timeout(timeout)?;
        *lock(&self.read_timeout) = timeout;
        Ok(())
    }
}

impl Drop for InnerUdpSocket {
    fn drop(&mut self) {
        let mut core = lock(&self.shared.state);
        core.sockets.remove(self.port);
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

impl DatagramQueue for SocketQueue {
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
        let mut packets = lock(&self.packets);
        if packets.len() >= self.limit {
            return false;
        }
        packets.push_back((payload.to_vec(), from));
        self.ready.notify_one();
        true
    }
}
