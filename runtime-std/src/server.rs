//! The tunnel server: a [`SessionDirector`] behind a mutex, driven by blocking sockets.
//!
//! Threads: one acceptor per TCP or TLS listener, two per stream connection (a reader that
//! feeds the director and a writer that drains the connection's bounded queue), one per UDP
//! listener, and one timer thread that calls `handle_timeout` at `poll_timeout`.

use std::collections::HashMap;
use std::io;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tscf_core::director::{
    ConnectionHandle, ConnectionInfo, DirectorConfig, DirectorConfigError, DirectorEvent,
    DirectorStats, SessionDirector, TunnelSummary,
};
use tscf_core::wire::{Envelope, Transport};

use crate::batch::{WriteBatch, WRITE_BATCH};
use crate::stream::{self, StreamError, StreamWriter};
use crate::timer::{Shared, Timed};
use crate::tls::{self, Fingerprint, ServerIdentity, ServerTlsConfig, TlsConfigError};
use crate::udp::{self, Demux, UdpPeers};
use crate::{lock, os_seed};

/// How long a UDP thread blocks in `recv_from` before it looks at the stop flag.
const UDP_POLL: Duration = Duration::from_millis(100);
/// How long shutdown waits for stream writers to flush their last envelopes.
const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// Stack of connection threads; they hold a few small buffers on the heap only.
const CONNECTION_STACK: usize = 256 * 1024;

/// What a [`Server`] listens on and how it runs its director.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The director's configuration. Its `rng_seed` is replaced by one from the operating
    /// system unless [`keep_seed`](Self::keep_seed) is set.
    pub director: DirectorConfig,
    /// Keep `director.rng_seed` as given (reproducible tunnel ids, for tests).
    pub keep_seed: bool,
    /// Plain TCP listeners.
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners; they need [`tls`](Self::tls).
    pub tls: Vec<SocketAddr>,
    /// UDP listeners (tscf envelopes and STUN Binding requests share them).
    pub udp: Vec<SocketAddr>,
    /// QUIC listeners (UDP), with the certificate of [`tls_config`](Self::tls_config) and ALPN
    /// `tscf`. Only `tscf-runtime-smol` runs them; this runtime refuses to start with any.
    pub quic: Vec<SocketAddr>,
    /// DTLS 1.2 listeners (UDP), with the certificate of [`tls_config`](Self::tls_config);
    /// each DTLS record carries one envelope. Only `tscf-runtime-smol` runs them; this runtime
    /// refuses to start with any.
    pub dtls: Vec<SocketAddr>,
    /// Most DTLS handshakes in progress at once on one DTLS listener (default 256); only a
    /// client that returned the listener's stateless cookie gets one. A handshake from a new
    /// source beyond it evicts the oldest one, counted in
    /// [`RuntimeCounters::dtls_half_open_evicted`].
    pub dtls_max_half_open: usize,
    /// How long a DTLS handshake may take before its state is dropped (default 5 s).
    pub dtls_handshake_timeout: Duration,
    /// QUIC handshakes in progress at once beyond which a new client must first prove
    /// its address with a Retry (RFC 9000 §8.1), so that spoofed Initial packets cannot hold
    /// handshake state (default 64; 0 validates every client). Counted in
    /// [`RuntimeCounters::quic_retries`].
    pub quic_retry_above: usize,
    /// Certificate, key and optional client CA of the TLS, QUIC and DTLS listeners.
    pub tls_config: Option<ServerTlsConfig>,
    /// Most stream connections (TCP and TLS, configured or not, handshaking included; QUIC
    /// connections too in `tscf-runtime-smol`) at once; beyond it new connections are closed
    /// at accept (default 1024). Each costs two threads here, one task in the smol runtime.
    /// `tscf-runtime-smol` also holds at most this many established DTLS associations; one
    /// beyond is closed when its handshake completes (counted in `streams_refused`).
    pub max_stream_connections: usize,
    /// Envelopes queued for one stream connection's writer; beyond it envelopes for that
    /// connection are dropped and counted (default 1024).
    pub stream_queue_len: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            director: DirectorConfig::default(),
            keep_seed: false,
            tcp: Vec::new(),
            tls: Vec::new(),
            udp: Vec::new(),
            quic: Vec::new(),
            dtls: Vec::new(),
            dtls_max_half_open: 256,
            dtls_handshake_timeout: Duration::from_secs(5),
            quic_retry_above: 64,
            tls_config: None,
            max_stream_connections: 1024,
            stream_queue_len: 1024,
        }
    }
}

