//! The tunnel client: a [`TunnelClient`] behind a mutex, its transports, and its inner sockets.
//!
//! Threads: a timer thread, a UDP thread on the client's one UDP socket, and one reader thread
//! per stream transport while it is open. Envelopes are written by whichever thread drains the
//! client, under its lock.
//!
//! The UDP socket carries the server tunnel when it runs over UDP, and is also the client's
//! peer socket (`docs/PROTOCOL.md` §7): STUN requests to the server's UDP listener, probes and
//! peer tunnels. A datagram from the server's UDP endpoint that is not STUN goes to the client
//! as an [`Input::Envelope`]; every other one as an [`Input::PeerDatagram`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tscf_core::client::{
    ClientConfig, ClientEvent, ClientState, ClientStats, ConfigError, Destination, Input,
    PeerConfig, PeerDownReason, PeerPath, PeerTunnelInfo, ServerEndpoint, TerminateReason,
    TunnelClient, TunnelInfo,
};
use tscf_core::stun;
use tscf_core::wire::{ResultCode, Transport};

use crate::inner::SocketTable;
use crate::peer_stream::{self, PeerStreamListen, PeerStreams};
use crate::socket::{InnerUdpSocket, SocketQueue};
use crate::stream::{self, StreamReader, StreamWriter};
use crate::timer::{Shared, Timed};
use crate::tls::{self, ClientTlsConfig, TlsConfigError};
use crate::{lock, os_seed};

/// How long the UDP thread blocks in `recv_from` before it looks at the stop flag.
const UDP_POLL: Duration = Duration::from_millis(100);
/// Notifications waiting to be read; beyond, new ones are dropped and counted.
const NOTIFICATION_QUEUE: usize = 256;
/// How long closing a tunnel waits for the server to acknowledge the release.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// What [`Tunnel::connect`] needs.
///
/// # Peer tunneling
///
/// Peer tunneling is on by default, as it is on the server: [`TunnelConfig::new`] sets
/// `client.peer` to [`PeerConfig::new`] with no local address and, as STUN server, the first
/// UDP server endpoint (none if no server is on UDP). [`Tunnel::connect`] fills in
/// `local_addresses` when it is empty, from the tunnel's UDP socket: its bound address, or for
/// an unspecified bind the local address the system routes to the first server from. Set
/// `client.peer` to `None` to turn peer tunneling off, or change its fields (STUN servers,
/// timers, `default_opt_in`). Even when it is on, only inner sockets opted in with
/// [`InnerUdpSocket::set_peer_tunneling`] (or all, with `default_opt_in`) leave the relay.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// The client state machine's configuration: servers (tried in order), credential,
    /// timers, peer tunneling. Its `rng_seed` is replaced by one from the operating system
    /// unless [`keep_seed`](Self::keep_seed) is set.
    pub client: ClientConfig,
    /// Keep `client.rng_seed` as given.
    pub keep_seed: bool,
    /// TLS settings; required if any server uses TLS.
    pub tls: Option<ClientTlsConfig>,
    /// How long [`Tunnel::connect`] waits for the first tunnel (default 10 s).
    pub connect_timeout: Duration,
    /// Bound of one TCP connect plus TLS handshake (default 5 s).
    pub transport_timeout: Duration,
    /// Datagrams queued on one inner socket before further ones are dropped (default 256).
    pub socket_queue_len: usize,
    /// A listener for peer streams (`docs/PROTOCOL.md` §7.7; default none). With peer
    /// tunneling on, [`Tunnel::connect`] binds it and announces it in
    /// `client.peer.stream_listeners` (an unspecified address is announced with the UDP host
    /// candidate's address); for TLS it generates a self-signed certificate whose fingerprint
    /// goes into `client.peer.certificate_fingerprint` unless that is set already.
    pub peer_streams: PeerStreamListen,
    /// The certificate presented on secured peer paths (DTLS or QUIC peer transport,
    /// `docs/PROTOCOL.md` §7.5.1; the smol runtime's QUIC only). Generated at connect (self
    /// signed) when `None` and the peer transport is secure; its fingerprint goes into
    /// `client.peer.certificate_fingerprint`.
    pub peer_identity: Option<crate::tls::PeerIdentity>,
}

