//! QUIC (quinn): the server's QUIC listeners and a client's QUIC transport, both a stream of
//! the host, and a client's QUIC peer sessions on its peer socket.
//!
//! A QUIC transport is one connection (ALPN `tscf`): one bidirectional stream, opened by the
//! client, carries what the host queues for the stream (control envelopes back to back, as on
//! TCP, `docs/PROTOCOL.md` §2.1), and each QUIC datagram (RFC 9221) one data envelope the host
//! sent as [`Transmit::QuicDatagram`](tscf_core::io::Transmit::QuicDatagram).

use std::fmt;
use std::future::IntoFuture;
use std::io::{self};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::Timer;
use bytes::Bytes;
use futures_lite::future;
use rustls::pki_types::{CertificateDer, ServerName};
use tscf_core::io::{
    ClientTls, CloseReason, Connect, Host, Input, QuicLimits, Security, Sent, StreamError, StreamId,
};
use tscf_core::server::{QuicAdmission, ServerHost};
use tscf_core::tls::TlsConfigError;

use crate::drive::{Extra, Io, Shared, Slot};
use crate::net::{self, Next};

/// The ALPN protocol name of tscf over QUIC.
pub(crate) const ALPN: &[u8] = b"tscf";
/// QUIC datagrams handed to the host under one lock, at most.
const DATAGRAM_BATCH: usize = 64;
/// Octets read from a stream at a time.
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// How long closing waits for the peer to acknowledge what the stream still holds.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A quinn server configuration from a rustls one (ring provider), with ALPN `alpn` and the
/// transport limits `limits`.
pub(crate) fn server_config(
    mut tls: rustls::ServerConfig,
    alpn: &[u8],
    limits: &QuicLimits,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(
        limits,
        QuicLimits::CLIENT_STREAMS,
    )));
    Ok(config)
}

/// A quinn client configuration from a rustls one (ring provider), with ALPN `alpn` and the
/// transport limits `limits`.
pub(crate) fn client_config(
    tls: &rustls::ClientConfig,
    alpn: &[u8],
    limits: &QuicLimits,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits, 0)));
    Ok(config)
}

/// The transport parameters of `limits`, letting the other side open `streams`
/// bidirectional streams and no unidirectional one.
fn transport_config(limits: &QuicLimits, streams: u32) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(limits.stream_window.into())
        .receive_window(limits.connection_window.into())
        .datagram_receive_buffer_size(Some(limits.datagram_buffer as usize))
        .send_window(limits.send_window.into())
        .keep_alive_interval(Some(limits.keep_alive))
        .max_idle_timeout(limits.idle_timeout.try_into().ok());
    transport
}

pub(crate) fn tls_error(e: impl fmt::Display) -> TlsConfigError {
    TlsConfigError::Rustls(rustls::Error::General(e.to_string()))
}

/// Sends `envelope` as a QUIC datagram if the connection takes one that large now; false if
/// it must go on the stream instead.
pub(crate) fn try_send_datagram(conn: &quinn::Connection, envelope: &[u8]) -> bool {
    let fits = conn
        .max_datagram_size()
        .is_some_and(|max| envelope.len() <= max);
    fits && conn.send_datagram(Bytes::copy_from_slice(envelope)).is_ok()
}

/// Closes `conn` at once (what a network failure or a host's close looks like), with
/// `reason`'s application error code (`docs/PROTOCOL.md` §2.7).
pub(crate) fn close(conn: &quinn::Connection, reason: CloseReason) {
    let text: &[u8] = match reason {
        CloseReason::ProtocolError => b"protocol error",
        CloseReason::Shutdown => b"shutdown",
        CloseReason::Reclaimed => b"reclaimed",
        _ => b"closed",
    };
    conn.close(quinn::VarInt::from_u32(reason.quic_code()), text);
}

