//! Envelopes over an async byte stream (TCP, or TLS over TCP): one loop per connection reads
//! and writes, so a connection is one task.

use std::io;

use async_channel::Receiver;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tscf_core::wire::DeframeError;

/// Octets read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What the connection's owner asks the connection task to do.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Write one whole envelope.
    Envelope(Vec<u8>),
    /// Close the connection (with a TLS close_notify).
    Close,
}

/// Why a stream ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("lost framing: {0}")]
    Framing(#[from] DeframeError),
    /// The owner moved on to another transport.
    #[error("stale transport")]
    Stale,
}

/// Reads bytes from `stream` into `on_bytes` and writes what `outgoing` carries, until the
/// peer closes, `on_bytes` fails, or the owner sends [`Outgoing::Close`] or drops its sender.
/// `on_bytes` is synchronous: it takes the state machine's lock and releases it before the
/// next read.
pub(crate) async fn serve<S>(
    mut stream: S,
    outgoing: &Receiver<Outgoing>,
    mut on_bytes: impl FnMut(&[u8]) -> Result<(), StreamError>,
) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    enum Step {
        Read(io::Result<usize>),
        Out(Option<Outgoing>),
    }
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        // Reading is cancel-safe: a read that loses the race has consumed nothing.
        let step = future::or(async { Step::Read(stream.read(&mut chunk).await) }, async {
            Step::Out(outgoing.recv().await.ok())
        })
        .await;
        match step {
            Step::Read(Ok(0)) => return Ok(()),
            Step::Read(Ok(n)) => on_bytes(&chunk[..n])?,
            Step::Read(Err(e)) => return Err(e.into()),
            Step::Out(Some(Outgoing::Envelope(bytes))) => {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
            }
            Step::Out(Some(Outgoing::Close) | None) => {
                let _ = stream.close().await;
                return Ok(());
            }
        }
    }
}
