//! IPv4 fragmentation of inner datagrams larger than the tunnel carries, and their
//! reassembly (RFC 791): a 1,400-octet RTP payload in a tunnel of 1,400-octet packets leaves
//! as two fragments and arrives whole.
//!
//! Reassembly is bounded: at most [`MAX_DATAGRAMS`] datagrams in progress (the oldest is
//! dropped for a new one), each at most 65,535 octets in at most [`MAX_PIECES`] pieces, each
//! forgotten [`REASSEMBLY_TIMEOUT`] after its first fragment. **No input makes any function
//! here panic.**

use std::time::{Duration, Instant};

use etherparse::Ipv4HeaderSlice;

/// Datagrams being reassembled at once, at most.
pub const MAX_DATAGRAMS: usize = 16;
/// Fragments of one datagram, at most.
pub const MAX_PIECES: usize = 64;
/// How long the fragments of a datagram wait for the rest.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(5);

/// "More fragments" in the flags and offset field.
const MORE_FRAGMENTS: u16 = 0x2000;
/// The offset bits, in units of 8 octets.
const OFFSET: u16 = 0x1fff;

/// Whether `packet` is an IPv4 fragment (a piece of a larger datagram).
pub fn is_fragment(packet: &[u8]) -> bool {
    packet.first().map(|b| b >> 4) == Some(4)
        && packet
            .get(6..8)
            .is_some_and(|f| u16::from_be_bytes([f[0], f[1]]) & (MORE_FRAGMENTS | OFFSET) != 0)
}

