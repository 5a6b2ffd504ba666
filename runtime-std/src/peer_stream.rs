//! Peer streams of a tunnel (`docs/PROTOCOL.md` §7.7): the optional listener, the streams the
//! client asks to open, and one reader thread per stream. The client decides when to open,
//! keep and close them; this module only moves envelopes.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tscf_core::client::{Input, PeerStreamId};

use crate::lock;
use crate::stream::{self, StreamReader, StreamWriter};
use crate::timer::{Shared, Timed};
use crate::tls::{self, ClientTlsConfig, Fingerprint, ServerIdentity, ServerTlsConfig};
use crate::tunnel::ClientCore;

/// How long the listener thread sleeps between looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// Accepted connections still in their handshake (not yet handed to the client), at most;
/// beyond, new ones are closed at once.
const MAX_HANDSHAKING: usize = 16;

/// Whether and how a tunnel listens for peer streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerStreamListen {
    /// No listener (the default): peer tunnels to this client run over UDP only.
    #[default]
    None,
    /// Plain TCP on this address (port 0 picks one).
    Tcp(SocketAddr),
    /// TLS on this address, with a self-signed certificate generated for the tunnel.
    Tls(SocketAddr),
}

/// The peer streams a tunnel holds: `None` while one is being opened.
#[derive(Debug, Default)]
pub(crate) struct PeerStreams {
    streams: HashMap<PeerStreamId, Option<StreamWriter>>,
    next_accepted: u64,
}

impl PeerStreams {
    /// Sends one envelope on `id`; a failed write shows up at its reader.
    pub(crate) fn send(&mut self, id: PeerStreamId, envelope: &[u8]) {
        if let Some(Some(writer)) = self.streams.get_mut(&id) {
            let _ = writer.send(envelope);
        }
    }

    /// Closes and forgets `id`; true when it was held.
    pub(crate) fn close(&mut self, id: PeerStreamId) -> bool {
        match self.streams.remove(&id) {
            Some(writer) => {
                if let Some(mut w) = writer {
                    w.close();
                }
                true
            }
            None => false,
        }
    }

    /// Every stream held.
    pub(crate) fn ids(&self) -> Vec<PeerStreamId> {
        self.streams.keys().copied().collect()
    }
}

/// A bound listener, and what to announce for it.
pub(crate) struct Listener {
    pub(crate) socket: TcpListener,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) fingerprint: Option<Fingerprint>,
}

/// Binds the listener `listen` asks for.
pub(crate) fn bind(listen: PeerStreamListen) -> Result<Option<Listener>, crate::ConnectError> {
    let (addr, with_tls) = match listen {
        PeerStreamListen::None => return Ok(None),
        PeerStreamListen::Tcp(addr) => (addr, false),
        PeerStreamListen::Tls(addr) => (addr, true),
    };
    let socket = TcpListener::bind(addr)?;
    socket.set_nonblocking(true)?;
    let (tls, fingerprint) = if with_tls {
        let (config, fingerprint) = tls::server_config(
            &ServerTlsConfig {
                identity: ServerIdentity::SelfSigned {
                    names: vec!["tscf-peer".to_owned()],
                },
                client_ca: None,
            },
            crate::OS,
        )?;
        (Some(config), Some(fingerprint))
    } else {
        (None, None)
    };
    Ok(Some(Listener {
        socket,
        tls,
        fingerprint,
    }))
}

