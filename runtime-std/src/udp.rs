//! UDP sockets with batched I/O through quinn-udp: `recvmmsg` and UDP GRO on the way in, UDP
//! GSO on the way out, each falling back to one datagram per system call where the system
//! lacks it. The socket is non-blocking; its thread waits for it with `poll`.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Deref;
use std::sync::OnceLock;
use std::time::Duration;

use quinn_udp::{RecvMeta, UdpSocketState};
use rustix::event::{PollFd, PollFlags, Timespec};
use tscf_core::io::RecvBuffers;

/// A non-blocking UDP socket and quinn-udp's state of it.
#[derive(Debug)]
pub(crate) struct Udp {
    io: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// `io`, made non-blocking.
    pub(crate) fn new(io: UdpSocket) -> io::Result<Self> {
        GRO_HELD.get_or_init(hold_gro);
        let state = UdpSocketState::new((&io).into())?;
        Ok(Self { io, state })
    }

    /// How many datagrams of one size go out in one `sendmsg` (1 without GSO).
    pub(crate) fn batch(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends the datagrams in `contents`, `segment` octets each but the last, to `to`. It
    /// never blocks: a full send buffer fails the send (a loss).
    pub(crate) fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            segment_size: (contents.len() > segment).then_some(segment),
            contents,
            destination: to,
            src_ip: None,
            ecn: None,
        };
        self.state.try_send((&self.io).into(), &transmit)
    }

    /// Waits up to `wait` for datagrams and reads what one call gives into `bufs`: the slots
    /// filled (none when nothing came), described in `meta`.
    pub(crate) fn recv(
        &self,
        bufs: &mut RecvBuffers,
        meta: &mut [RecvMeta],
        wait: Duration,
    ) -> io::Result<usize> {
        let timeout = Timespec::try_from(wait).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut fds = [PollFd::new(&self.io, PollFlags::IN)];
        if rustix::event::poll(&mut fds, Some(&timeout))? == 0 {
            return Ok(0);
        }
        let slots = bufs.slots().min(meta.len());
        let mut slices = bufs.slices();
        match self
            .state
            .recv((&self.io).into(), &mut slices[..slots], &mut meta[..slots])
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            got => got,
        }
    }
}

/// Sockets with UDP GRO held while the process lives: while one of a family has GRO, the
/// kernel's switch for it (a static key) stays on. Turning it on or off rewrites kernel code on
/// every CPU, and quinn-udp would do both on a probe socket for every socket it sets up.
static GRO_HELD: OnceLock<Vec<Udp>> = OnceLock::new();

fn hold_gro() -> Vec<Udp> {
    let mut held = Vec::new();
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        if let Ok(io) = UdpSocket::bind(addr) {
            if let Ok(state) = UdpSocketState::new((&io).into()) {
                held.push(Udp { io, state });
            }
        }
    }
    held
}

impl Deref for Udp {
    type Target = UdpSocket;

    fn deref(&self) -> &UdpSocket {
        &self.io
    }
}