impl ServerConfig {
    /// TCP, TLS and UDP listeners on ephemeral ports of 127.0.0.1, with a self-signed
    /// certificate for "127.0.0.1" and the default director (open admission, which loopback
    /// allows): the setup of examples, tests and local experiments.
    pub fn loopback() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            tcp: vec![any],
            tls: vec![any],
            udp: vec![any],
            tls_config: Some(ServerTlsConfig {
                identity: ServerIdentity::SelfSigned {
                    names: vec!["127.0.0.1".into()],
                },
                client_ca: None,
            }),
            ..Self::default()
        }
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The director refused its configuration, or open admission on a listener beyond
    /// loopback.
    #[error(transparent)]
    Director(#[from] DirectorConfigError),
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// TLS, QUIC or DTLS listeners are configured without TLS settings.
    #[error("TLS, QUIC or DTLS listeners configured without tls_config")]
    MissingTls,
    /// The configuration asks for something this runtime does not run (QUIC and DTLS
    /// listeners in `tscf-runtime-std`).
    #[error("not supported by this runtime: {0}")]
    Unsupported(&'static str),
    /// No listener is configured.
    #[error("no listener configured")]
    NoListener,
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    /// The operating system gave no secure randomness for tunnel ids and secrets.
    #[error("{0}")]
    Randomness(io::Error),
}

/// The addresses the server listens on (ports resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// TCP listeners.
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners.
    pub tls: Vec<SocketAddr>,
    /// UDP listeners.
    pub udp: Vec<SocketAddr>,
    /// QUIC listeners (UDP).
    pub quic: Vec<SocketAddr>,
    /// DTLS listeners (UDP).
    pub dtls: Vec<SocketAddr>,
}

impl LocalAddrs {
    /// `config` with its STUN port set, unless set already, to the first UDP listener's: the
    /// STUN responder that clients on any transport are told of (PROTOCOL §3.3).
    pub fn director_config(&self, config: &DirectorConfig) -> DirectorConfig {
        let mut config = config.clone();
        config.stun_port = config.stun_port.or(self.udp.first().map(|a| a.port()));
        config
    }
}

/// Counters of the server runtime (the director keeps its own in [`DirectorStats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeCounters {
    /// Stream connections accepted.
    pub streams_accepted: u64,
    /// Stream connections closed at accept because `max_stream_connections` were open (and
    /// DTLS associations closed at the end of their handshake, in `tscf-runtime-smol`).
    pub streams_refused: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: u64,
    /// Streams closed because they lost framing (`docs/PROTOCOL.md` §2.1).
    pub framing_errors: u64,
    /// Envelopes dropped because a stream connection's writer queue was full.
    pub stream_queue_full: u64,
    /// STUN Binding requests answered.
    pub stun_answered: u64,
    /// Datagrams dropped on a UDP listener: neither STUN nor tscf (§2.4), or invalid STUN.
    pub udp_dropped: u64,
    /// Datagrams that could not be sent.
    pub udp_send_errors: u64,
    /// QUIC handshakes that failed or timed out.
    pub quic_handshake_failures: u64,
    /// New QUIC clients sent a Retry to prove their address (see
    /// [`ServerConfig::quic_retry_above`]).
    pub quic_retries: u64,
    /// Data envelopes sent as QUIC datagrams (RFC 9221) rather than on the QUIC stream.
    pub quic_datagrams_sent: u64,
    /// QUIC datagrams received (each one envelope).
    pub quic_datagrams_received: u64,
    /// DTLS handshakes completed.
    pub dtls_handshakes: u64,
    /// DTLS handshakes that failed (a bad or unverified certificate, a fatal alert, a record
    /// the handshake could not take) or timed out; their state is dropped.
    pub dtls_handshake_failures: u64,
    /// Datagrams on a DTLS listener from a source with no DTLS state that are neither a
    /// ClientHello nor one with a valid cookie: dropped before any state is kept for the source.
    pub dtls_unknown_source: u64,
    /// DTLS records that an association refused (malformed, or failing to authenticate once
    /// the association is up) and application data that is not one envelope.
    pub dtls_bad_records: u64,
    /// Half-open DTLS handshakes evicted because `dtls_max_half_open` was reached.
    pub dtls_half_open_evicted: u64,
    /// HelloVerifyRequests sent, statelessly, to DTLS ClientHellos without a cookie.
    pub dtls_hello_verify_sent: u64,
}

