//! The messages directors of a cluster exchange on their mesh links (`docs/PROTOCOL.md` §9).
//!
//! A mesh link is a mutually authenticated TLS stream between two directors. It carries Data
//! envelopes (relayed inner packets) and Mesh envelopes (type `0x06`), each holding one
//! [`MeshMessage`]: a kind octet and its body. Peer introductions reuse the control message
//! codec of §3 for what they carry.
//!
//! No input makes any function here panic: decoding reads through a bounded [`Reader`].

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BufMut;

use super::DirectorName;
use crate::wire::{Envelope, EnvelopeType, PayloadTooLarge, Reader};

/// One message of a mesh link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshMessage<'a> {
    /// The first message each side sends: its name (`0x01`).
    Hello(DirectorName),
    /// A packet for `0` came and the receiver holds no tunnel with that address: the sender
    /// forgets its route (`0x02`).
    NotHere(IpAddr),
    /// The sender now holds tunnel `id` and its addresses: it adopted it (`0x03`). A receiver
    /// that held the tunnel drops it; every receiver routes the addresses to the sender.
    Adopted {
        /// The tunnel.
        id: u64,
        /// Its internal addresses (one or two).
        addresses: Vec<IpAddr>,
    },
    /// A peer Establish for the client at `destination`, held by the receiver (`0x04`).
    PeerRequest {
        /// Names the exchange; the answer carries it back.
        exchange: u32,
        /// The destination client's internal address.
        destination: IpAddr,
        /// An encoded Client Service Request (§7.3), unsigned, tunnel id 0: what the
        /// destination's client is to be sent, save its header's sequence and tunnel id.
        request: &'a [u8],
    },
    /// The answer to a [`PeerRequest`](Self::PeerRequest) (`0x05`).
    PeerAnswer {
        /// The exchange answered.
        exchange: u32,
        /// An encoded Client Service Response: the destination client's answer (its result,
        /// candidates, connection info and fingerprint), or the destination director's refusal.
        response: &'a [u8],
    },
    /// The sender's client at `departed` closed its tunnel; the receiver's clients at
    /// `partners` were introduced to it across the two directors (`0x06`). Each partner the
    /// receiver holds, and introduced to `departed` through the sender, gets a release notice.
    PeerGone {
        /// The departed client's internal address.
        departed: IpAddr,
        /// The receiver's clients introduced to it: 1 to [`MAX_PEER_GONE_PARTNERS`].
        partners: Vec<IpAddr>,
    },
}

/// The most partners one [`MeshMessage::PeerGone`] names: the most peers a director remembers
/// for one tunnel.
pub const MAX_PEER_GONE_PARTNERS: usize = 64;

/// A mesh message that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed mesh message")]
pub struct BadMeshMessage;

const HELLO: u8 = 0x01;
const NOT_HERE: u8 = 0x02;
const ADOPTED: u8 = 0x03;
const PEER_REQUEST: u8 = 0x04;
const PEER_ANSWER: u8 = 0x05;
const PEER_GONE: u8 = 0x06;

impl<'a> MeshMessage<'a> {
    /// Decodes the payload of a Mesh envelope.
    pub fn decode(payload: &'a [u8]) -> Result<Self, BadMeshMessage> {
        let mut r = Reader::new(payload);
        let message = match r.u8().ok_or(BadMeshMessage)? {
            HELLO => {
                let len = r.u8().ok_or(BadMeshMessage)?;
                let name = r.take(usize::from(len)).ok_or(BadMeshMessage)?;
                let name = core::str::from_utf8(name).map_err(|_| BadMeshMessage)?;
                Self::Hello(DirectorName::new(name).map_err(|_| BadMeshMessage)?)
            }
            NOT_HERE => Self::NotHere(read_addr(&mut r)?),
            ADOPTED => {
                let id = r.u64().ok_or(BadMeshMessage)?;
                let count = r.u8().ok_or(BadMeshMessage)?;
                if !(1..=2).contains(&count) {
                    return Err(BadMeshMessage);
                }
                let addresses = (0..count)
                    .map(|_| read_addr(&mut r))
                    .collect::<Result<_, _>>()?;
                Self::Adopted { id, addresses }
            }
            PEER_REQUEST => {
                let exchange = r.u32().ok_or(BadMeshMessage)?;
                let destination = read_addr(&mut r)?;
                Self::PeerRequest {
                    exchange,
                    destination,
                    request: r.rest(),
                }
            }
            PEER_ANSWER => {
                let exchange = r.u32().ok_or(BadMeshMessage)?;
                Self::PeerAnswer {
                    exchange,
                    response: r.rest(),
                }
            }
            PEER_GONE => {
                let departed = read_addr(&mut r)?;
                let count = usize::from(r.u8().ok_or(BadMeshMessage)?);
                if !(1..=MAX_PEER_GONE_PARTNERS).contains(&count) {
                    return Err(BadMeshMessage);
                }
                let partners = (0..count)
                    .map(|_| read_addr(&mut r))
                    .collect::<Result<_, _>>()?;
                Self::PeerGone { departed, partners }
            }
            _ => return Err(BadMeshMessage),
        };
        if r.is_empty() {
            Ok(message)
        } else {
            Err(BadMeshMessage)
        }
    }