impl TunnelConfig {
    /// The defaults for these servers.
    pub fn new(servers: Vec<ServerEndpoint>) -> Self {
        let stun_servers = servers
            .iter()
            .find(|s| s.transport == Transport::UDP)
            .map(|s| s.addr)
            .into_iter()
            .collect();
        let mut client = ClientConfig::new(servers);
        client.peer = Some(PeerConfig::new(Vec::new(), stun_servers));
        Self {
            client,
            keep_seed: false,
            tls: None,
            connect_timeout: Duration::from_secs(10),
            transport_timeout: Duration::from_secs(5),
            socket_queue_len: 256,
            peer_streams: PeerStreamListen::None,
            peer_identity: None,
        }
    }
}

/// Why [`Tunnel::connect`] gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The client configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS settings are unusable, or missing for a TLS server.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// A local socket or thread could not be set up.
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
    /// The server refused the tunnel for good (for instance Unauthorized).
    #[error("the server refused the tunnel: {0:?}")]
    Refused(TerminateReason),
    /// No tunnel within the connect timeout.
    #[error("no tunnel after {waited:?}; last failure: {}", last_failure.as_deref().unwrap_or("none"))]
    TimedOut {
        /// How long it waited.
        waited: Duration,
        /// The last transport or server failure, as text.
        last_failure: Option<String>,
    },
}

/// What happened to a tunnel, for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notification {
    /// A fresh tunnel is up (the first, or a new one after the server closed the old).
    Connected(TunnelInfo),
    /// The transport to the server was lost; the client re-attaches by itself.
    TransportLost,
    /// The tunnel is back on a new transport with the same id and addresses.
    Reattached(TunnelInfo),
    /// The server closed the tunnel; a fresh one follows with [`Notification::Connected`].
    TunnelClosed {
        /// The reason the server gave.
        reason: ResultCode,
    },
    /// One attempt at a server failed.
    ConnectFailed {
        /// The server.
        server: ServerEndpoint,
        /// Its result code, or `None` for a transport failure or timeout.
        result: Option<ResultCode>,
        /// The transport failure, as text, when there was one.
        error: Option<String>,
    },
    /// NAT discovery of the peer socket finished (with the STUN servers of the configuration,
    /// or else the STUN responder the server announced).
    NatDiscovered {
        /// The peer socket's address as a STUN server saw it, if one answered.
        public: Option<SocketAddr>,
        /// Whether the NAT maps per destination; `None` when fewer than two servers answered.
        varies_by_destination: Option<bool>,
    },
    /// A peer tunnel is up: packets of opted-in sockets to `peer` now go straight to it.
    PeerTunnelUp {
        /// The peer's internal address.
        peer: IpAddr,
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// From the first opted-in packet (or the director's forwarded request) to up.
        setup: Duration,
    },
    /// A peer tunnel went down, or its setup failed: packets to `peer` take the relay.
    PeerTunnelDown {
        /// The peer's internal address.
        peer: IpAddr,
        /// Why.
        reason: PeerDownReason,
    },
    /// The tunnel is finished. Always the last notification.
    Terminated {
        /// Why.
        reason: TerminateReason,
    },
}

