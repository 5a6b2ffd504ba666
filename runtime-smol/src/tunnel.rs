//! The tunnel client: a [`TunnelClient`] behind a lock held only for its synchronous calls,
//! its transports, and its inner sockets.
//!
//! Tasks: a timer task, a UDP task on the client's one UDP socket, and one task per stream or
//! QUIC transport while it is open (it connects, handshakes, then reads and writes).
//!
//! The UDP socket carries the server tunnel when it runs over UDP, and is also the client's
//! peer socket (`docs/PROTOCOL.md` §7): STUN requests to the server's UDP listener, probes and
//! peer tunnels ([`Destination::Peer`]). Secured peer sessions share it too: QUIC ones
//! through a quinn endpoint fed by the UDP task (`peer_session`), DTLS ones through a
//! [`PeerSessions`](tscf_core::dtls::PeerSessions) the client drives under its lock.
//!
//! A QUIC transport gets a quinn endpoint on a UDP socket of its own (a fresh one per attempt,
//! so a re-attach comes from a new port), not the peer socket. So does a DTLS transport: a
//! [`DtlsEndpoint`] with the one association, beside the client behind the same lock, and a
//! task that feeds it what its socket receives.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_io::{Async, Timer};
use futures_lite::future;
use futures_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use smol::Task;
use tscf_core::client::{
    ClientEvent, ClientState, Destination, Input, PeerPath, PeerTunnelInfo, ServerEndpoint,
    TerminateReason, TunnelClient, TunnelInfo,
};
use tscf_core::dtls::{self, DtlsEndpoint, DtlsEvent, DtlsLimits, PeerSessionEvent};
use tscf_core::stun;
use tscf_core::tls::{self, ClientTlsConfig, PeerIdentity, TlsConfigError};
use tscf_core::wire::{DatagramKind, Transport};
use tscf_runtime_std::inner::SocketTable;
use tscf_runtime_std::{
    host_candidates, notification_for, os_seed, udp_bind_addr, ConnectError, Notification,
    PeerStreamListen, TunnelConfig, TunnelStats,
};

use crate::lock;
use crate::peer_session::{self, PeerSessions, Sent};
use crate::quic::{self, Side};
use crate::socket::{InnerUdpSocket, SocketQueue};
use crate::stream::{self, Outgoing, OutgoingQueue, StreamError};
use crate::timer::{Shared, Timed};

/// Notifications waiting to be read; beyond, new ones are dropped and counted.
const NOTIFICATION_QUEUE: usize = 256;
/// Envelopes waiting for a stream transport's task.
const STREAM_QUEUE: usize = 1024;
/// How long closing a tunnel waits for the server to acknowledge the release.
const RELEASE_WAIT: Duration = Duration::from_secs(1);
/// Bound of one DTLS peer session handshake (the core's establishment timeout is the real
/// limit).
const PEER_DTLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// QUIC keep-alive, well within quinn's default idle timeout of 30 s.
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A TSC tunnel to a server, run by smol tasks. Dropping it sends the release and stops the
/// tasks; [`close`](Self::close) also waits for the server's answer.
#[derive(Debug)]
pub struct Tunnel {
    shared: Arc<Shared<ClientCore>>,
    notifications: Receiver<Notification>,
    tasks: Vec<Task<()>>,
}

