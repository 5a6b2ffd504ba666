//! Inner UDP sockets: datagrams between internal addresses, carried as IPv4 or IPv6 packets
//! in the tunnel and handed to sockets by destination port.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future;

use crate::lock;
use crate::timer::Shared;
use crate::tunnel::ClientCore;
use tscf_runtime_std::inner::{self, DatagramQueue};

/// A UDP socket on the tunnel's internal address, like `async_net::UdpSocket`. Datagrams go
/// to other tunnels' internal addresses through the server (or a peer tunnel); received
/// datagrams wait in a bounded queue. Dropping it unbinds the port.
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

    /// Sends `buf` to `dst`, an internal address and port of another tunnel. It never waits:
    /// while the tunnel re-attaches the datagram waits in the client's bounded queue, and a
    /// full queue is [`io::ErrorKind::WouldBlock`].
    pub async fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        let mut guard = lock(&self.shared.state);
        let core = &mut *guard;
        let now = Instant::now();
        inner::send_udp(&mut core.client, now, self.port, dst, buf, &mut core.packet)?;
        core.drain_at(now);
        self.shared.rearm(core);
        Ok(buf.len())
    }

    /// Opts this socket in or out of peer tunneling (the `tsc_setsockopt` of the TSC API), as
    /// in the blocking runtime: an opted-in socket's datagrams take a peer tunnel once one is
    /// up and the relay otherwise. Its default, restored on drop, is the configuration's
    /// `default_opt_in`.
    pub fn set_peer_tunneling(&self, enabled: bool) {
        let mut core = lock(&self.shared.state);
        core.client.set_peer_tunneling(self.port, enabled);
        core.drain();
        self.shared.rearm(&mut core);
    }

    /// Receives one datagram into `buf` (truncating it if `buf` is short, like UDP) and says
    /// who sent it. Waits up to the read timeout, then fails with
    /// [`io::ErrorKind::WouldBlock`].
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let timeout = *lock(&self.read_timeout);
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            // A queued datagram needs no listener; without one, listen, then look again so
            // that a datagram pushed in between is not waited for.
            if let Some(got) = self.queue.pop(buf)? {
                return Ok(got);
            }
            let ready = self.queue.ready.listen();
            if let Some(got) = self.queue.pop(buf)? {
                return Ok(got);
            }
            match deadline {
                None => ready.await,
                Some(at) => {
                    if Instant::now() >= at {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "read timed out"));
                    }
                    future::or(ready, async {
                        Timer::at(at).await;
                    })
                    .await;
                }
            }
        }
    }

    /// How long [`recv_from`](Self::recv_from) waits; `None` waits until a datagram comes.
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
    packets: Mutex<Datagrams>,
    ready: Event,
    closed: AtomicBool,
    limit: usize,
}

/// Buffers kept for reuse once their datagram is read, at most.
const SPARE_BUFFERS: usize = 64;
/// The largest buffer kept for reuse: a full-sized inner packet's payload fits, while a rare
/// large datagram's buffer is freed rather than kept.
const SPARE_CAPACITY: usize = 2048;

/// The datagrams waiting, oldest first, and buffers of datagrams already read, so that a
/// steady flow reuses them instead of allocating one per datagram.
#[derive(Debug, Default)]
struct Datagrams {
    queued: VecDeque<(Vec<u8>, SocketAddr)>,
    spare: Vec<Vec<u8>>,
}

impl SocketQueue {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            packets: Mutex::new(Datagrams::default()),
            ready: Event::new(),
            closed: AtomicBool::new(false),
            limit,
        }
    }

    /// Copies the oldest datagram into `buf` (truncating it) and says its length and sender;
    /// `None` if none waits, and [`io::ErrorKind::NotConnected`] if none waits and the tunnel
    /// is closed.
    fn pop(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        let mut packets = lock(&self.packets);
        if let Some((data, from)) = packets.queued.pop_front() {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            if packets.spare.len() < SPARE_BUFFERS && data.capacity() <= SPARE_CAPACITY {
                packets.spare.push(data);
            }
            return Ok(Some((n, from)));
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the tunnel is closed",
            ));
        }
        Ok(None)
    }

    /// The tunnel is gone: wake the readers for good.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.ready.notify(usize::MAX);
    }
}

impl DatagramQueue for SocketQueue {
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
        let mut packets = lock(&self.packets);
        if packets.queued.len() >= self.limit {
            return false;
        }
        let mut data = packets.spare.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(payload);
        packets.queued.push_back((data, from));
        self.ready.notify(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_order_stops_at_its_limit_and_keeps_few_small_buffers() {
        let limit = SPARE_BUFFERS + 4;
        let queue = SocketQueue::new(limit);
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
            assert_eq!(lock(&queue.packets).spare.len(), SPARE_BUFFERS);
        }
        // A reused buffer holds the new datagram only, and a short read truncates.
        assert!(queue.push(b"x", from));
        assert_eq!(queue.pop(&mut buf).expect("open"), Some((1, from)));
        assert_eq!(&buf[..1], b"x");
        assert!(queue.push(b"truncated", from));
        assert_eq!(queue.pop(&mut buf[..5]).expect("open"), Some((5, from)));
        assert_eq!(&buf[..5], b"trunc");
        // A large datagram's buffer is not kept.
        lock(&queue.packets).spare.clear();
        assert!(queue.push(&[1; SPARE_CAPACITY + 1], from));
        assert_eq!(
            queue.pop(&mut buf).expect("open"),
            Some((SPARE_CAPACITY + 1, from))
        );
        assert!(lock(&queue.packets).spare.is_empty());
        queue.close();
        assert_eq!(
            queue.pop(&mut buf).expect_err("closed").kind(),
            io::ErrorKind::NotConnected
        );
    }
}
