//! `tscf client --forward` and `--listen`: local ports carried through the tunnel.
//!
//! - `--forward [udp:|tcp:]LOCAL=INTERNAL` listens on LOCAL and carries what arrives to
//!   INTERNAL, another client's internal address and port. UDP: datagrams go from the inner
//!   socket on INTERNAL's port, answers go back to the last local sender. TCP: each local
//!   connection gets an inner connection to INTERNAL.
//! - `--listen [udp:|tcp:]PORT=LOCAL` is the reverse, like `ssh -R`: what reaches inner port
//!   PORT of this tunnel goes to the fixed local address LOCAL, so a local service (or a
//!   receiver that never sends first) is reachable from other clients. UDP: each datagram is
//!   sent to LOCAL from one local socket, and what LOCAL answers goes back to the last inner
//!   sender. TCP: each inner connection gets a local connection to LOCAL.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex, Weak};

use futures_lite::{future, io as aio, AsyncWriteExt};
use smol::{Async, Task};
use tscf_runtime_smol::core::tunnel::unspecified_for;
use tscf_runtime_smol::{InnerTcpStream, InnerUdpSocket, Tunnel};

/// The protocol of a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }

    /// Splits an optional `udp:` or `tcp:` prefix off `text` (UDP without one).
    fn split(text: &str) -> (Self, &str) {
        match text.split_once(':') {
            Some(("tcp", rest)) => (Self::Tcp, rest),
            Some(("udp", rest)) => (Self::Udp, rest),
            _ => (Self::Udp, text),
        }
    }
}

/// `--forward [udp:|tcp:]LOCAL=INTERNAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Forward {
    pub(crate) protocol: Protocol,
    pub(crate) local: SocketAddr,
    pub(crate) internal: SocketAddr,
}

/// `--listen [udp:|tcp:]PORT=LOCAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Listen {
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
    pub(crate) local: SocketAddr,
}

/// Parses `[udp:|tcp:]LOCAL=INTERNAL`.
pub(crate) fn parse_forward(text: &str) -> Result<Forward, String> {
    let (protocol, rest) = Protocol::split(text);
    let (local, internal) = rest
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not [udp:|tcp:]LOCAL=INTERNAL"))?;
    Ok(Forward {
        protocol,
        local: address(local)?,
        internal: address(internal)?,
    })
}

/// Parses `[udp:|tcp:]PORT=LOCAL`.
pub(crate) fn parse_listen(text: &str) -> Result<Listen, String> {
    let (protocol, rest) = Protocol::split(text);
    let (port, local) = rest
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not [udp:|tcp:]PORT=LOCAL"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    Ok(Listen {
        protocol,
        port,
        local: address(local)?,
    })
}

fn address(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address and port"))
}

/// Starts `forward` in `tunnel` (opted in to peer tunneling when `peer`); the local address
/// bound (with the port the system chose for port 0) and the task that runs it.
pub(crate) fn start_forward(
    tunnel: &Arc<Tunnel>,
    forward: Forward,
    peer: bool,
) -> io::Result<(SocketAddr, Task<()>)> {
    match forward.protocol {
        Protocol::Udp => {
            let sock = Async::<UdpSocket>::bind(forward.local)?;
            let local = sock.get_ref().local_addr()?;
            let inner = tunnel.bind(forward.internal.port())?;
            inner.set_peer_tunneling(peer);
            let to = Some(forward.internal);
            Ok((local, smol::spawn(relay_udp(sock, inner, None, to))))
        }
        Protocol::Tcp => {
            let listener = Async::<TcpListener>::bind(forward.local)?;
            let local = listener.get_ref().local_addr()?;
            let tunnel = Arc::downgrade(tunnel);
            let task = smol::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    let tunnel = tunnel.clone();
                    smol::spawn(async move {
                        if let Ok(inner) = connect_inner(&tunnel, forward.internal).await {
                            inner.set_peer_tunneling(peer);
                            splice(conn, inner).await;
                        }
                    })
                    .detach();
                }
            });
            Ok((local, task))
        }
    }
}

/// Starts `listen` in `tunnel` (opted in to peer tunneling when `peer`); the task that runs
/// it.
pub(crate) fn start_listen(tunnel: &Tunnel, listen: Listen, peer: bool) -> io::Result<Task<()>> {
    match listen.protocol {
        Protocol::Udp => {
            let sock = Async::<UdpSocket>::bind(unspecified_for(listen.local))?;
            sock.get_ref().connect(listen.local)?;
            let inner = tunnel.bind(listen.port)?;
            inner.set_peer_tunneling(peer);
            Ok(smol::spawn(relay_udp(
                sock,
                inner,
                Some(listen.local),
                None,
            )))
        }
        Protocol::Tcp => {
            let listener = tunnel.tcp_listen(listen.port)?;
            listener.set_peer_tunneling(peer);
            Ok(smol::spawn(async move {
                while let Ok((inner, _)) = listener.accept().await {
                    smol::spawn(async move {
                        if let Ok(conn) = Async::<TcpStream>::connect(listen.local).await {
                            splice(conn, inner).await;
                        }
                    })
                    .detach();
                }
            }))
        }
    }
}

async fn connect_inner(tunnel: &Weak<Tunnel>, to: SocketAddr) -> io::Result<InnerTcpStream> {
    let tunnel = tunnel.upgrade().ok_or(io::ErrorKind::NotConnected)?;
    tunnel.tcp_connect(to).await
}

/// Copies datagrams between a local socket and an inner one until either fails. A datagram
/// from the local side goes to `inner_to` (else to the last inner sender); one from the
/// tunnel goes to `local_to` (else to the last local sender).
async fn relay_udp(
    sock: Async<UdpSocket>,
    inner: InnerUdpSocket,
    local_to: Option<SocketAddr>,
    inner_to: Option<SocketAddr>,
) {
    let last_local = Mutex::new(local_to);
    let last_inner = Mutex::new(inner_to);
    let remember = |slot: &Mutex<Option<SocketAddr>>, fixed: bool, from: SocketAddr| {
        if !fixed {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
        }
    };
    let get = |slot: &Mutex<Option<SocketAddr>>| *slot.lock().unwrap_or_else(|e| e.into_inner());
    let outbound = async {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            remember(&last_local, local_to.is_some(), from);
            if let Some(to) = get(&last_inner) {
                let _ = inner.send_to(&buf[..n], to).await;
            }
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = inner.recv_from(&mut buf).await {
            remember(&last_inner, inner_to.is_some(), from);
            if let Some(to) = get(&last_local) {
                let _ = sock.send_to(&buf[..n], to).await;
            }
        }
    };
    future::or(outbound, inbound).await;
}

/// Copies both ways between a local TCP connection and an inner one; each side's end of
/// stream is passed on as a shutdown of the other's writing.
async fn splice(local: Async<TcpStream>, inner: InnerTcpStream) {
    let local = Arc::new(local);
    let (inner_read, mut inner_write) = aio::split(inner);
    let up = {
        let local = local.clone();
        async move {
            let _ = aio::copy(&*local, &mut inner_write).await;
            let _ = inner_write.close().await;
        }
    };
    let down = async {
        let _ = aio::copy(inner_read, &*local).await;
        let _ = local.get_ref().shutdown(Shutdown::Write);
    };
    future::zip(up, down).await;
}