impl Tunnel {
    /// Starts the client and waits until it holds a tunnel, the server refuses it for good,
    /// or `connect_timeout` passes. The client, not this runtime, decides which server and
    /// transport to try next. Takes the same [`TunnelConfig`] as the blocking runtime.
    pub async fn connect(mut config: TunnelConfig) -> Result<Self, ConnectError> {
        if !matches!(config.peer_streams, PeerStreamListen::None) {
            return Err(ConnectError::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                "peer stream listeners are not supported by the smol runtime yet; \
                 use tscf-runtime-std or PeerStreamListen::None",
            )));
        }
        if !config.keep_seed {
            config.client.rng_seed = os_seed()?;
        }
        let tls = match &config.tls {
            Some(t) => Some((tls::client_config(t, crate::OS)?, t.clone())),
            None => None,
        };
        let quic = match &tls {
            Some((rustls_config, settings)) => {
                let mut quic_config = quic::client_config(rustls_config)?;
                let mut transport = quinn::TransportConfig::default();
                transport.keep_alive_interval(Some(QUIC_KEEP_ALIVE));
                quic_config.transport_config(Arc::new(transport));
                Some((quic_config, settings.clone()))
            }
            None => None,
        };
        let dtls = match &config.tls {
            Some(t) => Some(dtls::ClientSettings::new(t, crate::OS)?),
            None => None,
        };
        let udp = Arc::new(Async::<UdpSocket>::bind(udp_bind_addr(
            &config.client.servers,
        ))?);
        let mut peer_sessions = None;
        let mut peer_dtls = None;
        if let Some(peer) = &mut config.client.peer {
            let identity = match peer.transport {
                Transport::UDP => None,
                Transport::QUIC | Transport::DTLS => Some(match config.peer_identity.take() {
                    Some(identity) => identity,
                    None => PeerIdentity::generate(crate::OS)?,
                }),
                other => {
                    return Err(ConnectError::Io(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "peer transport {other} is not supported by the smol runtime; \
                             use UDP, DTLS or QUIC"
                        ),
                    )));
                }
            };
            if let Some(identity) = identity {
                peer.certificate_fingerprint = Some(identity.fingerprint.0);
                if peer.transport == Transport::QUIC {
                    peer_sessions = Some(PeerSessions::new(udp.clone(), identity)?);
                } else {
                    let local = udp.get_ref().local_addr()?;
                    peer_dtls = Some(
                        dtls::PeerSessions::new(local, identity, PEER_DTLS_HANDSHAKE_TIMEOUT)
                            .map_err(TlsConfigError::from)?,
                    );
                }
            }
        }
        let endpoint = peer_sessions.as_ref().map(PeerSessions::endpoint);
        let mut default_opt_in = false;
        let peer_enabled = config.client.peer.is_some();
        if let Some(peer) = &mut config.client.peer {
            if peer.local_addresses.is_empty() {
                peer.local_addresses = host_candidates(udp.get_ref(), &config.client.servers)?;
            }
            default_opt_in = peer.default_opt_in;
        }
        let client = TunnelClient::new(config.client.clone(), Instant::now())?;
        let (tx, notifications) = async_channel::bounded(NOTIFICATION_QUEUE);
        let shared = Arc::new_cyclic(|me| Shared {
            state: Mutex::new(ClientCore {
                client,
                me: me.clone(),
                link: Link::None,
                generation: 0,
                udp: udp.clone(),
                peer_sessions,
                peer_dtls,
                peer_enabled,
                peer_blocked: false,
                default_opt_in,
                tls,
                quic,
                dtls,
                transport_timeout: config.transport_timeout,
                sockets: SocketTable::new(),
                socket_queue_len: config.socket_queue_len.max(1),
                notifications: tx,
                last_failure: None,
                terminated: None,
                stopped: false,
                armed: None,
                buf: Vec::new(),
                packet: Vec::new(),
                stats: TunnelStats::default(),
            }),
            timer: Default::default(),
            changed: Default::default(),
        });
        let s = shared.clone();
        let timer = smol::spawn(async move { s.run_timer().await });
        let s = shared.clone();
        let udp_task = smol::spawn(async move { run_udp(&s, &udp).await });
        let mut tasks = vec![timer, udp_task];
        if let Some(endpoint) = endpoint {
            let s = shared.clone();
            tasks.push(smol::spawn(peer_session::run_accept(s, endpoint)));
        }
        let tunnel = Tunnel {
            shared: shared.clone(),
            notifications,
            tasks,
        };
        lock(&shared.state).drain();
        let started = Instant::now();
        let deadline = started + config.connect_timeout;
        loop {
            let changed = shared.changed.listen();
            {
                let core = lock(&shared.state);
                match core.client.state() {
                    ClientState::Connected => break,
                    ClientState::Terminated => {
                        let reason = core.terminated.unwrap_or(TerminateReason::Released);
                        return Err(ConnectError::Refused(reason));
                    }
                    _ => {}
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(ConnectError::TimedOut {
                        waited: now - started,
                        last_failure: core.last_failure.clone(),
                    });
                }
            }
            future::or(changed, async {
                Timer::at(deadline).await;
            })
            .await;
        }
        Ok(tunnel)
    }

    /// The tunnel's internal IPv4 address (kept across re-attaches).
    pub fn internal_ipv4(&self) -> Option<Ipv4Addr> {
        lock(&self.shared.state).client.internal_ipv4()
    }

    /// The tunnel's internal IPv6 address.
    pub fn internal_ipv6(&self) -> Option<Ipv6Addr> {
        lock(&self.shared.state).client.internal_ipv6()
    }

    /// The tunnel id.
    pub fn tunnel_id(&self) -> Option<u64> {
        lock(&self.shared.state).client.tunnel_id()
    }

    /// This client's transport address as the server saw it (behind a NAT, the mapping).
    pub fn observed_address(&self) -> Option<SocketAddr> {
        let core = lock(&self.shared.state);
        core.client.tunnel_info().and_then(|i| i.observed_address)
    }

    /// The configuration the server gave the tunnel.
    pub fn info(&self) -> Option<TunnelInfo> {
        lock(&self.shared.state).client.tunnel_info().cloned()
    }

    /// Where the client is in its life cycle.
    pub fn state(&self) -> ClientState {
        lock(&self.shared.state).client.state()
    }

    /// Counters so far.
    pub fn stats(&self) -> TunnelStats {
        let core = lock(&self.shared.state);
        let mut stats = core.stats;
        stats.client = *core.client.stats();
        if let Some(dtls) = &core.peer_dtls {
            let counters = dtls.counters();
            stats.peer_dtls_bad_records = counters.bad_records;
            stats.peer_dtls_unknown_source = counters.unknown_source;
        }
        stats
    }

    /// What happened to the tunnel, in order, as an async channel (at most 256 wait; later
    /// ones are dropped and counted in [`TunnelStats::notifications_dropped`]).
    pub fn notifications(&self) -> &Receiver<Notification> {
        &self.notifications
    }

    /// An inner UDP socket on `port` of the tunnel's internal address; port 0 picks a free
    /// one from 49152 up.
    pub fn bind(&self, port: u16) -> io::Result<InnerUdpSocket> {
        let mut core = lock(&self.shared.state);
        let limit = core.socket_queue_len;
        let (port, queue) = core.sockets.bind(port, || SocketQueue::new(limit))?;
        Ok(InnerUdpSocket::new(port, queue, self.shared.clone()))
    }

    /// Where packets to `peer` (an internal address) go now: the relay, or a peer tunnel.
    pub fn peer_path(&self, peer: IpAddr) -> PeerPath {
        lock(&self.shared.state).client.peer_path(peer)
    }

    /// Every peer the client holds peer tunneling state for.
    pub fn peer_tunnels(&self) -> Vec<PeerTunnelInfo> {
        lock(&self.shared.state).client.peer_tunnels()
    }

    /// Removes the peer tunnel with `peer` and puts its flows back on the relay; see
    /// [`TunnelClient::release_peer_tunnel`].
    pub fn release_peer_tunnel(&self, peer: IpAddr) {
        let mut core = lock(&self.shared.state);
        core.client.release_peer_tunnel(Instant::now(), peer);
        core.drain();
        self.shared.rearm(&mut core);
    }

    /// Test hook: while `blocked`, every datagram the peer socket would send or receive is
    /// dropped and counted in [`TunnelStats::peer_blocked`], as if a firewall cut the direct
    /// path. The server tunnel is not affected.
    #[doc(hidden)]
    pub fn block_peer_traffic(&self, blocked: bool) {
        let mut core = lock(&self.shared.state);
        core.peer_blocked = blocked;
        if let Some(sessions) = &core.peer_sessions {
            sessions.socket.set_blocked(blocked);
        }
    }

    /// Test hook: present `identity` in the QUIC or DTLS peer sessions opened or accepted
    /// from now on, while the fingerprint announced stays the one of connect, as if the
    /// certificate were swapped by someone on the path. Nothing without a secured peer
    /// transport.
    #[doc(hidden)]
    pub fn present_peer_identity(&self, identity: PeerIdentity) {
        let mut core = lock(&self.shared.state);
        if let Some(dtls) = &mut core.peer_dtls {
            // A key rtc-dtls cannot use leaves the identity as it was.
            let _ = dtls.set_identity(identity.clone());
        }
        if let Some(sessions) = &mut core.peer_sessions {
            sessions.set_identity(identity);
        }
    }

    /// Test hook: sends `datagram` to `to` from the peer socket, as someone able to spoof its
    /// address would.
    #[doc(hidden)]
    pub fn send_from_peer_socket(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<usize> {
        lock(&self.shared.state).udp.get_ref().send_to(datagram, to)
    }

    /// Test hook: forgets the DTLS association with the server without telling it, as a
    /// client whose DTLS state is lost would, and reports the transport lost (the client then
    /// re-attaches). False if the transport is not DTLS.
    #[doc(hidden)]
    pub fn drop_dtls_association(&self) -> bool {
        let mut core = lock(&self.shared.state);
        let Link::Dtls(link) = &core.link else {
            return false;
        };
        let server = link.server;
        core.link = Link::None;
        core.generation += 1;
        core.last_failure = Some(format!("{server} (DTLS): association dropped"));
        core.client
            .handle_input(Instant::now(), Input::TransportLost);
        core.drain();
        self.shared.rearm(&mut core);
        true
    }

    /// Releases the tunnel, waits up to a second for the server's answer, and stops the tasks.
    pub async fn close(mut self) {
        self.release();
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            let changed = self.shared.changed.listen();
            if self.state() == ClientState::Terminated || Instant::now() >= deadline {
                break;
            }
            future::or(changed, async {
                Timer::at(deadline).await;
            })
            .await;
        }
        self.stop();
        for task in self.tasks.drain(..) {
            task.cancel().await;
        }
    }

    fn release(&self) {
        let mut core = lock(&self.shared.state);
        if core.stopped {
            return;
        }
        core.client.release(Instant::now());
        core.drain();
        self.shared.rearm(&mut core);
    }

    fn stop(&mut self) {
        let mut core = lock(&self.shared.state);
        core.close_link();
        core.stopped = true;
        if let Some(sessions) = &mut core.peer_sessions {
            sessions.close_all();
        }
        if let Some(dtls) = &mut core.peer_dtls {
            dtls.close_all(Instant::now());
        }
        core.flush_peer_dtls();
        for queue in core.sockets.queues() {
            queue.close();
        }
        self.shared.timer.notify(usize::MAX);
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.release();
        self.stop();
    }
}

