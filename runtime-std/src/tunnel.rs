//! The tunnel client: a [`ClientHost`] behind a mutex, its sockets and streams, and its inner
//! sockets.
//!
//! Threads: a timer thread, one per UDP socket (the peer socket, which carries the server
//! tunnel over UDP, and the socket of a DTLS transport), two per stream (the server transport
//! over TCP or TLS, and peer streams), and an acceptor for the peer stream listener when there
//! is one.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use tscf_core::client::ClientState;
use tscf_core::tunnel::{
    unspecified_for, ClientHost, ConnectError, Notification, Setup, TunnelConfig, TunnelEvent,
    PEER_SOCKET,
};
use tscf_core::wire::Transport;

use crate::drive::{self, Extra, Shared};
use crate::socket::{InnerUdpSocket, SocketQueue};
use crate::tcp::{InnerTcpListener, InnerTcpStream};
use crate::udp::Udp;
use crate::{net, OS};

pub(crate) type TunnelShared = Shared<TunnelExtra>;

/// What this runtime adds to a client host: the channel of notifications.
pub(crate) struct TunnelExtra {
    notifications: SyncSender<Notification>,
}

impl Extra for TunnelExtra {
    type Host = ClientHost<SocketQueue>;

    fn on_event(&mut self, host: &mut ClientHost<SocketQueue>, event: TunnelEvent) {
        match event {
            TunnelEvent::Notification(note) => {
                tracing::debug!(?note, "tunnel");
                if self.notifications.try_send(note).is_err() {
                    host.notification_dropped();
                }
            }
            // No QUIC here: a host told so never asks for it.
            TunnelEvent::Io(_)
            | TunnelEvent::QuicReadable
            | TunnelEvent::OpenQuicSession { .. }
            | TunnelEvent::CloseQuicSession { .. } => {}
        }
    }
}

/// A TSC tunnel to a server, run by background threads. Dropping it releases the tunnel.
pub struct Tunnel {
    shared: Arc<TunnelShared>,
    notifications: Receiver<Notification>,
    threads: Vec<JoinHandle<()>>,
    release_wait: std::time::Duration,
    /// The peer stream listener, whose thread waits in `accept`.
    listener: Option<SocketAddr>,
}

impl Tunnel {
    /// Starts the client and blocks until it holds a tunnel, the server refuses it for good,
    /// or `connect_timeout` passes. The client, not this runtime, decides which server and
    /// transport to try next.
    pub fn connect(config: TunnelConfig) -> Result<Self, ConnectError> {
        let (config, mut credentials) = config.prepare(OS)?;
        let udp = Arc::new(Udp::new(UdpSocket::bind(config.udp_bind_addr())?)?);
        let local = udp.local_addr()?;
        let route_source = match config.route_probe() {
            Some(server) if local.ip().is_unspecified() => Some(route_source(server)?),
            _ => None,
        };
        let listener = match config.peer_streams.listen() {
            Some((addr, _)) => Some(TcpListener::bind(addr)?),
            None => None,
        };
        let listener_addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let setup = Setup::new(&mut credentials, local, route_source, listener_addr, false);
        let listener_tls = credentials.listener.take();
        let (connect_timeout, release_wait) = (config.connect_timeout, config.release_wait);
        let (tx, notifications) = mpsc::sync_channel(config.notification_queue.max(1));
        let host = ClientHost::new(config, setup, Instant::now())?;
        let extra = TunnelExtra { notifications: tx };
        let shared = drive::shared(host, extra);
        shared
            .lock()
            .driver
            .sockets
            .insert(PEER_SOCKET, udp.clone());
        let mut tunnel = Self {
            shared: shared.clone(),
            notifications,
            threads: Vec::new(),
            release_wait,
            listener: listener_addr,
        };
        let s = shared.clone();
        tunnel.spawn("tscf-tunnel-timer", move || drive::run_timer(&s))?;
        let s = shared.clone();
        tunnel.spawn("tscf-tunnel-udp", move || {
            net::run_udp(&s, PEER_SOCKET, &udp)
        })?;
        if let Some(listener) = listener {
            let s = shared.clone();
            let transport = match listener_tls {
                Some(_) => Transport::TLS,
                None => Transport::TCP,
            };
            tunnel.spawn("tscf-peer-listener", move || {
                net::accept(&s, &listener, transport, listener_tls)
            })?;
        }
        let started = Instant::now();
        // What the host asked for at its start (a transport) is acted on here.
        shared.drive(|_, _, _| ());
        let deadline = started + connect_timeout;
        let state = drive::wait_until(&shared, shared.lock(), deadline, |state| {
            state
                .host
                .connect_result(started.elapsed(), false)
                .is_some()
        });
        let waited = started.elapsed();
        let result = state.host.connect_result(waited, true);
        drop(state);
        result.unwrap_or(Ok(())).map(|()| tunnel)
    }

    /// What happened to the tunnel, in order (at most 256 wait; later ones are dropped and
    /// counted in [`TunnelStats::notifications_dropped`][dropped]).
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
    /// free port of this tunnel's address of the same family; blocks until it is made (or
    /// refused, or the configured `tcp_connect_timeout` passes).
    pub fn tcp_connect(&self, addr: SocketAddr) -> io::Result<InnerTcpStream> {
        InnerTcpStream::connected(self.shared.tcp_connect(addr)?)
    }

    /// An inner TCP listener on `port` of the tunnel's internal addresses (IPv4 and IPv6);
    /// port 0 picks a free one from 49152 up.
    pub fn tcp_listen(&self, port: u16) -> io::Result<InnerTcpListener> {
        self.shared.tcp_listen(port).map(InnerTcpListener)
    }

    /// Test hook: makes the transport to the server look lost. The peer socket is replaced by
    /// a new one (a new source port), so that a UDP tunnel re-attaches from it; candidates
    /// already announced are not updated.
    #[doc(hidden)]
    pub fn drop_server_transport(&self) -> io::Result<()> {
        let udp = {
            let state = self.shared.lock();
            let old = state
                .driver
                .sockets
                .get(&PEER_SOCKET)
                .ok_or(io::ErrorKind::NotFound)?;
            let ip = old.local_addr()?.ip();
            Arc::new(Udp::new(UdpSocket::bind(SocketAddr::new(ip, 0))?)?)
        };
        let s = self.shared.clone();
        let reader = udp.clone();
        self.shared.drive(|host, io, now| {
            io.sockets.insert(PEER_SOCKET, udp);
            host.lose_server_transport(now);
        });
        thread::Builder::new()
            .name("tscf-tunnel-udp".to_owned())
            .spawn(move || net::run_udp(&s, PEER_SOCKET, &reader))?;
        Ok(())
    }

    /// Releases the tunnel (waiting briefly for the server's answer) and stops the threads.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.shared.lock().driver.stopped {
            return;
        }
        let started = Instant::now();
        self.shared.drive(|host, _, now| host.release(now));
        let state = self.shared.lock();
        let mut state =
            drive::wait_until(&self.shared, state, started + self.release_wait, |state| {
                state.host.state() == ClientState::Terminated
            });
        let now = Instant::now();
        state.host.stop(now);
        self.shared.drain(&mut state, now);
        drive::stop(&self.shared, &mut state);
        drop(state);
        if let Some(addr) = self.listener {
            net::wake_acceptor(addr);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        self.threads
            .push(thread::Builder::new().name(name.to_owned()).spawn(f)?);
        Ok(())
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
