//! Inner UDP sockets: datagrams between internal addresses, carried as IPv4 or IPv6 packets
//! in the tunnel and handed to sockets by destination port ([`tscf_core::inner`]).

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;
use tscf_core::inner::{self, RecvMeta, SocketControl};

/// A UDP socket on the tunnel's internal address, like `async_net::UdpSocket`. Datagrams go
/// to other tunnels' internal addresses through the server (or a peer tunnel); received
/// datagrams wait in a bounded queue. Dropping it unbinds the port. Its port, address, peer
/// tunneling and read timeout are [`SocketControl`]'s.
#[derive(Debug)]
pub struct InnerUdpSocket(pub(crate) inner::Socket<Ready>);

/// The receive queue of an inner socket: its readers wait on an event.
pub(crate) type SocketQueue = inner::SocketQueue<Ready>;

/// The wake-up of an inner socket's readers.
#[derive(Debug, Default)]
pub(crate) struct Ready(pub(crate) Event);

impl inner::Ready for Ready {
    fn one(&self) {
        self.0.notify(1);
    }

    fn all(&self) {
        self.0.notify(usize::MAX);
    }
}

impl InnerUdpSocket {
    /// Sends `buf` to `dst`, an internal address and port of another tunnel. It never waits:
    /// while the tunnel re-attaches the datagram waits in the client's bounded queue, and a
    /// full queue is [`io::ErrorKind::WouldBlock`].
    pub async fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.0.send(buf, dst)
    }

    /// Like `sendmmsg`: every buffer of `bufs` becomes a datagram to `dst`, all handed to the
    /// tunnel at once, which sends them in as few system calls as it can (UDP GSO). It never
    /// waits. Returns how many were sent, and fails only when none was.
    pub async fn send_many<B: AsRef<[u8]>>(
        &self,
        bufs: &[B],
        dst: SocketAddr,
    ) -> io::Result<usize> {
        self.0.send_many(bufs, dst)
    }

    /// Receives one datagram into `buf` (truncating it if `buf` is short, like UDP) and says
    /// who sent it. Waits up to the read timeout, then fails with
    /// [`io::ErrorKind::WouldBlock`].
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        recv(self.0.queue(), self.0.read_timeout(), |d| d.pop(buf)).await
    }

    /// Like `recvmmsg`: waits as [`recv_from`](Self::recv_from) does for a datagram, then
    /// takes as many as wait, up to the room in `bufs` and `meta`, one datagram a buffer
    /// (truncated like UDP), each one's length and sender in `meta`. Returns how many; 0 only
    /// when `bufs` or `meta` is empty.
    pub async fn recv_many<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let timeout = self.0.read_timeout();
        recv(self.0.queue(), timeout, |d| d.pop_some(bufs, meta)).await
    }
}

/// What `take` takes from `queue` (`None`: nothing waits), waiting for it up to `timeout`
/// (the clock is read only if there is one).
pub(crate) async fn recv<T>(
    queue: &SocketQueue,
    timeout: Option<Duration>,
    mut take: impl FnMut(&mut inner::Datagrams) -> io::Result<Option<T>>,
) -> io::Result<T> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        // A queued datagram needs no listener; without one, listen, then look again so
        // that a datagram pushed in between is not waited for.
        if let Some(got) = take(&mut queue.lock())? {
            return Ok(got);
        }
        let ready = queue.ready.0.listen();
        if let Some(got) = take(&mut queue.lock())? {
            return Ok(got);
        }
        match deadline {
            None => ready.await,
            Some(at) if Instant::now() >= at => return Err(inner::timed_out()),
            Some(at) => {
                future::or(ready, async {
                    Timer::at(at).await;
                })
                .await;
            }
        }
    }
}

impl Deref for InnerUdpSocket {
    type Target = dyn SocketControl;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