/// The client and everything its tasks share.
#[derive(Debug)]
pub(crate) struct ClientCore {
    pub(crate) client: TunnelClient,
    me: Weak<Shared<ClientCore>>,
    link: Link,
    /// Bumped whenever the transport changes, so that a stale stream task stays quiet.
    generation: u64,
    udp: Arc<Async<UdpSocket>>,
    /// QUIC peer sessions, when the peer transport offered is QUIC.
    pub(crate) peer_sessions: Option<PeerSessions>,
    /// DTLS peer sessions, when the peer transport offered is DTLS.
    peer_dtls: Option<dtls::PeerSessions>,
    peer_enabled: bool,
    peer_blocked: bool,
    /// What an inner socket goes back to when it is dropped.
    pub(crate) default_opt_in: bool,
    tls: Option<(Arc<rustls::ClientConfig>, ClientTlsConfig)>,
    quic: Option<(quinn::ClientConfig, ClientTlsConfig)>,
    dtls: Option<dtls::ClientSettings>,
    transport_timeout: Duration,
    pub(crate) sockets: SocketTable<SocketQueue>,
    socket_queue_len: usize,
    notifications: Sender<Notification>,
    last_failure: Option<String>,
    terminated: Option<TerminateReason>,
    stopped: bool,
    armed: Option<Instant>,
    buf: Vec<u8>,
    /// The inner packet received or sent last, kept for its capacity.
    pub(crate) packet: Vec<u8>,
    pub(crate) stats: TunnelStats,
}

