//! The director connection of each remote address on a datagram listener (UDP or DTLS).
//!
//! Remote addresses come from the network, so the table is hashed with SipHash under keys
//! drawn from the host's seed: nobody outside can make its keys collide.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;

use crate::director::ConnectionHandle;
use crate::io::SocketId;

/// (listener, remote address) → connection.
#[derive(Debug)]
pub(super) struct Remotes {
    map: HashMap<RemoteKey, ConnectionHandle, Keys>,
}

/// A listener and a remote address. Hashed as one run of octets in a single hasher write:
/// `SocketAddr`'s own `Hash` makes several writes per address, and the one write saves a few
/// percent of what a relayed UDP packet costs. An IPv4 address and its IPv4-mapped IPv6 form
/// hash alike but stay different keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RemoteKey(SocketId, SocketAddr);

impl Hash for RemoteKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut octets = [0u8; 22];
        octets[..4].copy_from_slice(&self.0 .0.to_be_bytes());
        let ip = match self.1.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            IpAddr::V6(ip) => ip.octets(),
        };
        octets[4..20].copy_from_slice(&ip);
        octets[20..].copy_from_slice(&self.1.port().to_be_bytes());
        state.write(&octets);
    }
}

/// SipHash-1-3 keys.
#[derive(Clone, Copy, Debug)]
struct Keys(u64, u64);

impl BuildHasher for Keys {
    type Hasher = SipHasher13;

    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.0, self.1)
    }
}

impl Remotes {
    /// An empty table hashed under `keys`.
    pub(super) fn new(keys: (u64, u64)) -> Self {
        Self {
            map: HashMap::with_hasher(Keys(keys.0, keys.1)),
        }
    }

    pub(super) fn get(&self, socket: SocketId, remote: SocketAddr) -> Option<ConnectionHandle> {
        self.map.get(&RemoteKey(socket, remote)).copied()
    }

    pub(super) fn insert(&mut self, socket: SocketId, remote: SocketAddr, c: ConnectionHandle) {
        self.map.insert(RemoteKey(socket, remote), c);
    }

    pub(super) fn remove(&mut self, socket: SocketId, remote: SocketAddr) {
        self.map.remove(&RemoteKey(socket, remote));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_listener_and_remote_pair_is_its_own_entry() {
        let mut remotes = Remotes::new((1, 2));
        let v4 = SocketAddr::from(([192, 0, 2, 7], 4000));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().expect("address");
        let other_port = SocketAddr::from(([192, 0, 2, 7], 4001));
        remotes.insert(SocketId(0), v4, ConnectionHandle(1));
        remotes.insert(SocketId(0), mapped, ConnectionHandle(2));
        remotes.insert(SocketId(0), other_port, ConnectionHandle(3));
        remotes.insert(SocketId(1), v4, ConnectionHandle(4));
        assert_eq!(remotes.len(), 4);
        assert_eq!(remotes.get(SocketId(0), v4), Some(ConnectionHandle(1)));
        assert_eq!(remotes.get(SocketId(0), mapped), Some(ConnectionHandle(2)));
        assert_eq!(remotes.get(SocketId(1), v4), Some(ConnectionHandle(4)));
        remotes.remove(SocketId(0), v4);
        assert_eq!(remotes.get(SocketId(0), v4), None);
        assert_eq!(remotes.get(SocketId(1), v4), Some(ConnectionHandle(4)));
    }
}
