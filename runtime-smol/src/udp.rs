//! UDP sockets with batched I/O: several datagrams per system call each way where the system
//! allows (`recvmmsg`, UDP GSO and GRO, through quinn-udp), one at a time where it does not.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Deref;
use std::sync::Arc;

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

impl Deref for Udp {
    type Target = Async<UdpSocket>;

    fn deref(&self) -> &Async<UdpSocket> {
        &self.io
    }
}
