//! UDP sockets with batched I/O: several datagrams per system call each way where the system
//! allows (`recvmmsg`, UDP GSO and GRO, through quinn-udp), one at a time where it does not.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use async_io::Async;
use quinn_udp::{RecvMeta, UdpSocketState};
use tscf_core::io::RecvBuffers;

/// A UDP socket of the host, with what quinn-udp learnt of the system's offloads.
#[derive(Debug)]
pub(crate) struct Udp {
    io: Arc<Async<UdpSocket>>,
    state: UdpSocketState,
}

impl Udp {
    /// `io`, which QUIC peer sessions may share.
    pub(crate) fn new(io: Arc<Async<UdpSocket>>) -> io::Result<Self> {
        keep_gro_on();
        let state = UdpSocketState::new(io.get_ref().into())?;
        Ok(Self { io, state })
    }

    /// Datagrams one send may carry (more than one with UDP GSO).
    pub(crate) fn batch(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents` to `to` without waiting: datagrams of `segment` octets (the last may
    /// be shorter). A full socket buffer is an error, as a loss on the wire would be.
    pub(crate) fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let segment_size = (contents.len() > segment).then_some(segment);
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        self.state.try_send(self.io.get_ref().into(), &transmit)
    }

    /// Waits for datagrams, then reads what one call gives into `bufs`: how many slots it
    /// filled, described in `meta`.
    pub(crate) async fn recv(
        &self,
        bufs: &mut RecvBuffers,
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let slots = bufs.slots().min(meta.len());
        let mut slices = bufs.slices();
        let (slices, meta) = (&mut slices[..slots], &mut meta[..slots]);
        self.io
            .read_with(|io| self.state.recv(io.into(), slices, meta))
            .await
    }
}

/// The kernel turns a switch on (a static key) while any socket of a family has UDP GRO, and
/// turning it on or off is slow: it rewrites kernel code on every CPU. quinn-udp probes GRO on a
/// throw-away IPv6 socket whenever it sets a socket up, so a process that opens and closes
/// tunnels would flip it twice per tunnel (a fifth of the tunnels per second it managed). One
/// socket of each family with GRO, kept for the life of the process, keeps the switch on.
fn keep_gro_on() {
    static KEPT: OnceLock<Vec<(UdpSocket, UdpSocketState)>> = OnceLock::new();
    KEPT.get_or_init(|| {
        ["[::1]:0", "127.0.0.1:0"]
            .into_iter()
            .filter_map(|addr| UdpSocket::bind(addr).ok())
            .filter_map(|sock| Some((UdpSocketState::new((&sock).into()).ok()?, sock)))
            .map(|(state, sock)| (sock, state))
            .collect()
    });
}

impl Deref for Udp {
    type Target = Async<UdpSocket>;

    fn deref(&self) -> &Async<UdpSocket> {
        &self.io
    }
}
