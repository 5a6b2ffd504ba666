//! Message Integrity: HMAC-SHA-256 keyed with the one-time peer token (`docs/PROTOCOL.md`
//! §4.4). It authenticates peer probes and the configuration exchange on a peer tunnel, so that
//! only the two clients the director introduced can form it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::codes::{EnvelopeType, TlvType};
use super::envelope::{Envelope, ENVELOPE_HEADER_LEN};
use super::message::{EncodeError, Message, MESSAGE_INTEGRITY_TLV_LEN};

type HmacSha256 = Hmac<Sha256>;

/// The HMAC of `covered` under `key`.
fn mac(key: &[u8; 16], covered: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return [0; 32];
    };
    m.update(covered);
    m.finalize().into_bytes().into()
}

impl Message<'_> {
    /// Encodes the message inside a control envelope with a Message Integrity TLV keyed by
    /// `key`, appended to `out`. Any `message_integrity` value already set is replaced.
    pub fn encode_envelope_with_integrity(
        &self,
        key: &[u8; 16],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let mut signed = self.clone();
        signed.tlvs.message_integrity = Some([0; 32]);
        let start = out.len();
        signed.encode_envelope(out)?;
        let body = start + ENVELOPE_HEADER_LEN;
        // The TLV was encoded last, so it occupies the final octets of `out`.
        let covered_end = out.len() - MESSAGE_INTEGRITY_TLV_LEN;
        let tag = mac(key, &out[body..covered_end]);
        out[covered_end + 2..].copy_from_slice(&tag);
        Ok(())
    }

    /// Whether `encoded` (a control message, without envelope) ends with a Message Integrity
    /// TLV that `key` produced. Comparison is constant-time.
    pub fn verify_integrity(encoded: &[u8], key: &[u8; 16]) -> bool {
        let Some(covered) = Message::integrity_input(encoded) else {
            return false;
        };
        let tlv = &encoded[covered.len()..];
        if tlv.len() != MESSAGE_INTEGRITY_TLV_LEN
            || tlv[0] != TlvType::MESSAGE_INTEGRITY.0
            || usize::from(tlv[1]) != 32
        {
            return false;
        }
        let Ok(mut m) = HmacSha256::new_from_slice(key) else {
            return false;
        };
        m.update(covered);
        m.verify_slice(&tlv[2..]).is_ok()
    }
}

/// Convenience for callers holding a whole control envelope.
pub fn verify_envelope_integrity(envelope: &[u8], key: &[u8; 16]) -> bool {
    match Envelope::decode_datagram(envelope) {
        Ok(env) if env.kind == EnvelopeType::CONTROL => Message::verify_integrity(env.payload, key),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MessageType;

    #[test]
    fn signed_messages_verify_only_with_their_key() {
        let key = [7u8; 16];
        let mut msg = Message::new(MessageType::PEER_PROBE, 9, 0);
        msg.tlvs.peer_internal_address = Some([10, 77, 0, 2].into());
        let mut out = Vec::new();
        msg.encode_envelope_with_integrity(&key, &mut out)
            .expect("fits");
        assert!(verify_envelope_integrity(&out, &key));
        assert!(!verify_envelope_integrity(&out, &[8u8; 16]));
        let decoded = Message::decode(&out[3..]).expect("valid");
        assert!(decoded.tlvs.message_integrity.is_some());
        // Any flipped bit in the covered part or the tag breaks it.
        for i in 3..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1;
            assert!(!verify_envelope_integrity(&bad, &key), "bit flip at {i}");
        }
        // A message without the TLV never verifies.
        let mut plain = Vec::new();
        Message::new(MessageType::PEER_PROBE, 9, 0)
            .encode_envelope(&mut plain)
            .expect("fits");
        assert!(!verify_envelope_integrity(&plain, &key));
    }
}
