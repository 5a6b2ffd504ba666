//! Splits a byte stream (TCP, TLS, a QUIC stream) into envelopes, holding a bounded number of
//! bytes.

use super::envelope::{Envelope, EnvelopeError, MAX_ENVELOPE_LEN};

/// The most bytes a [`StreamDeframer`] ever buffers: one maximal envelope plus one more read.
/// Whenever this many bytes are buffered, a complete envelope is among them, so a caller that
/// drains [`StreamDeframer::next_envelope`] after every read can never hit the bound.
pub const MAX_BUFFERED: usize = 2 * MAX_ENVELOPE_LEN;

/// Buffer kept after it drains, so that a busy connection does not allocate per read; a
/// connection that once carried a large envelope gives back anything beyond it.
const RETAINED_CAPACITY: usize = 32 * 1024;

/// Reassembles envelopes from a stream.
///
/// Feed bytes with [`read_into`](Self::read_into) (zero-copy from the socket) or
/// [`push`](Self::push), then call [`next_envelope`](Self::next_envelope) until it returns
/// `Ok(None)`. An `Err` means the stream can no longer be framed; the connection must be closed.
/// In steady state it neither allocates nor zeroes memory per read; a runtime with many idle
/// connections may call [`release_memory`](Self::release_memory) on them.
#[derive(Debug, Default)]
pub struct StreamDeframer {
    /// Initialized storage; bytes `start..end` are buffered and not yet returned.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The stream cannot be framed any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeframeError {
    /// An envelope header is invalid; the stream has lost framing.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// More bytes were pushed than the bound allows without draining envelopes first.
    #[error("deframer would buffer more than {MAX_BUFFERED} octets")]
    Overflow,
}

