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
//!
//! Nothing is dropped silently: each datagram or connection a forward or listen drops is
//! counted by reason ([`Drops`]), and `tscf client` reports the first of each reason at once
//! and the counts when it stops.

use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
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

/// Where a forward's or a listen's drops go: counted by reason, with the local address and the
/// internal one it carries (`None` before the tunnel has an address of that family).
pub(crate) trait Drops: Send + Sync {
    /// Counts one drop for `reason`; `detail` says what was dropped or why.
    fn dropped(
        &self,
        local: SocketAddr,
        internal: Option<SocketAddr>,
        reason: &'static str,
        detail: Option<String>,
    );
}

/// The internal address of inner port `port` of `tunnel` (IPv4 first).
pub(crate) fn inner_addr(tunnel: &Tunnel, port: u16) -> Option<SocketAddr> {
    let ip = tunnel.internal_ipv4().map(IpAddr::V4);
    let ip = ip.or(tunnel.internal_ipv6().map(IpAddr::V6));
    ip.map(|ip| SocketAddr::new(ip, port))
}

/// Starts `forward` in `tunnel` (opted in to peer tunneling when `peer`); the local address
/// bound (with the port the system chose for port 0) and the task that runs it.
pub(crate) fn start_forward(
    tunnel: &Arc<Tunnel>,
    forward: Forward,
    peer: bool,
    drops: Arc<dyn Drops>,
) -> io::Result<(SocketAddr, Task<()>)> {
    let internal = forward.internal;
    match forward.protocol {
        Protocol::Udp => {
            let sock = Async::<UdpSocket>::bind(forward.local)?;
            let local = sock.get_ref().local_addr()?;
            let inner = tunnel.bind(internal.port())?;
            inner.set_peer_tunneling(peer);
            let relay = UdpRelay {
                sock,
                inner,
                local_to: None,
                inner_to: Some(internal),
                ends: (local, Some(internal)),
                drops,
            };
            Ok((local, smol::spawn(relay.run())))
        }
        Protocol::Tcp => {
            let listener = Async::<TcpListener>::bind(forward.local)?;
            let local = listener.get_ref().local_addr()?;
            let tunnel = Arc::downgrade(tunnel);
            let task = smol::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    let (tunnel, drops) = (tunnel.clone(), drops.clone());
                    smol::spawn(async move {
                        match connect_inner(&tunnel, internal).await {
                            Ok(inner) => {
                                inner.set_peer_tunneling(peer);
                                splice(conn, inner).await;
                            }
                            Err(e) => {
                                let why = Some(e.to_string());
                                drops.dropped(local, Some(internal), "inner_connect_failed", why);
                            }
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
pub(crate) fn start_listen(
    tunnel: &Tunnel,
    listen: Listen,
    peer: bool,
    drops: Arc<dyn Drops>,
) -> io::Result<Task<()>> {
    let (local, internal) = (listen.local, inner_addr(tunnel, listen.port));
    match listen.protocol {
        Protocol::Udp => {
            let sock = Async::<UdpSocket>::bind(unspecified_for(local))?;
            sock.get_ref().connect(local)?;
            let inner = tunnel.bind(listen.port)?;
            inner.set_peer_tunneling(peer);
            let relay = UdpRelay {
                sock,
                inner,
                local_to: Some(local),
                inner_to: None,
                ends: (local, internal),
                drops,
            };
            Ok(smol::spawn(relay.run()))
        }
        Protocol::Tcp => {
            let listener = tunnel.tcp_listen(listen.port)?;
            listener.set_peer_tunneling(peer);
            Ok(smol::spawn(async move {
                while let Ok((inner, _)) = listener.accept().await {
                    let drops = drops.clone();
                    smol::spawn(async move {
                        match Async::<TcpStream>::connect(local).await {
                            Ok(conn) => splice(conn, inner).await,
                            Err(e) => {
                                let why = Some(e.to_string());
                                drops.dropped(local, internal, "local_connect_failed", why);
                            }
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

/// Carries datagrams between a local socket and an inner one until either fails.
///
/// A datagram from the local side goes to `inner_to` (else to the last inner sender); one from
/// the tunnel goes to `local_to` (else to the last local sender). With a fixed `inner_to`, only
/// datagrams from it come back out, and local senders must share the address of the first one
/// (an application may restart on another port, another host may not take over the replies).
/// Every datagram dropped is counted by reason in `drops`.
struct UdpRelay {
    sock: Async<UdpSocket>,
    inner: InnerUdpSocket,
    local_to: Option<SocketAddr>,
    inner_to: Option<SocketAddr>,
    /// The local address and the internal one, to name the relay in its drops.
    ends: (SocketAddr, Option<SocketAddr>),
    drops: Arc<dyn Drops>,
}

impl UdpRelay {
    async fn run(self) {
        let last_local = Mutex::new(self.local_to);
        let last_inner = Mutex::new(self.inner_to);
        let get =
            |slot: &Mutex<Option<SocketAddr>>| *slot.lock().unwrap_or_else(|e| e.into_inner());
        let drop = |reason, detail| self.drops.dropped(self.ends.0, self.ends.1, reason, detail);
        let outbound = async {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = self.sock.recv_from(&mut buf).await {
                if self.local_to.is_none() {
                    let mut last = last_local.lock().unwrap_or_else(|e| e.into_inner());
                    if last.is_some_and(|l| l.ip() != from.ip()) {
                        drop("foreign_local_sender", Some(from.to_string()));
                        continue;
                    }
                    *last = Some(from);
                }
                let Some(to) = get(&last_inner) else {
                    drop("no_inner_sender_yet", None);
                    continue;
                };
                if let Err(e) = self.inner.send_to(&buf[..n], to).await {
                    drop("send_failed", Some(format!("{n} octets: {e}")));
                }
            }
        };
        let inbound = async {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = self.inner.recv_from(&mut buf).await {
                match self.inner_to {
                    Some(to) if from != to => {
                        drop("foreign_inner_source", Some(from.to_string()));
                        continue;
                    }
                    Some(_) => {}
                    None => *last_inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(from),
                }
                let Some(to) = get(&last_local) else {
                    drop("no_local_sender_yet", None);
                    continue;
                };
                if let Err(e) = self.sock.send_to(&buf[..n], to).await {
                    drop("local_send_failed", Some(e.to_string()));
                }
            }
        };
        future::or(outbound, inbound).await;
    }
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
