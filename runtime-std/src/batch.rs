//! Joining envelopes already queued for a stream connection into one write, for both runtimes.
//! A busy connection then seals one TLS record and makes one system call for many envelopes
//! rather than one for each; nothing waits for more, so a lone envelope adds no latency.

/// Most octets of envelopes written as one: the most plaintext one TLS record carries.
pub const WRITE_BATCH: usize = 16 * 1024;
/// A batch buffer grown past this is freed once batches are small again.
const KEEP: usize = 2 * 1024;

/// The buffer batches are joined in, kept between batches.
#[derive(Debug, Default)]
pub struct WriteBatch {
    joined: Vec<u8>,
}

impl WriteBatch {
    /// The envelope `first` followed by those `next` yields (`Ok`) while all of them fit in
    /// `bound` octets, in order; `first` alone goes out uncopied. `next` takes queued work
    /// without waiting and gives other work (a close) as `Err`. Returns the bytes to write and
    /// what was taken but not joined (an envelope that did not fit, or other work), which the
    /// caller handles after writing them, as if it had come next.
    pub fn gather<'a, W>(
        &'a mut self,
        first: &'a [u8],
        bound: usize,
        mut next: impl FnMut() -> Option<Result<Vec<u8>, W>>,
    ) -> (&'a [u8], Option<Result<Vec<u8>, W>>) {
        // `joined` still holds the last batch, or nothing if the last envelope went alone.
        if self.joined.len() < KEEP && self.joined.capacity() > KEEP {
            self.joined = Vec::new();
        }
        self.joined.clear();
        let mut len = first.len();
        let mut left = None;
        while len < bound {
            match next() {
                None => break,
                Some(Ok(envelope)) if len + envelope.len() <= bound => {
                    if self.joined.is_empty() {
                        self.joined.reserve(bound.min(2 * (len + envelope.len())));
                        self.joined.extend_from_slice(first);
                    }
                    self.joined.extend_from_slice(&envelope);
                    len += envelope.len();
                }
                Some(other) => {
                    left = Some(other);
                    break;
                }
            }
        }
        if self.joined.is_empty() {
            (first, left)
        } else {
            (&self.joined, left)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Queued work: envelopes of `len` octets of `byte`, or `Err(())` for a close.
    fn queue(work: &[Result<(u8, usize), ()>]) -> VecDeque<Result<Vec<u8>, ()>> {
        work.iter()
            .map(|w| w.map(|(byte, len)| vec![byte; len]))
            .collect()
    }

    #[test]
    fn a_lone_envelope_goes_as_it_is() {
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 100];
        let (bytes, left) = batch.gather(&first, 1000, || None::<Result<_, ()>>);
        assert!(std::ptr::eq(bytes, first.as_slice()), "not copied");
        assert!(left.is_none());
    }

    #[test]
    fn a_batch_keeps_order_and_stops_at_the_bound() {
        let mut q = queue(&[Ok((2, 300)), Ok((3, 300)), Ok((4, 300)), Ok((5, 1))]);
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 300];
        // Three envelopes make 900 octets; a fourth of 300 would pass the bound.
        let (bytes, left) = batch.gather(&first, 1000, || q.pop_front());
        let want: Vec<u8> = [1u8, 2, 3].iter().flat_map(|b| [*b; 300]).collect();
        assert_eq!(bytes, want.as_slice());
        assert_eq!(left, Some(Ok(vec![4; 300])));
        // The rest stays queued for the next batch.
        assert_eq!(q.pop_front(), Some(Ok(vec![5])));
    }

    #[test]
    fn a_full_batch_takes_nothing_more() {
        let mut q = queue(&[Ok((2, 500)), Ok((3, 1))]);
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 500];
        let (bytes, left) = batch.gather(&first, 1000, || q.pop_front());
        assert_eq!(bytes.len(), 1000);
        assert!(left.is_none());
        assert_eq!(
            q.len(),
            1,
            "the envelope that would not fit is still queued"
        );
    }

    #[test]
    fn a_batch_ends_at_other_work() {
        let mut q = queue(&[Ok((2, 10)), Err(()), Ok((3, 10))]);
        let mut batch = WriteBatch::default();
        let first = vec![1u8; 10];
        let (bytes, left) = batch.gather(&first, 1000, || q.pop_front());
        assert_eq!(bytes.len(), 20);
        assert_eq!(left, Some(Err(())));
        assert_eq!(q.len(), 1);
    }
}
