//! Release notices across directors (`docs/PROTOCOL.md` §7.6, §9.5): each director remembers
//! which of its tunnels were introduced to which clients of other directors, and when one of
//! its tunnels closes it tells the directors holding its partners with a Peer Gone, which turn
//! it into the usual release notice. A link is trusted for its own clients only: a Peer Gone
//! counts only for an introduction made through that link, and never names a local client as
//! departed.

use core::net::IpAddr;
use std::time::Instant;

use super::{RemotePeer, MAX_PEERS_PER_TUNNEL};
use crate::cluster::{DirectorName, MeshMessage};
use crate::director::SessionDirector;

impl SessionDirector {
    /// Local tunnel `id` was introduced to `addr`, a client of director `via`.
    pub(super) fn remember_remote_peer(&mut self, id: u64, addr: IpAddr, via: DirectorName) {
        if !self.tunnels.contains_key(&id) {
            return;
        }
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let list = c.mesh.introduced.entry(id).or_default();
        list.retain(|p| p.addr != addr);
        if list.len() >= MAX_PEERS_PER_TUNNEL {
            list.remove(0);
        }
        list.push(RemotePeer { addr, via });
    }

    /// Local tunnel `id`'s client released its peer tunnel with `addr`, a client of another
    /// director: it is not told when that one leaves.
    pub(in crate::director) fn remote_peer_released(&mut self, id: u64, addr: IpAddr) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        if let Some(list) = c.mesh.introduced.get_mut(&id) {
            list.retain(|p| p.addr != addr);
            if list.is_empty() {
                c.mesh.introduced.remove(&id);
            }
        }
    }

    /// Local tunnel `id` left for another director: its introductions across directors are
    /// forgotten without a word (its client is still there, elsewhere).
    pub(in crate::director) fn remote_peers_forget(&mut self, id: u64) {
        if let Some(c) = self.cluster.as_deref_mut() {
            c.mesh.introduced.remove(&id);
        }
    }

    /// Local tunnel `id`, which held `addresses`, closed: each director holding a client it
    /// was introduced to gets one Peer Gone per departed address, naming those clients.
    pub(in crate::director) fn remote_peers_gone(&mut self, id: u64, addresses: &[IpAddr]) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(peers) = c.mesh.introduced.remove(&id) else {
            return;
        };
        // Grouped by director and departed address; at most MAX_PEERS_PER_TUNNEL in all.
        let mut gone: Vec<(DirectorName, IpAddr, Vec<IpAddr>)> = Vec::new();
        for peer in peers {
            // The introduction named the departed client in the partner's family.
            let Some(&departed) = addresses
                .iter()
                .find(|a| a.is_ipv6() == peer.addr.is_ipv6())
            else {
                continue;
            };
            match gone
                .iter_mut()
                .find(|(via, d, _)| *via == peer.via && *d == departed)
            {
                Some((_, _, partners)) => partners.push(peer.addr),
                None => gone.push((peer.via, departed, vec![peer.addr])),
            }
        }
        for (via, departed, partners) in gone {
            let connection = self
                .cluster
                .as_deref()
                .and_then(|c| c.mesh.links.get(&via))
                .map(|l| l.connection);
            let Some(connection) = connection else {
                self.stats.cluster.mesh_dropped.no_link += 1;
                continue;
            };
            self.send_mesh(connection, &MeshMessage::PeerGone { departed, partners });
            self.stats.cluster.peer_gone_sent += 1;
        }
    }

    /// Director `name` says its client at `departed` closed its tunnel: each partner named
    /// that this director holds and introduced to `departed` through `name` gets a release
    /// notice (held if its tunnel is persistent), once.
    pub(super) fn peer_gone_from_mesh(
        &mut self,
        now: Instant,
        name: &DirectorName,
        departed: IpAddr,
        partners: &[IpAddr],
    ) {
        // A link speaks for its own clients only.
        if self.by_addr.contains_key(&departed) || !self.in_pools(departed) {
            self.stats.cluster.mesh_dropped.spoofed_source += 1;
            return;
        }
        for partner in partners {
            let id = self.by_addr.get(partner).copied();
            let introduced = id.is_some_and(|id| {
                let Some(c) = self.cluster.as_deref_mut() else {
                    return false;
                };
                let Some(list) = c.mesh.introduced.get_mut(&id) else {
                    return false;
                };
                let Some(k) = list
                    .iter()
                    .position(|p| p.addr == departed && p.via == *name)
                else {
                    return false;
                };
                list.remove(k);
                if list.is_empty() {
                    c.mesh.introduced.remove(&id);
                }
                true
            });
            match id.filter(|_| introduced) {
                Some(id) => self.send_release_notice(now, id, departed),
                None => self.stats.cluster.mesh_dropped.not_introduced += 1,
            }
        }
    }

    /// The clients of other directors that local tunnel `id` is remembered to have been
    /// introduced to.
    #[cfg(test)]
    pub(in crate::director) fn remote_peers(&self, id: u64) -> Vec<IpAddr> {
        self.cluster
            .as_deref()
            .and_then(|c| c.mesh.introduced.get(&id))
            .map(|l| l.iter().map(|p| p.addr).collect())
            .unwrap_or_default()
    }
}
