//! The tunnel client: a [`ClientHost`] behind a lock held only for its synchronous calls, its
//! sockets and streams, and its inner sockets.
//!
//! Tasks: a timer task, one per UDP socket (the peer socket, which carries the server tunnel
//! over UDP, and the socket of a DTLS transport), one per stream (the server transport over
//! TCP, TLS or QUIC, and peer streams), an acceptor for the peer stream listener when there is
//! one, and the QUIC peer endpoint's when the peer transport is QUIC.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use async_channel::Receiver;
use async_io::Async;
use smol::Task;
use tscf_core::client::ClientState;
use tscf_core::tls::PeerIdentity;
use tscf_core::tunnel::{
    unspecified_for, ClientHost, ConnectError, Notification, Setup, TunnelConfig, PEER_SOCKET,
};
use tscf_core::wire::Transport;

use crate::client::{self, PeerQuic, TunnelExtra, TunnelShared};
use crate::drive;
use crate::socket::{self, InnerUdpSocket, SocketQueue};
use crate::tcp::{InnerTcpListener, InnerTcpStream};
use crate::{net, OS};

/// A TSC tunnel to a server, run by smol tasks. Dropping it sends the release and stops the
/// tasks; [`close`](Self::close) also waits for the server's answer.
pub struct Tunnel {
    shared: Arc<TunnelShared>,
    notifications: Receiver<Notification>,
    tasks: Vec<Task<()>>,
    release_wait: std::time::Duration,
}

impl Tunnel {
    /// Starts the client and waits until it holds a tunnel, the server refuses it for good,
    /// or `connect_timeout` passes. The client, not this runtime, decides which server and
    /// transport to try next. Takes the same [`TunnelConfig`] as the blocking runtime.
    pub async fn connect(config: TunnelConfig) -> Result<Self, ConnectError> {
        let (config, mut credentials) = config.prepare(OS)?;
        let udp = Arc::new(Async::<UdpSocket>::bind(config.udp_bind_addr())?);
        let local = udp.get_ref().local_addr()?;
        let route_source = match config.route_probe() {
            Some(server) if local.ip().is_unspecified() => Some(route_source(server)?),
            _ => None,
        };
        let listener = match config.peer_streams.listen() {
            Some((addr, _)) => Some(Async::<TcpListener>::bind(addr)?),
            None => None,
        };
        let listener_addr = listener
            .as_ref()
            .map(|l| l.get_ref().local_addr())
            .transpose()?;
        let setup = Setup::new(&mut credentials, local, route_source, listener_addr, true);
        let quic_identity = credentials.peer_identity.clone().filter(|_| {
            config
                .client
                .peer
                .as_ref()
                .is_some_and(|p| p.transport == Transport::QUIC)
        });
        let listener_tls = credentials.listener.take();
        let (connect_timeout, release_wait) = (config.connect_timeout, config.release_wait);
        let (quic_limits, session_queue) = (config.quic_limits, config.session_queue);
        let (tx, notifications) = async_channel::bounded(config.notification_queue.max(1));
        let host = ClientHost::new(config, setup, Instant::now())?;
        let extra = TunnelExtra {
            notifications: tx,
            quic: None,
        };
        let shared = drive::shared(host, extra);
        let mut tasks = Vec::new();
        {
            let mut state = shared.lock();
            state.driver.add_socket(PEER_SOCKET, udp.clone())?;
            if let Some(identity) = quic_identity {
                let quic = PeerQuic::new(
                    udp,
                    Arc::downgrade(&shared),
                    identity,
                    quic_limits,
                    session_queue,
                )?;
                let endpoint = quic.endpoint();
                state.driver.extra.quic = Some(quic);
                tasks.push(smol::spawn(client::accept_sessions(
                    shared.clone(),
                    endpoint,
                )));
            }
        }
        let s = shared.clone();
        tasks.push(smol::spawn(async move { drive::run_timer(&s).await }));
        if let Some(listener) = listener {
            let transport = match listener_tls {
                Some(_) => Transport::TLS,
                None => Transport::TCP,
            };
            let accept = net::accept(shared.clone(), listener, transport, listener_tls);
            tasks.push(smol::spawn(accept));
        }
        let tunnel = Self {
            shared: shared.clone(),
            notifications,
            tasks,
            release_wait,
        };
        let started = Instant::now();
        // What the host asked for at its start (a transport) is acted on here.
        shared.drive(|_, _, _| ());
        drive::wait_until(&shared, started + connect_timeout, |state| {
            state
                .host
                .connect_result(started.elapsed(), false)
                .is_some()
        })
        .await;
        let result = shared.lock().host.connect_result(started.elapsed(), true);
        result.unwrap_or(Ok(())).map(|()| tunnel)
    }

