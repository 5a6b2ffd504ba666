//! What keys and guards the control messages of a server tunnel (`docs/PROTOCOL.md` §4.4,
//! §6.2): the [`ControlKey`] the director hands out in the Configuration Response, with the key
//! of each direction derived from it, and the [`ReplayWindow`] a receiver keeps of the
//! sequence numbers of the other side's requests.

use arrayvec::ArrayVec;

use super::integrity::mac;
use super::message::Message;
use super::tlv::CONTROL_KEY_LEN;

/// A tunnel's control key and the keys of Message Integrity derived from it, one per
/// direction, so that a message can never be sent back to its sender as the other side's:
/// `HMAC-SHA-256(key, label)` with the labels [`CLIENT_LABEL`](Self::CLIENT_LABEL) and
/// [`DIRECTOR_LABEL`](Self::DIRECTOR_LABEL).
#[derive(Clone, PartialEq, Eq)]
pub struct ControlKey {
    client: [u8; 32],
    director: [u8; 32],
}

impl ControlKey {
    /// Derives the key of messages from the client to the director.
    pub const CLIENT_LABEL: &'static [u8] = b"tscf control client to director";
    /// Derives the key of messages from the director to the client.
    pub const DIRECTOR_LABEL: &'static [u8] = b"tscf control director to client";

    /// The keys derived from the octets of a Control Key TLV.
    pub fn new(key: &[u8; CONTROL_KEY_LEN]) -> Self {
        Self {
            client: mac(key, Self::CLIENT_LABEL),
            director: mac(key, Self::DIRECTOR_LABEL),
        }
    }

    /// The key of Message Integrity on messages from the client to the director.
    pub fn client_to_director(&self) -> &[u8; 32] {
        &self.client
    }

    /// The key of Message Integrity on messages from the director to the client.
    pub fn director_to_client(&self) -> &[u8; 32] {
        &self.director
    }

    /// Whether `encoded` (a control message without envelope) carries the client's Message
    /// Integrity.
    pub fn verify_from_client(&self, encoded: &[u8]) -> bool {
        Message::verify_integrity(encoded, &self.client)
    }

    /// Whether `encoded` (a control message without envelope) carries the director's Message
    /// Integrity.
    pub fn verify_from_director(&self, encoded: &[u8]) -> bool {
        Message::verify_integrity(encoded, &self.director)
    }
}

impl core::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ControlKey(..)")
    }
}

/// Where a request's sequence number stands with a receiver's [`ReplayWindow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Never accepted: process it.
    Fresh,
    /// Accepted before: a retransmission (answered from memory, §6.2) or a replay.
    Seen,
    /// Older than anything the window still remembers: a replay, or so late that it does not
    /// matter.
    Stale,
}

/// The sequence numbers of the last [`SIZE`](Self::SIZE) requests a receiver accepted from
/// the other side of a tunnel, and the newest one it forgot (the floor), compared as 31-bit
/// serial numbers (RFC 1982; the top bit only tells the director's numbers from the client's).
/// The numbers a receiver sees need not be consecutive: a client's counter also numbers its
/// peer probes, and a director's is shared by all its tunnels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    accepted: ArrayVec<u32, { ReplayWindow::SIZE }>,
    newest: Option<u32>,
    floor: Option<u32>,
}

/// The serial number space: the low 31 bits.
const SERIAL: u32 = 0x7fff_ffff;
/// Half of the serial space: how far ahead a number may be and still count as newer.
const HALF: u32 = 0x4000_0000;

/// Whether `a` comes after `b` in the serial space.
fn after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b) & SERIAL;
    d != 0 && d < HALF
}

impl ReplayWindow {
    /// Requests remembered.
    pub const SIZE: usize = 16;

    /// An empty window: every sequence number is fresh.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where `sequence` stands.
    pub fn check(&self, sequence: u32) -> Freshness {
        let s = sequence & SERIAL;
        if self.floor.is_some_and(|f| !after(s, f)) {
            Freshness::Stale
        } else if self.accepted.contains(&s) {
            Freshness::Seen
        } else {
            Freshness::Fresh
        }
    }

    /// Remembers `sequence` as accepted; beyond [`SIZE`](Self::SIZE) the oldest is forgotten
    /// and becomes the floor.
    pub fn accept(&mut self, sequence: u32) {
        let s = sequence & SERIAL;
        if self.accepted.contains(&s) {
            return;
        }
        if self.newest.is_none_or(|n| after(s, n)) {
            self.newest = Some(s);
        }
        if self.accepted.is_full() {
            let newest = self.newest.unwrap_or(s);
            let oldest = (0..self.accepted.len())
                .max_by_key(|&i| newest.wrapping_sub(self.accepted[i]) & SERIAL);
            if let Some(i) = oldest {
                let forgotten = self.accepted.swap_remove(i);
                if self.floor.is_none_or(|f| after(forgotten, f)) {
                    self.floor = Some(forgotten);
                }
            }
        }
        // Room was made above.
        let _ = self.accepted.try_push(s);
    }

    /// [`check`](Self::check), and [`accept`](Self::accept) when fresh.
    pub fn admit(&mut self, sequence: u32) -> Freshness {
        let freshness = self.check(sequence);
        if freshness == Freshness::Fresh {
            self.accept(sequence);
        }
        freshness
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MessageType;

    #[test]
    fn each_direction_has_its_own_key() {
        let key = ControlKey::new(&[0x42; 32]);
        assert_ne!(key.client_to_director(), key.director_to_client());
        let mut out = Vec::new();
        Message::new(MessageType::KEEPALIVE, 5, 9)
            .encode_envelope_with_integrity(key.client_to_director(), &mut out)
            .expect("fits");
        assert!(key.verify_from_client(&out[3..]));
        // Reflected back as the director's, it does not verify.
        assert!(!key.verify_from_director(&out[3..]));
        assert!(!ControlKey::new(&[0x43; 32]).verify_from_client(&out[3..]));
        assert_eq!(format!("{key:?}"), "ControlKey(..)");
    }

    #[test]
    fn the_window_admits_each_number_once_in_any_order_and_forgets_the_oldest() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.admit(100), Freshness::Fresh);
        assert_eq!(w.admit(100), Freshness::Seen);
        // Gaps and reordering: a late request is still fresh.
        assert_eq!(w.admit(5000), Freshness::Fresh);
        assert_eq!(w.admit(4000), Freshness::Fresh);
        assert_eq!(w.admit(4000), Freshness::Seen);
        for s in 6000..6013 {
            assert_eq!(w.admit(s), Freshness::Fresh);
        }
        // Sixteen remembered: the next forgets 100, which becomes the floor.
        assert_eq!(w.admit(7000), Freshness::Fresh);
        assert_eq!(w.check(100), Freshness::Stale);
        assert_eq!(w.check(99), Freshness::Stale);
        assert_eq!(w.check(101), Freshness::Fresh);
        assert_eq!(w.check(4000), Freshness::Seen);
        // Serial arithmetic: the director's numbers wrap from 0xffff_ffff to 0x8000_0000.
        let mut w = ReplayWindow::new();
        for s in 0xffff_fff0u32..=0xffff_ffff {
            assert_eq!(w.admit(s), Freshness::Fresh);
        }
        assert_eq!(w.admit(0x8000_0000), Freshness::Fresh);
        assert_eq!(w.check(0xffff_fff0), Freshness::Stale);
        assert_eq!(w.check(0x8000_0001), Freshness::Fresh);
    }
}
