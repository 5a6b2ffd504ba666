//! Simulator scenarios: the session director and tunnel clients over lossy links and NATs,
//! in virtual time. Every scenario runs under a seed guard that prints its seed on failure.

mod peer;
mod secure;
mod tunnels;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tscf_core::client::{ClientConfig, ClientEvent};
use tscf_core::sim::world::{World, DIRECTOR_IP, UDP_PORT};
use tscf_core::sim::LinkConfig;
use tscf_core::wire::{Envelope, EnvelopeType, Message, Transport};

/// The public address of the `i`-th client host.
pub fn client_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1))
}

/// Adds a client on the internet with an access link of `link`, using `transport`.
pub fn add_client(world: &mut World, i: usize, transport: Transport, link: LinkConfig) -> usize {
    let config = ClientConfig::new(vec![World::endpoint(transport)]);
    world.add_client(None, client_ip(i), link, config)
}

/// How many `Connected` events client `i` has seen.
pub fn connected_events(world: &World, i: usize) -> Vec<u64> {
    world.nodes[i]
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Connected(info) => Some(info.tunnel_id),
            _ => None,
        })
        .collect()
}

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A host that speaks the wire protocol by hand, over UDP to the director.
pub struct RawHost {
    /// Its UDP address.
    pub addr: SocketAddr,
}

impl RawHost {
    /// Adds it to the world at `ip`.
    pub fn new(world: &mut World, ip: IpAddr) -> Self {
        world.add_raw_host(None, ip, LinkConfig::with_latency(ms(5)));
        Self {
            addr: SocketAddr::new(ip, 7000),
        }
    }

    /// Sends a control message to the director.
    pub fn send(&self, world: &mut World, message: &Message<'_>) {
        let mut bytes = Vec::new();
        message.encode_envelope(&mut bytes).expect("encodable");
        self.send_bytes(world, &bytes);
    }

    /// Sends raw bytes to the director.
    pub fn send_bytes(&self, world: &mut World, bytes: &[u8]) {
        world
            .net
            .send_datagram(self.addr, SocketAddr::new(DIRECTOR_IP, UDP_PORT), bytes);
    }

    /// The control messages that reached this host, as owned envelopes.
    pub fn received(&self, world: &mut World) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        world.unclaimed.retain(|d| match &d.event {
            tscf_core::sim::NetEvent::Datagram { to, payload, .. } if *to == self.addr => {
                out.push(payload.clone());
                false
            }
            _ => true,
        });
        out
    }
}

/// Decodes a control envelope.
pub fn control(bytes: &[u8]) -> Message<'_> {
    let env = Envelope::decode_datagram(bytes).expect("envelope");
    assert_eq!(env.kind, EnvelopeType::CONTROL);
    Message::decode(env.payload).expect("valid message")
}