/// The transport to the server, as this runtime holds it.
#[derive(Debug)]
enum Link {
    None,
    /// A stream transport's queue; `None` while its task connects.
    Stream(Option<OutgoingQueue>),
    Udp(SocketAddr),
    /// A QUIC connection and its task's queue (for the stream); `None` while it connects.
    Quic(Option<(quinn::Connection, OutgoingQueue)>),
    /// A DTLS association on a socket of its own.
    Dtls(Box<DtlsLink>),
}

/// The DTLS transport to the server.
#[derive(Debug)]
struct DtlsLink {
    endpoint: DtlsEndpoint,
    socket: Arc<Async<UdpSocket>>,
    server: SocketAddr,
}

impl ClientCore {
    /// Drains the client after an input: transmits, then events (acting on each), until both
    /// are empty; then hands received packets to the inner sockets.
    pub(crate) fn drain(&mut self) {
        self.drain_at(Instant::now());
    }

    /// [`drain`](Self::drain) for an input handled at `now`, which stands for the whole drain.
    pub(crate) fn drain_at(&mut self, now: Instant) {
        loop {
            while let Some(t) = self.client.poll_transmit(now, &mut self.buf) {
                match t.destination {
                    Destination::Server => self.send_to_server(),
                    Destination::Peer(_) if self.peer_blocked => self.stats.peer_blocked += 1,
                    // Loss on a peer path is the core's to notice; a failed send is counted.
                    Destination::Peer(to) => {
                        let sent = self.udp.get_ref().send_to(&self.buf, to);
                        self.stats.peer_send_errors += u64::from(sent.is_err());
                    }
                    Destination::PeerSession(_) if self.peer_blocked => {
                        self.stats.peer_blocked += 1;
                    }
                    Destination::PeerSession(to) => {
                        if let Some(dtls) = &mut self.peer_dtls {
                            dtls.send(now, to, &self.buf);
                        } else if let Some(sessions) = &self.peer_sessions {
                            match sessions.send(to, &self.buf) {
                                Sent::Stream => self.stats.peer_quic_stream_envelopes += 1,
                                Sent::StreamFull => self.stats.peer_quic_stream_full += 1,
                                Sent::Datagram | Sent::NotOpen => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            self.flush_dtls();
            self.flush_peer_dtls();
            if let Some(event) = self.client.poll_event() {
                self.on_event(now, event);
            } else if !self.dtls_events(now) && !self.peer_dtls_event(now) {
                break;
            }
        }
        while self.client.recv_ip(&mut self.packet) {
            self.sockets.deliver(&self.packet, &mut self.stats);
        }
    }

    fn on_event(&mut self, now: Instant, event: ClientEvent) {
        tracing::debug!(?event, "tunnel client");
        let note = match event {
            ClientEvent::OpenTransport { server } => {
                self.open(now, server);
                return;
            }
            ClientEvent::CloseTransport => {
                self.close_link();
                return;
            }
            ClientEvent::OpenPeerSession {
                path,
                transport,
                fingerprint,
                ..
            } => {
                let opened = match (transport, &mut self.peer_sessions, &mut self.peer_dtls) {
                    (Transport::DTLS, _, Some(dtls)) => {
                        dtls.open(now, path, fingerprint).map_err(|e| e.to_string())
                    }
                    (Transport::QUIC, Some(sessions), _) => match self.me.upgrade() {
                        Some(shared) => sessions.open(shared, path, fingerprint),
                        None => return,
                    },
                    _ => Err(format!("no {transport} peer sessions")),
                };
                if let Err(e) = opened {
                    tracing::debug!(%path, error = %e, "peer session not opened");
                    self.stats.peer_session_failures += 1;
                    self.client
                        .handle_input(now, Input::PeerSessionFailed(path));
                }
                return;
            }
            ClientEvent::AcceptPeerSession {
                path,
                transport,
                fingerprint,
                ..
            } => {
                let authorised = match (transport, &mut self.peer_sessions, &mut self.peer_dtls) {
                    (Transport::DTLS, _, Some(dtls)) => {
                        dtls.authorise(path, fingerprint).map_err(|e| e.to_string())
                    }
                    (Transport::QUIC, Some(sessions), _) => {
                        sessions.authorise(path, fingerprint);
                        Ok(())
                    }
                    _ => Err(format!("no {transport} peer sessions")),
                };
                if let Err(e) = authorised {
                    tracing::debug!(%path, error = %e, "peer session not accepted");
                    self.stats.peer_session_failures += 1;
                    self.client
                        .handle_input(now, Input::PeerSessionFailed(path));
                }
                return;
            }
            ClientEvent::ClosePeerSession { path } => {
                if let Some(sessions) = &mut self.peer_sessions {
                    sessions.close(path);
                }
                if let Some(dtls) = &mut self.peer_dtls {
                    dtls.close(now, path);
                }
                return;
            }
            event => match notification_for(event, &mut self.last_failure) {
                Some(note) => note,
                None => return,
            },
        };
        if let Notification::Terminated { reason } = &note {
            self.terminated = Some(*reason);
        }
        if self.notifications.try_send(note).is_err() {
            self.stats.notifications_dropped += 1;
        }
        // Wake `connect` and `close`, which wait for a state change.
        if let Some(shared) = self.me.upgrade() {
            shared.changed.notify(usize::MAX);
        }
    }

    /// Opens the transport the client asked for.
    fn open(&mut self, now: Instant, server: ServerEndpoint) {
        self.close_link();
        match server.transport {
            Transport::UDP => {
                self.link = Link::Udp(server.addr);
                self.client.handle_input(now, Input::TransportOpen);
            }
            Transport::TCP | Transport::TLS => {
                let tls = match (&self.tls, server.transport == Transport::TLS) {
                    (_, false) => None,
                    (Some((config, settings)), true) => {
                        match tls::server_name(settings, server.addr) {
                            Ok(name) => Some((config.clone(), name)),
                            Err(e) => return self.failed(now, e.to_string()),
                        }
                    }
                    (None, true) => {
                        return self.failed(now, format!("{}: no TLS settings", server.addr));
                    }
                };
                let Some(shared) = self.me.upgrade() else {
                    return;
                };
                self.link = Link::Stream(None);
                let stream = StreamTask {
                    shared,
                    generation: self.generation,
                    server,
                    tls,
                    timeout: self.transport_timeout,
                };
                smol::spawn(stream.run()).detach();
            }
            Transport::DTLS => {
                if let Err(why) = self.open_dtls(now, server.addr) {
                    self.failed(now, format!("{} (DTLS): {why}", server.addr));
                }
            }
            Transport::QUIC => {
                let Some((config, settings)) = &self.quic else {
                    return self.failed(now, format!("{}: no TLS settings", server.addr));
                };
                if let Err(e) = tls::server_name(settings, server.addr) {
                    return self.failed(now, e.to_string());
                }
                let name = settings
                    .server_name
                    .clone()
                    .unwrap_or_else(|| server.addr.ip().to_string());
                let Some(shared) = self.me.upgrade() else {
                    return;
                };
                self.link = Link::Quic(None);
                let task = QuicTask {
                    shared,
                    generation: self.generation,
                    server,
                    config: config.clone(),
                    name,
                    timeout: self.transport_timeout,
                };
                smol::spawn(task.run()).detach();
            }
            other => self.failed(now, format!("transport {other} is not supported here")),
        }
    }

    /// Starts a DTLS handshake with `server` from a socket of its own, and the task that
    /// reads that socket.
    fn open_dtls(&mut self, now: Instant, server: SocketAddr) -> Result<(), String> {
        let config = match &self.dtls {
            Some(settings) => settings
                .handshake_config(server)
                .map_err(|e| e.to_string())?,
            None => return Err("no TLS settings".to_owned()),
        };
        let bind = match server {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = Async::<UdpSocket>::bind(bind).map_err(|e| e.to_string())?;
        let local = socket.get_ref().local_addr().map_err(|e| e.to_string())?;
        let limits = DtlsLimits {
            max_half_open: 1,
            handshake_timeout: self.transport_timeout,
        };
        let mut endpoint = DtlsEndpoint::new(local, limits);
        endpoint
            .connect(now, server, config)
            .map_err(|e| e.to_string())?;
        let socket = Arc::new(socket);
        let Some(shared) = self.me.upgrade() else {
            return Ok(());
        };
        self.link = Link::Dtls(Box::new(DtlsLink {
            endpoint,
            socket: socket.clone(),
            server,
        }));
        let generation = self.generation;
        smol::spawn(async move { run_dtls(&shared, generation, &socket).await }).detach();
        Ok(())
    }

    /// Acts on what the DTLS transport reports; false if it reported nothing.
    fn dtls_events(&mut self, now: Instant) -> bool {
        let Link::Dtls(link) = &mut self.link else {
            return false;
        };
        let server = link.server;
        let events: Vec<DtlsEvent> = std::iter::from_fn(|| link.endpoint.poll_event()).collect();
        let any = !events.is_empty();
        for event in events {
            if !matches!(self.link, Link::Dtls(_)) {
                break;
            }
            match event {
                DtlsEvent::HandshakeDone { .. } => {
                    self.client.handle_input(now, Input::TransportOpen)
                }
                DtlsEvent::Data { payload, .. } => {
                    self.stats.dtls_records_received += 1;
                    self.client.handle_input(now, Input::Envelope(&payload));
                }
                DtlsEvent::HandshakeFailed { reason, .. } => {
                    self.flush_dtls();
                    self.failed(now, format!("{server} (DTLS): {reason}"));
                    self.generation += 1;
                }
                DtlsEvent::Closed { .. } => {
                    self.link = Link::None;
                    self.generation += 1;
                    self.last_failure = Some(format!("{server} (DTLS): closed by the server"));
                    self.client.handle_input(now, Input::TransportLost);
                }
                _ => {}
            }
        }
        any
    }

    /// Sends what the DTLS peer sessions queued, on the peer socket.
    fn flush_peer_dtls(&mut self) {
        let Some(dtls) = &mut self.peer_dtls else {
            return;
        };
        while let Some((to, datagram)) = dtls.poll_transmit() {
            if self.peer_blocked {
                self.stats.peer_blocked += 1;
            } else if self.udp.get_ref().send_to(&datagram, to).is_err() {
                self.stats.peer_send_errors += 1;
            }
        }
    }

    /// Acts on one event of the DTLS peer sessions; false if there was none.
    fn peer_dtls_event(&mut self, now: Instant) -> bool {
        let Some(event) = self.peer_dtls.as_mut().and_then(|d| d.poll_event(now)) else {
            return false;
        };
        match event {
            PeerSessionEvent::Open { path } => {
                self.stats.peer_sessions_open += 1;
                self.client.handle_input(now, Input::PeerSessionOpen(path));
            }
            PeerSessionEvent::Failed { path, handshake } => {
                self.stats.peer_session_failures += u64::from(handshake);
                self.client
                    .handle_input(now, Input::PeerSessionFailed(path));
            }
            PeerSessionEvent::Envelope { path, envelope } => {
                self.client.handle_input(
                    now,
                    Input::PeerSessionDatagram {
                        path,
                        datagram: &envelope,
                    },
                );
            }
            _ => {}
        }
        true
    }

    /// Sends what the DTLS transport queued (non-blocking sends; loss is DTLS's to repair).
    fn flush_dtls(&mut self) {
        if let Link::Dtls(link) = &mut self.link {
            while let Some((to, datagram)) = link.endpoint.poll_transmit() {
                let _ = link.socket.get_ref().send_to(&datagram, to);
            }
        }
    }

    fn failed(&mut self, now: Instant, why: String) {
        self.last_failure = Some(why);
        self.link = Link::None;
        self.client.handle_input(now, Input::TransportFailed);
    }

    fn send_to_server(&mut self) {
        match &mut self.link {
            // A failed write shows up in the stream task, which reports the loss.
            Link::Stream(Some(tx)) => {
                let _ = tx.try_send(Outgoing::Envelope(self.buf.clone()));
            }
            Link::Udp(server) => {
                let _ = self.udp.get_ref().send_to(&self.buf, *server);
            }
            Link::Quic(Some((conn, tx))) => {
                if quic::try_send_datagram(conn, &self.buf) {
                    self.stats.quic_datagrams_sent += 1;
                } else {
                    let _ = tx.try_send(Outgoing::Envelope(self.buf.clone()));
                }
            }
            // A failed send drops the association and reports it as closed.
            Link::Dtls(link) => {
                let sent = link.endpoint.send(Instant::now(), link.server, &self.buf);
                self.stats.dtls_records_sent += u64::from(sent.is_ok());
            }
            _ => {}
        }
    }

    /// Drops the current transport; its task, if any, sees its queue close and ends.
    fn close_link(&mut self) {
        match std::mem::replace(&mut self.link, Link::None) {
            Link::Stream(Some(tx)) | Link::Quic(Some((_, tx)))
                if tx.try_send(Outgoing::Close).is_err() =>
            {
                tx.close();
            }
            Link::Dtls(mut link) => {
                link.endpoint.close(Instant::now(), link.server);
                while let Some((to, datagram)) = link.endpoint.poll_transmit() {
                    let _ = link.socket.get_ref().send_to(&datagram, to);
                }
            }
            _ => {}
        }
        self.generation += 1;
    }

    /// Whether the tunnel is stopping.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }

    /// Whether peer session `id` on `path` is still the one held.
    pub(crate) fn holds_peer_session(&self, path: SocketAddr, id: u64) -> bool {
        self.peer_sessions
            .as_ref()
            .is_some_and(|s| s.current(path, id))
    }
}

impl Timed for ClientCore {
    fn deadline(&self) -> Option<Instant> {
        // Asked after every input: plain code, and the DTLS endpoints only when they exist.
        let mut at = self.client.poll_timeout();
        if let Link::Dtls(link) = &self.link {
            at = earliest(at, link.endpoint.poll_timeout());
        }
        if let Some(dtls) = &self.peer_dtls {
            at = earliest(at, dtls.poll_timeout());
        }
        at
    }

    fn on_timeout(&mut self, now: Instant) {
        self.client.handle_timeout(now);
        if let Link::Dtls(link) = &mut self.link {
            link.endpoint.handle_timeout(now);
        }
        if let Some(dtls) = &mut self.peer_dtls {
            dtls.handle_timeout(now);
        }
        self.drain_at(now);
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn armed(&mut self) -> &mut Option<Instant> {
        &mut self.armed
    }
}

/// One stream transport to a server: connects, reports, then reads and writes until it ends.
struct StreamTask {
    shared: Arc<Shared<ClientCore>>,
    generation: u64,
    server: ServerEndpoint,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
}

impl StreamTask {
    async fn run(self) {
        let deadline = Instant::now() + self.timeout;
        let sock = bounded(deadline, Async::<TcpStream>::connect(self.server.addr)).await;
        let sock = match sock {
            Ok(sock) => sock,
            Err(e) => return self.report_failure(e),
        };
        let _ = sock.get_ref().set_nodelay(true);
        let result = match self.tls.clone() {
            None => self.serve(sock).await,
            Some((config, name)) => {
                let connector = TlsConnector::from(config);
                match bounded(deadline, connector.connect(name, sock)).await {
                    Ok(tls) => self.serve(tls).await,
                    Err(e) => return self.report_failure(e),
                }
            }
        };
        let why = match result {
            Ok(()) => "closed by the server".to_owned(),
            Err(StreamError::Stale) => return,
            Err(e) => e.to_string(),
        };
        let mut core = lock(&self.shared.state);
        if core.generation == self.generation && !core.stopped {
            core.link = Link::None;
            core.generation += 1;
            core.last_failure = Some(format!("{}: {why}", self.server.addr));
            core.client
                .handle_input(Instant::now(), Input::TransportLost);
            core.drain();
            self.shared.rearm(&mut core);
        }
    }

    fn report_failure(&self, e: io::Error) {
        let mut core = lock(&self.shared.state);
        if core.generation == self.generation && !core.stopped {
            core.failed(Instant::now(), format!("{}: {e}", self.server.addr));
            core.drain();
            self.shared.rearm(&mut core);
        }
    }

    async fn serve<S>(&self, io: S) -> Result<(), StreamError>
    where
        S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
    {
        let (tx, rx) = OutgoingQueue::new(STREAM_QUEUE);
        {
            let mut core = lock(&self.shared.state);
            if core.generation != self.generation || core.stopped {
                return Err(StreamError::Stale);
            }
            core.link = Link::Stream(Some(tx));
            core.client
                .handle_input(Instant::now(), Input::TransportOpen);
            core.drain();
            self.shared.rearm(&mut core);
        }
        let mut deframer = tscf_core::wire::StreamDeframer::new();
        stream::serve(io, &rx, |bytes| {
            feed_stream(&self.shared, self.generation, &mut deframer, bytes)
        })
        .await
    }
}

/// One QUIC transport to a server: connects from an endpoint of its own, reports, then runs
/// the control stream and datagrams until the connection ends.
struct QuicTask {
    shared: Arc<Shared<ClientCore>>,
    generation: u64,
    server: ServerEndpoint,
    config: quinn::ClientConfig,
    name: String,
    timeout: Duration,
}

impl QuicTask {
    async fn run(self) {
        let deadline = Instant::now() + self.timeout;
        let bind = match self.server.addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let endpoint = match quinn::Endpoint::client(bind) {
            Ok(endpoint) => endpoint,
            Err(e) => return self.report_failure(e),
        };
        let connecting =
            match endpoint.connect_with(self.config.clone(), self.server.addr, &self.name) {
                Ok(connecting) => connecting,
                Err(e) => return self.report_failure(io::Error::other(e)),
            };
        let conn = bounded(deadline, async {
            connecting.await.map_err(io::Error::from)
        })
        .await;
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => return self.report_failure(e),
        };
        let why = match self.serve(&conn).await {
            Ok(()) => "closed by the server".to_owned(),
            Err(StreamError::Stale) => {
                quic::close(&conn);
                return;
            }
            Err(e) => e.to_string(),
        };
        quic::close(&conn);
        let mut core = lock(&self.shared.state);
        if core.generation == self.generation && !core.stopped {
            core.link = Link::None;
            core.generation += 1;
            core.last_failure = Some(format!("{}: {why}", self.server.addr));
            core.client
                .handle_input(Instant::now(), Input::TransportLost);
            core.drain();
            self.shared.rearm(&mut core);
        }
    }

    fn report_failure(&self, e: io::Error) {
        let mut core = lock(&self.shared.state);
        if core.generation == self.generation && !core.stopped {
            core.failed(Instant::now(), format!("{} (QUIC): {e}", self.server.addr));
            core.drain();
            self.shared.rearm(&mut core);
        }
    }

    async fn serve(&self, conn: &quinn::Connection) -> Result<(), StreamError> {
        let (tx, rx) = OutgoingQueue::new(STREAM_QUEUE);
        {
            let mut core = lock(&self.shared.state);
            if core.generation != self.generation || core.stopped {
                return Err(StreamError::Stale);
            }
            core.link = Link::Quic(Some((conn.clone(), tx)));
            core.client
                .handle_input(Instant::now(), Input::TransportOpen);
            core.drain();
            self.shared.rearm(&mut core);
        }
        let mut deframer = tscf_core::wire::StreamDeframer::new();
        quic::serve(
            conn,
            Side::Client,
            &rx,
            |bytes| feed_stream(&self.shared, self.generation, &mut deframer, bytes),
            |datagram| {
                let mut core = lock(&self.shared.state);
                if core.generation != self.generation {
                    return Err(StreamError::Stale);
                }
                core.stats.quic_datagrams_received += 1;
                core.client
                    .handle_input(Instant::now(), Input::Envelope(datagram));
                core.drain();
                self.shared.rearm(&mut core);
                Ok(())
            },
        )
        .await
    }
}

/// Feeds bytes read from the server transport of `generation` to the client: every envelope
/// they complete, then the drain. Shared by the stream (TCP, TLS) and QUIC transports.
fn feed_stream(
    shared: &Shared<ClientCore>,
    generation: u64,
    deframer: &mut tscf_core::wire::StreamDeframer,
    bytes: &[u8],
) -> Result<(), StreamError> {
    let pushed = deframer.push(bytes);
    let mut core = lock(&shared.state);
    if core.generation != generation {
        return Err(StreamError::Stale);
    }
    let mut outcome = pushed.map_err(StreamError::from);
    while outcome.is_ok() {
        match deframer.next_raw() {
            Ok(Some(envelope)) => core
                .client
                .handle_input(Instant::now(), Input::Envelope(envelope)),
            Ok(None) => break,
            Err(e) => outcome = Err(e.into()),
        }
    }
    core.drain();
    shared.rearm(&mut core);
    outcome
}

/// The earlier of two deadlines, either of which may be unset.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `work`, or a timeout error at `deadline`.
pub(crate) async fn bounded<T>(
    deadline: Instant,
    work: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    future::or(work, async {
        Timer::at(deadline).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    })
    .await
}

/// The task of a DTLS transport's socket: every datagram goes to its endpoint, under the lock,
/// until the transport of `generation` is gone.
async fn run_dtls(shared: &Shared<ClientCore>, generation: u64, socket: &Async<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = future::or(async { Some(socket.recv_from(&mut buf).await) }, async {
            // Wake up now and then to notice a transport that was replaced without a datagram.
            Timer::after(Duration::from_secs(1)).await;
            None
        })
        .await;
        let mut core = lock(&shared.state);
        if core.stopped || core.generation != generation || !matches!(core.link, Link::Dtls(_)) {
            return;
        }
        let Some(Ok((n, from))) = received else {
            continue;
        };
        let now = Instant::now();
        if let Link::Dtls(link) = &mut core.link {
            link.endpoint.handle_datagram(now, from, &buf[..n]);
        }
        core.drain_at(now);
        shared.rearm(&mut core);
    }
}

/// The UDP task: envelopes from the server tunnel go to the client's server side, everything
/// else to its peer side (STUN answers included); without peer tunneling the rest is counted.
async fn run_udp(shared: &Shared<ClientCore>, udp: &Async<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf).await else {
            continue;
        };
        let datagram = &buf[..n];
        let mut core = lock(&shared.state);
        if core.stopped {
            return;
        }
        let from_server = matches!(core.link, Link::Udp(server) if server == from);
        let now = Instant::now();
        let kind = DatagramKind::of(datagram);
        if from_server && !stun::is_stun(datagram) {
            core.client.handle_input(now, Input::Envelope(datagram));
        } else if core.peer_blocked {
            core.stats.peer_blocked += 1;
            continue;
        } else if kind == DatagramKind::Quic && core.peer_sessions.is_some() {
            // QUIC reaches the endpoint only from addresses the client authorised or opened
            // a session to; nothing else about it is the core's business.
            let admitted = core
                .peer_sessions
                .as_ref()
                .map(|s| s.admits(from).then(|| s.socket.push(from, datagram)));
            match admitted.flatten() {
                Some(true) => {}
                Some(false) => core.stats.peer_quic_inbox_full += 1,
                None => core.stats.peer_quic_unauthorised += 1,
            }
            continue;
        } else if kind == DatagramKind::Dtls && core.peer_dtls.is_some() {
            // Likewise DTLS: only from addresses the client authorised or opened a session to.
            match core.peer_dtls.as_mut().filter(|d| d.admits(from)) {
                Some(dtls) => dtls.handle_datagram(now, from, datagram),
                None => {
                    core.stats.peer_dtls_unauthorised += 1;
                    continue;
                }
            }
        } else if core.peer_enabled {
            core.client
                .handle_input(now, Input::PeerDatagram { from, datagram });
        } else {
            core.stats.udp_dropped += 1;
            continue;
        }
        core.drain_at(now);
        shared.rearm(&mut core);
    }
}