    /// What happened to the tunnel, in order, as an async channel (at most 256 wait; later
    /// ones are dropped and counted in [`TunnelStats::notifications_dropped`][dropped]).
    ///
    /// [dropped]: tscf_core::tunnel::TunnelStats::notifications_dropped
    pub fn notifications(&self) -> &Receiver<Notification> {
        &self.notifications
    }

    /// An inner UDP socket on `port` of the tunnel's internal address; port 0 picks a free
    /// one from 49152 up.
    pub fn bind(&self, port: u16) -> io::Result<InnerUdpSocket> {
        self.shared.bind_socket(port).map(InnerUdpSocket)
    }

    /// An inner TCP connection to `addr`, another tunnel's internal address and port, from a
    /// free port of this tunnel's address of the same family; waits until it is made (or
    /// refused, or the configured `tcp_connect_timeout` passes).
    pub async fn tcp_connect(&self, addr: SocketAddr) -> io::Result<InnerTcpStream> {
        InnerTcpStream::connected(self.shared.tcp_connect(addr)?).await
    }

    /// An inner TCP listener on `port` of the tunnel's internal addresses (IPv4 and IPv6);
    /// port 0 picks a free one from 49152 up.
    pub fn tcp_listen(&self, port: u16) -> io::Result<InnerTcpListener> {
        self.shared.tcp_listen(port).map(InnerTcpListener)
    }

    /// The tunnel's packet tap, for a TUN device: every inner packet that no inner socket,
    /// stream or listener of this tunnel claims is read whole from it, and it sends whole IP
    /// packets from the tunnel's internal address. One tap at a time; dropping it removes it.
    pub fn tap(&self) -> io::Result<PacketTap> {
        let queue = self.shared.lock().host.tap(SocketQueue::new)?;
        Ok(PacketTap {
            queue,
            shared: self.shared.clone(),
        })
    }

    /// Test hook: while `blocked`, every datagram the peer socket would send or receive is
    /// dropped and counted in [`TunnelStats::peer_blocked`](crate::TunnelStats::peer_blocked), as if a firewall cut the direct
    /// path. The server tunnel is not affected.
    #[doc(hidden)]
    pub fn block_peer_traffic(&self, blocked: bool) {
        let mut state = self.shared.lock();
        state.host.set_peer_blocked(blocked);
        if let Some(quic) = &state.driver.extra.quic {
            quic.set_blocked(blocked);
        }
    }

    /// Test hook: present `identity` in the QUIC or DTLS peer sessions opened or accepted from
    /// now on, while the fingerprint announced stays the one of connect, as if the certificate
    /// were swapped by someone on the path. Nothing without a secured peer transport.
    #[doc(hidden)]
    pub fn present_peer_identity(&self, identity: PeerIdentity) {
        let mut state = self.shared.lock();
        if let Some(quic) = &mut state.driver.extra.quic {
            quic.set_identity(identity.clone());
        }
        state.host.present_peer_identity(identity);
    }

