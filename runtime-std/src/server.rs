//! The tunnel server: a [`ServerHost`] behind a mutex, driven by blocking sockets.
//!
//! Threads: one acceptor per TCP or TLS listener, two per stream connection (a reader that
//! feeds the host and a writer that takes what it queued), one per UDP or DTLS listener, and
//! one timer thread.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use tscf_core::io::SocketId;
use tscf_core::server::{LocalAddrs, ServerConfig, ServerEvent, ServerHost, StartError};
use tscf_core::tls::Fingerprint;
use tscf_core::wire::Transport;

use crate::drive::{self, Extra, Shared};
use crate::udp::Udp;
use crate::{net, OS};

type ServerShared = Shared<ServerExtra>;

/// What this runtime adds to a server host: the director's events go to the log.
#[derive(Debug)]
pub(crate) struct ServerExtra;

impl Extra for ServerExtra {
    type Host = ServerHost;

    fn on_event(&mut self, _: &mut ServerHost, event: ServerEvent) {
        if let ServerEvent::Director(event) = event {
            tracing::debug!(?event, "director");
        }
    }
}

/// Starts servers.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds every listener and starts the threads. Refuses open admission on a listener
    /// beyond loopback ([`DirectorConfig::check_listeners`](tscf_core::director::DirectorConfig::check_listeners)),
    /// and QUIC listeners and directors of a cluster ([`StartError::Unsupported`]).
    pub fn start(config: ServerConfig) -> Result<ServerHandle, StartError> {
        if !config.quic.is_empty() {
            return Err(StartError::Unsupported(
                "QUIC listeners (use tscf-runtime-smol)",
            ));
        }
        if config.director.cluster.is_some() || !config.mesh.is_empty() {
            return Err(StartError::Unsupported(
                "a director of a cluster (use tscf-runtime-smol)",
            ));
        }
        let (config, credentials) = config.prepare(OS)?;
        let bind_tcp =
            |addr: &SocketAddr| TcpListener::bind(addr).map_err(|source| bind_error(*addr, source));
        let tcp: Vec<TcpListener> = config.tcp.iter().map(bind_tcp).collect::<Result<_, _>>()?;
        let tls: Vec<TcpListener> = config.tls.iter().map(bind_tcp).collect::<Result<_, _>>()?;
        // The datagram sockets in the order of their ids: UDP listeners, then DTLS ones.
        let datagram: Vec<Arc<Udp>> = config
            .udp
            .iter()
            .chain(&config.dtls)
            .map(|addr| {
                UdpSocket::bind(addr)
                    .and_then(Udp::new)
                    .map(Arc::new)
                    .map_err(|source| bind_error(*addr, source))
            })
            .collect::<Result<_, _>>()?;
        let tcp_addr = |l: &TcpListener| l.local_addr().map_err(StartError::Io);
        let udp_addr = |s: &Arc<Udp>| s.local_addr().map_err(StartError::Io);
        let udp_count = config.udp.len();
        let addrs = LocalAddrs {
            tcp: tcp.iter().map(tcp_addr).collect::<Result<_, _>>()?,
            tls: tls.iter().map(tcp_addr).collect::<Result<_, _>>()?,
            udp: datagram[..udp_count]
                .iter()
                .map(udp_addr)
                .collect::<Result<_, _>>()?,
            dtls: datagram[udp_count..]
                .iter()
                .map(udp_addr)
                .collect::<Result<_, _>>()?,
            quic: Vec::new(),
        };
        let dtls = credentials.as_ref().and_then(|c| c.dtls.as_ref());
        let host = ServerHost::new(config, &addrs, dtls, Instant::now())?;
        let shared = drive::shared(host, ServerExtra);
        let mut handle = ServerHandle {
            shared: shared.clone(),
            addrs,
            fingerprint: credentials.as_ref().map(|c| c.fingerprint),
            threads: Vec::new(),
        };
        let s = shared.clone();
        handle.spawn("tscf-timer", move || drive::run_timer(&s))?;
        let tls_config = credentials.map(|c| c.tls);
        let listeners = tcp.into_iter().map(|l| (l, Transport::TCP, None)).chain(
            tls.into_iter()
                .map(|l| (l, Transport::TLS, tls_config.clone())),
        );
        for (listener, transport, tls) in listeners {
            let s = shared.clone();
            handle.spawn("tscf-accept", move || {
                net::accept(&s, &listener, transport, tls)
            })?;
        }
        for (i, socket) in datagram.into_iter().enumerate() {
            let id = SocketId(i as u32);
            shared.lock().driver.sockets.insert(id, socket.clone());
            let s = shared.clone();
            handle.spawn("tscf-udp", move || net::run_udp(&s, id, &socket))?;
        }
        Ok(handle)
    }
}

fn bind_error(addr: SocketAddr, source: std::io::Error) -> StartError {
    StartError::Bind { addr, source }
}

/// A running server. Dropping it shuts it down like [`shutdown`](Self::shutdown).
pub struct ServerHandle {
    shared: Arc<ServerShared>,
    addrs: LocalAddrs,
    fingerprint: Option<Fingerprint>,
    threads: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The listeners' addresses, with the ports the system chose for port 0.
    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.addrs
    }

    /// The SHA-256 fingerprint of the certificate of the TLS and DTLS listeners (for clients
    /// that pin it).
    pub fn tls_fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// Closes every tunnel with reason Shutdown (the release notifications are sent), waits
    /// up to [`ServerConfig::shutdown_grace`] for the stream connections to write them and
    /// close and for the clients on datagram transports to acknowledge them (they are
    /// retransmitted meanwhile), then stops every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let first = self.shared.drive(|host, _, now| {
            let first = !host.is_stopped();
            host.shutdown(now);
            first
        });
        if !first {
            return;
        }
        let state = self.shared.lock();
        let deadline = Instant::now() + state.host.shutdown_grace();
        let mut state = drive::wait_until(&self.shared, state, deadline, |state| {
            state.host.is_drained()
        });
        drive::stop(&self.shared, &mut state);
        drop(state);
        for addr in self.addrs.tcp.iter().chain(&self.addrs.tls) {
            net::wake_acceptor(*addr);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), StartError> {
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .map_err(StartError::Io)?;
        self.threads.push(thread);
        Ok(())
    }
}

impl std::ops::Deref for ServerHandle {
    type Target = dyn tscf_core::server::ServerControl;

    fn deref(&self) -> &Self::Target {
        &*self.shared
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
