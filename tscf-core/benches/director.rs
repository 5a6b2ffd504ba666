//! Director throughput and memory, sans-IO (no syscalls): prints
//! - configuration exchanges per second on one core,
//! - relayed frames per second on one core,
//! - heap octets per idle tunnel with 200,000 tunnels held.
//!
//! Run: `cargo bench -p tscf-core --bench director`.

// A benchmark measures wall-clock time; the core it drives still takes time as an argument.
#![allow(clippy::disallowed_methods)]

use std::alloc::System;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use tscf_core::director::{
    ConnectionHandle, ConnectionInfo, DirectorConfig, Ipv4Pool, SessionDirector,
};
use tscf_core::wire::{
    ControlKey, Envelope, EnvelopeType, Message, MessageType, ResultCode, Transport,
};

/// Counts heap octets and allocation calls without any unsafe code of ours.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Live heap octets now.
fn live() -> isize {
    let s = GLOBAL.stats();
    s.bytes_allocated as isize + s.bytes_reallocated - s.bytes_deallocated as isize
}

fn allocations() -> usize {
    let s = GLOBAL.stats();
    s.allocations + s.reallocations
}

fn config() -> DirectorConfig {
    DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 0, 0, 0), 8)),
        ipv6_pool: None,
        max_tunnels: 1_000_000,
        max_pending_connections: 1_000_000,
        rng_seed: [7; 32],
        ..DirectorConfig::default()
    }
}

fn info(i: u64) -> ConnectionInfo {
    ConnectionInfo {
        transport: Transport::TLS,
        remote: SocketAddr::from(([198, 51, 100, (i % 250) as u8], 1024 + (i % 60_000) as u16)),
        verified_identity: false,
    }
}

/// A client's Configuration Request, with its Client Nonce.
fn configuration_request() -> Vec<u8> {
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    request.tlvs.client_nonce = Some([0x4e; 16]);
    let mut out = Vec::new();
    request.encode_envelope(&mut out).expect("encodable");
    out
}

/// Opens a tunnel on `conn` and returns its id, address and control key.
fn configure(
    d: &mut SessionDirector,
    now: Instant,
    conn: u64,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> (u64, Ipv4Addr, Option<ControlKey>) {
    let c = ConnectionHandle(conn);
    d.handle_connect(now, c, info(conn)).expect("fresh handle");
    d.handle_datagram(now, c, request);
    let mut result = (0, Ipv4Addr::UNSPECIFIED, None);
    while d.poll_transmit(now, buf).is_some() {
        let env = Envelope::decode_datagram(buf).expect("valid");
        let m = Message::decode(env.payload).expect("valid");
        let ip = m
            .tlvs
            .internal_ipv4
            .map(|a| a.addr)
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        result = (
            m.header.tunnel_id,
            ip,
            m.tlvs.control_key.map(|k| ControlKey::new(&k)),
        );
    }
    while d.poll_event().is_some() {}
    result
}

fn configuration_exchanges(now: Instant) {
    let mut d = SessionDirector::new(config()).expect("valid");
    let request = configuration_request();
    let mut buf = Vec::new();
    let n = 300_000u64;
    let start = Instant::now();
    for i in 0..n {
        let (id, _, key) = configure(&mut d, now, i, &request, &mut buf);
        let key = key.expect("a fresh tunnel's key");
        // Release it again so the pool and maps stay at a steady size.
        let mut release = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, 2, id);
        release.tlvs.result_code = Some(ResultCode::SUCCESS);
        buf.clear();
        release
            .encode_envelope_with_integrity(&key.client_to_director(), &mut buf)
            .expect("encodable");
        let bytes = buf.clone();
        d.handle_datagram(now, ConnectionHandle(i), &bytes);
        while d.poll_transmit(now, &mut buf).is_some() {}
        while d.poll_event().is_some() {}
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "configuration exchanges: {:.0}/s on one core ({n} exchanges, each with connect, request, keyed response, signed release; goal >= 500k/s)",
        n as f64 / secs
    );
}

fn relay(now: Instant) {
    let mut d = SessionDirector::new(config()).expect("valid");
    let request = configuration_request();
    let mut buf = Vec::new();
    let (_, a, _) = configure(&mut d, now, 1, &request, &mut buf);
    let (_, b, _) = configure(&mut d, now, 2, &request, &mut buf);
    // A 200-octet RTP-sized IPv4/UDP packet from a to b.
    let mut packet = vec![0x45, 0, 0, 200, 0, 0, 0x40, 0, 64, 17, 0, 0];
    packet.extend_from_slice(&a.octets());
    packet.extend_from_slice(&b.octets());
    packet.extend_from_slice(&[0x13, 0x8c, 0x13, 0x8c, 0, 180, 0, 0]);
    packet.resize(200, 0xab);
    let mut frame = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &packet, &mut frame).expect("fits");
    let n = 10_000_000u64;
    let mut relayed = 0u64;
    // Warm the buffer pool so the measured loop is in steady state.
    for _ in 0..1000 {
        d.handle_datagram(now, ConnectionHandle(1), &frame);
        while d.poll_transmit(now, &mut buf).is_some() {}
    }
    let allocs_before = allocations();
    let start = Instant::now();
    for _ in 0..n {
        d.handle_datagram(now, ConnectionHandle(1), black_box(&frame));
        while let Some(t) = d.poll_transmit(now, &mut buf) {
            let _ = black_box(t);
            relayed += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let allocs = allocations() - allocs_before;
    assert_eq!(relayed, n, "every frame relayed");
    println!(
        "relay: {:.2}M frames/s on one core ({:.1} ns/frame, 200-octet packets, {allocs} allocations in {n} frames; goal >= 5M/s)",
        n as f64 / secs / 1e6,
        secs * 1e9 / n as f64
    );
}

fn memory_per_idle_tunnel(now: Instant) {
    let tunnels = 200_000u64;
    let mut d = SessionDirector::new(config()).expect("valid");
    let request = configuration_request();
    let mut buf = Vec::new();
    let before = live();
    for i in 0..tunnels {
        configure(&mut d, now, i, &request, &mut buf);
    }
    let after = live();
    assert_eq!(d.stats().active_tunnels as u64, tunnels);
    let per = (after - before) as f64 / tunnels as f64;
    println!(
        "memory: {per:.0} heap octets per idle tunnel with {tunnels} tunnels ({:.1} MiB in all; goal <= 1024)",
        (after - before) as f64 / (1 << 20) as f64
    );
    // Keep the director alive until measured.
    black_box(&d);
}

fn main() {
    let now = Instant::now();
    configuration_exchanges(now);
    relay(now);
    memory_per_idle_tunnel(now);
}