/// The listener thread: hands each connection to a thread of its own.
pub(crate) fn run_listener(
    shared: &Arc<Shared<ClientCore>>,
    listener: &Listener,
    stop: &AtomicBool,
    timeout: Duration,
) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.socket.accept() {
            Ok(_) if handshaking.load(Ordering::SeqCst) >= MAX_HANDSHAKING => {}
            Ok((sock, remote)) => {
                let s = shared.clone();
                let tls = listener.tls.clone();
                let count = handshaking.clone();
                count.fetch_add(1, Ordering::SeqCst);
                let spawned = thread::Builder::new()
                    .name("tscf-peer-stream".to_owned())
                    .spawn(move || accepted(&s, sock, remote, tls, timeout, &count));
                if spawned.is_err() {
                    handshaking.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

fn accepted(
    shared: &Shared<ClientCore>,
    mut sock: TcpStream,
    remote: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    timeout: Duration,
    handshaking: &AtomicUsize,
) {
    let ready = (|| -> Result<_, stream::StreamError> {
        sock.set_nonblocking(false)?;
        let _ = sock.set_nodelay(true);
        let conn = match tls {
            Some(config) => {
                let mut conn = rustls::Connection::Server(rustls::ServerConnection::new(config)?);
                stream::handshake(&mut sock, &mut conn, Instant::now() + timeout)?;
                Some(conn)
            }
            None => None,
        };
        Ok(stream::split(sock, conn)?)
    })();
    handshaking.fetch_sub(1, Ordering::SeqCst);
    let Ok((reader, mut writer)) = ready else {
        return;
    };
    let id = {
        let mut core = lock(&shared.state);
        if core.stopped() {
            writer.close();
            return;
        }
        let streams = &mut core.peer_streams;
        streams.next_accepted = (streams.next_accepted + 1) & !PeerStreamId::CLIENT_CHOSEN;
        let id = PeerStreamId(streams.next_accepted);
        streams.streams.insert(id, Some(writer));
        core.client.handle_input(
            Instant::now(),
            Input::PeerStreamAccepted { stream: id, remote },
        );
        core.drain();
        shared.rearm(&mut core);
        id
    };
    read_loop(shared, id, reader);
}

/// Opens the stream the client asked for, in a thread of its own.
pub(crate) fn open(
    core: &mut ClientCore,
    shared: Arc<Shared<ClientCore>>,
    id: PeerStreamId,
    addr: SocketAddr,
    fingerprint: Option<[u8; 32]>,
    timeout: Duration,
) {
    let tls = match fingerprint {
        None => Ok(None),
        Some(fp) => tls::client_config(&ClientTlsConfig::pinned(Fingerprint(fp)), crate::OS)
            .map(|config| Some((config, ServerName::IpAddress(addr.ip().into())))),
    };
    core.peer_streams.streams.insert(id, None);
    let spawned = match tls {
        Ok(tls) => thread::Builder::new()
            .name("tscf-peer-stream".to_owned())
            .spawn(move || opened(&shared, id, addr, tls, timeout))
            .is_ok(),
        Err(_) => false,
    };
    if !spawned {
        core.peer_streams.streams.remove(&id);
        core.client
            .handle_input(Instant::now(), Input::PeerStreamFailed(id));
    }
}

fn opened(
    shared: &Shared<ClientCore>,
    id: PeerStreamId,
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
) {
    let result = crate::tunnel::open_stream(addr, tls, timeout);
    let reader = {
        let mut core = lock(&shared.state);
        let now = Instant::now();
        let wanted = matches!(core.peer_streams.streams.get(&id), Some(None));
        let reader = match result {
            Ok((reader, mut writer)) if !wanted || core.stopped() => {
                writer.close();
                drop(reader);
                None
            }
            Ok((reader, writer)) => {
                core.peer_streams.streams.insert(id, Some(writer));
                core.client.handle_input(now, Input::PeerStreamOpen(id));
                Some(reader)
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "peer stream failed");
                if wanted {
                    core.peer_streams.streams.remove(&id);
                    core.client.handle_input(now, Input::PeerStreamFailed(id));
                }
                None
            }
        };
        core.drain();
        shared.rearm(&mut core);
        reader
    };
    if let Some(reader) = reader {
        read_loop(shared, id, reader);
    }
}

/// Feeds the stream's envelopes to the client until it ends; reports the end unless the
/// client closed it.
fn read_loop(shared: &Shared<ClientCore>, id: PeerStreamId, mut reader: StreamReader) {
    loop {
        let mut guard = None;
        let mut stale = false;
        let read = reader.read(|envelope| {
            let core = guard.get_or_insert_with(|| lock(&shared.state));
            if core.peer_streams.streams.contains_key(&id) {
                core.client.handle_input(
                    Instant::now(),
                    Input::PeerStreamEnvelope {
                        stream: id,
                        envelope,
                    },
                );
            } else {
                stale = true;
            }
        });
        if let Some(mut core) = guard {
            core.drain();
            shared.rearm(&mut core);
        }
        if stale || !matches!(read, Ok(true)) {
            break;
        }
    }
    let mut core = lock(&shared.state);
    if core.peer_streams.close(id) && !core.stopped() {
        core.client
            .handle_input(Instant::now(), Input::PeerStreamLost(id));
        core.drain();
        shared.rearm(&mut core);
    }
}
