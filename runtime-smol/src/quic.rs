//! Envelopes over a QUIC connection (quinn), for the server and the client alike.
//!
//! One bidirectional stream, opened by the client, carries control envelopes (and data
//! envelopes that do not fit a datagram) back to back like TCP (`docs/PROTOCOL.md` §2.1). Data
//! envelopes go as QUIC datagrams (RFC 9221) whenever the connection allows one that large;
//! each datagram carries exactly one envelope.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_channel::Receiver;
use async_io::Timer;
use bytes::Bytes;
use futures_lite::future;
use tscf_core::tls::TlsConfigError;
use tscf_core::wire::EnvelopeType;

use crate::stream::{gather, Outgoing, StreamError, WriteBatch, WRITE_BATCH};

/// The ALPN protocol name of tscf over QUIC.
pub(crate) const ALPN: &[u8] = b"tscf";
/// Octets read from the stream at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long closing waits for the peer to acknowledge what the stream still holds.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Application error code of a connection closed by tscf (no error: the tunnel layer says why).
const CLOSE_CODE: u32 = 0;

/// Which end of the connection this is: the client opens the stream, the server accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// A quinn server configuration from a rustls one (ring provider), with ALPN `tscf`.
pub(crate) fn server_config(
    tls: &rustls::ServerConfig,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A quinn client configuration from a rustls one (ring provider), with ALPN `tscf`.
pub(crate) fn client_config(
    tls: &rustls::ClientConfig,
) -> Result<quinn::ClientConfig, TlsConfigError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Sends `envelope` as a QUIC datagram if it is a data envelope and the connection takes a
/// datagram that large now; false if it must go on the stream instead.
pub(crate) fn try_send_datagram(conn: &quinn::Connection, envelope: &[u8]) -> bool {
    let fits = conn
        .max_datagram_size()
        .is_some_and(|max| envelope.len() <= max);
    envelope.first() == Some(&EnvelopeType::DATA.0)
        && fits
        && conn.send_datagram(Bytes::copy_from_slice(envelope)).is_ok()
}

/// Closes `conn` at once (what a network failure or a director's close looks like).
pub(crate) fn close(conn: &quinn::Connection) {
    conn.close(quinn::VarInt::from_u32(CLOSE_CODE), b"closed");
}

/// Runs the tscf stream and datagrams of `conn` until the connection ends, the owner sends
/// [`Outgoing::Close`] or drops its sender, or a callback fails. `on_bytes` gets what the
/// stream carries, `on_datagram` each datagram; both are synchronous (they take the state
/// machine's lock and release it before the next read).
pub(crate) async fn serve(
    conn: &quinn::Connection,
    side: Side,
    outgoing: &Receiver<Outgoing>,
    mut on_bytes: impl FnMut(&[u8]) -> Result<(), StreamError>,
    mut on_datagram: impl FnMut(&[u8]) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    enum Step {
        Opened(Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>),
        Read(Result<Option<usize>, quinn::ReadError>),
        Datagram(Result<Bytes, quinn::ConnectionError>),
        Out(Option<Outgoing>),
    }
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut streams = None;
    if side == Side::Client {
        // Opening a stream costs no round trip; the server sees it with the first envelope.
        streams = Some(conn.open_bi().await.map_err(std::io::Error::from)?);
    }
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut batch = WriteBatch::default();
    // Work taken from the queue while batching but not written with the batch.
    let mut left = None;
    loop {
        // Every branch is cancel-safe: a future that loses the race has consumed nothing.
        let step = if let Some(work) = left.take() {
            Step::Out(Some(work))
        } else {
            let io = async {
                match &mut streams {
                    Some((_, recv)) => Step::Read(recv.read(&mut chunk).await),
                    None => Step::Opened(conn.accept_bi().await),
                }
            };
            let datagram = async { Step::Datagram(conn.read_datagram().await) };
            let out = async { Step::Out(outgoing.recv().await.ok()) };
            future::or(io, future::or(datagram, out)).await
        };
        match step {
            Step::Opened(opened) => {
                let (mut send, recv) = opened.map_err(std::io::Error::from)?;
                while let Some(bytes) = pending.pop_front() {
                    write(&mut send, &bytes).await?;
                }
                streams = Some((send, recv));
            }
            Step::Read(Ok(Some(n))) => on_bytes(&chunk[..n])?,
            Step::Read(Ok(None)) => {
                close(conn);
                return Ok(());
            }
            Step::Read(Err(e)) => return Err(std::io::Error::from(e).into()),
            Step::Datagram(Ok(bytes)) => on_datagram(&bytes)?,
            Step::Datagram(Err(e)) => return Err(std::io::Error::from(e).into()),
            Step::Out(Some(Outgoing::Envelope(first))) => match &mut streams {
                Some((send, _)) => {
                    let (bytes, rest) = gather(&mut batch, &first, outgoing, WRITE_BATCH);
                    left = rest;
                    write(send, bytes).await?;
                }
                None => pending.push_back(first),
            },
            Step::Out(Some(Outgoing::Abort)) => {
                close(conn);
                return Err(
                    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "cut").into(),
                );
            }
            Step::Out(Some(Outgoing::Close) | None) => {
                if let Some((mut send, _)) = streams {
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
                }
                close(conn);
                return Ok(());
            }
        }
    }
}

async fn write(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), StreamError> {
    send.write_all(bytes)
        .await
        .map_err(|e| StreamError::Io(e.into()))
}