/// Counters of a tunnel: the client state machine's and the runtime's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TunnelStats {
    /// The state machine's counters.
    pub client: ClientStats,
    /// Inner packets for a port no socket is bound to.
    pub unbound_port: u64,
    /// Inner packets that are not UDP (or not parseable).
    pub not_udp: u64,
    /// Inner datagrams dropped because the socket's queue was full.
    pub socket_queue_full: u64,
    /// Datagrams on the UDP socket that were neither from the server tunnel nor for peer
    /// tunneling (which is off).
    pub udp_dropped: u64,
    /// Peer socket datagrams dropped by [`Tunnel::block_peer_traffic`], both directions.
    pub peer_blocked: u64,
    /// Data envelopes sent to the server as QUIC datagrams (RFC 9221) rather than on the QUIC
    /// stream (`tscf-runtime-smol` only).
    pub quic_datagrams_sent: u64,
    /// QUIC datagrams received from the server (`tscf-runtime-smol` only).
    pub quic_datagrams_received: u64,
    /// Envelopes sent to the server as DTLS records (`tscf-runtime-smol` only).
    pub dtls_records_sent: u64,
    /// DTLS records received from the server, each one envelope (`tscf-runtime-smol` only).
    pub dtls_records_received: u64,
    /// Notifications dropped because nobody read them.
    pub notifications_dropped: u64,
    /// QUIC or DTLS peer sessions whose handshake finished (`tscf-runtime-smol` only).
    pub peer_sessions_open: u64,
    /// QUIC or DTLS peer session handshakes that failed: a certificate that does not match the
    /// pinned fingerprint, a refusal, a timeout (`tscf-runtime-smol` only).
    pub peer_session_failures: u64,
    /// Incoming QUIC peer connections refused: from an address not authorised
    /// (`tscf-runtime-smol` only).
    pub peer_sessions_refused: u64,
    /// QUIC datagrams on the peer socket from addresses not authorised for a peer session,
    /// dropped before the QUIC endpoint sees them (`tscf-runtime-smol` only).
    pub peer_quic_unauthorised: u64,
    /// QUIC datagrams on the peer socket dropped because the endpoint's inbox was full
    /// (`tscf-runtime-smol` only).
    pub peer_quic_inbox_full: u64,
    /// DTLS datagrams on the peer socket from addresses not authorised for a peer session,
    /// dropped before the DTLS endpoint sees them (`tscf-runtime-smol` only).
    pub peer_dtls_unauthorised: u64,
    /// Datagrams from an authorised address that the DTLS peer endpoint refused: records an
    /// established session could not authenticate, forged `ChangeCipherSpec` records, plaintext
    /// handshake records after the handshake or past its bound, and datagrams that are no DTLS
    /// record (`tscf-runtime-smol` only).
    pub peer_dtls_bad_records: u64,
    /// Datagrams from an authorised address without a DTLS session that do not start an
    /// allowed handshake (`tscf-runtime-smol` only).
    pub peer_dtls_unknown_source: u64,
    /// Datagrams the peer socket failed to send, each a counted loss: above all those larger
    /// than one UDP datagram may be (65 507 octets over IPv4), which a data envelope of the
    /// largest inner packets is inside a DTLS record (`docs/PROTOCOL.md` §7.5.1)
    /// (`tscf-runtime-smol` only).
    pub peer_send_errors: u64,
    /// Envelopes a QUIC peer session sent on its stream because the peer takes no QUIC
    /// datagram that large, or none (`tscf-runtime-smol` only).
    pub peer_quic_stream_envelopes: u64,
    /// Envelopes dropped because a QUIC peer session's stream queue was full
    /// (`tscf-runtime-smol` only).
    pub peer_quic_stream_full: u64,
}

/// The notification the application sees for a client event; `None` for the events that are
/// instructions for the runtime (open or close a transport or a peer stream), which the runtime
/// handles before asking. Shared by both runtimes so that they report the same things the same
/// way. `last_failure` keeps the text of the last failed attempt for [`ConnectError::TimedOut`].
pub fn notification_for(
    event: ClientEvent,
    last_failure: &mut Option<String>,
) -> Option<Notification> {
    let note = match event {
        ClientEvent::Connected(info) => Notification::Connected(info),
        ClientEvent::Reattached(info) => Notification::Reattached(info),
        ClientEvent::TransportLost => Notification::TransportLost,
        ClientEvent::TunnelClosed { reason } => Notification::TunnelClosed { reason },
        ClientEvent::ConnectFailed { server, result } => {
            let error = match result {
                Some(code) => {
                    *last_failure = Some(format!("{} answered {code}", server.addr));
                    None
                }
                None => last_failure.clone(),
            };
            Notification::ConnectFailed {
                server,
                result,
                error,
            }
        }
        ClientEvent::NatDiscovered {
            public,
            varies_by_destination,
        } => Notification::NatDiscovered {
            public,
            varies_by_destination,
        },
        ClientEvent::PeerTunnelUp {
            peer, path, setup, ..
        } => Notification::PeerTunnelUp { peer, path, setup },
        ClientEvent::PeerTunnelDown { peer, reason } => {
            Notification::PeerTunnelDown { peer, reason }
        }
        ClientEvent::Terminated { reason } => Notification::Terminated { reason },
        _ => return None,
    };
    Some(note)
}

