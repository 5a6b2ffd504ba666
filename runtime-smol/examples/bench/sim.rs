//! Peer tunnel setup time in the core's deterministic simulator: two clients on the internet
//! without NAT, the server 50 ms away (round trip), the peers 2 ms apart.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tscf_core::client::{ClientConfig, ClientEvent, PeerConfig};
use tscf_core::director::DirectorConfig;
use tscf_core::sim::world::World;
use tscf_core::sim::LinkConfig;
use tscf_core::wire::Transport;

/// Client ↔ server round trip, and client ↔ client.
pub(crate) const SERVER_RTT: Duration = Duration::from_millis(50);
pub(crate) const PEER_RTT: Duration = Duration::from_millis(2);
const MEDIA: u16 = 5004;

/// From the first opted-in datagram to the first one the initiator sends on the peer tunnel,
/// with `seed`; the destination announced its candidates beforehand.
pub(crate) fn setup_time(seed: u64) -> Duration {
    let access = PEER_RTT / 4;
    let director = SERVER_RTT / 2 - access;
    let mut w = World::new(seed, DirectorConfig::default(), director);
    let config = || ClientConfig::new(vec![World::endpoint(Transport::UDP)]);
    let peer = || PeerConfig::new(Vec::new(), Vec::new());
    let link = LinkConfig::with_latency(access);
    let ip = |n| IpAddr::V4(Ipv4Addr::new(198, 18, 0, n));
    let a = w.add_peer_client(None, ip(10), link.clone(), config(), peer());
    let b = w.add_peer_client(None, ip(11), link, config(), peer());
    let ready = |w: &World, i: usize| {
        w.connected(i)
            && w.nodes[i]
                .events
                .iter()
                .any(|e| matches!(e, ClientEvent::NatDiscovered { .. }))
    };
    let deadline = w.now() + Duration::from_secs(30);
    assert!(w.run_until_cond(deadline, |w| ready(w, a) && ready(w, b)));
    // Let the Announce reach the director.
    w.run_for(SERVER_RTT);
    for i in [a, b] {
        w.nodes[i].client.set_peer_tunneling(MEDIA, true);
    }
    let to = w.nodes[b].client.internal_ipv4().expect("an address");
    let start = w.now();
    while w.now() < start + Duration::from_secs(3) {
        w.send_udp_ports(a, MEDIA, to, MEDIA, b"media");
        if w.nodes[a].client.stats().peer.data_sent > 0 {
            return w.now() - start;
        }
        w.run_for(Duration::from_millis(1));
    }
    panic!("no peer tunnel in 3 s of simulated time (seed {seed})");
}
