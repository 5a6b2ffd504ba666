//! The tunnel server: a [`ServerHost`] behind a lock held only for its synchronous calls,
//! driven by smol tasks.
//!
//! Tasks: one acceptor per TCP, TLS, QUIC or mesh listener, one per stream or QUIC connection
//! (it handshakes, then reads and writes), one per UDP or DTLS listener, one timer task, and
//! in a cluster one registry task (`cluster.rs`).
//! quinn runs each QUIC endpoint's own driver task.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use async_io::Async;
use smol::Task;
#[cfg(not(feature = "cluster"))]
use tscf_core::cluster::RegistryResponse;
#[cfg(feature = "cluster")]
use tscf_core::io::ClientTls;
use tscf_core::io::SocketId;
use tscf_core::server::{LocalAddrs, ServerConfig, ServerEvent, ServerHost, StartError};
use tscf_core::tls::Fingerprint;
use tscf_core::wire::Transport;

#[cfg(feature = "cluster")]
use crate::cluster::{self, ClusterEndpoints};
use crate::drive::{self, Extra, Io, Shared};
use crate::{net, quic, OS};

type ServerShared = Shared<ServerExtra>;

/// What this runtime adds to a server host: the director's events go to the log, its
/// registry requests to the registry task.
#[derive(Debug)]
pub(crate) struct ServerExtra {
    /// The queue to the registry task, in a cluster.
    #[cfg(feature = "cluster")]
    registry: Option<async_channel::Sender<cluster::Queued>>,
}

impl Extra for ServerExtra {
    type Host = ServerHost;

    fn on_event(io: &mut Io<Self>, host: &mut ServerHost, now: Instant, event: ServerEvent) {
        match event {
            ServerEvent::Director(event) => tracing::debug!(?event, "director"),
            #[cfg(feature = "cluster")]
            ServerEvent::Registry { id, request } => {
                cluster::submit(io.extra.registry.as_ref(), host, now, id, request);
            }
            #[cfg(not(feature = "cluster"))]
            ServerEvent::Registry { id, .. } => {
                let refused = RegistryResponse::Failed("built without the cluster feature".into());
                host.handle_registry(now, id, refused);
            }
            _ => {}
        }
        let _ = io;
    }
}

/// What [`Server::start_cluster`] adds; nothing in a build without the `cluster` feature.
#[cfg(not(feature = "cluster"))]
type ClusterEndpoints = std::convert::Infallible;

