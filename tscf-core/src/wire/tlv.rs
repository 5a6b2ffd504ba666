//! TLV framing and the TLV registry (`docs/PROTOCOL.md` §4).
//!
//! Short form: type (1), length (1, `0..=254`), value. Long form: type (1), `0xff`, length (2,
//! `255..=65535`), value. A long form whose length would fit the short form is malformed, so every
//! TLV has exactly one encoding.

use bytes::BufMut;

use super::codes::{MessageType, TlvType};
use super::reader::Reader;

/// The short-form length octet that announces a 2-octet length instead.
const LONG_FORM: u8 = 0xff;

/// One TLV as it appears on the wire, its value borrowed from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawTlv<'a> {
    /// The TLV's type.
    pub ty: TlvType,
    /// The TLV's value.
    pub value: &'a [u8],
}

impl<'a> RawTlv<'a> {
    /// Reads one TLV. The error names the broken rule; the caller treats it as malformed.
    pub fn read(r: &mut Reader<'a>) -> Result<Self, &'static str> {
        let ty = TlvType(r.u8().ok_or("TLV type missing")?);
        let len = match r.u8().ok_or("TLV length missing")? {
            LONG_FORM => {
                let len = r.u16().ok_or("TLV long length missing")?;
                if len < u16::from(LONG_FORM) {
                    return Err("TLV long form used for a short value");
                }
                usize::from(len)
            }
            short => usize::from(short),
        };
        let value = r.take(len).ok_or("TLV value runs past the message")?;
        Ok(Self { ty, value })
    }

    /// Octets a TLV with a value of `value_len` octets occupies.
    pub fn encoded_len(value_len: usize) -> usize {
        if value_len < usize::from(LONG_FORM) {
            2 + value_len
        } else {
            4 + value_len
        }
    }

    /// Writes a TLV in its one canonical form. `value` must be at most 65535 octets; callers
    /// check it against the registry first.
    pub fn write(ty: TlvType, value: &[u8], out: &mut impl BufMut) {
        out.put_u8(ty.0);
        match u8::try_from(value.len()) {
            Ok(short) if short < LONG_FORM => out.put_u8(short),
            _ => {
                out.put_u8(LONG_FORM);
                out.put_u16(u16::try_from(value.len()).unwrap_or(u16::MAX));
            }
        }
        out.put_slice(value);
    }
}

/// The value lengths a TLV may have.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lengths {
    /// One of these exact lengths.
    OneOf(&'static [u16]),
    /// Any length in the inclusive range.
    Range(u16, u16),
}

impl Lengths {
    pub(crate) fn allows(self, len: usize) -> bool {
        match self {
            Lengths::OneOf(lens) => lens.iter().any(|&l| usize::from(l) == len),
            Lengths::Range(lo, hi) => (usize::from(lo)..=usize::from(hi)).contains(&len),
        }
    }
}

/// What the registry says about one TLV type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TlvRule {
    pub(crate) ty: TlvType,
    pub(crate) lengths: Lengths,
    /// How many may appear in one message.
    pub(crate) max_count: u8,
    /// Bit `n` set: message type `n` may carry it.
    pub(crate) messages: u16,
}

const fn bit(t: MessageType) -> u16 {
    1 << t.0
}

const CONF_REQ: u16 = bit(MessageType::CONFIGURATION_REQUEST);
const CONF_RESP: u16 = bit(MessageType::CONFIGURATION_RESPONSE);
const REL_REQ: u16 = bit(MessageType::CONFIGURATION_RELEASE_REQUEST);
const REL_RESP: u16 = bit(MessageType::CONFIGURATION_RELEASE_RESPONSE);
const REL_NOTE: u16 = bit(MessageType::CONFIGURATION_RELEASE_NOTIFICATION);
const REL_NOTE_RESP: u16 = bit(MessageType::CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE);
const KA_RESP: u16 = bit(MessageType::KEEPALIVE_RESPONSE);
const SVC_REQ: u16 = bit(MessageType::CLIENT_SERVICE_REQUEST);
const SVC_RESP: u16 = bit(MessageType::CLIENT_SERVICE_RESPONSE);
const PROBE: u16 = bit(MessageType::PEER_PROBE);
const PROBE_RESP: u16 = bit(MessageType::PEER_PROBE_RESPONSE);
const RESPONSES: u16 = CONF_RESP | REL_RESP | REL_NOTE_RESP | KA_RESP | SVC_RESP | PROBE_RESP;
const ALL: u16 = 0x1ffe;

