//! The tunnel server: a [`SessionDirector`] behind a lock held only for its synchronous calls,
//! driven by smol tasks.
//!
//! Tasks: one acceptor per TCP, TLS or QUIC listener, one per stream or QUIC connection (it
//! handshakes, then reads and writes), one per UDP listener (tscf and STUN), one per DTLS
//! listener, and one timer task. quinn runs each QUIC endpoint's own driver task. The DTLS
//! associations of a listener live in a [`DtlsEndpoint`] beside the director, behind the same
//! lock; the timer task drives both.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::TrySendError;
use async_io::{Async, Timer};
use futures_lite::future;
use futures_rustls::TlsAcceptor;
use rustc_hash::FxHashMap;
use smol::Task;
use tscf_core::director::{
    ConnectionHandle, ConnectionInfo, DirectorEvent, SessionDirector, TunnelSummary,
};
use tscf_core::dtls::{self, DtlsEndpoint, DtlsEvent, DtlsLimits};
use tscf_core::tls::{self, Fingerprint, TlsConfigError};
use tscf_core::wire::Transport;
use tscf_runtime_std::udp::{self, Demux, UdpPeers};
use tscf_runtime_std::{
    os_seed, LocalAddrs, ServerConfig, ServerCounters, ServerStats, StartError,
};

use crate::lock;
use crate::quic::{self, Side};
use crate::stream::{self, Outgoing, OutgoingQueue, StreamError};
use crate::timer::{Shared, Timed};

