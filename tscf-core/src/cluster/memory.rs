//! The registry in memory, with the semantics the Redis one has: the simulator's and the
//! tests' registry, and the reference the Redis adapter is checked against.

use core::net::{IpAddr, SocketAddr};
use std::collections::BTreeMap;
use std::time::Instant;

use super::{AddressHolder, DirectorName, RegistryRequest, RegistryResponse, TunnelRecord};

/// A registry in one process. Leases expire against the `now` of each call.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    directors: BTreeMap<DirectorName, (SocketAddr, Instant)>,
    tunnels: BTreeMap<u64, (TunnelRecord, Instant)>,
    addresses: BTreeMap<IpAddr, (AddressHolder, Instant)>,
    /// While set, every request fails (the store is down).
    down: bool,
    operations: u64,
    lookups: u64,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the store down (every request fails) or brings it back, empty when `wiped`.
    pub fn set_down(&mut self, down: bool, wiped: bool) {
        self.down = down;
        if wiped {
            self.directors.clear();
            self.tunnels.clear();
            self.addresses.clear();
        }
    }

    /// Requests executed so far, failed ones included.
    pub fn operations(&self) -> u64 {
        self.operations
    }

    /// `GetTunnel` requests executed so far.
    pub fn lookups(&self) -> u64 {
        self.lookups
    }

    /// Executes `request` at `now`.
    pub fn execute(&mut self, now: Instant, request: &RegistryRequest) -> RegistryResponse {
        self.operations += 1;
        if matches!(request, RegistryRequest::GetTunnel { .. }) {
            self.lookups += 1;
        }
        if self.down {
            return RegistryResponse::Failed("registry down".to_owned());
        }
        self.expire(now);
        match request {
            RegistryRequest::Heartbeat { name, mesh, lease } => {
                self.directors.insert(name.clone(), (*mesh, now + *lease));
                let alive = self.directors.iter().map(|(n, (m, _))| (n.clone(), *m));
                RegistryResponse::Directors(alive.collect())
            }
            RegistryRequest::Claim { addr, owner, lease } => {
                if self.addresses.contains_key(addr) {
                    return RegistryResponse::Claimed(false);
                }
                let holder = AddressHolder {
                    owner: owner.clone(),
                    tunnel: 0,
                };
                self.addresses.insert(*addr, (holder, now + *lease));
                RegistryResponse::Claimed(true)
            }
            RegistryRequest::Put { record, lease } => {
                let until = now + *lease;
                for addr in record.addresses() {
                    let holder = AddressHolder {
                        owner: record.owner.clone(),
                        tunnel: record.id,
                    };
                    self.addresses.insert(addr, (holder, until));
                }
                self.tunnels.insert(record.id, (record.clone(), until));
                RegistryResponse::Done
            }
            RegistryRequest::Renew {
                owner,
                tunnels,
                addresses,
                lease,
            } => {
                let until = now + *lease;
                for id in tunnels {
                    match self.tunnels.get_mut(id) {
                        Some((record, at)) if record.owner == *owner => *at = until,
                        _ => {}
                    }
                }
                for addr in addresses {
                    match self.addresses.get_mut(addr) {
                        Some((holder, at)) if holder.owner == *owner => *at = until,
                        _ => {}
                    }
                }
                RegistryResponse::Done
            }
            RegistryRequest::Remove {
                id,
                addresses,
                owner,
            } => {
                if self
                    .tunnels
                    .get(id)
                    .is_some_and(|(record, _)| record.owner == *owner)
                {
                    self.tunnels.remove(id);
                }
                for addr in addresses {
                    if self
                        .addresses
                        .get(addr)
                        .is_some_and(|(holder, _)| holder.owner == *owner)
                    {
                        self.addresses.remove(addr);
                    }
                }
                RegistryResponse::Done
            }
            RegistryRequest::GetTunnel { id } => {
                RegistryResponse::Tunnel(self.tunnels.get(id).map(|(r, _)| r.clone()))
            }
            RegistryRequest::GetAddress { addr } => {
                RegistryResponse::Address(self.addresses.get(addr).map(|(h, _)| h.clone()))
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        self.directors.retain(|_, (_, until)| *until > now);
        self.tunnels.retain(|_, (_, until)| *until > now);
        self.addresses.retain(|_, (_, until)| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::SALT_LEN;
    use core::net::Ipv4Addr;
    use core::time::Duration;

    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    fn t0() -> Instant {
        Instant::now()
    }

    fn name(n: &str) -> DirectorName {
        DirectorName::new(n).expect("a name")
    }

    #[test]
    fn a_claim_is_granted_once_until_its_lease_ends() {
        let mut r = MemoryRegistry::new();
        let t0 = t0();
        let addr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9));
        let lease = Duration::from_secs(5);
        let claim = |owner: &str| RegistryRequest::Claim {
            addr,
            owner: name(owner),
            lease,
        };
        assert_eq!(r.execute(t0, &claim("a")), RegistryResponse::Claimed(true));
        assert_eq!(r.execute(t0, &claim("b")), RegistryResponse::Claimed(false));
        let later = t0 + lease;
        assert_eq!(
            r.execute(later, &claim("b")),
            RegistryResponse::Claimed(true)
        );
    }

    #[test]
    fn a_record_survives_its_round_trip_and_only_its_owner_removes_it() {
        let record = TunnelRecord {
            id: 0xfeed,
            ipv4: Some(Ipv4Addr::new(10, 77, 0, 2)),
            ipv6: None,
            salt: [7; SALT_LEN],
            owner: name("dir-a"),
        };
        let value = record.to_value();
        assert_eq!(
            TunnelRecord::from_value(0xfeed, &value),
            Some(record.clone())
        );
        assert_eq!(TunnelRecord::from_value(1, "dir-a 10.77.0.2 - 07"), None);

        let mut r = MemoryRegistry::new();
        let t0 = t0();
        let lease = Duration::from_secs(60);
        r.execute(
            t0,
            &RegistryRequest::Put {
                record: record.clone(),
                lease,
            },
        );
        let addresses: Vec<IpAddr> = record.addresses().collect();
        let remove = |owner: &str| RegistryRequest::Remove {
            id: record.id,
            addresses: addresses.clone(),
            owner: name(owner),
        };
        r.execute(t0, &remove("dir-b"));
        let get = RegistryRequest::GetTunnel { id: record.id };
        assert_eq!(
            r.execute(t0, &get),
            RegistryResponse::Tunnel(Some(record.clone()))
        );
        let holder = r.execute(t0, &RegistryRequest::GetAddress { addr: addresses[0] });
        let expected = AddressHolder {
            owner: name("dir-a"),
            tunnel: 0xfeed,
        };
        assert_eq!(holder, RegistryResponse::Address(Some(expected)));
        r.execute(t0, &remove("dir-a"));
        assert_eq!(r.execute(t0, &get), RegistryResponse::Tunnel(None));
    }

    #[test]
    fn a_director_whose_lease_ended_is_not_listed() {
        let mut r = MemoryRegistry::new();
        let t0 = t0();
        let mesh: SocketAddr = "192.0.2.1:4450".parse().expect("an address");
        let beat = |n: &str| RegistryRequest::Heartbeat {
            name: name(n),
            mesh,
            lease: Duration::from_secs(3),
        };
        r.execute(t0, &beat("a"));
        let later = t0 + Duration::from_secs(2);
        let RegistryResponse::Directors(both) = r.execute(later, &beat("b")) else {
            panic!("a heartbeat lists directors");
        };
        assert_eq!(both.len(), 2);
        let RegistryResponse::Directors(one) = r.execute(t0 + Duration::from_secs(4), &beat("b"))
        else {
            panic!("a heartbeat lists directors");
        };
        assert_eq!(one, vec![(name("b"), mesh)]);
    }
}
