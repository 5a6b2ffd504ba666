//! Bounded packet queues that recycle their buffers, so that steady-state sending and
//! receiving do not allocate per packet.

use std::collections::VecDeque;

/// Buffers kept for reuse at most; beyond that, freed buffers are dropped.
const MAX_FREE_BUFFERS: usize = 64;
/// Buffers larger than this (from a rare jumbo packet) are not kept, so the pool stays small.
const MAX_KEPT_CAPACITY: usize = 4096;

/// A FIFO of whole packets, at most `limit` of them.
#[derive(Debug)]
pub(super) struct PacketQueue {
    packets: VecDeque<Vec<u8>>,
    limit: usize,
}

impl PacketQueue {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            packets: VecDeque::new(),
            limit,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.packets.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    pub(super) fn is_full(&self) -> bool {
        self.packets.len() >= self.limit
    }

    /// Copies `packet` in, in a recycled buffer. False (nothing queued) when full.
    pub(super) fn push(&mut self, pool: &mut BufferPool, packet: &[u8]) -> bool {
        if self.is_full() {
            return false;
        }
        let mut buf = pool.take();
        buf.extend_from_slice(packet);
        self.packets.push_back(buf);
        true
    }

    pub(super) fn pop(&mut self) -> Option<Vec<u8>> {
        self.packets.pop_front()
    }

    /// Empties the queue into the pool; returns how many packets were discarded.
    pub(super) fn clear(&mut self, pool: &mut BufferPool) -> usize {
        let n = self.packets.len();
        for buf in self.packets.drain(..) {
            pool.give(buf);
        }
        n
    }
}

/// Free packet buffers.
#[derive(Debug, Default)]
pub(super) struct BufferPool {
    free: Vec<Vec<u8>>,
}

impl BufferPool {
    /// An empty buffer, recycled when one is free.
    pub(super) fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }

    /// Returns a buffer for reuse.
    pub(super) fn give(&mut self, mut buf: Vec<u8>) {
        if self.free.len() < MAX_FREE_BUFFERS && buf.capacity() <= MAX_KEPT_CAPACITY {
            buf.clear();
            self.free.push(buf);
        }
    }
}