/// Starts servers.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds every listener and starts the tasks on smol's global executor. Refuses open
    /// admission on a listener beyond loopback, like `tscf_runtime_std::Server::start`.
    ///
    /// A director of a cluster ([`DirectorConfig::cluster`](tscf_core::director::DirectorConfig::cluster))
    /// started here has no registry: each of its requests fails at once. Start it with
    /// [`start_cluster`](Self::start_cluster).
    pub async fn start(config: ServerConfig) -> Result<ServerHandle, StartError> {
        Self::launch(config, None).await
    }

    /// Like [`start`](Self::start), and runs what a director of a cluster needs beside: the
    /// registry task and the mesh listeners ([`ServerConfig::mesh`], TLS with a client
    /// certificate of the cluster required); links to the other directors are dialed with
    /// `cluster.mesh_tls`.
    #[cfg(feature = "cluster")]
    pub async fn start_cluster(
        mut config: ServerConfig,
        cluster: ClusterEndpoints,
    ) -> Result<ServerHandle, StartError> {
        // The name is the other director's, set for each link the host dials.
        let placeholder = rustls::pki_types::ServerName::try_from("tscf-mesh").map_err(|_| {
            StartError::Tls(tscf_core::tls::TlsConfigError::ServerName(
                "tscf-mesh".into(),
            ))
        })?;
        config.mesh_client = Some(ClientTls {
            config: cluster.mesh_tls.client.clone(),
            name: placeholder,
        });
        Self::launch(config, Some(cluster)).await
    }

    async fn launch(
        config: ServerConfig,
        cluster: Option<ClusterEndpoints>,
    ) -> Result<ServerHandle, StartError> {
        if cluster.is_none() && !config.mesh.is_empty() {
            return Err(StartError::Unsupported(
                "mesh listeners without the cluster's TLS (Server::start_cluster)",
            ));
        }
        let (config, credentials) = config.prepare(OS)?;
        let bind_error = |addr: SocketAddr| move |source| StartError::Bind { addr, source };
        let stream_listeners = |addrs: &[SocketAddr]| -> Result<Vec<_>, StartError> {
            addrs
                .iter()
                .map(|addr| Async::<TcpListener>::bind(*addr).map_err(bind_error(*addr)))
                .collect()
        };
        let tcp = stream_listeners(&config.tcp)?;
        let tls = stream_listeners(&config.tls)?;
        let mesh = stream_listeners(&config.mesh)?;
        let mesh_addrs = mesh
            .iter()
            .map(|l| l.get_ref().local_addr().map_err(StartError::Io))
            .collect::<Result<Vec<_>, _>>()?;
        // The datagram sockets in the order of their ids: UDP listeners, then DTLS ones.
        let datagram: Vec<Arc<Async<UdpSocket>>> = config
            .udp
            .iter()
            .chain(&config.dtls)
            .map(|addr| {
                Async::<UdpSocket>::bind(*addr)
                    .map(Arc::new)
                    .map_err(bind_error(*addr))
            })
            .collect::<Result<_, _>>()?;
        let quic_config = match (&credentials, config.quic.is_empty()) {
            (Some(c), false) => Some(quic::server_config(
                rustls::ServerConfig::clone(&c.tls),
                quic::ALPN,
                &config.quic_limits,
            )?),
            _ => None,
        };
        let quic: Vec<quinn::Endpoint> = config
            .quic
            .iter()
            .filter_map(|addr| Some((addr, quic_config.clone()?)))
            .map(|(addr, c)| quinn::Endpoint::server(c, *addr).map_err(bind_error(*addr)))
            .collect::<Result<_, _>>()?;
        let local = |s: std::io::Result<SocketAddr>| s.map_err(StartError::Io);
        let udp_count = config.udp.len();
        let addrs = LocalAddrs {
            tcp: tcp
                .iter()
                .map(|l| local(l.get_ref().local_addr()))
                .collect::<Result<_, _>>()?,
            tls: tls
                .iter()
                .map(|l| local(l.get_ref().local_addr()))
                .collect::<Result<_, _>>()?,
            udp: datagram[..udp_count]
                .iter()
                .map(|s| local(s.get_ref().local_addr()))
                .collect::<Result<_, _>>()?,
            dtls: datagram[udp_count..]
                .iter()
                .map(|s| local(s.get_ref().local_addr()))
                .collect::<Result<_, _>>()?,
            quic: quic
                .iter()
                .map(|e| local(e.local_addr()))
                .collect::<Result<_, _>>()?,
        };
        let dtls = credentials.as_ref().and_then(|c| c.dtls.as_ref());
        let host = ServerHost::new(config, &addrs, dtls, Instant::now())?;
        #[cfg(feature = "cluster")]
        let (registry, mesh_tls) = match cluster {
            Some(c) => {
                let (tx, rx) = cluster::queue(c.registry_queue);
                (Some((tx, rx, c.registry)), Some(c.mesh_tls.server))
            }
            None => (None, None),
        };
        #[cfg(not(feature = "cluster"))]
        let mesh_tls: Option<Arc<rustls::ServerConfig>> = cluster.map(|never| match never {});
        let extra = ServerExtra {
            #[cfg(feature = "cluster")]
            registry: registry.as_ref().map(|(tx, _, _)| tx.clone()),
        };
        let shared = drive::shared(host, extra);
        let mut tasks = Vec::new();
        let s = shared.clone();
        tasks.push(smol::spawn(async move { drive::run_timer(&s).await }));
        #[cfg(feature = "cluster")]
        if let Some((_, rx, registry)) = registry {
            let s = shared.clone();
            tasks.push(smol::spawn(cluster::run_registry(s, rx, registry)));
        }
        for listener in mesh {
            let admit = |host: &mut ServerHost, now, remote| host.accept_mesh(now, remote);
            tasks.push(smol::spawn(net::accept_with(
                shared.clone(),
                listener,
                mesh_tls.clone(),
                admit,
            )));
        }
        let tls_config = credentials.as_ref().map(|c| c.tls.clone());
        let listeners = tcp.into_iter().map(|l| (l, Transport::TCP, None)).chain(
            tls.into_iter()
                .map(|l| (l, Transport::TLS, tls_config.clone())),
        );
        for (listener, transport, tls) in listeners {
            tasks.push(smol::spawn(net::accept(
                shared.clone(),
                listener,
                transport,
                tls,
            )));
        }
        for endpoint in &quic {
            tasks.push(smol::spawn(quic::accept(shared.clone(), endpoint.clone())));
        }
        {
            let mut state = shared.lock();
            for (i, socket) in datagram.into_iter().enumerate() {
                state
                    .driver
                    .add_socket(SocketId(i as u32), socket)
                    .map_err(StartError::Io)?;
            }
        }
        // What the host queued while it was made (a director of a cluster's first registry
        // requests) goes out now, not at its first input.
        shared.drive(|_, _, _| ());
        Ok(ServerHandle {
            shared,
            addrs,
            mesh_addrs,
            fingerprint: credentials.map(|c| c.fingerprint),
            tasks,
            quic,
        })
    }
}