/// A TSC tunnel to a server, run by background threads. Dropping it releases the tunnel.
#[derive(Debug)]
pub struct Tunnel {
    shared: Arc<Shared<ClientCore>>,
    notifications: Receiver<Notification>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Starts the client and blocks until it holds a tunnel, the server refuses it for good,
    /// or `connect_timeout` passes. The client, not this runtime, decides which server and
    /// transport to try next.
    pub fn connect(mut config: TunnelConfig) -> Result<Self, ConnectError> {
        if let Some(peer) = config.client.peer.as_ref().filter(|p| p.offers_secure()) {
            return Err(ConnectError::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "peer transport {} is not supported by tscf-runtime-std (it has no DTLS \
                     or QUIC peer sessions); use Transport::UDP here, or tscf-runtime-smol \
                     for QUIC",
                    peer.transport
                ),
            )));
        }
        if !config.keep_seed {
            config.client.rng_seed = os_seed()?;
        }
        let tls = match &config.tls {
            Some(t) => Some((tls::client_config(t, crate::OS)?, t.clone())),
            None => None,
        };
        let udp = Arc::new(UdpSocket::bind(udp_bind_addr(&config.client.servers))?);
        udp.set_read_timeout(Some(UDP_POLL))?;
        let mut default_opt_in = false;
        let peer_enabled = config.client.peer.is_some();
        let mut listener = None;
        if let Some(peer) = &mut config.client.peer {
            if peer.local_addresses.is_empty() {
                peer.local_addresses = host_candidates(&udp, &config.client.servers)?;
            }
            default_opt_in = peer.default_opt_in;
            if let Some(l) = peer_stream::bind(config.peer_streams)? {
                let mut addr = l.socket.local_addr()?;
                if addr.ip().is_unspecified() {
                    if let Some(host) = peer.local_addresses.first() {
                        addr.set_ip(host.ip());
                    }
                }
                let transport = match l.fingerprint {
                    Some(fp) => {
                        peer.certificate_fingerprint.get_or_insert(fp.0);
                        Transport::TLS
                    }
                    None => Transport::TCP,
                };
                peer.stream_listeners.push((transport, addr));
                listener = Some(l);
            }
        }
        let client = TunnelClient::new(config.client.clone(), Instant::now())?;
        let (tx, notifications) = mpsc::sync_channel(NOTIFICATION_QUEUE);
        let shared = Arc::new_cyclic(|me| Shared {
            state: Mutex::new(ClientCore {
                client,
                me: me.clone(),
                link: Link::None,
                generation: 0,
                udp: udp.clone(),
                peer_enabled,
                peer_blocked: false,
                default_opt_in,
                tls,
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
                peer_streams: PeerStreams::default(),
                stats: TunnelStats::default(),
            }),
            timer: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut tunnel = Tunnel {
            shared: shared.clone(),
            notifications,
            stop: stop.clone(),
            threads: Vec::new(),
        };
        {
            let mut core = lock(&shared.state);
            core.drain();
        }
        let s = shared.clone();
        tunnel.threads.push(
            thread::Builder::new()
                .name("tscf-tunnel-timer".to_owned())
                .spawn(move || s.run_timer())?,
        );
        let s = shared.clone();
        let udp_stop = stop.clone();
        tunnel.threads.push(
            thread::Builder::new()
                .name("tscf-tunnel-udp".to_owned())
                .spawn(move || run_udp(&s, &udp_stop))?,
        );
        if let Some(listener) = listener {
            let s = shared.clone();
            let timeout = config.transport_timeout;
            tunnel.threads.push(
                thread::Builder::new()
                    .name("tscf-peer-listener".to_owned())
                    .spawn(move || peer_stream::run_listener(&s, &listener, &stop, timeout))?,
            );
        }
        let started = Instant::now();
        let deadline = started + config.connect_timeout;
        let mut core = lock(&shared.state);
        loop {
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
            core = shared
                .timer
                .wait_timeout(core, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(core);
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
        TunnelStats {
            client: *core.client.stats(),
            ..core.stats
        }
    }

    /// What happened to the tunnel, in order (at most 256 wait; later ones are dropped and
    /// counted in [`TunnelStats::notifications_dropped`]).
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

    /// Test hook: while `blocked`, every datagram the peer socket would send or receive (STUN,
    /// probes, peer tunnels) is dropped and counted in [`TunnelStats::peer_blocked`], as if a
    /// firewall cut the direct path. The server tunnel is not affected.
    #[doc(hidden)]
    pub fn block_peer_traffic(&self, blocked: bool) {
        lock(&self.shared.state).peer_blocked = blocked;
    }

    /// Test hook: closes every peer stream of this tunnel and reports each as lost to the
    /// client, as if the connections broke.
    #[doc(hidden)]
    pub fn drop_peer_streams(&self) {
        let mut core = lock(&self.shared.state);
        for id in core.peer_streams.ids() {
            core.peer_streams.close(id);
            core.client
                .handle_input(Instant::now(), Input::PeerStreamLost(id));
        }
        core.drain();
        self.shared.rearm(&mut core);
    }

    /// Test hook: makes the UDP transport to the server look lost. The tunnel's UDP socket is
    /// replaced by a new one (a new source port) and the client is told the transport is lost,
    /// so that it re-attaches from the new port. The peer socket moves with it; candidates
    /// already announced are not updated.
    #[doc(hidden)]
    pub fn drop_server_transport(&self) -> io::Result<()> {
        let mut core = lock(&self.shared.state);
        let local = core.udp.local_addr()?;
        let udp = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        udp.set_read_timeout(Some(UDP_POLL))?;
        core.udp = Arc::new(udp);
        core.link = Link::None;
        core.generation += 1;
        core.client
            .handle_input(Instant::now(), Input::TransportLost);
        core.drain();
        self.shared.rearm(&mut core);
        Ok(())
    }

    /// Releases the tunnel (waiting briefly for the server's answer) and stops the threads.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        let mut core = lock(&self.shared.state);
        core.client.release(Instant::now());
        core.drain();
        self.shared.rearm(&mut core);
        while core.client.state() != ClientState::Terminated {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            core = self
                .shared
                .timer
                .wait_timeout(core, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        core.close_link();
        core.stopped = true;
        for id in core.peer_streams.ids() {
            core.peer_streams.close(id);
        }
        for queue in core.sockets.queues() {
            queue.close();
        }
        self.shared.timer.notify_all();
        drop(core);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The client and everything its threads share.
#[derive(Debug)]
pub(crate) struct ClientCore {
    pub(crate) client: TunnelClient,
    me: Weak<Shared<ClientCore>>,
    link: Link,
    /// Bumped whenever the transport changes, so that a stale reader thread stays quiet.
    generation: u64,
    udp: Arc<UdpSocket>,
    /// Whether the client has peer tunneling on.
    peer_enabled: bool,
    /// Set by [`Tunnel::block_peer_traffic`].
    peer_blocked: bool,
    /// What an inner socket goes back to when it is dropped.
    pub(crate) default_opt_in: bool,
    tls: Option<(Arc<rustls::ClientConfig>, ClientTlsConfig)>,
    transport_timeout: Duration,
    pub(crate) sockets: SocketTable<SocketQueue>,
    socket_queue_len: usize,
    notifications: SyncSender<Notification>,
    last_failure: Option<String>,
    terminated: Option<TerminateReason>,
    stopped: bool,
    armed: Option<Instant>,
    buf: Vec<u8>,
    /// The inner packet received or sent last, kept for its capacity.
    pub(crate) packet: Vec<u8>,
    pub(crate) peer_streams: PeerStreams,
    pub(crate) stats: TunnelStats,
}

/// The transport to the server, as this runtime holds it.
#[derive(Debug)]
enum Link {
    None,
    /// A stream transport; `None` while its thread connects.
    Stream(Option<StreamWriter>),
    Udp(SocketAddr),
}

impl ClientCore {
    /// Drains the client after an input: transmits, then events (acting on each), until both
    /// are empty; then hands received packets to the inner sockets.
    pub(crate) fn drain(&mut self) {
        loop {
            let now = Instant::now();
            while let Some(t) = self.client.poll_transmit(now, &mut self.buf) {
                match t.destination {
                    Destination::Server => self.send_to_server(),
                    Destination::Peer(_) if self.peer_blocked => self.stats.peer_blocked += 1,
                    // Loss on a peer path is the core's to notice.
                    Destination::Peer(to) => {
                        let _ = self.udp.send_to(&self.buf, to);
                    }
                    Destination::PeerStream(id) => self.peer_streams.send(id, &self.buf),
                    _ => {}
                }
            }
            let Some(event) = self.client.poll_event() else {
                break;
            };
            self.on_event(now, event);
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
            ClientEvent::OpenPeerStream {
                stream,
                addr,
                transport,
                fingerprint,
                ..
            } => {
                if let Some(shared) = self.me.upgrade() {
                    let pinned = fingerprint.filter(|_| transport == Transport::TLS);
                    let timeout = self.transport_timeout;
                    peer_stream::open(self, shared, stream, addr, pinned, timeout);
                }
                return;
            }
            ClientEvent::ClosePeerStream { stream } => {
                self.peer_streams.close(stream);
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
            shared.timer.notify_all();
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
                let generation = self.generation;
                let timeout = self.transport_timeout;
                let Some(shared) = self.me.upgrade() else {
                    return;
                };
                self.link = Link::Stream(None);
                let spawned = thread::Builder::new()
                    .name("tscf-tunnel-stream".to_owned())
                    .spawn(move || run_stream(&shared, generation, server, tls, timeout));
                if let Err(e) = spawned {
                    self.link = Link::None;
                    self.failed(now, e.to_string());
                }
            }
            other => self.failed(now, format!("transport {other} is not supported here")),
        }
    }

    fn failed(&mut self, now: Instant, why: String) {
        self.last_failure = Some(why);
        self.link = Link::None;
        self.client.handle_input(now, Input::TransportFailed);
    }

    fn send_to_server(&mut self) {
        match &mut self.link {
            // A failed write shows up at the reader, which reports the loss.
            Link::Stream(Some(writer)) => {
                let _ = writer.send(&self.buf);
            }
            Link::Udp(server) => {
                let _ = self.udp.send_to(&self.buf, *server);
            }
            _ => {}
        }
    }

    /// Drops the current transport; its reader thread, if any, becomes stale.
    fn close_link(&mut self) {
        if let Link::Stream(Some(mut writer)) = std::mem::replace(&mut self.link, Link::None) {
            writer.close();
        }
        self.generation += 1;
    }
}

impl Timed for ClientCore {
    fn deadline(&self) -> Option<Instant> {
        self.client.poll_timeout()
    }

    fn on_timeout(&mut self, now: Instant) {
        self.client.handle_timeout(now);
        self.drain();
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn armed(&mut self) -> &mut Option<Instant> {
        &mut self.armed
    }
}

/// A stream transport's thread: connects, reports, then reads until the stream ends.
fn run_stream(
    shared: &Shared<ClientCore>,
    generation: u64,
    server: ServerEndpoint,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
) {
    let opened = open_stream(server.addr, tls, timeout);
    let mut reader = {
        let mut core = lock(&shared.state);
        if core.generation != generation || core.stopped {
            if let Ok((_, mut writer)) = opened {
                writer.close();
            }
            return;
        }
        let now = Instant::now();
        let reader = match opened {
            Ok((reader, writer)) => {
                core.link = Link::Stream(Some(writer));
                core.client.handle_input(now, Input::TransportOpen);
                Some(reader)
            }
            Err(e) => {
                core.failed(now, format!("{}: {e}", server.addr));
                None
            }
        };
        core.drain();
        shared.rearm(&mut core);
        match reader {
            Some(r) => r,
            None => return,
        }
    };
    let why = loop {
        let mut guard = None;
        let mut stale = false;
        let read = reader.read(|envelope| {
            let core = guard.get_or_insert_with(|| lock(&shared.state));
            if core.generation == generation {
                core.client
                    .handle_input(Instant::now(), Input::Envelope(envelope));
            } else {
                stale = true;
            }
        });
        if let Some(mut core) = guard {
            core.drain();
            shared.rearm(&mut core);
        }
        match read {
            Ok(true) if !stale => {}
            Ok(true) => return,
            Ok(false) => break "closed by the server".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    let mut core = lock(&shared.state);
    if core.generation == generation && !core.stopped {
        core.link = Link::None;
        core.generation += 1;
        core.last_failure = Some(format!("{}: {why}", server.addr));
        core.client
            .handle_input(Instant::now(), Input::TransportLost);
        core.drain();
        shared.rearm(&mut core);
    }
}

pub(crate) fn open_stream(
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
) -> Result<(StreamReader, StreamWriter), stream::StreamError> {
    let mut sock = TcpStream::connect_timeout(&addr, timeout)?;
    let _ = sock.set_nodelay(true);
    let conn = match tls {
        Some((config, name)) => {
            let mut conn = rustls::Connection::Client(rustls::ClientConnection::new(config, name)?);
            stream::handshake(&mut sock, &mut conn, Instant::now() + timeout)?;
            Some(conn)
        }
        None => None,
    };
    Ok(stream::split(sock, conn)?)
}

/// The UDP thread: envelopes from the server tunnel go to the client's server side, everything
/// else to its peer side (STUN answers included); without peer tunneling the rest is counted.
fn run_udp(shared: &Shared<ClientCore>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        // The socket may be replaced (see `Tunnel::drop_server_transport`).
        let udp = lock(&shared.state).udp.clone();
        let Ok((n, from)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let datagram = &buf[..n];
        let mut core = lock(&shared.state);
        let from_server = matches!(core.link, Link::Udp(server) if server == from);
        let now = Instant::now();
        if from_server && !stun::is_stun(datagram) {
            core.client.handle_input(now, Input::Envelope(datagram));
        } else if core.peer_blocked {
            core.stats.peer_blocked += 1;
            continue;
        } else if core.peer_enabled {
            core.client
                .handle_input(now, Input::PeerDatagram { from, datagram });
        } else {
            core.stats.udp_dropped += 1;
            continue;
        }
        core.drain();
        shared.rearm(&mut core);
    }
}

/// The host candidates of the peer socket: its bound address, or when it is bound to the
/// unspecified address, the local address the system would send to the first server from.
/// Shared with `tscf-runtime-smol`.
pub fn host_candidates(udp: &UdpSocket, servers: &[ServerEndpoint]) -> io::Result<Vec<SocketAddr>> {
    let local = udp.local_addr()?;
    if !local.ip().is_unspecified() {
        return Ok(vec![local]);
    }
    let Some(server) = servers.first() else {
        return Ok(Vec::new());
    };
    // Connecting a UDP socket sends nothing; it only picks the route and its source address.
    let probe = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
    probe.connect(server.addr)?;
    Ok(vec![SocketAddr::new(
        probe.local_addr()?.ip(),
        local.port(),
    )])
}

/// Where a client's UDP socket binds: loopback when the servers are on loopback, else the
/// unspecified address of the first server's family. Shared with `tscf-runtime-smol`.
pub fn udp_bind_addr(servers: &[ServerEndpoint]) -> SocketAddr {
    let first = servers
        .iter()
        .find(|s| s.transport.is_datagram())
        .or(servers.first());
    let ip = match first.map(|s| s.addr.ip()) {
        Some(ip) if ip.is_loopback() => ip,
        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}
