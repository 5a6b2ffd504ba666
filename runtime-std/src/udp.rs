//! The part of a server's UDP listener that does not depend on how a runtime waits, shared by
//! this crate's [`Server`](crate::Server) and the smol runtime's: which datagrams are STUN and
//! which are envelopes, and which director connection each remote is.
//!
//! A UDP listener reads a datagram, asks [`demux`] what it is, and then sends the STUN answer,
//! feeds the envelope through [`UdpPeers::handle_datagram`] (which connects a new remote to
//! the director first), or counts a drop. The runtime keeps its own route to each connection.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tscf_core::director::{ConnectionHandle, ConnectionInfo, SessionDirector};
use tscf_core::stun;
use tscf_core::wire::{DatagramKind, Transport};

/// What a UDP listener does with one received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demux {
    /// A STUN Binding request: send the answer [`demux`] wrote back to the sender (count it
    /// in `stun_answered`).
    Answer,
    /// A tscf envelope: hand it to the director with [`UdpPeers::handle_datagram`].
    Envelope,
    /// Neither: drop it (count it in `udp_dropped`).
    Drop,
}

/// Sorts `datagram` from `from` by its first octet: 0 to 3 is STUN (answered in `answer` if
/// it is a valid Binding request), 4 and 5 a tscf envelope, anything else (and an empty
/// datagram) is dropped.
pub fn demux(datagram: &[u8], from: SocketAddr, answer: &mut Vec<u8>) -> Demux {
    match DatagramKind::of(datagram) {
        DatagramKind::Stun => {
            if stun::is_stun(datagram)
                && stun::answer_binding_request(datagram, from, answer).is_ok()
            {
                Demux::Answer
            } else {
                Demux::Drop
            }
        }
        DatagramKind::Envelope => Demux::Envelope,
        _ => Demux::Drop,
    }
}

/// The director connection of each UDP remote, keyed by (listener address, remote address).
/// A remote becomes a connection with its first envelope and stops being one when the
/// director closes it ([`remove`](Self::remove)).
#[derive(Debug, Default)]
pub struct UdpPeers {
    // Keys come from the network: the hasher stays keyed (RandomState) against hash flooding.
    peers: HashMap<PeerKey, ConnectionHandle>,
}

/// (listener address, remote address). Hashed as one run of octets (addresses and ports) in a
/// single hasher write: `SocketAddr`'s own `Hash` makes six writes per pair, and the one write
/// saves about 5% of the instructions a relayed UDP packet costs. An IPv4 address and its
/// IPv4-mapped IPv6 form hash alike but stay different keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerKey(SocketAddr, SocketAddr);

impl Hash for PeerKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut octets = [0u8; 36];
        let mut n = 0;
        for addr in [self.0, self.1] {
            let ip = match addr.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                IpAddr::V6(ip) => ip.octets(),
            };
            octets[n..n + 16].copy_from_slice(&ip);
            octets[n + 16..n + 18].copy_from_slice(&addr.port().to_be_bytes());
            n += 18;
        }
        state.write(&octets);
    }
}

impl UdpPeers {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many remotes are connections (`udp_connections` in the server's stats).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no remote is a connection.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Feeds an envelope `datagram` that listener `local` received from `from` to `director`.
    /// A remote not seen before is first connected under the handle `fresh` returns (which
    /// the director must not know). Returns the new handle, so that the runtime can add its
    /// route to the remote, or `None` if the remote already was a connection. Drain the
    /// director afterwards.
    pub fn handle_datagram(
        &mut self,
        director: &mut SessionDirector,
        now: Instant,
        local: SocketAddr,
        from: SocketAddr,
        datagram: &[u8],
        fresh: impl FnOnce() -> ConnectionHandle,
    ) -> Option<ConnectionHandle> {
        let key = PeerKey(local, from);
        let (handle, new) = match self.peers.get(&key) {
            Some(h) => (*h, None),
            None => {
                let h = fresh();
                self.peers.insert(key, h);
                let info = ConnectionInfo {
                    transport: Transport::UDP,
                    remote: from,
                    verified_identity: false,
                };
                // Handles are fresh, so the director cannot know this one.
                let _ = director.handle_connect(now, h, info);
                (h, Some(h))
            }
        };
        director.handle_datagram(now, handle, datagram);
        new
    }

    /// Forgets the remote `peer` of listener `local`, after the director closed its
    /// connection.
    pub fn remove(&mut self, local: SocketAddr, peer: SocketAddr) {
        self.peers.remove(&PeerKey(local, peer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tscf_core::stun::{decode_binding_response, encode_binding_request, TransactionId};

    #[test]
    fn each_listener_and_remote_pair_is_its_own_connection() {
        use tscf_core::director::{DirectorConfig, SessionDirector};
        let mut director = SessionDirector::new(DirectorConfig::default()).expect("config");
        let mut peers = UdpPeers::new();
        let now = Instant::now();
        let local = SocketAddr::from(([127, 0, 0, 1], 4440));
        let v4 = SocketAddr::from(([192, 0, 2, 7], 4000));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().expect("address");
        let other_port = SocketAddr::from(([192, 0, 2, 7], 4001));
        let mut next = 0;
        let mut feed = |peers: &mut UdpPeers, from| {
            peers.handle_datagram(&mut director, now, local, from, &[5, 0, 3], || {
                next += 1;
                ConnectionHandle(next)
            })
        };
        assert_eq!(feed(&mut peers, v4), Some(ConnectionHandle(1)));
        assert_eq!(feed(&mut peers, v4), None, "known");
        assert_eq!(feed(&mut peers, mapped), Some(ConnectionHandle(2)));
        assert_eq!(feed(&mut peers, other_port), Some(ConnectionHandle(3)));
        assert_eq!(peers.len(), 3);
        peers.remove(local, v4);
        assert_eq!(peers.len(), 2);
        assert_eq!(feed(&mut peers, v4), Some(ConnectionHandle(4)), "new again");
    }

    #[test]
    fn demux_answers_stun_passes_envelopes_and_drops_the_rest() {
        let from = SocketAddr::from(([192, 0, 2, 7], 4000));
        let mut request = Vec::new();
        encode_binding_request(TransactionId([9; 12]), &mut request);
        let mut answer = Vec::new();
        assert_eq!(demux(&request, from, &mut answer), Demux::Answer);
        let response = decode_binding_response(&answer).expect("a Binding response");
        assert_eq!(response.mapped, from);
        assert_eq!(response.transaction_id, TransactionId([9; 12]));

        // A first octet of 0..=3 that is not a Binding request is dropped, not answered.
        assert_eq!(demux(&[1, 2, 3], from, &mut answer), Demux::Drop);
        assert_eq!(demux(&[4, 0], from, &mut answer), Demux::Envelope);
        assert_eq!(demux(&[5], from, &mut answer), Demux::Envelope);
        assert_eq!(demux(&[6, 0], from, &mut answer), Demux::Drop);
        assert_eq!(demux(&[], from, &mut answer), Demux::Drop);
    }
}