/// Octets of a Client Nonce.
pub const CLIENT_NONCE_LEN: usize = 16;
/// Octets of a Control Key.
pub const CONTROL_KEY_LEN: usize = 32;

/// Upper bound of an Auth Token value; long enough for a signed bearer token.
pub const MAX_AUTH_TOKEN_LEN: usize = 1024;
/// Upper bound of the free-text TLVs (Software, Diagnostic).
pub const MAX_TEXT_LEN: usize = 255;

/// The TLV registry of `docs/PROTOCOL.md` §4.2, in code order (the canonical encoding order).
pub(crate) const REGISTRY: &[TlvRule] = &[
    rule(
        TlvType::SUPPORTED_VERSION,
        Lengths::Range(1, 16),
        1,
        CONF_REQ | CONF_RESP,
    ),
    rule(TlvType::TUNNEL_ID, Lengths::OneOf(&[8]), 1, CONF_REQ),
    rule(
        TlvType::REATTACH_SECRET,
        Lengths::OneOf(&[16]),
        1,
        CONF_REQ | CONF_RESP,
    ),
    rule(TlvType::INTERNAL_IPV4, Lengths::OneOf(&[5]), 1, CONF_RESP),
    rule(TlvType::INTERNAL_IPV6, Lengths::OneOf(&[17]), 1, CONF_RESP),
    rule(TlvType::DNS_SERVER, Lengths::OneOf(&[4, 16]), 4, CONF_RESP),
    rule(
        TlvType::KEEPALIVE_INTERVAL,
        Lengths::OneOf(&[4]),
        1,
        CONF_REQ | CONF_RESP,
    ),
    rule(
        TlvType::RESULT_CODE,
        Lengths::OneOf(&[2]),
        1,
        RESPONSES | REL_REQ | REL_NOTE,
    ),
    rule(
        TlvType::SERVICE_TYPE,
        Lengths::OneOf(&[1]),
        1,
        SVC_REQ | SVC_RESP,
    ),
    rule(
        TlvType::CONNECTION_INFO,
        Lengths::OneOf(&[7, 19]),
        1,
        SVC_REQ | SVC_RESP,
    ),
    rule(
        TlvType::PEER_SERVICE_RESULT,
        Lengths::OneOf(&[1]),
        1,
        SVC_RESP,
    ),
    rule(
        TlvType::CANDIDATE,
        Lengths::OneOf(&[8, 20]),
        8,
        SVC_REQ | SVC_RESP,
    ),
    rule(
        TlvType::PEER_CREDENTIALS,
        Lengths::OneOf(&[16, 48]),
        1,
        SVC_REQ | SVC_RESP,
    ),
    rule(
        TlvType::CLIENT_CAPABILITIES,
        Lengths::OneOf(&[4]),
        1,
        CONF_REQ | SVC_REQ,
    ),
    rule(
        TlvType::PEER_INTERNAL_ADDRESS,
        Lengths::OneOf(&[4, 16]),
        1,
        CONF_REQ | CONF_RESP | SVC_REQ | SVC_RESP | PROBE | PROBE_RESP,
    ),
    rule(
        TlvType::AUTH_TOKEN,
        Lengths::Range(1, MAX_AUTH_TOKEN_LEN as u16),
        1,
        CONF_REQ,
    ),
    rule(TlvType::SERVICE_ACTION, Lengths::OneOf(&[1]), 1, SVC_REQ),
    rule(
        TlvType::CERTIFICATE_FINGERPRINT,
        Lengths::OneOf(&[32]),
        1,
        SVC_REQ | SVC_RESP,
    ),
    rule(
        TlvType::OBSERVED_ADDRESS,
        Lengths::OneOf(&[6, 18]),
        1,
        CONF_RESP | PROBE_RESP,
    ),
    rule(TlvType::MESSAGE_INTEGRITY, Lengths::OneOf(&[32]), 1, ALL),
    rule(
        TlvType::CLIENT_NONCE,
        Lengths::OneOf(&[CLIENT_NONCE_LEN as u16]),
        1,
        CONF_REQ | CONF_RESP,
    ),
    rule(
        TlvType::CONTROL_KEY,
        Lengths::OneOf(&[CONTROL_KEY_LEN as u16]),
        1,
        CONF_RESP,
    ),
    rule(
        TlvType::SOFTWARE,
        Lengths::Range(0, MAX_TEXT_LEN as u16),
        1,
        ALL,
    ),
    rule(
        TlvType::DIAGNOSTIC,
        Lengths::Range(0, MAX_TEXT_LEN as u16),
        1,
        ALL,
    ),
    rule(TlvType::MAX_PACKET_SIZE, Lengths::OneOf(&[2]), 1, CONF_RESP),
    rule(TlvType::STUN_PORT, Lengths::OneOf(&[2]), 1, CONF_RESP),
];

