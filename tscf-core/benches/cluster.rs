//! What a director of a cluster asks of its registry, sans-IO, against the in-memory registry:
//! prints registry requests and keys touched (the Redis keys one request reads or writes) per
//! tunnel opened, per tunnel re-attached at another director, per tunnel closed, and per
//! tunnel and second of an idle steady state; and configuration exchanges per second on one
//! core in a cluster, next to the same director alone. `docs/CLUSTER.md` turns the numbers
//! into a scaling estimate.
//!
//! Run: `cargo bench -p tscf-core --bench cluster`.

// A benchmark measures wall-clock time; the core it drives still takes time as an argument.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tscf_core::cluster::{
    control_key, ClusterConfig, DirectorName, MemoryRegistry, RegistryRequest, RegistryResponse,
};
use tscf_core::director::{
    ConnectionHandle, ConnectionInfo, DirectorConfig, Ipv4Pool, SessionDirector,
};
use tscf_core::wire::{ControlKey, Envelope, Message, MessageType, ResultCode, Transport};

const SECRET: [u8; 32] = [0x5e; 32];
const TUNNELS: u64 = 20_000;

fn config(name: &str, cluster: bool) -> DirectorConfig {
    let mesh: SocketAddr = "192.0.2.1:4450".parse().expect("an address");
    let cluster = cluster.then(|| {
        let mut c = ClusterConfig::new(DirectorName::new(name).expect("a name"), SECRET, mesh);
        c.address_stock = 256;
        c.max_in_flight = 1 << 20;
        c
    });
    DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 0, 0, 0), 8)),
        ipv6_pool: None,
        max_tunnels: 1_000_000,
        max_pending_connections: 1_000_000,
        rng_seed: [name.len() as u8; 32],
        cluster,
        ..DirectorConfig::default()
    }
}

/// The registry with a count of what was asked of it.
#[derive(Default)]
struct Counted {
    registry: MemoryRegistry,
    requests: BTreeMap<&'static str, u64>,
    keys: u64,
}

impl Counted {
    fn execute(&mut self, now: Instant, request: &RegistryRequest) -> RegistryResponse {
        let (kind, keys) = match request {
            // The director's key, the members' set, and a read of each member's key.
            RegistryRequest::Heartbeat { .. } => ("Heartbeat", 2 + 3),
            RegistryRequest::Claim { .. } => ("Claim", 1),
            RegistryRequest::Put { record, .. } => ("Put", 1 + record.addresses().count()),
            RegistryRequest::Renew {
                tunnels, addresses, ..
            } => ("Renew", tunnels.len() + addresses.len()),
            RegistryRequest::Remove { addresses, .. } => ("Remove", 1 + addresses.len()),
            RegistryRequest::GetTunnel { .. } => ("GetTunnel", 1),
            RegistryRequest::GetAddress { .. } => ("GetAddress", 1),
            _ => ("other", 1),
        };
        *self.requests.entry(kind).or_default() += 1;
        self.keys += keys as u64;
        self.registry.execute(now, request)
    }

    fn take(&mut self) -> (u64, u64) {
        let requests = self.requests.values().sum();
        self.requests.clear();
        (requests, std::mem::take(&mut self.keys))
    }
}

/// Runs `d` until it has nothing more for the registry or the network.
fn pump(d: &mut SessionDirector, registry: &mut Counted, now: Instant, buf: &mut Vec<u8>) {
    loop {
        let mut busy = false;
        while let Some((id, request)) = d.poll_registry() {
            busy = true;
            let response = registry.execute(now, &request);
            d.handle_registry(now, id, response);
        }
        while d.poll_transmit(now, buf).is_some() {
            busy = true;
        }
        while d.poll_event().is_some() {}
        if !busy {
            return;
        }
    }
}

fn info(i: u64) -> ConnectionInfo {
    ConnectionInfo {
        transport: Transport::TLS,
        remote: SocketAddr::from(([198, 51, 100, (i % 250) as u8], 1024 + (i % 60_000) as u16)),
        verified_identity: false,
    }
}

fn signed(message: &Message<'_>, key: &ControlKey) -> Vec<u8> {
    let mut out = Vec::new();
    message
        .encode_envelope_with_integrity(&key.client_to_director(), &mut out)
        .expect("encodable");
    out
}

/// Opens a tunnel on connection `conn`: its id and key.
fn open(
    d: &mut SessionDirector,
    registry: &mut Counted,
    now: Instant,
    conn: u64,
    buf: &mut Vec<u8>,
) -> Option<(u64, ControlKey)> {
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    request.tlvs.client_nonce = Some([0x4e; 16]);
    let mut bytes = Vec::new();
    request.encode_envelope(&mut bytes).expect("encodable");
    let c = ConnectionHandle(conn);
    d.handle_connect(now, c, info(conn)).expect("fresh handle");
    d.handle_datagram(now, c, &bytes);
    let mut opened = None;
    while d.poll_transmit(now, buf).is_some() {
        let envelope = Envelope::decode_datagram(buf).expect("valid");
        let m = Message::decode(envelope.payload).expect("valid");
        if m.tlvs.result_code == Some(ResultCode::SUCCESS) {
            let key = ControlKey::new(&m.tlvs.control_key.expect("a fresh tunnel's key"));
            opened = Some((m.header.tunnel_id, key));
        }
    }
    pump(d, registry, now, buf);
    opened
}