/// A QUIC listener's task: each new connection is admitted, retried or refused as the host
/// says, and an admitted one gets a task of its own.
pub(crate) async fn accept<X>(shared: Arc<Shared<X>>, endpoint: quinn::Endpoint)
where
    X: Extra<Host = ServerHost>,
{
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let admission = shared.drive(|host, io, now| {
            if io.stopped {
                return QuicAdmission::Refuse;
            }
            let admission = host.accept_quic(now, remote, validated);
            if let QuicAdmission::Accept(stream) = admission {
                io.streams.insert(stream, Slot::default());
            }
            admission
        });
        match admission {
            QuicAdmission::Accept(stream) => {
                let shared = shared.clone();
                smol::spawn(async move {
                    let conn = net::abortable(&shared, stream, incoming.into_future()).await;
                    let error = match conn {
                        Some(Ok(conn)) => {
                            let verified = conn
                                .peer_identity()
                                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                                .is_some_and(|chain| !chain.is_empty());
                            serve(&shared, stream, conn, false, verified).await
                        }
                        Some(Err(e)) => net::failed(StreamError::Handshake, e),
                        None => net::failed(StreamError::Handshake, "cut"),
                    };
                    net::closed(&shared, stream, error);
                })
                .detach();
            }
            QuicAdmission::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            QuicAdmission::Refuse => incoming.refuse(),
        }
    }
}

/// A QUIC transport the host asked for: connects from an endpoint of its own (a new port per
/// attempt) within `timeout`, then runs it.
pub(crate) async fn connect<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    to: SocketAddr,
    (ClientTls { config: tls, name }, limits): (ClientTls, QuicLimits),
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let error = async {
        let config = match client_config(&tls, ALPN, &limits) {
            Ok(config) => config,
            Err(e) => return net::failed(StreamError::Connect, e),
        };
        let endpoint = match quinn::Endpoint::client(tscf_core::tunnel::unspecified_for(to)) {
            Ok(endpoint) => endpoint,
            Err(e) => return net::failed(StreamError::Connect, e),
        };
        let name = match &name {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            _ => to.ip().to_string(),
        };
        let connecting = match endpoint.connect_with(config, to, &name) {
            Ok(connecting) => connecting,
            Err(e) => return net::failed(StreamError::Connect, e),
        };
        let handshake = net::bounded(deadline, async {
            connecting.await.map_err(io::Error::from)
        });
        match net::abortable(shared, stream, handshake).await {
            Some(Ok(conn)) => serve(shared, stream, conn, true, false).await,
            Some(Err(e)) => net::failed(StreamError::Handshake, e),
            None => net::failed(StreamError::Handshake, "cut"),
        }
    }
    .await;
    net::closed(shared, stream, error);
}