    /// Test hook: sends `datagram` to `to` from the peer socket, as someone able to spoof its
    /// address would.
    #[doc(hidden)]
    pub fn send_from_peer_socket(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<usize> {
        let state = self.shared.lock();
        let udp = state
            .driver
            .sockets
            .get(&PEER_SOCKET)
            .ok_or(io::ErrorKind::NotFound)?;
        udp.get_ref().send_to(datagram, to)
    }

    /// Test hook: forgets the transport to the server without telling it, as a client whose
    /// state is lost would, and reports it lost: the client re-attaches. The peer socket is
    /// replaced by a new one (a new source port), so that a UDP tunnel re-attaches from it;
    /// candidates already announced are not updated, and QUIC peer sessions keep the old one.
    #[doc(hidden)]
    pub fn drop_server_transport(&self) -> io::Result<()> {
        let mut state = self.shared.lock();
        let old = state
            .driver
            .sockets
            .get(&PEER_SOCKET)
            .ok_or(io::ErrorKind::NotFound)?;
        let ip = old.get_ref().local_addr()?.ip();
        let udp = Arc::new(Async::<UdpSocket>::bind(SocketAddr::new(ip, 0))?);
        state.driver.add_socket(PEER_SOCKET, udp)?;
        let now = Instant::now();
        state.host.lose_server_transport(now);
        self.shared.drain(&mut state, now);
        Ok(())
    }

    /// Releases the tunnel, waits up to the configured release wait for the server's answer,
    /// and stops the tasks.
    pub async fn close(mut self) {
        let started = Instant::now();
        self.shared.drive(|host, _, now| host.release(now));
        drive::wait_until(&self.shared, started + self.release_wait, |state| {
            state.host.state() == ClientState::Terminated
        })
        .await;
        self.stop();
        for task in self.tasks.drain(..) {
            task.cancel().await;
        }
    }

    fn stop(&mut self) {
        let mut state = self.shared.lock();
        if state.driver.stopped {
            return;
        }
        let now = Instant::now();
        state.host.stop(now);
        if let Some(quic) = &mut state.driver.extra.quic {
            quic.close_all();
        }
        self.shared.drain(&mut state, now);
        drive::stop(&self.shared, &mut state);
    }
}

impl std::ops::Deref for Tunnel {
    type Target = dyn tscf_core::tunnel::TunnelControl;

    fn deref(&self) -> &Self::Target {
        &*self.shared
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("tunnel_id", &self.tunnel_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shared.drive(|host, _, now| host.release(now));
        self.stop();
    }
}

/// The local address the system routes to `server` from (connecting a UDP socket sends
/// nothing; it only picks the route).
fn route_source(server: SocketAddr) -> io::Result<IpAddr> {
    let probe = UdpSocket::bind(unspecified_for(server))?;
    probe.connect(server)?;
    Ok(probe.local_addr()?.ip())
}

/// A tunnel's packet tap ([`Tunnel::tap`]): whole inner IP packets both ways, for a TUN
/// device. Received packets wait in a bounded queue (at least 1,024; beyond, they are dropped
/// and counted in [`TunnelStats::tap_queue_full`](crate::TunnelStats::tap_queue_full)).
pub struct PacketTap {
    queue: Arc<SocketQueue>,
    shared: Arc<TunnelShared>,
}

impl PacketTap {
    /// Waits for the next inner packet and copies it into `buf` (truncated if short); its
    /// length.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(socket::recv(&self.queue, None, |d| d.pop(buf)).await?.0)
    }

    /// Sends one whole IP packet whose source is the tunnel's internal address; an IPv4 one
    /// larger than the tunnel carries goes as fragments. It never waits: a full send queue is
    /// [`io::ErrorKind::WouldBlock`].
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.shared
            .drive(|host, _, now| host.send_packet(now, packet))
    }

    /// Sends each of `packets` as [`send`](Self::send) does, under one lock and with one drain,
    /// so that what they become leaves together (in as few system calls as the system allows);
    /// see [`ClientHost::send_packets`](tscf_core::tunnel::ClientHost::send_packets).
    pub fn send_many<'a>(&self, packets: impl IntoIterator<Item = &'a [u8]>) -> io::Result<usize> {
        self.shared
            .drive(|host, _, now| host.send_packets(now, packets))
    }

    /// The next inner packet if one is queued, without waiting: copied into `buf` (truncated
    /// if short), its length.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.queue.lock().pop(buf)?.map(|(n, _)| n))
    }

    /// Opts inner port `port` in or out of peer tunneling, for packets from it and, when
    /// opted in, to it (see [`TunnelClient::set_peer_tunneling`]).
    ///
    /// [`TunnelClient::set_peer_tunneling`]: tscf_core::client::TunnelClient::set_peer_tunneling
    pub fn set_peer_tunneling(&self, port: u16, enabled: bool) {
        self.shared
            .drive(|host, _, _| host.set_peer_tunneling(port, enabled));
    }
}

impl std::fmt::Debug for PacketTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketTap").finish_non_exhaustive()
    }
}

impl Drop for PacketTap {
    fn drop(&mut self) {
        self.shared.lock().host.untap();
    }
}