fn per(what: &str, (requests, keys): (u64, u64), n: u64) {
    println!(
        "  {what}: {:.2} registry requests, {:.2} keys",
        requests as f64 / n as f64,
        keys as f64 / n as f64
    );
}

fn main() {
    let t0 = Instant::now();
    let mut registry = Counted::default();
    let mut buf = Vec::new();
    let mut a = SessionDirector::new(config("dir-a", true)).expect("valid");
    let mut b = SessionDirector::new(config("dir-b", true)).expect("valid");
    pump(&mut a, &mut registry, t0, &mut buf);
    pump(&mut b, &mut registry, t0, &mut buf);
    registry.take();

    println!("registry work of a director of a cluster ({TUNNELS} tunnels, defaults: heartbeat 1 s, tunnel lease 330 s):");
    let mut tunnels = Vec::new();
    let mut conn = 0;
    while (tunnels.len() as u64) < TUNNELS {
        conn += 1;
        // A request that finds the stock empty is dropped; the client would retransmit.
        if let Some(t) = open(&mut a, &mut registry, t0, conn, &mut buf) {
            tunnels.push((conn, t));
        }
    }
    per(
        "per tunnel opened (its Put, and the Claim that restocks its address)",
        registry.take(),
        TUNNELS,
    );

    // One lease of idle steady state, heartbeat by heartbeat.
    let lease = Duration::from_secs(330);
    let mut now = t0;
    while now < t0 + lease {
        now += Duration::from_secs(1);
        a.handle_timeout(now);
        pump(&mut a, &mut registry, now, &mut buf);
    }
    let (requests, keys) = registry.take();
    let steady = (requests, keys);
    println!(
        "  per tunnel and second, idle: {:.4} registry requests, {:.4} keys ({:.0} keys/s for {TUNNELS} tunnels)",
        requests as f64 / TUNNELS as f64 / lease.as_secs_f64(),
        keys as f64 / TUNNELS as f64 / lease.as_secs_f64(),
        keys as f64 / lease.as_secs_f64(),
    );
    let _ = steady;

    // A tenth of the tunnels re-attach at director b.
    let moved = TUNNELS / 10;
    for (k, (_, (id, key))) in tunnels.iter().take(moved as usize).enumerate() {
        let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 2, 0);
        request.tlvs.client_nonce = Some([0x4e; 16]);
        request.tlvs.tunnel_id = Some(*id);
        let c = ConnectionHandle(1_000_000 + k as u64);
        b.handle_connect(now, c, info(k as u64))
            .expect("fresh handle");
        b.handle_datagram(now, c, &signed(&request, key));
        pump(&mut b, &mut registry, now, &mut buf);
    }
    assert_eq!(b.tunnels().count() as u64, moved, "every re-attach adopted");
    per(
        "per tunnel re-attached at another director (lookup, adoption)",
        registry.take(),
        moved,
    );

    // The rest close.
    let closing = &tunnels[moved as usize..];
    for (conn, (id, key)) in closing {
        let release = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, 3, *id);
        a.handle_datagram(now, ConnectionHandle(*conn), &signed(&release, key));
        pump(&mut a, &mut registry, now, &mut buf);
    }
    per("per tunnel closed", registry.take(), closing.len() as u64);

    // Configuration exchanges on one core, alone and in a cluster (registry in-process).
    for cluster in [false, true] {
        let mut d = SessionDirector::new(config("dir-c", cluster)).expect("valid");
        let mut registry = Counted::default();
        pump(&mut d, &mut registry, t0, &mut buf);
        let n = 100_000u64;
        let start = Instant::now();
        let mut opened = 0u64;
        for i in 0..n {
            if let Some((id, key)) = open(&mut d, &mut registry, t0, i, &mut buf) {
                opened += 1;
                let release = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, 2, id);
                d.handle_datagram(t0, ConnectionHandle(i), &signed(&release, &key));
                pump(&mut d, &mut registry, t0, &mut buf);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "configuration exchanges {}: {:.0}/s on one core ({opened} of {n} opened and released{})",
            if cluster { "in a cluster" } else { "alone" },
            opened as f64 / secs,
            if cluster { ", the in-memory registry's work included" } else { "" },
        );
    }
    // The registry's key derivation, for the record: one HMAC per tunnel opened or adopted.
    let _ = control_key(&SECRET, 1, &[0; 16]);
}