/// How long shutdown waits for stream connections to flush their last envelopes.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Starts servers.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds every listener and starts the tasks on smol's global executor. Refuses open
    /// admission on a listener beyond loopback, like `tscf_runtime_std::Server::start`.
    pub async fn start(mut config: ServerConfig) -> Result<ServerHandle, StartError> {
        let all: Vec<SocketAddr> = config
            .tcp
            .iter()
            .chain(&config.tls)
            .chain(&config.udp)
            .chain(&config.quic)
            .chain(&config.dtls)
            .copied()
            .collect();
        if all.is_empty() {
            return Err(StartError::NoListener);
        }
        config.director.validate()?;
        config.director.check_listeners(&all)?;
        if !config.keep_seed {
            config.director.rng_seed = os_seed().map_err(StartError::Randomness)?;
        }
        let needs_tls =
            !config.tls.is_empty() || !config.quic.is_empty() || !config.dtls.is_empty();
        let (acceptor, fingerprint, dtls_config) = match (&config.tls_config, needs_tls) {
            (Some(t), _) => {
                let identity = tls::load_identity(&t.identity, crate::OS)?;
                let fingerprint = identity.fingerprint;
                let dtls_config = if config.dtls.is_empty() {
                    None
                } else {
                    let cert = dtls::certificate(identity.chain.clone(), &identity.key)
                        .map_err(TlsConfigError::from)?;
                    let client_roots = t
                        .client_ca
                        .as_deref()
                        .map(|p| tls::load_roots(p, crate::OS))
                        .transpose()?;
                    let check = match client_roots {
                        Some(roots) => dtls::ClientCheck::Roots(roots),
                        None => dtls::ClientCheck::None,
                    };
                    Some((cert, check))
                };
                let c = tls::server_config_with(t, identity, crate::OS)?;
                (Some(c), Some(fingerprint), dtls_config)
            }
            (None, true) => return Err(StartError::MissingTls),
            (None, false) => (None, None, None),
        };
        let bind_tcp = |addr: &SocketAddr| {
            Async::<TcpListener>::bind(*addr).map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })
        };
        let tcp: Vec<_> = config.tcp.iter().map(bind_tcp).collect::<Result<_, _>>()?;
        let tls_listeners: Vec<_> = config.tls.iter().map(bind_tcp).collect::<Result<_, _>>()?;
        let udp: Vec<Arc<Async<UdpSocket>>> = config
            .udp
            .iter()
            .map(|addr| {
                Async::<UdpSocket>::bind(*addr)
                    .map(Arc::new)
                    .map_err(|source| StartError::Bind {
                        addr: *addr,
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        let dtls_limits = DtlsLimits {
            max_half_open: config.dtls_max_half_open.max(1),
            handshake_timeout: config.dtls_handshake_timeout,
        };
        let dtls_sites: Vec<DtlsSite> = config
            .dtls
            .iter()
            .map(|addr| {
                let socket =
                    Async::<UdpSocket>::bind(*addr).map_err(|source| StartError::Bind {
                        addr: *addr,
                        source,
                    })?;
                let local = socket.get_ref().local_addr().map_err(StartError::Thread)?;
                let mut endpoint = DtlsEndpoint::new(local, dtls_limits);
                if let Some((cert, check)) = &dtls_config {
                    let secret = os_seed().map_err(StartError::Randomness)?;
                    let acceptor = dtls::Acceptor::new(cert.clone(), check.clone(), secret)
                        .map_err(|e| StartError::Tls(e.into()))?;
                    endpoint.set_acceptor(Some(acceptor));
                }
                Ok(DtlsSite {
                    socket: Arc::new(socket),
                    endpoint,
                })
            })
            .collect::<Result<_, StartError>>()?;
        let quic_config = match (&acceptor, config.quic.is_empty()) {
            (Some(tls), false) => Some(quic::server_config(tls)?),
            _ => None,
        };
        let quic_endpoints: Vec<quinn::Endpoint> = match &quic_config {
            Some(quic_config) => config
                .quic
                .iter()
                .map(|addr| {
                    quinn::Endpoint::server(quic_config.clone(), *addr).map_err(|source| {
                        StartError::Bind {
                            addr: *addr,
                            source,
                        }
                    })
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let local = |l: &Async<TcpListener>| l.get_ref().local_addr().map_err(StartError::Thread);
        let addrs = LocalAddrs {
            tcp: tcp.iter().map(local).collect::<Result<_, _>>()?,
            tls: tls_listeners.iter().map(local).collect::<Result<_, _>>()?,
            udp: udp
                .iter()
                .map(|s| s.get_ref().local_addr().map_err(StartError::Thread))
                .collect::<Result<_, _>>()?,
            dtls: dtls_sites.iter().map(|site| site.endpoint_addr()).collect(),
            quic: quic_endpoints
                .iter()
                .map(|e| e.local_addr().map_err(StartError::Thread))
                .collect::<Result<_, _>>()?,
        };
        let counters = Arc::new(ServerCounters::default());
        let director = SessionDirector::new(addrs.director_config(&config.director))?;
        let dtls_sockets: Vec<_> = dtls_sites.iter().map(|s| s.socket.clone()).collect();
        let inner = Arc::new(ServerInner {
            shared: Shared {
                state: Mutex::new(ServerCore {
                    director,
                    routes: FxHashMap::default(),
                    udp_peers: UdpPeers::new(),
                    dtls: dtls_sites,
                    dtls_peers: HashMap::new(),
                    next_handle: 0,
                    buf: Vec::new(),
                    stopped: false,
                    armed: None,
                    counters: counters.clone(),
                    max_dtls_associations: config.max_stream_connections.max(1),
                }),
                timer: Default::default(),
                changed: Default::default(),
            },
            counters,
            stopping: AtomicBool::new(false),
            stream_count: AtomicUsize::new(0),
            tls: acceptor,
            pending_timeout: config.director.pending_timeout,
            max_streams: config.max_stream_connections.max(1),
            queue_len: config.stream_queue_len.max(1),
            quic_handshaking: AtomicUsize::new(0),
            quic_retry_above: config.quic_retry_above,
        });
        let mut tasks = Vec::new();
        let i = inner.clone();
        tasks.push(smol::spawn(async move { i.shared.run_timer().await }));
        for (listener, transport) in tcp
            .into_iter()
            .map(|l| (l, Transport::TCP))
            .chain(tls_listeners.into_iter().map(|l| (l, Transport::TLS)))
        {
            tasks.push(smol::spawn(inner.clone().accept(listener, transport)));
        }
        for socket in udp {
            tasks.push(smol::spawn(inner.clone().run_udp(socket)));
        }
        for endpoint in &quic_endpoints {
            tasks.push(smol::spawn(inner.clone().accept_quic(endpoint.clone())));
        }
        for (site, socket) in dtls_sockets.into_iter().enumerate() {
            tasks.push(smol::spawn(inner.clone().run_dtls(site, socket)));
        }
        Ok(ServerHandle {
            inner,
            addrs,
            fingerprint,
            tasks,
            quic: quic_endpoints,
        })
    }
}

/// A running server. Dropping it stops it like [`shutdown`](Self::shutdown), without waiting
/// for the last envelopes to be written.
#[derive(Debug)]
pub struct ServerHandle {
    inner: Arc<ServerInner>,
    addrs: LocalAddrs,
    fingerprint: Option<Fingerprint>,
    tasks: Vec<Task<()>>,
    quic: Vec<quinn::Endpoint>,
}

impl ServerHandle {
    /// The listeners' addresses, with the ports the system chose for port 0.
    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.addrs
    }

    /// The SHA-256 fingerprint of the TLS certificate, which QUIC and DTLS listeners present
    /// too (for clients that pin it).
    pub fn tls_fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// Current statistics.
    pub fn stats(&self) -> ServerStats {
        let core = lock(&self.inner.shared.state);
        let mut stats = ServerStats::default();
        stats.director = core.director.stats();
        stats.runtime = self.inner.counters.snapshot();
        stats.stream_connections = self.inner.stream_count.load(Ordering::Relaxed);
        stats.udp_connections = core.udp_peers.len();
        for site in &core.dtls {
            let c = site.endpoint.counters();
            let r = &mut stats.runtime;
            r.dtls_handshakes += c.handshakes;
            r.dtls_handshake_failures += c.handshake_failures;
            r.dtls_unknown_source += c.unknown_source;
            r.dtls_bad_records += c.bad_records;
            r.dtls_half_open_evicted += c.half_open_evicted;
            r.dtls_hello_verify_sent += c.hello_verify_sent;
            stats.dtls_associations += site.endpoint.established();
            stats.dtls_half_open += site.endpoint.half_open();
        }
        stats
    }

    /// The tunnels the director holds.
    pub fn tunnels(&self) -> Vec<TunnelSummary> {
        lock(&self.inner.shared.state).director.tunnels().collect()
    }

    /// Cuts the connection or DTLS association that carries `tunnel_id`, as a network failure
    /// would: a TCP connection ends without a TLS close_notify and without writing what is
    /// queued, a QUIC connection is closed at once, a DTLS association is dropped after a
    /// `close_notify` (so the client notices at once). Returns false if the tunnel is unknown,
    /// persistent, or on UDP. For tests and operators.
    pub fn cut_connection(&self, tunnel_id: u64) -> bool {
        let mut core = lock(&self.inner.shared.state);
        let connection = core
            .director
            .tunnels()
            .find(|t| t.tunnel_id == tunnel_id)
            .and_then(|t| t.connection);
        match connection.and_then(|c| core.routes.get(&c)) {
            Some(Route::Quic { conn, .. }) => {
                quic::close(conn);
                true
            }
            Some(Route::Stream { tx }) => tx.try_send(Outgoing::Abort).is_ok(),
            Some(Route::Dtls { site, peer }) => {
                let (site, peer) = (*site, *peer);
                let now = Instant::now();
                if let Some(s) = core.dtls.get_mut(site) {
                    s.endpoint.close(now, peer);
                }
                core.dtls_closed(now, site, peer);
                core.drain(now);
                self.inner.shared.rearm(&mut core);
                true
            }
            _ => false,
        }
    }

    /// Closes every tunnel with reason Shutdown (`director.shutdown`), sends the release
    /// notifications, waits up to a second for the stream connections to write them and close,
    /// then stops every task.
    pub async fn shutdown(mut self) {
        if !self.stop() {
            return;
        }
        let deadline = Instant::now() + FLUSH_GRACE;
        while self.inner.stream_count.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            Timer::after(Duration::from_millis(10)).await;
        }
        for task in self.tasks.drain(..) {
            task.cancel().await;
        }
        for endpoint in self.quic.drain(..) {
            endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        }
    }

    /// Shuts the director down and tells every connection to close; false if already done.
    fn stop(&mut self) -> bool {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::SeqCst) {
            return false;
        }
        let mut core = lock(&inner.shared.state);
        let now = Instant::now();
        core.director.shutdown(now);
        core.drain(now);
        core.stopped = true;
        for route in core.routes.values() {
            match route {
                Route::Stream { tx } => {
                    if tx.try_send(Outgoing::Close).is_err() {
                        tx.close();
                    }
                }
                Route::Quic { tx, .. } => {
                    if tx.try_send(Outgoing::Close).is_err() {
                        tx.close();
                    }
                }
                Route::Udp { .. } | Route::Dtls { .. } => {}
            }
        }
        let peers: Vec<(usize, SocketAddr)> = core.dtls_peers.keys().copied().collect();
        for (site, peer) in peers {
            if let Some(s) = core.dtls.get_mut(site) {
                s.endpoint.close(now, peer);
            }
        }
        core.flush_dtls();
        inner.shared.timer.notify(usize::MAX);
        true
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
        for endpoint in &self.quic {
            endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        }
    }
}

#[derive(Debug)]
struct ServerInner {
    shared: Shared<ServerCore>,
    counters: Arc<ServerCounters>,
    stopping: AtomicBool,
    stream_count: AtomicUsize,
    tls: Option<Arc<rustls::ServerConfig>>,
    pending_timeout: Duration,
    max_streams: usize,
    queue_len: usize,
    /// QUIC handshakes in progress, and how many may be before new clients get a Retry.
    quic_handshaking: AtomicUsize,
    quic_retry_above: usize,
}

/// The director and the routes of its connections.
#[derive(Debug)]
struct ServerCore {
    director: SessionDirector,
    /// Keyed by handles the server hands out itself, so a fast unkeyed hash will do.
    routes: FxHashMap<ConnectionHandle, Route>,
    udp_peers: UdpPeers,
    /// The DTLS listeners and their associations.
    dtls: Vec<DtlsSite>,
    /// The director connection of each established DTLS association (listener, remote).
    dtls_peers: HashMap<(usize, SocketAddr), ConnectionHandle>,
    /// Most established DTLS associations at once (`max_stream_connections`).
    max_dtls_associations: usize,
    next_handle: u64,
    buf: Vec<u8>,
    stopped: bool,
    armed: Option<Instant>,
    counters: Arc<ServerCounters>,
}

/// How envelopes reach a connection.
#[derive(Debug)]
enum Route {
    /// The connection task's queue.
    Stream { tx: OutgoingQueue },
    /// A QUIC connection: data envelopes go as datagrams (a non-blocking send) when they fit,
    /// everything else through the connection task's queue to the stream.
    Quic {
        conn: quinn::Connection,
        tx: OutgoingQueue,
    },
    /// A UDP listener (a non-blocking send, never awaited under the lock) and the remote.
    Udp {
        socket: Arc<Async<UdpSocket>>,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// A DTLS association: listener `site` of [`ServerCore::dtls`] and the remote.
    Dtls { site: usize, peer: SocketAddr },
}

/// A DTLS listener: its socket and the associations on it.
#[derive(Debug)]
struct DtlsSite {
    socket: Arc<Async<UdpSocket>>,
    endpoint: DtlsEndpoint,
}

impl DtlsSite {
    fn endpoint_addr(&self) -> SocketAddr {
        self.socket
            .get_ref()
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl ServerCore {
    /// Drains the director and the DTLS listeners after an input at `now`, until neither has
    /// more to say: DTLS events into the director, director transmits to their connections,
    /// director events; then the DTLS datagrams to their sockets.
    fn drain(&mut self, now: Instant) {
        loop {
            self.drain_director(now);
            // A send to an association that failed reports it as closed: loop until quiet.
            if !self.dtls_events() {
                break;
            }
        }
        self.flush_dtls();
    }

    /// Feeds the director what the DTLS listeners report; false if they reported nothing.
    fn dtls_events(&mut self) -> bool {
        let mut any = false;
        // Read the clock only when there is an event: most drains have none.
        let mut clock = None;
        for site in 0..self.dtls.len() {
            while let Some(event) = self.dtls[site].endpoint.poll_event() {
                any = true;
                let now = *clock.get_or_insert_with(Instant::now);
                match event {
                    DtlsEvent::HandshakeDone { peer, .. }
                        if self.dtls_peers.len() >= self.max_dtls_associations =>
                    {
                        self.dtls[site].endpoint.close(now, peer);
                        bump(&self.counters.streams_refused);
                    }
                    DtlsEvent::HandshakeDone {
                        peer,
                        peer_certificate,
                    } => {
                        let handle = self.handle();
                        self.dtls_peers.insert((site, peer), handle);
                        self.routes.insert(handle, Route::Dtls { site, peer });
                        let info = ConnectionInfo {
                            transport: Transport::DTLS,
                            remote: peer,
                            verified_identity: peer_certificate.is_some(),
                        };
                        // Handles are fresh, so the director cannot know this one.
                        let _ = self.director.handle_connect(now, handle, info);
                    }
                    DtlsEvent::Data { peer, payload } => match self.dtls_peers.get(&(site, peer)) {
                        Some(handle) => {
                            let handle = *handle;
                            self.director.handle_datagram(now, handle, &payload);
                        }
                        None => bump(&self.counters.udp_dropped),
                    },
                    DtlsEvent::Closed { peer } => self.dtls_closed(now, site, peer),
                    DtlsEvent::HandshakeFailed { peer, reason } => {
                        tracing::debug!(%peer, %reason, "DTLS handshake failed");
                    }
                    _ => {}
                }
            }
        }
        any
    }

    /// Tells the director that the association with `peer` on listener `site` is gone.
    fn dtls_closed(&mut self, now: Instant, site: usize, peer: SocketAddr) {
        if let Some(handle) = self.dtls_peers.remove(&(site, peer)) {
            self.routes.remove(&handle);
            self.director.handle_disconnect(now, handle);
        }
    }

    /// Sends what the DTLS listeners queued (non-blocking sends).
    fn flush_dtls(&mut self) {
        for site in &mut self.dtls {
            while let Some((to, datagram)) = site.endpoint.poll_transmit() {
                if site.socket.get_ref().send_to(&datagram, to).is_err() {
                    bump(&self.counters.udp_send_errors);
                }
            }
        }
    }

    /// Drains the director: transmits to their connections, then events.
    fn drain_director(&mut self, now: Instant) {
        while let Some(t) = self.director.poll_transmit(now, &mut self.buf) {
            match self.routes.get(&t.connection) {
                Some(Route::Stream { tx }) => {
                    let frame = std::mem::take(&mut self.buf);
                    if let Err(TrySendError::Full(_)) = tx.try_send(Outgoing::Envelope(frame)) {
                        bump(&self.counters.stream_queue_full);
                    }
                }
                Some(Route::Udp { socket, peer, .. })
                    if socket.get_ref().send_to(&self.buf, *peer).is_err() =>
                {
                    bump(&self.counters.udp_send_errors);
                }
                Some(Route::Dtls { site, peer }) => {
                    let (site, peer) = (*site, *peer);
                    if let Some(s) = self.dtls.get_mut(site) {
                        // A failed send drops the association and reports it as closed.
                        let _ = s.endpoint.send(Instant::now(), peer, &self.buf);
                    }
                }
                Some(Route::Quic { conn, tx }) => {
                    if quic::try_send_datagram(conn, &self.buf) {
                        bump(&self.counters.quic_datagrams_sent);
                    } else {
                        let frame = std::mem::take(&mut self.buf);
                        if let Err(TrySendError::Full(_)) = tx.try_send(Outgoing::Envelope(frame)) {
                            bump(&self.counters.stream_queue_full);
                        }
                    }
                }
                _ => {}
            }
        }
        while let Some(event) = self.director.poll_event() {
            tracing::debug!(?event, "director");
            if let DirectorEvent::CloseConnection { connection } = event {
                match self.routes.remove(&connection) {
                    Some(Route::Stream { tx } | Route::Quic { tx, .. })
                        if tx.try_send(Outgoing::Close).is_err() =>
                    {
                        tx.close();
                    }
                    Some(Route::Udp { local, peer, .. }) => {
                        self.udp_peers.remove(local, peer);
                    }
                    Some(Route::Dtls { site, peer }) => {
                        self.dtls_peers.remove(&(site, peer));
                        if let Some(s) = self.dtls.get_mut(site) {
                            s.endpoint.close(Instant::now(), peer);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn handle(&mut self) -> ConnectionHandle {
        fresh_handle(&mut self.next_handle)
    }
}

impl Timed for ServerCore {
    fn deadline(&self) -> Option<Instant> {
        let dtls = self.dtls.iter().filter_map(|s| s.endpoint.poll_timeout());
        self.director.poll_timeout().into_iter().chain(dtls).min()
    }

    fn on_timeout(&mut self, now: Instant) {
        self.director.handle_timeout(now);
        for site in &mut self.dtls {
            site.endpoint.handle_timeout(now);
        }
        self.drain(now);
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn armed(&mut self) -> &mut Option<Instant> {
        &mut self.armed
    }
}

impl ServerInner {
    async fn accept(self: Arc<Self>, listener: Async<TcpListener>, transport: Transport) {
        loop {
            let Ok((sock, remote)) = listener.accept().await else {
                // Out of descriptors or an aborted connection: let the system catch up.
                Timer::after(Duration::from_millis(10)).await;
                continue;
            };
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            if self.stream_count.load(Ordering::SeqCst) >= self.max_streams {
                bump(&self.counters.streams_refused);
                continue;
            }
            bump(&self.counters.streams_accepted);
            self.stream_count.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            smol::spawn(async move {
                if let Err(e) = me.serve_stream(sock, remote, transport).await {
                    tracing::debug!(error = %e, "stream connection ended");
                }
                me.stream_count.fetch_sub(1, Ordering::SeqCst);
            })
            .detach();
        }
    }

    async fn serve_stream(
        &self,
        sock: Async<TcpStream>,
        remote: SocketAddr,
        transport: Transport,
    ) -> Result<(), StreamError> {
        let _ = sock.get_ref().set_nodelay(true);
        if transport != Transport::TLS {
            return self.serve_connection(sock, remote, transport, false).await;
        }
        let acceptor = self
            .tls
            .clone()
            .map(TlsAcceptor::from)
            .ok_or_else(|| std::io::Error::other("no TLS"))?;
        let timeout = self.pending_timeout;
        let handshake = future::or(async { acceptor.accept(sock).await.map(Some) }, async {
            Timer::after(timeout).await;
            Ok(None)
        })
        .await;
        let tls = match handshake {
            Ok(Some(tls)) => tls,
            Ok(None) => {
                bump(&self.counters.tls_handshake_failures);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )
                .into());
            }
            Err(e) => {
                bump(&self.counters.tls_handshake_failures);
                return Err(e.into());
            }
        };
        let verified = tls
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        self.serve_connection(tls, remote, transport, verified)
            .await
    }

    /// Registers the connection with the director and runs it until it ends.
    async fn serve_connection<S>(
        &self,
        io: S,
        remote: SocketAddr,
        transport: Transport,
        verified_identity: bool,
    ) -> Result<(), StreamError>
    where
        S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
    {
        let (tx, rx) = OutgoingQueue::new(self.queue_len);
        let handle = {
            let mut core = lock(&self.shared.state);
            if core.stopped {
                return Ok(());
            }
            let handle = core.handle();
            core.routes.insert(handle, Route::Stream { tx });
            let info = ConnectionInfo {
                transport,
                remote,
                verified_identity,
            };
            // Handles are fresh, so the director cannot know this one.
            let now = Instant::now();
            let _ = core.director.handle_connect(now, handle, info);
            core.drain(now);
            self.shared.rearm(&mut core);
            handle
        };
        let mut deframer = tscf_core::wire::StreamDeframer::new();
        let result = stream::serve(io, &rx, |bytes| {
            self.feed_stream(handle, &mut deframer, bytes)
        })
        .await;
        if matches!(result, Err(StreamError::Framing(_))) {
            bump(&self.counters.framing_errors);
        }
        let mut core = lock(&self.shared.state);
        let now = Instant::now();
        core.director.handle_disconnect(now, handle);
        core.routes.remove(&handle);
        core.drain(now);
        self.shared.rearm(&mut core);
        result
    }

    async fn accept_quic(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            if self.stopping.load(Ordering::SeqCst) {
                incoming.refuse();
                return;
            }
            if self.stream_count.load(Ordering::SeqCst) >= self.max_streams {
                bump(&self.counters.streams_refused);
                incoming.refuse();
                continue;
            }
            // Past the threshold a client must show it receives at its address before it
            // gets handshake state: a Retry costs the server nothing to remember.
            if !incoming.remote_address_validated()
                && self.quic_handshaking.load(Ordering::SeqCst) >= self.quic_retry_above
            {
                bump(&self.counters.quic_retries);
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            bump(&self.counters.streams_accepted);
            self.stream_count.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            smol::spawn(async move {
                if let Err(e) = me.serve_quic(incoming).await {
                    tracing::debug!(error = %e, "QUIC connection ended");
                }
                me.stream_count.fetch_sub(1, Ordering::SeqCst);
            })
            .detach();
        }
    }

    /// Handshakes, registers the connection with the director and runs it until it ends.
    async fn serve_quic(&self, incoming: quinn::Incoming) -> Result<(), StreamError> {
        let timeout = self.pending_timeout;
        self.quic_handshaking.fetch_add(1, Ordering::SeqCst);
        let handshake = future::or(async { Some(incoming.await) }, async {
            Timer::after(timeout).await;
            None
        })
        .await;
        self.quic_handshaking.fetch_sub(1, Ordering::SeqCst);
        let conn = match handshake {
            Some(Ok(conn)) => conn,
            Some(Err(e)) => {
                bump(&self.counters.quic_handshake_failures);
                return Err(std::io::Error::from(e).into());
            }
            None => {
                bump(&self.counters.quic_handshake_failures);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "QUIC handshake timed out",
                )
                .into());
            }
        };
        let verified_identity = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .is_some_and(|chain| !chain.is_empty());
        let (tx, rx) = OutgoingQueue::new(self.queue_len);
        let handle = {
            let mut core = lock(&self.shared.state);
            if core.stopped {
                quic::close(&conn);
                return Ok(());
            }
            let handle = core.handle();
            let route = Route::Quic {
                conn: conn.clone(),
                tx,
            };
            core.routes.insert(handle, route);
            let info = ConnectionInfo {
                transport: Transport::QUIC,
                remote: conn.remote_address(),
                verified_identity,
            };
            // Handles are fresh, so the director cannot know this one.
            let now = Instant::now();
            let _ = core.director.handle_connect(now, handle, info);
            core.drain(now);
            self.shared.rearm(&mut core);
            handle
        };
        let mut deframer = tscf_core::wire::StreamDeframer::new();
        let result = quic::serve(
            &conn,
            Side::Server,
            &rx,
            |bytes| self.feed_stream(handle, &mut deframer, bytes),
            |datagram| {
                bump(&self.counters.quic_datagrams_received);
                let mut core = lock(&self.shared.state);
                let now = Instant::now();
                core.director.handle_datagram(now, handle, datagram);
                core.drain(now);
                self.shared.rearm(&mut core);
                Ok(())
            },
        )
        .await;
        if matches!(result, Err(StreamError::Framing(_))) {
            bump(&self.counters.framing_errors);
            quic::close(&conn);
        }
        let mut core = lock(&self.shared.state);
        let now = Instant::now();
        core.director.handle_disconnect(now, handle);
        core.routes.remove(&handle);
        core.drain(now);
        self.shared.rearm(&mut core);
        result
    }

    /// Feeds bytes read from connection `handle` to the director: every envelope they
    /// complete, then the drain. Shared by the stream (TCP, TLS) and QUIC transports.
    fn feed_stream(
        &self,
        handle: ConnectionHandle,
        deframer: &mut tscf_core::wire::StreamDeframer,
        bytes: &[u8],
    ) -> Result<(), StreamError> {
        let pushed = deframer.push(bytes);
        let mut core = lock(&self.shared.state);
        let mut outcome = pushed.map_err(StreamError::from);
        while outcome.is_ok() {
            match deframer.next_envelope() {
                Ok(Some(envelope)) => {
                    core.director
                        .handle_envelope(Instant::now(), handle, envelope);
                }
                Ok(None) => break,
                Err(e) => outcome = Err(e.into()),
            }
        }
        core.drain(Instant::now());
        self.shared.rearm(&mut core);
        outcome
    }

    async fn run_udp(self: Arc<Self>, socket: Arc<Async<UdpSocket>>) {
        let Ok(local) = socket.get_ref().local_addr() else {
            return;
        };
        let mut buf = vec![0u8; 65_536];
        let mut answer = Vec::new();
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let datagram = &buf[..n];
            match udp::demux(datagram, from, &mut answer) {
                Demux::Answer => {
                    bump(&self.counters.stun_answered);
                    if socket.get_ref().send_to(&answer, from).is_err() {
                        bump(&self.counters.udp_send_errors);
                    }
                }
                Demux::Envelope => {
                    let mut guard = lock(&self.shared.state);
                    let core = &mut *guard;
                    if core.stopped {
                        continue;
                    }
                    let next_handle = &mut core.next_handle;
                    let now = Instant::now();
                    let new = core.udp_peers.handle_datagram(
                        &mut core.director,
                        now,
                        local,
                        from,
                        datagram,
                        || fresh_handle(next_handle),
                    );
                    if let Some(h) = new {
                        let route = Route::Udp {
                            socket: socket.clone(),
                            local,
                            peer: from,
                        };
                        core.routes.insert(h, route);
                    }
                    core.drain(now);
                    self.shared.rearm(core);
                }
                Demux::Drop => bump(&self.counters.udp_dropped),
            }
        }
    }
}

impl ServerInner {
    /// The task of DTLS listener `site`: every datagram goes to its endpoint, under the lock.
    async fn run_dtls(self: Arc<Self>, site: usize, socket: Arc<Async<UdpSocket>>) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let mut core = lock(&self.shared.state);
            if core.stopped {
                continue;
            }
            let Some(s) = core.dtls.get_mut(site) else {
                return;
            };
            let now = Instant::now();
            s.endpoint.handle_datagram(now, from, &buf[..n]);
            core.drain(now);
            self.shared.rearm(&mut core);
        }
    }
}

/// The next connection handle of a counter that only grows.
fn fresh_handle(next: &mut u64) -> ConnectionHandle {
    *next += 1;
    ConnectionHandle(*next)
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