impl StreamDeframer {
    /// An empty deframer; it allocates only when bytes arrive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Octets buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Copies `data` in.
    pub fn push(&mut self, data: &[u8]) -> Result<(), DeframeError> {
        if self.buffered() + data.len() > MAX_BUFFERED {
            return Err(DeframeError::Overflow);
        }
        self.make_room(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
        Ok(())
    }

    /// Lets `read` fill up to `max` octets of free space directly (e.g. a socket's `read`), and
    /// keeps what it reports as written. Returns what `read` returned.
    pub fn read_into<E>(
        &mut self,
        max: usize,
        read: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Result<usize, E>, DeframeError> {
        let room = self.make_room(max).min(max);
        if room == 0 && max > 0 {
            return Err(DeframeError::Overflow);
        }
        let space = &mut self.buf[self.end..self.end + room];
        let result = read(space);
        if let Ok(n) = &result {
            self.end += (*n).min(room);
        }
        Ok(result)
    }

    /// The next complete envelope, if one is buffered.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope<'_>>, DeframeError> {
        match self.next_raw()? {
            Some(raw) => Ok(Some(Envelope::decode_datagram(raw)?)),
            None => Ok(None),
        }
    }

    /// The next complete envelope as its octets on the wire (header included), if one is
    /// buffered: for consumers that take whole envelopes as bytes, so that nothing is copied
    /// or encoded again.
    pub fn next_raw(&mut self) -> Result<Option<&[u8]>, DeframeError> {
        let Some((_, used)) = Envelope::decode_prefix(&self.buf[self.start..self.end])? else {
            return Ok(None);
        };
        let at = self.start;
        self.start += used;
        if self.start == self.end {
            // Drained: the next read starts at the front again, without moving anything. The
            // returned bytes stay in place until the next push or read.
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(&self.buf[at..at + used]))
    }

    /// Frees the buffer if nothing is buffered, e.g. when a connection goes idle.
    pub fn release_memory(&mut self) {
        if self.buffered() == 0 {
            *self = Self::default();
        }
    }

    /// Makes at least `want` octets of free space after `end` where the bound allows, and
    /// returns the free space.
    fn make_room(&mut self, want: usize) -> usize {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > RETAINED_CAPACITY {
                self.buf = Vec::new();
            }
        }
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want && self.buf.len() < MAX_BUFFERED {
            let len = (self.end + want).max(self.buf.len() * 2).min(MAX_BUFFERED);
            self.buf.resize(len, 0);
        }
        self.buf.len() - self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::EnvelopeType;

    fn envelope(kind: EnvelopeType, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Envelope::encode(kind, payload, &mut out).expect("small payload");
        out
    }

    #[test]
    fn reassembles_across_arbitrary_splits() {
        let mut stream = envelope(EnvelopeType::DATA, b"first");
        stream.extend(envelope(EnvelopeType::CONTROL, b""));
        stream.extend(envelope(EnvelopeType::DATA, &[7; 300]));
        for chunk in 1..stream.len() {
            let mut d = StreamDeframer::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.push(piece).expect("bounded");
                while let Some(env) = d.next_envelope().expect("valid") {
                    got.push((env.kind, env.payload.to_vec()));
                }
            }
            assert_eq!(got.len(), 3, "chunk size {chunk}");
            assert_eq!(got[0].1, b"first");
            assert_eq!(got[2].1, vec![7; 300]);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn raw_envelopes_are_the_octets_on_the_wire() {
        let mut stream = envelope(EnvelopeType::CONTROL, b"one");
        stream.extend(envelope(EnvelopeType::DATA, b"two"));
        let mut d = StreamDeframer::new();
        d.push(&stream[..5]).expect("bounded");
        assert_eq!(d.next_raw(), Ok(None));
        d.push(&stream[5..]).expect("bounded");
        assert_eq!(d.next_raw(), Ok(Some(&stream[..6])));
        assert_eq!(d.next_raw(), Ok(Some(&stream[6..])));
        assert_eq!(d.next_raw(), Ok(None));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn bad_length_loses_framing() {
        let mut d = StreamDeframer::new();
        d.push(&[0x04, 0x00, 0x01, 0xff]).expect("bounded");
        assert_eq!(
            d.next_envelope(),
            Err(DeframeError::Envelope(EnvelopeError::BadLength(1)))
        );
    }

    #[test]
    fn never_buffers_beyond_the_bound() {
        let mut d = StreamDeframer::new();
        // A header announcing a maximal envelope, then bytes that never complete it... plus more.
        d.push(&[0x04, 0xff, 0xff]).expect("bounded");
        let filler = vec![0u8; 40_000];
        d.push(&filler).expect("bounded");
        assert_eq!(d.next_envelope(), Ok(None));
        // Completing the first envelope and starting a second is fine.
        d.push(&filler).expect("bounded");
        assert!(d.next_envelope().expect("valid").is_some());
        // Pushing without draining past the bound is refused.
        let mut d = StreamDeframer::new();
        d.push(&[0x04, 0xff, 0xff]).expect("bounded");
        let err = d.push(&vec![0u8; MAX_BUFFERED]);
        assert_eq!(err, Err(DeframeError::Overflow));
        assert!(d.buffered() <= MAX_BUFFERED);
    }

    #[test]
    fn read_into_keeps_only_what_was_read() {
        let mut d = StreamDeframer::new();
        let bytes = envelope(EnvelopeType::DATA, b"xy");
        let n = d
            .read_into(1024, |space| {
                space[..bytes.len()].copy_from_slice(&bytes);
                Ok::<_, ()>(bytes.len())
            })
            .expect("room");
        assert_eq!(n, Ok(5));
        assert_eq!(d.buffered(), 5);
        let env = d.next_envelope().expect("valid").expect("complete");
        assert_eq!(env.payload, b"xy");
        let failed = d
            .read_into(1024, |_| Err::<usize, _>("reset"))
            .expect("room");
        assert_eq!(failed, Err("reset"));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn memory_is_released_after_a_large_envelope() {
        let mut d = StreamDeframer::new();
        d.push(&envelope(EnvelopeType::DATA, &vec![1; 60_000]))
            .expect("bounded");
        assert!(d.next_envelope().expect("valid").is_some());
        d.push(&[]).expect("bounded");
        assert!(d.buf.capacity() <= RETAINED_CAPACITY);
        // A small buffer is kept across drains, so steady reads do not allocate.
        d.push(&envelope(EnvelopeType::DATA, b"small"))
            .expect("bounded");
        let before = d.buf.as_ptr();
        assert!(d.next_envelope().expect("valid").is_some());
        d.push(&envelope(EnvelopeType::DATA, b"again"))
            .expect("bounded");
        assert_eq!(d.buf.as_ptr(), before, "same storage reused");
        assert!(d.next_envelope().expect("valid").is_some());
        d.release_memory();
        assert_eq!(d.buf.capacity(), 0);
    }
}
