//! What keys and guards the control messages of a server tunnel (`docs/PROTOCOL.md` §4.4,
//! §6.2): the [`ControlKey`] the director hands out in the Configuration Response, with the key
//! of each direction derived from it, and the [`ReplayWindow`] a receiver keeps of the
//! sequence numbers of the other side's requests.

use super::integrity::mac;
use super::message::Message;
use super::tlv::CONTROL_KEY_LEN;

/// A tunnel's control key, from which the keys of Message Integrity derive, one per direction,
/// so that a message can never be sent back to its sender as the other side's:
/// `HMAC-SHA-256(key, label)` with the labels [`CLIENT_LABEL`](Self::CLIENT_LABEL) and
/// [`DIRECTOR_LABEL`](Self::DIRECTOR_LABEL). Only the 32 octets are kept (a director holds one
/// per tunnel); each use derives its key again.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlKey([u8; CONTROL_KEY_LEN]);

impl ControlKey {
    /// Derives the key of messages from the client to the director.
    pub const CLIENT_LABEL: &'static [u8] = b"tscf control client to director";
    /// Derives the key of messages from the director to the client.
    pub const DIRECTOR_LABEL: &'static [u8] = b"tscf control director to client";

    /// The control key of a Control Key TLV.
    pub fn new(key: &[u8; CONTROL_KEY_LEN]) -> Self {
        Self(*key)
    }

    /// The octets of the Control Key TLV.
    pub fn octets(&self) -> &[u8; CONTROL_KEY_LEN] {
        &self.0
    }

    /// The key of Message Integrity on messages from the client to the director.
    pub fn client_to_director(&self) -> [u8; 32] {
        mac(&self.0, Self::CLIENT_LABEL)
    }

    /// The key of Message Integrity on messages from the director to the client.
    pub fn director_to_client(&self) -> [u8; 32] {
        mac(&self.0, Self::DIRECTOR_LABEL)
    }

    /// Whether `encoded` (a control message without envelope) carries the client's Message
    /// Integrity.
    pub fn verify_from_client(&self, encoded: &[u8]) -> bool {
        Message::verify_integrity(encoded, &self.client_to_director())
    }

    /// Whether `encoded` (a control message without envelope) carries the director's Message
    /// Integrity.
    pub fn verify_from_director(&self, encoded: &[u8]) -> bool {
        Message::verify_integrity(encoded, &self.director_to_client())
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
/// peer probes, and a director's is shared by all its tunnels. Sixteen is more than a sender
/// ever has outstanding (one request of each kind, eight Client Service Requests, §6.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayWindow {
    accepted: [u32; ReplayWindow::SIZE],
    len: u8,
    /// [`UNSET`] before the first.
    newest: u32,
    /// [`UNSET`] until one is forgotten.
    floor: u32,
}

/// The serial number space: the low 31 bits.
const SERIAL: u32 = 0x7fff_ffff;
/// Half of the serial space: how far ahead a number may be and still count as newer.
const HALF: u32 = 0x4000_0000;
/// No number: outside the serial space.
const UNSET: u32 = u32::MAX;

/// Whether `a` comes after `b` in the serial space.
fn after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b) & SERIAL;
    d != 0 && d < HALF
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            accepted: [0; ReplayWindow::SIZE],
            len: 0,
            newest: UNSET,
            floor: UNSET,
        }
    }
}

impl ReplayWindow {
    /// Requests remembered.
    pub const SIZE: usize = 16;

    /// An empty window: every sequence number is fresh.
    pub fn new() -> Self {
        Self::default()
    }

    fn accepted(&self) -> &[u32] {
        &self.accepted[..usize::from(self.len)]
    }

    /// Where `sequence` stands.
    pub fn check(&self, sequence: u32) -> Freshness {
        let s = sequence & SERIAL;
        if self.floor != UNSET && !after(s, self.floor) {
            Freshness::Stale
        } else if self.accepted().contains(&s) {
            Freshness::Seen
        } else {
            Freshness::Fresh
        }
    }

    /// Remembers `sequence` as accepted; beyond [`SIZE`](Self::SIZE) the oldest is forgotten
    /// and becomes the floor.
    pub fn accept(&mut self, sequence: u32) {
        let s = sequence & SERIAL;
        if self.accepted().contains(&s) {
            return;
        }
        if self.newest == UNSET || after(s, self.newest) {
            self.newest = s;
        }
        let mut len = usize::from(self.len);
        if len == Self::SIZE {
            let newest = self.newest;
            let oldest = (0..len)
                .max_by_key(|&i| newest.wrapping_sub(self.accepted[i]) & SERIAL)
                .unwrap_or(0);
            let forgotten = self.accepted[oldest];
            self.accepted[oldest] = self.accepted[len - 1];
            len -= 1;
            if self.floor == UNSET || after(forgotten, self.floor) {
                self.floor = forgotten;
            }
        }
        self.accepted[len] = s;
        // At most SIZE, which fits.
        self.len = u8::try_from(len + 1).unwrap_or(u8::MAX);
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
            .encode_envelope_with_integrity(&key.client_to_director(), &mut out)
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
