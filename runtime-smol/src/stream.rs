//! Envelopes over an async byte stream (TCP, or TLS over TCP): one loop per connection reads
//! and writes, so a connection is one task.

use std::io;

use async_channel::{Receiver, Sender, TrySendError};
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tscf_core::wire::DeframeError;
pub(crate) use tscf_runtime_std::batch::{WriteBatch, WRITE_BATCH};

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

impl Outgoing {
    /// The envelope, or the other work as it is (for [`WriteBatch::gather`]).
    fn into_envelope(self) -> Result<Vec<u8>, Self> {
        match self {
            Self::Envelope(bytes) => Ok(bytes),
            other => Err(other),
        }
    }
}

/// The envelope `first` and those queued behind it in `outgoing`, joined while they fit in
/// `bound` octets ([`WriteBatch::gather`]); and what was taken but not joined (an envelope
/// that did not fit, a Close or an Abort), to handle after writing the batch.
pub(crate) fn gather<'a>(
    batch: &'a mut WriteBatch,
    first: &'a [u8],
    outgoing: &Receiver<Outgoing>,
    bound: usize,
) -> (&'a [u8], Option<Outgoing>) {
    let next = || outgoing.try_recv().ok().map(Outgoing::into_envelope);
    let (bytes, rest) = batch.gather(first, bound, next);
    (
        bytes,
        rest.map(|r| r.map_or_else(|w| w, Outgoing::Envelope)),
    )
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
    let mut batch = WriteBatch::default();
    // Work taken from the queue while batching but not written with the batch.
    let mut left = None;
    loop {
        let step = match left.take() {
            Some(work) => Step::Out(Some(work)),
            // Reading is cancel-safe: a read that loses the race has consumed nothing.
            None => {
                future::or(async { Step::Read(stream.read(&mut chunk).await) }, async {
                    Step::Out(outgoing.recv().await.ok())
                })
                .await
            }
        };
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
            Step::Out(Some(Outgoing::Envelope(first))) => {
                let (bytes, rest) = gather(&mut batch, &first, outgoing, WRITE_BATCH);
                left = rest;
                stream.write_all(bytes).await?;
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
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A stream that never has anything to read and records what is written to it.
    #[derive(Default)]
    struct Recorder {
        written: Vec<u8>,
        writes: usize,
        flushes: usize,
        closed: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            self.writes += 1;
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.closed = true;
            Poll::Ready(Ok(()))
        }
    }

    fn envelope(byte: u8, len: usize) -> Outgoing {
        Outgoing::Envelope(vec![byte; len])
    }

    #[test]
    fn a_lone_envelope_goes_as_it_is() {
        let (_queue, rx) = OutgoingQueue::new(8);
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 100];
        let (bytes, left) = gather(&mut batch, &first, &rx, 1000);
        assert!(std::ptr::eq(bytes, first.as_slice()), "not copied");
        assert!(left.is_none());
    }

    #[test]
    fn a_batch_keeps_order_and_stops_at_the_bound() {
        let (queue, rx) = OutgoingQueue::new(8);
        for (byte, len) in [(2, 300), (3, 300), (4, 300), (5, 1)] {
            assert!(queue.try_send(envelope(byte, len)).is_ok());
        }
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 300];
        // Three envelopes make 900 octets; a fourth of 300 would pass the bound.
        let (bytes, left) = gather(&mut batch, &first, &rx, 1000);
        let want: Vec<u8> = [1u8, 2, 3].iter().flat_map(|b| [*b; 300]).collect();
        assert_eq!(bytes, want.as_slice());
        assert!(matches!(left, Some(Outgoing::Envelope(b)) if b == [4; 300]));
        // The rest stays queued for the next batch.
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Envelope(b)) if b == [5]));
    }

    #[test]
    fn a_full_batch_takes_nothing_more() {
        let (queue, rx) = OutgoingQueue::new(8);
        assert!(queue.try_send(envelope(2, 500)).is_ok());
        assert!(queue.try_send(envelope(3, 1)).is_ok());
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 500];
        let (bytes, left) = gather(&mut batch, &first, &rx, 1000);
        assert_eq!(bytes.len(), 1000);
        assert!(left.is_none());
        assert_eq!(
            rx.len(),
            1,
            "the envelope that would not fit is still queued"
        );
    }

    #[test]
    fn a_batch_ends_at_close_or_abort() {
        for end in [Outgoing::Close, Outgoing::Abort] {
            let (queue, rx) = OutgoingQueue::new(8);
            assert!(queue.try_send(envelope(2, 10)).is_ok());
            let closing = matches!(end, Outgoing::Close);
            assert!(queue.try_send(end).is_ok());
            assert!(queue.try_send(envelope(3, 10)).is_ok());
            let mut batch = WriteBatch::default();
            let first = vec![1u8; 10];
            let (bytes, left) = gather(&mut batch, &first, &rx, 1000);
            assert_eq!(bytes.len(), 20);
            match left {
                Some(Outgoing::Close) => assert!(closing),
                Some(Outgoing::Abort) => assert!(!closing),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn serve_writes_queued_envelopes_at_once_then_aborts() {
        let (queue, rx) = OutgoingQueue::new(8);
        for byte in 1..=3 {
            assert!(queue.try_send(envelope(byte, 10)).is_ok());
        }
        assert!(queue.try_send(Outgoing::Abort).is_ok());
        assert!(queue.try_send(envelope(4, 10)).is_ok());
        let mut stream = Recorder::default();
        let result = future::block_on(serve(&mut stream, &rx, |_| Ok(())));
        assert!(
            matches!(result, Err(StreamError::Io(e)) if e.kind() == io::ErrorKind::ConnectionAborted)
        );
        let want: Vec<u8> = [1u8, 2, 3].iter().flat_map(|b| [*b; 10]).collect();
        assert_eq!(stream.written, want);
        assert_eq!((stream.writes, stream.flushes), (1, 1));
        assert!(!stream.closed, "an abort writes nothing more");
    }

    #[test]
    fn serve_writes_what_did_not_fit_then_closes() {
        let (queue, rx) = OutgoingQueue::new(8);
        assert!(queue.try_send(envelope(1, WRITE_BATCH - 10)).is_ok());
        assert!(queue.try_send(envelope(2, 20)).is_ok());
        assert!(queue.try_send(envelope(3, 20)).is_ok());
        assert!(queue.try_send(Outgoing::Close).is_ok());
        let mut stream = Recorder::default();
        let result = future::block_on(serve(&mut stream, &rx, |_| Ok(())));
        assert!(result.is_ok());
        assert_eq!(stream.written.len(), WRITE_BATCH + 30);
        assert_eq!(stream.written[WRITE_BATCH - 10..WRITE_BATCH + 10], [2; 20]);
        assert_eq!(stream.written[WRITE_BATCH + 10..], [3; 20]);
        assert_eq!((stream.writes, stream.flushes), (2, 2));
        assert!(stream.closed);
    }

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