/// Splits the whole IPv4 `packet` into fragments of at most `max` octets, each handed to
/// `send` in order, with identification `ident`. False (nothing sent) when it cannot be
/// split: not IPv4 with a valid header, or `max` leaves no room for eight octets of payload.
pub fn fragment(
    packet: &[u8],
    max: usize,
    ident: u16,
    scratch: &mut Vec<u8>,
    mut send: impl FnMut(&[u8]) -> bool,
) -> bool {
    let Ok(header) = Ipv4HeaderSlice::from_slice(packet) else {
        return false;
    };
    let header_len = header.slice().len();
    let step = max.saturating_sub(header_len) / 8 * 8;
    if step == 0 || packet.len() > usize::from(u16::MAX) {
        return false;
    }
    let payload = &packet[header_len..];
    let mut offset = 0;
    while offset < payload.len() {
        let end = (offset + step).min(payload.len());
        let more = end < payload.len();
        scratch.clear();
        scratch.extend_from_slice(&packet[..header_len]);
        scratch.extend_from_slice(&payload[offset..end]);
        let total = (header_len + end - offset) as u16;
        scratch[2..4].copy_from_slice(&total.to_be_bytes());
        scratch[4..6].copy_from_slice(&ident.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { MORE_FRAGMENTS } else { 0 };
        scratch[6..8].copy_from_slice(&flags.to_be_bytes());
        set_checksum(&mut scratch[..header_len]);
        if !send(scratch) {
            return false;
        }
        offset = end;
    }
    true
}

/// What fragmenting keeps between datagrams: the next identification, and the buffer the
/// fragments are written in.
#[derive(Debug, Default)]
pub struct Fragmenter {
    ident: u16,
    scratch: Vec<u8>,
}

impl Fragmenter {
    /// Splits `packet` into fragments of at most `max` octets handed to `send` (see
    /// [`fragment`]), with the next identification.
    pub fn split(&mut self, packet: &[u8], max: usize, send: impl FnMut(&[u8]) -> bool) -> bool {
        self.ident = self.ident.wrapping_add(1);
        fragment(packet, max, self.ident, &mut self.scratch, send)
    }
}

/// The datagrams being reassembled from IPv4 fragments.
#[derive(Debug, Default)]
pub struct Reassembly {
    datagrams: Vec<Datagram>,
    /// Fragments dropped: malformed, past a bound, or of a datagram that timed out.
    pub dropped: u64,
}

#[derive(Debug)]
struct Datagram {
    /// Source, destination, identification and protocol.
    key: ([u8; 4], [u8; 4], u16, u8),
    started: Instant,
    /// The first fragment's header, once it came.
    header: Vec<u8>,
    payload: Vec<u8>,
    /// Ranges of `payload` received, unordered.
    pieces: Vec<(usize, usize)>,
    /// The payload's length, once the last fragment came.
    total: Option<usize>,
}

impl Reassembly {
    /// No datagram in progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one fragment received at `now`; when it completes its datagram, the whole
    /// packet is written into `out` and true is returned.
    pub fn push(&mut self, now: Instant, fragment: &[u8], out: &mut Vec<u8>) -> bool {
        self.datagrams
            .retain(|d| now.saturating_duration_since(d.started) < REASSEMBLY_TIMEOUT);
        let Ok(header) = Ipv4HeaderSlice::from_slice(fragment) else {
            self.dropped += 1;
            return false;
        };
        let header_len = header.slice().len();
        let total_len = usize::from(header.total_len()).min(fragment.len());
        let data = fragment.get(header_len..total_len).unwrap_or_default();
        let offset = usize::from(header.fragments_offset().value()) * 8;
        let more = header.more_fragments();
        let end = offset + data.len();
        if end > usize::from(u16::MAX) - header_len || (more && data.len() % 8 != 0) {
            self.dropped += 1;
            return false;
        }
        let key = (
            header.source(),
            header.destination(),
            header.identification(),
            header.protocol().0,
        );
        let i = match self.datagrams.iter().position(|d| d.key == key) {
            Some(i) => i,
            None => {
                if self.datagrams.len() >= MAX_DATAGRAMS {
                    self.datagrams.remove(0);
                    self.dropped += 1;
                }
                self.datagrams.push(Datagram {
                    key,
                    started: now,
                    header: Vec::new(),
                    payload: Vec::new(),
                    pieces: Vec::new(),
                    total: None,
                });
                self.datagrams.len() - 1
            }
        };
        let d = &mut self.datagrams[i];
        if d.pieces.len() >= MAX_PIECES || d.total.is_some_and(|t| end > t) {
            self.datagrams.remove(i);
            self.dropped += 1;
            return false;
        }
        if offset == 0 {
            d.header = fragment[..header_len].to_vec();
        }
        if !more {
            d.total = Some(end);
        }
        if d.payload.len() < end {
            d.payload.resize(end, 0);
        }
        d.payload[offset..end].copy_from_slice(data);
        d.pieces.push((offset, end));
        if !d.complete() {
            return false;
        }
        let d = self.datagrams.remove(i);
        out.clear();
        out.extend_from_slice(&d.header);
        out.extend_from_slice(&d.payload);
        let total = (d.header.len() + d.payload.len()) as u16;
        out[2..4].copy_from_slice(&total.to_be_bytes());
        out[6..8].copy_from_slice(&0u16.to_be_bytes());
        set_checksum(&mut out[..d.header.len()]);
        true
    }
}

impl Datagram {
    fn complete(&mut self) -> bool {
        let (Some(total), false) = (self.total, self.header.is_empty()) else {
            return false;
        };
        self.pieces.sort_unstable();
        let mut covered = 0;
        for &(start, end) in &self.pieces {
            if start > covered {
                return false;
            }
            covered = covered.max(end);
        }
        covered >= total
    }
}

/// Writes the header checksum of the IPv4 `header`.
fn set_checksum(header: &mut [u8]) {
    header[10..12].copy_from_slice(&[0, 0]);
    let mut sum = 0u32;
    for pair in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn datagram(len: usize) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 3], 64).udp(5004, 6000);
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut packet = Vec::new();
        builder.write(&mut packet, &payload).expect("a packet");
        packet
    }

    fn pieces(packet: &[u8], max: usize, ident: u16) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        assert!(fragment(packet, max, ident, &mut scratch, |f| {
            assert!(f.len() <= max);
            assert!(Ipv4HeaderSlice::from_slice(f).is_ok());
            out.push(f.to_vec());
            true
        }));
        out
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    fn a_large_datagram_is_split_and_put_back_together_in_any_order() {
        let now = Instant::now();
        let packet = datagram(1400);
        let mut frags = pieces(&packet, 1400, 7);
        assert_eq!(frags.len(), 2);
        assert!(frags.iter().all(|f| is_fragment(f)));
        assert!(!is_fragment(&packet));
        frags.reverse();
        let mut r = Reassembly::new();
        let mut out = Vec::new();
        assert!(!r.push(now, &frags[0], &mut out));
        assert!(r.push(now, &frags[1], &mut out));
        let mut expected = packet.clone();
        expected[4..8].copy_from_slice(&[0, 7, 0, 0]);
        set_checksum(&mut expected[..20]);
        assert_eq!(out, expected);
        let d = crate::inner::parse_udp(&out).expect("the whole datagram");
        assert_eq!(d.payload.len(), 1400);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    fn reassembly_is_bounded_and_forgets_old_pieces() {
        let now = Instant::now();
        let mut r = Reassembly::new();
        let mut out = Vec::new();
        for ident in 0..(MAX_DATAGRAMS as u16 + 4) {
            let frags = pieces(&datagram(3000), 1000, ident);
            assert!(!r.push(now, &frags[0], &mut out));
        }
        assert_eq!(r.datagrams.len(), MAX_DATAGRAMS);
        let frags = pieces(&datagram(3000), 1000, 99);
        assert!(!r.push(now, &frags[0], &mut out));
        let later = now + REASSEMBLY_TIMEOUT;
        for f in &frags[1..] {
            assert!(!r.push(later, f, &mut out), "the first piece timed out");
        }
        assert!(!r.push(now, b"\x45garbage", &mut out));
        assert!(r.dropped > 0);
    }
}
