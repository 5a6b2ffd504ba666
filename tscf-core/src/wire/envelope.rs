//! The envelope: one octet of type, two octets of length of the whole envelope, payload
//! (`docs/PROTOCOL.md` §2).

use bytes::BufMut;

use super::codes::EnvelopeType;

/// Octets before the payload: type (1) and length (2).
pub const ENVELOPE_HEADER_LEN: usize = 3;
/// The largest envelope the 2-octet length can describe.
pub const MAX_ENVELOPE_LEN: usize = u16::MAX as usize;
/// The largest payload an envelope can carry.
pub const MAX_PAYLOAD_LEN: usize = MAX_ENVELOPE_LEN - ENVELOPE_HEADER_LEN;

/// A decoded envelope: its type and a view of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// What the payload is.
    pub kind: EnvelopeType,
    /// The payload, borrowed from the input.
    pub payload: &'a [u8],
}

/// Why bytes are not an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Fewer than three octets: no header.
    #[error("envelope shorter than its 3-octet header")]
    Truncated,
    /// The length field is below the header size, which no sender may write.
    #[error("envelope length {0} is less than the header")]
    BadLength(u16),
    /// On a datagram transport, the length field disagrees with the datagram size.
    #[error("envelope length {declared} does not match the {actual}-octet datagram")]
    LengthMismatch {
        /// The length field.
        declared: u16,
        /// The datagram's size.
        actual: usize,
    },
}

/// The payload does not fit in one envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("payload of {0} octets exceeds the envelope maximum of {MAX_PAYLOAD_LEN}")]
pub struct PayloadTooLarge(pub usize);

impl<'a> Envelope<'a> {
    /// Decodes the single envelope that fills a datagram (UDP, DTLS record payload, QUIC
    /// datagram). The length field must equal the datagram's size.
    pub fn decode_datagram(datagram: &'a [u8]) -> Result<Self, EnvelopeError> {
        let (kind, declared) = Self::header(datagram)?;
        if usize::from(declared) != datagram.len() {
            return Err(EnvelopeError::LengthMismatch {
                declared,
                actual: datagram.len(),
            });
        }
        Ok(Self {
            kind,
            payload: datagram.get(ENVELOPE_HEADER_LEN..).unwrap_or_default(),
        })
    }

    /// Decodes the envelope at the start of a stream buffer. `Ok(None)` means more bytes are
    /// needed; `Ok(Some((envelope, consumed)))` gives the envelope and its size on the wire.
    pub fn decode_prefix(buf: &'a [u8]) -> Result<Option<(Self, usize)>, EnvelopeError> {
        let (kind, declared) = match Self::header(buf) {
            Ok(header) => header,
            Err(EnvelopeError::Truncated) => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = usize::from(declared);
        Ok(buf
            .get(ENVELOPE_HEADER_LEN..len)
            .map(|payload| (Self { kind, payload }, len)))
    }

    fn header(buf: &[u8]) -> Result<(EnvelopeType, u16), EnvelopeError> {
        let [kind, hi, lo] = *buf.first_chunk::<3>().ok_or(EnvelopeError::Truncated)?;
        let declared = u16::from_be_bytes([hi, lo]);
        if usize::from(declared) < ENVELOPE_HEADER_LEN {
            return Err(EnvelopeError::BadLength(declared));
        }
        Ok((EnvelopeType(kind), declared))
    }

    /// The header for an envelope of `kind` around `payload_len` octets, for callers that
    /// write the payload themselves (the data path, to avoid a copy).
    pub fn header_bytes(
        kind: EnvelopeType,
        payload_len: usize,
    ) -> Result<[u8; ENVELOPE_HEADER_LEN], PayloadTooLarge> {
        let total = u16::try_from(payload_len + ENVELOPE_HEADER_LEN)
            .map_err(|_| PayloadTooLarge(payload_len))?;
        let [hi, lo] = total.to_be_bytes();
        Ok([kind.0, hi, lo])
    }

    /// Writes a whole envelope of `kind` around `payload`.
    pub fn encode(
        kind: EnvelopeType,
        payload: &[u8],
        out: &mut impl BufMut,
    ) -> Result<(), PayloadTooLarge> {
        out.put_slice(&Self::header_bytes(kind, payload.len())?);
        out.put_slice(payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_length_must_match() {
        let dgram = [0x04, 0x00, 0x05, 0xaa, 0xbb];
        let env = Envelope::decode_datagram(&dgram).expect("valid");
        assert_eq!(env.kind, EnvelopeType::DATA);
        assert_eq!(env.payload, &[0xaa, 0xbb]);
        assert_eq!(
            Envelope::decode_datagram(&dgram[..4]),
            Err(EnvelopeError::LengthMismatch {
                declared: 5,
                actual: 4
            })
        );
        assert_eq!(
            Envelope::decode_datagram(&[0x05, 0x00]),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            Envelope::decode_datagram(&[0x05, 0x00, 0x02]),
            Err(EnvelopeError::BadLength(2))
        );
    }

    #[test]
    fn prefix_waits_for_the_whole_envelope() {
        let bytes = [0x05, 0x00, 0x04, 0x01, 0x04, 0x00, 0x03];
        assert_eq!(Envelope::decode_prefix(&bytes[..2]), Ok(None));
        assert_eq!(Envelope::decode_prefix(&bytes[..3]), Ok(None));
        let (env, used) = Envelope::decode_prefix(&bytes)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            (env.kind, env.payload, used),
            (EnvelopeType::CONTROL, &[0x01][..], 4)
        );
        let (empty, used) = Envelope::decode_prefix(&bytes[4..])
            .expect("valid")
            .expect("complete");
        assert_eq!((empty.payload.len(), used), (0, 3));
    }

    #[test]
    fn encode_refuses_oversized_payloads() {
        let mut out = Vec::new();
        assert!(Envelope::encode(EnvelopeType::DATA, &vec![0; MAX_PAYLOAD_LEN], &mut out).is_ok());
        assert_eq!(out.len(), MAX_ENVELOPE_LEN);
        assert_eq!(
            Envelope::header_bytes(EnvelopeType::DATA, MAX_PAYLOAD_LEN + 1),
            Err(PayloadTooLarge(MAX_PAYLOAD_LEN + 1))
        );
    }
}