    /// Writes the message in a Mesh envelope into `out`.
    pub fn encode_envelope(&self, out: &mut Vec<u8>) -> Result<(), PayloadTooLarge> {
        let mut payload = Vec::new();
        match self {
            Self::Hello(name) => {
                payload.put_u8(HELLO);
                // A name is at most 63 octets.
                payload.put_u8(name.as_str().len() as u8);
                payload.put_slice(name.as_str().as_bytes());
            }
            Self::NotHere(addr) => {
                payload.put_u8(NOT_HERE);
                write_addr(&mut payload, *addr);
            }
            Self::Adopted { id, addresses } => {
                payload.put_u8(ADOPTED);
                payload.put_u64(*id);
                let addresses = &addresses[..addresses.len().min(2)];
                payload.put_u8(addresses.len() as u8);
                for addr in addresses {
                    write_addr(&mut payload, *addr);
                }
            }
            Self::PeerRequest {
                exchange,
                destination,
                request,
            } => {
                payload.put_u8(PEER_REQUEST);
                payload.put_u32(*exchange);
                write_addr(&mut payload, *destination);
                payload.put_slice(request);
            }
            Self::PeerAnswer { exchange, response } => {
                payload.put_u8(PEER_ANSWER);
                payload.put_u32(*exchange);
                payload.put_slice(response);
            }
            Self::PeerGone { departed, partners } => {
                payload.put_u8(PEER_GONE);
                write_addr(&mut payload, *departed);
                let partners = &partners[..partners.len().min(MAX_PEER_GONE_PARTNERS)];
                // At most 64.
                payload.put_u8(partners.len() as u8);
                for addr in partners {
                    write_addr(&mut payload, *addr);
                }
            }
        }
        Envelope::encode(EnvelopeType::MESH, &payload, out)
    }
}

/// An address: its family (4 or 6) and its octets.
fn read_addr(r: &mut Reader<'_>) -> Result<IpAddr, BadMeshMessage> {
    match r.u8() {
        Some(4) => Ok(IpAddr::V4(Ipv4Addr::from(
            r.array::<4>().ok_or(BadMeshMessage)?,
        ))),
        Some(6) => Ok(IpAddr::V6(Ipv6Addr::from(
            r.array::<16>().ok_or(BadMeshMessage)?,
        ))),
        _ => Err(BadMeshMessage),
    }
}

fn write_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            out.put_u8(4);
            out.put_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.put_u8(6);
            out.put_slice(&a.octets());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: &MeshMessage<'_>) {
        let mut out = Vec::new();
        m.encode_envelope(&mut out).expect("fits");
        let env = Envelope::decode_datagram(&out).expect("an envelope");
        assert_eq!(env.kind, EnvelopeType::MESH);
        assert_eq!(&MeshMessage::decode(env.payload).expect("decodes"), m);
    }

    #[test]
    fn every_kind_round_trips() {
        let name = DirectorName::new("dir-b").expect("a name");
        round_trip(&MeshMessage::Hello(name));
        round_trip(&MeshMessage::NotHere("10.77.0.9".parse().expect("addr")));
        round_trip(&MeshMessage::Adopted {
            id: 0xfeed,
            addresses: vec![
                "10.77.0.9".parse().expect("addr"),
                "fd77::9".parse().expect("addr"),
            ],
        });
        round_trip(&MeshMessage::PeerRequest {
            exchange: 7,
            destination: "fd77::3".parse().expect("addr"),
            request: &[1, 2, 3],
        });
        round_trip(&MeshMessage::PeerAnswer {
            exchange: 7,
            response: &[9],
        });
        round_trip(&MeshMessage::PeerGone {
            departed: "10.77.0.9".parse().expect("addr"),
            partners: vec![
                "10.77.1.3".parse().expect("addr"),
                "10.77.1.4".parse().expect("addr"),
            ],
        });
    }

    #[test]
    fn peer_gone_is_specified_bytes() {
        let mut out = Vec::new();
        MeshMessage::PeerGone {
            departed: "10.77.0.9".parse().expect("addr"),
            partners: vec!["10.77.1.3".parse().expect("addr")],
        }
        .encode_envelope(&mut out)
        .expect("fits");
        assert_eq!(
            out,
            [0x06, 0x00, 0x0f, 0x06, 4, 10, 77, 0, 9, 1, 4, 10, 77, 1, 3]
        );
    }

    #[test]
    fn hello_is_specified_bytes() {
        let mut out = Vec::new();
        let name = DirectorName::new("ab").expect("a name");
        MeshMessage::Hello(name)
            .encode_envelope(&mut out)
            .expect("fits");
        assert_eq!(out, [0x06, 0x00, 0x07, 0x01, 0x02, b'a', b'b']);
    }

    #[test]
    fn malformed_messages_are_refused() {
        for bad in [
            &[][..],
            &[0x09],
            &[HELLO, 3, b'a', b'b'],
            &[HELLO, 1, b'A'],
            &[NOT_HERE, 5, 1, 2, 3, 4],
            &[NOT_HERE, 4, 1, 2, 3, 4, 0],
            &[ADOPTED, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            &[ADOPTED, 0, 0, 0, 0, 0, 0, 0, 1, 3, 4, 1, 2, 3, 4],
            &[PEER_GONE, 4, 1, 2, 3, 4, 0],
            &[PEER_GONE, 4, 1, 2, 3, 4, 65],
            &[PEER_GONE, 4, 1, 2, 3, 4, 2, 4, 1, 2, 3, 4],
            &[PEER_GONE, 4, 1, 2, 3, 4, 1, 4, 1, 2, 3, 4, 0],
        ] {
            assert_eq!(MeshMessage::decode(bad), Err(BadMeshMessage), "{bad:?}");
        }
    }
}