/// A snapshot of a running server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// The director's statistics.
    pub director: DirectorStats,
    /// The runtime's counters.
    pub runtime: RuntimeCounters,
    /// Stream connections open now (with QUIC connections in `tscf-runtime-smol`).
    pub stream_connections: usize,
    /// UDP remote addresses mapped to a director connection now.
    pub udp_connections: usize,
    /// DTLS associations with completed handshakes now (each one director connection).
    pub dtls_associations: usize,
    /// DTLS handshakes in progress now, over all DTLS listeners (each bounded by
    /// `dtls_max_half_open`).
    pub dtls_half_open: usize,
}

/// Starts servers.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds every listener and starts the threads. Refuses open admission on a listener
    /// beyond loopback ([`DirectorConfig::check_listeners`]), and QUIC and DTLS listeners
    /// ([`StartError::Unsupported`]).
    pub fn start(mut config: ServerConfig) -> Result<ServerHandle, StartError> {
        if !config.quic.is_empty() {
            return Err(StartError::Unsupported(
                "QUIC listeners (use tscf-runtime-smol)",
            ));
        }
        if !config.dtls.is_empty() {
            return Err(StartError::Unsupported(
                "DTLS listeners (use tscf-runtime-smol)",
            ));
        }
        let all: Vec<SocketAddr> = config
            .tcp
            .iter()
            .chain(&config.tls)
            .chain(&config.udp)
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
        let (tls_server, fingerprint) = match (&config.tls_config, config.tls.is_empty()) {
            (Some(t), _) => {
                let (c, f) = tls::server_config(t, crate::OS)?;
                (Some(c), Some(f))
            }
            (None, false) => return Err(StartError::MissingTls),
            (None, true) => (None, None),
        };
        let bind_tcp = |addr: &SocketAddr| {
            TcpListener::bind(addr).map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })
        };
        let tcp: Vec<TcpListener> = config.tcp.iter().map(bind_tcp).collect::<Result<_, _>>()?;
        let tls_listeners: Vec<TcpListener> =
            config.tls.iter().map(bind_tcp).collect::<Result<_, _>>()?;
        let udp: Vec<Arc<UdpSocket>> = config
            .udp
            .iter()
            .map(|addr| {
                UdpSocket::bind(addr)
                    .map(Arc::new)
                    .map_err(|source| StartError::Bind {
                        addr: *addr,
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        let local = |l: &TcpListener| l.local_addr().map_err(StartError::Thread);
        let addrs = LocalAddrs {
            tcp: tcp.iter().map(local).collect::<Result<_, _>>()?,
            tls: tls_listeners.iter().map(local).collect::<Result<_, _>>()?,
            udp: udp
                .iter()
                .map(|s| s.local_addr().map_err(StartError::Thread))
                .collect::<Result<_, _>>()?,
            quic: Vec::new(),
            dtls: Vec::new(),
        };
        let director = SessionDirector::new(addrs.director_config(&config.director))?;
        let inner = Arc::new(ServerInner {
            shared: Shared {
                state: Mutex::new(ServerCore {
                    director,
                    routes: FxHashMap::default(),
                    udp_peers: UdpPeers::new(),
                    next_handle: 0,
                    buf: Vec::new(),
                    stopped: false,
                    armed: None,
                    counters: Arc::default(),
                }),
                timer: Default::default(),
            },
            counters: Arc::default(),
            streams: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            stream_count: AtomicUsize::new(0),
            next_stream: AtomicU64::new(0),
            tls: tls_server,
            pending_timeout: config.director.pending_timeout,
            max_streams: config.max_stream_connections.max(1),
            queue_len: config.stream_queue_len.max(1),
        });
        lock(&inner.shared.state).counters = inner.counters.clone();
        let mut handle = ServerHandle {
            inner: inner.clone(),
            addrs,
            fingerprint,
            threads: Vec::new(),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.to_owned())
                .spawn(f)
                .map_err(StartError::Thread)
        };
        let i = inner.clone();
        handle
            .threads
            .push(spawn("tscf-timer", Box::new(move || i.shared.run_timer()))?);
        for (listener, transport) in tcp
            .into_iter()
            .map(|l| (l, Transport::TCP))
            .chain(tls_listeners.into_iter().map(|l| (l, Transport::TLS)))
        {
            let i = inner.clone();
            let t = spawn(
                "tscf-accept",
                Box::new(move || i.accept(listener, transport)),
            )?;
            handle.threads.push(t);
        }
        for socket in udp {
            let i = inner.clone();
            handle
                .threads
                .push(spawn("tscf-udp", Box::new(move || i.run_udp(socket)))?);
        }
        Ok(handle)
    }
}

/// A running server. Dropping it shuts it down like [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct ServerHandle {
    inner: Arc<ServerInner>,
    addrs: LocalAddrs,
    fingerprint: Option<Fingerprint>,
    threads: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The listeners' addresses, with the ports the system chose for port 0.
    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.addrs
    }

    /// The SHA-256 fingerprint of the TLS certificate (for clients that pin it).
    pub fn tls_fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// Current statistics.
    pub fn stats(&self) -> ServerStats {
        let core = lock(&self.inner.shared.state);
        ServerStats {
            director: core.director.stats(),
            runtime: self.inner.counters.snapshot(),
            stream_connections: self.inner.stream_count.load(Ordering::Relaxed),
            udp_connections: core.udp_peers.len(),
            dtls_associations: 0,
            dtls_half_open: 0,
        }
    }

    /// The tunnels the director holds.
    pub fn tunnels(&self) -> Vec<TunnelSummary> {
        lock(&self.inner.shared.state).director.tunnels().collect()
    }

    /// Cuts the stream connection that carries `tunnel_id`, as a network failure would (the
    /// director learns it from the closed socket). Returns false if the tunnel is unknown,
    /// persistent, or on UDP (which has no connection to cut). For tests and operators.
    pub fn cut_connection(&self, tunnel_id: u64) -> bool {
        let core = lock(&self.inner.shared.state);
        let connection = core
            .director
            .tunnels()
            .find(|t| t.tunnel_id == tunnel_id)
            .and_then(|t| t.connection);
        match connection.and_then(|c| core.routes.get(&c)) {
            Some(Route::Stream { sock, .. }) => sock.shutdown(Shutdown::Both).is_ok(),
            _ => false,
        }
    }

    /// Closes every tunnel with reason Shutdown (`director.shutdown`), sends the release
    /// notifications, closes every connection and joins every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut core = lock(&inner.shared.state);
            let now = Instant::now();
            core.director.shutdown(now);
            core.drain(now);
            core.stopped = true;
            for route in core.routes.values() {
                if let Route::Stream { tx, sock } = route {
                    if tx.try_send(Outgoing::Close).is_err() {
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                }
            }
            inner.shared.timer.notify_all();
        }
        // Wake the acceptors with a connection of our own.
        for addr in self.addrs.tcp.iter().chain(&self.addrs.tls) {
            let _ = TcpStream::connect_timeout(&reachable(*addr), Duration::from_millis(200));
        }
        let deadline = Instant::now() + FLUSH_GRACE;
        while inner.stream_count.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        for sock in lock(&inner.streams).values() {
            let _ = sock.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *lock(&inner.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
struct ServerInner {
    shared: Shared<ServerCore>,
    counters: Arc<ServerCounters>,
    /// Every open stream socket, so that shutdown can unblock its threads.
    streams: Mutex<HashMap<u64, TcpStream>>,
    /// Connection threads, pruned as they finish.
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
    stream_count: AtomicUsize,
    next_stream: AtomicU64,
    tls: Option<Arc<rustls::ServerConfig>>,
    pending_timeout: Duration,
    max_streams: usize,
    queue_len: usize,
}

/// The director and the routes of its connections.
#[derive(Debug)]
struct ServerCore {
    director: SessionDirector,
    /// Keyed by handles the server hands out itself, so a fast unkeyed hash will do.
    routes: FxHashMap<ConnectionHandle, Route>,
    udp_peers: UdpPeers,
    next_handle: u64,
    buf: Vec<u8>,
    stopped: bool,
    armed: Option<Instant>,
    counters: Arc<ServerCounters>,
}

/// How envelopes reach a connection.
#[derive(Debug)]
enum Route {
    Stream {
        tx: SyncSender<Outgoing>,
        sock: TcpStream,
    },
    Udp {
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
    },
}

#[derive(Debug)]
enum Outgoing {
    Envelope(Vec<u8>),
    Close,
}

impl Outgoing {
    /// The envelope, or the other work as it is (for [`WriteBatch::gather`]).
    fn into_envelope(self) -> Result<Vec<u8>, Self> {
        match self {
            Self::Envelope(bytes) => Ok(bytes),
            other => Err(other),
        }
    }
}

impl ServerCore {
    /// Drains the director after an input at `now`: transmits to their connections, then
    /// events.
    fn drain(&mut self, now: Instant) {
        while let Some(t) = self.director.poll_transmit(now, &mut self.buf) {
            match self.routes.get(&t.connection) {
                Some(Route::Stream { tx, .. }) => {
                    let frame = std::mem::take(&mut self.buf);
                    if let Err(TrySendError::Full(_)) = tx.try_send(Outgoing::Envelope(frame)) {
                        bump(&self.counters.stream_queue_full);
                    }
                }
                Some(Route::Udp { socket, peer }) if socket.send_to(&self.buf, *peer).is_err() => {
                    bump(&self.counters.udp_send_errors);
                }
                _ => {}
            }
        }
        while let Some(event) = self.director.poll_event() {
            tracing::debug!(?event, "director");
            if let DirectorEvent::CloseConnection { connection } = event {
                match self.routes.remove(&connection) {
                    Some(Route::Stream { tx, sock }) if tx.try_send(Outgoing::Close).is_err() => {
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                    Some(Route::Udp { socket, peer }) => {
                        if let Ok(local) = socket.local_addr() {
                            self.udp_peers.remove(local, peer);
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
        self.director.poll_timeout()
    }

    fn on_timeout(&mut self, now: Instant) {
        self.director.handle_timeout(now);
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
    fn accept(self: Arc<Self>, listener: TcpListener, transport: Transport) {
        for sock in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let Ok(sock) = sock else {
                // Out of descriptors or an aborted connection: let the system catch up.
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            if self.stream_count.load(Ordering::SeqCst) >= self.max_streams {
                bump(&self.counters.streams_refused);
                continue;
            }
            bump(&self.counters.streams_accepted);
            self.stream_count.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            let spawned = thread::Builder::new()
                .name("tscf-conn".to_owned())
                .stack_size(CONNECTION_STACK)
                .spawn(move || {
                    me.run_connection(sock, transport);
                    me.stream_count.fetch_sub(1, Ordering::SeqCst);
                });
            let mut threads = lock(&self.threads);
            threads.retain(|t| !t.is_finished());
            match spawned {
                Ok(t) => threads.push(t),
                Err(_) => {
                    self.stream_count.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn run_connection(&self, sock: TcpStream, transport: Transport) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = sock.try_clone() {
            lock(&self.streams).insert(id, clone);
        }
        if let Err(e) = self.serve_stream(sock, transport) {
            tracing::debug!(error = %e, "stream connection ended");
        }
        if let Some(sock) = lock(&self.streams).remove(&id) {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }

    fn serve_stream(&self, mut sock: TcpStream, transport: Transport) -> Result<(), StreamError> {
        let remote = sock.peer_addr()?;
        let _ = sock.set_nodelay(true);
        let mut tls = None;
        let mut verified_identity = false;
        if transport == Transport::TLS {
            let config = self
                .tls
                .clone()
                .ok_or(rustls::Error::General("no TLS".into()))?;
            let mut conn = rustls::Connection::Server(rustls::ServerConnection::new(config)?);
            let deadline = Instant::now() + self.pending_timeout;
            if let Err(e) = stream::handshake(&mut sock, &mut conn, deadline) {
                bump(&self.counters.tls_handshake_failures);
                return Err(e);
            }
            verified_identity = conn.peer_certificates().is_some_and(|c| !c.is_empty());
            tls = Some(conn);
        }
        let (mut reader, writer) = stream::split(sock.try_clone()?, tls)?;
        let (tx, rx) = mpsc::sync_channel(self.queue_len);
        let handle = {
            let mut core = lock(&self.shared.state);
            if core.stopped {
                return Ok(());
            }
            let handle = core.handle();
            core.routes.insert(
                handle,
                Route::Stream {
                    tx,
                    sock: sock.try_clone()?,
                },
            );
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
        let writer_thread = thread::Builder::new()
            .name("tscf-conn-writer".to_owned())
            .stack_size(CONNECTION_STACK)
            .spawn(move || write_stream(writer, rx));
        let result = loop {
            let mut core = None;
            let read = reader.read(|bytes| {
                let core = core.get_or_insert_with(|| lock(&self.shared.state));
                if let Ok(envelope) = Envelope::decode_datagram(bytes) {
                    core.director
                        .handle_envelope(Instant::now(), handle, envelope);
                }
            });
            if let Some(mut core) = core {
                core.drain(Instant::now());
                self.shared.rearm(&mut core);
            }
            match read {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => {
                    if matches!(e, StreamError::Framing(_)) {
                        bump(&self.counters.framing_errors);
                    }
                    break Err(e);
                }
            }
        };
        {
            let mut core = lock(&self.shared.state);
            let now = Instant::now();
            core.director.handle_disconnect(now, handle);
            core.routes.remove(&handle);
            core.drain(now);
            self.shared.rearm(&mut core);
        }
        let _ = sock.shutdown(Shutdown::Both);
        if let Ok(t) = writer_thread {
            let _ = t.join();
        }
        result
    }

    fn run_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let _ = socket.set_read_timeout(Some(UDP_POLL));
        let Ok(local) = socket.local_addr() else {
            return;
        };
        let mut buf = vec![0u8; 65_536];
        let mut answer = Vec::new();
        while !self.stopping.load(Ordering::SeqCst) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let datagram = &buf[..n];
            match udp::demux(datagram, from, &mut answer) {
                Demux::Answer => {
                    bump(&self.counters.stun_answered);
                    if socket.send_to(&answer, from).is_err() {
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

/// A stream connection's writer thread: sends queued envelopes until told to close or until
/// the route is dropped. Envelopes already queued go out together ([`WriteBatch`]).
fn write_stream(mut writer: StreamWriter, rx: Receiver<Outgoing>) {
    let mut batch = WriteBatch::default();
    // Work taken from the queue while batching but not sent with the batch.
    let mut left = None;
    while let Some(out) = left.take().or_else(|| rx.recv().ok()) {
        match out {
            Outgoing::Envelope(first) => {
                let next = || rx.try_recv().ok().map(Outgoing::into_envelope);
                let (bytes, rest) = batch.gather(&first, WRITE_BATCH, next);
                left = rest.map(|r| r.map_or_else(|w| w, Outgoing::Envelope));
                if writer.send(bytes).is_err() {
                    writer.close();
                    return;
                }
            }
            Outgoing::Close => {
                writer.close();
                return;
            }
        }
    }
}

/// Where to connect to reach a listener bound to `addr` (loopback for an unspecified address).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The runtime's own counters of a server, which its threads or tasks bump;
/// [`snapshot`](Self::snapshot) reads them into [`RuntimeCounters`]. Plumbing shared with
/// `tscf-runtime-smol` (this runtime never bumps the QUIC ones).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub streams_accepted: AtomicU64,
    pub streams_refused: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub framing_errors: AtomicU64,
    pub stream_queue_full: AtomicU64,
    pub stun_answered: AtomicU64,
    pub udp_dropped: AtomicU64,
    pub udp_send_errors: AtomicU64,
    pub quic_handshake_failures: AtomicU64,
    pub quic_retries: AtomicU64,
    pub quic_datagrams_sent: AtomicU64,
    pub quic_datagrams_received: AtomicU64,
}

impl ServerCounters {
    /// The counters now; the DTLS ones, which the DTLS endpoints keep, are zero.
    pub fn snapshot(&self) -> RuntimeCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuntimeCounters {
            streams_accepted: get(&self.streams_accepted),
            streams_refused: get(&self.streams_refused),
            tls_handshake_failures: get(&self.tls_handshake_failures),
            framing_errors: get(&self.framing_errors),
            stream_queue_full: get(&self.stream_queue_full),
            stun_answered: get(&self.stun_answered),
            udp_dropped: get(&self.udp_dropped),
            udp_send_errors: get(&self.udp_send_errors),
            quic_handshake_failures: get(&self.quic_handshake_failures),
            quic_retries: get(&self.quic_retries),
            quic_datagrams_sent: get(&self.quic_datagrams_sent),
            quic_datagrams_received: get(&self.quic_datagrams_received),
            ..RuntimeCounters::default()
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