/// Runs an established QUIC transport: the stream (opened here on the client's side, accepted
/// on the server's) and the datagrams, until either side closes it.
async fn serve<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    conn: quinn::Connection,
    client: bool,
    verified_identity: bool,
) -> net::Ended {
    let wake = {
        let mut state = shared.lock();
        let slot = state.driver.streams.get_mut(&stream)?;
        slot.quic = Some(conn.clone());
        slot.wake.clone()
    };
    net::opened(shared, stream, verified_identity);
    // Opening a stream costs no round trip; the server sees it with the first bytes.
    let streams = if client {
        net::abortable(shared, stream, conn.open_bi()).await
    } else {
        net::abortable(shared, stream, conn.accept_bi()).await
    };
    let Some(Ok((mut send, mut recv))) = streams else {
        close(&conn, reason_of(shared, stream));
        return net::failed(StreamError::Io, "no stream");
    };
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    let mut datagrams: Vec<Bytes> = Vec::new();
    // Listening before looking at what the host asked, so that no wake-up is missed; a new
    // listener (and a look) only after this one fired.
    let mut woken = wake.listen();
    let mut look = true;
    let error = loop {
        if look {
            look = false;
            match net::next(shared, stream, &mut out) {
                Next::Abort => break net::failed(StreamError::Io, "cut"),
                Next::Close => {
                    // Let the peer read what the stream still holds before the close.
                    if send.finish().is_ok() {
                        let stopped = send.stopped();
                        future::or(
                            async {
                                let _ = stopped.await;
                            },
                            async {
                                Timer::after(CLOSE_GRACE).await;
                            },
                        )
                        .await;
                    }
                    break None;
                }
                Next::Write => match net::abortable(shared, stream, send.write_all(&out)).await {
                    Some(Ok(())) => {
                        look = true;
                        continue;
                    }
                    Some(Err(e)) => break net::failed(StreamError::Io, e),
                    None => break net::failed(StreamError::Io, "cut"),
                },
                Next::Idle => {}
            }
        }
        enum Step {
            Read(Result<Option<usize>, quinn::ReadError>),
            Datagram(Result<Bytes, quinn::ConnectionError>),
            Woken,
        }
        let read = async { Step::Read(recv.read(&mut chunk).await) };
        let datagram = async { Step::Datagram(conn.read_datagram().await) };
        let step = future::or(
            read,
            future::or(datagram, async {
                (&mut woken).await;
                Step::Woken
            }),
        )
        .await;
        match step {
            Step::Read(Ok(Some(n))) => {
                let data = &chunk[..n];
                shared.drive(|host, _, now| {
                    host.handle_input(now, Input::StreamData { stream, data })
                });
            }
            Step::Datagram(Ok(first)) => {
                // The datagrams already there go to the host under one lock.
                datagrams.push(first);
                while datagrams.len() < DATAGRAM_BATCH {
                    match future::poll_once(conn.read_datagram()).await {
                        Some(Ok(more)) => datagrams.push(more),
                        _ => break,
                    }
                }
                shared.drive(|host, _, now| {
                    for data in &datagrams {
                        host.handle_input(now, Input::StreamDatagram { stream, data });
                    }
                });
                datagrams.clear();
            }
            Step::Woken => {
                woken = wake.listen();
                look = true;
            }
            Step::Read(Ok(None)) => break None,
            Step::Read(Err(e)) => break net::failed(StreamError::Io, e),
            Step::Datagram(Err(e)) => break net::failed(StreamError::Io, e),
        }
    };
    close(&conn, reason_of(shared, stream));
    error
}

/// Why `stream` closes: the host's reason, or the runtime's (one that stops is shutting down).
fn reason_of<X: Extra>(shared: &Shared<X>, stream: StreamId) -> CloseReason {
    let state = shared.lock();
    match state.driver.streams.get(&stream) {
        _ if state.driver.stopped => CloseReason::Shutdown,
        Some(slot) => slot.reason,
        None => CloseReason::Closed,
    }
}

impl<X: Extra> Io<X> {
    /// Starts connecting a stream in a task of its own.
    pub(crate) fn connect(&mut self, connect: Connect) -> Result<(), String> {
        let shared = self
            .me
            .upgrade()
            .filter(|_| !self.stopped)
            .ok_or("stopping")?;
        self.streams.insert(connect.stream, Slot::default());
        smol::spawn(async move {
            match connect.security {
                Security::Quic(tls, limits) => {
                    let Connect { stream, to, .. } = connect;
                    self::connect(&shared, stream, to, (tls, limits), connect.timeout).await
                }
                Security::Tcp | Security::Tls(_) => net::connect(&shared, connect).await,
            }
        })
        .detach();
        Ok(())
    }

    /// Sends one data envelope as a QUIC datagram on `stream`'s connection, if it takes one
    /// that large now.
    pub(crate) fn quic_datagram(&mut self, stream: StreamId, bytes: &[u8]) -> Sent {
        match self.streams.get(&stream).and_then(|s| s.quic.as_ref()) {
            Some(conn) if try_send_datagram(conn, bytes) => Sent::Done,
            Some(_) => Sent::NotDatagram,
            None => Sent::Failed,
        }
    }
}
