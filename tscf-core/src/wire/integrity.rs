//! Message Integrity: HMAC-SHA-256 over a control message (`docs/PROTOCOL.md` §4.4), keyed
//! with the one-time peer token on a peer path, or with a key derived from the tunnel's control
//! key on the server tunnel ([`ControlKey`](super::ControlKey)).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::codes::{EnvelopeType, TlvType};
use super::envelope::{Envelope, ENVELOPE_HEADER_LEN};
use super::message::{EncodeError, Message, MAX_CONTROL_LEN, MESSAGE_INTEGRITY_TLV_LEN};

type HmacSha256 = Hmac<Sha256>;

/// The HMAC of `covered` under `key`.
pub(super) fn mac(key: &[u8], covered: &[u8]) -> [u8; 32] {
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
        key: &[u8],
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
    pub fn verify_integrity(encoded: &[u8], key: &[u8]) -> bool {
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
pub fn verify_envelope_integrity(envelope: &[u8], key: &[u8]) -> bool {
    match Envelope::decode_datagram(envelope) {
        Ok(env) if env.kind == EnvelopeType::CONTROL => Message::verify_integrity(env.payload, key),
        _ => false,
    }
}

/// Appends a Message Integrity TLV keyed by `key` to the control envelope that fills
/// `envelope[start..]` (encoded without one), and corrects the envelope's length: what a
/// sender does to a message it encoded before it knew the key, or encodes once and signs at
/// each transmission. The envelope is left as it was when it is not one control message, or
/// when the TLV would take the message beyond [`MAX_CONTROL_LEN`].
pub fn append_integrity(
    envelope: &mut Vec<u8>,
    start: usize,
    key: &[u8],
) -> Result<(), EncodeError> {
    let body = start + ENVELOPE_HEADER_LEN;
    let whole = envelope.get(start..).unwrap_or_default();
    let is_control = matches!(
        Envelope::decode_datagram(whole),
        Ok(Envelope {
            kind: EnvelopeType::CONTROL,
            ..
        })
    );
    let signed_len = whole.len() - ENVELOPE_HEADER_LEN.min(whole.len()) + MESSAGE_INTEGRITY_TLV_LEN;
    if !is_control || signed_len > MAX_CONTROL_LEN {
        return Err(EncodeError::TooLong(signed_len));
    }
    let tag = mac(key, &envelope[body..]);
    envelope.extend_from_slice(&[TlvType::MESSAGE_INTEGRITY.0, 32]);
    envelope.extend_from_slice(&tag);
    // At most MAX_CONTROL_LEN plus the header: the length field holds it.
    let len = u16::try_from(signed_len + ENVELOPE_HEADER_LEN).unwrap_or(u16::MAX);
    envelope[start + 1..start + 3].copy_from_slice(&len.to_be_bytes());
    Ok(())
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

    #[test]
    fn signing_an_encoded_envelope_in_place_matches_signing_while_encoding() {
        let key = [3u8; 32];
        let mut msg = Message::new(MessageType::KEEPALIVE, 77, 0x5a17_c0de_2024_0b01);
        msg.tlvs.software = Some("tscf");
        let mut expected = Vec::new();
        msg.encode_envelope_with_integrity(&key, &mut expected)
            .expect("fits");
        // After other bytes in the same buffer, as a transmit buffer may hold.
        let mut buf = vec![0xee; 5];
        msg.encode_envelope(&mut buf).expect("fits");
        append_integrity(&mut buf, 5, &key).expect("a control envelope");
        assert_eq!(buf[5..], expected[..]);
        // A data envelope, or a message that would grow past 2048 octets, is left alone.
        let mut data = vec![4, 0, 4, 0x45];
        assert!(append_integrity(&mut data, 0, &key).is_err());
        assert_eq!(data, [4, 0, 4, 0x45]);
        let mut long = Vec::new();
        Envelope::encode(EnvelopeType::CONTROL, &[1; MAX_CONTROL_LEN - 10], &mut long)
            .expect("fits");
        let before = long.clone();
        assert!(append_integrity(&mut long, 0, &key).is_err());
        assert_eq!(long, before);
    }
}