/// A running server. Dropping it stops it like [`shutdown`](Self::shutdown), without waiting
/// for the last envelopes to be written or the release notifications to be acknowledged.
pub struct ServerHandle {
    shared: Arc<ServerShared>,
    addrs: LocalAddrs,
    mesh_addrs: Vec<SocketAddr>,
    fingerprint: Option<Fingerprint>,
    tasks: Vec<Task<()>>,
    quic: Vec<quinn::Endpoint>,
}

impl ServerHandle {
    /// The listeners' addresses, with the ports the system chose for port 0.
    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.addrs
    }

    /// The mesh listeners' addresses (a director of a cluster), ports resolved.
    pub fn mesh_addrs(&self) -> &[SocketAddr] {
        &self.mesh_addrs
    }

    /// The SHA-256 fingerprint of the certificate, which the TLS, QUIC and DTLS listeners all
    /// present (for clients that pin it).
    pub fn tls_fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// Closes every tunnel with reason Shutdown (the release notifications are sent), waits
    /// up to [`ServerConfig::shutdown_grace`] for the stream connections to write them and
    /// close and for the clients on datagram transports to acknowledge them (they are
    /// retransmitted meanwhile), then stops every task.
    pub async fn shutdown(mut self) {
        if !self.begin_shutdown() {
            return;
        }
        let deadline = Instant::now() + self.shared.lock().host.shutdown_grace();
        drive::wait_until(&self.shared, deadline, |state| state.host.is_drained()).await;
        self.stop();
        for task in self.tasks.drain(..) {
            task.cancel().await;
        }
    }

    /// Shuts the director down; false if that was done already.
    fn begin_shutdown(&self) -> bool {
        self.shared.drive(|host, _, now| {
            let first = !host.is_stopped();
            host.shutdown(now);
            first
        })
    }

    fn stop(&mut self) {
        let mut state = self.shared.lock();
        drive::stop(&self.shared, &mut state);
        drop(state);
        for endpoint in self.quic.drain(..) {
            let shutdown = tscf_core::io::CloseReason::Shutdown.quic_code();
            endpoint.close(quinn::VarInt::from_u32(shutdown), b"shutdown");
        }
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
        self.begin_shutdown();
        self.stop();
    }
}
