//! Hands out internal addresses from a prefix and takes them back.

use std::collections::VecDeque;

/// Host offsets within a prefix: never-used offsets come from a cursor, released ones are
/// reused oldest first, so that a freed address rests as long as possible before its next
/// owner gets it (late packets for the old owner find nobody).
#[derive(Debug)]
pub(crate) struct AddressPool {
    /// Next never-used offset.
    cursor: u128,
    /// Last assignable offset.
    last: u128,
    released: VecDeque<u128>,
}

impl AddressPool {
    /// Offsets `first..=last`.
    pub(crate) fn new(first: u128, last: u128) -> Self {
        Self {
            cursor: first,
            last,
            released: VecDeque::new(),
        }
    }

    /// The pool of host offsets of a prefix of `prefix_len` bits in a `bits`-bit address,
    /// skipping the network address and the director's own first host address (and, for
    /// IPv4, the broadcast address). At most `cap` offsets are ever handed out.
    pub(crate) fn for_prefix(bits: u32, prefix_len: u8, broadcast: bool, cap: usize) -> Self {
        let host_bits = bits.saturating_sub(u32::from(prefix_len));
        let size = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let last = if broadcast {
            size.saturating_sub(1)
        } else {
            size
        };
        let last = last.min(1 + cap as u128);
        Self::new(2, last)
    }

    pub(crate) fn allocate(&mut self) -> Option<u128> {
        if self.cursor <= self.last {
            self.cursor += 1;
            return Some(self.cursor - 1);
        }
        self.released.pop_front()
    }

    pub(crate) fn release(&mut self, offset: u128) {
        self.released.push_back(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_every_host_once_then_reuses_oldest_first() {
        // A /30 has hosts .1 and .2; .1 is the director's, so only .2 is handed out.
        let mut p = AddressPool::for_prefix(32, 30, true, 100);
        assert_eq!(p.allocate(), Some(2));
        assert_eq!(p.allocate(), None);
        let mut p = AddressPool::for_prefix(32, 29, true, 100);
        let got: Vec<_> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(got, [2, 3, 4, 5, 6]);
        p.release(4);
        p.release(2);
        assert_eq!(
            (p.allocate(), p.allocate(), p.allocate()),
            (Some(4), Some(2), None)
        );
    }

    #[test]
    fn cap_bounds_huge_prefixes() {
        let mut p = AddressPool::for_prefix(128, 48, false, 3);
        let got: Vec<_> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(got, [2, 3, 4]);
    }
}
