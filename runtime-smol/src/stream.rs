//! Envelopes over an async byte stream (TCP, or TLS over TCP): one loop per connection reads
//! and writes, so a connection is one task.

use std::io;

use async_channel::{Receiver, Sender, TrySendError};
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tscf_core::wire::DeframeError;

/// Octets read at a time while a connection is quiet: what an idle connection holds.
const READ_SMALL: usize = 2 * 1024;
/// Octets read at a time while reads fill the buffer (a busy connection).
const READ_LARGE: usize = 16 * 1024;

/// What the connection's owner asks the connection task to do.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Write one whole envelope.
    Envelope(Vec<u8>),
    /// Close the connection (with a TLS close_notify).
    Close,
    /// End the connection at once, as a network failure would: no close_notify, nothing more
    /// written.
    Abort,
}

/// A connection task's queue of [`Outgoing`] work. It holds at most `cap` envelopes, but is
/// unbounded underneath: a bounded channel allocates every slot up front (32 KiB for 1,024
/// envelopes), which an idle connection would carry for nothing. Close and Abort are always
/// taken.
#[derive(Clone, Debug)]
pub(crate) struct OutgoingQueue {
    tx: Sender<Outgoing>,
    cap: usize,
}

impl OutgoingQueue {
    /// A queue of at most `cap` envelopes, and the task's end of it.
    pub(crate) fn new(cap: usize) -> (Self, Receiver<Outgoing>) {
        let (tx, rx) = async_channel::unbounded();
        (Self { tx, cap }, rx)
    }

    /// Queues `work`; an envelope is refused with `Full` when `cap` are waiting.
    pub(crate) fn try_send(&self, work: Outgoing) -> Result<(), TrySendError<Outgoing>> {
        if matches!(work, Outgoing::Envelope(_)) && self.tx.len() >= self.cap {
            return Err(TrySendError::Full(work));
        }
        self.tx.try_send(work)
    }

    /// Closes the queue: the task sees the end of it once it has taken what is queued.
    pub(crate) fn close(&self) {
        self.tx.close();
    }
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
    let mut chunk = vec![0u8; READ_SMALL];
    loop {
        // Reading is cancel-safe: a read that loses the race has consumed nothing.
        let step = future::or(async { Step::Read(stream.read(&mut chunk).await) }, async {
            Step::Out(outgoing.recv().await.ok())
        })
        .await;
        match step {
            Step::Read(Ok(0)) => return Ok(()),
            Step::Read(Ok(n)) => {
                on_bytes(&chunk[..n])?;
                // Grow while reads fill the buffer; give it back once they no longer do.
                if n == chunk.len() && chunk.len() < READ_LARGE {
                    chunk.resize(READ_LARGE, 0);
                } else if n < READ_SMALL && chunk.len() > READ_SMALL {
                    chunk = vec![0u8; READ_SMALL];
                }
            }
            Step::Read(Err(e)) => return Err(e.into()),
            Step::Out(Some(Outgoing::Envelope(bytes))) => {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
            }
            Step::Out(Some(Outgoing::Abort)) => {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "cut").into());
            }
            Step::Out(Some(Outgoing::Close) | None) => {
                let _ = stream.close().await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_bounds_envelopes_but_always_takes_close_and_abort() {
        let (queue, rx) = OutgoingQueue::new(2);
        assert!(queue.try_send(Outgoing::Envelope(vec![1])).is_ok());
        assert!(queue.try_send(Outgoing::Envelope(vec![2])).is_ok());
        assert!(matches!(
            queue.try_send(Outgoing::Envelope(vec![3])),
            Err(TrySendError::Full(Outgoing::Envelope(_)))
        ));
        // Room again once the task took one.
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Envelope(b)) if b == [1]));
        assert!(queue.try_send(Outgoing::Envelope(vec![4])).is_ok());
        // A full queue still takes the orders to end the connection.
        assert!(queue.try_send(Outgoing::Abort).is_ok());
        assert!(queue.try_send(Outgoing::Close).is_ok());
        queue.close();
        assert!(queue.try_send(Outgoing::Close).is_err(), "closed");
    }
}
