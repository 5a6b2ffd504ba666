//! Inner UDP sockets: datagrams between internal addresses, carried as IPv4 or IPv6 packets
//! in the tunnel and handed to sockets by destination port ([`tscf_core::inner`]).

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Condvar;
use std::time::Instant;

use tscf_core::inner::{self, RecvMeta, SocketControl};

/// A UDP socket on the tunnel's internal address, like [`std::net::UdpSocket`]. Datagrams go
/// to other tunnels' internal addresses through the server (or a peer tunnel); received
/// datagrams wait in a bounded queue. Dropping it unbinds the port. Its port, address, peer
/// tunneling and read timeout are [`SocketControl`]'s.
#[derive(Debug)]
pub struct InnerUdpSocket(pub(crate) inner::Socket<Condvar>);

/// The receive queue of an inner socket: its readers wait on a condition variable.
pub(crate) type SocketQueue = inner::SocketQueue<Condvar>;

impl InnerUdpSocket {
    /// Sends `buf` to `dst`, an internal address and port of another tunnel. While the tunnel
    /// re-attaches the datagram waits in the client's bounded queue; a full queue is
    /// [`io::ErrorKind::WouldBlock`].
    pub fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.0.send(buf, dst)
    }

    /// Sends each of `bufs` to `dst` as its own datagram, together, as `sendmmsg` does: the
    /// tunnel takes them under one lock and sends them in as few system calls as the system
    /// allows (UDP GSO). How many were sent; it fails only if none was.
    pub fn send_many<B: AsRef<[u8]>>(&self, bufs: &[B], dst: SocketAddr) -> io::Result<usize> {
        self.0.send_many(bufs, dst)
    }

    /// Receives one datagram into `buf` (truncating it if `buf` is short, like UDP) and says
    /// who sent it. Blocks up to the read timeout, then fails with
    /// [`io::ErrorKind::WouldBlock`].
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.recv(|d| d.pop(buf))
    }

    /// Like `recvmmsg`: blocks as [`recv_from`](Self::recv_from) does for a datagram, then
    /// takes as many as wait, up to the room in `bufs` and `meta`, one datagram a buffer
    /// (truncated like UDP), each one's length and sender in `meta`. Returns how many; 0 only
    /// when `bufs` or `meta` is empty.
    pub fn recv_many<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.recv(|d| d.pop_some(bufs, meta))
    }

    /// What `take` takes from the queue (`None`: nothing waits), blocking for it up to the
    /// read timeout.
    fn recv<T>(
        &self,
        mut take: impl FnMut(&mut inner::Datagrams) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let deadline = self.0.read_timeout().map(|t| Instant::now() + t);
        let queue = self.0.queue();
        let mut datagrams = queue.lock();
        loop {
            if let Some(got) = take(&mut datagrams)? {
                return Ok(got);
            }
            datagrams = match deadline {
                None => queue
                    .ready
                    .wait(datagrams)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(inner::timed_out());
                    }
                    let waited = queue.ready.wait_timeout(datagrams, left);
                    waited.unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }
}

impl Deref for InnerUdpSocket {
    type Target = dyn SocketControl;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
