//! Inner UDP sockets: datagrams between internal addresses, carried as IPv4 or IPv6 packets
//! in the tunnel and handed to sockets by destination port ([`tscf_core::inner`]).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tscf_core::inner::{self, DatagramQueue, Datagrams, SocketHost};

use crate::lock;

/// A UDP socket on the tunnel's internal address, like [`std::net::UdpSocket`]. Datagrams go
/// to other tunnels' internal addresses through the server (or a peer tunnel); received
/// datagrams wait in a bounded queue. Dropping it unbinds the port.
pub struct InnerUdpSocket {
    port: u16,
    queue: Arc<SocketQueue>,
    tunnel: Arc<dyn SocketHost>,
    read_timeout: Mutex<Option<Duration>>,
}

impl InnerUdpSocket {
    pub(crate) fn new(port: u16, queue: Arc<SocketQueue>, tunnel: Arc<dyn SocketHost>) -> Self {
        Self {
            port,
            queue,
            tunnel,
            read_timeout: Mutex::new(None),
        }
    }

    /// The local port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The tunnel's internal IPv4 address (IPv6 if it has none) and this socket's port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tunnel.local_addr(self.port)
    }

    /// Sends `buf` to `dst`, an internal address and port of another tunnel. While the tunnel
    /// re-attaches the datagram waits in the client's bounded queue; a full queue is
    /// [`io::ErrorKind::WouldBlock`].
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.tunnel.send_to(self.port, dst, buf)?;
        Ok(buf.len())
    }

    /// Opts this socket in or out of peer tunneling (the `tsc_setsockopt` of the TSC API). An
    /// opted-in socket's datagrams to another tunnel take the relay until a peer tunnel with it
    /// is up, then go straight to it, and back to the relay if that tunnel goes down. Without
    /// peer tunneling in the [`TunnelConfig`](crate::TunnelConfig) it does nothing. The
    /// default is the configuration's `default_opt_in` (false unless changed); it comes back
    /// when the socket is dropped.
    pub fn set_peer_tunneling(&self, enabled: bool) {
        self.tunnel.set_peer_tunneling(self.port, enabled);
    }

    /// Receives one datagram into `buf` (truncating it if `buf` is short, like UDP) and says
    /// who sent it. Blocks up to the read timeout, then fails with
    /// [`io::ErrorKind::WouldBlock`].
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let deadline = lock(&self.read_timeout).map(|t| Instant::now() + t);
        let mut datagrams = lock(&self.queue.datagrams);
        loop {
            if let Some(got) = datagrams.pop(buf)? {
                return Ok(got);
            }
            datagrams = match deadline {
                None => self
                    .queue
                    .ready
                    .wait(datagrams)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let now = Instant::now();
                    if now >= at {
                        return Err(inner::timed_out());
                    }
                    self.queue
                        .ready
                        .wait_timeout(datagrams, at - now)
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

impl std::fmt::Debug for InnerUdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerUdpSocket")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for InnerUdpSocket {
    fn drop(&mut self) {
        self.tunnel.unbind(self.port);
    }
}

/// The datagrams waiting on one inner socket, and its readers' wake-up.
#[derive(Debug)]
pub(crate) struct SocketQueue {
    datagrams: Mutex<Datagrams>,
    ready: Condvar,
}

impl SocketQueue {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            datagrams: Mutex::new(Datagrams::new(limit)),
            ready: Condvar::new(),
        }
    }
}

impl DatagramQueue for SocketQueue {
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
        let pushed = lock(&self.datagrams).push(payload, from);
        if pushed {
            self.ready.notify_one();
        }
        pushed
    }

    fn close(&self) {
        lock(&self.datagrams).close();
        self.ready.notify_all();
    }
}