const fn rule(ty: TlvType, lengths: Lengths, max_count: u8, messages: u16) -> TlvRule {
    TlvRule {
        ty,
        lengths,
        max_count,
        messages,
    }
}

/// Registry index by TLV code, `u8::MAX` for codes the registry does not hold.
const INDEX: [u8; 256] = {
    let mut index = [u8::MAX; 256];
    let mut i = 0;
    while i < REGISTRY.len() {
        index[REGISTRY[i].ty.0 as usize] = i as u8;
        i += 1;
    }
    index
};

/// The registry entry for `ty`, and its index (used to count occurrences).
pub(crate) fn lookup(ty: TlvType) -> Option<(usize, &'static TlvRule)> {
    let i = usize::from(INDEX[usize::from(ty.0)]);
    REGISTRY.get(i).map(|rule| (i, rule))
}

impl TlvRule {
    pub(crate) fn allowed_in(&self, message: MessageType) -> bool {
        message.0 < 16 && self.messages & (1 << message.0) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_forms() {
        let mut out = Vec::new();
        RawTlv::write(TlvType::SOFTWARE, b"ab", &mut out);
        assert_eq!(out, [0x80, 0x02, b'a', b'b']);
        out.clear();
        RawTlv::write(TlvType::AUTH_TOKEN, &[9; 255], &mut out);
        assert_eq!(out[..4], [0x10, 0xff, 0x00, 0xff]);
        assert_eq!(out.len(), RawTlv::encoded_len(255));
        let tlv = RawTlv::read(&mut Reader::new(&out)).expect("valid");
        assert_eq!((tlv.ty, tlv.value.len()), (TlvType::AUTH_TOKEN, 255));
    }

    #[test]
    fn non_canonical_and_truncated_tlvs_are_malformed() {
        assert!(RawTlv::read(&mut Reader::new(&[0x10, 0xff, 0x00, 0x01, 0x00])).is_err());
        assert!(RawTlv::read(&mut Reader::new(&[0x10, 0x03, 0x00])).is_err());
        assert!(RawTlv::read(&mut Reader::new(&[0x10])).is_err());
        assert!(RawTlv::read(&mut Reader::new(&[0x10, 0xff, 0x01])).is_err());
    }

    #[test]
    fn registry_is_in_code_order_and_complete() {
        assert!(REGISTRY.windows(2).all(|w| w[0].ty < w[1].ty));
        for code in 0..=255u8 {
            assert_eq!(
                lookup(TlvType(code)).is_some(),
                TlvType(code).is_known(),
                "{code:#x}"
            );
        }
    }
}
